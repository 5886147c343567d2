"""The HTTP gateway: a FastAPI app in front of the funnel and the event log (no Ray imports).

:func:`create_app` builds the app from plain callables, so the same gateway runs

* inside a Ray Serve ingress deployment (``deployments/``: fused or cluster composition), and
* under plain uvicorn or an in-process ASGI client (unit and integration tests).

Endpoints:

=========================  =======  ====================================================
``POST /v1/recommend``     read     :class:`~streamrec.api_models.RecommendRequest` -> response
``POST /v1/events``        write    :class:`~streamrec.api_models.EventsRequest` -> counts
``POST /v1/admin/reload``  admin    ask the stages factory for a fresh model, swap atomically
``POST /v1/admin/items``   admin    :class:`~streamrec.api_models.ItemsUpsertRequest`: catalogue upserts
``GET /v1/admin/status``   admin    stages, event-log counters, rate limits
``GET /healthz``           -        liveness (the process answers)
``GET /readyz``            -        readiness (stages loaded); 503 until then
``GET /openapi.json``      -        the OpenAPI schema (``/docs`` renders it)
=========================  =======  ====================================================

Request handling, in order: request id (``X-Request-ID``: the client's if sane, else a new one;
echoed on every response and in the log line), API key from ``X-API-Key`` (401 missing or
unknown, or 429 once the client address has sent too many such requests; 403 wrong scope),
per-key rate limit (429 with ``Retry-After``; admin reloads have a limit of their own), body size (413),
JSON (400 ``malformed_json``; parsed as JSON whatever the ``Content-Type``), schema (422 with one
entry per bad field), then for events the batch's cost (413 ``batch_too_large`` above the key's
burst). Every error body is an :class:`~streamrec.api_models.ErrorBody`. A client's mistake is
always a 4xx; a 5xx means a server fault (logged with the request id and traceback; any exception
no handler expected becomes a 500 ``internal`` body).

The hot path avoids FastAPI's per-request machinery: bodies are read and validated with
``model_validate_json`` (one Rust call), and responses are serialised with ``model_dump_json``
and returned as raw :class:`~starlette.responses.Response` objects.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamrec.api_models import (
    ErrorBody,
    EventsRequest,
    EventsResponse,
    ItemsUpsertRequest,
    ItemsUpsertResponse,
    RecommendRequest,
    RecommendResponse,
    error_from_validation,
)
from streamrec.auth import (
    ApiKeyAuth,
    AuthenticationError,
    AuthError,
    Principal,
    RateDecision,
    RateLimitConfig,
    RateLimiter,
    client_address,
)
from streamrec.auth import Scope as AuthScope
from streamrec.config import StrictModel
from streamrec.data.event_log import EventLog
from streamrec.errors import DataError, StreamRecError
from streamrec.monitoring.logs import REQUEST_ID
from streamrec.monitoring.metrics import ServingMetrics

log = logging.getLogger("streamrec.gateway")

#: Header carrying the API key.
API_KEY_HEADER = "X-API-Key"
#: Header carrying the request id (in and out).
REQUEST_ID_HEADER = "X-Request-ID"
_JSON = "application/json"
_SANE_RID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_INTERNAL_DETAIL = "the server failed to handle this request; retry, and quote the request id if it persists"

RecommendFn = Callable[[RecommendRequest], Awaitable[RecommendResponse]]
ReloadFn = Callable[[], Awaitable[dict[str, Any]]]
InfoFn = Callable[[], "dict[str, Any] | Awaitable[dict[str, Any]]"]
StatusFn = Callable[[], Awaitable[dict[str, Any]]]
ReadyFn = Callable[[], "tuple[bool, dict[str, Any]] | Awaitable[tuple[bool, dict[str, Any]]]"]


class GatewayLimits(StrictModel):
    """Request limits of the gateway.

    Attributes:
        max_body_bytes: Largest request body accepted (413 beyond).
        rate_limit: Default per-key token bucket (a key's own ``rate_limit`` overrides it).
        events_per_token: ``POST /v1/events`` costs one token per this many events (at least 1).
        unauthenticated_rate_limit: Token bucket per client address for requests with a
            missing or unknown API key: each such request takes a token, and once the bucket is
            empty they are answered 429 (with ``Retry-After``) instead of 401. Requests with a
            valid key never touch it.
        max_client_addresses: Most per-address buckets kept (least recently used dropped).
        trust_x_forwarded_for: Take the client address from the last ``X-Forwarded-For``
            entry instead of the TCP peer. Only behind a proxy that appends it; else clients
            choose their own bucket.
        admin_reload_rate_limit: Token bucket of ``POST /v1/admin/reload`` (one per replica,
            shared by every admin key): 429 with ``Retry-After`` beyond it.
    """

    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    events_per_token: int = Field(default=100, ge=1)
    unauthenticated_rate_limit: RateLimitConfig = Field(
        default_factory=lambda: RateLimitConfig(rate_per_s=5.0, burst=20)
    )
    max_client_addresses: int = Field(default=10_000, ge=1)
    trust_x_forwarded_for: bool = False
    admin_reload_rate_limit: RateLimitConfig = Field(
        default_factory=lambda: RateLimitConfig(rate_per_s=0.1, burst=2)
    )


class _ClientError(Exception):
    """A refusal to answer with :class:`ErrorBody` (raised inside the handlers only)."""

    def __init__(self, status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> None:
        super().__init__(body.error)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _error(
    status: int, code: str, detail: Any, rid: str | None, headers: dict[str, str] | None = None
) -> Response:
    body = ErrorBody(error=code, detail=detail, request_id=rid)
    return Response(body.model_dump_json(), status_code=status, media_type=_JSON, headers=headers)


def _rid(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure-ASGI middleware: assign a request id, echo it, log one line per request.

    The id is the client's ``X-Request-ID`` when it is 1-64 characters of ``[A-Za-z0-9._:-]``,
    else a new random one; it is stored in ``request.state.request_id``.

    Behind a proxy that already assigns and echoes request ids (Ray Serve's HTTP proxy does),
    pass ``echo=False``: the proxy's id is then adopted as is and not echoed a second time, so
    the header, the response body and both logs carry the same id.

    Args:
        app: The wrapped ASGI app.
        echo: Assign (sanitised) and echo the id here.
        metrics: Counts every response by route and status class (None: off).
    """

    def __init__(self, app: ASGIApp, echo: bool = True, metrics: ServingMetrics | None = None) -> None:
        self.app = app
        self.echo = echo
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                if not self.echo or _SANE_RID.match(cand):
                    rid = cand
                break
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        REQUEST_ID.set(rid)  # the request log reads it (same task: the context carries it)
        t0 = time.perf_counter()
        status = 500
        raw_rid = rid.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo:
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw_rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.metrics is not None:
                self.metrics.http_response(scope.get("path", ""), status)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request_id=%s %s %s status=%d ms=%.1f principal=%s",
                    rid,
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    (time.perf_counter() - t0) * 1e3,
                    scope["state"].get("principal", "-"),
                )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def create_app(
    recommend: RecommendFn,
    events: EventLog | None,
    auth: ApiKeyAuth,
    limits: GatewayLimits | None = None,
    *,
    reload: ReloadFn | None = None,
    ready: ReadyFn | None = None,
    info: InfoFn | None = None,
    status: StatusFn | None = None,
    rate_limiter: RateLimiter | None = None,
    title: str = "StreamRec",
    echo_request_id: bool = True,
    clock: Callable[[], float] = time.monotonic,
    metrics: ServingMetrics | None = None,
    variant_of: Callable[[int], str | None] | None = None,
    upsert_items: Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]] | None = None,
) -> FastAPI:
    """Build the gateway app.

    Args:
        recommend: ``async (RecommendRequest) -> RecommendResponse``: the funnel (with its
            fallbacks). Its :class:`~streamrec.errors.StreamRecError` becomes a 503, anything
            else a 500; the gateway fills ``metadata.request_id``.
        events: The durable event log (None: ``POST /v1/events`` answers 503).
        auth: API keys and scopes.
        limits: Body size and rate limits (defaults: :class:`GatewayLimits`).
        reload: ``async () -> dict``: swap in a fresh stages object (admin endpoint); raise to
            refuse (the old stages keep serving; answered 409).
        ready: ``() -> (ready, details)`` (sync or async) for ``/readyz``; always ready if None.
        info: ``() -> dict`` (sync or async) with stage facts for ``/v1/admin/status``.
        status: ``async () -> dict`` with the whole status instead (``stages``, ``events``, ...;
            e.g. merged over every replica with :func:`merge_replica_status`); ``limits`` is
            added. When None, ``info`` and this process's event log answer.
        rate_limiter: Use this limiter (e.g. one with a fake clock) instead of one built from
            ``limits.rate_limit``.
        title: OpenAPI title.
        echo_request_id: Assign and echo ``X-Request-ID`` here; False behind Ray Serve's proxy,
            which does both itself (see :class:`RequestIdMiddleware`).
        clock: Monotonic clock of the per-address and admin-reload limiters (tests inject one).
        metrics: Where responses and rate-limited requests are counted (None: off).
        upsert_items: ``async (items) -> {accepted, catalogue_lines, flagged}``: durably record
            catalogue upserts (``POST /v1/admin/items``; 501 when None).
        variant_of: ``user_id -> experiment variant or None``: stamps events that carry no
            ``experiment_variant`` with the variant their user is in (None: no experiment).

    Returns:
        The FastAPI app (an ASGI callable).
    """
    limits = limits or GatewayLimits()
    meter = metrics or ServingMetrics(None)
    limiter = rate_limiter or RateLimiter.from_config(limits.rate_limit)
    anon = limits.unauthenticated_rate_limit
    address_limiter = RateLimiter(
        anon.rate_per_s, anon.burst, clock=clock, max_keys=limits.max_client_addresses
    )
    reload_limiter = RateLimiter.from_config(limits.admin_reload_rate_limit, clock=clock)
    max_body = limits.max_body_bytes

    app = FastAPI(
        title=title,
        version="1",
        description="Multi-stage recommendations (retrieval -> ranking -> re-ranking) and an events API.",
    )

    # ------------------------------------------------------------------ helpers
    def authorize(request: Request, scope: AuthScope) -> Principal:
        try:
            principal = auth.require(request.headers.get(API_KEY_HEADER), scope)
        except AuthenticationError as err:
            # Missing or unknown key: charge the client's address, so guessing keys is limited
            # without touching any real key's bucket (nor other addresses').
            peer = request.client.host if request.client else None
            addr = client_address(
                peer,
                request.headers.getlist("x-forwarded-for"),
                trust_forwarded_for=limits.trust_x_forwarded_for,
            )
            decision = address_limiter.acquire(addr)
            if not decision.allowed:
                raise _throttled(
                    decision,
                    "address",
                    f"too many requests without a valid API key from {addr}; retry after "
                    f"{decision.retry_after_s:.2f}s with a valid key in the '{API_KEY_HEADER}' header",
                ) from None
            raise _ClientError(err.status_code, ErrorBody(error=err.code, detail=str(err))) from None
        except AuthError as err:
            raise _ClientError(err.status_code, ErrorBody(error=err.code, detail=str(err))) from None
        request.state.principal = principal.name
        return principal

    def _throttled(decision: RateDecision, limiter_name: str, detail: str) -> _ClientError:
        """A 429 for a refused ``decision`` (``Retry-After`` in whole seconds, at least 1)."""
        meter.rate_limited(limiter_name)
        headers = {
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(decision.remaining),
            "Retry-After": str(max(1, math.ceil(decision.retry_after_s))),
        }
        return _ClientError(429, ErrorBody(error="rate_limited", detail=detail), headers)

    def charge(principal: Principal, cost: float, *, paid: float = 0.0) -> int:
        """Take ``cost`` tokens, else refuse with 429 and ``Retry-After``.

        ``paid`` tokens already taken for this request are given back on refusal, so a refused
        request costs nothing. Costs above the key's burst never pass and must be refused before
        (see ``events_endpoint``); they are not 429s, as waiting would not help.
        """
        decision = limiter.acquire(principal.name, cost, principal.rate_limit)
        if decision.allowed:
            return decision.remaining
        remaining = decision.remaining
        if paid:
            limiter.refund(principal.name, paid)
            remaining = min(decision.limit, remaining + math.floor(paid))
        retry = decision.retry_after_s
        if math.isinf(retry):  # unreachable while callers check the burst; never a 500 if not
            raise _batch_too_large(principal, cost + paid, decision.limit)
        headers = {
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(remaining),
            "Retry-After": str(max(1, math.ceil(retry))),
        }
        msg = f"rate limit exceeded for key '{principal.name}'; retry after {retry:.2f}s"
        meter.rate_limited("key")
        raise _ClientError(429, ErrorBody(error="rate_limited", detail=msg), headers)

    def _batch_too_large(principal: Principal, cost: float, burst: int) -> _ClientError:
        most = burst * limits.events_per_token
        return _ClientError(
            413,
            ErrorBody(
                error="batch_too_large",
                detail=(
                    f"this batch costs {cost:g} rate-limit tokens (one per started "
                    f"{limits.events_per_token} events), more than the burst ({burst}) of key "
                    f"'{principal.name}' allows, so it can never be accepted; split it into "
                    f"batches of at most {most} events"
                ),
            ),
        )

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _ClientError(
                    400, ErrorBody(error="bad_request", detail="Content-Length is not an integer")
                ) from None
            if size > max_body:
                raise _too_large(size)
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise _too_large(total)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(size: int) -> _ClientError:
        return _ClientError(
            413,
            ErrorBody(
                error="payload_too_large",
                detail=f"request body of {size} bytes exceeds the limit of {max_body} bytes",
            ),
        )

    def parse(model: type[Any], body: bytes, rid: str) -> Any:
        try:
            return model.model_validate_json(body)
        except ValidationError as err:
            errors = err.errors(include_url=False)
            if any(e["type"] == "json_invalid" for e in errors):
                msg = errors[0]["msg"]
                raise _ClientError(
                    400,
                    ErrorBody(error="malformed_json", detail=f"the request body is not valid JSON: {msg}"),
                ) from None
            raise _ClientError(422, error_from_validation(err, rid)) from None

    def fail(err: _ClientError, rid: str) -> Response:
        err.body.request_id = rid
        return Response(
            err.body.model_dump_json(), status_code=err.status, media_type=_JSON, headers=err.headers
        )

    # ------------------------------------------------------------------ routes
    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": desc}
        for code, desc in (
            (400, "Malformed JSON"),
            (401, "Missing or unknown API key"),
            (403, "The key lacks the required scope"),
            (413, "Body too large, or an events batch costing more than the key's burst"),
            (422, "Invalid body (one entry per bad field)"),
            (429, "Rate limited (see Retry-After)"),
            (503, "Temporarily unavailable"),
        )
    }

    @app.post(
        "/v1/recommend",
        response_model=RecommendResponse,
        responses=error_responses,
        summary="Recommend items for a user",
        tags=["recommendations"],
        openapi_extra=_body_schema("RecommendRequest"),
    )
    async def recommend_endpoint(request: Request) -> Response:
        """Ranked items for ``user_id`` (scope ``read``).

        Unknown users get cold-start recommendations; unknown ``exclude`` ids are ignored and
        counted in ``metadata.unknown_exclude_ids``; ``metadata.degradation_level`` says which
        level of the fallback chain answered.
        """
        rid = _rid(request)
        try:
            principal = authorize(request, "read")
            remaining = charge(principal, 1.0)
            req: RecommendRequest = parse(RecommendRequest, await read_body(request), rid)
        except _ClientError as err:
            return fail(err, rid)
        try:
            resp = await recommend(req)
        except StreamRecError as err:
            log.warning("request_id=%s recommend unavailable: %s", rid, err)
            return _error(503, "unavailable", str(err), rid, {"Retry-After": "1"})
        except Exception:
            log.exception("request_id=%s recommend failed", rid)
            return _error(500, "internal", _INTERNAL_DETAIL, rid)
        resp.metadata.request_id = rid
        return Response(
            resp.model_dump_json(), media_type=_JSON, headers={"X-RateLimit-Remaining": str(remaining)}
        )

    @app.post(
        "/v1/events",
        response_model=EventsResponse,
        responses=error_responses,
        summary="Report interactions (view, click, complete, skip)",
        tags=["events"],
        openapi_extra=_body_schema("EventsRequest"),
    )
    async def events_endpoint(request: Request) -> Response:
        """Log 1-1000 events durably (scope ``write``), then push them to streaming features.

        Idempotent by ``event_id``: a retried event is counted in ``duplicates``, not stored
        twice. A batch naming unknown items is refused whole with 422 naming them; a user id the
        catalogue has never seen is a new user, accepted (created implicitly by the event log).
        """
        rid = _rid(request)
        try:
            principal = authorize(request, "write")
            # One token before the body is read bounds the parsing an over-limit key can cause;
            # the rest of the batch's cost is taken once its size is known.
            charge(principal, 1.0)
            req: EventsRequest = parse(EventsRequest, await read_body(request), rid)
            cost = math.ceil(len(req.events) / limits.events_per_token)
            burst = limiter.capacity(principal.name, principal.rate_limit)
            if cost > burst:  # no wait would let it through: refuse for good, spending nothing
                limiter.refund(principal.name, 1.0)
                raise _batch_too_large(principal, cost, burst)
            if cost > 1:
                charge(principal, float(cost - 1), paid=1.0)
        except _ClientError as err:
            return fail(err, rid)
        if events is None:
            return _error(503, "unavailable", "the event log is not configured on this deployment", rid)
        if variant_of is not None:
            for e in req.events:
                if e.experiment_variant is None:
                    e.experiment_variant = variant_of(e.user_id)
        try:
            outcome = await run_in_threadpool(events.append, req.events)
        except OSError as err:
            log.error("request_id=%s event log write failed: %s", rid, err)
            return _error(
                503, "event_log_unavailable", "events could not be stored; retry", rid, {"Retry-After": "1"}
            )
        if not outcome.accepted:
            detail = {
                "message": outcome.problem(),
                "unknown_user_ids": list(outcome.unknown_user_ids),
                "unknown_item_ids": list(outcome.unknown_item_ids),
            }
            return _error(422, "unknown_ids", detail, rid)
        body = EventsResponse(
            accepted=outcome.received,
            stored=outcome.stored,
            duplicates=outcome.duplicates,
            push_failed=outcome.push_failed,
        )
        return Response(body.model_dump_json(), media_type=_JSON)

    @app.post("/v1/admin/reload", responses=error_responses, summary="Reload the model", tags=["admin"])
    async def reload_endpoint(request: Request) -> Response:
        """Ask the stages factory for a fresh stages object and swap it in (scope ``admin``).

        In-flight requests finish on the stages they started with. A bundle that fails to load
        is refused (409) and the current one keeps serving. Reloads are rate-limited per replica
        (``limits.admin_reload_rate_limit``; 429 with ``Retry-After`` beyond it).
        """
        rid = _rid(request)
        try:
            authorize(request, "admin")
            if reload is not None:
                decision = reload_limiter.acquire("admin-reload")
                if not decision.allowed:
                    cfg = limits.admin_reload_rate_limit
                    raise _throttled(
                        decision,
                        "admin_reload",
                        f"admin reloads are limited to {cfg.burst} at once, then one every "
                        f"{1 / cfg.rate_per_s:g}s; retry after {decision.retry_after_s:.2f}s "
                        "(or raise limits.admin_reload_rate_limit in the serve config)",
                    )
        except _ClientError as err:
            return fail(err, rid)
        if reload is None:
            return _error(501, "not_supported", "this deployment has no reload hook", rid)
        try:
            result = await reload()
        except Exception as err:
            log.warning("request_id=%s reload refused: %s", rid, err)
            return _error(
                409, "reload_failed", f"{type(err).__name__}: {err}; the current model keeps serving", rid
            )
        return _json({"status": "reloaded", **result})

    @app.post(
        "/v1/admin/items",
        response_model=ItemsUpsertResponse,
        responses=error_responses,
        summary="Upsert catalogue items (new items, categories, promoted, flagged)",
        tags=["admin"],
        openapi_extra=_body_schema("ItemsUpsertRequest"),
    )
    async def items_endpoint(request: Request) -> Response:
        """Record item upserts durably (scope ``admin``); every replica applies them.

        When this answers, a ``flagged`` item is served by no replica on the data directory;
        promoted and category changes reach every replica's re-ranker within seconds.
        """
        rid = _rid(request)
        try:
            principal = authorize(request, "admin")
            charge(principal, 1.0)
            req: ItemsUpsertRequest = parse(ItemsUpsertRequest, await read_body(request), rid)
        except _ClientError as err:
            return fail(err, rid)
        if upsert_items is None:
            return _error(501, "not_supported", "this deployment takes no catalogue changes", rid)
        items = [it.model_dump(exclude_none=True) for it in req.items]
        try:
            result = await upsert_items(items)
        except DataError as err:  # what the schema cannot say (e.g. a time outside the log's range)
            return _error(422, "invalid_request", [{"message": str(err)}], rid)
        except OSError as err:
            log.error("request_id=%s catalogue write failed: %s", rid, err)
            return _error(503, "catalogue_unavailable", "the upserts could not be stored; retry", rid,
                          {"Retry-After": "1"})  # fmt: skip
        log.info("request_id=%s catalogue: %d upsert(s), flagged %s", rid, len(items), result.get("flagged"))
        return Response(ItemsUpsertResponse.model_validate(result).model_dump_json(), media_type=_JSON)

    @app.get("/v1/admin/status", responses=error_responses, summary="Serving status", tags=["admin"])
    async def status_endpoint(request: Request) -> Response:
        """Stages, event-log counters and limits (scope ``admin``)."""
        rid = _rid(request)
        try:
            authorize(request, "admin")
        except _ClientError as err:
            return fail(err, rid)
        if status is not None:
            out: dict[str, Any] = dict(await status())
        else:
            out = {"stages": await _maybe_await(info()) if info else None}
            out["events"] = events.snapshot() if events is not None else None
        out["limits"] = limits.model_dump()
        return _json(out)

    @app.get("/healthz", summary="Liveness", tags=["health"])
    async def healthz() -> Response:
        """200 while the process serves HTTP."""
        return _json({"status": "ok"})

    @app.get("/readyz", summary="Readiness", tags=["health"], responses={503: {"description": "Not ready"}})
    async def readyz() -> Response:
        """200 once the stages are loaded and requests can be served, else 503."""
        ok, details = (True, {}) if ready is None else await _maybe_await(ready())
        return _json({"status": "ready" if ok else "not_ready", **details}, 200 if ok else 503)

    # ------------------------------------------------------------------ errors outside handlers
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, exc.detail, _rid(request), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(422, "invalid_request", [{"message": str(e)} for e in exc.errors()], _rid(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette runs this handler outside every middleware, so RequestIdMiddleware cannot
        # echo the id on this response: add it here (the id is already in the shared scope).
        rid = _rid(request)
        log.error("request_id=%s unhandled %s", rid, type(exc).__name__, exc_info=exc)
        headers = {REQUEST_ID_HEADER: rid} if echo_request_id else None
        return _error(500, "internal", _INTERNAL_DETAIL, rid, headers)

    _install_openapi(app)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id, metrics=metrics)
    return app


def merge_replica_status(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One status over several replicas' statuses (the admin endpoint behind a balancer).

    Counters (integers) are summed, flags (booleans) hold only if they hold on every replica,
    mappings are merged key by key, and any other value is kept once when every replica agrees,
    else listed per replica. ``replicas`` says how many answered.

    Args:
        parts: Each replica's status (the same shape on every replica).
    """

    def merge(values: list[Any]) -> Any:
        present = [v for v in values if v is not None]  # a key one replica has not seen yet
        if present and len(present) < len(values) and not all(isinstance(v, bool) for v in present):
            values = present
        if all(isinstance(v, bool) for v in values):
            return all(values)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return sum(values)
        if all(isinstance(v, dict) for v in values):
            keys = dict.fromkeys(k for v in values for k in v)
            return {k: merge([v.get(k) for v in values]) for k in keys}
        return values[0] if all(v == values[0] for v in values) else values

    out: dict[str, Any] = merge(parts) if parts else {}
    out["replicas"] = len(parts)
    return out


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, default=str), status_code=status, media_type=_JSON)


def _body_schema(model_name: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{model_name}"}}},
        }
    }


def _install_openapi(app: FastAPI) -> None:
    """Add the request-body models and the API-key scheme to the generated schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {})
        schemas = comps.setdefault("schemas", {})
        for model in (RecommendRequest, EventsRequest, ItemsUpsertRequest):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = js
        comps["securitySchemes"] = {"ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}}
        for path, ops in schema.get("paths", {}).items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"ApiKey": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["API_KEY_HEADER", "REQUEST_ID_HEADER", "GatewayLimits", "RequestIdMiddleware", "create_app"]
