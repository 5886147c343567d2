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
the champion watcher broadcast *prepare* / *commit* / *abort* over every replica that holds stages
(:class:`~streamrec.service.reload.ReloadCoordinator`).

Only wiring lives here (Serve decorators, ``__init__`` building library objects, handle calls,
``.bind()``; ``tests/unit/test_layers.py`` measures it): what each replica holds and does is in
:mod:`streamrec.service.replica`, :mod:`~streamrec.service.dispatch` and
:mod:`~streamrec.service.status`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve import Application, Deployment
from ray.serve import metrics as serve_metrics
from ray.serve.handle import DeploymentHandle

from streamrec.api_models import RecommendRequest
from streamrec.funnel.stages import Candidates, Stages, UserContext
from streamrec.monitoring.health import HealthMonitor
from streamrec.monitoring.logs import RequestLog
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.service.args import ServeArgs
from streamrec.service.catalogue import CatalogueSync
from streamrec.service.dispatch import ClusterStages
from streamrec.service.engagement import EngagementSync
from streamrec.service.http import build_gateway
from streamrec.service.observe import GatewayObserver, every
from streamrec.service.policy import FunnelService
from streamrec.service.reload import (
    Broadcast,
    ReloadCoordinator,
    ReloadHistory,
    follows_champion,
    read_champion,
    watch_champion,
)
from streamrec.service.replica import (
    GatewayStages,
    StageHost,
    merge_rank_batch,
    stage_runner,
    start_experiment,
    unwrap,
)
from streamrec.service.status import GatewayStatus
from streamrec.service.variants import ExperimentRouter
from streamrec.serving.gateway import merge_replica_status

_STAGE_OPTS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 64}


@serve.deployment(name="Features", **_STAGE_OPTS)
class Features(StageHost):
    """Cluster stage: user context (online features, history, exclude list)."""

    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.init_host(args, serve_metrics)
        self.start_freshness_sync()  # new items' rows (the history of users who clicked them)

    async def user_context(self, request: RecommendRequest) -> UserContext:
        """:meth:`StageRunner.user_context` (guarded online-store read, context off the loop)."""
        return await self._runner.user_context(self.stages, request)

    async def source_names(self) -> tuple[str, ...]:
        """The retrieval sources of the current stages."""
        return tuple(self.stages.source_names)


@serve.deployment(name="Retriever", **_STAGE_OPTS)
class Retriever(StageHost):
    """Cluster stage: candidate retrieval (one call per source; the gateway calls them concurrently)."""

    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.init_host(args, serve_metrics)
        self.start_freshness_sync()  # new items join the sources

    async def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """:meth:`StageRunner.retrieve` (in a worker thread, under the source's budget and breaker)."""
        return await self._runner.retrieve(self.stages, source, ctx)


@serve.deployment(name="Ranker", **_STAGE_OPTS)
class Ranker(StageHost):
    """Cluster stage: merge + rank in one hop, batched across concurrent requests.

    When the stages object has ``rank_batch(ctxs, candidates) -> list[Candidates]`` (the trained
    recommender's: one DCN-V2 forward pass for the whole batch) it is used; otherwise ``rank``
    runs per request (:func:`~streamrec.service.replica.merge_rank_batch`).
    """

    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.init_host(args, serve_metrics)
        self.start_freshness_sync()  # new items' features and vectors
        # Ray's serve.batch stubs omit the setters its wrapper carries (and its docs prescribe):
        self._merge_rank_batch.set_max_batch_size(self._args.ranker_batch.max_batch_size)  # type: ignore[attr-defined]
        self._merge_rank_batch.set_batch_wait_timeout_s(self._args.ranker_batch.batch_wait_timeout_s)  # type: ignore[attr-defined]

    # One argument per request, (ctx, parts): the one-list-per-batch shape Ray's serve.batch types.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _merge_rank_batch(
        self, requests: list[tuple[UserContext, dict[str, Candidates]]]
    ) -> list[Candidates | BaseException]:
        ctxs, parts = [ctx for ctx, _ in requests], [part for _, part in requests]
        return await merge_rank_batch(self._runner, self.stages, ctxs, parts)

    async def merge_rank(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """:meth:`Stages.merge` then :meth:`Stages.rank` (batched across requests)."""
        return unwrap(await self._merge_rank_batch((ctx, parts)))

    async def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """:meth:`Stages.merge` alone (unbatched)."""
        return self._runner.merge(self.stages, ctx, parts)

    async def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """:meth:`StageRunner.rank` alone (unbatched)."""
        return await self._runner.rank(self.stages, ctx, candidates)


@serve.deployment(name="Reranker", **_STAGE_OPTS)
class Reranker(StageHost):
    """Cluster stage: business rules and response assembly."""

    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.init_host(args, serve_metrics)
        self.start_freshness_sync()

    async def rerank(self, ctx: UserContext, ranked: Candidates) -> Any:
        """:meth:`Stages.rerank`."""
        return self._runner.rerank(self.stages, ctx, ranked)


def _own() -> DeploymentHandle:
    """A handle on the calling replica's own deployment (to broadcast to every gateway replica)."""
    ctx = serve.get_replica_context()
    return serve.get_deployment_handle(ctx.deployment, ctx.app_name)


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

    async def __init__(  # type: ignore[misc]  # Serve awaits it
        self,
        args: dict[str, Any],
        features: DeploymentHandle | None = None,
        retriever: DeploymentHandle | None = None,
        ranker: DeploymentHandle | None = None,
        reranker: DeploymentHandle | None = None,
    ) -> None:
        self._args = a = ServeArgs.parse(args)
        self._features, self._retriever, self._ranker, self._reranker = features, retriever, ranker, reranker
        cluster = ClusterStages(features, retriever, ranker, reranker) if features is not None else None
        self._metrics = ServingMetrics(serve_metrics if a.metrics else None)
        self._runner = stage_runner(a, self._metrics)
        self._request_log = (
            RequestLog(a.data_dir, a.request_log, on_drop=self._metrics.log_dropped)
            if a.request_log.sample_rate > 0
            else None
        )
        self._stages = GatewayStages(a, self._runner, cluster)
        await self._stages.load()
        self._catalogue = CatalogueSync(a.data_dir)
        self._engagement = EngagementSync(a.data_dir)
        self._service = FunnelService(
            self._stages.primary,
            self._stages.fallback_stages(),
            a.resilience,
            a.source_timeout_ms / 1000.0,
            batch=self._stages.current_batch,
            metrics=self._metrics,
            request_log=self._request_log,
            flagged=self._catalogue.flagged,
        )
        self._stages.on_fallback.append(self._service.set_fallback)
        self._shadow, self._variants = await start_experiment(
            a,
            self._service,
            self._stages.fallback_stages,
            metrics=self._metrics,
            request_log=self._request_log,
            flagged=self._catalogue.flagged,
            serving_version=self._stages.serving_version,
        )
        if self._variants is not None:
            self._stages.on_fallback.append(self._variants.set_fallback)
        self._router = ExperimentRouter(self._service, self._variants)
        self._reloads = ReloadCoordinator(
            lambda: [Broadcast(_own()), *(cluster.reload_targets() if cluster is not None else ())],
            resolve_version=(lambda: read_champion(a.data_dir)) if follows_champion(a) else None,
            note=lambda version, outcome, detail: (
                _own().broadcast("note_reload", version, outcome, detail).results_async()
            ),
            history=ReloadHistory(),
            metrics=self._metrics,
            summary_from=1 if cluster is not None else 0,
        )
        health = HealthMonitor(a.health, self._metrics)
        self._report = GatewayStatus(
            a.composition,
            stages=self._stages,
            service=self._service,
            runner=self._runner,
            history=self._reloads.history,
            health=health,
            catalogue=self._catalogue,
            request_log=self._request_log,
            variants=self._variants,
            engagement=self._engagement,
        )
        self._observer = GatewayObserver(
            health,
            self._metrics,
            a.data_dir,
            self._stages.details,
            self._stages.current_batch,
            lambda: self._service.served,
            self._report.breakers,
            lambda: self._stages.events.snapshot() if self._stages.events is not None else None,
        )
        loop = asyncio.get_running_loop()
        self._health_task = loop.create_task(every(a.health.interval_s, self._observer.check, "health check"))
        self._experiment_task = (
            None
            if self._variants is None or a.experiment is None
            else loop.create_task(
                every(a.experiment.poll_s, self._variants.refresh, "experiment registry poll")
            )
        )
        self._catalogue_task = loop.create_task(
            every(
                1.0,
                lambda: self._stages.keep_current(self._catalogue, self._engagement, self._treatment()),
                "freshness sync",
            )
        )
        self._watcher: asyncio.Task[None] | None = None
        if a.watch_champion_s > 0 and follows_champion(a):
            # on every replica; only the one ranked 0 at each poll acts (one reload reaches all)
            self._watcher = loop.create_task(
                watch_champion(
                    a.data_dir, a.watch_champion_s, self._reloads.reload, lambda: _replica_rank() == 0
                )
            )

    def _treatment(self) -> Stages | None:
        """The experiment challenger's stages, if one is held (they follow the catalogue too)."""
        return self._variants.challenger_stages() if self._variants is not None else None

    def __serve_build_asgi_app__(self) -> Any:
        app, self._stages.events = build_gateway(
            self._args,
            self._router,
            reload=self._reloads.reload,
            ready=self._report.ready,
            info=self._report.info,
            status=self._status,
            behind_ray_proxy=True,
            metrics=self._metrics,
            variant_of=self._router.variant_of,
            upsert_items=lambda items: self._stages.upsert_items(self._catalogue, items, self._treatment()),
        )
        return app

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown: write the sampled requests still queued.
        request_log = getattr(self, "_request_log", None)
        if request_log is not None:
            request_log.close()

    # ------------------------------------------------------------------ status
    async def local_status(self) -> dict[str, Any]:
        """The part of ``/v1/admin/status`` this replica knows: its stages and event-log counters."""
        events = self._stages.events
        return {"stages": await self._report.info(), "events": events.snapshot() if events else None}

    async def _status(self) -> dict[str, Any]:
        """``/v1/admin/status`` over every gateway replica (counters summed).

        Whichever replica a balancer picks, the answer covers the deployment
        (``merge_replica_status``).
        """
        return merge_replica_status(list(await _own().broadcast("local_status").results_async()))

    # ------------------------------------------------------------------ reload (two-phase)
    async def prepare_reload(self, token: str, version: int | None = None) -> dict[str, Any]:
        """Phase 1 on this gateway replica (:meth:`GatewayStages.prepare_reload`)."""
        return await self._stages.prepare_reload(token, version)

    async def commit_reload(self, token: str) -> dict[str, Any]:
        """Phase 2 on this gateway replica (:meth:`GatewayStages.commit_reload`)."""
        return await self._stages.commit_reload(token)

    async def abort_reload(self, token: str) -> None:
        """Drop what phase 1 prepared under ``token``."""
        await self._stages.abort_reload(token)

    def note_reload(self, version: int | None, outcome: str, detail: str = "") -> None:
        """Record one reload outcome on this replica (``committed``, ``refused``, ``failed``)."""
        self._reloads.history.record(version, outcome, detail)


def _deployment(decorated: object) -> Deployment:
    """``decorated`` as the ``Deployment`` that ``@serve.deployment`` made of a class.

    mypy types a decorated class as the class itself (it does not apply class decorators), so
    ``.bind`` is reached through this check rather than on the class name.
    """
    assert isinstance(decorated, Deployment), decorated
    return decorated


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for ``args`` (see :class:`streamrec.service.args.ServeArgs`).

    Cheap: validates the arguments and binds the deployment graph; stages load in the replicas.

    Raises:
        ConfigError: invalid arguments.
    """
    parsed = ServeArgs.parse(args)
    raw = dict(args or {})  # keep secrets as given (a dump would mask SecretStr values)
    if parsed.composition == "fused":
        return _deployment(Gateway).bind(raw)
    return _deployment(Gateway).bind(
        raw, *(_deployment(stage).bind(raw) for stage in (Features, Retriever, Ranker, Reranker))
    )


__all__ = ["Features", "Gateway", "Ranker", "Reranker", "Retriever", "build_app"]
