"""apply_defaults: one function for frames (training) and dicts (serving)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamrec.features.defaults import DefaultContext, apply_defaults, normalize_value
from streamrec.features.spec import FEATURES, views_for

CTX = DefaultContext(
    {
        "engagement_rate_prior": 0.25,
        "category_prior": [0.5, 0.3, 0.2],
        "top_category_prior": "news",
        "item_ctr_prior": 0.1,
        "user_embedding_dim": 4,
    }
)


def test_dict_fills_literal_and_derived_defaults():
    counts: dict[str, int] = {}
    names = [f for v in views_for("user") for f in v.feature_names]
    out = apply_defaults({"age": 31, "gender": None}, CTX, features=names, counts=counts)
    assert set(out) == set(names)
    assert out["age"] == 31 and out["gender"] == "unknown"
    assert out["engagement_rate_30d"] == np.float32(0.25)
    np.testing.assert_allclose(out["category_prefs"], [0.5, 0.3, 0.2])
    assert out["category_prefs"].dtype == np.float32
    assert out["top_category"] == "news"
    np.testing.assert_array_equal(out["user_embedding"], np.zeros(4, np.float32))
    assert out["recent_item_ids"].dtype == np.int64 and len(out["recent_item_ids"]) == 0
    assert counts["gender"] == 1 and "age" not in counts or counts.get("age", 0) == 0


def test_dict_without_context_uses_fallbacks():
    out = apply_defaults({"category_prefs": None, "user_embedding": None})
    assert len(out["category_prefs"]) == 0 and len(out["user_embedding"]) == 0


def test_frame_fills_and_casts_types_without_touching_input():
    frame = pd.DataFrame(
        {
            "user_id": [1, 2],
            "events_30d": [3.0, np.nan],  # Feast returns float64 with NaN for missing ints
            "engagement_rate_30d": [0.5, np.nan],
            "gender": ["F", None],
            "recent_item_ids": [[1, 2], None],
            "promoted": [True, None],
        }
    )
    before = frame.copy()
    counts: dict[str, int] = {}
    out = apply_defaults(frame, CTX, counts=counts)
    pd.testing.assert_frame_equal(frame, before)
    assert out["events_30d"].dtype == np.int64 and out["events_30d"].tolist() == [3, 0]
    assert out["engagement_rate_30d"].dtype == np.float32
    assert out["engagement_rate_30d"].iloc[1] == np.float32(0.25)
    assert out["gender"].tolist() == ["F", "unknown"]
    assert out["promoted"].dtype == bool and out["promoted"].tolist() == [True, False]
    assert list(out["recent_item_ids"].iloc[0]) == [1, 2] and len(out["recent_item_ids"].iloc[1]) == 0
    assert out["user_id"].tolist() == [1, 2]  # not a feature: untouched
    assert counts == {
        "events_30d": 1,
        "engagement_rate_30d": 1,
        "gender": 1,
        "recent_item_ids": 1,
        "promoted": 1,
    }


def test_frame_adds_missing_feature_columns():
    out = apply_defaults(pd.DataFrame({"item_id": [5]}), CTX, features=["item_ctr_7d", "categories"])
    assert out["item_ctr_7d"].iloc[0] == np.float32(0.1)
    assert out["categories"].iloc[0] == []


def test_same_defaults_for_frame_and_dict():
    """Training (frame) and serving (dict) see identical values for a cold entity."""
    names = [f for v in views_for("item") for f in v.feature_names]
    row = apply_defaults({}, CTX, features=names)
    frame = apply_defaults(pd.DataFrame({"item_id": [1]}), CTX, features=names)
    for n in names:
        a, b = row[n], frame[n].iloc[0]
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, n


def test_normalize_value_keeps_missing():
    assert normalize_value("age", None) is None
    assert normalize_value("age", float("nan")) is None
    assert normalize_value("age", 7.0) == 7
    assert FEATURES["age"].default == -1


def test_context_load(tmp_path):
    p = tmp_path / "meta.json"
    assert DefaultContext.load(p).values == {}
    p.write_text('{"defaults": {"item_embedding_dim": 2}}')
    ctx = DefaultContext.load(p)
    assert list(apply_defaults({"item_embedding": None}, ctx)["item_embedding"]) == [0.0, 0.0]
