"""API keys with scopes, and a per-key token-bucket rate limiter.

Plain Python (no FastAPI): the gateway calls :meth:`ApiKeyAuth.authenticate` /
:meth:`ApiKeyAuth.require` with the presented key and the scope an endpoint needs, then
:meth:`RateLimiter.check` with the principal's name. A request whose key is missing or unknown
is charged instead to its client address (:func:`client_address`) in a limiter of its own, so
guessing keys is rate-limited too without touching the buckets of real keys.

Scopes: ``read`` (``POST /recommend``), ``write`` (``POST /events``), ``admin`` (operations;
implies every scope).

Keys come from an :class:`AuthConfig` (``keys:`` entries; a key may be given in clear or as
``sha256:<hex>`` so that config files need not hold secrets) and from the ``STREAMREC_API_KEY``
environment variable, whose key gets ``read`` + ``write``. Presented keys are hashed with SHA-256
and compared against *every* known digest with :func:`hmac.compare_digest`, so the time taken
reveals neither which key matched nor how much of one did.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import Field, SecretStr, field_validator

from streamrec.config import StrictModel
from streamrec.errors import ConfigError, StreamRecError

#: Scopes a key may hold; ``admin`` implies the others.
Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
#: Environment variable holding a read+write key.
ENV_API_KEY = "STREAMREC_API_KEY"
#: Shortest accepted plaintext key.
MIN_KEY_LENGTH = 16

Clock = Callable[[], float]


# --------------------------------------------------------------------------------------------
# Errors (derive from StreamRecError: one hierarchy)
# --------------------------------------------------------------------------------------------


class AuthError(StreamRecError):
    """Base of authentication, authorisation and rate-limit refusals.

    Attributes:
        status_code: The HTTP status the gateway should answer with.
        code: Short machine-readable code for :class:`~streamrec.api_models.ErrorBody`.
    """

    status_code = 401
    code = "unauthorized"


class AuthenticationError(AuthError):
    """No key, or a key that is not known (HTTP 401)."""


class PermissionDeniedError(AuthError):
    """A known key lacks the scope the endpoint needs (HTTP 403)."""

    status_code = 403
    code = "forbidden"


class RateLimitedError(AuthError):
    """A key has used up its request budget (HTTP 429).

    Attributes:
        retry_after_s: Seconds until the request would be allowed (for ``Retry-After``).
    """

    status_code = 429
    code = "rate_limited"

    def __init__(self, key: str, retry_after_s: float) -> None:
        if math.isinf(retry_after_s):
            msg = f"request for '{key}' costs more than its rate-limit burst allows; send smaller batches"
        else:
            msg = f"rate limit exceeded for '{key}'; retry after {retry_after_s:.2f}s"
        super().__init__(msg)
        self.retry_after_s = retry_after_s


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class RateLimitConfig(StrictModel):
    """A token bucket: ``rate_per_s`` sustained, bursts up to ``burst`` requests.

    Attributes:
        rate_per_s: Tokens added per second.
        burst: Bucket capacity (largest burst allowed after idling).
    """

    rate_per_s: float = Field(default=50.0, gt=0)
    burst: int = Field(default=100, ge=1)


class ApiKeyConfig(StrictModel):
    """One API key.

    Attributes:
        name: Who holds the key (used in logs and as the rate-limit bucket; never the secret).
        key: The key in clear (at least 16 characters) or ``sha256:<64 hex digits>``.
        scopes: Scopes granted; ``admin`` implies all.
        rate_limit: This key's own limit, overriding the gateway's ``limits.rate_limit``.
    """

    name: str = Field(min_length=1)
    key: SecretStr
    scopes: list[Scope] = Field(min_length=1)
    rate_limit: RateLimitConfig | None = None

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: SecretStr) -> SecretStr:
        _digest_of(value.get_secret_value())  # raises ValueError on a weak or malformed key
        return value


class AuthConfig(StrictModel):
    """API-key authentication settings.

    Attributes:
        enabled: When false every request is accepted as ``anonymous`` with read+write (local
            development only; never in a deployed config).
        keys: Known keys.
        use_env_key: Also accept the key in ``STREAMREC_API_KEY`` (read+write), when set.

    The default per-key rate limit is the gateway's ``limits.rate_limit``; a key may set its own.
    """

    enabled: bool = True
    keys: list[ApiKeyConfig] = Field(default_factory=list)
    use_env_key: bool = True

    @field_validator("keys")
    @classmethod
    def _unique(cls, keys: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
        names = [k.name for k in keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate key names {dupes}")
        digests = [_digest_of(k.key.get_secret_value()) for k in keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same key is configured twice")
        return keys


def _digest_of(key: str) -> bytes:
    """SHA-256 digest of a plaintext key, or the digest given as ``sha256:<hex>``."""
    if key.startswith("sha256:"):
        hexpart = key.removeprefix("sha256:")
        try:
            raw = bytes.fromhex(hexpart)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError("a hashed key must be 'sha256:' followed by 64 hex digits")
        return raw
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"API keys must be at least {MIN_KEY_LENGTH} characters long")
    return hashlib.sha256(key.encode()).digest()


def _limit_of(config: RateLimitConfig | None) -> tuple[float, int] | None:
    return None if config is None else (config.rate_per_s, config.burst)


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form of a plaintext key, to put in a config file instead of the key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes:
        name: The key's name (safe to log; the rate-limit bucket).
        scopes: Scopes granted.
        rate_limit: The key's own ``(rate_per_s, burst)``, if configured.
    """

    name: str
    scopes: frozenset[Scope]
    rate_limit: tuple[float, int] | None = None

    def has(self, scope: Scope) -> bool:
        """Whether this principal may use ``scope`` (``admin`` implies every scope)."""
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", frozenset({"read", "write"}))


class ApiKeyAuth:
    """Checks presented API keys and scopes.

    Args:
        keys: ``(principal, key)`` pairs; a key is plaintext or ``sha256:<hex>``.
        enabled: When false, :meth:`authenticate` returns :data:`ANONYMOUS` for any input.

    Raises:
        ConfigError: a key is too short, malformed or duplicated.
    """

    def __init__(self, keys: Iterable[tuple[Principal, str]], enabled: bool = True) -> None:
        self.enabled = enabled
        self._entries: list[tuple[bytes, Principal]] = []
        for principal, key in keys:
            try:
                digest = _digest_of(key)
            except ValueError as err:
                raise ConfigError(f"API key '{principal.name}': {err}") from None
            if any(d == digest for d, _ in self._entries):
                raise ConfigError(f"API key '{principal.name}' duplicates another configured key")
            self._entries.append((digest, principal))

    @classmethod
    def from_config(cls, config: AuthConfig, environ: Mapping[str, str] | None = None) -> ApiKeyAuth:
        """Build from an :class:`AuthConfig` plus ``STREAMREC_API_KEY`` (read+write) if set.

        Args:
            config: The auth configuration.
            environ: Environment to read (``os.environ`` by default).

        Raises:
            ConfigError: a key is invalid, or the environment key is too short.
        """
        pairs = [
            (Principal(k.name, frozenset(k.scopes), _limit_of(k.rate_limit)), k.key.get_secret_value())
            for k in config.keys
        ]
        env = os.environ if environ is None else environ
        env_key = env.get(ENV_API_KEY, "").strip()
        if config.use_env_key and env_key:
            if len(env_key) < MIN_KEY_LENGTH:
                raise ConfigError(f"{ENV_API_KEY} must be at least {MIN_KEY_LENGTH} characters long")
            # The environment holds a plaintext key: hash it here so that a value that happens
            # to start with "sha256:" is not mistaken for a digest.
            pairs.append((Principal("env", frozenset({"read", "write"})), hash_key(env_key)))
        if config.enabled and not pairs:
            raise ConfigError(
                f"authentication is enabled but no API key is configured: set {ENV_API_KEY} "
                "or add 'keys' to the auth config (or set 'enabled: false' for local development)"
            )
        return cls(pairs, enabled=config.enabled)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, presented: str | None) -> Principal:
        """Return the principal holding ``presented``.

        Every configured digest is compared (constant time per comparison, no early exit).

        Raises:
            AuthenticationError: no key was presented, or it is not known.
        """
        if not self.enabled:
            return ANONYMOUS
        if not presented:
            raise AuthenticationError("missing API key (send it in the 'X-API-Key' header)")
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise AuthenticationError("invalid API key")
        return found

    @staticmethod
    def authorize(principal: Principal, scope: Scope) -> None:
        """Check that ``principal`` holds ``scope``.

        Raises:
            PermissionDeniedError: it does not.
        """
        if not principal.has(scope):
            raise PermissionDeniedError(
                f"API key '{principal.name}' lacks the '{scope}' scope (it has {sorted(principal.scopes)})"
            )

    def require(self, presented: str | None, scope: Scope) -> Principal:
        """Authenticate ``presented`` and check it holds ``scope``.

        Raises:
            AuthenticationError: missing or unknown key.
            PermissionDeniedError: the key lacks ``scope``.
        """
        principal = self.authenticate(presented)
        self.authorize(principal, scope)
        return principal


# --------------------------------------------------------------------------------------------
# Rate limiting
# --------------------------------------------------------------------------------------------

#: Bucket of requests whose client address is unknown (no peer in the ASGI scope).
UNKNOWN_ADDRESS = "unknown"


def client_address(
    peer: str | None, forwarded_for: Sequence[str] = (), *, trust_forwarded_for: bool = False
) -> str:
    """The rate-limit bucket of an unauthenticated request: its client's address.

    IPv6 addresses are grouped by their /64 network (one host usually holds a whole /64, so
    per-address buckets would be free to multiply); IPv4-mapped IPv6 addresses count as IPv4.

    Args:
        peer: The TCP peer's host (``scope["client"][0]``), or None when unknown.
        forwarded_for: The values of every ``X-Forwarded-For`` header, in order.
        trust_forwarded_for: Use the *last* ``X-Forwarded-For`` entry (the one the proxy right
            in front of the gateway appended) instead of the peer, when it is an IP address.
            Only behind such a proxy: otherwise a client picks its own bucket with the header.

    Returns:
        A normalised address (``"203.0.113.7"``, ``"2001:db8:1:2::/64"``), the peer as given
        when it is not an IP address (e.g. ``"testclient"``), or :data:`UNKNOWN_ADDRESS`.
    """
    ip = None
    if trust_forwarded_for:
        entries = [e.strip() for v in forwarded_for for e in v.split(",") if e.strip()]
        ip = _parse_ip(entries[-1]) if entries else None
    if ip is None:
        if not peer:
            return UNKNOWN_ADDRESS
        ip = _parse_ip(peer)
        if ip is None:
            return peer[:255]  # not an IP (a test client's name, a unix socket): keep, bounded
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from ``a.b.c.d``, ``a.b.c.d:port``, an IPv6 address or ``[v6]:port``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class RateDecision:
    """The answer of :meth:`RateLimiter.acquire`.

    Attributes:
        allowed: Whether the request may proceed (tokens were taken only if so).
        remaining: Whole tokens left in the bucket (for ``X-RateLimit-Remaining``).
        retry_after_s: Seconds until enough tokens are available (0 when allowed).
        limit: The bucket's capacity.
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    limit: int


class _Bucket:
    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now


class RateLimiter:
    """Per-key token buckets: ``rate_per_s`` sustained, bursts up to ``burst``.

    Thread-safe (one lock, O(1) work under it). Buckets are created full on first use and kept
    for at most ``max_keys`` keys (least recently used are dropped; a dropped bucket comes back
    full, which only forgives a key that has been idle longest).

    Args:
        rate_per_s: Default tokens per second.
        burst: Default capacity.
        clock: Monotonic clock in seconds (injectable for tests).
        max_keys: Most buckets kept.
    """

    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Clock = time.monotonic, max_keys: int = 10_000
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_s must be > 0, burst and max_keys >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._limits: dict[str, tuple[float, int]] = {}

    @classmethod
    def from_config(cls, config: RateLimitConfig, clock: Clock = time.monotonic) -> RateLimiter:
        """Build a limiter whose default limit is ``config``."""
        return cls(config.rate_per_s, config.burst, clock=clock)

    def set_limit(self, key: str, rate_per_s: float, burst: int) -> None:
        """Give ``key`` its own limit (e.g. from :attr:`Principal.rate_limit`); resets its bucket."""
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        with self._lock:
            self._limits[key] = (rate_per_s, burst)
            self._buckets.pop(key, None)

    def acquire(self, key: str, cost: float = 1.0, limit: tuple[float, int] | None = None) -> RateDecision:
        """Take ``cost`` tokens from ``key``'s bucket if it has them.

        Args:
            key: The bucket (a principal's name; never the secret key).
            cost: Tokens this request costs (e.g. the number of events in a batch).
            limit: ``(rate_per_s, burst)`` for this key (e.g. :attr:`Principal.rate_limit`);
                otherwise the limit from :meth:`set_limit`, else the default.
        """
        with self._lock:
            now = self._clock()
            rate, burst = limit or self._limits.get(key) or (self.rate_per_s, self.burst)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = _Bucket(rate, burst, now)
                self._buckets[key] = bucket
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                if (bucket.rate, bucket.burst) != (rate, burst):
                    bucket.rate, bucket.burst = rate, burst
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(float(bucket.burst), bucket.tokens + elapsed * bucket.rate)
                bucket.updated = now
            if cost <= bucket.tokens:
                bucket.tokens -= cost
                return RateDecision(True, math.floor(bucket.tokens), 0.0, bucket.burst)
            # A request costing more than the bucket can ever hold can never pass: retry = inf.
            retry = math.inf if cost > bucket.burst else (cost - bucket.tokens) / bucket.rate
            return RateDecision(False, math.floor(bucket.tokens), retry, bucket.burst)

    def capacity(self, key: str, limit: tuple[float, int] | None = None) -> int:
        """The burst of ``key``'s bucket: a request costing more can never be allowed.

        Args:
            key: The bucket.
            limit: As for :meth:`acquire`.
        """
        with self._lock:
            return (limit or self._limits.get(key) or (self.rate_per_s, self.burst))[1]

    def refund(self, key: str, cost: float) -> None:
        """Give back ``cost`` tokens taken by :meth:`acquire` (capped at the burst).

        For a request refused after part of its cost was taken, so that a refused request
        costs nothing.

        Args:
            key: The bucket.
            cost: Tokens to return.
        """
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:  # else dropped (LRU) since: it comes back full anyway
                bucket.tokens = min(float(bucket.burst), bucket.tokens + cost)

    def check(self, key: str, cost: float = 1.0, limit: tuple[float, int] | None = None) -> RateDecision:
        """Like :meth:`acquire` but raise when refused.

        Raises:
            RateLimitedError: the bucket lacks ``cost`` tokens; carries ``retry_after_s``.
        """
        decision = self.acquire(key, cost, limit)
        if not decision.allowed:
            raise RateLimitedError(key, decision.retry_after_s)
        return decision


__all__ = [
    "ANONYMOUS",
    "ENV_API_KEY",
    "SCOPES",
    "ApiKeyAuth",
    "ApiKeyConfig",
    "AuthConfig",
    "AuthError",
    "AuthenticationError",
    "PermissionDeniedError",
    "Principal",
    "RateDecision",
    "RateLimitConfig",
    "RateLimitedError",
    "RateLimiter",
    "Scope",
    "UNKNOWN_ADDRESS",
    "client_address",
    "hash_key",
]
