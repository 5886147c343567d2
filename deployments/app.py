"""Ray Serve deployments and the application builder (thin wrappers; logic lives in streamrec/).

``build_app(args)`` is the ``import_path`` of the Serve configs (``configs/serve/*.yaml``)::

    applications:
      - name: streamrec
        import_path: deployments.app:build_app
        args: {data_dir: ..., composition: fused}      # see streamrec.service.args.ServeArgs

Compositions (the same :func:`~streamrec.funnel.stages.run_funnel` in both):

* **fused**: one deployment, ``Gateway`` (FastAPI ingress), holds the stages in-process and calls
  them directly. No actor hops: the composition for small machines.
* **cluster**: ``Gateway`` -> ``Features`` (user context), ``Retriever`` (every source, called
  concurrently, one call per source), ``Ranker`` (merge + rank in one hop, ``@serve.batch``),
  ``Reranker``, each its own deployment scaled independently through the config's
  ``autoscaling_config``; the gateway's ``call`` goes through deployment handles.

Every replica holding stages runs them through a :class:`~streamrec.service.runner.StageRunner`
(blocking work off the event loop, each dependency under its budget and breaker); the gateway
answers through :class:`~streamrec.service.policy.FunnelService` (the whole degradation chain).

Hot reload (:mod:`streamrec.service.reload`): ``POST /v1/admin/reload`` (scope ``admin``) and
the champion watcher broadcast *prepare* / *commit* / *abort* over every replica that holds stages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve import metrics as serve_metrics
from ray.serve.handle import DeploymentHandle

from streamrec.api_models import RecommendRequest
from streamrec.errors import ConfigError, CorruptCheckpointError, ModelError
from streamrec.funnel.fallback import BatchTopN
from streamrec.funnel.stages import Candidates, Stages, UserContext
from streamrec.monitoring.health import HealthMonitor
from streamrec.monitoring.logs import RequestLog
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.service.args import ServeArgs
from streamrec.service.catalogue import CatalogueSync
from streamrec.service.cluster import call_with_retry
from streamrec.service.http import build_gateway
from streamrec.service.loading import (
    LoadedStages,
    load_batch,
    load_fallback,
    load_stages,
    reload_args,
    settle_heap,
)
from streamrec.service.observe import BreakerExporter, GatewayObserver, every
from streamrec.service.policy import FunnelService
from streamrec.service.reload import PendingReloads, ReloadHistory, champion_version, watch_champion
from streamrec.service.runner import Call, StageRunner
from streamrec.service.shadow import ShadowScorer
from streamrec.service.variants import ExperimentRouter, Variants
from streamrec.serving.gateway import merge_replica_status

log = logging.getLogger("streamrec.deployments")

_STAGE_OPTS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 64}


class _StageHost:
    """Holds one stages object and implements the two-phase reload protocol."""

    _args: ServeArgs
    _loaded: LoadedStages

    def _init_host(self, args: dict[str, Any]) -> None:
        self._args = ServeArgs.parse(args)
        self._loaded = load_stages(self._args)
        self._pending = PendingReloads()
        a = self._args
        self._metrics = ServingMetrics(serve_metrics if a.metrics else None)
        self._runner = StageRunner(
            a.resilience, a.source_timeout_ms / 1e3, a.source_threads, a.faults, metrics=self._metrics
        )
        self._exporter = BreakerExporter(self._runner.snapshot, self._metrics, a.health.interval_s)
        settle_heap()

    @property
    def stages(self) -> Stages:
        """The current stages object (read once per call: a swap never splits a call)."""
        return self._loaded.stages

    async def prepare_reload(self, token: str, version: int | None = None) -> dict[str, Any]:
        """Phase 1: build fresh stages (of ``version``) off the event loop, pending under ``token``.

        Raises:
            ServingError: another reload is in progress on this replica (one at a time: each
                holds a whole bundle in memory until it commits or aborts).
        """
        self._pending.claim(token)
        try:
            loaded = await asyncio.to_thread(load_stages, reload_args(self._args, self._loaded), version)
        except BaseException:
            self._pending.drop(token)
            raise
        self._pending.keep(token, loaded)
        return loaded.describe()

    async def commit_reload(self, token: str) -> dict[str, Any]:
        """Phase 2: swap the pending stages in (one attribute assignment)."""
        loaded = self._pending.take(token)
        if loaded is not None:
            self._loaded = loaded
            settle_heap()
        return self._loaded.describe()

    async def abort_reload(self, token: str) -> None:
        """Drop the pending stages of ``token``."""
        self._pending.drop(token)

    async def describe(self) -> dict[str, Any]:
        """The current stages' facts and this replica's breakers."""
        return {**self._loaded.describe(), "breakers": self._runner.snapshot()}


@serve.deployment(name="Features", **_STAGE_OPTS)
class Features(_StageHost):
    """Cluster stage: user context (online features, history, exclude list)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._init_host(args)

    async def user_context(self, request: RecommendRequest) -> UserContext:
        """:meth:`StageRunner.user_context` (guarded online-store read, context off the loop)."""
        return await self._runner.user_context(self.stages, request)

    async def source_names(self) -> tuple[str, ...]:
        """The retrieval sources of the current stages."""
        return tuple(self.stages.source_names)


@serve.deployment(name="Retriever", **_STAGE_OPTS)
class Retriever(_StageHost):
    """Cluster stage: candidate retrieval (one call per source; the gateway calls them concurrently)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._init_host(args)

    async def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """:meth:`StageRunner.retrieve` (in a worker thread, under the source's budget and breaker)."""
        return await self._runner.retrieve(self.stages, source, ctx)


@serve.deployment(name="Ranker", **_STAGE_OPTS)
class Ranker(_StageHost):
    """Cluster stage: merge + rank in one hop, batched across concurrent requests.

    When the stages object has ``rank_batch(ctxs, candidates) -> list[Candidates]`` (the trained
    recommender's: one DCN-V2 forward pass for the whole batch) it is used; otherwise ``rank``
    runs per request.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self._init_host(args)
        self._merge_rank_batch.set_max_batch_size(self._args.ranker_batch.max_batch_size)
        self._merge_rank_batch.set_batch_wait_timeout_s(self._args.ranker_batch.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _merge_rank_batch(
        self, ctxs: list[UserContext], parts: list[dict[str, Candidates]]
    ) -> list[Candidates | BaseException]:
        stages = self.stages
        merged: list[Candidates | BaseException] = []
        for c, p in zip(ctxs, parts, strict=True):
            try:
                merged.append(stages.merge(c, p))
            except Exception as err:  # one bad request must not fail the whole batch
                merged.append(err)
        ok = [i for i, m in enumerate(merged) if isinstance(m, Candidates)]
        out: list[Candidates | BaseException] = list(merged)
        if ok:
            try:
                ranked = await self._runner.rank_batch(
                    stages, [ctxs[i] for i in ok], [merged[i] for i in ok]  # type: ignore[misc]
                )
                for i, r in zip(ok, ranked, strict=True):
                    out[i] = r
            except Exception as err:  # (a version mismatch): each request goes to the fallback
                for i in ok:
                    out[i] = err
        return out

    async def merge_rank(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """:meth:`Stages.merge` then :meth:`Stages.rank` (batched across requests)."""
        result = await self._merge_rank_batch(ctx, parts)
        if isinstance(result, BaseException):
            raise result
        return result

    async def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """:meth:`Stages.merge` alone (unbatched)."""
        return self._runner.merge(self.stages, ctx, parts)

    async def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """:meth:`StageRunner.rank` alone (unbatched)."""
        return await self._runner.rank(self.stages, ctx, candidates)


@serve.deployment(name="Reranker", **_STAGE_OPTS)
class Reranker(_StageHost):
    """Cluster stage: business rules and response assembly."""

    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self._init_host(args)
        self._catalogue = CatalogueSync(self._args.data_dir)
        self._catalogue_task = asyncio.get_running_loop().create_task(
            every(1.0, self._apply_catalogue, "catalogue sync")
        )

    async def _apply_catalogue(self) -> None:
        """Keep the re-ranking metadata at the catalogue log (promoted, categories)."""
        await self._catalogue.apply(self.stages)

    async def rerank(self, ctx: UserContext, ranked: Candidates) -> Any:
        """:meth:`Stages.rerank`."""
        return self._runner.rerank(self.stages, ctx, ranked)


class _Deferred:
    """The merge step of the cluster ``call``: sent to the ranker together with rank (one hop)."""

    __slots__ = ("parts",)

    def __init__(self, parts: dict[str, Candidates]) -> None:
        self.parts = parts


def _replica_rank() -> int:
    """Rank of the calling replica within its deployment (0 when Serve does not say)."""
    rank = getattr(serve.get_replica_context(), "rank", None)
    return int(getattr(rank, "rank", rank) or 0)


@serve.deployment(
    name="Gateway", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128, health_check_period_s=5
)
@serve.ingress()
class Gateway:
    """The HTTP ingress (both compositions): auth, limits, events, the funnel with fallbacks.

    Args:
        args: Builder arguments (:class:`~streamrec.service.args.ServeArgs` as a dict).
        features, retriever, ranker, reranker: Handles of the stage deployments (cluster
            composition); all None in the fused composition.
    """

    async def __init__(
        self,
        args: dict[str, Any],
        features: DeploymentHandle | None = None,
        retriever: DeploymentHandle | None = None,
        ranker: DeploymentHandle | None = None,
        reranker: DeploymentHandle | None = None,
    ) -> None:
        self._args = ServeArgs.parse(args)
        self._cluster = features is not None
        self._features, self._retriever, self._ranker, self._reranker = features, retriever, ranker, reranker
        self._local: LoadedStages | None = None
        self._source_names: tuple[str, ...] | None = None
        self._pending = PendingReloads()  # (local stages, fallback, catalogue ids) by token
        self._reload_lock = asyncio.Lock()  # the watcher and POST /v1/admin/reload take turns
        self._events: Any = None
        a = self._args
        self._metrics = ServingMetrics(serve_metrics if a.metrics else None)
        self._runner = StageRunner(
            a.resilience, a.source_timeout_ms / 1e3, a.source_threads, a.faults, metrics=self._metrics
        )
        self._request_log = (
            RequestLog(a.data_dir, a.request_log, on_drop=self._metrics.log_dropped)
            if a.request_log.sample_rate > 0
            else None
        )
        self._history = ReloadHistory()
        self._batch = BatchTopN.empty()  # the cluster's batch level (fused: the local stages' own)
        if not self._cluster:
            self._local = await asyncio.to_thread(load_stages, self._args)
        else:
            self._batch = await asyncio.to_thread(load_batch, self._args, None)
        self._fallback = await asyncio.to_thread(load_fallback, self._args, self._local)
        settle_heap()
        self._catalogue = CatalogueSync(a.data_dir)
        self._service = FunnelService(
            self._primary,
            self._fallback.stages if self._fallback else None,
            self._args.resilience,
            self._args.source_timeout_ms / 1000.0,
            batch=self._current_batch,
            metrics=self._metrics,
            request_log=self._request_log,
            flagged=self._catalogue.flagged,
        )
        self._shadow: ShadowScorer | None = None
        self._variants: Variants | None = None
        if a.experiment is not None:
            self._shadow = ShadowScorer(a.experiment.shadow, a.resilience, a.source_timeout_ms / 1e3, self._request_log)
            self._service.after = self._shadow.observe
            self._variants = Variants(
                self._args,
                fallback=lambda: self._fallback.stages if self._fallback else None,
                metrics=self._metrics,
                request_log=self._request_log,
                shadow=self._shadow,
                flagged=self._catalogue.flagged,
            )
            try:
                await self._variants.refresh()  # start with the challenger and shadow in place
            except Exception as err:  # no registry yet: the poll picks them up later
                log.info("experiment: registry not readable yet (%s)", err)
        self._router = ExperimentRouter(self._service, self._variants)
        self._started = time.time()
        self._observer = GatewayObserver(
            HealthMonitor(a.health, self._metrics),
            self._metrics,
            a.data_dir,
            self._stage_details,
            self._current_batch,
            lambda: self._service.served,
            self._breakers,
            lambda: self._events.snapshot() if self._events is not None else None,
        )
        self._health = self._observer.monitor
        self._health_task = asyncio.get_running_loop().create_task(
            every(a.health.interval_s, self._observer.check, "health check")
        )
        self._experiment_task = (
            None
            if self._variants is None or a.experiment is None
            else asyncio.get_running_loop().create_task(
                every(a.experiment.poll_s, self._variants.refresh, "experiment registry poll")
            )
        )
        self._catalogue_task = asyncio.get_running_loop().create_task(
            every(1.0, self._apply_catalogue, "catalogue sync")
        )
        self._watcher: asyncio.Task[None] | None = None
        if (
            self._args.watch_champion_s > 0
            and self._args.stages in ("auto", "recommender")
            and not self._args.factory
        ):  # on every replica; only the one ranked 0 at each poll acts (one reload reaches all)
            self._watcher = asyncio.get_running_loop().create_task(
                watch_champion(a.data_dir, a.watch_champion_s, self._reload, lambda: _replica_rank() == 0)
            )

    def __serve_build_asgi_app__(self) -> Any:
        app, self._events = build_gateway(
            self._args,
            self._router,
            reload=self._reload,
            ready=self._ready,
            info=self._info,
            status=self._status,
            behind_ray_proxy=True,
            metrics=self._metrics,
            variant_of=self._router.variant_of,
            upsert_items=self._upsert_items,
        )
        return app

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown: write the sampled requests still queued.
        request_log = getattr(self, "_request_log", None)
        if request_log is not None:
            request_log.close()

    # ------------------------------------------------------------------ health
    async def _stage_details(self) -> tuple[dict[str, Any] | None, float | None]:
        """The serving stages' facts and load time (cluster: the ``Features`` deployment's)."""
        if self._local is not None:
            d = self._local.describe()
        else:
            assert self._features is not None
            d = await self._features.describe.remote()
        return d.get("details"), d.get("loaded_at")

    # ------------------------------------------------------------------ catalogue
    async def _apply_catalogue(self) -> None:
        """Keep the in-process stages' re-ranking metadata at the catalogue log (fused)."""
        if self._local is not None:
            await self._catalogue.apply(self._local.stages)

    async def _upsert_items(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """``POST /v1/admin/items``: durable in the log, then in force on this replica at once."""
        result = await self._catalogue.upsert(items)
        await self._apply_catalogue()
        return result

    # ------------------------------------------------------------------ stages
    def _current_batch(self) -> BatchTopN | None:
        if self._local is not None:
            return getattr(self._local.stages, "batch", None)
        return self._batch

    async def _primary(self) -> tuple[Call, tuple[str, ...]]:
        if self._local is not None:
            stages = self._local.stages  # captured once: a reload never splits a request
            return self._runner.call_for(stages), tuple(stages.source_names)
        if self._source_names is None:
            assert self._features is not None
            self._source_names = tuple(await self._features.source_names.remote())
        return self._cluster_call, self._source_names

    async def _cluster_call(self, name: str, *args: Any) -> Any:
        """One stage call through its deployment handle, resent once if its replica is lost.

        Every stage call is a read, so a call whose replica died mid-request is sent again
        (Serve routes it to a live replica or the replacement, within the funnel's timeout).
        """
        assert self._features and self._retriever and self._ranker and self._reranker
        if name == "user_context":
            features = self._features
            return await call_with_retry(name, lambda: features.user_context.remote(*args))
        if name == "retrieve":
            retriever = self._retriever
            return await call_with_retry(name, lambda: retriever.retrieve.remote(*args))
        if name == "merge":
            return _Deferred(args[1])
        if name == "rank":
            ctx, merged = args
            ranker = self._ranker
            if isinstance(merged, _Deferred):
                parts = merged.parts
                return await call_with_retry(name, lambda: ranker.merge_rank.remote(ctx, parts))
            return await call_with_retry(name, lambda: ranker.rank.remote(ctx, merged))
        if name == "rerank":
            reranker = self._reranker
            return await call_with_retry(name, lambda: reranker.rerank.remote(*args))
        raise KeyError(f"unknown stage call '{name}'")

    # ------------------------------------------------------------------ health
    async def _ready(self) -> tuple[bool, dict[str, Any]]:
        try:
            _, sources = await asyncio.wait_for(self._primary(), timeout=5.0)
        except Exception as err:
            return False, {"reason": f"stages not reachable: {type(err).__name__}: {err}"}
        breakers = self._breakers()
        out: dict[str, Any] = {"composition": self._args.composition, "source_names": list(sources)}
        out["breakers"] = {name: b["state"] for name, b in breakers.items()}
        warnings = [f"circuit '{name}' is {b['state']}" for name, b in breakers.items() if b["state"] != "closed"]
        refused = self._history.refused_now
        if refused is not None:
            warnings.append(f"reload to v{refused['version']} was refused: {refused.get('detail', '')}")
        warnings += self._health.warnings
        if self._variants is not None:
            warnings += [f"{what} is not served: {why}" for what, why in self._variants.refused.items()]
        if warnings:  # still ready: a degraded answer is an answer
            out["warnings"] = warnings
        return True, out

    def _breakers(self) -> dict[str, dict[str, Any]]:
        """The breakers of this replica: the funnel, and the stage runner when the stages are local."""
        out = {"funnel": self._service.breaker.snapshot()}
        if self._local is not None:
            out.update({k: v for k, v in self._runner.snapshot().items() if k != "faults"})
        if self._events is not None and self._events.sink is not None:
            out["event_sink"] = self._events.sink_breaker.snapshot()
        return out

    async def local_status(self) -> dict[str, Any]:
        """The part of ``/v1/admin/status`` this replica knows: its stages and event-log counters."""
        return {"stages": await self._info(), "events": self._events.snapshot() if self._events else None}

    async def _status(self) -> dict[str, Any]:
        """``/v1/admin/status`` over every gateway replica (counters summed).

        Whichever replica a balancer picks, the answer covers the deployment
        (``merge_replica_status``).
        """
        ctx = serve.get_replica_context()
        own = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        parts = await own.broadcast("local_status").results_async()
        return merge_replica_status(list(parts))

    async def _info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"composition": self._args.composition, "funnel": self._service.snapshot()}
        out["breakers"] = self._breakers()
        out["reloads"] = self._history.snapshot()
        out["health_alerts"] = self._health.warnings
        out["request_log"] = self._request_log.snapshot() if self._request_log is not None else None
        out["catalogue"] = self._catalogue.snapshot()
        if self._local is not None:
            out["stages"] = self._local.describe()
        else:
            names = ("features", "retriever", "ranker", "reranker")
            handles = (self._features, self._retriever, self._ranker, self._reranker)
            # Every replica's facts: replicas out of step (an autoscaled or restarted one on
            # another version) show in stage_versions, and their requests go to the fallback.
            every = await asyncio.gather(
                *(h.broadcast("describe").results_async() for h in handles if h is not None)
            )
            out["stages"] = {n: ds[0] for n, ds in zip(names, every, strict=True)}
            out["stage_versions"] = {
                n: sorted({str(d.get("model_version")) for d in ds})
                for n, ds in zip(names, every, strict=True)
            }
            # Every replica's breakers: an open one on any replica of a stage shows here.
            out["stage_breakers"] = {n: [d.get("breakers", {}) for d in ds] for n, ds in zip(names, every, strict=True)}
        out["fallback"] = self._fallback.describe() if self._fallback else None
        out["experiment"] = self._variants.describe() if self._variants is not None else None
        return out

    # ------------------------------------------------------------------ reload (two-phase)
    async def prepare_reload(self, token: str, version: int | None = None) -> dict[str, Any]:
        """Phase 1 on this gateway replica: fresh local stages (fused; of ``version``) and fallback.

        Raises:
            ServingError: another reload is in progress on this replica.
        """
        self._pending.claim(token)
        try:
            local = None
            if self._local is not None:
                local = await asyncio.to_thread(load_stages, reload_args(self._args, self._local), version)
            fallback = (
                await asyncio.to_thread(load_fallback, self._args, self._local) if self._fallback is not None else None
            )
            ids = await asyncio.to_thread(self._events.read_catalogue) if self._events is not None else None
            batch = await asyncio.to_thread(load_batch, self._args, version) if self._cluster else None
        except BaseException:
            self._pending.drop(token)
            raise
        self._pending.keep(token, (local, fallback, ids, batch))
        return local.describe() if local else {"fallback": fallback.describe() if fallback else None}

    async def commit_reload(self, token: str) -> dict[str, Any]:
        """Phase 2 on this gateway replica: swap (attribute assignments only)."""
        local, fallback, ids, batch = self._pending.take(token) or (None, None, None, None)
        if batch is not None:
            self._batch = batch
        if ids is not None and self._events is not None:
            self._events.refresh_known_ids(*ids)  # new users/items may post events from now on
        if local is not None:
            self._local = local
        if fallback is not None:
            self._fallback = fallback
            self._service.set_fallback(fallback.stages)
            if self._variants is not None:
                self._variants.set_fallback(fallback.stages)
        self._source_names = None  # re-read from the Features deployment on the next request
        settle_heap()
        return self._local.describe() if self._local else {"composition": "cluster"}

    async def abort_reload(self, token: str) -> None:
        """Drop what phase 1 prepared under ``token``."""
        self._pending.drop(token)

    async def _reload(self, version: int | None = None) -> dict[str, Any]:
        """Two-phase reload of every replica holding stages, all to one registry version.

        ``version`` defaults to the champion's, read once here: replicas that each read the
        alias could load different versions if it moved during the reload.
        """
        async with self._reload_lock:
            if version is None and self._args.stages in ("auto", "recommender") and not self._args.factory:
                version = await asyncio.to_thread(champion_version, self._args.data_dir)
            try:
                result = await self._two_phase(version)
            except (CorruptCheckpointError, ModelError, ConfigError) as err:
                await self._record_reload(version, "refused", f"{type(err).__name__}: {err}")
                raise
            except Exception as err:
                await self._record_reload(version, "failed", f"{type(err).__name__}: {err}")
                raise
            await self._record_reload(version, "committed")
            return result

    async def _record_reload(self, version: int | None, outcome: str, detail: str = "") -> None:
        """Every gateway replica remembers the outcome, so the status shows it whichever answers."""
        self._metrics.reload(outcome)  # counted once, by the replica that ran the reload
        ctx = serve.get_replica_context()
        own = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        try:
            await own.broadcast("note_reload", version, outcome, detail).results_async()
        except Exception as err:  # the outcome is still in this replica's log
            log.warning("could not record the reload outcome on every replica: %s", err)
            self.note_reload(version, outcome, detail)

    def note_reload(self, version: int | None, outcome: str, detail: str = "") -> None:
        """Record one reload outcome on this replica (``committed``, ``refused``, ``failed``)."""
        self._history.record(version, outcome, detail)

    async def _two_phase(self, version: int | None) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        own = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        holders = [own] + [h for h in (self._features, self._retriever, self._ranker, self._reranker) if h]
        token = uuid.uuid4().hex
        t0 = time.perf_counter()

        async def abort() -> None:
            await asyncio.gather(
                *(h.broadcast("abort_reload", token).results_async() for h in holders), return_exceptions=True
            )

        try:
            outcomes = await asyncio.gather(
                *(h.broadcast("prepare_reload", token, version).results_async() for h in holders),
                return_exceptions=True,
            )
        except BaseException:  # cancelled (the admin client went away): free what was prepared
            await asyncio.shield(abort())
            raise
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            await asyncio.shield(abort())
            raise errors[0]
        prepared = [o for o in outcomes if not isinstance(o, BaseException)]
        committed = await asyncio.shield(
            asyncio.gather(*(h.broadcast("commit_reload", token).results_async() for h in holders))
        )
        replicas = sum(len(r) for r in committed)
        log.info("reload %s committed on %d replicas in %.2fs", token, replicas, time.perf_counter() - t0)
        first = prepared[1][0] if self._cluster and len(prepared) > 1 and prepared[1] else prepared[0][0]
        return {
            "token": token,
            "replicas": replicas,
            "seconds": round(time.perf_counter() - t0, 3),
            "stages": first,
        }


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for ``args`` (see :class:`streamrec.service.args.ServeArgs`).

    Cheap: validates the arguments and binds the deployment graph; stages load in the replicas.

    Raises:
        ConfigError: invalid arguments.
    """
    parsed = ServeArgs.parse(args)
    raw = dict(args or {})  # keep secrets as given (a dump would mask SecretStr values)
    if parsed.composition == "fused":
        return Gateway.bind(raw)
    return Gateway.bind(raw, Features.bind(raw), Retriever.bind(raw), Ranker.bind(raw), Reranker.bind(raw))


__all__ = ["Features", "Gateway", "Ranker", "Reranker", "Retriever", "build_app"]
