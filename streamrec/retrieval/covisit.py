"""Co-visitation retrieval: items that other users engaged with next to the user's recent items.

Model. Each user's training positives, in time order, form a sequence. Two events of the same
user at most ``window`` positions and ``window_hours`` apart *co-visit* their items; every such
pair adds one to ``c_ij`` and ``c_ji`` (pairs of an item with itself do not count). With ``n_i``
the item's number of positives, the similarity is popularity-normalised,

    sim(i, j) = c_ij / (n_i * n_j) ** popularity_exponent

(``0.5``: cosine of the two items' co-visit vectors; ``1``: lift), so a blockbuster that co-occurs
with everything does not become everybody's neighbour, which is what makes this source
complementary to the affinity and trending sources (both lean on popularity). Only the
``neighbours`` most similar items of each item are kept: a sparse ``(n_items, n_items)`` matrix
with at most ``n_items * neighbours`` entries, whatever the catalogue size.

At request time the user's recent items (most recent first) are the seeds, weighted
``recency_decay ** position``, and a known user's other training items join them at
``profile_weight``; an item's score is ``sum_seeds weight * sim(seed, item)``. The work per request
is bounded by ``(history + profile) * neighbours`` entries. A user with no history gets nothing
(the other sources carry cold users); an item added to the catalogue while serving has no
neighbours until the next training (:meth:`CovisitSource.with_items`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field

from streamrec.config import StrictModel
from streamrec.errors import CorruptCheckpointError, TrainingDataError
from streamrec.retrieval.base import (
    Candidates,
    IntArray,
    RetrievalSource,
    UserContext,
    empty_candidates,
    top_n,
)
from streamrec.retrieval.trending import to_epoch_seconds


class CovisitConfig(StrictModel):
    """Settings of :class:`CovisitSource` (part of the retrieval settings a bundle carries).

    Attributes:
        enabled: Fit the source at training and serve it (a bundle without it serves without).
            Off by default: on ML-100K and the synthetic world it added no merged recall and
            no NDCG (docs/benchmarks.md, "Co-visitation source"; ADR-014).
        window: Two events of a user at most this many positions apart in the user's time-ordered
            positives co-visit their items.
        window_hours: ... and at most this many hours apart (``0``: no time limit).
        popularity_exponent: ``p`` in ``c_ij / (n_i * n_j) ** p`` (0.5 cosine, 1 lift, 0 raw counts).
        neighbours: Most similar items kept per item.
        min_count: Pairs co-visited fewer times are dropped (noise on large catalogues).
        recency_decay: Weight of the ``k``-th most recent history item as a seed is ``decay ** k``.
        profile_weight: Weight of each of a known user's training items not in the recent history
            (0: recent history only).
    """

    enabled: bool = False
    window: int = Field(10, ge=1)
    window_hours: float = Field(0.0, ge=0)
    popularity_exponent: float = Field(0.5, ge=0)
    neighbours: int = Field(100, ge=1)
    min_count: int = Field(1, ge=1)
    recency_decay: float = Field(0.9, gt=0, le=1)
    profile_weight: float = Field(0.2, ge=0)


def covisit_counts(
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    timestamps: Any,
    n_items: int,
    window: int,
    window_hours: float = 0.0,
) -> sp.csr_matrix:
    """Symmetric co-visit counts ``c_ij`` of a batch of positive events (see the module docstring).

    Memory is bounded by the pairs of one offset at a time plus the running sum (no dense
    ``n_items x n_items`` array), so a 200k-item catalogue fits.

    Args:
        users: User of each event (any integer id).
        items: Item index of each event (``0 .. n_items - 1``; others are ignored).
        timestamps: Event times (epoch seconds or datetimes, see
            :func:`~streamrec.retrieval.trending.to_epoch_seconds`); ties keep the input order.
        n_items: Catalogue size.
        window: Maximum distance in positions within a user's sequence.
        window_hours: Maximum time gap in hours (0: none).

    Returns:
        ``(n_items, n_items)`` float32 CSR with zero diagonal.

    Raises:
        TrainingDataError: the arrays differ in length.
    """
    u = np.asarray(users, dtype=np.int64).ravel()
    it = np.asarray(items, dtype=np.int64).ravel()
    ts = to_epoch_seconds(timestamps)
    if not (u.size == it.size == ts.size):
        raise TrainingDataError(f"{u.size} users, {it.size} items and {ts.size} timestamps differ in length")
    ok = (it >= 0) & (it < n_items)
    u, it, ts = u[ok], it[ok], ts[ok]
    order = np.lexsort((ts, u))
    u, it, ts = u[order], it[order], ts[order]
    total = sp.csr_matrix((n_items, n_items), dtype=np.float32)
    max_gap = window_hours * 3600.0
    for d in range(1, window + 1):
        if d >= u.size:
            break
        keep = (u[d:] == u[:-d]) & (it[d:] != it[:-d])
        if max_gap > 0:
            keep &= (ts[d:] - ts[:-d]) <= max_gap
        if not keep.any():
            break  # no user has a sequence this long any more
        a, b = it[:-d][keep], it[d:][keep]
        part = sp.csr_matrix(
            (np.ones(2 * a.size, np.float32), (np.concatenate([a, b]), np.concatenate([b, a]))),
            shape=(n_items, n_items),
        )
        part.sum_duplicates()
        total = total + part
    return sp.csr_matrix(total, dtype=np.float32)


def top_neighbours(sim: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """Each row's ``keep`` largest entries (ties: lower column first), rows sorted best first.

    Vectorised over all rows (one lexsort of the non-zeros), no Python loop over items.
    """
    sim = sp.csr_matrix(sim, dtype=np.float32)
    sim.eliminate_zeros()
    n_rows = sim.shape[0]
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(sim.indptr))
    order = np.lexsort((sim.indices, -sim.data, rows))
    rank = np.arange(order.size, dtype=np.int64) - np.repeat(
        sim.indptr[:-1].astype(np.int64), np.diff(sim.indptr)
    )
    chosen = order[rank < keep]  # ``rank`` is the position within the row of the sorted order
    lengths = np.minimum(np.diff(sim.indptr), keep)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return sp.csr_matrix(
        (sim.data[chosen], sim.indices[chosen].astype(np.int32), indptr), shape=sim.shape, dtype=np.float32
    )


class CovisitSource(RetrievalSource):
    """Items co-visited with the user's recent items (see the module docstring for the model).

    Args:
        neighbours: ``(n_items, n_items)`` CSR of kept similarities, each row best first
            (:meth:`fit` builds it; :meth:`load` reads it from a bundle).
        config: Request-time weighting (the fitting settings are recorded with it).
        name: Source name for provenance.
        seen: ``(n_users, n_items)`` training matrix: the items not to return per known user, and
            a known user's profile seeds.

    Raises:
        TrainingDataError: the neighbour matrix is not square or disagrees with ``seen``.
    """

    def __init__(
        self,
        neighbours: sp.spmatrix | sp.sparray,
        config: CovisitConfig | None = None,
        name: str = "covisit",
        seen: sp.spmatrix | sp.sparray | None = None,
    ) -> None:
        super().__init__(name, seen)
        nb = sp.csr_matrix(neighbours, dtype=np.float32)
        if nb.shape[0] != nb.shape[1]:
            raise TrainingDataError(f"the co-visit matrix must be square (items x items), got {nb.shape}")
        if self._seen is not None and self._seen.shape[1] != nb.shape[0]:
            raise TrainingDataError(
                f"the co-visit matrix has {nb.shape[0]} items but the seen matrix {self._seen.shape[1]}: "
                "fit both on the same item table"
            )
        self.config = config or CovisitConfig()
        self.neighbours = nb

    @property
    def n_items(self) -> int:
        """Catalogue size (item indices ``0 .. n_items - 1``)."""
        return int(self.neighbours.shape[0])

    @classmethod
    def fit(
        cls,
        users: npt.ArrayLike,
        items: npt.ArrayLike,
        timestamps: Any,
        n_items: int,
        config: CovisitConfig | None = None,
        seen: sp.spmatrix | sp.sparray | None = None,
        name: str = "covisit",
    ) -> CovisitSource:
        """Count co-visits in positive events, normalise by popularity, keep the top neighbours.

        Args:
            users: User of each positive event.
            items: Item index of each event.
            timestamps: Event times (epoch seconds or datetimes).
            n_items: Catalogue size.
            config: Window, normalisation and neighbour count.
            seen: Training matrix (see the class arguments).
            name: Source name.

        Raises:
            TrainingDataError: the arrays differ in length.
        """
        cfg = config or CovisitConfig()
        counts = covisit_counts(users, items, timestamps, n_items, cfg.window, cfg.window_hours)
        if cfg.min_count > 1:
            counts.data[counts.data < cfg.min_count] = 0.0
            counts.eliminate_zeros()
        it = np.asarray(items, dtype=np.int64).ravel()
        pop = np.bincount(it[(it >= 0) & (it < n_items)], minlength=n_items).astype(np.float64)
        norm = np.power(np.maximum(pop, 1.0), cfg.popularity_exponent)
        rows = np.repeat(np.arange(n_items), np.diff(counts.indptr))
        sim = counts.copy()
        sim.data = (counts.data / (norm[rows] * norm[counts.indices])).astype(np.float32)
        return cls(top_neighbours(sim, cfg.neighbours), cfg, name, seen)

    def with_items(self, n_new: int) -> CovisitSource:
        """A copy with ``n_new`` more items (indices ``n_items ..``): no neighbours, nobody's neighbour.

        This source is unchanged (copy-on-write); the next training counts the new items' co-visits.
        """
        out = copy.copy(self)
        nb = self.neighbours
        n = self.n_items + n_new
        indptr = np.concatenate([nb.indptr, np.full(n_new, nb.indptr[-1], dtype=nb.indptr.dtype)])
        out.neighbours = sp.csr_matrix((nb.data, nb.indices, indptr), shape=(n, n))
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the neighbour matrix (``.npz``, no pickles); the config travels in the bundle's settings."""
        sp.save_npz(Path(path), self.neighbours)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        config: CovisitConfig | None = None,
        seen: sp.spmatrix | sp.sparray | None = None,
        name: str = "covisit",
    ) -> CovisitSource:
        """Read a neighbour matrix written by :meth:`save`.

        Raises:
            CorruptCheckpointError: the file cannot be read or its shape disagrees with ``seen``.
        """
        try:
            nb = sp.load_npz(Path(path))
            return cls(nb, config, name, seen)
        except (OSError, ValueError, KeyError, TrainingDataError) as err:
            raise CorruptCheckpointError(
                f"co-visit neighbours {path} cannot be read ({err}): retrain, or pick another model version"
            ) from err

    def seeds(self, ctx: UserContext) -> tuple[IntArray, npt.NDArray[np.float64]]:
        """The items the scores start from and their weights (see the module docstring).

        Args:
            ctx: ``history`` (else ``recent_items``), most recent first, and the user index.

        Returns:
            ``(items, weights)``, each item once (its largest weight).
        """
        cfg = self.config
        recent = ctx.history if ctx.history is not None else ctx.recent_items
        parts: list[IntArray] = []
        weights: list[npt.NDArray[np.float64]] = []
        if recent is not None:
            r = np.asarray(recent, dtype=np.int64).ravel()
            parts.append(r)
            weights.append(np.power(cfg.recency_decay, np.arange(r.size, dtype=np.float64)))
        s = self._seen
        if cfg.profile_weight > 0 and s is not None and 0 <= ctx.user_index < s.shape[0]:
            row = s.indices[s.indptr[ctx.user_index] : s.indptr[ctx.user_index + 1]].astype(np.int64)
            parts.append(row)
            weights.append(np.full(row.size, cfg.profile_weight))
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        items, w = np.concatenate(parts), np.concatenate(weights)
        ok = (items >= 0) & (items < self.n_items)
        items, w = items[ok], w[ok]
        order = np.lexsort((-w, items))  # per item, its largest weight first
        items, w = items[order], w[order]
        first = np.r_[True, items[1:] != items[:-1]] if items.size else np.empty(0, bool)
        return items[first], w[first]

    def _retrieve(self, ctx: UserContext, n: int) -> Candidates:
        seeds, w = self.seeds(ctx)
        if seeds.size == 0:
            return empty_candidates()
        nb = self.neighbours
        starts = nb.indptr[seeds].astype(np.int64)
        lengths = nb.indptr[seeds + 1].astype(np.int64) - starts
        total = int(lengths.sum())
        if total == 0:
            return empty_candidates()
        first = np.cumsum(lengths) - lengths
        pos = np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)
        cand = nb.indices[pos].astype(np.int64)
        contrib = nb.data[pos] * np.repeat(w, lengths)
        uniq, inverse = np.unique(cand, return_inverse=True)
        scores = np.bincount(inverse, weights=contrib, minlength=uniq.size).astype(np.float64)
        return top_n(scores, n, uniq)
