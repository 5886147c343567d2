"""Baseline recommenders and the offline evaluation harness.

Every model here works on a binary ``(n_users, n_items)`` CSR interaction matrix and shares one
interface (:class:`Recommender`): ``fit(train_csr)`` and
``recommend(user_indices, k, exclude_seen=True) -> (n, k) int64 item indices`` (``-1`` padded).
Scores are computed densely per batch of users and the top K taken with seen-item masking
(:func:`~streamrec.evaluation.metrics.topk_items`), so all methods are ranked the same way.

* :class:`MostPopular` - item interaction counts; the floor every model must beat.
* :class:`ItemKNN` - cosine item-item similarity on the binary matrix, top-k neighbours per item.
* :class:`ALS` / :class:`BPR` - matrix factorisation from the ``implicit`` library (CPU).
* :class:`EASE` - the closed-form linear item-item autoencoder (Steck 2019); dense, so bounded
  by :attr:`~streamrec.evaluation.config.EASEConfig.max_items`.

Hyper-parameters live in :mod:`streamrec.evaluation.config` (re-exported here);
:func:`make_baseline` builds any baseline by name from them, which is how
:mod:`streamrec.evaluation.tuning` searches grids.

:func:`evaluate_recommender` computes the metrics of one fitted model on a test matrix and
:func:`compare` fits and evaluates several methods in one run, returning a table (list of dicts).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from implicit.bpr import BayesianPersonalizedRanking
from threadpoolctl import threadpool_limits

from streamrec.config import StrictModel
from streamrec.errors import ModelError, TrainingDataError
from streamrec.evaluation.config import (
    ALSConfig,
    BPRConfig,
    EASEConfig,
    ItemKNNConfig,
    baseline_config,
)
from streamrec.evaluation.metrics import ranking_metrics, topk_items

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@runtime_checkable
class Recommender(Protocol):
    """What every baseline (and any model to be compared with them) provides."""

    name: str

    def fit(self, train: sp.csr_matrix) -> Self:
        """Fit on a binary ``(n_users, n_items)`` interaction matrix; return self."""
        ...

    def recommend(self, user_indices: npt.ArrayLike, k: int, exclude_seen: bool = True) -> IntArray:
        """Top-``k`` item indices for each user, best first, ``-1`` padded."""
        ...


def _as_train(train: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    m = sp.csr_matrix(train, dtype=np.float32)
    if m.shape[0] == 0 or m.shape[1] == 0 or m.nnz == 0:
        raise TrainingDataError(f"training matrix of shape {m.shape} has no interactions")
    m.sort_indices()
    return m


class ScoringRecommender:
    """Base class: subclasses provide dense ``score(user_indices)``; this adds masked top-K.

    Attributes:
        name: Short method name used in result tables.
        batch_size: Users scored per dense batch (bounds memory at ``batch_size * n_items``).
    """

    name = "base"

    def __init__(self, batch_size: int = 1024) -> None:
        self.batch_size = batch_size
        self._train: sp.csr_matrix | None = None

    @property
    def train_matrix(self) -> sp.csr_matrix:
        """The interaction matrix the model was fitted on.

        Raises:
            ModelError: the model has not been fitted.
        """
        if self._train is None:
            raise ModelError(f"{self.name} is not fitted; call fit(train_csr) first")
        return self._train

    @property
    def n_items(self) -> int:
        """Catalogue size seen at fit time."""
        return int(self.train_matrix.shape[1])

    def fit(self, train: sp.csr_matrix) -> Self:
        """Fit on a binary ``(n_users, n_items)`` matrix.

        Raises:
            TrainingDataError: the matrix is empty.
        """
        self._train = _as_train(train)
        self._fit(self._train)
        return self

    def _fit(self, train: sp.csr_matrix) -> None:
        raise NotImplementedError

    def score(self, user_indices: npt.ArrayLike) -> FloatArray:
        """Dense ``(n, n_items)`` float32 scores of the given users (higher is better)."""
        raise NotImplementedError

    def recommend(self, user_indices: npt.ArrayLike, k: int, exclude_seen: bool = True) -> IntArray:
        """Top-``k`` items per user.

        Args:
            user_indices: Dense user indices (rows of the training matrix).
            k: Items per user.
            exclude_seen: Mask each user's training items.

        Returns:
            ``(n, k)`` int64 item indices, best first, ``-1`` where fewer than ``k`` are eligible.
        """
        users = np.asarray(user_indices, dtype=np.int64).ravel()
        train = self.train_matrix
        out = np.empty((users.size, k), dtype=np.int64)
        for start in range(0, users.size, self.batch_size):
            batch = users[start : start + self.batch_size]
            exclude = train[batch] if exclude_seen else None
            out[start : start + batch.size] = topk_items(self.score(batch), k, exclude)
        return out


class MostPopular(ScoringRecommender):
    """Recommends the items with the most interacting users in training, to everybody."""

    name = "most_popular"

    def _fit(self, train: sp.csr_matrix) -> None:
        counts = np.asarray(train.astype(bool).sum(axis=0)).ravel().astype(np.float32)
        self.item_counts: FloatArray = counts

    def score(self, user_indices: npt.ArrayLike) -> FloatArray:
        """Popularity counts, the same row for every user."""
        n = np.asarray(user_indices).size
        return np.broadcast_to(self.item_counts, (n, self.item_counts.size))


class ItemKNN(ScoringRecommender):
    """Item-based collaborative filtering with cosine similarity on the binary matrix.

    ``sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|)`` (users who interacted), diagonal removed, only
    the ``neighbours`` most similar items of each item kept (similarities equal in float32: the
    lower item index first). A user's score for item ``j`` is the sum of ``sim(i, j)`` over the items ``i``
    in their history.

    Args:
        neighbours: Neighbours kept per item.
        shrink: Added to the denominator to damp similarities built on few co-occurrences.
        block: Items per block when computing similarities (memory: the block's co-occurring
            pairs, sparse).
    """

    name = "item_knn"

    def __init__(self, neighbours: int = 100, shrink: float = 0.0, block: int = 2048, batch_size: int = 1024):
        super().__init__(batch_size)
        self.neighbours = neighbours
        self.shrink = shrink
        self.block = block

    def _fit(self, train: sp.csr_matrix) -> None:
        # Sparse throughout: a block's co-occurrences are sparse (most item pairs share no user),
        # so neither the similarity nor the top-k needs a dense (block x n_items) array.
        x = train.astype(bool).astype(np.float32).tocsc()
        n_items = x.shape[1]
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel()).astype(np.float32)
        xt = x.T.tocsr()
        k = min(self.neighbours, max(n_items - 1, 1))
        rows, cols, vals = [], [], []
        for start in range(0, n_items, self.block):
            stop = min(start + self.block, n_items)
            co = (xt[start:stop] @ x).tocoo()  # (b, n_items) co-occurrence counts
            r, c = co.row.astype(np.int64), co.col.astype(np.int64)
            denom = norms[r + start] * norms[c] + np.float32(self.shrink)
            sim = np.divide(co.data, denom, out=np.zeros_like(co.data), where=denom > 0)
            keep = (sim > 0) & (c != r + start)  # no self-similarity
            r, c, sim = r[keep], c[keep], sim[keep]
            # The k most similar per row: by row, then similarity descending, ties by item index.
            order = np.lexsort((c, -sim, r))
            r, c, sim = r[order], c[order], sim[order]
            counts = np.bincount(r, minlength=stop - start)
            rank = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
            top = rank < k
            rows.append(r[top] + start)
            cols.append(c[top])
            vals.append(sim[top])
        self.similarity: sp.csr_matrix = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items)
        )

    def score(self, user_indices: npt.ArrayLike) -> FloatArray:
        """``history @ similarity`` for each user."""
        users = np.asarray(user_indices, dtype=np.int64).ravel()
        return np.asarray((self.train_matrix[users] @ self.similarity).toarray(), dtype=np.float32)

    def score_history(self, items: npt.ArrayLike) -> FloatArray:
        """Scores of every item for an ad-hoc history (e.g. a cold user's session items).

        Args:
            items: Item indices of the history.

        Returns:
            ``(n_items,)`` float32 scores.
        """
        idx = np.asarray(items, dtype=np.int64).ravel()
        idx = idx[(idx >= 0) & (idx < self.n_items)]
        return np.asarray(self.similarity[np.unique(idx)].sum(axis=0), dtype=np.float32).ravel()


class _ImplicitMF(ScoringRecommender):
    """Shared code of the ``implicit`` ALS/BPR wrappers: factors and dot-product scoring."""

    def __init__(self, batch_size: int = 1024) -> None:
        super().__init__(batch_size)
        self.user_factors: FloatArray = np.empty((0, 0), np.float32)
        self.item_factors: FloatArray = np.empty((0, 0), np.float32)

    def _make(self) -> Any:
        raise NotImplementedError

    def _fit(self, train: sp.csr_matrix) -> None:
        # implicit's own thread pool does the work; a second BLAS pool only adds contention.
        with threadpool_limits(1, "blas"):
            model = self._make()
            model.fit(train, show_progress=False)
        self.model = model
        self.user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)

    def score(self, user_indices: npt.ArrayLike) -> FloatArray:
        """``user_factors[u] @ item_factors.T``."""
        users = np.asarray(user_indices, dtype=np.int64).ravel()
        return self.user_factors[users] @ self.item_factors.T


class ALS(_ImplicitMF):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008) via ``implicit.als`` on CPU.

    The interaction matrix is scaled by ``alpha`` to form confidences ``1 + alpha``.
    """

    name = "als"

    def __init__(self, config: ALSConfig | None = None, batch_size: int = 1024) -> None:
        super().__init__(batch_size)
        self.config = config or ALSConfig()

    def _make(self) -> Any:
        c = self.config
        return AlternatingLeastSquares(
            factors=c.factors,
            regularization=c.regularization,
            alpha=c.alpha,
            iterations=c.iterations,
            num_threads=c.num_threads,
            random_state=c.seed,
            use_gpu=False,
        )

    def _fit(self, train: sp.csr_matrix) -> None:
        super()._fit(train)
        self._prepare_fold_in()

    def _prepare_fold_in(self) -> None:
        """Cache ``Y'Y + reg I`` (the item-side part of every fold-in solve)."""
        y = self.item_factors.astype(np.float64)
        self._yty_reg = y.T @ y + self.config.regularization * np.eye(y.shape[1])

    @classmethod
    def from_factors(
        cls,
        train: sp.csr_matrix,
        user_factors: npt.ArrayLike,
        item_factors: npt.ArrayLike,
        config: ALSConfig | None = None,
    ) -> ALS:
        """Rebuild a fitted model from saved factors (a model bundle), without refitting.

        Args:
            train: The training matrix the factors were fit on (seen items, fold-in history).
            user_factors: ``(n_users, factors)``.
            item_factors: ``(n_items, factors)``.
            config: The hyper-parameters used (regularisation and alpha drive fold-in).
        """
        model = cls(config)
        model._train = _as_train(train)
        model.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        model.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        model._prepare_fold_in()
        return model

    def fold_in(self, items: npt.ArrayLike) -> FloatArray:
        """User vector for an ad-hoc history: one exact ALS half-step with item factors fixed.

        Serves users absent at training time, or refreshes a user after new interactions,
        without retraining. Solves ``(Y'Y + reg I + (c - 1) Y_u'Y_u) x = c Y_u' 1`` with
        confidence ``c = alpha`` (the same equation ``implicit`` solves in training); ~30 us.

        Args:
            items: Item indices the user interacted with.

        Returns:
            ``(factors,)`` float32 user vector (zeros for an empty history).
        """
        idx = np.unique(np.asarray(items, dtype=np.int64).ravel())
        idx = idx[(idx >= 0) & (idx < self.n_items)]
        if idx.size == 0:
            return np.zeros(self.item_factors.shape[1], np.float32)
        y = self.item_factors[idx].astype(np.float64)
        c = self.config.alpha
        a = self._yty_reg + (c - 1.0) * (y.T @ y)
        return np.linalg.solve(a, c * y.sum(axis=0)).astype(np.float32)


class BPR(_ImplicitMF):
    """Bayesian Personalised Ranking (Rendle et al. 2009) via ``implicit.bpr`` on CPU.

    ``implicit`` appends an item-bias column to the factors (and a 1 to user factors), so the
    plain dot product already includes the bias.
    """

    name = "bpr"

    def __init__(self, config: BPRConfig | None = None, batch_size: int = 1024) -> None:
        super().__init__(batch_size)
        self.config = config or BPRConfig()

    def _make(self) -> Any:
        c = self.config
        return BayesianPersonalizedRanking(
            factors=c.factors,
            learning_rate=c.learning_rate,
            regularization=c.regularization,
            iterations=c.iterations,
            num_threads=c.num_threads,
            random_state=c.seed,
            use_gpu=False,
        )


class EASE(ScoringRecommender):
    """Embarrassingly Shallow Autoencoder (Steck 2019): a closed-form item-item linear model.

    With ``X`` the binary training matrix, ``P = (X^T X + lambda I)^-1`` and
    ``B = I - P diagMat(1 / diag(P))``, i.e. ``B_ij = -P_ij / P_jj`` off the diagonal and
    ``B_jj = 0`` (an item may not predict itself). A user's scores are ``x_u @ B``.

    The Gram matrix and its inverse are dense ``n_items x n_items`` float64 arrays, so
    :meth:`fit` refuses catalogues above ``config.max_items``.

    Args:
        config: Hyper-parameters (``l2`` = lambda) and the size guard.
        batch_size: Users scored per dense batch.
    """

    name = "ease"

    def __init__(self, config: EASEConfig | None = None, batch_size: int = 1024) -> None:
        super().__init__(batch_size)
        self.config = config or EASEConfig()
        self.weights: FloatArray = np.empty((0, 0), np.float32)

    @staticmethod
    def check_size(n_items: int, max_items: int) -> None:
        """Raise before allocating anything when ``n_items`` is too large for a dense EASE.

        Raises:
            ModelError: ``n_items > max_items``; the message says what it would cost and what to do.
        """
        if n_items > max_items:
            gib = 16 * n_items**2 / 2**30
            raise ModelError(
                f"EASE needs two dense {n_items:,} x {n_items:,} float64 matrices (about {gib:.1f} GiB) and "
                f"a cubic-time inversion; {n_items:,} items exceed max_items={max_items:,}. Drop 'ease' from "
                "evaluation.baselines for this catalogue, or raise evaluation.ease_max_items "
                "(EASEConfig.max_items) on a machine with that much memory"
            )

    def _fit(self, train: sp.csr_matrix) -> None:
        n_items = int(train.shape[1])
        self.check_size(n_items, self.config.max_items)
        x = sp.csr_matrix(train.astype(bool), dtype=np.float64)
        gram = np.asarray((x.T @ x).toarray(), dtype=np.float64)
        gram[np.diag_indices(n_items)] += self.config.l2
        p = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)
        p /= -np.diag(p)[None, :]
        p[np.diag_indices(n_items)] = 0.0
        self.weights = p.astype(np.float32)

    def score(self, user_indices: npt.ArrayLike) -> FloatArray:
        """``x_u @ B`` for each user."""
        users = np.asarray(user_indices, dtype=np.int64).ravel()
        return np.asarray(self.train_matrix[users] @ self.weights, dtype=np.float32)


def make_baseline(
    name: str, params: Mapping[str, Any] | StrictModel | None = None, batch_size: int = 1024
) -> ScoringRecommender:
    """Build an unfitted baseline by name.

    Args:
        name: One of :data:`~streamrec.evaluation.config.BASELINE_NAMES`.
        params: Hyper-parameters over the baseline's defaults (a dict or its config model).
        batch_size: Users scored per dense batch.

    Returns:
        The unfitted recommender.

    Raises:
        ConfigError: unknown baseline or invalid hyper-parameters.
    """
    cfg = params if isinstance(params, StrictModel) else baseline_config(name, params)
    if isinstance(cfg, ItemKNNConfig):
        return ItemKNN(cfg.neighbours, cfg.shrink, cfg.block, batch_size)
    if isinstance(cfg, ALSConfig):
        return ALS(cfg, batch_size)
    if isinstance(cfg, BPRConfig):
        return BPR(cfg, batch_size)
    if isinstance(cfg, EASEConfig):
        return EASE(cfg, batch_size)
    baseline_config(name, {})  # MostPopular takes no parameters (and an unknown name raises)
    return MostPopular(batch_size)


def evaluate_recommender(
    model: Recommender,
    test: sp.spmatrix | sp.sparray,
    ks: Iterable[int] = (10, 20),
    exclude_seen: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics of a fitted model on a test matrix.

    Args:
        model: A fitted :class:`Recommender`.
        test: ``(n_users, n_items)`` matrix of held-out positives, in the model's index space.
        ks: Cut-offs.
        exclude_seen: Mask training items (the realistic setting; see module docstring).

    Returns:
        ``recall@K``, ``ndcg@K``, ``hit_rate@K``, ``coverage@K`` for each K, ``n_users`` and
        ``recommend_ms_per_user`` (wall time of ``recommend`` over all evaluated users).

    Raises:
        TrainingDataError: the test matrix has no positives.
    """
    t = sp.csr_matrix(test)
    users = np.flatnonzero(np.diff(t.indptr) > 0)
    if users.size == 0:
        raise TrainingDataError("test matrix has no positives to evaluate against")
    ks = tuple(sorted(set(ks)))
    t0 = time.perf_counter()
    ranked = model.recommend(users, max(ks), exclude_seen=exclude_seen)
    elapsed = time.perf_counter() - t0
    result = ranking_metrics(ranked, t[users], ks, n_items=t.shape[1])
    result["recommend_ms_per_user"] = 1000.0 * elapsed / users.size
    return result


def compare(
    models: Mapping[str, Recommender] | Iterable[Recommender],
    train: sp.spmatrix | sp.sparray,
    test: sp.spmatrix | sp.sparray,
    ks: Iterable[int] = (10, 20),
) -> list[dict[str, Any]]:
    """Fit and evaluate several methods on the same split, side by side.

    Args:
        models: Unfitted recommenders, as ``{name: model}`` or an iterable (named by ``.name``).
        train: Training interaction matrix.
        test: Held-out positives matrix, same shape.
        ks: Cut-offs.

    Returns:
        One dict per method, in input order: ``method``, ``fit_s`` and the metrics of
        :func:`evaluate_recommender`.
    """
    named = list(models.items()) if isinstance(models, Mapping) else [(m.name, m) for m in models]
    train_csr = _as_train(train)
    rows: list[dict[str, Any]] = []
    for name, model in named:
        t0 = time.perf_counter()
        model.fit(train_csr)
        fit_s = time.perf_counter() - t0
        rows.append({"method": name, "fit_s": round(fit_s, 3), **evaluate_recommender(model, test, ks)})
    return rows
