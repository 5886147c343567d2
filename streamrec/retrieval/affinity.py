"""Category-affinity retrieval: what a user likes, as a Bayesian blend with the population.

Model. Each interaction of user ``u`` counts towards the categories of its item (an item with
several categories splits one unit equally among them). With ``n_ug`` the user's (fractional)
count in category ``g``, ``N_u = sum_g n_ug`` and the population's category shares ``pi_g`` as the
mean of a Dirichlet prior of strength ``alpha`` (pseudo-interactions), the posterior mean
preference is

    theta_ug = (n_ug + alpha * pi_g) / (N_u + alpha)

so a user with no history gets ``pi`` (cold start works), and history overrides the prior as it
grows past ``alpha`` interactions. Within a category items are scored by smoothed popularity
``p(i | g) = (c_i + beta) / sum_{j in g} (c_j + beta)``; the user's score of item ``i`` is
``sum_g theta_ug * p(i | g)`` - the probability that the user's next interaction is ``i`` under
this mixture. Only the ``top_per_category`` most popular items of each category are kept, which
bounds per-request work to ``n_categories * top_per_category`` multiply-adds.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field

from streamrec.config import StrictModel
from streamrec.errors import TrainingDataError
from streamrec.retrieval.base import (
    Candidates,
    FloatArray,
    IntArray,
    RetrievalSource,
    UserContext,
    csr_rows_sum,
    top_n,
)


class AffinityConfig(StrictModel):
    """Settings of :class:`AffinitySource`.

    Attributes:
        prior_strength: Dirichlet prior strength ``alpha`` in pseudo-interactions.
        popularity_smoothing: Pseudo-count ``beta`` added to every item's count.
        top_per_category: Items kept per category.
        new_item_quantile: A catalogue item added while serving (no interactions yet) enters each
            of its categories at this quantile of the category's kept weights (0.5: the median
            item; 1.0: as the most popular), so that the category's fans see it and it can
            gather the engagement the next training counts.
    """

    prior_strength: float = 10.0
    popularity_smoothing: float = 1.0
    top_per_category: int = 1000
    new_item_quantile: float = Field(default=0.9, ge=0.0, le=1.0)


def category_matrix(
    item_categories: Sequence[Sequence[int]] | sp.spmatrix | sp.sparray, n_categories: int | None = None
) -> sp.csr_matrix:
    """Row-normalised ``(n_items, n_categories)`` item-category matrix.

    Args:
        item_categories: Per item, its category indices; or an existing (binary) sparse matrix.
        n_categories: Number of categories (default: largest index + 1).

    Returns:
        A float32 CSR matrix whose non-empty rows sum to 1.
    """
    if sp.issparse(item_categories):
        m = sp.csr_matrix(item_categories, dtype=np.float32)
    else:
        rows = [np.unique(np.asarray(c, dtype=np.int64)) for c in item_categories]
        lengths = np.array([r.size for r in rows], dtype=np.int64)
        cols = np.concatenate(rows) if rows else np.empty(0, np.int64)
        width = n_categories if n_categories is not None else int(cols.max(initial=-1)) + 1
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        m = sp.csr_matrix((np.ones(cols.size, np.float32), cols, indptr), shape=(len(rows), max(width, 1)))
    m.data[:] = 1.0
    sizes = np.diff(m.indptr)
    m.data /= np.repeat(np.maximum(sizes, 1), sizes).astype(np.float32)
    return m


def encode_categories(
    item_categories: Sequence[Sequence[Hashable]],
) -> tuple[list[list[int]], list[Hashable]]:
    """Turn per-item category labels (e.g. genre names) into category indices.

    Args:
        item_categories: Per item (in item-index order), its category labels.

    Returns:
        ``(per-item index lists, labels)`` where ``labels[j]`` is the label of index ``j``;
        labels are numbered in sorted order, so the encoding is deterministic.
    """
    labels = sorted({c for cats in item_categories for c in cats}, key=str)
    code = {c: j for j, c in enumerate(labels)}
    return [[code[c] for c in cats] for cats in item_categories], labels


class AffinitySource(RetrievalSource):
    """Popular items in the categories a user prefers (see the module docstring for the model).

    Args:
        interactions: ``(n_users, n_items)`` binary training matrix (also the seen items).
        item_categories: Per item its category indices, or an ``(n_items, n_categories)`` matrix.
        config: Prior strength, smoothing and per-category cut.
        name: Source name for provenance.
        exclude_seen: Do not return items of the user's training row.

    Raises:
        TrainingDataError: the shapes disagree or no item has a category.
    """

    def __init__(
        self,
        interactions: sp.spmatrix | sp.sparray,
        item_categories: Sequence[Sequence[int]] | sp.spmatrix | sp.sparray,
        config: AffinityConfig | None = None,
        name: str = "affinity",
        exclude_seen: bool = True,
    ) -> None:
        x = sp.csr_matrix(interactions, dtype=np.float32)
        super().__init__(name, x if exclude_seen else None)
        self.config = cfg = config or AffinityConfig()
        cats = category_matrix(item_categories)
        if cats.shape[0] != x.shape[1]:
            raise TrainingDataError(
                f"{cats.shape[0]} items have categories but the matrix has {x.shape[1]} items"
            )
        if cats.nnz == 0:
            raise TrainingDataError("no item has a category; the affinity source needs item categories")
        x.data[:] = 1.0
        self._interactions = x
        self._cats = cats
        # Per-user fractional category counts and the population prior.
        self.user_counts: FloatArray = np.asarray((x @ cats).toarray(), dtype=np.float32)
        totals = self.user_counts.sum(axis=0)
        self.prior: FloatArray = (
            (totals / totals.sum()) if totals.sum() > 0 else np.full(cats.shape[1], 1.0 / cats.shape[1])
        ).astype(np.float32)
        # p(i | g) over the top items of each category, as a sparse (n_categories, n_items) matrix.
        pop = np.asarray(x.sum(axis=0)).ravel() + cfg.popularity_smoothing
        self.item_given_category: sp.csr_matrix = self._item_given_category(cats, pop, cfg.top_per_category)
        # Request-time form: only the kept items, as rows, so a request is one small mat-vec.
        self._kept_items: IntArray = np.unique(self.item_given_category.indices).astype(np.int64)
        self._kept_matrix = sp.csr_matrix(self.item_given_category.T.tocsr()[self._kept_items])

    @staticmethod
    def _item_given_category(cats: sp.csr_matrix, pop: npt.NDArray[np.floating], keep: int) -> sp.csr_matrix:
        member = sp.csc_matrix(cats.astype(bool).astype(np.float32))  # items x categories
        rows, cols, vals = [], [], []
        for g in range(member.shape[1]):
            items = member.indices[member.indptr[g] : member.indptr[g + 1]].astype(np.int64)
            if items.size == 0:
                continue
            w = pop[items]
            total = w.sum()
            if items.size > keep:
                top = np.argpartition(-w, keep - 1)[:keep]
                items, w = items[top], w[top]
            rows.append(np.full(items.size, g, np.int64))
            cols.append(items)
            vals.append((w / total).astype(np.float32))
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(cats.shape[1], cats.shape[0]),
        )

    def with_items(self, item_categories: Sequence[Sequence[int]]) -> AffinitySource:
        """A copy with new items (indices ``n_items ..``, in order) joining their categories.

        A new item has no interactions, so the model's own ``p(i | g)`` would put it last in
        every category. It enters each of its categories at the ``new_item_quantile`` of the
        category's kept weights instead (a cold-start prior), so it is retrieved for the users
        who like the category until the next training counts its interactions. This source is
        unchanged.

        Args:
            item_categories: Category indices of each new item (may be empty).
        """
        n_cat = self._cats.shape[1]
        rows = [[c for c in cs if 0 <= c < n_cat] for cs in item_categories]
        out = copy.copy(self)
        out._cats = sp.csr_matrix(sp.vstack([self._cats, category_matrix(rows, n_cat)]), dtype=np.float32)
        kept = self.item_given_category
        sizes = np.diff(kept.indptr)
        q = self.config.new_item_quantile
        prior = np.array(
            [
                float(np.quantile(kept.data[kept.indptr[g] : kept.indptr[g + 1]], q)) if sizes[g] else 0.0
                for g in range(n_cat)
            ],
            dtype=np.float32,
        )
        first = self._cats.shape[0]
        new_rows = sp.csr_matrix(
            (
                np.concatenate([prior[r] for r in rows]) if rows else np.empty(0, np.float32),
                np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows else np.empty(0, np.int64),
                np.concatenate([[0], np.cumsum([len(r) for r in rows])]),
            ),
            shape=(len(rows), n_cat),
            dtype=np.float32,
        )
        out._kept_items = np.concatenate(
            [self._kept_items, np.arange(first, first + len(rows), dtype=np.int64)]
        )
        out._kept_matrix = sp.csr_matrix(sp.vstack([self._kept_matrix, new_rows]), dtype=np.float32)
        return out

    def preferences(self, ctx: UserContext | int) -> FloatArray:
        """Posterior-mean category preferences ``theta_u`` (sums to 1).

        Args:
            ctx: A user index or context; unknown users with no ``recent_items`` get the prior.

        Returns:
            ``(n_categories,)`` float32.
        """
        c = ctx if isinstance(ctx, UserContext) else UserContext(user_index=int(ctx))
        counts = np.zeros(self.prior.size, np.float32)
        if 0 <= c.user_index < self.user_counts.shape[0]:
            counts += self.user_counts[c.user_index]
        if c.recent_items is not None:
            recent = np.asarray(c.recent_items, dtype=np.int64).ravel()
            recent = recent[(recent >= 0) & (recent < self._cats.shape[0])]
            if recent.size:
                counts += csr_rows_sum(self._cats, recent)
        alpha = np.float32(self.config.prior_strength)
        theta = (counts + alpha * self.prior) / (counts.sum() + alpha)
        return theta.astype(np.float32)

    def _retrieve(self, ctx: UserContext, n: int) -> Candidates:
        scores = self._kept_matrix @ self.preferences(ctx)
        return top_n(scores, n, self._kept_items)
