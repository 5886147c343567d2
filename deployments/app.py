"""Ray Serve deployments and the application builder (thin wrappers; logic lives in streamrec/).

``build_app(args)`` is the ``import_path`` of the Serve configs (``configs/serve/*.yaml``)::

    applications:
      - name: streamrec
        import_path: deployments.app:build_app
        args: {data_dir: ..., composition: fused}      # see deployments.runtime.ServeArgs

Compositions (the same :func:`~streamrec.serving.stages.run_funnel` in both):

* **fused**: one deployment, ``Gateway`` (FastAPI ingress), holds the stages in-process and calls
  them directly. No actor hops: the composition for small machines.
* **cluster**: ``Gateway`` -> ``Features`` (user context), ``Retriever`` (every source, called
  concurrently, one call per source), ``Ranker`` (merge + rank in one hop, ``@serve.batch``),
  ``Reranker``, each its own deployment scaled independently through the config's
  ``autoscaling_config``; the gateway's ``call`` goes through deployment handles.

Both keep an in-process popularity level in the gateway as the last fallback (see
:class:`deployments.runtime.FunnelService`).

Hot reload: ``POST /v1/admin/reload`` (scope ``admin``) runs a two-phase swap over every replica
that holds stages: *prepare* (each replica asks the factory for a fresh stages object, off the
event loop) on all of them, then *commit* (an attribute swap) only if every prepare succeeded,
else *abort*: a bad bundle is refused everywhere and the old one keeps serving. In-flight
requests finish on the stages object they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from deployments.runtime import (
    Call,
    FunnelService,
    LoadedStages,
    ServeArgs,
    SourceThreads,
    build_gateway,
    champion_version,
    load_stages,
    local_call,
    settle_heap,
)
from streamrec.api_models import RecommendRequest
from streamrec.errors import ConfigError, CorruptCheckpointError, ModelError, ServingError
from streamrec.serving.gateway import merge_replica_status
from streamrec.serving.stages import Candidates, Stages, UserContext

log = logging.getLogger("streamrec.deployments")

_STAGE_OPTS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 64}


#: A prepared reload older than this is abandoned: its gateway died between the two phases.
_RELOAD_STALE_S = 600.0


class _PendingReloads:
    """What phase 1 prepared on this replica, by reload token: one reload at a time.

    A prepared reload holds a whole bundle in memory until its commit or abort, so a second
    one is refused while one is pending; one older than :data:`_RELOAD_STALE_S` (its gateway
    died between the phases) is dropped first. An abort can overtake a prepare that is still
    loading: what that prepare loaded is then not kept.
    """

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self._ready: dict[str, Any] = {}

    def claim(self, token: str) -> None:
        """Start preparing ``token``.

        Raises:
            ServingError: another reload is in progress on this replica.
        """
        now = time.monotonic()
        for other, t0 in list(self._since.items()):
            if other != token and now - t0 > _RELOAD_STALE_S:
                log.warning("dropping reload %s, prepared %.0fs ago and never committed", other, now - t0)
                self.drop(other)
        busy = [t for t in self._since if t != token]
        if busy:
            raise ServingError(
                f"another reload ({busy[0][:8]}) is in progress on this replica; retry when it ends"
            )
        self._since[token] = now

    def keep(self, token: str, prepared: Any) -> None:
        """Hold what ``token``'s prepare loaded.

        Raises:
            ServingError: ``token`` was aborted while it loaded (nothing is kept).
        """
        if token not in self._since:
            raise ServingError(f"reload {token[:8]} was aborted while this replica prepared it")
        self._ready[token] = prepared

    def take(self, token: str) -> Any:
        """End ``token``: what its prepare loaded (None if nothing)."""
        self._since.pop(token, None)
        return self._ready.pop(token, None)

    def drop(self, token: str) -> None:
        """End ``token`` without using what it loaded (an abort, or a failed prepare)."""
        self.take(token)


class _StageHost:
    """Holds one stages object and implements the two-phase reload protocol."""

    _args: ServeArgs
    _loaded: LoadedStages

    def _init_host(self, args: dict[str, Any]) -> None:
        self._args = ServeArgs.parse(args)
        self._loaded = load_stages(self._args)
        self._pending = _PendingReloads()
        settle_heap()

    @property
    def stages(self) -> Stages:
        """The current stages object (read once per call: a swap never splits a call)."""
        return self._loaded.stages

    def _reload_args(self) -> ServeArgs:
        # Once the trained recommender serves, a reload must load it again or be refused:
        # "auto" would silently fall back to popularity on a bad bundle.
        if self._loaded.kind == "recommender" and self._args.stages == "auto":
            return self._args.model_copy(update={"stages": "recommender"})
        return self._args

    async def prepare_reload(self, token: str, version: int | None = None) -> dict[str, Any]:
        """Phase 1: build fresh stages (of ``version``) off the event loop, pending under ``token``.

        Raises:
            ServingError: another reload is in progress on this replica (one at a time: each
                holds a whole bundle in memory until it commits or aborts).
        """
        self._pending.claim(token)
        try:
            loaded = await asyncio.to_thread(load_stages, self._reload_args(), version)
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
        """The current stages' facts."""
        return self._loaded.describe()


@serve.deployment(name="Features", **_STAGE_OPTS)
class Features(_StageHost):
    """Cluster stage: user context (online features, history, exclude list)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._init_host(args)

    async def user_context(self, request: RecommendRequest) -> UserContext:
        """:meth:`Stages.user_context`."""
        return self.stages.user_context(request)

    async def source_names(self) -> tuple[str, ...]:
        """The retrieval sources of the current stages."""
        return tuple(self.stages.source_names)


@serve.deployment(name="Retriever", **_STAGE_OPTS)
class Retriever(_StageHost):
    """Cluster stage: candidate retrieval (one call per source; the gateway calls them concurrently)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._init_host(args)
        # The gateway sends a request's sources together: in threads they overlap on the cores.
        self._sources = SourceThreads(self._args.source_threads)

    async def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """:meth:`Stages.retrieve` (in a worker thread when ``source_threads`` > 0)."""
        result: Candidates = await self._sources.retrieve(self.stages, source, ctx)
        return result


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
        out: list[Candidates | BaseException] = []
        merged: list[Candidates | BaseException] = []
        for c, p in zip(ctxs, parts, strict=True):
            try:
                merged.append(stages.merge(c, p))
            except Exception as err:  # one bad request must not fail the whole batch
                merged.append(err)
        rank_batch = getattr(stages, "rank_batch", None)
        ok = [i for i, m in enumerate(merged) if not isinstance(m, BaseException)]
        ranked: dict[int, Candidates | BaseException] = {}
        if rank_batch is not None and ok:
            try:
                results = rank_batch([ctxs[i] for i in ok], [merged[i] for i in ok])
                ranked = dict(zip(ok, results, strict=True))
            except Exception as err:
                ranked = {i: err for i in ok}
        else:
            for i in ok:
                m = merged[i]
                assert isinstance(m, Candidates)
                try:
                    ranked[i] = stages.rank(ctxs[i], m)
                except Exception as err:
                    ranked[i] = err
        for i, m in enumerate(merged):
            out.append(ranked.get(i, m))
        return out

    async def merge_rank(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """:meth:`Stages.merge` then :meth:`Stages.rank` (batched across requests)."""
        result = await self._merge_rank_batch(ctx, parts)
        if isinstance(result, BaseException):
            raise result
        return result

    async def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """:meth:`Stages.merge` alone (unbatched)."""
        return self.stages.merge(ctx, parts)

    async def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """:meth:`Stages.rank` alone (unbatched)."""
        return self.stages.rank(ctx, candidates)


@serve.deployment(name="Reranker", **_STAGE_OPTS)
class Reranker(_StageHost):
    """Cluster stage: business rules and response assembly."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._init_host(args)

    async def rerank(self, ctx: UserContext, ranked: Candidates) -> Any:
        """:meth:`Stages.rerank`."""
        return self.stages.rerank(ctx, ranked)


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
        args: Builder arguments (:class:`~deployments.runtime.ServeArgs` as a dict).
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
        self._pending = _PendingReloads()  # (local stages, fallback, catalogue ids) by token
        self._reload_lock = asyncio.Lock()  # the watcher and POST /v1/admin/reload take turns
        self._events: Any = None
        self._sources = SourceThreads(self._args.source_threads)  # used by the fused path only
        if not self._cluster:
            self._local = await asyncio.to_thread(load_stages, self._args)
        self._fallback = await asyncio.to_thread(self._load_fallback)
        settle_heap()
        self._service = FunnelService(
            self._primary,
            self._fallback.stages if self._fallback else None,
            self._args.resilience,
            self._args.source_timeout_ms / 1000.0,
        )
        self._started = time.time()
        self._watcher: asyncio.Task[None] | None = None
        if (
            self._args.watch_champion_s > 0
            and self._args.stages in ("auto", "recommender")
            and not self._args.factory
        ):  # on every replica; only the one ranked 0 at each poll acts (one reload reaches all)
            self._watcher = asyncio.get_running_loop().create_task(self._watch_champion())

    def __serve_build_asgi_app__(self) -> Any:
        app, self._events = build_gateway(
            self._args,
            self._service,
            reload=self._reload,
            ready=self._ready,
            info=self._info,
            status=self._status,
            behind_ray_proxy=True,
        )
        return app

    # ------------------------------------------------------------------ stages
    def _load_fallback(self) -> LoadedStages | None:
        """In-process popularity stages as the last level (None when pointless or disabled)."""
        if not self._args.fallback or self._args.stages == "noop":
            return None
        if self._local is not None and self._local.kind == "popularity" and self._args.stages == "popularity":
            return None  # the primary is popularity for good, in-process: nothing to fall back to
        # With ``auto`` a popularity primary (no model yet) becomes the recommender at the first
        # promotion's reload, which must find its fallback level (and deadline, breaker) in place.
        return load_stages(self._args.model_copy(update={"stages": "popularity", "factory": None}))

    async def _primary(self) -> tuple[Call, tuple[str, ...]]:
        if self._local is not None:
            stages = self._local.stages  # captured once: a reload never splits a request
            return local_call(stages, self._sources), tuple(stages.source_names)
        if self._source_names is None:
            assert self._features is not None
            self._source_names = tuple(await self._features.source_names.remote())
        return self._cluster_call, self._source_names

    async def _cluster_call(self, name: str, *args: Any) -> Any:
        assert self._features and self._retriever and self._ranker and self._reranker
        if name == "user_context":
            return await self._features.user_context.remote(*args)
        if name == "retrieve":
            return await self._retriever.retrieve.remote(*args)
        if name == "merge":
            return _Deferred(args[1])
        if name == "rank":
            ctx, merged = args
            if isinstance(merged, _Deferred):
                return await self._ranker.merge_rank.remote(ctx, merged.parts)
            return await self._ranker.rank.remote(ctx, merged)
        if name == "rerank":
            return await self._reranker.rerank.remote(*args)
        raise KeyError(f"unknown stage call '{name}'")

    # ------------------------------------------------------------------ health
    async def _ready(self) -> tuple[bool, dict[str, Any]]:
        try:
            _, sources = await asyncio.wait_for(self._primary(), timeout=5.0)
        except Exception as err:
            return False, {"reason": f"stages not reachable: {type(err).__name__}: {err}"}
        return True, {"composition": self._args.composition, "source_names": list(sources)}

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
        out["fallback"] = self._fallback.describe() if self._fallback else None
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
                reload_args = self._args
                if self._local.kind == "recommender" and self._args.stages == "auto":
                    reload_args = self._args.model_copy(update={"stages": "recommender"})
                local = await asyncio.to_thread(load_stages, reload_args, version)
            fallback = await asyncio.to_thread(self._load_fallback) if self._fallback is not None else None
            ids = await asyncio.to_thread(self._events.read_catalogue) if self._events is not None else None
        except BaseException:
            self._pending.drop(token)
            raise
        self._pending.keep(token, (local, fallback, ids))
        return local.describe() if local else {"fallback": fallback.describe() if fallback else None}

    async def commit_reload(self, token: str) -> dict[str, Any]:
        """Phase 2 on this gateway replica: swap (attribute assignments only)."""
        local, fallback, ids = self._pending.take(token) or (None, None, None)
        if ids is not None and self._events is not None:
            self._events.refresh_known_ids(*ids)  # new users/items may post events from now on
        if local is not None:
            self._local = local
        if fallback is not None:
            self._fallback = fallback
            self._service.set_fallback(fallback.stages)
        self._source_names = None  # re-read from the Features deployment on the next request
        settle_heap()
        return self._local.describe() if self._local else {"composition": "cluster"}

    async def abort_reload(self, token: str) -> None:
        """Drop what phase 1 prepared under ``token``."""
        self._pending.drop(token)

    async def _watch_champion(self) -> None:
        """Hot-reload when the registry's champion alias moves (promotion or rollback).

        Every gateway replica runs the loop, but only the one ranked 0 *now* acts (Serve
        re-ranks replicas after a scale-down). A version whose bundle is refused is not tried
        again until the alias moves; any other failure (registry unreachable, another reload in
        progress) is retried with a growing pause.
        """
        seen: int | None = None
        try:
            seen = await asyncio.to_thread(champion_version, self._args.data_dir)
        except Exception as err:  # no registry yet: the first promotion will be picked up
            log.info("champion watcher: registry not readable yet (%s)", err)
        retry_at, failures = 0.0, 0
        while True:
            await asyncio.sleep(self._args.watch_champion_s)
            if time.monotonic() < retry_at:
                continue
            try:
                latest = await asyncio.to_thread(champion_version, self._args.data_dir)
            except Exception as err:
                log.warning("champion watcher: registry unreadable (%s); will retry", err)
                continue
            if _replica_rank() != 0:  # another replica acts; follow the alias so as not to redo it
                seen = latest  # when this one becomes rank 0 (after a scale-down)
                continue
            if latest is None or latest == seen:
                continue
            log.info("champion moved from %s to %s: hot reload", seen, latest)
            try:
                await self._reload(latest)
            except (CorruptCheckpointError, ModelError, ConfigError) as err:
                log.error(
                    "hot reload to champion v%s refused, the current model keeps serving: %s", latest, err
                )
            except Exception as err:
                failures = min(failures + 1, 16)  # (2**16 polls is far past the 30 min cap)
                pause = min(self._args.watch_champion_s * 2**failures, 1800.0)
                retry_at = time.monotonic() + pause
                log.warning("hot reload to champion v%s failed (%s); retrying in %.0fs", latest, err, pause)
                continue
            seen, failures = latest, 0  # done, or refused for good: never retried on every poll

    async def _reload(self, version: int | None = None) -> dict[str, Any]:
        """Two-phase reload of every replica holding stages, all to one registry version.

        ``version`` defaults to the champion's, read once here: replicas that each read the
        alias could load different versions if it moved during the reload.
        """
        async with self._reload_lock:
            if version is None and self._args.stages in ("auto", "recommender") and not self._args.factory:
                version = await asyncio.to_thread(champion_version, self._args.data_dir)
            return await self._two_phase(version)

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
    """The Serve application for ``args`` (see :class:`deployments.runtime.ServeArgs`).

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
