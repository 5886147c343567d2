"""Versioned feature views (issue 17 item 1): stored as changes, read as full snapshots.

A property-style test drives random sequences of catalogue and user edits (some reverted),
builds at random cutoffs (new ones, rebuilt ones, ones inserted before or between stored ones,
extra builds) and compares the versioned read at every cutoff, and between cutoffs, with a full
computation at that cutoff from the tables as they were when the cutoff was last built.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrec.data.store import DataStore
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.features import offline
from streamrec.features.client import FeatureClient
from streamrec.features.pipeline import compute_snapshot
from streamrec.features.snapshot import features_as_of
from streamrec.features.spec import VIEWS, VIEWS_BY_NAME, View
from streamrec.features.versions import NULL_FP, State, changes, stored_cutoffs

VERSIONED = [v for v in VIEWS if v.versioned]
META = VIEWS_BY_NAME["item_metadata"]
PROFILE = VIEWS_BY_NAME["user_profile"]


def _values(view: View, table: pa.Table) -> dict[int, str]:
    """Entity -> fingerprint of its values, all-null rows (which read as no row) left out."""
    state = State.of(view, table)
    return {int(k): fp for k, fp in zip(state.keys, state.fp, strict=True) if fp != NULL_FP}


def _full(world: Path, at: pd.Timestamp) -> dict[str, dict[int, str]]:
    ds = DataStore(world)
    snap = compute_snapshot(ds.users(), ds.items(), ds.events(), at)
    return {v.name: _values(v, offline.to_arrow(v, snap.frames[v.name])) for v in VERSIONED}


def _edit(world: Path, rng: np.random.Generator, history: list[pd.DataFrame]) -> None:
    """A random catalogue / user edit: change, revert to an earlier catalogue, add entities."""
    ds = DataStore(world)
    items, users = ds.items(), ds.users()
    kind = rng.integers(4)
    if kind == 0 and history:  # revert the catalogue to an earlier version
        old = history[int(rng.integers(len(history)))]
        ds.upsert_items(old)
    elif kind == 1:  # new items and users
        n = int(items["item_id"].max()) + 1
        new = items.iloc[:2].copy()
        new["item_id"] = [n, n + 1]
        ds.upsert_items(new)
        u = users.iloc[:1].copy()
        u["user_id"] = int(users["user_id"].max()) + 1
        ds.upsert_users(u)
    else:  # attribute edits
        pick = rng.choice(len(items), size=3, replace=False)
        cats = ["jazz", "opera", "news", "drama"]
        for i in pick:
            items.at[items.index[i], "categories"] = list(
                rng.choice(cats, size=int(rng.integers(0, 3)), replace=False)
            )
            items.at[items.index[i], "promoted"] = bool(rng.integers(2))
        ds.upsert_items(items)
        j = users.index[int(rng.integers(len(users)))]
        users.at[j, "occupation"] = str(rng.choice(["writer", "doctor", None]))
        ds.upsert_users(users)
    history.append(DataStore(world).items())


def _check(fc: FeatureClient, expected: dict[pd.Timestamp, dict[str, dict[int, str]]]) -> None:
    cutoffs = sorted(expected)
    first = cutoffs[0]
    for v in VERSIONED:
        before = offline.read_latest(fc.features_dir, v, first - pd.Timedelta(microseconds=1))
        assert _values(v, before) == {}
        for i, c in enumerate(cutoffs):
            nxt = cutoffs[i + 1] if i + 1 < len(cutoffs) else c + pd.Timedelta(days=400)
            for at in (c, c + (nxt - c) / 2):  # at the cutoff, and between it and the next
                got = _values(v, offline.read_latest(fc.features_dir, v, at))
                want = expected[c][v.name]
                diff = {k for k in set(got) | set(want) if got.get(k) != want.get(k)}
                assert not diff, (v.name, c, at, sorted(diff)[:5])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_versioned_reads_equal_a_full_computation_at_every_cutoff(tmp_path: Path, seed: int) -> None:
    world = tmp_path / "data"
    synthesize(SynthConfig(users=25, items=30, days=12, seed=seed), world, progress=False)
    fc = FeatureClient(world)
    rng = np.random.default_rng(seed)
    t0 = DataStore(world).events()["timestamp"].min().floor("D")
    grid = [t0 + pd.Timedelta(hours=12 * k) for k in range(1, 24)]
    expected: dict[pd.Timestamp, dict[str, dict[int, str]]] = {}
    history = [DataStore(world).items()]
    for step in range(9):
        if step:
            _edit(world, rng, history)
        existing = sorted(expected)
        picks = set(rng.choice(len(grid), size=int(rng.integers(1, 4)), replace=False).tolist())
        cutoffs = {grid[i] for i in picks}
        if existing and rng.random() < 0.5:  # rebuild a stored cutoff
            cutoffs.add(existing[int(rng.integers(len(existing)))])
        if existing and rng.random() < 0.3:  # a cutoff before every stored one
            cutoffs.add(existing[0] - pd.Timedelta(hours=5))
        extra = bool(rng.random() < 0.25)
        report = fc.build(cutoffs=sorted(cutoffs, key=lambda _: rng.random()), extra=extra)
        for c in cutoffs:
            expected[c] = _full(world, c)
        _check(fc, expected)
        pending = json.loads((fc.features_dir / "meta.json").read_text()).get("pending", {})["*"]
        for name, again in report.rewritten.items():  # rewritten cutoffs are materialized again
            assert pd.Timestamp(pending[name]) <= min(pd.Timestamp(t) for t in again)
    # storage grows with changes (and with cutoffs inserted before the first): fewer rows than
    # cutoffs x entities
    stored = sum(len(pd.read_parquet(f)) for f in stored_cutoffs(fc.features_dir, META).values())
    assert stored < sum(len(e["item_metadata"]) for e in expected.values()), stored


def test_a_build_writes_the_catalogue_once_and_event_views_at_every_cutoff(tmp_path: Path) -> None:
    world = tmp_path / "data"
    synthesize(SynthConfig(users=40, items=30, days=8, seed=4), world, progress=False)
    fc = FeatureClient(world)
    end = DataStore(world).events()["timestamp"].max()
    cutoffs = [end - pd.Timedelta(days=k) for k in (6, 3, 0)]
    report = fc.build(cutoffs=cutoffs)
    assert report.rows["item_metadata"] == 30 and report.rows["user_profile"] == 40
    assert report.rows["user_tenure"] == 3 * 40 and report.rows["item_popularity"] == 3 * 30
    files = stored_cutoffs(fc.features_dir, META)
    assert [len(pd.read_parquet(files[t])) for t in sorted(files)] == [30, 0, 0]
    for t in cutoffs:  # every item's metadata and every user's tenure at every cutoff
        items = features_as_of(fc, "item", t)
        assert items["categories"].map(len).gt(0).sum() >= 25
        users = features_as_of(fc, "user", t).set_index("user_id")
        assert users["tenure_days"].notna().all() and users["tenure_days"].gt(0).any()
    # an edit is stored once, where it is observed, and earlier reads keep the old value
    ds = DataStore(world)
    items = ds.items()
    edited = int(items["item_id"].iloc[0])
    before = list(items["categories"].iloc[0])
    items.at[items.index[0], "categories"] = ["opera"]
    ds.upsert_items(items)
    later = end + pd.Timedelta(days=1)
    assert fc.build(cutoffs=[later]).rows["item_metadata"] == 1
    assert list(features_as_of(fc, "item", later).set_index("item_id").at[edited, "categories"]) == ["opera"]
    assert list(features_as_of(fc, "item", end).set_index("item_id").at[edited, "categories"]) == before


def test_an_inserted_cutoff_rewrites_the_next_one_which_keeps_its_value(tmp_path: Path) -> None:
    world = tmp_path / "data"
    synthesize(SynthConfig(users=20, items=15, days=6, seed=5), world, progress=False)
    fc = FeatureClient(world)
    ds = DataStore(world)
    end = ds.events()["timestamp"].max()
    t1, t2, t3 = end - pd.Timedelta(days=4), end - pd.Timedelta(days=2), end
    items = ds.items()
    edited = int(items["item_id"].iloc[0])
    original = list(items["categories"].iloc[0])
    fc.build(cutoffs=[t1, t3])  # t3's file: nothing changed
    items.at[items.index[0], "categories"] = ["opera"]
    ds.upsert_items(items)
    report = fc.build(cutoffs=[t2], extra=True)  # inserted between t1 and t3 with the edit
    assert report.rewritten == {"item_metadata": [t3.isoformat()]}  # t3 keeps its own value
    at = {
        t: features_as_of(fc, "item", t).set_index("item_id").at[edited, "categories"] for t in (t1, t2, t3)
    }
    assert [list(at[t]) for t in (t1, t2, t3)] == [original, ["opera"], original]
    pending = json.loads((fc.features_dir / "meta.json").read_text())["pending"]["*"]  # never materialized
    assert pd.Timestamp(pending["item_metadata"]) <= t3


def test_changes_writes_changed_new_kept_and_gone_entities_only() -> None:
    def table(rows: dict[int, str | None]) -> pa.Table:
        frame = pd.DataFrame(
            {
                "item_id": list(rows),
                "primary_category": list(rows.values()),
                "categories": [[c] if c else None for c in rows.values()],
                "creator": None,
                "published_at": pd.array([None] * len(rows), dtype="Int64"),
                "promoted": pd.array([None] * len(rows), dtype="boolean"),
                "flagged": pd.array([None] * len(rows), dtype="boolean"),
                "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC"),
                "created_timestamp": pd.Timestamp("2026-01-01", tz="UTC"),
            }
        )
        return offline.to_arrow(META, frame)

    before = State.of(META, table({1: "a", 2: "b", 3: "c", 4: None}))
    target = State.of(META, table({1: "a", 2: "x", 5: "e", 6: None, 7: "g"}))
    at = pd.Timestamp("2026-02-01", tz="UTC")
    out = changes(META, before, target, np.asarray([7, 8], dtype=np.int64), at, at).to_pandas()
    # 2 changed, 3 gone (a null row), 5 and 6 new, 7 and 8 kept; 1 unchanged and 4 (null, gone) not written
    assert out["item_id"].tolist() == [2, 3, 5, 6, 7, 8]
    assert out["primary_category"].tolist() == ["x", None, "e", None, "g", None]
    assert (out["event_timestamp"] == at).all()
    assert before.overlay(State.of(META, pa.Table.from_pandas(out))).same_values(target)


def test_a_rebuilt_full_file_keeps_only_the_entities_whose_value_changes(tmp_path: Path) -> None:
    """An upgraded data directory's full snapshot file shrinks to the changes when rebuilt."""
    world = tmp_path / "data"
    synthesize(SynthConfig(users=20, items=15, days=6, seed=6), world, progress=False)
    fc = FeatureClient(world)
    ds = DataStore(world)
    end = ds.events()["timestamp"].max()
    t1, t2 = end - pd.Timedelta(days=2), end
    fc.build(cutoffs=[t1, t2])
    expected = {t1: _full(world, t1)}
    files = stored_cutoffs(fc.features_dir, META)
    full = pq.read_table(files[t1])  # t2's file as a build before versions wrote it: every item
    ts = pa.array([t2] * full.num_rows, offline.TS)
    full = full.set_column(full.schema.get_field_index("event_timestamp"), "event_timestamp", ts)
    offline.write_table(full, files[t2])
    items = ds.items()
    edited = int(items["item_id"].iloc[0])
    items.at[items.index[0], "categories"] = ["opera"]
    ds.upsert_items(items)
    report = fc.build(cutoffs=[t2])
    assert report.rows["item_metadata"] == 1  # the edit only, not the old file's 15 items
    assert pq.read_table(stored_cutoffs(fc.features_dir, META)[t2])["item_id"].to_pylist() == [edited]
    expected[t2] = _full(world, t2)
    _check(fc, expected)
    # a cutoff inserted before the first stored one becomes the full copy; the next shrinks
    t0 = t1 - pd.Timedelta(days=1)
    assert fc.build(cutoffs=[t0]).rewritten == {
        "item_metadata": [t1.isoformat()],
        "user_profile": [t1.isoformat()],
    }
    expected[t0] = _full(world, t0)
    _check(fc, expected)
    files = stored_cutoffs(fc.features_dir, META)
    assert pq.read_table(files[t1]).num_rows < pq.read_table(files[t0]).num_rows
