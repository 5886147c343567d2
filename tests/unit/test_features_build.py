"""Feature builds at explicit cutoffs, and offline files written before a feature existed."""

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


def test_a_build_at_explicit_cutoffs_writes_every_view_at_each(world: Path) -> None:
    fc = FeatureClient(world)
    end = DataStore(world).events()["timestamp"].max()
    cutoffs = [end - pd.Timedelta(days=k) for k in (6, 3, 0)]
    report = fc.build(cutoffs=cutoffs)
    assert report.snapshots == [t.isoformat() for t in sorted(cutoffs)]
    # versioned item metadata: the catalogue once (nothing changed since); event views in full
    assert sorted(_rows(fc, META).values()) == [0, 0, 50] and len(_rows(fc, ACTIVITY)) == 3
    assert sorted(_rows(fc, ACTIVITY).values()) == [60, 60, 60]
    for t in cutoffs:  # the catalogue is readable as of every cutoff
        assert features_as_of(fc, "item", t)["primary_category"].ne("unknown").sum() >= 45
    with pytest.raises(FeatureStoreError, match="cutoffs is empty"):
        fc.build(cutoffs=[])


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


def test_user_profile_files_with_tenure_are_upgraded_to_the_versioned_view(world: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fc = FeatureClient(world)
    end = DataStore(world).events()["timestamp"].max()
    fc.build(cutoffs=[end])
    profile = VIEWS_BY_NAME["user_profile"]
    (f,) = offline.files(fc.features_dir, profile, ["snapshot"])
    old = pq.read_table(f)  # as a build before tenure_days moved to user_tenure wrote it
    pq.write_table(old.append_column("tenure_days", pa.array([1.0] * old.num_rows, pa.float32())), f)
    assert offline.upgrade_files(fc.features_dir, profile) == 1
    assert pq.read_schema(f).names == offline.arrow_schema(profile).names


def test_a_push_against_a_registry_older_than_the_spec_writes_nothing_and_says_to_apply(world: Path) -> None:
    from types import SimpleNamespace

    from streamrec.features.spec import VIEWS_BY_NAME as V

    fc = FeatureClient(world)
    prefs = V["user_category_prefs"]
    old = SimpleNamespace(name=prefs.name, features=[SimpleNamespace(name="category_prefs")])
    fc._readers["user"] = [(old, ["category_prefs"])]
    with pytest.raises(FeatureStoreError, match="streamrec features apply"):
        fc._check_registered([prefs])
