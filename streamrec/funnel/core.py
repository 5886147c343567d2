"""The computations of one trained bundle: request context, retrieval, merge, ranker scores, re-rank.

:class:`Funnel` is plain Python (numpy, torch, FAISS). It does not orchestrate:
:class:`~streamrec.funnel.recommender.RecommenderStages` puts it behind the stage interface and
:func:`~streamrec.funnel.stages.run_funnel` runs those stages everywhere: in both Serve
compositions (user features from the online store) and offline
(:mod:`streamrec.funnel.offline`: the evaluation and the batch precompute, features as of a
cutoff), so the evaluation measures exactly the code that serves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from streamrec.data.ids import IdMap
from streamrec.data.schema import storable_id
from streamrec.errors import ModelError
from streamrec.features.item_table import ItemFeatureTable
from streamrec.funnel.stages import Candidates
from streamrec.models.scoring import RankerScorer
from streamrec.models.two_tower import HISTORY_PAD, TwoTowerModel
from streamrec.ranking.features import (
    DEVICE_INDEX,
    SKEW_CATEGORICAL,
    RankerFeatures,
    category_pref_matrix,
    user_dense_matrix,
)
from streamrec.reranking import ItemMetadata, ReRankConfig, ReRanker, ReRankResult
from streamrec.retrieval.affinity import AffinitySource
from streamrec.retrieval.base import UserContext as RetrievalContext
from streamrec.retrieval.cf import CFSource
from streamrec.retrieval.config import RetrievalSettings
from streamrec.retrieval.index import AnnSource, VectorIndex
from streamrec.retrieval.merge import MergedCandidates, merge_candidates
from streamrec.retrieval.trending import TrendingSource

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

SOURCE_NAMES: tuple[str, ...] = ("two_tower", "cf", "affinity", "trending")


@dataclass
class RetrievalModels:
    """Retrieval state fitted at one cutoff (item index = item table row).

    Attributes:
        users: Raw user id <-> dense user index of the models.
        train: ``(n_users, n_items)`` binary matrix of training positives (also "seen" items).
        two_tower: The two-tower model (eval mode).
        item_vectors: ``(n_items, d)`` two-tower item embeddings.
        tt_index: FAISS index over ``item_vectors``.
        cf: Collaborative-filtering source (ALS + its index).
        affinity: Category-affinity source.
        trending: Trending source.
    """

    users: IdMap
    train: sp.csr_matrix
    two_tower: TwoTowerModel
    item_vectors: F32
    tt_index: VectorIndex
    cf: CFSource
    affinity: AffinitySource
    trending: TrendingSource


@dataclass
class FunnelContext:
    """One request's resolved state (see :meth:`Funnel.context`)."""

    user_id: int
    user_idx: int
    now: float
    device: int
    user_dense: F32
    category_prefs: F32
    history: I64
    exclude_rows: I64
    retrieval: RetrievalContext
    cf_vector: F32 | None
    unknown_exclude_ids: int = 0
    notes: list[str] = field(default_factory=list)


def item_metadata(table: ItemFeatureTable, exposure: npt.ArrayLike | None = None) -> ItemMetadata:
    """Re-ranking metadata from the item table (catalog row = table row)."""
    cats = [c or [-1] for c in table.category_lists()]
    return ItemMetadata(
        item_ids=table.item_ids,
        categories=cats,
        creators=table.creator_id.astype(np.int64),
        published_at=table.published_at,
        promoted=table.promoted,
        flagged=table.flagged,
        exposure=exposure,
        category_names=table.category_vocab,
        creator_names=table.creator_vocab,
    )


class Funnel:
    """Retrieval sources, merge, ranker and re-ranker over one bundle.

    Args:
        models: Fitted retrieval models.
        table: Item feature table (row = item index of every model).
        ranker: Ranker scorer, or ``None`` to order by the merged retrieval score
            (the ``simple_ranking`` level).
        settings: Candidate counts and merge settings.
        rerank: Re-ranking rules.
        exposure: Per-item exposure counts for the fairness rule (default: training positives).
    """

    source_names = SOURCE_NAMES

    def __init__(
        self,
        models: RetrievalModels,
        table: ItemFeatureTable,
        ranker: RankerScorer | None,
        settings: RetrievalSettings,
        rerank: ReRankConfig | None = None,
        exposure: npt.ArrayLike | None = None,
    ) -> None:
        self.models = models
        self.table = table
        self.ranker = ranker
        self.settings = settings
        self.features = RankerFeatures(table, SOURCE_NAMES)
        if exposure is None:
            exposure = np.asarray(models.train.sum(axis=0)).ravel()
        self.reranker = ReRanker(item_metadata(table, exposure), rerank or ReRankConfig())
        self._bundle_metadata = self.reranker.metadata
        self._tt_source = AnnSource(models.tt_index, lambda ctx: None, "two_tower", models.train)

    # ------------------------------------------------------------------ context
    def context(
        self,
        user_id: int,
        features: dict[str, Any],
        *,
        now: float,
        device: str = "unknown",
        exclude_ids: npt.ArrayLike = (),
    ) -> FunnelContext:
        """Resolve a request: user index, features, history, query vectors, exclusions.

        Args:
            user_id: Raw user id (unknown users get the cold-start path).
            features: The user's feature values (online store, or offline as of a cutoff),
                defaults applied.
            now: Request time, epoch seconds.
            device: Request device name.
            exclude_ids: Raw item ids never to return.
        """
        m = self.models
        # An id beyond int64 cannot be a known user: the cold-start path, like any unknown id.
        user_idx = int(m.users.to_index(np.asarray([user_id]))[0]) if storable_id(user_id) else -1
        raw_recent = features.get("recent_item_ids")
        recent = np.asarray([] if raw_recent is None else raw_recent, dtype=np.int64).ravel()
        history = self.table.index_of(recent) if recent.size else np.empty(0, np.int64)
        history = history[history >= 0][: self.settings.history_length]
        try:
            excl = np.asarray(exclude_ids, dtype=np.int64).ravel()
            beyond_int64 = 0
        except OverflowError:  # the slow path only for ids no catalogue can hold
            raw = np.asarray(exclude_ids, dtype=object).ravel().tolist()
            excl = np.asarray([i for i in raw if storable_id(i)], dtype=np.int64)
            beyond_int64 = len(raw) - excl.size
        excl_rows = self.table.index_of(excl) if excl.size else np.empty(0, np.int64)
        unknown = int((excl_rows < 0).sum()) + beyond_int64
        excl_rows = excl_rows[excl_rows >= 0]
        udense = user_dense_matrix(features)
        prefs = category_pref_matrix([features.get("category_prefs")], len(self.table.category_vocab))
        hist_pad = np.full((1, self.settings.history_length), HISTORY_PAD, dtype=np.int64)
        hist_pad[0, : history.size] = history
        with torch.inference_mode():
            q = m.two_tower.encode_users(np.asarray([user_idx]), udense, hist_pad)
        rctx = RetrievalContext(
            user_index=user_idx,
            recent_items=np.concatenate([history, excl_rows]) if excl_rows.size else history,
            query_vector=q,
        )
        cf_vec = m.cf.query_vector(RetrievalContext(user_index=user_idx, recent_items=history))
        return FunnelContext(
            user_id=int(user_id),
            user_idx=user_idx,
            now=float(now),
            device=DEVICE_INDEX.get(device, DEVICE_INDEX["unknown"]),
            user_dense=udense,
            category_prefs=prefs,
            history=history,
            exclude_rows=excl_rows,
            retrieval=rctx,
            cf_vector=cf_vec,
            unknown_exclude_ids=unknown,
        )

    # ---------------------------------------------------------------- retrieval
    def retrieve(self, source: str, ctx: FunnelContext, n: int | None = None) -> tuple[I64, F32]:
        """Candidates of one source (``two_tower``, ``cf``, ``affinity``, ``trending``).

        Args:
            source: Source name.
            ctx: The request context.
            n: Candidates wanted (default ``settings.per_source``).
        """
        n = self.settings.per_source if n is None else n
        m = self.models
        if source == "two_tower":
            return self._tt_source.retrieve(ctx.retrieval, n)
        if source == "cf":
            # The CF query was computed once in context() (also a ranker feature): reuse it.
            q = None if ctx.cf_vector is None else ctx.cf_vector[None, :]
            return m.cf.retrieve(RetrievalContext(ctx.user_idx, ctx.retrieval.recent_items, q), n)
        if source == "affinity":
            return m.affinity.retrieve(RetrievalContext(ctx.user_idx, ctx.retrieval.recent_items), n)
        if source == "trending":
            return m.trending.retrieve(RetrievalContext(ctx.user_idx, ctx.retrieval.recent_items), n)
        raise KeyError(f"unknown retrieval source '{source}'; known: {', '.join(SOURCE_NAMES)}")

    def merge(self, parts: dict[str, tuple[I64, F32]]) -> tuple[MergedCandidates, F32]:
        """Union of the sources with agreement bonus; also each source's normalised score per item."""
        merged = merge_candidates(
            parts,
            self.settings.merged,
            self.settings.agreement_bonus,
            normalisation=self.settings.normalisation,
        )
        src = np.zeros((len(merged), len(SOURCE_NAMES)), dtype=np.float32)
        if len(merged):
            order = np.argsort(merged.items, kind="stable")
            sorted_items = merged.items[order]
            for j, name in enumerate(SOURCE_NAMES):
                if name not in parts:
                    continue
                items, scores = parts[name]
                if items.size == 0:
                    continue
                lo, hi = float(scores.min()), float(scores.max())
                norm = (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)
                pos = np.searchsorted(sorted_items, items)
                ok = (pos < sorted_items.size) & (
                    sorted_items[np.minimum(pos, sorted_items.size - 1)] == items
                )
                src[order[pos[ok]], j] = np.maximum(norm[ok], 1e-3)
        return merged, src

    # ------------------------------------------------------------------ ranking
    def ranker_inputs(
        self, ctx: FunnelContext, items: I64, source_scores: F32, item_dense: F32 | None = None
    ) -> tuple[F32, npt.NDArray[np.int64]]:
        """The ranker's ``(dense, sparse)`` for one user's candidates."""
        m = self.models
        q = ctx.retrieval.query_vector
        tt = (m.item_vectors[items] @ q[0]) if q is not None else np.zeros(items.size, np.float32)
        cf = (
            m.cf.model.item_factors[items] @ ctx.cf_vector
            if ctx.cf_vector is not None
            else np.zeros(items.size, np.float32)
        )
        return self.features.build(
            user_dense=ctx.user_dense,
            category_prefs=ctx.category_prefs,
            item_rows=items,
            item_dense=self.table.dense[items] if item_dense is None else item_dense,
            now=ctx.now,
            device=ctx.device,
            two_tower=np.asarray(tt, dtype=np.float32),
            cf=np.asarray(cf, dtype=np.float32),
            source_scores=source_scores,
        )

    def score_with_inputs(
        self, ctxs: list[FunnelContext], items: list[I64], source_scores: list[F32]
    ) -> tuple[list[F32], list[F32]]:
        """Ranker scores of several requests' candidates in ONE forward pass, with their logged inputs.

        Scores are row-wise, so each request gets the scores it would get alone (up to float
        rounding in the matrix multiply); batching trades several small matrix multiplies (and,
        on a GPU, transfers and kernel launches) for one larger one.

        The logged inputs are the dense columns followed by :data:`SKEW_CATEGORICAL`'s sparse
        ids (as floats): columns :attr:`logged_input_names`.

        Raises:
            ModelError: no ranker is loaded.
        """
        if self.ranker is None:
            raise ModelError("no ranker is loaded")
        layout = self.features.layout
        cat = [layout.sparse.index(n) for n in SKEW_CATEGORICAL if n in layout.sparse]
        width = len(self.logged_input_names)
        out: list[F32] = [np.empty(0, np.float32) for _ in items]
        logged: list[F32] = [np.empty((0, width), np.float32) for _ in items]
        order = [i for i, it in enumerate(items) if it.size]
        inputs = {i: self.ranker_inputs(ctxs[i], items[i], source_scores[i]) for i in order}
        for i in order:
            logged[i] = np.concatenate([inputs[i][0], inputs[i][1][:, cat].astype(np.float32)], axis=1)
        if len(order) == 1:
            out[order[0]] = self.ranker.score(*inputs[order[0]])
        elif order:
            flat = self.ranker.score(
                np.concatenate([inputs[i][0] for i in order]), np.concatenate([inputs[i][1] for i in order])
            )
            bounds = np.cumsum([0] + [items[i].size for i in order])
            for j, i in enumerate(order):
                out[i] = flat[bounds[j] : bounds[j + 1]]
        return out, logged

    @property
    def logged_input_names(self) -> tuple[str, ...]:
        """Columns of :meth:`score_with_inputs`' inputs: the dense ones, then the logged sparse ids."""
        layout = self.features.layout
        return (*layout.dense, *(n for n in SKEW_CATEGORICAL if n in layout.sparse))

    def keep_best(self, scores: npt.NDArray[np.floating[Any]], k: int = 0) -> I64:
        """Positions of the best ``settings.ranked`` scores (``k`` when more are asked for), best first."""
        return np.argsort(-scores, kind="stable")[: max(self.settings.ranked, k)].astype(np.int64)

    def apply_catalogue(self, changes: Mapping[int, Mapping[str, Any]]) -> None:
        """Re-rank with the bundle's item metadata plus catalogue ``changes``.

        Changes to items the bundle holds (promoted, flagged, categories, publication time) are
        applied to a copy, swapped in by one assignment.
        """
        self.reranker = ReRanker(self._bundle_metadata.with_changes(changes), self.reranker.config)

    def rerank(self, ctx: FunnelContext, ranked: Candidates, k: int) -> ReRankResult:
        """Apply the business rules (policy, seen, promotion, freshness, diversity, fairness)."""
        # The history goes in as *seen* items, the request's ``exclude`` as excluded rows: the
        # seen-item rule (``suppress_seen``) then applies to it and counts it on its own.
        return self.reranker.rerank_arrays(
            ranked.items,
            ranked.scores,
            ranked.sources,
            k=k,
            seen_ids=self.table.item_ids[ctx.history],
            exclude_rows=ctx.exclude_rows,
            now=ctx.now,
        )
