"""New catalogue items appended while serving: each structure grows by copy, old rows unchanged."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from streamrec.errors import DataError, ModelError
from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
from streamrec.reranking.metadata import ItemMetadata
from streamrec.retrieval.affinity import AffinitySource
from streamrec.retrieval.base import UserContext
from streamrec.retrieval.index import IndexConfig, build_index
from streamrec.retrieval.trending import TrendingSource


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    faiss.omp_set_num_threads(1)


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize(("kind", "metric"), [("flat", "ip"), ("ivf", "ip"), ("ivf", "l2"), ("hnsw", "ip")])
def test_an_index_with_added_vectors_finds_them_and_leaves_the_original_alone(kind: str, metric: str) -> None:
    x = _vectors(2000, 16)
    cfg = IndexConfig(kind=kind, nprobe=1000, ef_search=400)  # exhaustive enough to compare with exact
    index = build_index(x, metric, cfg)  # type: ignore[arg-type]
    new = _vectors(3, 16, seed=1) * 3.0  # longer than every indexed vector: each is its own best match
    grown = index.with_added(new, np.arange(2000, 2003))
    assert len(index) == 2000 and len(grown) == 2003
    ids, scores = grown.search(new, 1)
    assert ids[:, 0].tolist() == [2000, 2001, 2002]
    exact = (new * new).sum(axis=1)
    if metric == "ip" and kind != "ivf":
        np.testing.assert_allclose(scores[:, 0], exact, rtol=1e-4)
    elif metric == "ip":  # longer than the build's longest: found, scored a little under
        assert (scores[:, 0] <= exact * (1 + 1e-5)).all() and (scores[:, 0] > 0).all()
    assert grown.search_params == index.search_params
    assert index.search(new, 5)[0].max() < 2000  # the original never returns them


def test_added_vectors_keep_the_item_ids_of_a_subset_index() -> None:
    x = _vectors(50, 8)
    index = build_index(x, "ip", IndexConfig(kind="flat"), ids=np.arange(100, 150))
    grown = index.with_added(x[:1] * 3.0, [7])
    assert grown.search(x[:1] * 3.0, 1)[0][0, 0] == 7
    with pytest.raises(ModelError, match="vectors to add"):
        index.with_added(np.zeros((1, 4), np.float32), [7])


def _table(n: int = 4) -> ItemFeatureTable:
    return ItemFeatureTable(
        item_ids=np.arange(10, 10 + n, dtype=np.int64),
        dense=np.ones((n, len(DENSE_FEATURES)), np.float32),
        dense_names=DENSE_FEATURES,
        category_id=np.zeros(n, np.int32),
        categories_indptr=np.arange(n + 1, dtype=np.int64),
        categories_indices=np.zeros(n, np.int32),
        creator_id=np.zeros(n, np.int32),
        published_at=np.full(n, 100, np.int64),
        promoted=np.zeros(n, bool),
        flagged=np.zeros(n, bool),
        trending_updated_at=np.zeros(n, np.int64),
        embedding=np.zeros((n, 2), np.float32),
        embedding_version=np.full(n, "v1", dtype=object),
        category_vocab=["drama", "comedy"],
        creator_vocab=["a"],
    )


def test_item_table_appends_rows_in_the_order_given_with_defaults() -> None:
    table = _table()
    grown = table.with_items([99, 50], [["comedy", "space opera"], []], [1000, 0], {"popularity": 0.5})
    assert len(table) == 4 and len(grown) == 6
    assert grown.index_of([99, 50, 10]).tolist() == [4, 5, 0]  # appended, not sorted in
    row = grown.row(99)
    assert row is not None
    assert row["categories"] == ["comedy"]  # a category the models never saw is left out
    assert row["primary_category"] == "comedy" and row["published_at"] == 1000 and row["creator"] == "unknown"
    assert row["popularity"] == 0.5 and row["item_events_7d"] == 0
    assert grown.row(50)["primary_category"] == "unknown"  # type: ignore[index]
    old_row, same_row = table.row(10), grown.row(10)
    assert old_row is not None and same_row is not None
    assert same_row["categories"] == old_row["categories"] and same_row["popularity"] == old_row["popularity"]
    assert grown.category_matrix().shape == (6, 2)
    with pytest.raises(ValueError, match="already in the table"):
        table.with_items([10], [[]], [0], {})


def test_metadata_appends_rows_that_with_changes_then_fills() -> None:
    meta = ItemMetadata([1, 2], [[0], [1]], [0, 0], [5.0, 6.0], category_names=["a", "b"])
    grown = meta.with_items([7])
    assert len(grown) == 3 and grown.indices_of([7, 1]).tolist() == [2, 0]
    filled = grown.with_changes({7: {"categories": ["b", "new"], "published_at": 42, "promoted": True}})
    assert filled.category_tuple(2) == (1, 2) and filled.category_names[2] == "new"
    assert filled.published_at[2] == 42 and bool(filled.promoted[2]) and not bool(filled.flagged[2])
    assert filled.exposure[2] == 0 and len(meta) == 2  # the original is unchanged
    with pytest.raises(DataError, match="already in the metadata"):
        meta.with_items([2])


def test_affinity_retrieves_a_new_item_for_users_who_like_its_category() -> None:
    # 6 items: 0-2 in category 0, 3-5 in category 1; user 0 only watches category 1.
    x = sp.csr_matrix(np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.float32))
    src = AffinitySource(x, [[0], [0], [0], [1], [1], [1]], exclude_seen=False)
    grown = src.with_items([[1], []])  # item 6 in category 1, item 7 in none
    items, _ = grown.retrieve(UserContext(user_index=0), 4)
    assert 6 in items.tolist() and 7 not in items.tolist()
    assert 6 not in src.retrieve(UserContext(user_index=0), 8)[0].tolist()
    # A user who recently watched the new item now leans towards its category.
    prefs = grown.preferences(UserContext(user_index=-1, recent_items=np.array([6, 6, 6])))
    assert prefs[1] > grown.preferences(UserContext(user_index=-1))[1]


def test_trending_counts_engagement_of_new_items() -> None:
    src = TrendingSource.from_events(3, [0, 1, 1], [100.0, 100.0, 100.0])
    grown = src.with_items(2)
    assert grown.n_items == 5 and src.n_items == 3
    grown.add([4, 4, 4], [110.0, 110.0, 110.0])
    assert grown.retrieve(UserContext(user_index=-1), 1)[0].tolist() == [4]
    assert src.velocity().size == 3


def test_streamed_engagement_counts_into_a_copy_of_the_table() -> None:
    from streamrec.features.spec import RATE_PRIOR_STRENGTH
    from streamrec.features.transforms import trending_update

    table = _table()
    col = {n: i for i, n in enumerate(DENSE_FEATURES)}
    table.dense[:, col["item_ctr_7d"]] = 0.5  # 1 positive of 1 event with a prior p: (1 + 10p) / 11
    prior = (0.5 * (1 + RATE_PRIOR_STRENGTH) - 1) / RATE_PRIOR_STRENGTH
    grown = table.with_engagement(
        np.array([1, 1, 2, 99]), np.array([1000.0, 2000.0, 1500.0, 0.0]), np.array([1, 0, 1, 1])
    )
    assert table.dense[1, col["item_events_7d"]] == 1  # unchanged
    row = grown.dense[1]
    assert row[col["item_events_7d"]] == 3 and row[col["item_positives_7d"]] == 2
    assert row[col["item_ctr_7d"]] == pytest.approx(
        (2 + RATE_PRIOR_STRENGTH * prior) / (3 + RATE_PRIOR_STRENGTH)
    )
    assert row[col["item_positives_30d"]] == 2 and row[col["popularity"]] == pytest.approx(np.log1p(2))
    score, at = trending_update(1.0, 0.0, 1000.0)  # the online store's push, event by event
    assert row[col["trending_score"]] == pytest.approx(score, rel=1e-5) and grown.trending_updated_at[1] == at
    assert grown.dense[0].tolist() == table.dense[0].tolist()  # untouched rows stay


def test_trending_with_events_is_copy_on_write() -> None:
    src = TrendingSource.from_events(3, [0], [100.0])
    hot = src.with_events([2, 2], [200.0, 200.0])
    assert hot.retrieve(UserContext(user_index=-1), 1)[0].tolist() == [2]
    assert src.retrieve(UserContext(user_index=-1), 1)[0].tolist() == [0]


def test_event_tail_reads_complete_lines_from_where_it_started(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from streamrec.data.event_tail import EventTail

    seg = tmp_path / "event_log" / "segments"
    seg.mkdir(parents=True)
    first = seg / "seg-1.jsonl"

    def line(item: int, kind: str = "click") -> bytes:
        rec = {
            "event_id": f"e{item}",
            "item_id": item,
            "event_type": kind,
            "timestamp": "2026-12-04T00:00:00+00:00",
        }
        return (json.dumps(rec) + "\n").encode()

    first.write_bytes(line(1))
    tail = EventTail(tmp_path, start="end")  # from the end: the first line is not news
    assert len(tail.read()) == 0
    with open(first, "ab") as fh:
        fh.write(line(2) + line(3, "view") + b'{"event_id": "torn", "item')
    got = tail.read()
    assert got.item_ids.tolist() == [2, 3] and got.labels.tolist() == [1, 0]
    with open(first, "ab") as fh:
        fh.write(b'_id": 4, "event_type": "click", "timestamp": "2026-12-04T00:00:00+00:00"}\n')
    (seg / "seg-2.jsonl").write_bytes(line(5) + b"not json\n")
    got = tail.read()
    assert got.item_ids.tolist() == [4, 5] and tail.bad_lines == 1
    assert EventTail(tmp_path, start="start").read().item_ids.tolist() == [1, 2, 3, 4, 5]
    (tmp_path / "event_log" / "exported.json").write_text(json.dumps({"seg-1.jsonl": len(line(1))}))
    assert EventTail(tmp_path).read_all().item_ids.tolist() == [2, 3, 4, 5]  # past the export
