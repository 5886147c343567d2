"""The HTTP gateway in-process (ASGI, no Ray): auth, limits, validation bodies, events, OpenAPI.

The gateway runs here exactly as inside the Ray Serve ingress: ``streamrec.service`` wires it to
a FunnelService over real PopularityStages on a tiny stored world.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.auth import ApiKeyAuth, AuthConfig, RateLimiter, hash_key
from streamrec.data.event_export import export_to_store
from streamrec.data.event_log import EventLog
from streamrec.data.store import DataStore
from streamrec.errors import ServingError
from streamrec.funnel.popularity import PopularityStages
from streamrec.funnel.stages import run_funnel
from streamrec.resilience import ResilienceConfig
from streamrec.service.args import ServeArgs
from streamrec.service.http import build_gateway
from streamrec.service.loading import load_stages
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary
from streamrec.serving.gateway import GatewayLimits, create_app


def _runner(threads: int = 1) -> StageRunner:
    return StageRunner(ResilienceConfig(), 10.0, threads)


NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
USERS = list(range(1, 11))
ITEMS = list(range(100, 140))
READ = "read-key-0123456789abcdef"
WRITE = "write-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"


def make_world(root: Path) -> Path:
    """10 users, 40 items (139 flagged); item 100 the most engaged, then 101, ...

    User 1 saw 100 and 101; users 8-10 engaged with everything; users 2-7 saw nothing.
    """
    store = DataStore(root)
    store.upsert_users(pd.DataFrame({"user_id": USERS, "signup_at": [NOW - timedelta(days=30)] * len(USERS)}))
    store.upsert_items(
        pd.DataFrame(
            {
                "item_id": ITEMS,
                "title": [f"Item {i}" for i in ITEMS],
                "categories": [["a"]] * len(ITEMS),
                "published_at": [NOW - timedelta(days=10)] * len(ITEMS),
                "promoted": [False] * len(ITEMS),
                "flagged": [i == 139 for i in ITEMS],
            }
        )
    )
    rows = []
    for rank, item in enumerate(ITEMS):
        for n in range(len(ITEMS) - rank):  # item 100 gets 40 clicks, 139 gets 1
            rows.append((f"p-{item}-{n}", 8 + n % 3, item, "click", 1, NOW - timedelta(hours=1 + n)))
    rows += [("s1", 1, 100, "complete", 1, NOW - timedelta(days=1)), ("s2", 1, 101, "view", 0, NOW)]
    frame = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "event_type", "label", "timestamp"])
    store.append_events(frame)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("world") / "data")


def auth_config(**kw: Any) -> AuthConfig:
    return AuthConfig.model_validate(
        {
            "keys": [
                {"name": "reader", "key": READ, "scopes": ["read"]},
                {"name": "writer", "key": hash_key(WRITE), "scopes": ["write"]},
                {"name": "ops", "key": ADMIN, "scopes": ["admin"]},
            ],
            "use_env_key": False,
            **kw,
        }
    )


def make_client(world: Path, tmp_path: Path, **limits: Any) -> tuple[TestClient, EventLog, dict[str, Any]]:
    """Gateway over PopularityStages with a copy of the event log in tmp_path."""
    stages = PopularityStages.from_data_dir(world)
    holder: dict[str, Any] = {"stages": stages, "reloads": 0, "fail_reload": False}
    service = FunnelService(local_primary(lambda: holder["stages"], _runner()), None, ResilienceConfig(), 0.1)

    async def reload() -> dict[str, Any]:
        if holder["fail_reload"]:
            raise ValueError("bundle checksum mismatch")
        holder["stages"] = PopularityStages.from_data_dir(world)
        holder["reloads"] += 1
        return {"model_version": holder["stages"].model_version}

    store = DataStore(world)
    events = EventLog(
        tmp_path / "event_log",
        store.users()["user_id"].to_numpy(),
        store.items()["item_id"].to_numpy(),
    )
    auth = ApiKeyAuth.from_config(auth_config(), environ={})
    lim = GatewayLimits.model_validate(limits) if limits else GatewayLimits()
    clock = holder.setdefault("clock", [0.0])
    limiter = RateLimiter(lim.rate_limit.rate_per_s, lim.rate_limit.burst, clock=lambda: clock[0])
    app = create_app(
        service, events, auth, lim, reload=reload, info=lambda: stages.describe(), rate_limiter=limiter
    )
    return TestClient(app, raise_server_exceptions=False), events, holder


@pytest.fixture
def client(world: Path, tmp_path: Path) -> Iterator[TestClient]:
    c, _, _ = make_client(world, tmp_path)
    with c:
        yield c


def rec(client: TestClient, body: Any, key: str | None = READ, **kw: Any) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, bytes | str) or hasattr(body, "__next__"):
        return client.post("/v1/recommend", content=body, headers=headers, **kw)
    return client.post("/v1/recommend", json=body, headers=headers, **kw)


def events_body(*evs: dict[str, Any]) -> dict[str, Any]:
    return {"events": [{"event_type": "click", "timestamp": NOW.isoformat(), **e} for e in evs]}


# ------------------------------------------------------------------------------------ recommend


def test_recommend_returns_popular_unseen_items_with_metadata(client: TestClient) -> None:
    r = rec(client, {"user_id": 1, "k": 5}, headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200, r.text
    body = RecommendResponse.model_validate(r.json())
    assert [i.item_id for i in body.items] == [102, 103, 104, 105, 106]  # 100, 101 seen by user 1
    assert all(i.sources == ["popularity"] and i.title == f"Item {i.item_id}" for i in body.items)
    assert body.metadata.degradation_level == "popularity"
    assert body.metadata.request_id == "abc-123" == r.headers["X-Request-ID"]
    assert {"features", "retrieval", "ranking", "reranking", "total"} <= set(body.metadata.timings_ms)
    assert r.headers["content-type"].startswith("application/json")


def test_unknown_user_gets_cold_start_and_flagged_items_never_served(client: TestClient) -> None:
    r = rec(client, {"user_id": 987654, "k": 100})
    assert r.status_code == 200
    ids = [i["item_id"] for i in r.json()["items"]]
    assert ids[:3] == [100, 101, 102] and 139 not in ids and len(ids) == 39


def test_unknown_exclude_ids_are_ignored_and_counted(client: TestClient) -> None:
    r = rec(client, {"user_id": 5, "k": 3, "exclude": [100, 5, 2**80, 102, 100]})
    assert r.status_code == 200
    body = r.json()
    assert [i["item_id"] for i in body["items"]] == [101, 103, 104]
    assert body["metadata"]["unknown_exclude_ids"] == 2


def test_request_id_generated_when_absent_or_insane(client: TestClient) -> None:
    r1 = rec(client, {"user_id": 1})
    r2 = rec(client, {"user_id": 1}, headers={"X-Request-ID": "bad id with spaces" * 10})
    for r in (r1, r2):
        assert (
            len(r.headers["X-Request-ID"]) == 32
            and r.json()["metadata"]["request_id"] == r.headers["X-Request-ID"]
        )


# ---------------------------------------------------------------------------------------- auth


def test_missing_or_unknown_key_is_401(client: TestClient) -> None:
    for key in (None, "", "not-a-known-key-at-all"):
        r = rec(client, {"user_id": 1}, key=key)
        assert r.status_code == 401, key
        body = r.json()
        assert body["error"] == "unauthorized" and body["request_id"] == r.headers["X-Request-ID"]
    assert "X-API-Key" in rec(client, {"user_id": 1}, key=None).json()["detail"]


def test_wrong_scope_is_403(client: TestClient) -> None:
    assert rec(client, {"user_id": 1}, key=WRITE).status_code == 403
    r = client.post(
        "/v1/events", json=events_body({"user_id": 1, "item_id": 100}), headers={"X-API-Key": READ}
    )
    assert r.status_code == 403 and r.json()["error"] == "forbidden" and "write" in r.json()["detail"]
    assert client.post("/v1/admin/reload", headers={"X-API-Key": WRITE}).status_code == 403
    assert rec(client, {"user_id": 1}, key=ADMIN).status_code == 200  # admin implies read


def test_auth_is_checked_before_the_body(client: TestClient) -> None:
    assert rec(client, b"{not json", key=None).status_code == 401
    assert rec(client, b"x" * (2 << 20), key=None).status_code == 401


# ---------------------------------------------------------------------------------- rate limit


def test_rate_limit_is_per_key_with_retry_after(world: Path, tmp_path: Path) -> None:
    c, _, holder = make_client(world, tmp_path, rate_limit={"rate_per_s": 0.5, "burst": 2})
    with c:
        assert [rec(c, {"user_id": 1}).status_code for _ in range(2)] == [200, 200]
        r = rec(c, {"user_id": 1})
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "2" and r.json()["error"] == "rate_limited"
        assert rec(c, {"user_id": 1}, key=ADMIN).status_code == 200  # another key, another bucket
        holder["clock"][0] += 2.0
        assert rec(c, {"user_id": 1}).status_code == 200


def test_event_batches_cost_per_hundred_events(world: Path, tmp_path: Path) -> None:
    c, _, _ = make_client(world, tmp_path, rate_limit={"rate_per_s": 1, "burst": 3})
    big = events_body(*({"event_id": f"b{i}", "user_id": 1, "item_id": 100} for i in range(250)))
    with c:
        assert c.post("/v1/events", json=big, headers={"X-API-Key": WRITE}).status_code == 200  # costs 3
        r = c.post("/v1/events", json=big, headers={"X-API-Key": WRITE})
        assert r.status_code == 429


def batch(n: int, prefix: str) -> dict[str, Any]:
    return events_body(*({"event_id": f"{prefix}{i}", "user_id": 1, "item_id": 100} for i in range(n)))


def test_a_batch_costing_more_than_the_burst_is_413_and_spends_nothing(world: Path, tmp_path: Path) -> None:
    c, log, _ = make_client(world, tmp_path, rate_limit={"rate_per_s": 1, "burst": 5})
    h = {"X-API-Key": WRITE}
    with c:
        r = c.post("/v1/events", json=batch(1000, "x"), headers=h)  # costs 10 > burst 5: never passes
        assert r.status_code == 413, r.text
        out = r.json()
        assert out["error"] == "batch_too_large" and out["request_id"] == r.headers["X-Request-ID"]
        assert "costs 10 " in out["detail"] and "at most 500 events" in out["detail"]
        # The refusal spent no token: a batch costing the whole burst still passes.
        assert c.post("/v1/events", json=batch(500, "y"), headers=h).status_code == 200
    assert log.stats.stored == 500


def test_a_429_for_an_events_batch_has_retry_after_and_spends_nothing(world: Path, tmp_path: Path) -> None:
    c, _, holder = make_client(world, tmp_path, rate_limit={"rate_per_s": 1, "burst": 5})
    h = {"X-API-Key": WRITE}
    with c:
        assert c.post("/v1/events", json=batch(500, "a"), headers=h).status_code == 200  # bucket empty
        holder["clock"][0] += 2.0  # 2 tokens
        r = c.post("/v1/events", json=batch(300, "b"), headers=h)  # costs 3
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        assert r.headers["Retry-After"] == "1" and r.headers["X-RateLimit-Remaining"] == "2"
        holder["clock"][0] += 1.0  # 3 tokens only if the refused request gave its first one back
        assert c.post("/v1/events", json=batch(300, "b"), headers=h).status_code == 200


# ------------------------------------------------------------------------------ bad input -> 4xx


def test_body_size_limit_is_413(world: Path, tmp_path: Path) -> None:
    c, _, _ = make_client(world, tmp_path, max_body_bytes=2048)
    big = {"user_id": 1, "exclude": list(range(100, 1000))}
    with c:
        r = rec(c, big)
        assert (
            r.status_code == 413 and r.json()["error"] == "payload_too_large" and "2048" in r.json()["detail"]
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield json.dumps(big).encode()

        assert rec(c, chunks()).status_code == 413
        assert rec(c, b"{}", headers={"Content-Length": "abc"}).status_code == 400


def test_malformed_json_is_400(client: TestClient) -> None:
    for raw in (b"", b"{", b'{"user_id": 1,}', b"\xff\xfe", b"[" * 10_000):
        r = rec(client, raw)
        assert r.status_code == 400, raw[:20]
        assert r.json()["error"] == "malformed_json" and "not valid JSON" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 101}, "k"),
        ({"user_id": 1, "k": 2.5}, "k"),
        ({"user_id": "1"}, "user_id"),
        ({"user_id": -3}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"k": 5}, "user_id"),
        ({"user_id": 1, "exclude": "100"}, "exclude"),
        ({"user_id": 1, "exclude": list(range(1001))}, "exclude"),
        ({"user_id": 1, "context": {"device": "fridge"}}, "context.device"),
        ({"user_id": 1, "contxt": {}}, "contxt"),
        ([1, 2], "<body>"),
        (None, "<body>"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(client: TestClient, body: Any, field: str) -> None:
    r = rec(client, json.dumps(body))
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["error"] == "invalid_request" and out["request_id"] == r.headers["X-Request-ID"]
    assert field in [p["field"] for p in out["detail"]]
    assert all(p["message"] for p in out["detail"])


def test_unknown_routes_and_methods_are_json_4xx(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found" and r.headers["X-Request-ID"]
    r = client.get("/v1/recommend", headers={"X-API-Key": READ})
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_never_a_5xx_for_client_mistakes(client: TestClient) -> None:
    bodies: list[Any] = [
        b"null", b"0", b'"str"', b"{}", b'{"user_id": 1e400}', b'{"user_id": 18446744073709551616}',
        b'{"user_id": 1, "exclude": [18446744073709551616, -1]}', b'{"user_id": 1, "context": null}',
        b'{"user_id": 1, "context": {"timestamp": "yesterday"}}', b'{"user_id": 1, "k": null}',
        '{"user_id": 1, "context": {"device": "\u2603"}}'.encode(), b'{"user_id": 9223372036854775808}',
        b'{"user_id": 1, "context": {"timestamp": "9999-12-31T23:59:59Z"}}', b"\x00" * 64,
        b'{"user_id": 1, "context": {"timestamp": "0001-01-01T00:00:00+01:00"}}',
        b'{"user_id": 1, "context": {"timestamp": "9999-12-31T23:59:59-14:00"}}',
        b'{"events": [{"user_id": 1, "item_id": 100, "event_type": "view", "timestamp": "0001-01-01T00:00:00+01:00"}]}',
        b'{"events": [{"user_id": 1, "item_id": 100, "event_type": "view", "timestamp": "9999-12-31T23:59:59-14:00"}]}',
    ]  # fmt: skip
    for b in bodies:
        for path in ("/v1/recommend", "/v1/events"):
            for key in (READ, WRITE, ADMIN, "x" * 40, None):
                headers = {"X-API-Key": key} if key else {}
                r = client.post(path, content=b, headers=headers)
                assert r.status_code < 500, (path, b[:40], key, r.status_code, r.text)
                assert "error" in r.json() or r.status_code == 200


def test_huge_user_id_is_a_cold_start_not_an_error(client: TestClient) -> None:
    r = rec(client, {"user_id": 2**70, "k": 2})
    assert r.status_code == 200 and [i["item_id"] for i in r.json()["items"]] == [100, 101]


# -------------------------------------------------------------------------------------- events


def test_events_are_stored_once_and_counted(world: Path, tmp_path: Path) -> None:
    c, log, _ = make_client(world, tmp_path)
    body = events_body(
        {"event_id": "e1", "user_id": 1, "item_id": 100},
        {"event_id": "e2", "user_id": 2, "item_id": 101, "event_type": "complete", "watch_fraction": 1.0},
    )
    with c:
        r = c.post("/v1/events", json=body, headers={"X-API-Key": WRITE})
        assert r.status_code == 200 and r.json() == {
            "accepted": 2,
            "stored": 2,
            "duplicates": 0,
            "push_failed": 0,
        }
        r = c.post("/v1/events", json=body, headers={"X-API-Key": WRITE})
        assert r.json() == {"accepted": 2, "stored": 0, "duplicates": 2, "push_failed": 0}
    assert log.stats.balanced() and log.stats.stored == 2


def test_events_with_unknown_items_are_422_naming_them_and_new_users_are_accepted(
    world: Path, tmp_path: Path
) -> None:
    c, log, _ = make_client(world, tmp_path)
    body = events_body(
        {"event_id": "k1", "user_id": 1, "item_id": 100},
        {"event_id": "k2", "user_id": 4242, "item_id": 100},
        {"event_id": "k3", "user_id": 1, "item_id": 77},
    )
    with c:
        r = c.post("/v1/events", json=body, headers={"X-API-Key": WRITE})
        assert r.status_code == 422
        out = r.json()
        assert out["error"] == "unknown_ids"
        assert out["detail"]["unknown_user_ids"] == [] and out["detail"]["unknown_item_ids"] == [77]
        assert "77" in out["detail"]["message"] and "4242" not in out["detail"]["message"]
        assert log.stats.rejected == 3 and log.stats.stored == 0 and log.stats.balanced()
        # A user the catalogue has never seen (4242) is a new user: their events are stored.
        new_user = events_body({"event_id": "k2", "user_id": 4242, "item_id": 100})
        r = c.post("/v1/events", json=new_user, headers={"X-API-Key": WRITE})
        assert r.status_code == 200 and r.json()["stored"] == 1


def test_events_before_the_epoch_are_refused_so_none_is_quarantined_at_export(
    world: Path, tmp_path: Path
) -> None:
    c, log, _ = make_client(world, tmp_path)
    h = {"X-API-Key": WRITE}
    with c:
        old = events_body(
            {"event_id": "old", "user_id": 1, "item_id": 100, "timestamp": "1960-01-01T00:00:00Z"}
        )
        r = c.post("/v1/events", json=old, headers=h)
        assert r.status_code == 422, r.text
        assert [p["field"] for p in r.json()["detail"]] == ["events.0.timestamp"]
        assert "1970-01-01" in r.json()["detail"][0]["message"]
        edge = events_body({"event_id": "edge", "user_id": 1, "item_id": 100, "timestamp": 0})
        assert c.post("/v1/events", json=edge, headers=h).status_code == 200
    data = tmp_path / "data"
    shutil.copytree(world, data)
    result = export_to_store(log, DataStore(data))
    assert result.read == 1 and result.quarantined == 0  # every acknowledged event is storable


def test_events_validation_errors(client: TestClient) -> None:
    h = {"X-API-Key": WRITE}
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    base = {"user_id": 1, "item_id": 100}
    cases = [
        ({"events": []}, "events"),
        ({"events": [{**base, "event_type": "purchase"}]}, "events.0.event_type"),
        ({"events": [{**base, "event_type": "view", "timestamp": future}]}, "events.0.timestamp"),
        ({"events": [{**base, "event_type": "view", "watch_fraction": 2}]}, "events.0.watch_fraction"),
    ]
    for body, field in cases:
        r = client.post("/v1/events", json=body, headers=h)
        assert r.status_code == 422, r.text
        assert field in [p["field"] for p in r.json()["detail"]]


# ------------------------------------------------------------------------- health, admin, schema


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"


def test_not_ready_is_503(world: Path) -> None:
    auth = ApiKeyAuth.from_config(auth_config(), environ={})

    async def never(_: RecommendRequest) -> RecommendResponse:
        raise AssertionError

    app = create_app(never, None, auth, ready=lambda: (False, {"reason": "loading bundle"}))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "not_ready", "reason": "loading bundle"}
        r = c.post(
            "/v1/events", json=events_body({"user_id": 1, "item_id": 100}), headers={"X-API-Key": WRITE}
        )
        assert r.status_code == 503


def test_admin_reload_swaps_or_refuses(world: Path, tmp_path: Path) -> None:
    c, _, holder = make_client(world, tmp_path)
    with c:
        old = holder["stages"]
        r = c.post("/v1/admin/reload", headers={"X-API-Key": ADMIN})
        assert r.status_code == 200 and r.json()["status"] == "reloaded" and holder["stages"] is not old
        holder["fail_reload"] = True
        current = holder["stages"]
        r = c.post("/v1/admin/reload", headers={"X-API-Key": ADMIN})
        assert (
            r.status_code == 409 and r.json()["error"] == "reload_failed" and "checksum" in r.json()["detail"]
        )
        assert holder["stages"] is current and rec(c, {"user_id": 1}).status_code == 200
        status = c.get("/v1/admin/status", headers={"X-API-Key": ADMIN}).json()
        assert status["stages"]["stages"] == "PopularityStages" and status["events"]["balanced"] is True


def test_openapi_schema_documents_bodies_errors_and_key(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/recommend", "/v1/events", "/healthz", "/readyz", "/v1/admin/reload"} <= set(paths)
    post = paths["/v1/recommend"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RecommendRequest")
    assert {"401", "403", "413", "422", "429"} <= set(post["responses"])
    schemas = spec["components"]["schemas"]
    assert {"RecommendRequest", "RecommendResponse", "EventsRequest", "ErrorBody", "RequestContext"} <= set(
        schemas
    )
    assert schemas["RecommendRequest"]["properties"]["k"]["maximum"] == 100
    assert spec["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    assert client.get("/docs").status_code == 200


def test_server_faults_are_5xx_with_request_id(world: Path) -> None:
    auth = ApiKeyAuth.from_config(auth_config(), environ={})

    async def unavailable(_: RecommendRequest) -> RecommendResponse:
        raise ServingError("every level failed")

    async def bug(_: RecommendRequest) -> RecommendResponse:
        raise RuntimeError("oops")

    for fn, status, code in ((unavailable, 503, "unavailable"), (bug, 500, "internal")):
        with TestClient(create_app(fn, None, auth), raise_server_exceptions=False) as c:
            r = rec(c, {"user_id": 1})
            assert r.status_code == status and r.json()["error"] == code
            assert r.json()["request_id"] == r.headers["X-Request-ID"]
            assert "oops" not in r.text


def test_unexpected_exceptions_are_json_500s_with_the_request_id(
    world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    auth = ApiKeyAuth.from_config(auth_config(), environ={})

    async def broken(_: RecommendRequest) -> RecommendResponse:
        return None  # type: ignore[return-value]  # a bug outside the guarded call

    def info() -> dict[str, Any]:
        raise KeyError("secret-internal-name")

    app = create_app(broken, None, auth, info=info)
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level("ERROR", "streamrec.gateway"):
        for r in (
            rec(c, {"user_id": 1}, headers={"X-Request-ID": "rid-1"}),
            c.get("/v1/admin/status", headers={"X-API-Key": ADMIN, "X-Request-ID": "rid-2"}),
        ):
            assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
            out = r.json()
            assert out["error"] == "internal" and "request id" in out["detail"]
            assert out["request_id"] == r.headers["X-Request-ID"] in ("rid-1", "rid-2")
            assert "secret" not in r.text and "NoneType" not in r.text
    logged = [record.getMessage() for record in caplog.records if record.exc_info]
    assert any("request_id=rid-1" in m for m in logged) and any("request_id=rid-2" in m for m in logged)


def test_asgi_transport_works_too(world: Path, tmp_path: Path) -> None:
    c, _, _ = make_client(world, tmp_path)

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=c.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as ac:
            h = {"X-API-Key": READ}
            return await asyncio.gather(
                *(ac.post("/v1/recommend", json={"user_id": u}, headers=h) for u in USERS)
            )

    assert all(r.status_code == 200 for r in asyncio.run(go()))


# ----------------------------------------------------------------------- runtime wiring (no Ray)


def test_funnel_falls_back_to_popularity_when_primary_fails(world: Path) -> None:
    pop = PopularityStages.from_data_dir(world)

    class Broken(PopularityStages):
        def rank(self, ctx: Any, candidates: Any) -> Any:
            raise RuntimeError("ranker crashed")

    broken = Broken.from_data_dir(world)
    service = FunnelService(local_primary(lambda: broken, _runner()), pop, ResilienceConfig(), 0.1)
    resp = asyncio.run(service(RecommendRequest(user_id=1, k=3)))
    assert resp.metadata.degradation_level == "popularity" and "failed:full" in resp.metadata.timings_ms
    assert [i.item_id for i in resp.items] == [102, 103, 104]
    assert service.snapshot()["served_by_level"] == {"popularity": 1}


def test_funnel_without_fallback_raises_serving_error(world: Path) -> None:
    async def primary() -> Any:
        async def call(name: str, *args: Any) -> Any:
            raise RuntimeError("down")

        return call, ("popularity",)

    service = FunnelService(primary, None, ResilienceConfig(), 0.1)
    with pytest.raises(ServingError):
        asyncio.run(service(RecommendRequest(user_id=1)))


def test_load_stages_auto_falls_back_to_popularity(world: Path) -> None:
    loaded = load_stages(ServeArgs.parse({"data_dir": str(world)}))
    assert loaded.kind in {"popularity", "recommender"}
    if loaded.kind == "popularity":
        assert loaded.note  # logged why the trained recommender is not serving
    noop = load_stages(ServeArgs.parse({"stages": "noop", "noop_sources": ["a", "b"]}))
    assert noop.stages.source_names == ("a", "b")


def test_serve_args_rerank_rules_reach_the_recommender_factory(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamrec.service.loading as runtime
    from streamrec.errors import ConfigError

    got: dict[str, Any] = {}

    def factory(data_dir: str | None, **kwargs: Any) -> PopularityStages:
        got.update(kwargs)
        return PopularityStages.from_data_dir(world)

    monkeypatch.setattr(runtime, "RECOMMENDER_FACTORY", f"{__name__}:_FACTORY")
    monkeypatch.setitem(globals(), "_FACTORY", factory)
    args = ServeArgs.parse(
        {"data_dir": str(world), "stages": "recommender", "rerank": {"diversity": {"max_per_category": 1}}}
    )
    assert load_stages(args).kind == "recommender"
    assert got["rerank"].diversity.max_per_category == 1 and got["rerank"].freshness.min_items == 2
    with pytest.raises(ConfigError, match="max_per_cat"):
        ServeArgs.parse({"rerank": {"diversity": {"max_per_cat": 1}}})


def test_in_process_funnel_matches_direct_stage_calls(world: Path) -> None:
    stages = PopularityStages.from_data_dir(world)
    req = RecommendRequest(user_id=3, k=7, exclude=[100])
    *_, out, timings = asyncio.run(run_funnel(_runner().call_for(stages), req, stages.source_names, 0.1))
    ctx = stages.user_context(req)
    direct = stages.rerank(
        ctx, stages.rank(ctx, stages.merge(ctx, {"popularity": stages.retrieve("popularity", ctx)}))
    )
    assert [i.item_id for i in out.items] == [i.item_id for i in direct.items]
    assert timings["total"] >= 0


class _MeetingSources:
    """Popularity stages under the given source names whose ``retrieve`` returns only once all
    of them are running at the same time (a barrier), or blocks on ``stuck`` for source ``slow``."""

    blocking = True  # run by the StageRunner in its worker threads, as the trained stages are

    def __init__(self, world: Path, names: tuple[str, ...], wait_s: float) -> None:
        self._inner = PopularityStages.from_data_dir(world)
        self.source_names = names
        self._barrier = threading.Barrier(len(names), timeout=wait_s)
        self.stuck = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def retrieve(self, source: str, ctx: Any) -> Any:
        if source == "slow":
            self.stuck.wait(5.0)
        else:
            self._barrier.wait()
        return self._inner.retrieve("popularity", ctx)

    def merge(self, ctx: Any, parts: dict[str, Any]) -> Any:
        return self._inner.merge(ctx, {"popularity": next(iter(parts.values()))} if parts else {})


def test_source_threads_run_a_requests_sources_together(world: Path) -> None:
    names = ("a", "b", "c", "d")
    req = RecommendRequest(user_id=3, k=5)
    threaded = _MeetingSources(world, names, wait_s=5.0)
    _, parts, _, _, out, timings = asyncio.run(run_funnel(_runner(4).call_for(threaded), req, names, 10.0))
    assert sorted(parts) == list(names) and not [k for k in timings if k.startswith("missing:")]
    assert len(out.items) == 5
    # On one thread the sources run one after the other: the barrier can never fill.
    serial = _MeetingSources(world, names, wait_s=0.05)
    _, parts, *_ = asyncio.run(run_funnel(_runner(1).call_for(serial), req, names, 10.0))
    assert parts == {}


def test_source_threads_leave_a_late_source_behind(world: Path) -> None:
    names = ("slow",)
    stages = _MeetingSources(world, names, wait_s=1.0)
    req = RecommendRequest(user_id=3, k=5)
    try:
        _, parts, _, _, out, timings = asyncio.run(
            run_funnel(StageRunner(ResilienceConfig(), 0.05, 2).call_for(stages), req, names, 0.05)
        )
    finally:
        stages.stuck.set()  # release the worker thread
    assert parts == {} and timings["missing:slow"] == 1.0
    assert out.items == []  # nothing arrived in time: an empty answer, not a request stuck behind it


def test_build_gateway_reads_keys_and_opens_the_log(world: Path) -> None:
    args = ServeArgs.parse(
        {"data_dir": str(world), "auth": {"keys": [], "use_env_key": True}, "event_log_fsync": False}
    )
    service = FunnelService(
        local_primary(lambda: PopularityStages.from_data_dir(world), _runner()), None, ResilienceConfig(), 0.1
    )
    app, log = build_gateway(args, service, environ={"STREAMREC_API_KEY": "env-key-0123456789abcdef"})
    assert log is not None and log.root == DataStore(world).layout.event_log
    with TestClient(app) as c:
        assert rec(c, {"user_id": 1}, key="env-key-0123456789abcdef").status_code == 200
        assert rec(c, {"user_id": 1}).status_code == 401


# ------------------------------------------------------------------------------- serve configs

REPO = Path(__file__).resolve().parents[2]


def test_serve_configs_are_valid_and_the_rayservice_embeds_the_cluster_config() -> None:
    import yaml

    from deployments import config

    local = config.load(REPO / "configs/serve/local.yaml")
    cluster = config.load(REPO / "configs/serve/cluster.yaml")
    for cfg in (local, cluster):
        schema = config.validate(cfg)
        assert schema.applications[0].import_path == config.IMPORT_PATH
    assert local["applications"][0]["args"]["composition"] == "fused"
    assert [d["name"] for d in local["applications"][0]["deployments"]] == ["Gateway"]
    total = sum(d["ray_actor_options"]["num_cpus"] for d in local["applications"][0]["deployments"])
    assert total <= 1.0  # leaves room on a 2-CPU box
    app = cluster["applications"][0]
    assert app["args"]["composition"] == "cluster"
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"Gateway", "Features", "Retriever", "Ranker", "Reranker"}
    assert all("autoscaling_config" in d for d in deps.values())
    assert deps["Ranker"]["ray_actor_options"]["num_gpus"] == 0
    assert sum(d["ray_actor_options"]["num_cpus"] for d in deps.values()) <= 2.0  # min replicas fit 2 CPUs

    doc = yaml.safe_load((REPO / "configs/kuberay/rayservice.yaml").read_text())
    assert doc["kind"] == "RayService" and doc["apiVersion"] == "ray.io/v1"
    inner = yaml.safe_load(doc["spec"]["serveConfigV2"])
    config.validate(inner, "rayservice serveConfigV2")
    kapp = inner["applications"][0]
    assert kapp["import_path"] == app["import_path"]
    assert [d["name"] for d in kapp["deployments"]] == [d["name"] for d in app["deployments"]]
    assert set(kapp["args"]) - {"data_dir"} == set(app["args"]) - {"data_dir"}
    assert doc["spec"]["rayClusterConfig"]["rayVersion"].startswith("2.60")


def test_the_retrain_cronjob_submits_the_daily_job_to_the_rayservice() -> None:
    import yaml

    job = yaml.safe_load((REPO / "configs/kuberay/retrain-cronjob.yaml").read_text())
    svc = yaml.safe_load((REPO / "configs/kuberay/rayservice.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "CronJob")
    assert job["spec"]["concurrencyPolicy"] == "Forbid" and len(job["spec"]["schedule"].split()) == 5
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (submit,) = pod["containers"]
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert submit["image"] == head["image"]  # the same build: same ray CLI, same code
    env = {e["name"]: e["value"] for e in submit["env"]}
    assert env["RAY_ADDRESS"] == f"http://{svc['metadata']['name']}-head-svc:8265"
    data_dir = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["data_dir"]
    script = " ".join(submit["args"])
    assert "ray job submit" in script and f"-- python -m training.retrain --data-dir {data_dir}" in script
    from training.retrain import main

    with pytest.raises(SystemExit) as done:  # the entry point the job runs exists and parses
        main(["--help"])
    assert done.value.code == 0


def test_build_app_rejects_bad_args_before_anything_runs() -> None:
    from streamrec.errors import ConfigError

    for bad in ({"composition": "mesh"}, {"stages": "magic"}, {"limits": {"max_body_bytes": 1}}, {"typo": 1}):
        with pytest.raises(ConfigError):
            ServeArgs.parse(bad)


def test_settle_heap_freezes_live_objects_and_releases_replaced_ones() -> None:
    import gc
    import weakref

    from streamrec.service.loading import settle_heap

    class Stage:
        pass

    old = Stage()
    old.self_ref = old  # a reference cycle: only the collector can free it
    gone = weakref.ref(old)
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del old  # "replaced by a reload": unreachable, but frozen
        gc.collect()
        assert gone() is not None  # frozen objects are not scanned
        settle_heap()  # the next reload's settle unfreezes first
        assert gone() is None
    finally:
        gc.unfreeze()


def test_admin_status_merges_replicas_counters_summed_flags_all_others_listed() -> None:
    from streamrec.serving.gateway import merge_replica_status

    a = {
        "stages": {"funnel": {"fallbacks": 2, "served_by_level": {"full": 10}}, "model_version": "v3"},
        "events": {"received": 5, "stored": 4, "duplicates": 1, "balanced": True, "segment": "seg-a"},
    }
    b = {
        "stages": {
            "funnel": {"fallbacks": 1, "served_by_level": {"full": 7, "popularity": 1}},
            "model_version": "v3",
        },
        "events": {"received": 2, "stored": 2, "duplicates": 0, "balanced": False, "segment": "seg-b"},
    }
    out = merge_replica_status([a, b])
    assert out["replicas"] == 2
    assert out["stages"]["funnel"] == {"fallbacks": 3, "served_by_level": {"full": 17, "popularity": 1}}
    assert out["stages"]["model_version"] == "v3"  # the same everywhere: once
    assert out["events"]["stored"] == 6 and out["events"]["received"] == 7
    assert out["events"]["balanced"] is False  # holds only if it holds on every replica
    assert out["events"]["segment"] == ["seg-a", "seg-b"]
    assert merge_replica_status([a]) == {**a, "replicas": 1}


def test_one_reload_at_a_time_per_replica_and_abandoned_ones_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    import streamrec.service.reload as app

    clock = [1000.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: clock[0])
    pending = app.PendingReloads()
    pending.claim("a")
    pending.keep("a", object())  # a prepared bundle
    pending.claim("a")  # the same reload again: fine
    with pytest.raises(ServingError, match="another reload"):
        pending.claim("b")
    clock[0] += app._RELOAD_STALE_S + 1  # "a"'s gateway died between prepare and commit
    pending.claim("b")
    assert set(pending._since) == {"b"} and pending.take("a") is None


def test_the_events_answer_says_how_many_the_streaming_push_missed(world: Path, tmp_path: Path) -> None:
    c, events, _ = make_client(world, tmp_path)

    def sink_down(records: list[dict[str, Any]]) -> None:
        raise ConnectionError("online store down (injected)")

    events.sink = sink_down
    with c:
        r = c.post(
            "/v1/events",
            json=events_body({"event_id": "p1", "user_id": 1, "item_id": 100}),
            headers={"X-API-Key": WRITE},
        )
        assert r.status_code == 200 and r.json() == {
            "accepted": 1,
            "stored": 1,
            "duplicates": 0,
            "push_failed": 1,
        }
        events.sink = lambda records: None  # back up: a new event is pushed, the old one stays logged
        r = c.post(
            "/v1/events",
            json=events_body({"event_id": "p2", "user_id": 1, "item_id": 100}),
            headers={"X-API-Key": WRITE},
        )
        assert r.json()["push_failed"] == 0 and events.snapshot()["push_failed"] == 1


def test_a_prepare_overtaken_by_its_abort_keeps_nothing() -> None:
    import streamrec.service.reload as app

    pending = app.PendingReloads()
    pending.claim("t")
    pending.keep("t", "bundle")  # not aborted: kept
    assert pending.take("t") == "bundle"
    pending.claim("t")
    pending.drop("t")  # the abort arrived while the bundle loaded
    with pytest.raises(ServingError, match="aborted"):
        pending.keep("t", "bundle")
    assert pending.take("t") is None


def test_a_version_mismatch_fails_the_request_not_one_source(world: Path) -> None:
    from dataclasses import replace

    from streamrec.errors import StageVersionMismatchError

    stages = PopularityStages.from_data_dir(world)
    req = RecommendRequest(user_id=3, k=5)
    trained_ctx = replace(stages.user_context(req), model_version="v7")  # built by a trained model
    with pytest.raises(StageVersionMismatchError, match="different versions"):
        stages.retrieve("popularity", trained_ctx)

    async def call(name: str, *args: Any) -> Any:
        if name == "user_context":
            return trained_ctx
        return getattr(stages, name)(*args)

    with pytest.raises(StageVersionMismatchError):  # not "a missing source" (a 200 without items)
        asyncio.run(run_funnel(call, req, stages.source_names, 0.5))


def test_the_serve_configs_request_log_and_health_blocks_are_the_defaults_they_say_they_show() -> None:
    import yaml

    from deployments import config
    from streamrec.monitoring.health import HealthConfig
    from streamrec.monitoring.logs import RequestLogConfig

    rayservice = yaml.safe_load((REPO / "configs/kuberay/rayservice.yaml").read_text())
    apps = [
        config.load(REPO / "configs/serve/local.yaml")["applications"][0],
        config.load(REPO / "configs/serve/cluster.yaml")["applications"][0],
        yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0],
    ]
    health, log = HealthConfig().model_dump(), RequestLogConfig().model_dump()
    for app in apps:
        args = app["args"]
        assert {k: health[k] for k in args["health"]} == args["health"], app["name"]
        assert {k: log[k] for k in args["request_log"]} == args["request_log"], app["name"]
