"""The trained recommender as :class:`~streamrec.serving.stages.Stages` (what production serves).

:func:`build_stages` loads the registry's ``champion`` bundle (verified), aligns the in-memory
item table to it, and wraps a :class:`~streamrec.serving.funnel.Funnel`. Degradation inside the
stages (the outer fallback to popularity lives in the deployments):

* ``stale_features``: the online store is down -> the last features seen for the user in this
  replica, else defaults (cold-start path);
* ``simple_ranking``: the ranker fails -> candidates ordered by their merged retrieval score;
* ``batch``: retrieval returned nothing -> the batch-precomputed top-50 of this model version.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.config import parse_config
from streamrec.errors import ModelError, OnlineStoreUnavailableError, StreamRecError
from streamrec.reranking.config import ReRankConfig
from streamrec.serving.funnel import Funnel, FunnelContext, Ranked
from streamrec.serving.stages import Candidates, UserContext, check_context_version

log = logging.getLogger(__name__)

#: Severity order of the degradation levels (a response reports the worst one that applied).
_LEVELS = ("full", "stale_features", "simple_ranking", "batch", "popularity", "cached")


class RecommenderStages:
    """The funnel of one model version behind the stage interface.

    Args:
        funnel: The funnel over the loaded bundle.
        features: Feature client for online user features (``online_user_features``), or None
            to serve every user from defaults.
        model_version: Version string reported in responses.
        batch: Optional batch-precomputed top-N: ``user_id -> (item_ids, scores)``.
        titles: Optional item titles by item index.
    """

    def __init__(
        self,
        funnel: Funnel,
        features: Any,
        model_version: str,
        batch: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
        titles: list[str | None] | None = None,
    ) -> None:
        self.funnel = funnel
        self.features = features
        self.model_version = model_version
        self.source_names = funnel.source_names
        self.batch = batch or {}
        self.titles = titles
        self._last: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """Facts for the readiness endpoint."""
        return {
            "model_version": self.model_version,
            "items": len(self.funnel.table),
            "users": len(self.funnel.models.users),
            "batch_fallback_users": len(self.batch),
            "rerank": self.funnel.reranker.config.model_dump(),
        }

    def self_check(self) -> None:
        """Serve a known and a new user in-process; raise unless both answer at ``full``.

        A bundle can load (files verify, shapes read) and still fail on a real request: a
        ranker whose inputs do not match, an index of the wrong width. Loading (and every hot
        reload's prepare) runs this first, so such a bundle is refused before it serves.

        ``stale_features`` passes too (the online store may be down at load; that is not the
        bundle's fault).

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
                ctx = self.user_context(request)
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
    def _user_features(self, user_id: int) -> tuple[dict[str, Any], str | None]:
        if self.features is None:
            return {}, None
        try:
            feats = self.features.online_user_features(user_id)
        except OnlineStoreUnavailableError as err:
            with self._lock:
                cached = self._last.get(user_id)
            log.warning(
                "online store unavailable (%s): serving %s features", err, "stale" if cached else "default"
            )
            return (cached or {}), "stale_features"
        with self._lock:
            self._last[user_id] = feats
            self._last.move_to_end(user_id)
            while len(self._last) > 50_000:
                self._last.popitem(last=False)
        return feats, None

    def user_context(self, request: RecommendRequest) -> UserContext:
        """Online features, history, query vectors and exclusions for one request."""
        feats, degraded = self._user_features(request.user_id)
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
            degraded=[degraded] if degraded else [],
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
        """DCN-V2 over the candidates; ordered by retrieval score if the ranker fails."""
        self._same_model(ctx)  # (the batched path's merge has checked each request)
        return self.rank_batch([ctx], [candidates])[0]

    def rank_batch(self, ctxs: list[UserContext], candidates: list[Candidates]) -> list[Candidates]:
        """:meth:`rank` for several requests with ONE DCN-V2 forward pass over all their candidates.

        The cluster ``Ranker`` deployment calls this with the requests ``@serve.batch`` gathered:
        one larger matrix multiply instead of several small ones (and, on a GPU, one transfer
        and one kernel launch per layer for the batch). Scores are row-wise, so each request
        gets the scores it would get alone (up to float rounding in the matrix multiply).

        A request whose inputs cannot be built, or every request when the forward pass fails,
        is ordered by its merged retrieval score instead, and says ``simple_ranking``.
        """
        f = self.funnel
        n_src = len(f.source_names)
        scores: list[np.ndarray | None] = [None] * len(candidates)
        failed: list[bool] = [False] * len(candidates)
        inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i, (ctx, cands) in enumerate(zip(ctxs, candidates, strict=True)):
            if not len(cands):
                continue
            src = cands.features if cands.features is not None else np.zeros((len(cands), n_src), np.float32)
            try:
                if f.ranker is None:
                    raise ModelError("no ranker loaded")
                inputs[i] = f.ranker_inputs(ctx.state, cands.items, src)
            except Exception as err:  # the ranker must never take the request down
                log.warning("ranker inputs failed (%s): simple ranking by retrieval score", err)
                failed[i] = True
        if inputs:
            order = list(inputs)
            try:
                assert f.ranker is not None
                if len(order) == 1:
                    flat = f.ranker.score(*inputs[order[0]])
                else:
                    flat = f.ranker.score(
                        np.concatenate([inputs[i][0] for i in order]),
                        np.concatenate([inputs[i][1] for i in order]),
                    )
                bounds = np.cumsum([0] + [len(candidates[i]) for i in order])
                for j, i in enumerate(order):
                    scores[i] = flat[bounds[j] : bounds[j + 1]]
            except Exception as err:
                log.warning("ranker failed (%s): simple ranking by retrieval score", err)
                for i in order:
                    failed[i] = True
        return [
            self._keep_best(ctx, cands, cands.scores if failed[i] else scores[i], failed[i])
            for i, (ctx, cands) in enumerate(zip(ctxs, candidates, strict=True))
        ]

    def _keep_best(
        self, ctx: UserContext, candidates: Candidates, scores: np.ndarray | None, simple: bool
    ) -> Candidates:
        """The best ``settings.ranked`` (at least ``k``) of ``candidates`` by ``scores``."""
        if scores is None or not len(candidates):
            return candidates
        keep = np.argsort(-scores, kind="stable")[: max(self.funnel.settings.ranked, ctx.k)]
        return Candidates(
            candidates.items[keep],
            np.asarray(scores[keep], np.float32),
            [candidates.sources[i] for i in keep],
            degraded=[*candidates.degraded, "simple_ranking"] if simple else list(candidates.degraded),
        )

    def rerank(self, ctx: UserContext, ranked: Candidates) -> RecommendResponse:
        """Business rules, then the response (batch fallback when retrieval found nothing)."""
        f = self.funnel
        fctx = self._same_model(ctx)
        degraded = [*ctx.degraded, *ranked.degraded]
        if len(ranked):
            res = f.rerank(fctx, Ranked(ranked.items, ranked.scores, ranked.sources), ctx.k)
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
        else:
            items = self._batch_items(ctx)
            degraded.append("batch")
        level = max(degraded, key=_LEVELS.index) if degraded else "full"
        return RecommendResponse.model_validate(
            {
                "user_id": ctx.user_id,
                "items": items,
                "metadata": {
                    "model_version": self.model_version,
                    "degradation_level": level,
                    "unknown_exclude_ids": ctx.unknown_exclude_ids,
                    "request_id": "",
                },
            }
        )

    def _title(self, row: int) -> str | None:
        return self.titles[row] if self.titles is not None else None

    def _batch_items(self, ctx: UserContext) -> list[dict[str, Any]]:
        hit = self.batch.get(ctx.user_id)
        if hit is None:
            return []
        ids, scores = hit
        rows = ctx.exclude
        if self.funnel.reranker.config.suppress_seen:  # as the re-ranker treats the history
            rows = np.concatenate([ctx.exclude, ctx.history])
        drop = set(self.funnel.table.item_ids[rows].tolist())
        out = [
            {"item_id": int(i), "score": float(s), "sources": ["batch"]}
            for i, s in zip(ids, scores, strict=True)
            if int(i) not in drop
        ]
        return out[: ctx.k]


def _load_batch(data_dir: Path, version: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    path = data_dir / "fallback" / version
    if not path.is_dir():
        return {}
    frame = pd.read_parquet(path)
    return {
        int(u): (np.asarray(i, dtype=np.int64), np.asarray(s, dtype=np.float32))
        for u, i, s in zip(frame["user_id"], frame["item_ids"], frame["scores"], strict=True)
    }


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
    from streamrec.registry import ModelRegistry

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
    models = b.retrieval_models(table, table.index_of(recent["item_id"].to_numpy()), recent["timestamp"])
    funnel = Funnel(models, table, b.ranker, b.settings, rerank=rules)
    items = store.items().set_index("item_id")
    titles = items["title"].reindex(table.item_ids).tolist() if "title" in items else None
    titles = [t if isinstance(t, str) else None for t in titles] if titles is not None else None
    stages = RecommenderStages(funnel, fc, label, _load_batch(root, label), titles)
    log.info("loaded model %s from %s (%d items, %d users)", label, path, len(table), len(models.users))
    return stages
