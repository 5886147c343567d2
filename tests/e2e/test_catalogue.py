"""Catalogue changes over HTTP: a flagged item leaves every replica of both compositions at once."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from tests.e2e.conftest import Served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _items(c: httpx.Client, served: Served, app: str, user: int) -> list[int]:
    r = c.post(f"/{app}/v1/recommend", json={"user_id": user, "k": 10}, headers={"X-API-Key": served.read_key})
    assert r.status_code == 200, r.text
    items = [int(i["item_id"]) for i in r.json()["items"]]
    assert len(items) == 10
    return items


def test_a_flagged_item_is_served_by_no_replica_of_either_composition_once_acknowledged(served: Served) -> None:
    users = range(1, 6)
    with served.client() as c:
        seen = Counter(i for app in ("fused", "cluster") for u in users for i in _items(c, served, app, u))
        item, _ = seen.most_common(1)[0]  # in every answer: the hardest one to keep out
        admin = {"X-API-Key": served.admin_key}
        r = c.post("/fused/v1/admin/items", json={"items": [{"item_id": item, "flagged": True}]}, headers=admin)
        assert r.status_code == 200 and r.json()["flagged"] == [item], r.text
        acked = time.monotonic()
        try:
            # 40 answers per composition right after the acknowledgement: the fused app has two
            # Gateway replicas behind Ray's proxy (the one that took the upsert and the other).
            served_after = [
                _items(c, served, app, users[n % len(users)]) for n in range(40) for app in ("fused", "cluster")
            ]
            assert not [s for s in served_after if item in s]
            took = time.monotonic() - acked
            print(f"flagged item {item}: 0 of {len(served_after)} answers in the {took:.1f} s after the ack held it")
            status = c.get("/fused/v1/admin/status", headers=admin).json()
            assert status["replicas"] == 2 and status["stages"]["catalogue"]["flagged"] == "1"
        finally:
            r = c.post("/fused/v1/admin/items", json={"items": [{"item_id": item, "flagged": False}]}, headers=admin)
            assert r.status_code == 200
        deadline = time.monotonic() + 10
        while item not in _items(c, served, "fused", 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert item in _items(c, served, "cluster", 1)  # unflagged: served again

