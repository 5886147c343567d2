"""Batch feature computation on a hand-made world (no Feast)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from streamrec.errors import MissingFeatureColumnsError
from streamrec.features.pipeline import compute_snapshot, extend_vocab
from streamrec.features.spec import CATEGORY_PRIOR_STRENGTH, RATE_PRIOR_STRENGTH, RECENT_N, VIEWS_BY_NAME
from streamrec.features.transforms import add_category_positives, trending_update

T = pd.Timestamp("2026-03-10T00:00:00Z")


def world():
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "age": [30, None, 41],
            "gender": ["F", None, "M"],
            "occupation": ["x", "y", None],
            "region": ["eu", "us", None],
            "signup_at": [T - pd.Timedelta(days=10), T - pd.Timedelta(days=1), T + pd.Timedelta(days=1)],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": [10, 11, 12],
            "categories": [["news"], ["sport", "news"], []],
            "creator": ["a", None, "b"],
            "published_at": [T - pd.Timedelta(days=5)] * 3,
            "promoted": [True, False, False],
            "flagged": [False, False, True],
        }
    )
    rows = []
    # user 1: 12 clicks on item 10/11 over the last 2 days, one impression without engagement
    for k in range(12):
        rows.append((1, 10 + k % 2, "click", 1, T - pd.Timedelta(hours=48 - k)))
    rows.append((1, 12, "impression", 0, T - pd.Timedelta(hours=1)))
    # user 2: an old event (40 days ago: outside every window) and a skip
    rows.append((2, 10, "click", 1, T - pd.Timedelta(days=40)))
    rows.append((2, 11, "skip", 0, T - pd.Timedelta(days=3)))
    # events at and after the cutoff must never count
    rows.append((1, 12, "click", 1, T))
    rows.append((3, 12, "complete", 1, T + pd.Timedelta(hours=2)))
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "label", "timestamp"])
    ev["label"] = ev["label"].astype("int8")
    return users, items, ev.sort_values("timestamp", kind="stable").reset_index(drop=True)


def frames():
    users, items, ev = world()
    return compute_snapshot(users, items, ev, T, vocab=["sport"])


def row(frame, key, value):
    r = frame.loc[frame[key] == value]
    assert len(r) == 1
    return r.iloc[0]


def test_every_entity_every_view_and_stamped_at_cutoff():
    snap = frames()
    assert set(snap.frames) == {
        "user_profile",
        "user_tenure",
        "user_activity_30d",
        "user_category_prefs",
        "user_recent_interactions",
        "item_metadata",
        "item_engagement_7d",
        "item_popularity",
        "item_trending",
    }
    for name, f in snap.frames.items():
        view = VIEWS_BY_NAME[name]
        assert list(f.columns[:1]) == [view.join_key]
        assert set(view.feature_names) <= set(f.columns)
        assert (f["event_timestamp"] == T).all()
        ids = f[view.join_key].tolist()
        assert ids == ([1, 2, 3] if view.entity == "user" else [10, 11, 12])


def test_events_at_or_after_cutoff_are_ignored():
    snap = frames()
    act = snap.frames["user_activity_30d"]
    assert row(act, "user_id", 3)["events_30d"] == 0  # only has an event after T
    assert row(act, "user_id", 1)["events_30d"] == 13  # the click at exactly T is excluded
    pop = snap.frames["item_popularity"]
    assert row(pop, "item_id", 12)["item_positives_30d"] == 0


def test_activity_and_smoothed_rates():
    snap = frames()
    act = snap.frames["user_activity_30d"]
    p = snap.defaults["engagement_rate_prior"]
    assert math.isclose(p, 12 / 14)  # 12 positives of 14 events in the 30-day window
    u1 = row(act, "user_id", 1)
    assert u1["positives_30d"] == 12 and u1["distinct_items_30d"] == 3 and u1["active_days_30d"] == 2
    assert math.isclose(
        u1["engagement_rate_30d"], (12 + RATE_PRIOR_STRENGTH * p) / (13 + RATE_PRIOR_STRENGTH), rel_tol=1e-6
    )
    assert math.isclose(u1["days_since_last_event"], 1 / 24, rel_tol=1e-5)
    u3 = row(act, "user_id", 3)
    assert u3["days_since_last_event"] == 30.0
    assert math.isclose(u3["engagement_rate_30d"], p, rel_tol=1e-6)  # cold user = prior
    eng = snap.frames["item_engagement_7d"]
    assert row(eng, "item_id", 10)["item_events_7d"] == 6 and row(eng, "item_id", 11)["item_users_7d"] == 2


def test_category_prefs_are_posterior_shares_with_population_prior():
    snap = frames()
    assert snap.vocab == ["sport", "news"]  # append-only: existing entries keep their position
    prior = np.asarray(snap.defaults["category_prior"])
    assert math.isclose(prior.sum(), 1.0)
    prefs = snap.frames["user_category_prefs"]
    for uid in (1, 2, 3):
        assert math.isclose(float(np.sum(row(prefs, "user_id", uid)["category_prefs"])), 1.0, rel_tol=1e-5)
    np.testing.assert_allclose(row(prefs, "user_id", 3)["category_prefs"], prior, rtol=1e-6)
    # user 1: 6 positives on item 10 (news), 6 on item 11 (sport+news, half each) -> 9 news, 3 sport
    counts = np.array([3.0, 9.0])
    expect = (counts + CATEGORY_PRIOR_STRENGTH * prior) / (12 + CATEGORY_PRIOR_STRENGTH)
    np.testing.assert_allclose(row(prefs, "user_id", 1)["category_prefs"], expect, rtol=1e-6)
    assert row(prefs, "user_id", 1)["top_category"] == "news"
    assert row(prefs, "user_id", 1)["category_positives"] == 12.0  # the count behind the shares
    assert row(prefs, "user_id", 3)["category_positives"] == 0.0


def test_pushed_positives_extend_the_batch_shares_as_one_more_event_would():
    """add_category_positives is the build's posterior with the build's prior and one more event."""
    snap = frames()
    prior = np.asarray(snap.defaults["category_prior"])
    u1 = row(snap.frames["user_category_prefs"], "user_id", 1)
    # a click on item 11 (sport+news) and one on an item of an unknown category (skipped)
    shares, positives = add_category_positives(
        u1["category_prefs"], u1["category_positives"], [["sport", "news"], ["opera"], []], snap.vocab
    )
    counts = np.array([3.5, 9.5])
    expect = (counts + CATEGORY_PRIOR_STRENGTH * prior) / (13 + CATEGORY_PRIOR_STRENGTH)
    np.testing.assert_allclose(shares, expect, rtol=1e-5)
    assert positives == 13.0 and shares.dtype == np.float32
    # a cold user starts from the prior with no positives: one news click moves them to news
    cold, n = add_category_positives(prior, 0.0, [["news"]], snap.vocab)
    np.testing.assert_allclose(cold, (np.array([0.0, 1.0]) + CATEGORY_PRIOR_STRENGTH * prior) / 6, rtol=1e-5)
    assert n == 1.0 and cold[1] > prior[1]


def test_recent_interactions_newest_first_capped():
    snap = frames()
    rec = snap.frames["user_recent_interactions"]
    u1 = row(rec, "user_id", 1)
    assert len(u1["recent_item_ids"]) == RECENT_N
    assert list(u1["recent_timestamps"]) == sorted(u1["recent_timestamps"], reverse=True)
    assert 12 not in list(u1["recent_item_ids"])  # the impression without engagement is no interaction
    assert u1["last_interaction_at"] == u1["recent_timestamps"][0]
    assert list(row(rec, "user_id", 2)["recent_event_types"]) == ["skip"]
    assert len(row(rec, "user_id", 3)["recent_item_ids"]) == 0


def test_trending_matches_streaming_updates():
    users, items, ev = world()
    snap = compute_snapshot(users, items, ev, T)
    tr = row(snap.frames["item_trending"], "item_id", 10)
    score, at = 0.0, 0.0
    pos = ev.loc[(ev["item_id"] == 10) & (ev["label"] == 1) & (ev["timestamp"] >= T - pd.Timedelta(days=7))]
    for t in pos.loc[pos["timestamp"] < T, "timestamp"]:
        score, at = trending_update(score, at, t.timestamp())
    decayed = score * math.exp(-math.log(2) / 6.0 * (T.timestamp() - at) / 3600)
    assert math.isclose(tr["trending_score"], decayed, rel_tol=1e-5)
    assert tr["trending_updated_at"] == int(T.timestamp())


def test_item_metadata_nulls_stay_null_for_defaults():
    meta = frames().frames["item_metadata"]
    i11, i12 = row(meta, "item_id", 11), row(meta, "item_id", 12)
    assert i11["primary_category"] == "sport" and i11["creator"] is None
    assert i12["primary_category"] is None and list(i12["categories"]) == []
    assert bool(i12["flagged"]) and row(meta, "item_id", 10)["published_at"] == int(
        (T - pd.Timedelta(days=5)).timestamp()
    )
    prof, tenure = frames().frames["user_profile"], frames().frames["user_tenure"]
    assert pd.isna(row(prof, "user_id", 2)["age"]) and row(tenure, "user_id", 3)["tenure_days"] == 0.0


def test_missing_columns_are_named():
    users, items, ev = world()
    with pytest.raises(MissingFeatureColumnsError, match="label, timestamp"):
        compute_snapshot(users, items, ev.drop(columns=["label", "timestamp"]), T)
    with pytest.raises(MissingFeatureColumnsError, match="creator"):
        compute_snapshot(users, items.drop(columns=["creator"]), ev, T)


def test_extend_vocab_is_append_only():
    items = pd.DataFrame({"categories": [["b", "a"], None, ["c"]]})
    assert extend_vocab(["z"], items) == ["z", "a", "b", "c"]
