"""Streaming arithmetic: trending score and recent interactions (shared with the batch build)."""

from __future__ import annotations

import math

import numpy as np

from streamrec.features.spec import TRENDING_HALF_LIFE_H
from streamrec.features.transforms import (
    TRENDING_LAMBDA,
    decay_trending,
    derive_label,
    is_interaction,
    merge_recent,
    trending_from_events,
    trending_update,
)


def test_trending_incremental_equals_batch_in_any_order():
    rng = np.random.default_rng(0)
    times = 1_700_000_000 + np.sort(rng.uniform(0, 86_400, 30))
    at = float(times.max()) + 3600
    batch = trending_from_events(times, at)
    for order in (np.arange(30), rng.permutation(30)):
        score, upd = 0.0, 0.0
        for t in times[order]:
            score, upd = trending_update(score, upd, float(t))
        assert upd == float(times.max())
        assert math.isclose(float(decay_trending(score, upd, at)), batch, rel_tol=1e-9)


def test_trending_half_life():
    s = trending_from_events(np.array([0.0]), TRENDING_HALF_LIFE_H * 3600)
    assert math.isclose(s, TRENDING_LAMBDA / 2, rel_tol=1e-12)


def test_merge_recent_keeps_latest_ten_newest_first():
    items, types, stamps = merge_recent([], [], [], list(range(12)), ["click"] * 12, list(range(100, 112)))
    assert items == list(range(11, 1, -1)) and stamps[0] == 111 and len(types) == 10
    # an out-of-order older event lands in time order, the oldest drops out
    items2, _, stamps2 = merge_recent(items, types, stamps, [99], ["view"], [105])
    assert stamps2 == sorted(stamps2, reverse=True) and 99 in items2 and 2 not in items2


def test_interaction_and_label_rules():
    et = np.array(["impression", "impression", "click", "skip"], dtype=object)
    assert is_interaction(et, np.array([0, 1, 0, 0])).tolist() == [False, True, True, True]
    assert derive_label("click") == 1 and derive_label("complete") == 1
    assert derive_label("view") == 0 and derive_label("skip") == 0
    assert derive_label("rating", 4.0) == 1 and derive_label("rating", 3.5) == 0
