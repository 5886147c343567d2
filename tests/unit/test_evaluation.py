"""Offline evaluation: split, metrics (against hand-computed values), baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from streamrec.errors import DataError, ModelError, TrainingDataError
from streamrec.evaluation.baselines import (
    ALS,
    BPR,
    ALSConfig,
    BPRConfig,
    ItemKNN,
    MostPopular,
    Recommender,
    compare,
    evaluate_recommender,
)
from streamrec.evaluation.metrics import (
    candidate_recall,
    coverage_at_k,
    hit_rate_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    topk_items,
)
from streamrec.evaluation.split import IdMap, TemporalSplit, interaction_matrix, temporal_split


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    u = [r for r, items in enumerate(rows) for _ in items]
    i = [x for items in rows for x in items]
    return interaction_matrix(u, i, len(rows), n_items)


# ---------------------------------------------------------------- IdMap


def test_idmap_roundtrip_and_unknown() -> None:
    m = IdMap.fit([30, 10, 20, 10])
    assert len(m) == 3
    np.testing.assert_array_equal(m.to_index([10, 20, 30, 99, -5]), [0, 1, 2, -1, -1])
    np.testing.assert_array_equal(m.to_raw([2, 0]), [30, 10])
    assert m.to_index(20) == 1
    with pytest.raises(IndexError):
        m.to_raw([3])
    empty = IdMap.fit([])
    np.testing.assert_array_equal(empty.to_index([1, 2]), [-1, -1])


# ---------------------------------------------------------------- split


def frame(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"])


def random_interactions(seed: int = 0, n: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(100, 160, n),
            "item_id": rng.integers(1000, 1200, n),
            "timestamp": pd.Timestamp("2026-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 90 * 86400, n), unit="s"),
            "label": (rng.random(n) < 0.7).astype(np.int8),
        }
    )


def test_split_has_no_leakage() -> None:
    df = random_interactions()
    s = temporal_split(df, quantile=0.75)
    assert (s.train["timestamp"] < s.cutoff).all()
    assert (s.test["timestamp"] >= s.cutoff).all()
    assert (s.test["label"] > 0).all()
    # Test users/items are known from training; no test pair was already seen in training.
    assert set(s.test["user_id"]) <= set(s.train["user_id"])
    assert set(s.test["item_id"]) <= set(s.train["item_id"])
    seen = set(zip(s.train["user_idx"], s.train["item_idx"], strict=True))
    assert not seen & set(zip(s.test["user_idx"], s.test["item_idx"], strict=True))
    assert not s.test.duplicated(["user_idx", "item_idx"]).any()
    # Every row is accounted for.
    st = s.stats
    assert st["train_rows"] + st["after_cutoff_rows"] == len(df)
    assert (
        st["test_rows"]
        + st["dropped_unknown_user_or_item"]
        + st["dropped_duplicate_pairs"]
        + st["dropped_seen_in_train"]
        == st["after_cutoff_positives"]
    )
    # Matrices are in the train index space.
    assert s.train_matrix().shape == s.test_matrix().shape == (s.n_users, s.n_items)
    assert s.test_matrix().nnz == len(s.test)


def test_split_explicit_cutoff_and_hand_example() -> None:
    df = frame(
        [
            (1, 10, 1, 1),
            (1, 11, 2, 1),
            (2, 10, 3, 0),
            (2, 12, 4, 1),
            (1, 12, 5, 1),  # test
            (1, 12, 6, 1),  # duplicate pair
            (1, 10, 7, 1),  # already seen in train
            (2, 11, 8, 0),  # negative
            (3, 10, 9, 1),  # unknown user
            (2, 99, 9, 1),  # unknown item
            (2, 11, 9, 1),  # test
        ]
    )
    s = temporal_split(df, cutoff=5)
    assert s.cutoff == 5 and len(s.train) == 4
    assert sorted(zip(s.test["user_id"], s.test["item_id"], strict=True)) == [(1, 12), (2, 11)]
    assert s.stats["dropped_unknown_user_or_item"] == 2
    assert s.stats["dropped_duplicate_pairs"] == 1
    assert s.stats["dropped_seen_in_train"] == 1
    # Positives only in the training matrix: user 2's negative on item 10 is absent.
    tm = s.train_matrix().toarray()
    assert tm[s.users.to_index(2), s.items.to_index(10)] == 0
    assert s.train_matrix(positives_only=False).toarray()[s.users.to_index(2), s.items.to_index(10)] == 1


def test_split_errors() -> None:
    with pytest.raises(DataError, match="lacks column"):
        temporal_split(pd.DataFrame({"user_id": [1]}))
    with pytest.raises(TrainingDataError, match="empty"):
        temporal_split(frame([]))
    df = frame([(1, 10, 5, 1), (1, 11, 6, 1)])
    with pytest.raises(TrainingDataError, match="training window"):
        temporal_split(df, cutoff=1)
    with pytest.raises(TrainingDataError, match="no positive"):
        temporal_split(frame([(1, 10, 1, 0), (1, 11, 6, 1)]), cutoff=5)
    with pytest.raises(TrainingDataError, match="test window"):
        temporal_split(df, cutoff=100)
    with pytest.raises(DataError, match="quantile"):
        temporal_split(df, quantile=1.5)


# ---------------------------------------------------------------- metrics


def test_metrics_hand_computed() -> None:
    # User 0: relevant {1, 3}; ranking [1, 2, 3] -> hits at ranks 1 and 3.
    # User 1: relevant {4};    ranking [0, 2, 5] -> no hit.
    # User 2: no relevant items -> ignored by the averages.
    ranked = np.array([[1, 2, 3], [0, 2, 5], [0, 1, 2]])
    truth = csr([[1, 3], [4], []], n_items=6)
    k = 3
    dcg0 = 1 / math.log2(2) + 1 / math.log2(4)
    idcg0 = 1 / math.log2(2) + 1 / math.log2(3)
    assert recall_at_k(ranked, truth, k) == pytest.approx((1.0 + 0.0) / 2)
    assert ndcg_at_k(ranked, truth, k) == pytest.approx((dcg0 / idcg0 + 0.0) / 2)
    assert hit_rate_at_k(ranked, truth, k) == pytest.approx(0.5)
    # At K=1: user 0 hits (recall 1/2, ndcg 1), user 1 misses.
    m = ranking_metrics(ranked, truth, ks=(1, 3))
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["ndcg@1"] == pytest.approx(0.5)
    assert m["n_users"] == 2
    # Coverage over evaluated users: {1,2,3,0,5} of 6 items at K=3.
    assert m["coverage@3"] == pytest.approx(5 / 6)
    assert coverage_at_k(ranked, 6, 1) == pytest.approx(2 / 6)  # all rows: {1, 0}


def test_metrics_padding_and_errors() -> None:
    ranked = np.array([[2, -1, -1]])
    truth = csr([[2, 0]], n_items=3)
    m = ranking_metrics(ranked, truth, ks=(3,))
    assert m["recall@3"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx(1.0 / (1 + 1 / math.log2(3)))
    with pytest.raises(TrainingDataError):
        ranking_metrics(ranked, csr([[]], 3), ks=(1,))
    with pytest.raises(ValueError, match="depth"):
        ranking_metrics(ranked, truth, ks=(5,))


def test_topk_items_masks_seen_and_pads() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    seen = csr([[1], [0, 1, 2]], n_items=4)
    top = topk_items(scores, 3, seen)
    np.testing.assert_array_equal(top[0], [3, 2, 0])
    np.testing.assert_array_equal(top[1], [3, -1, -1])
    # Ties break towards the lower index; k larger than the catalogue pads.
    np.testing.assert_array_equal(topk_items(scores[:1], 6)[0], [1, 3, 2, 0, -1, -1])


def test_candidate_recall() -> None:
    cands = [np.array([5, 1, 1, 7]), np.array([2]), np.array([], dtype=np.int64)]
    test_items = [np.array([1, 2]), np.array([3]), np.array([4])]
    # user 0: {1} of {1,2} = 0.5; user 1: 0; user 2: 0.
    assert candidate_recall(cands, test_items) == pytest.approx(0.5 / 3)
    # Truncation at n=1: user 0 keeps only [5] -> 0.
    assert candidate_recall(cands, test_items, n=1) == pytest.approx(0.0)
    # Sparse truth and 2-D padded candidates give the same answer; users without truth are skipped.
    padded = np.array([[5, 1, 7], [2, -1, -1], [-1, -1, -1], [0, 1, 2]])
    truth = csr([[1, 2], [3], [4], []], n_items=8)
    assert candidate_recall(padded, truth) == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError):
        candidate_recall(padded[:2], truth)


# ---------------------------------------------------------------- baselines


@pytest.fixture
def toy_train() -> sp.csr_matrix:
    rng = np.random.default_rng(1)
    n_users, n_items = 80, 40
    # Item popularity falls with the index; a few users are dense.
    p = 1.0 / np.arange(1, n_items + 1)
    rows = [
        rng.choice(n_items, size=rng.integers(3, 12), replace=False, p=p / p.sum()) for _ in range(n_users)
    ]
    return csr([list(r) for r in rows], n_items)


def test_most_popular_gives_popular_items(toy_train: sp.csr_matrix) -> None:
    mp = MostPopular().fit(toy_train)
    counts = np.asarray(toy_train.sum(axis=0)).ravel()
    expected = np.lexsort((np.arange(counts.size), -counts))[:5]
    np.testing.assert_array_equal(mp.recommend([0], 5, exclude_seen=False)[0], expected)
    # With seen-item masking, the user's own items never appear.
    recs = mp.recommend(np.arange(toy_train.shape[0]), 10)
    for u, row in enumerate(recs):
        assert not set(row) & set(toy_train[u].indices)


@pytest.mark.parametrize(
    "model",
    [
        MostPopular(),
        ItemKNN(neighbours=10),
        ALS(ALSConfig(factors=8, iterations=5, num_threads=1)),
        BPR(BPRConfig(factors=8, iterations=10, num_threads=1)),
    ],
    ids=lambda m: m.name,
)
def test_baselines_share_the_interface(model: Recommender, toy_train: sp.csr_matrix) -> None:
    assert isinstance(model, Recommender)
    model.fit(toy_train)
    recs = model.recommend([0, 5, 7], 10)
    assert recs.shape == (3, 10) and recs.dtype == np.int64
    for u, row in zip([0, 5, 7], recs, strict=True):
        valid = row[row >= 0]
        assert len(set(valid)) == valid.size
        assert not set(valid) & set(toy_train[u].indices)
    res = evaluate_recommender(model, toy_train, ks=(5,), exclude_seen=False)
    assert 0.0 <= res["recall@5"] <= 1.0 and res["n_users"] == toy_train.shape[0]


def test_item_knn_similarity_is_cosine() -> None:
    # Items 0 and 1 share both users, item 2 shares one user with item 0.
    train = csr([[0, 1, 2], [0, 1], [3]], n_items=4)
    knn = ItemKNN(neighbours=3).fit(train)
    sim = knn.similarity.toarray()
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(2 * 2))
    assert sim[0, 2] == pytest.approx(1 / math.sqrt(2 * 1))
    assert sim[0, 0] == 0 and sim[0, 3] == 0
    np.testing.assert_allclose(knn.score_history([1]), sim[1])


def test_item_knn_keeps_each_items_k_most_similar_as_a_dense_computation_would() -> None:
    rng = np.random.default_rng(3)
    train = sp.csr_matrix((rng.random((60, 45)) < 0.12).astype(np.float32))
    x = train.toarray()
    norms = np.sqrt(x.sum(axis=0))
    for k, shrink in ((5, 0.0), (3, 2.0), (100, 0.0)):
        dense = (x.T @ x) / (np.outer(norms, norms) + shrink + 1e-30)
        np.fill_diagonal(dense, 0.0)
        got = ItemKNN(neighbours=k, shrink=shrink, block=7).fit(train).similarity.toarray()
        for i in range(x.shape[1]):
            row = dense[i][dense[i] > 0]
            want = np.sort(row)[::-1][:k]
            np.testing.assert_allclose(np.sort(got[i][got[i] > 0])[::-1], want, rtol=1e-5)
            kept = np.flatnonzero(got[i])
            np.testing.assert_allclose(got[i, kept], dense[i, kept], rtol=1e-5)  # values, not just ranks
            if len(row) > k:  # equal similarities at the cut: the lower item index is kept
                cut = want[-1]
                tied = np.flatnonzero(np.isclose(dense[i], cut))
                chosen = np.intersect1d(tied, kept)
                assert list(chosen) == list(tied[: len(chosen)])


def test_als_fold_in_reproduces_trained_factors(toy_train: sp.csr_matrix) -> None:
    als = ALS(ALSConfig(factors=8, iterations=10, num_threads=1)).fit(toy_train)
    u = 3
    folded = als.fold_in(toy_train[u].indices)
    # One more exact half-step from converged item factors lands close to the trained vector.
    cos = folded @ als.user_factors[u] / (np.linalg.norm(folded) * np.linalg.norm(als.user_factors[u]))
    assert cos > 0.95
    assert np.all(als.fold_in([]) == 0)


def test_errors_for_unfitted_and_empty() -> None:
    with pytest.raises(ModelError, match="not fitted"):
        MostPopular().recommend([0], 5)
    with pytest.raises(TrainingDataError):
        MostPopular().fit(sp.csr_matrix((3, 4), dtype=np.float32))
    with pytest.raises(TrainingDataError):
        evaluate_recommender(MostPopular().fit(csr([[0]], 2)), sp.csr_matrix((1, 2)))


def test_compare_table(toy_train: sp.csr_matrix) -> None:
    rows = compare([MostPopular(), ItemKNN(neighbours=10)], toy_train, toy_train, ks=(5,))
    assert [r["method"] for r in rows] == ["most_popular", "item_knn"]
    assert {"fit_s", "recall@5", "ndcg@5", "hit_rate@5", "coverage@5", "n_users"} <= rows[0].keys()


# ---------------------------------------------------------------- ML-100K


def ml100k_split(path: Path) -> TemporalSplit:
    from streamrec.data.movielens import load_ml100k

    events = load_ml100k(path).events
    # Implicit feedback: every rating is an interaction ("watched"), the usual top-N protocol.
    events = events.assign(label=np.int8(1))
    return temporal_split(events, quantile=0.8)


def test_als_beats_most_popular_on_ml100k(ml100k: Path) -> None:
    s = ml100k_split(ml100k)
    train, test = s.train_matrix(), s.test_matrix()
    rows = compare([MostPopular(), ALS(ALSConfig(num_threads=1))], train, test, ks=(10,))
    pop, als = rows
    assert s.stats["test_users"] > 50
    assert als["ndcg@10"] > pop["ndcg@10"], rows
    assert als["coverage@10"] > pop["coverage@10"]
