"""The rows a streaming push writes, without a store: grouping, time stamps, the skip rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamrec.errors import InvalidPayloadError
from streamrec.features.push import PushBatch, category_prefs_rows, recent_rows, row_time, trending_rows
from streamrec.features.spec import CATEGORY_PRIOR_STRENGTH, TIMESTAMP_FIELD

T = pd.Timestamp("2026-12-04T10:00:00Z")
NOW = T + pd.Timedelta(minutes=1)
VOCAB = ["news", "sport"]
PRIOR = [0.6, 0.4]


def _batch() -> PushBatch:
    return PushBatch.parse(
        [
            {"user_id": 1, "item_id": 10, "event_type": "click", "timestamp": T.timestamp() + 2},
            {"user_id": 1, "item_id": 11, "event_type": "impression", "label": 0, "timestamp": T.timestamp()},
            {"user_id": 2, "item_id": 11, "event_type": "skip", "timestamp": T.timestamp() + 1},
            {"user_id": 3, "item_id": 12, "event_type": "complete", "timestamp": T.timestamp() + 3},
        ]
    )


def test_a_batch_groups_interactions_by_user_and_positives_by_item_in_time_order() -> None:
    b = _batch()
    assert [e["user_id"] for e in b.events] == [1, 2, 1, 3]  # sorted by time
    assert {u: [e["item_id"] for e in evs] for u, evs in b.interactions.items()} == {
        2: [11],
        1: [10],
        3: [12],
    }
    assert set(b.positives) == {10, 12} and (b.n_interactions, b.n_positives) == (3, 2)
    with pytest.raises(InvalidPayloadError, match="event 0: 'user_id'"):
        PushBatch.parse([{"user_id": -1, "item_id": 1, "event_type": "click"}])


def test_pushed_rows_are_stamped_after_their_event_and_the_stored_row() -> None:
    later = T + pd.Timedelta(hours=1)
    assert row_time(T, None) == T + pd.Timedelta(microseconds=1)
    assert row_time(T, (later, {})) == later + pd.Timedelta(microseconds=1)
    rows = recent_rows(_batch().interactions, {1: (T, {"recent_item_ids": [5], "recent_event_types": ["click"],
                                                         "recent_timestamps": [int(T.timestamp()) - 60]})}, NOW)  # fmt: skip
    u1 = next(r for r in rows if r["user_id"] == 1)
    assert u1["recent_item_ids"] == [10, 5] and u1[TIMESTAMP_FIELD] > T
    trend = trending_rows(_batch().positives, {}, NOW)
    assert {r["item_id"] for r in trend} == {10, 12} and all(r["trending_score"] > 0 for r in trend)


def test_category_prefs_rows_add_positives_and_skip_rows_they_cannot_extend() -> None:
    b = _batch()
    cats = {10: ["sport"], 12: [], 11: ["news"]}
    stored = {1: (T, {"category_prefs": np.array(PRIOR, np.float32), "category_positives": 4.0})}
    rows = category_prefs_rows(b.interactions, stored, cats, VOCAB, PRIOR, NOW)
    assert [r["user_id"] for r in rows] == [1]  # user 2 skipped (no positive), user 3's item has no category
    expect = (np.array([0.6, 0.4]) * (4 + CATEGORY_PRIOR_STRENGTH) + [0, 1]) / (5 + CATEGORY_PRIOR_STRENGTH)
    np.testing.assert_allclose(rows[0]["category_prefs"], expect, rtol=1e-5)
    assert rows[0]["category_positives"] == 5.0 and rows[0]["top_category"] == "news"
    # a new user starts from the prior; a row of an older build (no count) or another vocabulary is kept
    assert category_prefs_rows(b.interactions, {}, cats, VOCAB, PRIOR, NOW)[0]["category_positives"] == 1.0
    old = {1: (T, {"category_prefs": np.array(PRIOR, np.float32), "category_positives": None})}
    assert category_prefs_rows(b.interactions, old, cats, VOCAB, PRIOR, NOW) == []
    other = {1: (T, {"category_prefs": np.array([1.0], np.float32), "category_positives": 3.0})}
    assert category_prefs_rows(b.interactions, other, cats, VOCAB, PRIOR, NOW) == []
    assert category_prefs_rows(b.interactions, stored, cats, [], [], NOW) == []  # a build without categories
