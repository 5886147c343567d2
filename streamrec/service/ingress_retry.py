"""Resend a request once when its replica died before answering (Ray Serve's HTTP proxy).

Ray's proxy answers a request whose replica died mid-request (``ActorDiedError``) with a bare 500
and does not resend it. :class:`ResendUnanswered` wraps the proxy's ASGI app: it buffers the
request body, and when the proxy returns without having started a response (that 500 is not
sent by the proxy but by the HTTP server after it), it runs the request once more, which Serve's
router sends to a live replica. Never resent: a request that got any response (a 200, the
gateway's own 4xx or 5xx, the proxy's 408/429/503), one whose client hung up, one that is not
safe to run twice (only reads and event batches whose every event carries its ``event_id`` are),
and any past the resend budget (a request that kills its replica would kill the next one too).
Installed in the proxy actor through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(:data:`PROXY_CALLBACK`); docs/adr/ADR-010, "Dead replicas".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from streamrec.auth import RateLimiter

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: Import path of the proxy callback, the value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``.
PROXY_CALLBACK = "streamrec.service.ingress_retry:proxy_middlewares"
#: A body larger than this is streamed through once and never resent (bytes; the gateway's
#: default ``max_body_bytes``).
MAX_BUFFERED_BODY = 1 << 20
#: Resends allowed at once, and per second after that, per proxy.
RESEND_BURST, RESENDS_PER_S = 10, 1.0


class ResendUnanswered:
    """ASGI middleware: run an HTTP request a second time if the first attempt sent nothing.

    Args:
        app: The wrapped ASGI app (Ray's proxy).
        max_body: The largest body kept for a resend, in bytes.
        budget: Limits the resends (default :data:`RESEND_BURST` at once, :data:`RESENDS_PER_S`).
    """

    def __init__(
        self, app: ASGIApp, max_body: int = MAX_BUFFERED_BODY, budget: RateLimiter | None = None
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.budget = budget or RateLimiter(RESENDS_PER_S, RESEND_BURST)
        #: Requests resent since start.
        self.resent = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope (only ``http`` requests are ever resent)."""
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        client = _Client(receive)
        body, complete, first = await _read_body(receive, self.max_body)
        if not complete:  # too large to keep: one attempt, the body streamed as it comes
            await self.app(scope, client.replay(first), send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        for attempt in (1, 2):
            # Each attempt gets the scope as it arrived: Ray's proxy rewrites its copy (the path
            # without the route prefix, the request-id header), and a resend of that is a 404.
            fresh = {**scope, "headers": list(scope.get("headers", []))}
            failed: Exception | None = None
            try:
                await self.app(fresh, client.replay([_body_message(body)]), tracking_send)
            except Exception as exc:
                if started or attempt == 2:
                    raise
                failed = exc
            if started or attempt == 2 or not self._may_resend(scope, body, client, failed):
                if failed is not None:
                    raise failed
                return

    def _may_resend(
        self, scope: MutableMapping[str, Any], body: bytes, client: _Client, failed: Exception | None
    ) -> bool:
        """Whether an unanswered first attempt runs again (and log the verdict when it matters)."""
        what = f"{scope.get('method')} {scope.get('path')}"
        if client.gone or not _safe_to_resend(scope, body):
            return False
        if not self.budget.acquire("resend").allowed:
            log.warning("not resending %s: over the resend budget", what)
            return False
        self.resent += 1
        why = "died mid-request?" if failed is None else type(failed).__name__
        log.warning("resending %s: the replica answered nothing (%s)", what, why, exc_info=failed)
        return True


class _Client:
    """The connection's ``receive``: each attempt gets the body first, and a hang-up is remembered."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False

    def replay(self, messages: list[Message]) -> Receive:
        """A ``receive`` that gives ``messages`` first, then the connection's own."""
        pending = list(messages)

        async def receive() -> Message:
            if pending:
                return pending.pop(0)
            message = await self._receive()
            if message.get("type") == "http.disconnect":
                self.gone = True
            return message

        return receive


def _safe_to_resend(scope: MutableMapping[str, Any], body: bytes) -> bool:
    """Whether running the request twice does no harm: a read, or events that all carry their id.

    ``POST /v1/recommend`` is a read; ``POST /v1/events`` is deduplicated by ``event_id``, so only
    a batch whose every event names one may run twice (an event without one gets a fresh id in
    each attempt). Anything else (admin calls: reloads, promotions) is never resent.
    """
    method, path = scope.get("method", ""), str(scope.get("path", "")).rstrip("/")
    if method in ("GET", "HEAD") or path.endswith("/v1/recommend"):
        return True
    if not path.endswith("/v1/events"):
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    events = payload.get("events") if isinstance(payload, dict) else None
    return (
        isinstance(events, list)
        and bool(events)
        and all(isinstance(e, dict) and isinstance(e.get("event_id"), str) and e["event_id"] for e in events)
    )


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool, list[Message]]:
    """Read the request body up to ``limit`` bytes.

    Returns:
        The body, whether it was read whole, and the messages read (to replay when it was not).
    """
    chunks: list[bytes] = []
    seen: list[Message] = []
    size = 0
    while True:
        message = await receive()
        seen.append(message)
        if message.get("type") != "http.request":  # a disconnect before the body ended
            return b"", False, seen
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"", False, seen
        if not message.get("more_body", False):
            return b"".join(chunks), True, seen


def _body_message(body: bytes) -> Message:
    return {"type": "http.request", "body": body, "more_body": False}


def proxy_middlewares() -> list[Any]:
    """The callback Ray's proxy calls at start: the middlewares it wraps its ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(ResendUnanswered)]
