"""What a serving replica holds and swaps: its stages, and its part of the two-phase reload.

* :class:`StageHost`: a cluster stage replica (``Features``, ``Retriever``, ``Ranker``,
  ``Reranker``): one stages object run through a :class:`~streamrec.service.runner.StageRunner`.
* :class:`GatewayStages`: a gateway replica's stages: in-process ones (fused) or the stage
  deployments (cluster, :class:`~streamrec.service.dispatch.ClusterStages`), the cluster's batch
  level and the popularity fallback.
* :func:`merge_rank_batch`: the ``Ranker``'s batch (one bad request never fails the others).

Each answers ``prepare_reload`` / ``commit_reload`` / ``abort_reload``
(:mod:`streamrec.service.reload`): phase 1 loads off the event loop and keeps the result under
the reload token (:class:`~streamrec.service.reload.PendingReloads`), phase 2 is attribute
assignments only. The Serve deployments (``deployments/app.py``) only wire these.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from streamrec.funnel.fallback import BatchTopN
from streamrec.funnel.stages import Candidates, Stages, UserContext
from streamrec.monitoring.health import version_number
from streamrec.monitoring.logs import RequestLog
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.service.args import ServeArgs
from streamrec.service.catalogue import CatalogueSync
from streamrec.service.dispatch import ClusterStages
from streamrec.service.engagement import EngagementSync
from streamrec.service.loading import (
    LoadedStages,
    load_batch,
    load_fallback,
    load_stages,
    reload_args,
    settle_heap,
)
from streamrec.service.observe import BreakerExporter, every
from streamrec.service.policy import FunnelService
from streamrec.service.reload import PendingReloads
from streamrec.service.runner import Call, StageRunner
from streamrec.service.shadow import ShadowScorer
from streamrec.service.variants import Variants

log = logging.getLogger(__name__)

T = TypeVar("T")


def stage_runner(args: ServeArgs, metrics: ServingMetrics) -> StageRunner:
    """The replica's runner: each dependency under its budget and breaker, blocking work in threads."""
    return StageRunner(
        args.resilience, args.source_timeout_ms / 1e3, args.source_threads, args.faults, metrics=metrics
    )


class StageHost:
    """A cluster stage replica: one stages object and the two-phase reload protocol.

    A base class: the Serve deployment's ``__init__`` calls :meth:`init_host`.
    """

    _args: ServeArgs
    _loaded: LoadedStages

    def init_host(self, args: dict[str, Any], metrics_backend: Any = None) -> None:
        """Load the stages of ``args`` (a :class:`ServeArgs` dict).

        Args:
            args: The builder arguments.
            metrics_backend: Where metrics go when ``args.metrics`` (``ray.serve.metrics``).
        """
        self._args = ServeArgs.parse(args)
        self._loaded = load_stages(self._args)
        self._pending = PendingReloads()
        a = self._args
        self._metrics = ServingMetrics(metrics_backend if a.metrics else None)
        self._runner = stage_runner(a, self._metrics)
        self._exporter = BreakerExporter(self._runner.snapshot, self._metrics, a.health.interval_s)
        settle_heap()

    def start_freshness_sync(self) -> None:
        """Keep the stages at the catalogue log and the event log (streamed engagement), every second.

        The catalogue brings new items, promoted, flagged and categories.

        Needs the running event loop (an async ``__init__``).
        """
        self._catalogue = CatalogueSync(self._args.data_dir)
        self._engagement = EngagementSync(self._args.data_dir)
        self._freshness_task = asyncio.get_running_loop().create_task(
            every(1.0, self._keep_current, "freshness sync")
        )

    async def _keep_current(self) -> None:
        # The events first, then the catalogue (every item they name is then known), then the
        # events into the stages: one after the other, as both replace the stages' funnel.
        new = await self._engagement.read()
        stages = self.stages
        await self._catalogue.apply(stages)
        await self._engagement.apply([stages], new)

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


async def merge_rank_batch(
    runner: StageRunner, stages: Stages, ctxs: list[UserContext], parts: list[dict[str, Candidates]]
) -> list[Candidates | BaseException]:
    """Merge each request, then rank the merged ones in one batch (:meth:`StageRunner.rank_batch`).

    Returns one item per request: its ranked candidates, or the error that request met (a merge
    error fails only its request; a batch ranking error, e.g. a version mismatch, fails every
    merged one, and each goes to its fallback).
    """
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
            ranked = await runner.rank_batch(
                stages,
                [ctxs[i] for i in ok],
                [merged[i] for i in ok],  # type: ignore[misc]
            )
            for i, r in zip(ok, ranked, strict=True):
                out[i] = r
        except Exception as err:  # (a version mismatch): each request goes to the fallback
            for i in ok:
                out[i] = err
    return out


def unwrap(result: T | BaseException) -> T:
    """``result``, or raise it when it is the error a batched request met."""
    if isinstance(result, BaseException):
        raise result
    return result


class GatewayStages:
    """A gateway replica's stages and its part of the two-phase reload.

    Fused (``cluster`` None): the stages load here and run through ``runner``. Cluster: the
    stage deployments answer through ``cluster``; the batch level loads here. Both: the
    popularity fallback. Call :meth:`load` once before serving.

    Args:
        args: The builder arguments.
        runner: Runs in-process stages (fused).
        cluster: The stage deployments (cluster composition), else None.
    """

    def __init__(self, args: ServeArgs, runner: StageRunner, cluster: ClusterStages | None = None) -> None:
        self._args = args
        self._runner = runner
        self.cluster = cluster
        self.local: LoadedStages | None = None
        self.batch = BatchTopN.empty()  # the cluster's batch level (fused: the local stages' own)
        self.fallback: LoadedStages | None = None
        self.events: Any = None  # the event log (set once the app is built): known ids on reload
        #: Called with the new fallback stages when a reload swaps them (the funnel, the variants).
        self.on_fallback: list[Callable[[Stages | None], None]] = []
        self._pending = PendingReloads()  # (local stages, fallback, catalogue ids, batch) by token

    async def load(self) -> None:
        """Load the stages (fused) or the batch level (cluster), then the fallback."""
        if self.cluster is None:
            self.local = await asyncio.to_thread(load_stages, self._args)
        else:
            self.batch = await asyncio.to_thread(load_batch, self._args, None)
        self.fallback = await asyncio.to_thread(load_fallback, self._args, self.local)
        settle_heap()

    def fallback_stages(self) -> Stages | None:
        """The popularity fallback's stages (None when there is none)."""
        return self.fallback.stages if self.fallback else None

    def current_batch(self) -> BatchTopN | None:
        """The batch level: the local stages' own (fused), else the one loaded here."""
        if self.local is not None:
            return getattr(self.local.stages, "batch", None)
        return self.batch

    async def primary(self) -> tuple[Call, tuple[str, ...]]:
        """The funnel's ``call`` and source names (captured once: a reload never splits a request)."""
        if self.local is not None:
            stages = self.local.stages
            return self._runner.call_for(stages), tuple(stages.source_names)
        assert self.cluster is not None
        return self.cluster, await self.cluster.source_names()

    async def details(self) -> tuple[dict[str, Any] | None, float | None]:
        """The serving stages' facts and load time (cluster: the ``Features`` deployment's)."""
        if self.local is not None:
            d = self.local.describe()
        else:
            assert self.cluster is not None
            d = await self.cluster.describe_one()
        return d.get("details"), d.get("loaded_at")

    async def serving_version(self) -> int | None:
        """The registry version of the serving stages (None when they name none: popularity, a path)."""
        details, _ = await self.details()
        return version_number((details or {}).get("model_version")) or None

    async def prepare_reload(self, token: str, version: int | None = None) -> dict[str, Any]:
        """Phase 1 on this gateway replica: fresh local stages (fused; of ``version``) and fallback.

        Raises:
            ServingError: another reload is in progress on this replica.
        """
        self._pending.claim(token)
        try:
            local = None
            if self.local is not None:
                local = await asyncio.to_thread(load_stages, reload_args(self._args, self.local), version)
            fallback = (
                await asyncio.to_thread(load_fallback, self._args, self.local)
                if self.fallback is not None
                else None
            )
            ids = await asyncio.to_thread(self.events.read_catalogue) if self.events is not None else None
            batch = (
                await asyncio.to_thread(load_batch, self._args, version) if self.cluster is not None else None
            )
        except BaseException:
            self._pending.drop(token)
            raise
        self._pending.keep(token, (local, fallback, ids, batch))
        return local.describe() if local else {"fallback": fallback.describe() if fallback else None}

    async def commit_reload(self, token: str) -> dict[str, Any]:
        """Phase 2 on this gateway replica: swap (attribute assignments only)."""
        local, fallback, ids, batch = self._pending.take(token) or (None, None, None, None)
        if batch is not None:
            self.batch = batch
        if ids is not None and self.events is not None:
            self.events.refresh_known_ids(*ids)  # new users/items may post events from now on
        if local is not None:
            self.local = local
        if fallback is not None:
            self.fallback = fallback
            for set_fallback in self.on_fallback:
                set_fallback(fallback.stages)
        if self.cluster is not None:
            self.cluster.forget_source_names()  # re-read from the Features deployment on the next request
        settle_heap()
        return self.local.describe() if self.local else {"composition": "cluster"}

    async def abort_reload(self, token: str) -> None:
        """Drop what phase 1 prepared under ``token``."""
        self._pending.drop(token)

    async def apply_catalogue(self, catalogue: CatalogueSync, *extra: Stages | None) -> None:
        """Keep the in-process stages at the catalogue log (fused).

        ``extra``: other stages this replica serves (an experiment's challenger: control and
        treatment must see the same catalogue).
        """
        for stages in (self.local.stages if self.local is not None else None, *extra):
            if stages is not None:
                await catalogue.apply(stages)

    async def keep_current(
        self, catalogue: CatalogueSync, engagement: EngagementSync, *extra: Stages | None
    ) -> None:
        """:meth:`apply_catalogue`, then the event log's new events (read first) into the same stages."""
        targets = [self.local.stages if self.local is not None else None, *extra]
        new = await engagement.read() if any(s is not None for s in targets) else None
        await self.apply_catalogue(catalogue, *extra)
        if new is not None:
            await engagement.apply(targets, new)

    async def upsert_items(
        self, catalogue: CatalogueSync, items: list[dict[str, Any]], *extra: Stages | None
    ) -> dict[str, Any]:
        """``POST /v1/admin/items``: durable in the log, then in force on this replica at once."""
        result = await catalogue.upsert(items)
        await self.apply_catalogue(catalogue, *extra)
        return result


async def start_experiment(
    args: ServeArgs,
    service: FunnelService,
    fallback: Callable[[], Stages | None],
    *,
    metrics: ServingMetrics,
    request_log: RequestLog | None,
    flagged: Any,
    serving_version: Callable[[], Awaitable[int | None]] | None = None,
) -> tuple[ShadowScorer | None, Variants | None]:
    """The experiment of ``args`` on a gateway replica: the shadow scorer and the challenger.

    The shadow is fed by ``service``'s answers; the challenger loads now when the registry is
    readable, else at the first poll.

    Returns ``(None, None)`` when ``args`` has no experiment.
    """
    if args.experiment is None:
        return None, None
    shadow = ShadowScorer(args.experiment.shadow, args.resilience, args.source_timeout_ms / 1e3, request_log)
    service.after = shadow.observe
    variants = Variants(
        args,
        fallback=fallback,
        metrics=metrics,
        request_log=request_log,
        shadow=shadow,
        flagged=flagged,
        serving_version=serving_version,
    )
    try:
        await variants.refresh()  # start with the challenger and shadow in place
    except Exception as err:  # no registry yet: the poll picks them up later
        log.info("experiment: registry not readable yet (%s)", err)
    return shadow, variants
