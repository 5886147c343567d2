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
        self.watch = False
        self.seen: list[str] = []

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
        if self.watch:  # as Ray's proxy watches the connection while the replica works
            self.seen.append((await receive())["type"])
        step = self.script.pop(0)
        if step == "raise":
            raise RuntimeError("ActorDiedError")
        if step.startswith("answer"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if step == "answer-then-raise":
                raise RuntimeError("died mid-body")
            await send({"type": "http.response.body", "body": b"ok"})


def run(
    app: Any,
    chunks: list[bytes],
    scope_type: str = "http",
    path: str = "/app/v1/recommend",
    hung_up: bool = False,
) -> list[Message]:
    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        if not hung_up:
            await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(m: Message) -> None:
        sent.append(m)

    scope = {"type": scope_type, "method": "POST", "path": path, "headers": []}
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


def test_a_request_whose_client_hung_up_is_not_resent() -> None:
    inner = ScriptedApp("silent", "answer")
    inner.watch = True
    mw = ResendUnanswered(inner)
    assert run(mw, [b"{}"], hung_up=True) == []
    assert inner.seen == ["http.disconnect"] and len(inner.bodies) == 1 and mw.resent == 0


@pytest.mark.parametrize(
    ("path", "body", "resent"),
    [
        ("/v1/events", b'{"events": [{"event_id": "a1"}, {"event_id": "b2"}]}', True),
        ("/v1/events", b'{"events": [{"event_id": "a1"}, {"user_id": 1}]}', False),  # one gets a fresh id
        ("/v1/events", b"not json", False),
        ("/v1/admin/reload", b"{}", False),
    ],
)
def test_only_what_is_safe_to_run_twice_is_resent(path: str, body: bytes, resent: bool) -> None:
    inner = ScriptedApp("silent", "answer")
    mw = ResendUnanswered(inner)
    run(mw, [body], path=path)
    assert (mw.resent, len(inner.bodies)) == ((1, 2) if resent else (0, 1))


def test_resends_stop_at_the_budget() -> None:
    from streamrec.auth import RateLimiter

    mw = ResendUnanswered(ScriptedApp(*["silent", "answer"] * 3), budget=RateLimiter(1e-6, 2))
    for _ in range(3):
        mw.app.script = ["silent", "answer"]  # type: ignore[attr-defined]
        run(mw, [b"{}"])
    assert mw.resent == 2  # the third unanswered request is left to the server's 500
