"""Versioned feature views: the catalogue's metadata is stored as changes, not per cutoff."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from streamrec.data.store import DataStore
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.errors import FeatureStoreError
from streamrec.features import offline
from streamrec.features.client import FeatureClient
from streamrec.features.snapshot import features_as_of
from streamrec.features.spec import VIEWS_BY_NAME

META = VIEWS_BY_NAME["item_metadata"]
ACTIVITY = VIEWS_BY_NAME["user_activity_30d"]


@pytest.fixture
def world(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    synthesize(SynthConfig(users=60, items=50, days=10, seed=4), d, progress=False)
    return d


def _rows(fc: FeatureClient, view: object) -> dict[str, int]:
    return {f.name: len(pd.read_parquet(f)) for f in offline.files(fc.features_dir, view, ["snapshot"])}  # type: ignore[arg-type]


def test_a_build_writes_the_catalogue_once_and_other_views_at_every_cutoff(world: Path) -> None:
    fc = FeatureClient(world)
    end = DataStore(world).events()["timestamp"].max()
    cutoffs = [end - pd.Timedelta(days=k) for k in (6, 3, 0)]
    report = fc.build(cutoffs=cutoffs)
    assert report.snapshots == [t.isoformat() for t in sorted(cutoffs)]
    meta = sorted(_rows(fc, META).values(), reverse=True)
    assert meta[0] >= 50 and sum(meta[1:]) == 0  # every item once, at the first cutoff
    assert all(n >= 60 for n in _rows(fc, ACTIVITY).values())  # event-derived: each cutoff in full
    # every item's metadata is readable at every cutoff (a row holds until replaced)
    for t in cutoffs:
        assert features_as_of(fc, "item", t)["primary_category"].ne("unknown").sum() >= 45
    with pytest.raises(FeatureStoreError, match="cutoffs is empty"):
        fc.build(cutoffs=[])


def test_a_rebuild_writes_only_what_changed_and_replaces_later_versions(world: Path) -> None:
    fc = FeatureClient(world)
    store = DataStore(world)
    end = store.events()["timestamp"].max()
    fc.build(cutoffs=[end])  # the whole catalogue at `end`
    items = store.items()
    edited = int(items["item_id"].iloc[0])
    items.loc[items["item_id"] == edited, "categories"] = pd.Series([["opera"]], index=items.index[:1])
    store.upsert_items(items)
    # an ingest changed one item; the pipeline rebuilds from an earlier time: `end`'s old version
    # of the item must not shadow the new one
    fc.build(cutoffs=[end - pd.Timedelta(days=2)])
    after = features_as_of(fc, "item", end + pd.Timedelta(days=1)).set_index("item_id")
    assert list(after.at[edited, "categories"]) == ["opera"]
    assert len(_rows(fc, META)) == 1
    # a later build writes only the rows that changed since: none, then the one edited again
    fc.build(cutoffs=[end])
    assert _rows(fc, META)[max(_rows(fc, META))] == 0
    items.loc[items["item_id"] == edited, "categories"] = pd.Series([["jazz"]], index=items.index[:1])
    store.upsert_items(items)
    fc.build(cutoffs=[end + pd.Timedelta(days=1)])
    assert _rows(fc, META)[max(_rows(fc, META))] == 1
    now = features_as_of(fc, "item", end + pd.Timedelta(days=2)).set_index("item_id")
    assert list(now.at[edited, "categories"]) == ["jazz"]
    earlier = features_as_of(fc, "item", end).set_index("item_id")
    assert list(earlier.at[edited, "categories"]) == ["opera"]  # each version where it was built


def test_files_written_before_a_feature_existed_are_upgraded_and_read_as_its_default(world: Path) -> None:
    import pyarrow.parquet as pq

    from streamrec.features.spec import VIEWS_BY_NAME as V

    fc = FeatureClient(world)
    end = DataStore(world).events()["timestamp"].max()
    fc.build(cutoffs=[end])
    prefs = V["user_category_prefs"]
    (f,) = offline.files(fc.features_dir, prefs, ["snapshot"])
    pq.write_table(pq.read_table(f).drop(["category_positives"]), f)  # as a build before 2026-12-04 wrote it
    assert offline.upgrade_files(fc.features_dir, prefs) == 1
    assert offline.upgrade_files(fc.features_dir, prefs) == 0  # once
    table = offline.read_latest(fc.features_dir, prefs, end).to_pandas()
    assert table["category_positives"].isna().all() and len(table) >= 60


def test_a_push_against_a_registry_older_than_the_spec_writes_nothing_and_says_to_apply(world: Path) -> None:
    from types import SimpleNamespace

    from streamrec.features.spec import VIEWS_BY_NAME as V

    fc = FeatureClient(world)
    prefs = V["user_category_prefs"]
    old = SimpleNamespace(name=prefs.name, features=[SimpleNamespace(name="category_prefs")])
    fc._readers["user"] = [(old, ["category_prefs"])]
    with pytest.raises(FeatureStoreError, match="streamrec features apply"):
        fc._check_registered([prefs])
