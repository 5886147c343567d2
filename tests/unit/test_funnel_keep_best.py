"""Funnel.keep_best: what the ranker's cut hands to the re-ranker (unpublished items, fresh extras)."""

from __future__ import annotations

import numpy as np

from streamrec.funnel.core import Funnel
from streamrec.reranking import ItemMetadata, ReRankConfig, ReRanker
from streamrec.retrieval.config import RetrievalSettings

NOW = 1_800_000_000.0
OLD = NOW - 30 * 86400.0


def _funnel(published: np.ndarray, ranked: int, **rerank: object) -> Funnel:
    """keep_best reads only the settings and the re-ranker: a funnel with just those."""
    n = published.size
    meta = ItemMetadata(
        item_ids=np.arange(n) + 100,
        categories=np.full(n, -1),
        creators=np.arange(n),
        published_at=published,
        exposure=np.full(n, 1e6),
    )
    f = Funnel.__new__(Funnel)
    f.settings = RetrievalSettings(ranked=ranked)
    f.reranker = ReRanker(meta, ReRankConfig.model_validate({"freshness": {"enabled": False}, **rerank}))
    return f


def test_the_cut_reaches_past_unpublished_items_so_the_reranker_keeps_enough() -> None:
    published = np.full(10, OLD)
    published[[0, 2]] = NOW + 3600.0  # scheduled: the two best-scored items
    f = _funnel(published, ranked=4)
    scores = np.linspace(1.0, 0.1, 10)
    items = np.arange(10, dtype=np.int64)
    keep = f.keep_best(scores, 0, items, NOW)
    assert keep.tolist() == [0, 1, 2, 3, 4, 5]  # four servable ones, and the two it will remove
    res = f.reranker.rerank_arrays(items[keep], scores[keep], k=4, now=NOW)
    assert [it.item_index for it in res.items] == [1, 3, 4, 5]
    assert res.summary.removed_unpublished == 2
    # Once published, or with the rule off, the cut is the plain one.
    assert f.keep_best(scores, 0, items, NOW + 3600.0).tolist() == [0, 1, 2, 3]
    assert _funnel(published, 4, hide_unpublished=False).keep_best(scores, 0, items, NOW).tolist() == [
        0,
        1,
        2,
        3,
    ]
    # Without rows or a time there is nothing to look up.
    assert f.keep_best(scores, 0).tolist() == [0, 1, 2, 3]


def test_fewer_servable_items_than_the_cut_keeps_everything() -> None:
    published = np.full(5, NOW + 60.0)
    published[4] = OLD
    f = _funnel(published, ranked=3)
    keep = f.keep_best(np.arange(5, 0, -1, dtype=np.float64), 0, np.arange(5, dtype=np.int64), NOW)
    assert keep.tolist() == [0, 1, 2, 3, 4]


def test_fresh_items_below_the_cut_still_join_and_unpublished_ones_do_not() -> None:
    published = np.full(8, OLD)
    published[6] = NOW - 3600.0  # fresh, below the cut
    published[7] = NOW + 3600.0  # scheduled, below the cut: never fresh
    f = _funnel(published, ranked=3, freshness={"enabled": True, "min_items": 2, "window_hours": 48})
    keep = f.keep_best(np.linspace(1.0, 0.2, 8), 0, np.arange(8, dtype=np.int64), NOW)
    assert keep.tolist() == [0, 1, 2, 6]


def test_rows_the_metadata_does_not_hold_yet_do_not_count_towards_the_cut() -> None:
    """A retriever replica may hand over rows appended a moment before this replica has them."""
    published = np.full(10, OLD)
    published[0] = NOW + 3600.0
    for rule in (True, False):
        f = _funnel(published, ranked=4, hide_unpublished=rule)
        items = np.array([0, 10, 11, 1, 2, 3, 4, 5], dtype=np.int64)
        keep = f.keep_best(np.linspace(1.0, 0.1, 8), 0, items, NOW)
        servable = [int(r) for r in items[keep] if r < 10 and (not rule or published[r] <= NOW)]
        assert len(servable) == 4, (rule, items[keep].tolist())
