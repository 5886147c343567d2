"""Full-ranking top-K metrics with binary relevance, vectorised over users.

Conventions used by every function here:

* ``ranked`` is an ``(n_users, K)`` int array of item indices, best first, one row per evaluated
  user; ``-1`` pads rows with fewer than ``K`` items. Items within a row are distinct.
* ``truth`` is an ``(n_users, n_items)`` sparse matrix whose non-zeros in row ``r`` are the
  relevant (held-out) items of the user of ``ranked[r]``. Rows without any relevant item are
  left out of the averages (they carry no signal), and ``n_users`` in results says how many counted.
* Rankings are *full*: every catalogue item competes, except the user's own training items,
  which :func:`topk_items` masks out (seen-item masking) before taking the top K.

Definitions (``rel(r, j)`` = 1 when the item at rank ``j`` of row ``r`` is relevant):

* Recall@K = hits in the top K / number of relevant items of the user.
* NDCG@K = sum_j rel(r, j) / log2(j + 2) divided by the ideal DCG of min(K, #relevant) hits.
* HitRate@K = share of users with at least one hit in the top K.
* Coverage@K = distinct items recommended in any top K / catalogue size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from streamrec.errors import TrainingDataError

IntArray = npt.NDArray[np.int64]


def topk_items(
    scores: npt.NDArray[np.floating], k: int, exclude: sp.spmatrix | sp.sparray | None = None
) -> IntArray:
    """Top-``k`` item indices per row of a dense score matrix, optionally masking items.

    Args:
        scores: ``(n_users, n_items)`` scores; higher is better. Not modified.
        k: Number of items per row.
        exclude: Optional ``(n_users, n_items)`` sparse matrix; its non-zeros are excluded
            (typically the users' training items).

    Returns:
        ``(n_users, k)`` int64 item indices, best first; ``-1`` where fewer than ``k`` items are
        eligible. Ties break towards the lower item index.
    """
    s = np.array(scores, dtype=np.float32, copy=True, ndmin=2)
    n, n_items = s.shape
    if exclude is not None:
        ex = sp.csr_matrix(exclude)
        if ex.shape != s.shape:
            raise ValueError(f"exclude has shape {ex.shape}, scores {s.shape}")
        rows = np.repeat(np.arange(n), np.diff(ex.indptr))
        s[rows, ex.indices] = -np.inf
    kk = min(k, n_items)
    if kk < n_items:
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(n_items), (n, n_items)).copy()
    part_scores = np.take_along_axis(s, part, axis=1)
    # Sort by score descending, then item index ascending (lexsort: last key is primary).
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top[np.take_along_axis(part_scores, order, axis=1) == -np.inf] = -1
    if kk < k:
        top = np.hstack([top, np.full((n, k - kk), -1, np.int64)])
    return top


def _truth_keys(truth: sp.spmatrix | sp.sparray) -> tuple[IntArray, IntArray, int]:
    """Sorted ``row * n_items + item`` keys of a truth matrix, its row sizes and ``n_items``."""
    t = sp.csr_matrix(truth, copy=True)
    t.eliminate_zeros()
    t.sum_duplicates()  # also sorts indices
    n_items = t.shape[1]
    rows = np.repeat(np.arange(t.shape[0], dtype=np.int64), np.diff(t.indptr))
    return rows * n_items + t.indices.astype(np.int64), np.diff(t.indptr).astype(np.int64), n_items


def _is_member(keys: IntArray, sorted_keys: IntArray) -> npt.NDArray[np.bool_]:
    """Elementwise ``keys in sorted_keys`` by binary search."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    pos = np.minimum(pos, sorted_keys.size - 1)
    return sorted_keys[pos] == keys


def hit_matrix(ranked: npt.ArrayLike, truth: sp.spmatrix | sp.sparray) -> npt.NDArray[np.bool_]:
    """Boolean ``(n_users, K)`` matrix: is ``ranked[r, j]`` relevant for row ``r``.

    Args:
        ranked: ``(n_users, K)`` item indices (``-1`` = padding, never a hit).
        truth: ``(n_users, n_items)`` relevance matrix, rows aligned with ``ranked``.

    Returns:
        The hit matrix.
    """
    r = np.asarray(ranked, dtype=np.int64)
    if r.ndim != 2 or r.shape[0] != truth.shape[0]:
        raise ValueError(f"ranked must be (n_users, K) with n_users={truth.shape[0]}, got {r.shape}")
    keys, _, n_items = _truth_keys(truth)
    rk = np.arange(r.shape[0], dtype=np.int64)[:, None] * n_items + r
    return _is_member(rk, keys) & (r >= 0)


def _dcg_weights(k: int) -> npt.NDArray[np.float64]:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


#: The per-user metrics :func:`per_user_metrics` returns at each K (coverage is catalogue-level).
PER_USER_METRICS: tuple[str, ...] = ("recall", "ndcg", "hit_rate")


def per_user_metrics(
    ranked: npt.ArrayLike,
    truth: sp.spmatrix | sp.sparray,
    ks: Iterable[int] = (10, 20),
) -> tuple[dict[str, npt.NDArray[np.float64]], IntArray]:
    """Recall, NDCG and HitRate at each K for every user with a relevant item, one value per user.

    The per-user values are what :func:`ranking_metrics` averages and what confidence intervals
    over users resample (:mod:`streamrec.evaluation.intervals`). Coverage has no per-user value
    (it counts distinct items over all users) and is left out.

    Args:
        ranked: ``(n_users, K_max)`` item indices, best first (``-1`` = padding).
        truth: ``(n_users, n_items)`` relevance matrix, rows aligned with ``ranked``.
        ks: Cut-offs; each must be ``<= K_max``.

    Returns:
        ``({"recall@K", "ndcg@K", "hit_rate@K" for each K: float64 array}, rows)``: each array
        has one value per row of ``truth`` with a relevant item, in row order; ``rows`` holds
        those row numbers.

    Raises:
        TrainingDataError: no row of ``truth`` has a relevant item.
        ValueError: shapes disagree or a K exceeds the ranking depth.
    """
    r = np.asarray(ranked, dtype=np.int64)
    hits = hit_matrix(r, truth)
    n_rel = np.diff(sp.csr_matrix(truth).indptr)
    rows = np.flatnonzero(n_rel > 0)
    if rows.size == 0:
        raise TrainingDataError("nothing to evaluate: no user has a held-out positive")
    hits, n_rel = hits[rows], n_rel[rows]
    out: dict[str, npt.NDArray[np.float64]] = {}
    for k in sorted(set(ks)):
        if k > r.shape[1]:
            raise ValueError(f"K={k} exceeds the ranking depth {r.shape[1]}")
        hk = hits[:, :k]
        n_hits = hk.sum(axis=1)
        w = _dcg_weights(k)
        idcg = np.cumsum(w)[np.minimum(n_rel, k) - 1]
        out[f"recall@{k}"] = n_hits / n_rel
        out[f"ndcg@{k}"] = (hk @ w) / idcg
        out[f"hit_rate@{k}"] = (n_hits > 0).astype(np.float64)
    return out, rows.astype(np.int64)


def ranking_metrics(
    ranked: npt.ArrayLike,
    truth: sp.spmatrix | sp.sparray,
    ks: Iterable[int] = (10, 20),
    n_items: int | None = None,
) -> dict[str, float]:
    """Recall, NDCG, HitRate and Coverage at each K, averaged over users with relevant items.

    The means are those of :func:`per_user_metrics`; coverage counts the same users' top K.

    Args:
        ranked: ``(n_users, K_max)`` item indices, best first (``-1`` = padding).
        truth: ``(n_users, n_items)`` relevance matrix, rows aligned with ``ranked``.
        ks: Cut-offs; each must be ``<= K_max``.
        n_items: Catalogue size for coverage (defaults to ``truth.shape[1]``).

    Returns:
        ``{"recall@K", "ndcg@K", "hit_rate@K", "coverage@K" for each K, "n_users"}``.

    Raises:
        TrainingDataError: no row of ``truth`` has a relevant item.
        ValueError: shapes disagree or a K exceeds the ranking depth.
    """
    r = np.asarray(ranked, dtype=np.int64)
    per_user, rows = per_user_metrics(r, truth, ks)
    r = r[rows]
    catalogue = int(n_items if n_items is not None else truth.shape[1])
    out: dict[str, float] = {}
    for k in sorted(set(ks)):
        for name in PER_USER_METRICS:
            out[f"{name}@{k}"] = float(np.mean(per_user[f"{name}@{k}"]))
        top = r[:, :k]
        out[f"coverage@{k}"] = float(np.unique(top[top >= 0]).size / catalogue)
    out["n_users"] = float(rows.size)
    return out


def recall_at_k(ranked: npt.ArrayLike, truth: sp.spmatrix | sp.sparray, k: int) -> float:
    """Mean Recall@K over users with relevant items (see module docstring)."""
    return ranking_metrics(ranked, truth, (k,))[f"recall@{k}"]


def ndcg_at_k(ranked: npt.ArrayLike, truth: sp.spmatrix | sp.sparray, k: int) -> float:
    """Mean binary-relevance NDCG@K over users with relevant items (see module docstring)."""
    return ranking_metrics(ranked, truth, (k,))[f"ndcg@{k}"]


def hit_rate_at_k(ranked: npt.ArrayLike, truth: sp.spmatrix | sp.sparray, k: int) -> float:
    """Share of users (with relevant items) that have at least one hit in the top K."""
    return ranking_metrics(ranked, truth, (k,))[f"hit_rate@{k}"]


def coverage_at_k(ranked: npt.ArrayLike, n_items: int, k: int) -> float:
    """Distinct items in all top-K lists divided by the catalogue size ``n_items``.

    Unlike the other metrics this counts every row of ``ranked`` (coverage is about what is
    shown, not about what was relevant).
    """
    top = np.asarray(ranked, dtype=np.int64)[:, :k]
    return float(np.unique(top[top >= 0]).size / n_items)


def candidate_recall(
    candidates_per_user: Sequence[npt.ArrayLike] | npt.NDArray[np.int64],
    test_items: Sequence[npt.ArrayLike] | sp.spmatrix | sp.sparray,
    n: int | None = None,
) -> float:
    """Recall of candidate sets: the share of each user's test items that made it into the set.

    This is the funnel metric for retrieval: the ranker can only order what retrieval returned.

    Args:
        candidates_per_user: Per user, the candidate item indices in retrieval order (a list of
            1-D arrays of any length, or a 2-D array padded with ``-1``). Duplicates are counted once.
        test_items: Per user (aligned with ``candidates_per_user``), the relevant items: a list of
            1-D arrays or a sparse ``(n_users, n_items)`` matrix.
        n: Use only the first ``n`` candidates of each user (``None`` = all).

    Returns:
        Mean over users with at least one test item of ``|candidates[:n] ∩ test| / |test|``.

    Raises:
        TrainingDataError: no user has a test item.
        ValueError: the two inputs have different numbers of users.
    """
    if sp.issparse(test_items):
        truth = sp.csr_matrix(test_items)
    else:
        rows_t = [np.asarray(t, dtype=np.int64).ravel() for t in test_items]
        n_items_t = 1 + max((int(t.max()) for t in rows_t if t.size), default=0)
        truth = _rows_to_csr(rows_t, n_items_t)
    cands = [np.asarray(c, dtype=np.int64).ravel()[:n] for c in candidates_per_user]
    if len(cands) != truth.shape[0]:
        raise ValueError(f"{len(cands)} candidate lists but {truth.shape[0]} users in test_items")
    keys, n_rel, n_items = _truth_keys(truth)
    if not (n_rel > 0).any():
        raise TrainingDataError("nothing to evaluate: no user has a held-out positive")
    lengths = np.fromiter((c.size for c in cands), dtype=np.int64, count=len(cands))
    flat = np.concatenate(cands) if cands else np.empty(0, np.int64)
    users = np.repeat(np.arange(len(cands), dtype=np.int64), lengths)
    valid = (flat >= 0) & (flat < n_items)
    ckeys = np.unique(users[valid] * n_items + flat[valid])
    hit = _is_member(ckeys, keys)
    n_hits = np.bincount(ckeys[hit] // n_items, minlength=len(cands))
    users_with = n_rel > 0
    return float(np.mean(n_hits[users_with] / n_rel[users_with]))


def _rows_to_csr(rows: Sequence[IntArray], n_cols: int) -> sp.csr_matrix:
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(rows) if rows else np.empty(0, np.int64)
    data = np.ones(indices.size, dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), max(n_cols, 1)))
