"""The trained recommender as :class:`~streamrec.funnel.stages.Stages` (what production serves).

:func:`build_stages` loads the registry's ``champion`` bundle (verified), aligns the in-memory
item table to it, and wraps a :class:`~streamrec.funnel.core.Funnel`. The stages only compute;
the degradation levels live where the failing dependency is called
(:class:`~streamrec.service.runner.StageRunner`: ``stale_features``, ``simple_ranking``) and in
the request policy (:class:`~streamrec.service.policy.FunnelService`: ``batch``, ``popularity``,
``cached``). :meth:`RecommenderStages.simple_rank` is the ``simple_ranking`` order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.config import parse_config
from streamrec.data.catalogue import CatalogueState
from streamrec.data.event_tail import EventTail
from streamrec.errors import ModelError, OnlineStoreUnavailableError, StreamRecError
from streamrec.funnel.core import Funnel, FunnelContext
from streamrec.funnel.fallback import BatchTopN
from streamrec.funnel.stages import Candidates, UserContext, check_context_version
from streamrec.reranking.config import ReRankConfig

log = logging.getLogger(__name__)

#: Severity order of the degradation levels (a response reports the worst one that applied).
_LEVELS = ("full", "stale_features", "simple_ranking", "batch", "popularity", "cached")
#: Ranker input rows per request sampled over every scored candidate (for the skew check).
SCORED_SAMPLE = 16


class RecommenderStages:
    """The funnel of one model version behind the stage interface.

    Args:
        funnel: The funnel over the loaded bundle.
        features: Feature client for online user features (``online_user_features``), or None
            to serve every user from defaults.
        model_version: Version string reported in responses.
        batch: The batch-precomputed top-N of this model version (the ``batch`` level).
        titles: Optional item titles by item index.
        snapshot: The users' batch feature snapshot (offline store, indexed by ``user_id``): the
            features ``stale_features`` serves a user this replica has not seen yet.
    """

    #: Torch, FAISS and the online store: the runner calls these methods off the event loop.
    blocking = True
    #: Sources the runner would call in a worker call of their own, apart from the others' shared
    #: one (ADR-016). None: FAISS apart (``("two_tower",)``) measured no faster than one call for
    #: all four, and one more thread hop per request costs CPU on a saturated box.
    solo_sources: tuple[str, ...] = ()

    def __init__(
        self,
        funnel: Funnel,
        features: Any,
        model_version: str,
        batch: BatchTopN | None = None,
        titles: list[str | None] | None = None,
        snapshot: pd.DataFrame | None = None,
        trained_at: float | None = None,
        features_built_at: float | None = None,
    ) -> None:
        self.trained_at = trained_at
        self._rng = np.random.default_rng()
        self.features_built_at = features_built_at
        self.funnel = funnel
        self.features = features
        self.model_version = model_version
        self.source_names = funnel.source_names
        self.batch = batch or BatchTopN.empty(model_version)
        self.titles = titles
        self._bundle_titles = titles
        self._swap_lock = threading.Lock()  # one funnel update at a time (catalogue, engagement)
        #: Receipt time (Unix s) of the last event-log event the loaded state counts already.
        self.engagement_since = 0.0
        self.snapshot = snapshot
        #: Catalogue log lines applied (:meth:`apply_catalogue`).
        self.catalogue_lines = 0
        #: The catalogue state in force (the object a view published; identity says "unchanged").
        self.catalogue_state: CatalogueState | None = None

    def apply_catalogue(self, state: CatalogueState) -> bool:
        """Serve with the catalogue changes of ``state`` (blocking: new items, re-ranking metadata).

        Returns:
            Whether anything was applied (False when ``state`` is the one already in force).
        """
        if state is self.catalogue_state:  # a view publishes a new state object per change
            return False
        with self._swap_lock:
            current = self.catalogue_state
            if current is not None and state.generation <= current.generation:
                return False  # read before the state in force (two applies raced): never go back
            funnel = self.funnel.with_catalogue(state.items)
            if self._bundle_titles is not None:  # the appended items' titles, in row order
                added = (state.items.get(i, {}).get("title") for i in funnel.added)
                self.titles = [*self._bundle_titles, *added]
            self.funnel = funnel  # one assignment: a request sees the old funnel or the new one
            self.catalogue_state = state
            self.catalogue_lines = state.lines
        return True

    def apply_engagement(self, item_ids: np.ndarray, timestamps: np.ndarray, labels: np.ndarray) -> None:
        """Count streamed events into the trending source and the item table (blocking).

        See :meth:`~streamrec.funnel.core.Funnel.with_engagement`; swapped in by one assignment.

        Args:
            item_ids: Item id of each event.
            timestamps: Event times, Unix seconds.
            labels: 1 for a positive (engaged) event, else 0.
        """
        with self._swap_lock:
            self.funnel = self.funnel.with_engagement(item_ids, timestamps, labels)

    def describe(self) -> dict[str, Any]:
        """Facts for the readiness endpoint."""
        return {
            "catalogue_lines": str(self.catalogue_lines),  # text: the status over replicas sums ints
            "model_version": self.model_version,
            "items": len(self.funnel.table),
            "users": len(self.funnel.models.users),
            "batch_fallback_users": len(self.batch),
            "snapshot_users": 0 if self.snapshot is None else len(self.snapshot),
            "trained_at": self.trained_at,
            "features_built_at": self.features_built_at,
            "batch_computed_at": self.batch.computed_at,
            "rerank": self.funnel.reranker.config.model_dump(),
        }

    def self_check(self) -> None:
        """Serve a known and a new user in-process; raise unless both answer at ``full``.

        A bundle can load (files verify, shapes read) and still fail on a real request: a
        ranker whose inputs do not match, an index of the wrong width. Loading (and every hot
        reload's prepare) runs this first, so such a bundle is refused before it serves.

        An online store that is down at load is not the bundle's fault: the check then runs
        on default features.

        Raises:
            ModelError: the model failed on a request, or a request degraded (e.g. to
                ``simple_ranking``) or came back empty. Failures of the environment (a store,
                the disk) propagate as they are, so that a reload can be retried.
        """
        known = self.funnel.models.users.raw_ids
        users = [int(known[0]), int(known.max()) + 1] if len(known) else [0]  # a known one, a new one
        for user_id in users:
            request = RecommendRequest(user_id=user_id, k=10)
            try:
                try:
                    feats = self.read_features(user_id)
                except OnlineStoreUnavailableError:  # the store may be down at load: not the bundle's fault
                    feats = {}
                ctx = self.user_context(request, feats)
                parts = {s: self.retrieve(s, ctx) for s in self.source_names}
                out = self.rerank(ctx, self.rank(ctx, self.merge(ctx, parts)))
            except (StreamRecError, OSError, MemoryError):
                raise  # ours already say what failed; the environment's can be retried later
            except Exception as err:  # the model's own code failed on a real request: the bundle
                raise ModelError(
                    f"model {self.model_version} failed a test request for user {user_id}: {err}"
                ) from err
            level = out.metadata.degradation_level
            if level not in ("full", "stale_features") or not out.items:
                raise ModelError(
                    f"model {self.model_version} answered a test request for user {user_id} with "
                    f"{len(out.items)} items at level '{level}' (expected 'full' or 'stale_features')"
                )

    # ------------------------------------------------------------------ stages
    def read_features(self, user_id: int) -> dict[str, Any]:
        """The user's online features, defaults applied (blocking I/O).

        Raises:
            OnlineStoreUnavailableError: the online store cannot be reached.
        """
        if self.features is None:
            return {}
        feats: dict[str, Any] = self.features.online_user_features(user_id)
        return feats

    def snapshot_features(self, user_id: int) -> dict[str, Any] | None:
        """The user's features in the batch snapshot loaded with the model (None when absent)."""
        snap = self.snapshot
        if snap is None or user_id not in snap.index:
            return None
        return {k: v for k, v in snap.loc[user_id].items()}

    def user_context(self, request: RecommendRequest, features: dict[str, Any] | None = None) -> UserContext:
        """History, query vectors and exclusions for one request from ``features``.

        ``features`` None reads them here (in-process callers: the self-check, tools);
        the serving path reads them through the runner's guarded online-store call.
        """
        feats = self.read_features(request.user_id) if features is None else features
        ts = request.context.timestamp
        now = ts.timestamp() if ts is not None else time.time()
        fctx = self.funnel.context(
            request.user_id, feats, now=now, device=request.context.device, exclude_ids=request.exclude
        )
        return UserContext(
            user_id=request.user_id,
            user_idx=fctx.user_idx,
            k=request.k,
            now=now,
            device=request.context.device,
            history=fctx.history,
            exclude=fctx.exclude_rows,
            unknown_exclude_ids=fctx.unknown_exclude_ids,
            state=fctx,
            model_version=self.model_version,
        )

    def _same_model(self, ctx: UserContext) -> FunnelContext:
        """The context's state, if this model version built it (:func:`check_context_version`)."""
        check_context_version(self.model_version, ctx)
        state: FunnelContext = ctx.state
        return state

    def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """Candidates of one retrieval source."""
        items, scores = self.funnel.retrieve(source, self._same_model(ctx))
        return Candidates(items, scores, [[source]] * int(items.size))

    def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """Union with agreement bonus; carries the per-source scores for the ranker."""
        self._same_model(ctx)
        merged, src = self.funnel.merge({n: (c.items, c.scores) for n, c in parts.items()})
        return Candidates(merged.items, merged.scores, merged.provenance(), features=src)

    def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """DCN-V2 over the candidates, keeping the best (raises when the ranker fails)."""
        return self.rank_batch([ctx], [candidates])[0]

    def rank_batch(self, ctxs: list[UserContext], candidates: list[Candidates]) -> list[Candidates]:
        """:meth:`rank` for several requests with ONE DCN-V2 forward pass over all their candidates.

        The cluster ``Ranker`` deployment calls this with the requests ``@serve.batch`` gathered:
        one larger matrix multiply instead of several small ones (and, on a GPU, one transfer
        and one kernel launch per layer for the batch). Scores are row-wise, so each request
        gets the scores it would get alone (up to float rounding in the matrix multiply).

        Raises:
            ModelError: no ranker is loaded.
            Exception: the ranker's inputs or forward pass failed (the runner then serves
                :meth:`simple_rank`).
        """
        f = self.funnel
        if f.ranker is None:
            raise ModelError(f"model {self.model_version} has no ranker loaded")
        n_src = len(f.source_names)
        states = [self._same_model(c) for c in ctxs]
        srcs = [
            c.features if c.features is not None else np.zeros((len(c), n_src), np.float32)
            for c in candidates
        ]
        scores, dense = f.score_with_inputs(states, [c.items for c in candidates], srcs)
        return [
            self._keep_best(ctx, cands, scores[i] if len(cands) else None, simple=False, inputs=dense[i])
            for i, (ctx, cands) in enumerate(zip(ctxs, candidates, strict=True))
        ]

    def simple_rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """The best candidates by merged retrieval score (the ``simple_ranking`` level)."""
        return self._keep_best(ctx, candidates, candidates.scores, simple=True)

    def _keep_best(
        self,
        ctx: UserContext,
        candidates: Candidates,
        scores: np.ndarray | None,
        simple: bool,
        inputs: np.ndarray | None = None,
    ) -> Candidates:
        """The best ``settings.ranked`` (at least ``k``) of ``candidates`` by ``scores``.

        ``inputs``: the ranker's dense inputs of ``candidates``; the kept rows travel with the
        result (the request log records them), named by the ranker's layout.
        """
        degraded = [*candidates.degraded, "simple_ranking"] if simple else list(candidates.degraded)
        if scores is None or not len(candidates):
            return Candidates(candidates.items, candidates.scores, candidates.sources, degraded=degraded)
        # The request time, for fresh candidates past the cut (none when the context is unusable:
        # the simple_ranking fallback must still answer).
        now = getattr(ctx.state, "now", None)
        keep = self.funnel.keep_best(scores, ctx.k, candidates.items, now)
        items = candidates.items[keep]
        sample = None
        if inputs is not None and len(inputs):
            rows = self._rng.choice(len(inputs), min(SCORED_SAMPLE, len(inputs)), replace=False)
            sample = inputs[np.sort(rows)]
        return Candidates(
            items,
            np.asarray(scores[keep], np.float32),
            [candidates.sources[i] for i in keep],
            degraded=degraded,
            reasons=list(candidates.reasons),
            ranker_inputs=None if inputs is None else inputs[keep],
            feature_names=() if inputs is None else self.funnel.logged_input_names,
            ids=self.funnel.table.item_ids[items],
            scored_sample=sample,
        )

    def rerank(self, ctx: UserContext, ranked: Candidates) -> RecommendResponse:
        """Business rules, then the response (no items when retrieval found nothing)."""
        f = self.funnel
        fctx = self._same_model(ctx)
        degraded = [*ctx.degraded, *ranked.degraded]
        items: list[dict[str, Any]] = []
        if len(ranked):
            res = f.rerank(fctx, ranked, ctx.k)
            items = [
                {
                    "item_id": int(it.item_id),
                    "score": float(it.score),
                    "sources": list(it.sources),
                    "title": self._title(it.item_index),
                    "reasons": list(it.reasons) or None,
                }
                for it in res.items
            ]
        level = max(degraded, key=_LEVELS.index) if degraded else "full"
        reasons = [*ctx.reasons, *ranked.reasons]
        return RecommendResponse.model_validate(
            {
                "user_id": ctx.user_id,
                "items": items,
                "metadata": {
                    "model_version": self.model_version,
                    "degradation_level": level,
                    "degradation_reason": "; ".join(reasons) or None,
                    "unknown_exclude_ids": ctx.unknown_exclude_ids,
                    "request_id": "",
                },
            }
        )

    def _title(self, row: int) -> str | None:
        titles = self.titles
        return titles[row] if titles is not None and row < len(titles) else None


def _trained_at(bundle: Path) -> float | None:
    """When the bundle was written (its manifest's ``created_at``), epoch seconds; None without one."""
    from streamrec.registry.manifest import MANIFEST_FILE, read_manifest

    if not (bundle / MANIFEST_FILE).is_file():
        return None
    try:
        return read_manifest(bundle).created_at.timestamp()
    except Exception as err:  # the bundle verified; an unreadable date only hides the model's age
        log.warning("cannot read the manifest date of %s: %s", bundle, err)
        return None


def _user_snapshot(fc: Any) -> pd.DataFrame | None:
    """Every user's newest offline features (what the online store was loaded from), by ``user_id``."""
    from streamrec.features.snapshot import features_as_of

    try:
        return features_as_of(fc, "user", pd.Timestamp.now(tz="UTC")).set_index("user_id")
    except Exception as err:  # no offline features yet: stale_features then falls back to defaults
        log.warning("no user feature snapshot for stale_features (%s: %s)", type(err).__name__, err)
        return None


def serving_threads(n: int = 1) -> None:
    """Cap torch, FAISS (OpenMP) and BLAS at ``n`` threads in this process.

    A serving replica scores one small request at a time and many requests concurrently: extra
    threads only add hand-off cost, and idle OpenMP workers spin on the cores the HTTP proxy and
    the other replicas need. FAISS defaults to one OpenMP thread per core; the serving loaded
    it that way until the wrk c=8 run in docs/benchmarks.md (fused, 75 -> 92 req/s with this
    and the CF index change).
    """
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    threadpool_limits(n)


def build_stages(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    alias: str = "champion",
    bundle: str | None = None,
    online: str | None = None,
    trending_days: int = 7,
    device: str = "cpu",
    rerank: ReRankConfig | dict[str, Any] | None = None,
    version: int | None = None,
) -> RecommenderStages:
    """Load a registered model for serving: ``alias``'s, a pinned ``version``, or a ``bundle`` dir.

    A hot reload pins ``version``: the gateway reads the alias once and every replica loads
    that version, even if the alias moves while they load.

    ``rerank`` sets the re-ranking rules (a :class:`ReRankConfig` or its dict form; defaults
    when omitted): the Serve config's ``args.rerank``.

    Raises:
        ModelError: no model is registered under ``alias`` (train one first).
        CorruptCheckpointError: the bundle fails verification.
        ConfigError: ``rerank`` has unknown or invalid keys.
    """
    from streamrec.bundle import LoadedBundle, align_table
    from streamrec.data.store import DataStore
    from streamrec.features.client import FeatureClient
    from streamrec.paths import resolve_data_dir
    from streamrec.registry.store import ModelRegistry

    rules = rerank if isinstance(rerank, ReRankConfig) else parse_config(rerank or {}, ReRankConfig, "rerank")
    serving_threads(1)  # one thread per replica wins under concurrency on small CPUs
    root = resolve_data_dir(data_dir)
    if bundle is not None:
        path, label = Path(bundle), Path(bundle).name
    else:
        reg = ModelRegistry(data_dir=root)
        info = reg.get_version(version) if version is not None else reg.get(alias)
        if info is None:
            raise ModelError(
                f"no model has the '{alias}' alias in the registry of {root}: run `streamrec train`"
            )
        path, label = reg.download(info.version), f"v{info.version}"
    b = LoadedBundle(path, device=device)
    fc = FeatureClient(root, online=online)
    table = align_table(fc.item_table(), b.item_ids, b.vocab)
    store = DataStore(root)
    dates = store.event_dates()
    recent = pd.DataFrame(columns=["item_id", "timestamp", "label"])
    if dates:
        end = pd.Timestamp(dates[-1], tz="UTC") + pd.Timedelta(days=1)
        recent = store.events(
            start=(end - pd.Timedelta(days=trending_days)).to_pydatetime(),
            columns=["item_id", "timestamp", "label"],
        )
        recent = recent[recent["label"] > 0]
    # The event log's events the store does not hold yet (not exported): trending counts them
    # too, and the replica's tail skips them (engagement_since), so each event counts once.
    unexported = EventTail(root, start="exported").read_all()
    positive = unexported.labels == 1
    if positive.any():
        logged = pd.DataFrame(
            {
                "item_id": unexported.item_ids[positive],
                "timestamp": pd.to_datetime(unexported.timestamps[positive], unit="s", utc=True),
                "label": 1,
            }
        )
        recent = logged if recent.empty else pd.concat([recent, logged], ignore_index=True)
    models = b.retrieval_models(table, table.index_of(recent["item_id"].to_numpy()), recent["timestamp"])
    funnel = Funnel(models, table, b.ranker, b.settings, rerank=rules)
    items = store.items().set_index("item_id")
    titles = items["title"].reindex(table.item_ids).tolist() if "title" in items else None
    titles = [t if isinstance(t, str) else None for t in titles] if titles is not None else None
    snapshot = _user_snapshot(fc)
    stages = RecommenderStages(
        funnel,
        fc,
        label,
        BatchTopN.load(root, label),
        titles,
        snapshot,
        trained_at=_trained_at(path),
        features_built_at=fc.built_at(),
    )
    stages.engagement_since = float(unexported.received_at.max()) if len(unexported) else 0.0
    log.info("loaded model %s from %s (%d items, %d users)", label, path, len(table), len(models.users))
    return stages
