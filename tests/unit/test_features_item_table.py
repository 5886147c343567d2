"""ItemFeatureTable: contiguous arrays, O(1) vectorised lookups."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamrec.features.defaults import apply_defaults
from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
from streamrec.features.spec import views_for

NAMES = [f for v in views_for("item") for f in v.feature_names]


def table(ids, **cols) -> ItemFeatureTable:
    frame = apply_defaults(pd.DataFrame({"item_id": ids, **cols}), features=NAMES)
    return ItemFeatureTable.from_frame(frame, ["news", "sport"])


def test_arrays_are_contiguous_and_typed():
    t = table(
        [30, 10, 20],
        categories=[["sport"], ["news", "music"], None],
        primary_category=["sport", "news", None],
        creator=["b", "a", None],
        published_at=[3, 1, None],
        promoted=[False, True, None],
        item_ctr_7d=[0.3, 0.1, None],
        item_embedding=[[1.0, 2.0], [3.0, 4.0], None],
    )
    assert t.item_ids.tolist() == [10, 20, 30]  # sorted
    assert (
        t.dense.dtype == np.float32
        and t.dense.flags["C_CONTIGUOUS"]
        and t.dense.shape == (3, len(DENSE_FEATURES))
    )
    assert t.category_id.dtype == np.int32 and t.creator_id.dtype == np.int32
    assert t.category_vocab[:2] == ["news", "sport"] and "music" in t.category_vocab
    assert [t.category_vocab[c] for c in t.category_id[[0, 2]]] == ["news", "sport"]
    assert t.category_id[1] == -1  # unknown primary category
    assert t.creator_vocab[t.creator_id[1]] == "unknown"
    assert t.published_at.tolist() == [1, 0, 3] and t.promoted.tolist() == [True, False, False]
    np.testing.assert_allclose(t.column("item_ctr_7d"), [0.1, 0.0, 0.3])
    assert t.embedding.shape == (3, 2) and t.embedding[1].tolist() == [0.0, 0.0]
    r = t.row(10)
    assert r is not None and r["categories"] == ["news", "music"] and r["creator"] == "a"
    assert t.row(99) is None and t.nbytes > 0


def test_index_of_is_vectorised_with_unknown_ids():
    t = table([5, 7, 1000])
    got = t.index_of(np.array([1000, 5, 6, -3, 10**9, 7]))
    assert got.tolist() == [2, 0, -1, -1, -1, 1]
    assert t.index(7) == 1 and t.index(8) == -1


def test_sparse_ids_use_a_hash_map():
    ids = [1, 10**12, 5 * 10**12]
    t = table(ids)
    assert t._lut is None
    assert t.index_of([5 * 10**12, 2, 1]).tolist() == [2, -1, 0]


def test_empty_table():
    t = ItemFeatureTable.from_frame(apply_defaults(pd.DataFrame({"item_id": []}), features=NAMES), [])
    assert len(t) == 0 and t.index_of([1]).tolist() == [-1]
