"""API keys, scopes and the token-bucket rate limiter (no servers, injectable clock)."""

from __future__ import annotations

import math
import threading

import pytest

from streamrec.auth import (
    ANONYMOUS,
    ENV_API_KEY,
    ApiKeyAuth,
    AuthConfig,
    AuthenticationError,
    AuthError,
    PermissionDeniedError,
    Principal,
    RateLimitConfig,
    RateLimitedError,
    RateLimiter,
    hash_key,
)
from streamrec.config import parse_config
from streamrec.errors import ConfigError, StreamRecError

READER = "reader-key-0123456789"
WRITER = "writer-key-0123456789"
ADMIN = "admin-key-00123456789"
ENV_KEY = "env-key-abcdefghijklmnop"


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make_auth(environ: dict[str, str] | None = None, **extra: object) -> ApiKeyAuth:
    cfg = parse_config(
        {
            "keys": [
                {"name": "dashboard", "key": READER, "scopes": ["read"]},
                {"name": "ingest", "key": hash_key(WRITER), "scopes": ["write"]},
                {
                    "name": "ops",
                    "key": ADMIN,
                    "scopes": ["admin"],
                    "rate_limit": {"rate_per_s": 5, "burst": 2},
                },
            ],
            **extra,
        },
        AuthConfig,
    )
    return ApiKeyAuth.from_config(cfg, environ=environ or {})


# ------------------------------------------------------------------------------ authentication


def test_keys_authenticate_to_their_principal() -> None:
    auth = make_auth()
    assert auth.authenticate(READER).name == "dashboard"
    assert auth.authenticate(WRITER).name == "ingest"  # configured only as a sha256 digest
    ops = auth.authenticate(ADMIN)
    assert ops.name == "ops" and ops.rate_limit == (5.0, 2)


@pytest.mark.parametrize("presented", [None, "", "nope", READER + "x", READER[:-1], hash_key(WRITER)])
def test_unknown_or_missing_keys_are_rejected(presented: str | None) -> None:
    with pytest.raises(AuthenticationError) as ei:
        make_auth().authenticate(presented)
    assert ei.value.status_code == 401 and ei.value.code == "unauthorized"


def test_scopes_and_admin_implies_all() -> None:
    auth = make_auth()
    assert auth.require(READER, "read").name == "dashboard"
    with pytest.raises(PermissionDeniedError, match="lacks the 'write' scope") as ei:
        auth.require(READER, "write")
    assert ei.value.status_code == 403
    with pytest.raises(PermissionDeniedError):
        auth.require(WRITER, "read")
    with pytest.raises(PermissionDeniedError):
        auth.require(READER, "admin")
    for scope in ("read", "write", "admin"):
        assert auth.require(ADMIN, scope).name == "ops"


def test_env_key_gets_read_and_write_only() -> None:
    auth = make_auth({ENV_API_KEY: ENV_KEY})
    p = auth.authenticate(ENV_KEY)
    assert p.name == "env" and p.has("read") and p.has("write") and not p.has("admin")
    assert len(auth) == 4


def test_env_key_alone_and_ignored_when_disabled() -> None:
    auth = ApiKeyAuth.from_config(AuthConfig(), environ={ENV_API_KEY: ENV_KEY})
    assert auth.require(ENV_KEY, "write").name == "env"
    cfg = AuthConfig(use_env_key=False, keys=[])
    with pytest.raises(ConfigError, match="no API key is configured"):
        ApiKeyAuth.from_config(cfg, environ={ENV_API_KEY: ENV_KEY})


def test_env_key_that_looks_like_a_digest_is_still_a_plaintext_key() -> None:
    weird = "sha256:" + "0" * 64
    auth = ApiKeyAuth.from_config(AuthConfig(), environ={ENV_API_KEY: weird})
    assert auth.authenticate(weird).name == "env"


def test_no_keys_is_a_config_error_and_short_env_key_too() -> None:
    with pytest.raises(ConfigError, match=ENV_API_KEY):
        ApiKeyAuth.from_config(AuthConfig(), environ={})
    with pytest.raises(ConfigError, match=f"{ENV_API_KEY} must be at least 16"):
        ApiKeyAuth.from_config(AuthConfig(), environ={ENV_API_KEY: "short"})


def test_disabled_auth_returns_anonymous() -> None:
    auth = ApiKeyAuth.from_config(AuthConfig(enabled=False), environ={})
    assert auth.authenticate(None) is ANONYMOUS
    assert auth.require("anything", "write") is ANONYMOUS
    with pytest.raises(PermissionDeniedError):
        auth.require(None, "admin")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([{"name": "a", "key": "short", "scopes": ["read"]}], "at least 16 characters"),
        ([{"name": "a", "key": "sha256:abc", "scopes": ["read"]}], "64 hex digits"),
        ([{"name": "a", "key": READER, "scopes": ["root"]}], "scopes.0"),
        ([{"name": "a", "key": READER, "scopes": []}], "at least 1 item"),
        ([{"name": "a", "key": READER, "scopes": ["read"], "secret": 1}], "unknown key 'keys.0.secret'"),
        (
            [
                {"name": "a", "key": READER, "scopes": ["read"]},
                {"name": "a", "key": WRITER, "scopes": ["read"]},
            ],
            "duplicate key names",
        ),
        (
            [
                {"name": "a", "key": READER, "scopes": ["read"]},
                {"name": "b", "key": hash_key(READER), "scopes": ["read"]},
            ],
            "configured twice",
        ),
    ],
)
def test_bad_auth_configs_are_rejected(keys: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"keys": keys}, AuthConfig)


def test_secret_is_not_printed_in_config_repr() -> None:
    cfg = parse_config({"keys": [{"name": "a", "key": READER, "scopes": ["read"]}]}, AuthConfig)
    assert READER not in repr(cfg) and READER not in str(cfg.model_dump())


def test_constructor_validates_keys() -> None:
    with pytest.raises(ConfigError, match="'x'.*at least 16"):
        ApiKeyAuth([(Principal("x", frozenset({"read"})), "short")])
    with pytest.raises(ConfigError, match="duplicates"):
        ApiKeyAuth(
            [(Principal("x", frozenset({"read"})), READER), (Principal("y", frozenset({"read"})), READER)]
        )


def test_auth_errors_are_streamrec_errors() -> None:
    for cls in (AuthenticationError, PermissionDeniedError, RateLimitedError):
        assert issubclass(cls, AuthError) and issubclass(cls, StreamRecError)


def test_principal_is_hashable() -> None:
    assert len({make_auth().authenticate(ADMIN), make_auth().authenticate(ADMIN)}) == 1


# ------------------------------------------------------------------------------- rate limiting


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    decisions = [rl.acquire("a") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert rl.acquire("a").allowed
    assert not rl.acquire("a").allowed
    clock.advance(100.0)  # refill is capped at burst
    assert [rl.acquire("a").allowed for _ in range(4)] == [True, True, True, False]


def test_buckets_are_per_key() -> None:
    rl = RateLimiter(1.0, 1, clock=FakeClock())
    assert rl.acquire("a").allowed and not rl.acquire("a").allowed
    assert rl.acquire("b").allowed


def test_check_raises_with_retry_after_and_cost() -> None:
    clock = FakeClock()
    rl = RateLimiter.from_config(RateLimitConfig(rate_per_s=10, burst=10), clock=clock)
    rl.check("ingest", cost=8)
    with pytest.raises(RateLimitedError, match="retry after 0.60s") as ei:
        rl.check("ingest", cost=8)
    assert ei.value.status_code == 429 and ei.value.retry_after_s == pytest.approx(0.6)
    with pytest.raises(RateLimitedError, match="smaller batches") as ei:
        rl.check("ingest", cost=11)
    assert math.isinf(ei.value.retry_after_s)


def test_per_key_limits_from_principal_and_set_limit() -> None:
    clock = FakeClock()
    rl = RateLimiter(100.0, 100, clock=clock)
    ops = make_auth().authenticate(ADMIN)
    assert [rl.acquire(ops.name, limit=ops.rate_limit).allowed for _ in range(3)] == [True, True, False]
    rl.set_limit("slow", 1.0, 1)
    assert rl.acquire("slow").allowed and not rl.acquire("slow").allowed


def test_limiter_evicts_least_recently_used_buckets() -> None:
    rl = RateLimiter(1.0, 1, clock=FakeClock(), max_keys=2)
    assert rl.acquire("a").allowed and rl.acquire("b").allowed
    assert not rl.acquire("a").allowed  # a is now most recent
    assert rl.acquire("c").allowed  # evicts b
    assert rl.acquire("b").allowed  # b comes back full (evicts a)
    assert rl.acquire("a").allowed


def test_limiter_is_thread_safe() -> None:
    rl = RateLimiter(1e-9, 500, clock=FakeClock())
    allowed = []
    lock = threading.Lock()

    def worker() -> None:
        n = sum(rl.acquire("k").allowed for _ in range(200))
        with lock:
            allowed.append(n)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 500  # exactly the burst, never more


def test_invalid_limiter_arguments() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0, 1)
    with pytest.raises(ConfigError):
        parse_config({"rate_per_s": -1}, RateLimitConfig)


def test_the_default_rate_limit_is_the_gateways_not_an_auth_key() -> None:
    from streamrec.config import parse_config
    from streamrec.errors import ConfigError

    # It lives under limits.rate_limit; under auth it used to be accepted and silently ignored.
    with pytest.raises(ConfigError, match="rate_limit"):
        parse_config({"rate_limit": {"rate_per_s": 5, "burst": 10}}, AuthConfig, "auth")
