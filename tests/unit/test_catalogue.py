"""Catalogue changes while serving: the durable log, each replica's view, the flagged filter, the route."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from streamrec.api_models import RecommendRequest
from streamrec.auth import ApiKeyAuth
from streamrec.data.catalogue import CatalogueLog, CatalogueView, differences
from streamrec.errors import DataError
from streamrec.funnel.fallback import BatchTopN
from streamrec.funnel.popularity import PopularityStages
from streamrec.reranking import ItemMetadata
from streamrec.resilience import ResilienceConfig
from streamrec.service.catalogue import CatalogueSync
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary
from streamrec.serving.gateway import create_app
from tests.unit.test_gateway import ADMIN, ITEMS, READ, WRITE, auth_config, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("catalogue-world") / "data")


# ------------------------------------------------------------------------------------ the log


def test_upserts_are_durable_lines_read_back_incrementally(tmp_path: Path) -> None:
    log = CatalogueLog(tmp_path)
    assert log.count() == 0 and log.read_from(0) == ([], 0)
    assert log.append([{"item_id": 5, "flagged": True, "published_at": "2026-11-20T10:00:00+01:00"}]) == 1
    rows, end = log.read_from(0)
    assert rows[0]["item_id"] == 5 and rows[0]["flagged"] is True and rows[0]["source"] == "api"
    assert rows[0]["published_at"] == "2026-11-20T09:00:00+00:00"  # stored in UTC
    assert log.append([{"item_id": 6, "categories": ["Drama"], "title": None}], source="sync") == 2
    more, end2 = log.read_from(end)
    assert [r["item_id"] for r in more] == [6] and "title" not in more[0] and end2 == log.size()
    # a line still being written (no newline yet) is left for the next read
    with open(log.path, "ab") as fh:
        fh.write(b'{"item_id": 7, "flag')
    assert log.read_from(end2) == ([], end2)


def test_an_update_without_an_item_id_or_with_a_bad_time_is_refused_whole(tmp_path: Path) -> None:
    log = CatalogueLog(tmp_path)
    with pytest.raises(DataError, match="item_id"):
        log.append([{"item_id": 1}, {"flagged": True}])
    with pytest.raises(DataError, match="invalid catalogue update"):
        log.append([{"item_id": 1, "published_at": "yesterday-ish"}])
    assert log.count() == 0


def _append_many(root: str, start: int) -> None:
    log = CatalogueLog(root)
    for i in range(start, start + 50):
        log.append([{"item_id": i, "promoted": True}])


def test_two_processes_appending_at_once_lose_no_line(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), s)) for s in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows, _ = CatalogueLog(tmp_path).read_from(0)
    assert sorted(r["item_id"] for r in rows) == list(range(50)) + list(range(1000, 1050))
    assert all(json.loads(line) for line in (tmp_path / "catalogue" / "updates.jsonl").read_text().splitlines())


def test_a_view_applies_new_lines_only_and_a_new_view_reads_the_whole_log(tmp_path: Path) -> None:
    log = CatalogueLog(tmp_path)
    view = CatalogueView(tmp_path)
    assert not view.refresh() and view.flagged == frozenset()
    log.append([{"item_id": 1, "flagged": True}, {"item_id": 2, "promoted": True}])
    assert view.stale() and view.refresh() and not view.stale()
    assert view.flagged == {1} and view.state.items[2]["promoted"] is True and view.state.lines == 2
    assert "first_seen_at" not in view.state.items[2]  # a promotion alone does not describe an item
    assert view.state.items[1]["flagged_by"] == "api"
    before = view.state
    log.append([{"item_id": 1, "flagged": False, "categories": ["x"]}])
    assert view.refresh() and view.flagged == frozenset()
    item1 = {k: v for k, v in view.state.items[1].items() if k != "first_seen_at"}
    assert item1 == {"flagged": False, "flagged_by": "api", "categories": ["x"]}
    assert "first_seen_at" in view.state.items[1]  # dated by the line that described it, not the flag
    assert view.state.generation > before.generation
    assert before.flagged == {1}  # copy-on-write: a reader's state never changes under it
    restarted = CatalogueView(tmp_path)  # a restarted replica: the whole log
    assert restarted.state.items == view.state.items and restarted.state.lines == 3
    log.path.write_text(json.dumps({"item_id": 9, "flagged": True}) + "\n")  # a replaced, shorter log
    assert view.refresh() and view.flagged == {9} and set(view.state.items) == {9}


def test_differences_are_what_a_sync_must_write() -> None:
    known = {1: {"promoted": False, "flagged": False, "categories": ["a"]}}
    current = [
        {"item_id": 1, "promoted": False, "flagged": False, "categories": ["a"]},
        {"item_id": 2, "promoted": True, "flagged": False, "categories": ["b"]},
    ]
    assert [d["item_id"] for d in differences(current, known)] == [2]
    current[0]["flagged"] = True
    assert [d["item_id"] for d in differences(current, known)] == [1, 2]


# ------------------------------------------------------------------------------- the re-ranker


def test_metadata_changes_apply_to_known_items_only_and_never_in_place() -> None:
    meta = ItemMetadata.from_records(
        [10, 11, 12], [["a"], ["b"], None], [None, None, None], [0.0, 0.0, 0.0]
    )
    new = meta.with_changes(
        {
            11: {"promoted": True, "categories": ["c", "a"], "published_at": "2026-01-01T00:00:00Z"},
            12: {"flagged": True},
            99: {"flagged": True},  # not in the bundle: ignored here (the flagged filter covers it)
        }
    )
    assert new.promoted.tolist() == [False, True, False] and new.flagged.tolist() == [False, False, True]
    assert [new.category_names[c] for c in new.category_tuple(1)] == ["c", "a"]
    assert new.published_at[1] == pytest.approx(1767225600.0)
    assert meta.promoted.tolist() == [False] * 3 and meta.category_tuple(1) == (1,)  # the original kept


# ------------------------------------------------------------------------------ the final filter


def _service(world: Path, sync: CatalogueSync, batch: BatchTopN | None = None) -> FunnelService:
    stages = PopularityStages.from_data_dir(world)
    runner = StageRunner(ResilienceConfig(), 1.0)
    return FunnelService(
        local_primary(lambda: stages, runner), None, ResilienceConfig(), 1.0, batch=lambda: batch, flagged=sync.flagged
    )


def test_a_flagged_item_is_never_served_at_any_level_and_the_answer_is_refilled(world: Path, tmp_path: Path) -> None:
    data = tmp_path / "replica-data"
    sync = CatalogueSync(data)
    service = _service(world, sync, BatchTopN("v1", {3: (np.asarray(ITEMS[:15], np.int64), np.ones(15, np.float32))}))
    first = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    top = first.items[0].item_id
    # Another replica (another view of the same directory) acknowledges the flag ...
    asyncio.run(CatalogueSync(data).upsert([{"item_id": top, "flagged": True}]))
    # ... and this replica's very next answer holds k items without it.
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    ids = [it.item_id for it in resp.items]
    assert top not in ids and len(ids) == 5
    assert "1 flagged item(s) removed" in (resp.metadata.degradation_reason or "")
    # The batch level too (the funnel failing), and the backfill never brings it back.
    service._primary = _broken  # type: ignore[method-assign]
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert resp.metadata.degradation_level == "batch" and top not in [it.item_id for it in resp.items]
    assert len(resp.items) == 5
    asyncio.run(sync.upsert([{"item_id": top, "flagged": False}]))  # unflagged: served again
    assert asyncio.run(sync.flagged()) == frozenset()


def test_an_answer_from_the_last_levels_is_refilled_by_its_own_level(world: Path, tmp_path: Path) -> None:
    """Popularity served (the funnel failing, no batch list): the flagged item's slot is refilled
    by popularity itself, asked for one more, not left empty."""
    data = tmp_path / "replica-data"
    sync = CatalogueSync(data)
    pop = PopularityStages.from_data_dir(world)
    service = FunnelService(_broken, pop, ResilienceConfig(), 1.0, flagged=sync.flagged)
    first = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert first.metadata.degradation_level == "popularity"
    top = first.items[0].item_id
    # flagged by another replica: this one's popularity stages still rank it first
    asyncio.run(CatalogueSync(data).upsert([{"item_id": top, "flagged": True}]))
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    ids = [it.item_id for it in resp.items]
    assert top not in ids and len(ids) == 5 and len(set(ids)) == 5
    assert "backfilled from popularity" in (resp.metadata.degradation_reason or "")


async def _broken() -> Any:
    raise RuntimeError("index file gone")


# ------------------------------------------------------------------------------------- the route


def _client(world: Path, data: Path) -> tuple[TestClient, CatalogueSync]:
    sync = CatalogueSync(data)
    service = _service(world, sync)
    auth = ApiKeyAuth.from_config(auth_config(), environ={})
    return TestClient(create_app(service, None, auth, upsert_items=sync.upsert), raise_server_exceptions=False), sync


def test_admin_items_route_needs_admin_validates_and_answers_once_durable(world: Path, tmp_path: Path) -> None:
    c, sync = _client(world, tmp_path / "data")
    body = {"items": [{"item_id": 101, "flagged": True, "promoted": False, "categories": ["a", "b"]}]}
    with c:
        assert c.post("/v1/admin/items", json=body).status_code == 401
        assert c.post("/v1/admin/items", json=body, headers={"X-API-Key": WRITE}).status_code == 403
        bad = c.post("/v1/admin/items", json={"items": [{"item_id": -1, "flagged": "yes"}]}, headers={"X-API-Key": ADMIN})
        assert bad.status_code == 422 and {d["field"] for d in bad.json()["detail"]} == {"items.0.item_id", "items.0.flagged"}
        assert c.post("/v1/admin/items", json={"items": []}, headers={"X-API-Key": ADMIN}).status_code == 422
        r = c.post("/v1/admin/items", json=body, headers={"X-API-Key": ADMIN})
        assert r.status_code == 200 and r.json() == {"accepted": 1, "catalogue_lines": 1, "flagged": [101]}
        assert CatalogueLog(tmp_path / "data").read_from(0)[0][0]["categories"] == ["a", "b"]
        for user in (1, 3, 8):
            got = c.post("/v1/recommend", json={"user_id": user, "k": 10}, headers={"X-API-Key": READ}).json()
            assert 101 not in [it["item_id"] for it in got["items"]]
        assert "/v1/admin/items" in c.get("/openapi.json").json()["paths"]
    assert sync.snapshot()["flagged"] == "1"


def test_without_an_upsert_hook_the_route_says_so(world: Path) -> None:
    auth = ApiKeyAuth.from_config(auth_config(), environ={})
    stages = PopularityStages.from_data_dir(world)
    service = FunnelService(local_primary(lambda: stages, StageRunner(ResilienceConfig(), 1.0)), None, ResilienceConfig(), 1.0)
    with TestClient(create_app(service, None, auth), raise_server_exceptions=False) as c:
        r = c.post("/v1/admin/items", json={"items": [{"item_id": 1}]}, headers={"X-API-Key": ADMIN})
        assert r.status_code == 501 and r.json()["error"] == "not_supported"


# ----------------------------------------------------------------------------------- the sync


def test_sync_sends_what_the_ingest_changed_once(tmp_path: Path) -> None:
    import pandas as pd
    from typer.testing import CliRunner

    from streamrec.cli import app
    from streamrec.data.store import DataStore

    data = make_world(tmp_path / "data")  # no features built: every item is new to serving
    runner = CliRunner()
    dry = runner.invoke(app, ["catalogue", "sync", "--data-dir", str(data), "--dry-run", "--json"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["changed"] == 40 and CatalogueLog(data).count() == 0
    first = json.loads(runner.invoke(app, ["catalogue", "sync", "--data-dir", str(data), "--json"]).stdout)
    assert first == {"items": 40, "changed": 40, "new": 40, "flagged": [139], "catalogue_lines": 40}
    assert CatalogueView(data).state.items[100]["title"] == "Item 100"
    again = runner.invoke(app, ["catalogue", "sync", "--data-dir", str(data)])
    assert again.exit_code == 0 and "sent 0 change(s)" in again.stdout
    store = DataStore(data)
    items = store.items()
    items.loc[items["item_id"] == 105, "promoted"] = True
    items.loc[items["item_id"] == 106, "categories"] = pd.Series([["a", "b"]], index=items.index[items["item_id"] == 106])
    store.upsert_items(items)
    third = json.loads(runner.invoke(app, ["catalogue", "sync", "--data-dir", str(data), "--json"]).stdout)
    assert third["changed"] == 2 and third["new"] == 0 and third["catalogue_lines"] == 42
    state = CatalogueView(data).state
    assert state.items[105]["promoted"] is True and state.items[106]["categories"] == ["a", "b"]


def test_a_torn_last_line_is_cut_by_the_next_append_and_never_breaks_a_reader(tmp_path: Path) -> None:
    log = CatalogueLog(tmp_path)
    log.append([{"item_id": 1, "flagged": True}])
    with open(log.path, "ab") as fh:  # an append that died midway (disk full, a kill)
        fh.write(b'{"item_id": 2, "flag')
    view = CatalogueView(tmp_path)
    assert view.flagged == {1} and not view.stale()  # the partial tail is not re-read per answer
    assert log.append([{"item_id": 3, "flagged": True}]) == 2  # the torn line was cut first
    assert view.refresh() and view.flagged == {1, 3}
    with open(log.path, "ab") as fh:  # a line no append wrote: skipped, never an exception
        fh.write(b"not json\n")
    log.append([{"item_id": 4, "flagged": True}])
    assert view.refresh() and view.flagged == {1, 3, 4}
    assert CatalogueView(tmp_path).flagged == {1, 3, 4}


def test_an_emptied_or_deleted_log_resets_the_state(tmp_path: Path) -> None:
    log = CatalogueLog(tmp_path)
    log.append([{"item_id": 1, "flagged": True}])
    view = CatalogueView(tmp_path)
    log.path.write_bytes(b"")
    assert view.refresh() and view.flagged == frozenset() and view.state.items == {}
    log.append([{"item_id": 2, "flagged": True}])
    assert view.refresh() and view.flagged == {2}
    log.path.unlink()
    assert view.refresh() and view.flagged == frozenset()


def test_a_sync_never_clears_an_operators_flag_but_clears_its_own(tmp_path: Path) -> None:
    from streamrec.data.catalogue import sync_from_store
    from streamrec.data.store import DataStore

    data = make_world(tmp_path / "data")  # item 139 flagged at ingest
    assert sync_from_store(data)["flagged"] == [139]
    CatalogueLog(data).append([{"item_id": 100, "flagged": True}])  # an operator, through the API
    assert sync_from_store(data)["changed"] == 0  # the ingest says 100 is fine: the flag stands
    assert CatalogueView(data).flagged == {100, 139}
    store = DataStore(data)
    items = store.items()
    items.loc[items["item_id"] == 139, "flagged"] = False  # the ingest clears its own flag
    store.upsert_items(items)
    out = sync_from_store(data)
    assert out["changed"] == 1 and CatalogueView(data).flagged == {100}
