"""Point-in-time training sets on real Feast (offline store only: SQLite online store).

The core guarantee: a feature value stamped after an event never reaches that event's row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamrec.data.store import DataStore
from streamrec.errors import MissingFeatureColumnsError
from streamrec.features.client import FeatureClient
from streamrec.features.spec import VIEWS_BY_NAME

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def store(synth_world, copy_world, tmp_path_factory):
    d = copy_world(synth_world, tmp_path_factory.mktemp("pit") / "data")
    fc = FeatureClient(d, online="sqlite")
    report = fc.build("latest", snapshots=4)
    fc.apply()
    return fc, [pd.Timestamp(t) for t in report.snapshots]


def _snapshot(fc: FeatureClient, view: str, as_of: pd.Timestamp) -> pd.DataFrame:
    folder = fc.features_dir / VIEWS_BY_NAME[view].offline_dir
    return pd.read_parquet(folder / f"snapshot-{as_of.strftime('%Y%m%dT%H%M%S%fZ')}.parquet")


def test_values_stamped_after_an_event_never_reach_it(store):
    fc, cuts = store
    t1, t2 = cuts[1], cuts[2]
    events = DataStore(fc.layout.root).events(start=t1.to_pydatetime(), end=t2.to_pydatetime())
    users = events["user_id"].drop_duplicates().head(40).tolist()
    probes = []
    for u in users:
        probes += [
            (u, t1 - pd.Timedelta(microseconds=1)),
            (u, t1),
            (u, t2 - pd.Timedelta(seconds=1)),
            (u, t2),
        ]
    lab = pd.DataFrame(probes, columns=["user_id", "timestamp"]).assign(item_id=1, label=0)
    out = fc.training_set(lab)
    assert len(out) == len(lab) and (out["user_id"].to_numpy() == lab["user_id"].to_numpy()).all()
    snaps = {t: _snapshot(fc, "user_activity_30d", t).set_index("user_id") for t in cuts}
    for r in out.itertuples():
        ts = pd.Timestamp(r.timestamp)
        expected_cut = max(t for t in cuts if t <= ts)  # newest snapshot not after the event
        assert r.events_30d == snaps[expected_cut].at[r.user_id, "events_30d"], (r.user_id, ts)
    # between two cutoffs the later snapshot (which counts the events in between) is never used
    changed = [u for u in users if snaps[t2].at[u, "events_30d"] != snaps[t1].at[u, "events_30d"]]
    assert changed, "the world should have activity between the two cutoffs"
    mid = out[(out["timestamp"] == t2 - pd.Timedelta(seconds=1)) & out["user_id"].isin(changed)]
    assert (mid["events_30d"].to_numpy() == snaps[t1].loc[mid["user_id"], "events_30d"].to_numpy()).all()


def test_many_random_events_match_an_asof_join(store):
    fc, cuts = store
    ev = DataStore(fc.layout.root).events(start=(cuts[0] - pd.Timedelta(days=1)).to_pydatetime())
    lab = ev.sample(400, random_state=1)[["user_id", "item_id", "timestamp", "label"]].reset_index(drop=True)
    dup = lab.iloc[[0]].assign(item_id=lab.at[1, "item_id"])  # same user and time, another item
    lab = pd.concat([lab, dup], ignore_index=True)
    out = fc.training_set(lab)
    assert len(out) == len(lab) and (out["item_id"].to_numpy() == lab["item_id"].to_numpy()).all()
    snaps = pd.concat([_snapshot(fc, "item_engagement_7d", t) for t in cuts])
    snaps = snaps.sort_values("event_timestamp")
    probe = lab.assign(ts=pd.to_datetime(lab["timestamp"], utc=True).astype("datetime64[ns, UTC]"))
    probe = probe.reset_index().sort_values("ts")
    snaps["event_timestamp"] = snaps["event_timestamp"].astype("datetime64[ns, UTC]")
    joined = pd.merge_asof(
        probe, snaps, left_on="ts", right_on="event_timestamp", by="item_id", direction="backward",
        tolerance=VIEWS_BY_NAME["item_engagement_7d"].ttl,
    ).set_index("index").sort_index()  # fmt: skip
    expect = joined["item_events_7d"].fillna(0).astype(int).to_numpy()
    np.testing.assert_array_equal(out["item_events_7d"].to_numpy(), expect)
    # the two rows sharing (user, timestamp) both keep their user features
    assert out.iloc[-1]["events_30d"] == out.iloc[0]["events_30d"]
    assert out.attrs["rows_without_item_features"] == int(joined["item_events_7d"].isna().sum())


def test_events_before_the_first_or_beyond_ttl_get_defaults(store):
    fc, cuts = store
    lab = pd.DataFrame(
        {
            "user_id": [3, 3, 10**9],
            "item_id": [4, 4, 4],
            "timestamp": [cuts[0] - pd.Timedelta(hours=1), cuts[-1] + pd.Timedelta(days=5), cuts[-1]],
            "label": [1, 0, 1],
            "extra": ["a", "b", "c"],
        }
    )
    out = fc.training_set(lab)
    assert out["extra"].tolist() == ["a", "b", "c"]
    before, stale, cold = out.iloc[0], out.iloc[1], out.iloc[2]
    prior = fc.context.values["engagement_rate_prior"]
    assert before["events_30d"] == 0 and before["engagement_rate_30d"] == np.float32(prior)
    assert before["primary_category"] == "unknown"  # no metadata snapshot yet at that time
    assert stale["events_30d"] == 0  # activity TTL (3 d) expired
    assert stale["primary_category"] != "unknown"  # metadata TTL (365 d) still valid
    assert cold["age"] == -1 and cold["item_events_7d"] >= 0
    assert out.attrs["rows_without_user_features"] >= 1 and out.attrs["defaults_filled"]["age"] >= 2


def test_embeddings_join_point_in_time(store):
    fc, cuts = store
    t = cuts[1]
    fc.write_embeddings("item", [4, 5], np.ones((2, 3), np.float32), t, version="v1")
    lab = pd.DataFrame(
        {"user_id": [3, 3], "item_id": [4, 4], "timestamp": [t - pd.Timedelta(seconds=1), t], "label": [1, 1]}
    )
    out = fc.training_set(lab, service="ranking_with_embeddings")
    assert out.at[0, "item_embedding"].tolist() == [0.0, 0.0, 0.0]  # zeros of the recorded width
    assert out.at[0, "item_embedding_version"] == "none"
    assert (
        out.at[1, "item_embedding"].tolist() == [1.0, 1.0, 1.0]
        and out.at[1, "item_embedding_version"] == "v1"
    )
    assert out.at[1, "user_embedding"].tolist() == []  # no user embedding written yet


def test_missing_columns_are_named(store):
    fc, _ = store
    with pytest.raises(MissingFeatureColumnsError, match="timestamp, label"):
        fc.training_set(pd.DataFrame({"user_id": [1], "item_id": [2]}))
