"""Retrieval sources, FAISS index, merge."""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from streamrec.errors import CorruptCheckpointError, ModelError
from streamrec.evaluation.baselines import ALSConfig
from streamrec.evaluation.split import interaction_matrix
from streamrec.retrieval.affinity import AffinityConfig, AffinitySource, category_matrix, encode_categories
from streamrec.retrieval.base import UserContext, csr_rows_dot, csr_rows_sum, top_n
from streamrec.retrieval.cf import CFSource
from streamrec.retrieval.index import (
    AnnSource,
    IndexConfig,
    build_index,
    choose_kind,
    load_index,
    measure_recall,
    save_index,
)
from streamrec.retrieval.merge import merge_candidates
from streamrec.retrieval.trending import TrendingConfig, TrendingSource, to_epoch_seconds


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    faiss.omp_set_num_threads(1)


def rng_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ---------------------------------------------------------------- index


def test_index_kind_switches_by_size() -> None:
    cfg = IndexConfig(exact_threshold=1000, nprobe=4)
    assert choose_kind(999, cfg) == "flat"
    assert choose_kind(1000, cfg) == "ivf"
    assert build_index(rng_vectors(500, 8), config=cfg).kind == "flat"
    assert build_index(rng_vectors(2000, 8), config=cfg).kind == "ivf"
    assert choose_kind(10, IndexConfig(kind="hnsw")) == "hnsw"
    # Default threshold.
    assert choose_kind(19_999, IndexConfig()) == "flat" and choose_kind(20_000, IndexConfig()) == "ivf"


def test_ann_recall_on_30k_random_vectors() -> None:
    x = rng_vectors(30_000, 32)
    q = rng_vectors(200, 32, seed=1)
    index = build_index(x)  # auto: IVF, nprobe calibrated to recall 0.95 on item-vector queries
    assert index.kind == "ivf"
    assert measure_recall(index, x, q, 10) >= 0.9


def test_hnsw_kind_and_calibration() -> None:
    x = rng_vectors(5000, 16)
    hnsw = build_index(x, config=IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=40))
    assert hnsw.kind == "hnsw" and hnsw.search_params["ef_search"] >= 16
    assert measure_recall(hnsw, x, rng_vectors(100, 16, seed=3), 10) >= 0.9


def test_ivf_inner_product_scores_are_dot_products() -> None:
    x = rng_vectors(3000, 16) * np.linspace(0.2, 3.0, 3000, dtype=np.float32)[:, None]  # varied norms
    q = rng_vectors(5, 16, seed=2)
    index = build_index(x, "ip", IndexConfig(kind="ivf", nprobe=1000))  # nprobe >= nlist: exhaustive
    ids, scores = index.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, exact)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, axis=1), rtol=1e-4, atol=1e-4)


def test_index_save_load_and_corruption(tmp_path: Path) -> None:
    x = rng_vectors(2000, 8)
    index = build_index(x, config=IndexConfig(exact_threshold=1000, nprobe=7))
    target = save_index(index, tmp_path / "idx")
    loaded = load_index(target)
    assert (loaded.kind, loaded.metric, loaded.dim, len(loaded)) == ("ivf", "ip", 8, 2000)
    assert loaded.search_params == {"nprobe": 7}
    np.testing.assert_array_equal(loaded.search(x[:3], 5)[0], index.search(x[:3], 5)[0])
    save_index(index, target)  # overwrite in place works
    with pytest.raises(CorruptCheckpointError):
        load_index(tmp_path / "missing")
    (target / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(CorruptCheckpointError):
        load_index(target)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_over_a_subset_returns_item_ids(kind: str, tmp_path: Path) -> None:
    x = rng_vectors(3000, 8, seed=2)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5  # row r is item 7r + 5
    index = build_index(x, config=IndexConfig(kind=kind, nprobe=None if kind == "flat" else 64), ids=ids)
    got, scores = index.search(x[:4], 3)
    exact = np.argsort(-(x[:4] @ x.T), axis=1)[:, :3]
    np.testing.assert_array_equal(got[:, 0], ids[exact[:, 0]])
    np.testing.assert_allclose(scores[:, 0], (x[:4] * x[exact[:, 0]]).sum(axis=1), rtol=1e-4)
    loaded = load_index(save_index(index, tmp_path / "sub"))
    np.testing.assert_array_equal(loaded.search(x[:4], 3)[0], got)
    with pytest.raises(ModelError, match="one id per row"):
        build_index(x, ids=ids[:-1])


def test_build_index_rejects_bad_vectors() -> None:
    with pytest.raises(ModelError):
        build_index(np.empty((0, 4), np.float32))
    bad = rng_vectors(10, 4)
    bad[3, 1] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        build_index(bad)


def test_ann_source_query_resolution_and_seen_filter() -> None:
    items = np.eye(4, dtype=np.float32)
    users = np.array([[1.0, 0.5, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    seen = interaction_matrix([0], [0], 2, 4)
    src = AnnSource(build_index(items), users, seen=seen)
    got, scores = src.retrieve(0, 2)
    np.testing.assert_array_equal(got, [1, 2])  # item 0 is seen
    assert got.dtype == np.int64 and scores.dtype == np.float32
    assert src.retrieve(-1, 3)[0].size == 0  # unknown user, no vector
    ctx = UserContext(query_vector=np.array([0, 0, 1.0, 0], np.float32))
    assert src.retrieve(ctx, 1)[0][0] == 2


# ---------------------------------------------------------------- CF


def test_cf_source_known_and_cold_users() -> None:
    # Two taste groups: users 0-19 like items 0-9, users 20-39 like items 10-19.
    rng = np.random.default_rng(0)
    u, i = [], []
    for user in range(40):
        base = 0 if user < 20 else 10
        for it in rng.choice(10, 6, replace=False) + base:
            u.append(user)
            i.append(it)
    train = interaction_matrix(u, i, 40, 20)
    src = CFSource.fit(train, ALSConfig(factors=4, iterations=10, num_threads=1))
    got, _ = src.retrieve(25, 4)
    assert set(got) <= set(range(10, 20)) and not set(got) & set(train[25].indices)
    assert src.retrieve(-1, 5)[0].size == 0  # unknown, no history
    cold = src.retrieve(UserContext(recent_items=np.array([0, 1, 2])), 4)[0]
    assert set(cold) <= set(range(3, 10))  # same group, recent items excluded


def test_cf_source_indexes_only_items_with_factors() -> None:
    # Items 20-29 have no interactions: ALS gives them zero factors, which no user can score
    # above 0, so the index leaves them out and retrieval equals exact search over every item.
    rng = np.random.default_rng(1)
    u = rng.integers(0, 60, 400)
    i = rng.integers(0, 20, 400)
    train = interaction_matrix(u, i, 60, 30)
    src = CFSource.fit(train, ALSConfig(factors=4, iterations=8, num_threads=1))
    factors = src.model.item_factors
    assert not np.any(factors[20:])
    assert len(src.index) == int(np.any(factors != 0, axis=1).sum()) <= 20
    for user in (0, 7, 33):
        got, scores = src.retrieve(user, 5)
        full = factors @ src.model.user_factors[user]
        full[train[user].indices] = -np.inf
        expect = np.argsort(-full, kind="stable")[:5]
        np.testing.assert_allclose(np.sort(scores)[::-1], full[expect], rtol=1e-4)
        assert set(got) <= set(range(20))


def test_csr_row_helpers_match_scipy() -> None:
    rng = np.random.default_rng(3)
    m = sp.random(50, 7, density=0.3, format="csr", random_state=4, dtype=np.float32)
    m.data[m.indptr[5] : m.indptr[6]] = 0  # an empty row
    m.eliminate_zeros()
    rows = np.array([5, 1, 1, 49, 0])  # empty row and a repeat included
    np.testing.assert_allclose(csr_rows_sum(m, rows), np.asarray(m[rows].sum(axis=0)).ravel(), rtol=1e-6)
    vec = rng.standard_normal(7).astype(np.float32)
    np.testing.assert_allclose(csr_rows_dot(m, rows, vec), m[rows] @ vec, rtol=1e-5, atol=1e-6)
    assert csr_rows_sum(m, np.empty(0, np.int64)).tolist() == [0.0] * 7
    assert csr_rows_dot(m, [], vec).size == 0


# ---------------------------------------------------------------- affinity


def test_affinity_cold_user_gets_prior_and_history_shifts_it() -> None:
    # 6 items: 0-2 in category 0 (popular), 3-5 in category 1.
    cats = [[0], [0], [0], [1], [1], [1]]
    u = [0, 0, 0, 1, 1, 1, 2, 2, 3]
    i = [0, 1, 2, 0, 1, 2, 3, 4, 0]
    train = interaction_matrix(u, i, 4, 6)
    src = AffinitySource(train, cats, AffinityConfig(prior_strength=2.0))
    prior = src.preferences(-1)
    # Population shares: category 0 has 7 of 9 interactions.
    np.testing.assert_allclose(prior, [7 / 9, 2 / 9], rtol=1e-5)
    cold, scores = src.retrieve(-1, 6)
    assert cold.size == 6 and set(cold[:3]) == {0, 1, 2}
    assert np.all(np.diff(scores) <= 0)
    # User 2 (2 interactions in category 1): theta = (0 + 2*7/9, 2 + 2*2/9) / 4.
    np.testing.assert_allclose(src.preferences(2), [(2 * 7 / 9) / 4, (2 + 2 * 2 / 9) / 4], rtol=1e-5)
    # Item 5 (category 1, least popular) overtakes the category-0 runners-up for user 2,
    # while a cold user ranks it last; user 2's own items 3 and 4 are never returned.
    got = src.retrieve(2, 6)[0].tolist()
    assert got.index(5) < got.index(1) and got.index(5) < got.index(2) and not {3, 4} & set(got)
    assert cold.tolist()[-1] == 5
    # A cold user with session history in category 1 moves towards it.
    assert src.preferences(UserContext(recent_items=np.array([3, 4, 5])))[1] > prior[1]


def test_category_helpers() -> None:
    codes, labels = encode_categories([["Drama", "Comedy"], ["Drama"], []])
    assert labels == ["Comedy", "Drama"] and codes == [[1, 0], [1], []]
    m = category_matrix(codes)
    np.testing.assert_allclose(m.toarray(), [[0.5, 0.5], [0, 1], [0, 0]])


# ---------------------------------------------------------------- trending


def test_trending_decays_with_half_life() -> None:
    hour = 3600.0
    src = TrendingSource(3, TrendingConfig(half_life_hours=1.0))
    # Item 0: 3 events 3 hours ago; item 1: 1 event now; item 2: 1 event 1 hour ago.
    src.add([0, 0, 0, 1, 2], [0, 0, 0, 3 * hour, 2 * hour])
    v = src.velocity()
    assert v[0] == pytest.approx(3 * 0.125 * math.log(2))
    assert v[1] == pytest.approx(1 * math.log(2))
    assert v[2] == pytest.approx(0.5 * math.log(2))
    np.testing.assert_array_equal(src.retrieve(-1, 3)[0], [1, 2, 0])
    # One half-life later every velocity halves; the order is unchanged.
    np.testing.assert_allclose(src.velocity(now=4 * hour), v / 2, rtol=1e-6)
    # A burst on item 0 now makes it trend again (streaming update).
    src.add([0, 0], [3 * hour, 3 * hour])
    assert src.retrieve(-1, 1)[0][0] == 0


def test_trending_filters_seen_and_accepts_datetimes() -> None:
    seen = interaction_matrix([0], [1], 1, 3)
    src = TrendingSource.from_events(
        3,
        [1, 1, 2],
        np.array(["2026-01-01T00:00", "2026-01-01T00:00", "2026-01-01T00:00"], "datetime64[s]"),
        seen=seen,
    )
    assert src.retrieve(0, 3)[0].tolist() == [2]  # item 1 seen, item 0 has no events
    assert src.retrieve(-1, 3)[0].tolist() == [1, 2]
    assert to_epoch_seconds(np.datetime64("1970-01-01T00:01:00"))[0] == 60.0


# ---------------------------------------------------------------- merge


def test_merge_dedupes_bonuses_and_records_provenance() -> None:
    results = {
        "ann": (np.array([1, 2, 3]), np.array([0.9, 0.5, 0.1], np.float32)),
        "cf": (np.array([3, 4]), np.array([10.0, 0.0], np.float32)),
        "trending": (np.array([], np.int64), np.array([], np.float32)),
    }
    m = merge_candidates(results, n=10, agreement_bonus=0.5)
    # Normalised: ann 1->1.0, 2->0.5, 3->0.0; cf 3->1.0, 4->0.0; item 3 in two sources: 1.0 + 0.5.
    assert m.items.tolist() == [3, 1, 2, 4]
    np.testing.assert_allclose(m.scores, [1.5, 1.0, 0.5, 0.0], rtol=1e-6)
    prov = m.provenance()
    assert prov == [["ann", "cf"], ["ann"], ["ann"], ["cf"]]
    assert prov[1] is prov[2]  # one shared list per distinct source set
    assert m.n_sources.tolist() == [2, 1, 1, 1]
    assert m.from_source("cf").tolist() == [True, False, False, True]
    # Cut to n, no duplicates.
    top2 = merge_candidates(results, n=2, agreement_bonus=0.5)
    assert top2.items.tolist() == [3, 1]
    # Without the bonus the tie at 1.0 breaks towards the lower item index.
    assert merge_candidates(results, n=2, agreement_bonus=0.0).items.tolist() == [1, 3]


def test_merge_weights_rank_normalisation_and_edge_cases() -> None:
    results = {"a": ([5, 6], [3.0, 3.0]), "b": ([7], [1.0])}
    # Constant scores normalise to 1.0; weights scale them.
    m = merge_candidates(results, 5, weights={"a": 0.5})
    assert m.items.tolist() == [7, 5, 6] and m.scores.tolist() == [1.0, 0.5, 0.5]
    r = merge_candidates({"a": ([9, 8, 7, 6], [4.0, 3.0, 2.0, 1.0])}, 4, normalisation="rank")
    np.testing.assert_allclose(r.scores, [1.0, 0.75, 0.5, 0.25])
    assert len(merge_candidates({}, 10)) == 0
    assert len(merge_candidates({"a": ([1], [1.0])}, 0)) == 0
    # A duplicate within a source keeps its best score and counts once.
    d = merge_candidates({"a": ([1, 1, 2], [3.0, 1.0, 2.0])}, 5, agreement_bonus=1.0)
    assert d.items.tolist() == [1, 2] and d.n_sources.tolist() == [1, 1]
    with pytest.raises(ValueError):
        merge_candidates({"a": ([1, 2], [1.0])}, 5)


def test_merge_many_candidates_is_consistent() -> None:
    rng = np.random.default_rng(0)
    results = {
        f"s{j}": (rng.choice(1000, 150, replace=False), np.sort(rng.random(150))[::-1].astype(np.float32))
        for j in range(4)
    }
    m = merge_candidates(results, n=300)
    assert len(m) == 300 and np.unique(m.items).size == 300
    assert np.all(np.diff(m.scores) <= 0)
    for name, (items, _) in results.items():
        np.testing.assert_array_equal(m.from_source(name), np.isin(m.items, items))


def test_top_n_helper() -> None:
    items, scores = top_n(np.array([0.1, -np.inf, 0.3, 0.3]), 3)
    assert items.tolist() == [2, 3, 0] and scores.dtype == np.float32
    assert top_n(np.array([1.0]), 0)[0].size == 0
    assert sp.issparse(interaction_matrix([0], [0], 1, 1))
