"""Resend a request once when its replica died before answering (Ray Serve's HTTP proxy).

Ray's proxy answers a request whose replica died mid-request (``ActorDiedError``) with a bare 500
and does not resend it. :class:`ResendUnanswered` wraps the proxy's ASGI app: it buffers the
request body, and when the proxy returns without having started a response (that 500 is not
sent by the proxy but by the HTTP server after it), it runs the request once more, which Serve's
router sends to a live replica. A request that got any response (a 200, the gateway's own 4xx or
5xx, the proxy's 408/429/503) is never resent. Installed in the proxy actor through
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:data:`PROXY_CALLBACK`); docs/adr/ADR-010,
"Dead replicas".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: Import path of the proxy callback, the value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``.
PROXY_CALLBACK = "streamrec.service.ingress_retry:proxy_middlewares"
#: A body larger than this is streamed through once and never resent (bytes).
MAX_BUFFERED_BODY = 1 << 20


class ResendUnanswered:
    """ASGI middleware: run an HTTP request a second time if the first attempt sent nothing.

    Args:
        app: The wrapped ASGI app (Ray's proxy).
        max_body: The largest body kept for a resend, in bytes.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BUFFERED_BODY) -> None:
        self.app = app
        self.max_body = max_body
        #: Requests resent since start (read by tests through the proxy's logs).
        self.resent = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope (only ``http`` requests are ever resent)."""
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        body, complete, first = await _read_body(receive, self.max_body)
        if not complete:  # too large to keep: one attempt, the body streamed as it comes
            await self.app(scope, _replay(first, receive), send)
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
            try:
                await self.app(fresh, _replay([_body_message(body)], receive), tracking_send)
            except Exception:
                if started or attempt == 2:
                    raise
            if started or attempt == 2:
                return
            self.resent += 1
            logger.warning(
                "resending %s %s: the replica answered nothing (died mid-request?)",
                scope.get("method"),
                scope.get("path"),
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


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` first, then the connection's own (its disconnect)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def proxy_middlewares() -> list[Any]:
    """The callback Ray's proxy calls at start: the middlewares it wraps its ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(ResendUnanswered)]
