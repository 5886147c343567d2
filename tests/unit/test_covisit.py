"""Co-visitation retrieval: counts, popularity normalisation, seeds, exclusion, bundle, new items, funnel."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from streamrec.errors import CorruptCheckpointError, TrainingDataError
from streamrec.retrieval.base import UserContext
from streamrec.retrieval.covisit import CovisitConfig, CovisitSource, covisit_counts, top_neighbours

# Three users' positives (user, item, time in seconds):
#   user 0: items 0, 1, 2 at t = 1, 2, 3
#   user 1: items 0, 1    at t = 1, 2
#   user 2: items 3, 0    at t = 1, 2
USERS = [0, 0, 0, 1, 1, 2, 2]
ITEMS = [0, 1, 2, 0, 1, 3, 0]
TIMES = [1.0, 2.0, 3.0, 1.0, 2.0, 1.0, 2.0]
# Popularity n_i: item 0 three positives, item 1 two, items 2 and 3 one each, item 4 none.


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    faiss.omp_set_num_threads(1)


def _source(**overrides: float) -> CovisitSource:
    cfg = CovisitConfig(**{"window": 2, "neighbours": 2, "profile_weight": 0.0, **overrides})
    return CovisitSource.fit(USERS, ITEMS, TIMES, 5, cfg)


def test_counts_pairs_within_the_window_in_each_users_time_order() -> None:
    # Window 1: adjacent events only. Pairs (0,1) x2, (1,2), (3,0); symmetric, zero diagonal.
    expected = np.zeros((5, 5), np.float32)
    for a, b, c in [(0, 1, 2), (1, 2, 1), (0, 3, 1)]:
        expected[a, b] = expected[b, a] = c
    np.testing.assert_array_equal(covisit_counts(USERS, ITEMS, TIMES, 5, window=1).toarray(), expected)
    # Window 2 adds user 0's (0, 2); input order does not matter, time order does.
    shuffled = np.random.default_rng(0).permutation(len(USERS))
    c2 = covisit_counts(
        np.take(USERS, shuffled), np.take(ITEMS, shuffled), np.take(TIMES, shuffled), 5, window=2
    )
    assert c2[0, 2] == 1.0 and c2[2, 0] == 1.0 and c2[0, 1] == 2.0


def test_a_time_window_splits_sessions() -> None:
    # User 0's items 1 and 2 are 5 h apart: with a 1 h window they no longer co-visit.
    c = covisit_counts([0, 0, 0], [0, 1, 2], [0.0, 600.0, 600.0 + 5 * 3600], 3, window=5, window_hours=1.0)
    assert c[0, 1] == 1.0 and c[1, 2] == 0.0 and c[0, 2] == 0.0


def test_counts_refuse_arrays_of_different_lengths() -> None:
    with pytest.raises(TrainingDataError, match="differ in length"):
        covisit_counts([0, 1], [0], [0.0, 1.0], 2, window=1)


def test_neighbours_are_popularity_normalised_and_cut_best_first() -> None:
    nb = _source().neighbours
    # Cosine: c_ij / sqrt(n_i n_j). Item 0 (n=3): item 1 2/sqrt(6); items 2 and 3 tie at 1/sqrt(3),
    # the lower index wins the second of two slots.
    assert nb.indices[nb.indptr[0] : nb.indptr[1]].tolist() == [1, 2]
    np.testing.assert_allclose(
        nb.data[nb.indptr[0] : nb.indptr[1]], [2 / np.sqrt(6), 1 / np.sqrt(3)], rtol=1e-6
    )
    assert nb.indices[nb.indptr[1] : nb.indptr[2]].tolist() == [0, 2]  # 2/sqrt(6) > 1/sqrt(2)
    np.testing.assert_allclose(
        nb.data[nb.indptr[1] : nb.indptr[2]], [2 / np.sqrt(6), 1 / np.sqrt(2)], rtol=1e-6
    )
    assert nb.indptr[5] - nb.indptr[4] == 0  # never co-visited: no neighbours
    # Exponent 1 (lift) lets the rarer item 2 overtake the popular item 0 as item 1's neighbour.
    lift = _source(popularity_exponent=1.0).neighbours
    assert lift.indices[lift.indptr[1] : lift.indptr[2]].tolist() == [2, 0]
    np.testing.assert_allclose(lift.data[lift.indptr[1] : lift.indptr[2]], [1 / 2, 2 / 6], rtol=1e-6)


def test_top_neighbours_keeps_each_rows_best_entries() -> None:
    m = sp.csr_matrix(np.array([[0, 3, 1, 2], [5, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], np.float32))
    top = top_neighbours(m, 2)
    assert [top.indices[top.indptr[r] : top.indptr[r + 1]].tolist() for r in range(4)] == [
        [1, 3],
        [0],
        [],
        [0, 1],
    ]


def test_scores_sum_seed_weights_times_similarity_and_skip_the_history() -> None:
    src = _source()
    # History [1, 0] (most recent first): weights 1 and 0.9. Item 2 = 1/sqrt(2) + 0.9/sqrt(3).
    items, scores = src.retrieve(UserContext(history=np.array([1, 0])), 5)
    assert items.tolist() == [2]  # 0 and 1 are the user's own history
    np.testing.assert_allclose(scores, [1 / np.sqrt(2) + 0.9 / np.sqrt(3)], rtol=1e-6)
    # Seeds from recent_items when no history is given.
    assert src.retrieve(UserContext(recent_items=np.array([3])), 5)[0].tolist() == [0]


def test_seen_items_are_excluded_and_a_profile_seeds_known_users() -> None:
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]], np.float32))
    cfg = CovisitConfig(window=2, neighbours=2, profile_weight=0.5)
    src = CovisitSource.fit(USERS, ITEMS, TIMES, 5, cfg, seen=seen)
    items, _ = src.retrieve(UserContext(user_index=0, history=np.array([1])), 5)
    assert 0 not in items.tolist() and items.tolist() == [2]  # item 0 is user 0's training item
    # User 1 has no recent history; its training item 3 seeds at profile_weight.
    items, scores = src.retrieve(UserContext(user_index=1), 5)
    assert items.tolist() == [0]
    np.testing.assert_allclose(scores, [0.5 / np.sqrt(3)], rtol=1e-6)
    off = CovisitSource(src.neighbours, cfg.model_copy(update={"profile_weight": 0.0}), seen=seen)
    assert off.retrieve(UserContext(user_index=1), 5)[0].size == 0


def test_no_history_means_no_candidates() -> None:
    src = _source()
    for ctx in (
        UserContext(),
        UserContext(user_index=-1, history=np.empty(0, np.int64)),
        UserContext(user_index=7),
    ):
        items, scores = src.retrieve(ctx, 10)
        assert items.size == 0 and scores.size == 0 and items.dtype == np.int64
    assert src.retrieve(UserContext(history=np.array([4])), 10)[0].size == 0  # an item without neighbours


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    src = _source()
    src.save(tmp_path / "covisit.npz")
    back = CovisitSource.load(tmp_path / "covisit.npz", src.config)
    assert (back.neighbours != src.neighbours).nnz == 0
    ctx = UserContext(history=np.array([1, 3]))
    for a, b in zip(src.retrieve(ctx, 5), back.retrieve(ctx, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "bad.npz").write_bytes(b"not a matrix")
    with pytest.raises(CorruptCheckpointError, match="retrain"):
        CovisitSource.load(tmp_path / "bad.npz")
    wrong_seen = sp.csr_matrix((2, 3), dtype=np.float32)
    with pytest.raises(CorruptCheckpointError, match="same item table"):
        CovisitSource.load(tmp_path / "covisit.npz", seen=wrong_seen)


def test_new_items_have_no_neighbours_and_leave_the_source_alone() -> None:
    src = _source()
    grown = src.with_items(2)
    assert grown.n_items == 7 and src.n_items == 5
    assert grown.retrieve(UserContext(history=np.array([5, 6])), 5)[0].size == 0  # new: no neighbours
    ctx = UserContext(history=np.array([1, 0]))
    np.testing.assert_array_equal(grown.retrieve(ctx, 5)[0], src.retrieve(ctx, 5)[0])
    assert np.diff(grown.neighbours.indptr)[5:].tolist() == [0, 0]


def _funnel(covisit: bool, merged_sources: list[str] | None = None) -> object:
    """A real funnel over 5 items and the 3 users above (tiny two-tower, ALS, affinity, trending)."""
    import torch

    from streamrec.data.ids import IdMap
    from streamrec.evaluation.baselines import ALSConfig
    from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
    from streamrec.funnel.core import Funnel, RetrievalModels
    from streamrec.models.two_tower import TwoTowerModel
    from streamrec.ranking.features import USER_DENSE
    from streamrec.retrieval.affinity import AffinitySource
    from streamrec.retrieval.cf import CFSource
    from streamrec.retrieval.config import RetrievalSettings
    from streamrec.retrieval.index import build_index
    from streamrec.retrieval.trending import TrendingSource

    n = 5
    cats = [0, 0, 1, 1, 0]
    table = ItemFeatureTable(
        item_ids=np.arange(10, 10 + n, dtype=np.int64),
        dense=np.ones((n, len(DENSE_FEATURES)), np.float32),
        dense_names=DENSE_FEATURES,
        category_id=np.asarray(cats, np.int32),
        categories_indptr=np.arange(n + 1, dtype=np.int64),
        categories_indices=np.asarray(cats, np.int32),
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
    users = IdMap.fit(np.asarray(USERS) + 100)  # raw user ids 100, 101, 102
    train = sp.csr_matrix((np.ones(len(USERS), np.float32), (USERS, ITEMS)), shape=(3, n))
    train.sum_duplicates()
    torch.manual_seed(0)
    tt = TwoTowerModel(3, n, 2, len(USER_DENSE), 0, embedding_dim=8, id_embedding_dim=4,
                       category_embedding_dim=4, hidden_dims=(8,)).eval()  # fmt: skip
    onehot = np.eye(2, dtype=np.float32)[cats]
    with torch.inference_mode():
        vectors = tt.encode_items(onehot, np.zeros((n, 0), np.float32), np.arange(n))
    models = RetrievalModels(
        users,
        train,
        tt,
        vectors,
        build_index(vectors, "ip"),
        CFSource.fit(train, ALSConfig(factors=2, iterations=2, num_threads=1)),
        AffinitySource(train, [[c] for c in cats]),
        TrendingSource.from_events(n, ITEMS, TIMES, seen=train),
        CovisitSource.fit(USERS, ITEMS, TIMES, n, CovisitConfig(window=2), seen=train) if covisit else None,
    )
    return Funnel(models, table, None, RetrievalSettings(merged_sources=merged_sources))


def save_tiny_bundle(f: object, path: Path) -> dict[str, str]:
    """Save a funnel's models as a bundle (a tiny untrained DCN-V2 with the funnel's layout); its roles."""
    from streamrec.bundle import save_bundle
    from streamrec.evaluation.baselines import ALSConfig
    from streamrec.funnel.core import Funnel
    from streamrec.models.dcn import DCNv2

    assert isinstance(f, Funnel)
    m, layout = f.models, f.features.layout
    return save_bundle(
        path,
        users=m.users,
        train=m.train,
        two_tower=m.two_tower,
        item_vectors=m.item_vectors,
        tt_index=m.tt_index,
        cf=m.cf,
        covisit=m.covisit,
        ranker=DCNv2(len(layout.dense), layout.cardinalities, embedding_dim=4, deep_hidden=(8,)).eval(),
        table=f.table,
        settings=f.settings,
        als_config=ALSConfig(factors=2, iterations=2, num_threads=1),
        ranker_layout={"dense": list(layout.dense), "sparse": list(layout.sparse), "cards": list(layout.cardinalities)},
    )


def test_the_funnel_retrieves_merges_and_grows_the_source() -> None:
    from streamrec.funnel.core import SOURCE_NAMES, Funnel

    f = _funnel(covisit=True)
    assert isinstance(f, Funnel)
    assert f.source_names == (*SOURCE_NAMES, "covisit")
    assert "x_src_covisit" in f.features.layout.dense
    # User 101 (index 1) trained on items 0 and 1 (ids 10, 11) and just watched item 3 (id 13):
    # the history seeds item 0 (excluded: seen), item 2 comes from the profile.
    ctx = f.context(101, {"recent_item_ids": [13]}, now=10.0)
    items, scores = f.retrieve("covisit", ctx)
    assert items.tolist() == [2] and scores.size == 1
    parts = {s: f.retrieve(s, ctx) for s in f.source_names}
    merged, src = f.merge(parts)
    assert src.shape == (len(merged), len(f.source_names))
    col = f.source_names.index("covisit")
    assert set(merged.items[src[:, col] > 0].tolist()) == {2}
    assert "covisit" in merged.provenance()[merged.items.tolist().index(2)]
    # A catalogue item appended while serving: the source grows with the table, copy-on-write.
    grown = f.with_catalogue({99: {"categories": ["drama"], "published_at": 50}})
    assert grown.models.covisit is not None and grown.models.covisit.n_items == 6
    assert f.models.covisit is not None and f.models.covisit.n_items == 5
    assert grown.retrieve("covisit", grown.context(101, {"recent_item_ids": [99, 13]}, now=10.0))[
        0
    ].tolist() == [2]


def test_a_funnel_without_the_source_keeps_the_four_sources_layout() -> None:
    from streamrec.funnel.core import SOURCE_NAMES, Funnel

    f = _funnel(covisit=False)
    assert isinstance(f, Funnel)
    assert f.source_names == SOURCE_NAMES
    assert "x_src_covisit" not in f.features.layout.dense
    with pytest.raises(KeyError, match="unknown retrieval source 'covisit'"):
        f.retrieve("covisit", f.context(101, {}, now=10.0))


@pytest.mark.parametrize("covisit", [True, False])
def test_a_bundle_saves_the_source_and_serving_loads_it_with_the_rankers_layout(
    covisit: bool, tmp_path: Path
) -> None:
    from streamrec.bundle import LoadedBundle
    from streamrec.funnel.core import SOURCE_NAMES, Funnel
    from streamrec.models.scoring import RankerScorer

    f = _funnel(covisit=covisit)
    assert isinstance(f, Funnel)
    roles = save_tiny_bundle(f, tmp_path / "b")
    assert ("covisit" in roles) is covisit and (tmp_path / "b" / "covisit.npz").exists() is covisit
    b = LoadedBundle(tmp_path / "b")
    served = Funnel(b.retrieval_models(f.table, [], []), f.table, b.ranker, b.settings)
    assert served.source_names == ((*SOURCE_NAMES, "covisit") if covisit else SOURCE_NAMES)
    ctx = served.context(101, {"recent_item_ids": [13]}, now=10.0)
    if covisit:
        assert served.retrieve("covisit", ctx)[0].tolist() == f.retrieve("covisit", ctx)[0].tolist() == [2]
    # The loaded ranker scores the merged candidates with the layout it was trained with.
    merged, src = served.merge({s: served.retrieve(s, ctx) for s in served.source_names})
    assert isinstance(served.ranker, RankerScorer)
    scores, _ = served.score_with_inputs([ctx], [merged.items], [src])
    assert scores[0].shape == (len(merged),) and np.isfinite(scores[0]).all()


def test_merged_sources_choose_which_candidates_are_merged() -> None:
    from pydantic import ValidationError

    from streamrec.errors import ConfigError
    from streamrec.funnel.core import Funnel
    from streamrec.retrieval.config import RetrievalSettings

    f = _funnel(covisit=True, merged_sources=["two_tower", "affinity", "trending", "covisit"])
    assert isinstance(f, Funnel)
    assert f.source_names == ("two_tower", "affinity", "trending", "covisit")  # the bundle's order
    dense = f.features.layout.dense
    assert "x_src_cf" not in dense and "x_src_covisit" in dense
    assert "x_cf" in dense  # CF's score stays a ranker input
    with pytest.raises(ValidationError):
        RetrievalSettings(merged_sources=["popularity"])
    with pytest.raises(ConfigError, match="names none of this bundle's sources"):
        _funnel(covisit=False, merged_sources=["covisit"])


def test_a_requests_exclude_ids_are_never_returned_and_never_taste() -> None:
    """`exclude` ids (e.g. already shown) leave every source's results but feed no source's model of
    the user: before, they joined ``recent_items``, which affinity counts as history."""
    from streamrec.funnel.core import Funnel

    f = _funnel(covisit=True)
    assert isinstance(f, Funnel)
    # An unknown user who excludes the two comedy items (ids 12, 13): still the population prior.
    plain = f.context(999, {}, now=10.0)
    excl = f.context(999, {}, now=10.0, exclude_ids=[12, 13])
    assert excl.retrieval.exclude is not None and sorted(excl.retrieval.exclude.tolist()) == [2, 3]
    assert excl.retrieval.recent_items is not None and excl.retrieval.recent_items.size == 0
    np.testing.assert_allclose(
        f.models.affinity.preferences(excl.retrieval), f.models.affinity.preferences(plain.retrieval)
    )
    for source in f.source_names:
        items, _ = f.retrieve(source, excl, 5)
        assert not {2, 3} & set(items.tolist()), source
    # What the user watched is taste: a watched comedy raises comedy.
    watched = f.context(999, {"recent_item_ids": [12]}, now=10.0)
    assert f.models.affinity.preferences(watched.retrieval)[1] > f.models.affinity.preferences(plain.retrieval)[1]
