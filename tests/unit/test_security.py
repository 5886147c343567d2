"""Security loose ends (issue 14, item 7), no servers.

* Requests with a missing or wrong API key are rate-limited per client address.
* A Redis URL's password never reaches logs, error messages, status answers or files.
* Admin reloads have a low rate limit of their own.
"""

from __future__ import annotations

import logging
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from streamrec.api_models import RecommendRequest, RecommendResponse, ResponseMetadata
from streamrec.auth import UNKNOWN_ADDRESS, ApiKeyAuth, AuthConfig, RateLimiter, client_address
from streamrec.errors import ConfigError, OnlineStoreUnavailableError
from streamrec.features.repo import (
    ENV_REDIS_PASSWORD,
    OnlineStoreSettings,
    redis_connection_string,
    render_config,
)
from streamrec.redact import redact_url
from streamrec.serving.gateway import GatewayLimits, create_app

READ = "read-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
SECRET = "s3cret"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def _recommend(req: RecommendRequest) -> RecommendResponse:
    return RecommendResponse(
        user_id=req.user_id,
        items=[],
        metadata=ResponseMetadata(model_version="test", degradation_level="full", request_id="-"),
    )


def make_app(clock: FakeClock, reloads: list[int] | None = None, **limits: Any) -> FastAPI:
    auth = ApiKeyAuth.from_config(
        AuthConfig.model_validate(
            {
                "keys": [
                    {"name": "reader", "key": READ, "scopes": ["read"]},
                    {"name": "ops", "key": ADMIN, "scopes": ["admin"]},
                ],
                "use_env_key": False,
            }
        ),
        environ={},
    )
    done = reloads if reloads is not None else []

    async def reload() -> dict[str, Any]:
        done.append(1)
        return {"model_version": str(len(done))}

    lim = GatewayLimits.model_validate(limits)
    limiter = RateLimiter(lim.rate_limit.rate_per_s, lim.rate_limit.burst, clock=clock)
    return create_app(_recommend, None, auth, lim, reload=reload, rate_limiter=limiter, clock=clock)


def client_at(app: FastAPI, host: str) -> TestClient:
    return TestClient(app, raise_server_exceptions=False, client=(host, 40000))


def rec(c: TestClient, key: str | None, **headers: str) -> int:
    if key:
        headers["X-API-Key"] = key
    return c.post("/v1/recommend", json={"user_id": 1}, headers=headers).status_code


# ------------------------------------------------------------------- unauthenticated requests


def test_bad_keys_are_rate_limited_per_client_address() -> None:
    clock = FakeClock()
    app = make_app(clock, unauthenticated_rate_limit={"rate_per_s": 1, "burst": 3})
    attacker, other = client_at(app, "203.0.113.7"), client_at(app, "198.51.100.9")
    assert [rec(attacker, k) for k in (None, "wrong-key-0123456789", "x", None)] == [401, 401, 401, 429]
    r = attacker.post("/v1/recommend", json={"user_id": 1}, headers={"X-API-Key": "guess-0123456789abcd"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    body = r.json()
    assert (
        body["error"] == "rate_limited" and "X-API-Key" in body["detail"] and "203.0.113.7" in body["detail"]
    )
    assert body["request_id"] == r.headers["X-Request-ID"]
    # another address is untouched, and a valid key from the throttled address still works
    assert rec(other, None) == 401
    assert rec(attacker, READ) == 200
    # the admin and events endpoints share the address's bucket
    assert attacker.post("/v1/admin/reload").status_code == 429
    assert attacker.post("/v1/events", json={"events": []}).status_code == 429
    clock.t += 1.0  # one token back
    assert rec(attacker, None) == 401
    assert rec(attacker, None) == 429


def test_valid_keys_never_spend_the_address_bucket() -> None:
    clock = FakeClock()
    app = make_app(clock, unauthenticated_rate_limit={"rate_per_s": 1, "burst": 1})
    c = client_at(app, "203.0.113.7")
    assert [rec(c, READ) for _ in range(5)] == [200] * 5
    assert rec(c, None) == 401 and rec(c, None) == 429


def test_x_forwarded_for_is_ignored_unless_trusted() -> None:
    clock = FakeClock()
    limit = {"rate_per_s": 1, "burst": 1}
    app = make_app(clock, unauthenticated_rate_limit=limit)
    c = client_at(app, "10.0.0.1")
    assert rec(c, None, **{"X-Forwarded-For": "1.1.1.1"}) == 401
    assert rec(c, None, **{"X-Forwarded-For": "2.2.2.2"}) == 429  # spoofing gets no new bucket
    trusted = make_app(clock, unauthenticated_rate_limit=limit, trust_x_forwarded_for=True)
    proxy = client_at(trusted, "10.0.0.1")
    assert rec(proxy, None, **{"X-Forwarded-For": "6.6.6.6, 1.1.1.1"}) == 401
    assert rec(proxy, None, **{"X-Forwarded-For": "7.7.7.7, 1.1.1.1"}) == 429  # the proxy's entry counts
    assert rec(proxy, None, **{"X-Forwarded-For": "2.2.2.2"}) == 401


def test_client_address_normalises_and_groups_ipv6_by_64() -> None:
    assert client_address("203.0.113.7") == "203.0.113.7"
    assert client_address("::ffff:203.0.113.7") == "203.0.113.7"
    assert (
        client_address("2001:db8:1:2:aaaa::1")
        == client_address("2001:db8:1:2:bbbb::2")
        == "2001:db8:1:2::/64"
    )
    assert client_address("2001:db8:1:3::1") != client_address("2001:db8:1:2::1")
    assert client_address(None) == client_address("") == UNKNOWN_ADDRESS
    assert client_address("testclient") == "testclient"
    assert client_address("10.0.0.1", ["9.9.9.9"]) == "10.0.0.1"  # not trusted by default
    trusted = {"trust_forwarded_for": True}
    assert client_address("10.0.0.1", ["9.9.9.9, 8.8.8.8:443"], **trusted) == "8.8.8.8"
    assert client_address("10.0.0.1", ["9.9.9.9", "[2001:db8::1]:80"], **trusted) == "2001:db8::/64"
    assert client_address("10.0.0.1", ["garbage"], **trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", [], **trusted) == "10.0.0.1"


def test_address_buckets_are_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, clock=clock, max_keys=100)
    for i in range(10_000):
        limiter.acquire(client_address(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"))
    assert len(limiter._buckets) == 100
    assert "10.0.39.15" in limiter._buckets and "10.0.0.0" not in limiter._buckets  # LRU kept


def test_gateway_limits_defaults_and_validation() -> None:
    lim = GatewayLimits()
    assert (lim.unauthenticated_rate_limit.rate_per_s, lim.unauthenticated_rate_limit.burst) == (5.0, 20)
    assert (lim.admin_reload_rate_limit.rate_per_s, lim.admin_reload_rate_limit.burst) == (0.1, 2)
    assert lim.trust_x_forwarded_for is False and lim.max_client_addresses == 10_000
    with pytest.raises(ValueError):
        GatewayLimits.model_validate({"admin_reload_rate_limit": {"rate_per_s": 0, "burst": 1}})
    with pytest.raises(ValueError):
        GatewayLimits.model_validate({"max_client_addresses": 0})


# ---------------------------------------------------------------------------- admin reloads


def test_admin_reloads_are_rate_limited() -> None:
    clock = FakeClock()
    reloads: list[int] = []
    app = make_app(clock, reloads)
    c = client_at(app, "127.0.0.1")
    ops = {"X-API-Key": ADMIN}
    assert [c.post("/v1/admin/reload", headers=ops).status_code for _ in range(3)] == [200, 200, 429]
    r = c.post("/v1/admin/reload", headers=ops)
    assert r.status_code == 429 and r.headers["Retry-After"] == "10" and r.json()["error"] == "rate_limited"
    assert "admin_reload_rate_limit" in r.json()["detail"] and len(reloads) == 2
    assert rec(c, ADMIN) == 200  # other endpoints are unaffected
    clock.t += 10.0
    assert c.post("/v1/admin/reload", headers=ops).status_code == 200
    assert c.post("/v1/admin/reload", headers=ops).status_code == 429 and len(reloads) == 3
    # a key without the admin scope is refused before it can spend a reload token
    clock.t += 10.0
    assert c.post("/v1/admin/reload", headers={"X-API-Key": READ}).status_code == 403
    assert c.post("/v1/admin/reload", headers=ops).status_code == 200


def test_admin_reload_limit_is_configurable() -> None:
    clock = FakeClock()
    app = make_app(clock, admin_reload_rate_limit={"rate_per_s": 1, "burst": 5})
    c = client_at(app, "127.0.0.1")
    codes = [c.post("/v1/admin/reload", headers={"X-API-Key": ADMIN}).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


# ------------------------------------------------------------------------ Redis URL secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:6390/0", "redis://:***@127.0.0.1:6390/0"),
        ("rediss://user:s3cret@cache:6380/1", "rediss://user:***@cache:6380/1"),
        ("redis://s3cret@cache", "redis://***@cache"),
        ("redis://:s3c@r/et@cache:1/0", "redis://:***@cache:1/0"),  # unescaped @ and / in it
        ("redis://cache:1/0?password=s3cret&db=2", "redis://cache:1/0?password=***&db=2"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("redis://:s3cret", "redis://:***"),
        ("redis://h:s3cret/0", "redis://h:***/0"),
        ("127.0.0.1:6379,password=s3cret", "<redacted: not a URL>"),
        (None, ""),
    ],
)
def test_redact_url(url: str | None, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_describe_repr_and_errors_hide_the_password() -> None:
    s = OnlineStoreSettings.resolve("redis", f"redis://:{SECRET}@127.0.0.1:6390/0")
    assert s.redis_url is not None and SECRET in s.redis_url  # kept for connecting
    assert s.describe() == "redis redis://:***@127.0.0.1:6390/0"
    assert SECRET not in repr(s) and SECRET not in str(s) and "***" in repr(s)
    for bad in (
        f"http://:{SECRET}@h:1",
        f"redis://:{SECRET}@h:1/abc",
        f"redis://:{SECRET}@h:port/0",
        f"redis://:{SECRET}@[::1/0",
        f"redis://:{SECRET}",  # no @: the password would parse as a port
    ):
        with pytest.raises(ConfigError) as info:
            OnlineStoreSettings.resolve("redis", bad)
        assert SECRET not in str(info.value) and "redis://" in str(info.value), bad


def test_the_rendered_file_names_the_password_by_reference(tmp_path: Path) -> None:
    s = OnlineStoreSettings("redis", f"redis://:{SECRET}@127.0.0.1:6390/0", 0.2)
    in_memory = render_config(tmp_path, s)
    on_disk = render_config(tmp_path, s, for_file=True)
    assert f"password={SECRET}," in in_memory
    assert SECRET not in on_disk and f"password=${{{ENV_REDIS_PASSWORD}}}," in on_disk
    assert redis_connection_string(s.redis_url or "", 1, password_ref="X") == (
        "127.0.0.1:6390,db=0,password=${X},socket_timeout=1,socket_connect_timeout=1"
    )


@pytest.mark.filterwarnings("ignore")
def test_unreachable_redis_with_a_password_leaks_it_nowhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from streamrec.features.client import FeatureClient

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    features = tmp_path / "features"
    features.mkdir()
    stale = features / "feature_store.yaml"
    stale.write_text(f"connection_string: 127.0.0.1:{port},password={SECRET}\n")  # an older version's file
    caplog.set_level(logging.DEBUG)
    fc = FeatureClient(
        tmp_path, online="redis", redis_url=f"redis://:{SECRET}@127.0.0.1:{port}/0", timeout_s=0.2
    )
    with pytest.raises(OnlineStoreUnavailableError) as info:
        fc.push_interaction({"user_id": 1, "item_id": 2, "event_type": "click"})
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "***" in message and SECRET not in message
    assert SECRET not in repr(info.value) and SECRET not in str(info.value.__cause__)
    assert SECRET not in caplog.text
    assert SECRET not in fc.settings.describe() and SECRET not in repr(fc.settings)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            holds = SECRET.encode() in path.read_bytes()
            world_readable = bool(path.stat().st_mode & stat.S_IROTH)
            assert not (holds and world_readable), path
    assert SECRET not in stale.read_text()  # rewritten without it
    # the config Feast uses in this process still has the password
    assert f"password={SECRET}" in fc.store.config.online_store.connection_string
