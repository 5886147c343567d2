"""The computations of one trained bundle: request context, retrieval, merge, ranker scores, re-rank.

:class:`Funnel` is plain Python (numpy, torch, FAISS). It does not orchestrate:
:class:`~streamrec.funnel.recommender.RecommenderStages` puts it behind the stage interface and
:func:`~streamrec.funnel.stages.run_funnel` runs those stages everywhere: in both Serve
compositions (user features from the online store) and offline
(:mod:`streamrec.funnel.offline`: the evaluation and the batch precompute, features as of a
cutoff), so the evaluation measures exactly the code that serves.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from streamrec.data.catalogue import creates_item
from streamrec.data.ids import IdMap
from streamrec.data.schema import storable_id
from streamrec.errors import ConfigError, ModelError
from streamrec.features.defaults import apply_defaults
from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
from streamrec.funnel.stages import COVISIT, NEW_ARRIVALS, SOURCE_NAMES, Candidates
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
from streamrec.retrieval.covisit import CovisitSource
from streamrec.retrieval.index import AnnSource, VectorIndex
from streamrec.retrieval.merge import MergedCandidates, merge_candidates
from streamrec.retrieval.new_arrivals import NewArrivalsSource
from streamrec.retrieval.trending import TrendingSource
from streamrec.timeutil import epoch_s

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]



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
        covisit: Co-visitation source, or ``None`` (disabled, or a bundle trained before it).
        new_arrivals: New-arrivals source, or ``None`` (disabled).
    """

    users: IdMap
    train: sp.csr_matrix
    two_tower: TwoTowerModel
    item_vectors: F32
    tt_index: VectorIndex
    cf: CFSource
    affinity: AffinitySource
    trending: TrendingSource
    covisit: CovisitSource | None = None
    new_arrivals: NewArrivalsSource | None = None

    @property
    def source_names(self) -> tuple[str, ...]:
        """The sources these models serve, in the order of the ranker's per-source columns."""
        optional = ((COVISIT, self.covisit), (NEW_ARRIVALS, self.new_arrivals))
        return (*SOURCE_NAMES, *(name for name, source in optional if source is not None))


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


def _built_from(fields: Mapping[str, Any]) -> tuple[tuple[str, ...], int]:
    """What a new item's rows are built from: its category names and publication time (epoch s)."""
    when = fields.get("published_at") or fields.get("first_seen_at")  # unset: when first logged
    published = 0
    if when is not None:
        published = int(epoch_s(when if isinstance(when, int | float) else str(when)))
    return tuple(str(c) for c in fields.get("categories") or ()), published


def _carry_engagement(src: Funnel, dst: Funnel) -> None:
    """Copy the streamed engagement of the new items ``src`` holds into ``dst`` (renumbered), by id."""
    ids = np.fromiter(src.added, dtype=np.int64, count=len(src.added))
    old, new = src.table.index_of(ids), dst.table.index_of(ids)
    ok = (old >= 0) & (new >= 0)
    old, new = old[ok], new[ok]
    if not old.size:
        return
    dst.table = dst.table.with_rows_from(src.table, old, new)
    dst.features = dst.features.with_table(dst.table)
    trending = copy.copy(dst.models.trending)
    trending._score = trending._score.copy()
    trending._score[new] = src.models.trending._score[old]
    trending._cache = None
    dst.models = replace(dst.models, trending=trending)


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

    #: The sources of this funnel (:attr:`RetrievalModels.source_names`; set per instance).
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
        wanted = settings.merged_sources
        self.source_names = tuple(s for s in models.source_names if wanted is None or s in wanted)
        if not self.source_names:
            raise ConfigError(
                f"retrieval.merged_sources {wanted} names none of this bundle's sources "
                f"{list(models.source_names)}: list at least one of them"
            )
        self.features = RankerFeatures(table, self.source_names)
        if exposure is None:
            exposure = np.asarray(models.train.sum(axis=0)).ravel()
        self.reranker = ReRanker(item_metadata(table, exposure), rerank or ReRankConfig())
        self._bundle_metadata = self.reranker.metadata
        self._tt_source = AnnSource(models.tt_index, lambda ctx: None, "two_tower", models.train)
        #: The funnel over the bundle alone (new items are appended to a copy of it).
        self._base: Funnel = self
        #: Catalogue items appended after the bundle's, in row order, with the fields they were built from.
        self.added: dict[int, tuple[tuple[str, ...], int]] = {}

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
            recent_items=history,
            query_vector=q,
            history=history,
            exclude=excl_rows if excl_rows.size else None,
            now=float(now),
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
        """Candidates of one source (``two_tower``, ``cf``, ``affinity``, ``trending``, ``covisit``, ``new_arrivals``).

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
            return m.cf.retrieve(replace(ctx.retrieval, query_vector=q), n)
        if source == "affinity":
            return m.affinity.retrieve(replace(ctx.retrieval, query_vector=None), n)
        if source == "trending":
            return m.trending.retrieve(replace(ctx.retrieval, query_vector=None), n)
        if source == COVISIT and m.covisit is not None:
            return m.covisit.retrieve(replace(ctx.retrieval, query_vector=None), n)
        if source == NEW_ARRIVALS and m.new_arrivals is not None:
            return m.new_arrivals.retrieve(replace(ctx.retrieval, query_vector=None), n)
        raise KeyError(f"unknown retrieval source '{source}'; known: {', '.join(self.source_names)}")

    def merge(self, parts: dict[str, tuple[I64, F32]]) -> tuple[MergedCandidates, F32]:
        """Union of the sources with agreement bonus; also each source's normalised score per item.

        Rows this funnel does not hold yet are left out: in the cluster composition another
        stage replica may have appended a new catalogue item a moment earlier.
        """
        n = len(self.table)
        parts = {
            name: (items, scores)
            if not items.size or int(items.max()) < n
            else (items[items < n], scores[items < n])
            for name, (items, scores) in parts.items()
        }
        merged = merge_candidates(
            parts,
            self.settings.merged,
            self.settings.agreement_bonus,
            normalisation=self.settings.normalisation,
        )
        src = np.zeros((len(merged), len(self.source_names)), dtype=np.float32)
        if len(merged):
            order = np.argsort(merged.items, kind="stable")
            sorted_items = merged.items[order]
            for j, name in enumerate(self.source_names):
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
        cf = np.zeros(items.size, np.float32)
        if ctx.cf_vector is not None:  # items appended from the catalogue have no CF factors: 0
            factors = m.cf.model.item_factors
            known = items < factors.shape[0]
            cf[known] = factors[items[known]] @ ctx.cf_vector
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

    def keep_best(
        self,
        scores: npt.NDArray[np.floating[Any]],
        k: int = 0,
        items: I64 | None = None,
        now: float | None = None,
    ) -> I64:
        """Positions of the best ``settings.ranked`` scores (``k`` when more are asked for), best first.

        With ``items`` (their rows) and ``now``: the cut reaches past candidates the re-ranker
        will drop anyway (unpublished ones under ``hide_unpublished``, rows its metadata does not
        hold yet), so it still gets that many items it may serve; and the best fresh candidates below
        the cut are kept too (as many as the re-ranker's freshness quota asks for), after the
        others: a new item has no engagement for the ranker to score, and the quota can only place
        fresh items that reach the re-ranker.
        """
        order = np.argsort(-scores, kind="stable")
        cut = max(self.settings.ranked, k)
        if items is None or now is None or order.size <= cut:
            return order[:cut].astype(np.int64)
        config = self.reranker.config
        meta = self.reranker.metadata
        rows = items[order]
        pub = np.zeros(rows.size)
        known = rows < len(meta)
        pub[known] = meta.published_at[rows[known]]
        # Rows the re-ranking metadata does not hold yet (another replica appended them a
        # moment earlier) are dropped by rerank() too: neither counts towards the cut.
        servable = known & (pub <= now) if config.hide_unpublished else known
        if not servable[:cut].all():
            cut = min(int(np.searchsorted(np.cumsum(servable), cut)) + 1, order.size)
        keep = order[:cut]
        fresh_cfg = config.freshness
        if fresh_cfg.min_items <= 0 or order.size <= cut:
            return keep.astype(np.int64)
        rest_pub = pub[cut:]
        fresh = (rest_pub >= now - fresh_cfg.window_hours * 3600.0) & (rest_pub <= now)
        extra = order[cut:][fresh][: fresh_cfg.min_items]
        return np.concatenate([keep, extra]).astype(np.int64)

    def with_catalogue(self, changes: Mapping[int, Mapping[str, Any]]) -> Funnel:
        """A funnel serving the bundle plus the catalogue ``changes`` (this one is unchanged).

        Changes to items the bundle holds (promoted, flagged, categories, publication time) go
        into the re-ranking metadata. Items the bundle does not hold are appended as new rows,
        in the order of ``changes`` (the catalogue log's order, so every replica numbers them
        alike): into the item table, the two-tower vectors (the item tower on their categories)
        and its ANN index, the affinity, trending and new-arrivals sources and the re-ranking
        metadata (the freshness quota sees their publication time). Publication times changed
        for any item reach the new-arrivals source too. Rows only ever grow, so a request that
        began on this funnel can finish on the returned one. Appending continues from this
        funnel when the earlier new items are unchanged, else starts again from the bundle's.

        Args:
            changes: ``item_id -> fields`` in force (:attr:`CatalogueState.items`).
        """
        base = self._base
        new_ids = [iid for iid in changes if creates_item(changes[iid]) and base.table.index(iid) < 0]
        built = {iid: _built_from(changes[iid]) for iid in new_ids}
        added = list(self.added)
        if new_ids[: len(added)] == added and all(built[i] == self.added[i] for i in added):
            start, todo = self, new_ids[len(added) :]
        else:  # an earlier new item changed (or the log was reset): number them again, in log order
            start, todo = base, new_ids
        out = start._appended(todo, built) if todo else copy.copy(start)
        if start is base and self.added:
            _carry_engagement(self, out)
        if not out.added:
            out._base = out
        out.reranker = ReRanker(out._bundle_metadata.with_changes(changes), self.reranker.config)
        # New arrivals follow the publication times in force (the bundle's, with the catalogue's
        # changes; rebuilt from them, so a replaced log also takes its changes back). Table and
        # metadata rows are the same rows.
        arrivals = out.models.new_arrivals
        pub = out.reranker.metadata.published_at
        if arrivals is not None and not np.array_equal(arrivals.published_at, pub):
            out.models = replace(out.models, new_arrivals=arrivals.with_published(pub))
        return out

    def with_engagement(
        self, item_ids: npt.ArrayLike, timestamps: npt.ArrayLike, labels: npt.ArrayLike
    ) -> Funnel:
        """A funnel with streamed events counted in (this one is unchanged: copy-on-write).

        Positive events feed the trending source; every event feeds the item table's
        engagement columns (:meth:`ItemFeatureTable.with_engagement`), which the ranker reads.
        Events of items this funnel does not hold are ignored.

        Args:
            item_ids: Item id of each event.
            timestamps: Event times, Unix seconds.
            labels: 1 for a positive (engaged) event, else 0.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        ts = np.asarray(timestamps, dtype=np.float64).ravel()
        lab = np.asarray(labels, dtype=np.int64).ravel()
        out = self._engaged(ids, ts, lab)
        if self._base is self:
            out._base = out
        else:  # new items renumbered from the bundle's funnel keep these events too
            base = self._base._engaged(ids, ts, lab)
            base._base = base
            out._base = base
        return out

    def _engaged(self, ids: I64, ts: npt.NDArray[np.float64], labels: I64) -> Funnel:
        rows = self.table.index_of(ids)
        out = copy.copy(self)
        out.table = self.table.with_engagement(rows, ts, labels)
        out.features = self.features.with_table(out.table)
        positive = (rows >= 0) & (labels == 1)
        out.models = replace(
            self.models, trending=self.models.trending.with_events(rows[positive], ts[positive])
        )
        return out

    def _appended(self, ids: list[int], built: Mapping[int, tuple[tuple[str, ...], int]]) -> Funnel:
        """A copy with ``ids`` appended as new rows (see :meth:`with_catalogue`)."""
        m = self.models
        table = self.table.with_items(
            ids,
            [built[i][0] for i in ids],
            [built[i][1] for i in ids],
            apply_defaults({}, features=DENSE_FEATURES),
        )
        first = len(self.table)
        rows = np.arange(first, len(table), dtype=np.int64)
        width = m.two_tower.n_categories
        cats = np.zeros((len(ids), width), np.float32)
        new_codes = [
            table.categories_indices[table.categories_indptr[r] : table.categories_indptr[r + 1]]
            for r in rows
        ]
        for j, codes in enumerate(new_codes):
            codes = codes[codes < width]
            cats[j, codes] = 1.0
        with torch.inference_mode():
            vectors = m.two_tower.encode_items(
                cats if width else None, np.zeros((len(ids), 0), np.float32), np.full(len(ids), -1, np.int64)
            )
        tt_index = m.tt_index.with_added(vectors, rows)
        models = replace(
            m,
            item_vectors=np.ascontiguousarray(np.vstack([m.item_vectors, vectors])),
            tt_index=tt_index,
            affinity=m.affinity.with_items([c.tolist() for c in new_codes]),
            trending=m.trending.with_items(len(ids)),
            covisit=None if m.covisit is None else m.covisit.with_items(len(ids)),
            new_arrivals=None if m.new_arrivals is None else m.new_arrivals.with_items(table.published_at[rows]),
        )
        out = copy.copy(self)
        out.models, out.table = models, table
        out.features = self.features.with_table(table)
        # Their publication time as the table has it (an upsert without published_at: when the
        # log first described it), so the freshness quota and new arrivals agree; the catalogue's
        # own published_at, applied by with_catalogue, still wins.
        out._bundle_metadata = self._bundle_metadata.with_items(ids).with_changes(
            {i: {"published_at": built[i][1]} for i in ids if built[i][1]}
        )
        out._tt_source = AnnSource(tt_index, lambda ctx: None, "two_tower", m.train)
        out.added = {**self.added, **{i: built[i] for i in ids}}
        return out

    def rerank(self, ctx: FunnelContext, ranked: Candidates, k: int) -> ReRankResult:
        """Apply the business rules (policy, seen, promotion, freshness, diversity, fairness)."""
        # The history goes in as *seen* items, the request's ``exclude`` as excluded rows: the
        # seen-item rule (``suppress_seen``) then applies to it and counts it on its own.
        reranker = self.reranker
        n = len(reranker.metadata)
        history = (
            ctx.history
            if not ctx.history.size or int(ctx.history.max()) < n
            else ctx.history[ctx.history < n]
        )
        items, scores, sources = ranked.items, ranked.scores, ranked.sources
        if items.size and int(items.max()) >= n:  # rows another replica added first
            keep = np.flatnonzero(items < n)
            items, scores, sources = items[keep], scores[keep], [sources[i] for i in keep]
        return reranker.rerank_arrays(
            items,
            scores,
            sources,
            k=k,
            seen_ids=self.table.item_ids[history],
            exclude_rows=ctx.exclude_rows,
            now=ctx.now,
        )
