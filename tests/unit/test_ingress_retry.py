"""ResendUnanswered: a request whose first attempt sent nothing runs once more, nothing else does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streamrec.service.ingress_retry import PROXY_CALLBACK, ResendUnanswered, proxy_middlewares

Message = dict[str, Any]


class ScriptedApp:
    """An ASGI app whose attempts follow a script: ``silent``, ``raise``, ``answer``, ``answer-then-raise``."""

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.bodies: list[bytes] = []
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        scope["path"] = "/v1/recommend"  # as Ray's proxy strips the route prefix in place
        scope["headers"].append((b"x-request-id", b"1"))
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.bodies.append(body)
        step = self.script.pop(0)
        if step == "raise":
            raise RuntimeError("ActorDiedError")
        if step.startswith("answer"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if step == "answer-then-raise":
                raise RuntimeError("died mid-body")
            await send({"type": "http.response.body", "body": b"ok"})


def run(app: Any, chunks: list[bytes], scope_type: str = "http") -> list[Message]:
    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(m: Message) -> None:
        sent.append(m)

    scope = {"type": scope_type, "method": "POST", "path": "/app/v1/recommend", "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("first", ["silent", "raise"])
def test_an_unanswered_request_is_resent_once_with_its_whole_body(first: str) -> None:
    inner = ScriptedApp(first, "answer")
    mw = ResendUnanswered(inner)
    sent = run(mw, [b'{"user_id":', b" 1}"])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert inner.bodies == [b'{"user_id": 1}', b'{"user_id": 1}'] and mw.resent == 1
    assert inner.paths == ["/app/v1/recommend"] * 2  # the resend is the request as it arrived


def test_an_answered_request_is_never_resent() -> None:
    inner = ScriptedApp("answer", "answer")
    run(ResendUnanswered(inner), [b"{}"])
    assert len(inner.bodies) == 1


def test_a_failure_after_the_response_started_is_not_resent() -> None:
    inner = ScriptedApp("answer-then-raise", "answer")
    with pytest.raises(RuntimeError, match="mid-body"):
        run(ResendUnanswered(inner), [b"{}"])
    assert len(inner.bodies) == 1


def test_the_second_attempt_is_the_last() -> None:
    inner = ScriptedApp("silent", "silent", "answer")
    mw = ResendUnanswered(inner)
    assert run(mw, [b"{}"]) == []  # the server then answers 500, as without the middleware
    assert len(inner.bodies) == 2
    with pytest.raises(RuntimeError):
        run(ResendUnanswered(ScriptedApp("raise", "raise")), [b"{}"])


def test_a_body_over_the_limit_is_streamed_through_once() -> None:
    inner = ScriptedApp("silent", "answer")
    mw = ResendUnanswered(inner, max_body=4)
    assert run(mw, [b"0123", b"4567"]) == []
    assert inner.bodies == [b"01234567"] and mw.resent == 0


def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    run(ResendUnanswered(app), [], scope_type="lifespan")
    assert seen == ["lifespan"]


def test_the_proxy_callback_names_this_middleware() -> None:
    from ray._common.utils import import_attr

    (mw,) = import_attr(PROXY_CALLBACK)()
    assert mw.cls is ResendUnanswered and proxy_middlewares()[0].cls is ResendUnanswered
