"""Both compositions over real HTTP (Ray Serve proxy on loopback): same items, 4xx not 5xx, events, reload."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

# Keys of the session's deployment (tests/e2e/conftest.py, also on the ``served`` fixture).
READ_KEY = "e2e-read-key-0123456789"
WRITE_KEY = "e2e-write-key-0123456789"
ADMIN_KEY = "e2e-admin-key-0123456789"
Served = Any  # tests/e2e/conftest.py:Served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COMPOSITIONS = ("fused", "cluster")
READ = {"X-API-Key": READ_KEY}


def ids(resp: httpx.Response) -> list[int]:
    return [i["item_id"] for i in resp.json()["items"]]


def requests_to_compare(served: Served) -> list[dict[str, Any]]:
    from streamrec.data.store import DataStore

    store = DataStore(served.data_dir)
    users = store.users()["user_id"].tolist()
    items = store.items()["item_id"].tolist()
    reqs: list[dict[str, Any]] = [
        {"user_id": u, "k": k} for u, k in zip(users[:12], [1, 5, 20, 100] * 3, strict=True)
    ]
    reqs += [
        {"user_id": users[0], "k": 10, "exclude": items[:15]},
        {"user_id": users[1], "k": 20, "exclude": [items[3], 987654321, 2**63 + 5]},
        {"user_id": 10**12, "k": 20},  # unknown user: cold start
        {"user_id": users[2], "context": {"device": "tv", "timestamp": "2026-11-01T10:00:00+01:00"}},
    ]
    return reqs


def test_both_compositions_return_the_same_items(served: Served) -> None:
    with served.client() as c:
        for req in requests_to_compare(served):
            out = {p: c.post(f"/{p}/v1/recommend", json=req, headers=READ) for p in COMPOSITIONS}
            for p, r in out.items():
                assert r.status_code == 200, (p, req, r.text)
                meta = r.json()["metadata"]
                assert meta["request_id"] == r.headers["x-request-id"]
                assert meta["degradation_level"] in ("full", "popularity")
                assert len(ids(r)) == min(req.get("k", 20), len(ids(r)))
            assert ids(out["fused"]) == ids(out["cluster"]), req
            assert [i["score"] for i in out["fused"].json()["items"]] == [
                i["score"] for i in out["cluster"].json()["items"]
            ]
            a, b = (out[p].json()["metadata"]["unknown_exclude_ids"] for p in COMPOSITIONS)
            assert a == b
            if req.get("exclude"):
                assert not set(ids(out["fused"])) & set(req["exclude"])
    # counted unknown exclude ids: 987654321 and 2**63 + 5 are not in any catalogue
    with served.client() as c:
        r = c.post("/cluster/v1/recommend", json=requests_to_compare(served)[13], headers=READ)
        assert r.json()["metadata"]["unknown_exclude_ids"] == 2


def test_health_readiness_and_openapi_through_the_proxy(served: Served) -> None:
    with served.client() as c:
        for p in COMPOSITIONS:
            assert c.get(f"/{p}/healthz").json() == {"status": "ok"}
            ready = c.get(f"/{p}/readyz")
            assert ready.status_code == 200 and ready.json()["composition"] == p
            spec = c.get(f"/{p}/openapi.json").json()
            assert "/v1/recommend" in spec["paths"] and "RecommendRequest" in spec["components"]["schemas"]


BAD_BODIES: list[bytes] = [
    b"", b"{", b"[]", b"null", b'{"user_id": "1"}', b'{"user_id": 1, "k": 0}', b'{"user_id": 1, "k": 101}',
    b'{"user_id": 1, "k": 1.5}', b'{"user_id": -1}', b'{"user_id": 1, "exclude": "x"}',
    b'{"user_id": 1, "zz": 1}',
    b'{"user_id": 1, "context": {"device": "car"}}', b'{"user_id": 1e999}', b"\xff" * 10, b"[" * 5000,
    json.dumps({"user_id": 1, "exclude": list(range(1001))}).encode(),
]  # fmt: skip


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_bad_input_is_4xx_never_5xx(served: Served, composition: str) -> None:
    base = f"/{composition}/v1"
    with served.client() as c:
        for body in BAD_BODIES:
            r = c.post(f"{base}/recommend", content=body, headers=READ)
            assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
            assert r.json()["error"] in ("malformed_json", "invalid_request")
            r = c.post(f"{base}/events", content=body, headers={"X-API-Key": WRITE_KEY})
            assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
        assert c.post(f"{base}/recommend", json={"user_id": 1}).status_code == 401
        assert (
            c.post(f"{base}/recommend", json={"user_id": 1}, headers={"X-API-Key": "nope" * 5}).status_code
            == 401
        )
        assert (
            c.post(f"{base}/recommend", json={"user_id": 1}, headers={"X-API-Key": WRITE_KEY}).status_code
            == 403
        )
        assert c.post(f"{base}/events", json={"events": []}, headers=READ).status_code == 403
        big = b'{"user_id": 1, "exclude": [' + b"1," * 600_000 + b"1]}"
        r = c.post(f"{base}/recommend", content=big, headers=READ)
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        assert c.get(f"{base}/nothing-here").status_code == 404


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_events_logged_durably_deduplicated_and_unknown_ids_named(served: Served, composition: str) -> None:
    from streamrec.data.store import DataStore

    store = DataStore(served.data_dir)
    user = int(store.users()["user_id"].iloc[0])
    item = int(store.items()["item_id"].iloc[0])
    h = {"X-API-Key": WRITE_KEY}
    batch = {
        "events": [
            {"event_id": f"{composition}-1", "user_id": user, "item_id": item, "event_type": "click"},
            {
                "event_id": f"{composition}-2",
                "user_id": user,
                "item_id": item,
                "event_type": "complete",
                "watch_fraction": 1,
            },
        ]
    }
    with served.client() as c:
        r = c.post(f"/{composition}/v1/events", json=batch, headers=h)
        assert r.status_code == 200 and r.json() == {
            "accepted": 2,
            "stored": 2,
            "duplicates": 0,
            "push_failed": 0,
        }
        assert c.post(f"/{composition}/v1/events", json=batch, headers=h).json()["duplicates"] == 2
        bad = {"events": [{"user_id": 99_999_999, "item_id": 88_888_888, "event_type": "view"}]}
        r = c.post(f"/{composition}/v1/events", json=bad, headers=h)
        assert r.status_code == 422  # the unknown item; the unknown user alone is a new user
        assert r.json()["detail"]["unknown_user_ids"] == []
        assert r.json()["detail"]["unknown_item_ids"] == [88_888_888]
        status = c.get(f"/{composition}/v1/admin/status", headers={"X-API-Key": ADMIN_KEY}).json()
    assert status["events"]["balanced"] and status["events"]["stored"] >= 2
    logged = [
        json.loads(line)["event_id"]
        for seg in (served.data_dir / "event_log" / "segments").glob("seg-*.jsonl")
        for line in seg.read_text().splitlines()
    ]
    assert logged.count(f"{composition}-1") == 1 and logged.count(f"{composition}-2") == 1


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_hot_reload_drops_no_request_and_refuses_a_bad_bundle(served: Served, composition: str) -> None:
    base = f"{served.base_url}/{composition}/v1"

    async def hammer(stop: asyncio.Event, codes: list[int]) -> None:
        async with httpx.AsyncClient(timeout=60.0) as ac:
            while not stop.is_set():
                rs = await asyncio.gather(
                    *(
                        ac.post(f"{base}/recommend", json={"user_id": u, "k": 10}, headers=READ)
                        for u in (1, 2, 3)
                    )
                )
                codes.extend(r.status_code for r in rs)

    async def scenario() -> tuple[list[int], httpx.Response]:
        stop, codes = asyncio.Event(), []
        task = asyncio.create_task(hammer(stop, codes))
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=120.0) as ac:
            reload = await ac.post(f"{base}/admin/reload", headers={"X-API-Key": ADMIN_KEY})
        await asyncio.sleep(0.5)
        stop.set()
        await task
        return codes, reload

    codes, reload = asyncio.run(scenario())
    assert reload.status_code == 200, reload.text
    assert reload.json()["status"] == "reloaded" and reload.json()["replicas"] >= 1
    assert codes and set(codes) == {200}, f"requests failed during reload: {sorted(set(codes))}"

    # A bundle that cannot load is refused everywhere; the current stages keep serving.
    items = served.data_dir / "items.parquet"
    hidden = served.data_dir / "items.parquet.hidden"
    with httpx.Client(timeout=120.0) as c:
        before = c.post(f"{base}/recommend", json={"user_id": 1, "k": 5}, headers=READ).json()
        os.replace(items, hidden)
        try:
            r = c.post(f"{base}/admin/reload", headers={"X-API-Key": ADMIN_KEY})
        finally:
            os.replace(hidden, items)
        assert r.status_code == 409 and r.json()["error"] == "reload_failed", r.text
        after = c.post(f"{base}/recommend", json={"user_id": 1, "k": 5}, headers=READ)
        assert after.status_code == 200 and after.json()["items"] == before["items"]
        assert c.post(f"{base}/admin/reload", headers=READ).status_code == 403


def test_served_data_dir_is_the_one_given(served: Served) -> None:
    assert (Path(served.data_dir) / "event_log").is_dir()
