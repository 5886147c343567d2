"""Plain-Python glue shared by the Ray Serve wrappers (no Ray imports: testable in-process).

* :class:`ServeArgs`: the application builder's arguments (the ``args:`` block of a Serve
  config), validated strictly.
* :func:`load_stages`: the stages factory chosen by configuration (trained recommender when a
  bundle exists, else :class:`~streamrec.serving.popularity.PopularityStages`, or the no-op
  stages of the benchmark floor).
* :class:`FunnelService`: one request through :func:`~streamrec.serving.stages.run_funnel` under
  the request deadline, with the in-process popularity level as the last fallback; the same
  object serves the fused composition (in-process ``call``) and the cluster composition (a
  ``call`` that goes through deployment handles).
* :func:`build_gateway`: the FastAPI gateway wired to a :class:`FunnelService`, the event log,
  API keys and limits.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import Field

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.auth import ApiKeyAuth, AuthConfig
from streamrec.config import StrictModel, parse_config
from streamrec.errors import ConfigError, ServingError
from streamrec.reranking.config import ReRankConfig
from streamrec.resilience import (
    AllLevelsFailedError,
    CircuitBreaker,
    Deadline,
    FallbackChain,
    FallbackStep,
    ResilienceConfig,
)
from streamrec.serving.events import EventLog, Sink
from streamrec.serving.gateway import GatewayLimits, create_app
from streamrec.serving.stages import Stages, run_funnel

log = logging.getLogger("streamrec.deployments")

#: Import path of the trained recommender's factory (written by the lead; may not exist yet).
RECOMMENDER_FACTORY = "streamrec.serving.recommender:build_stages"
#: The stages a composition may be asked to serve.
StagesKind = Literal["auto", "recommender", "popularity", "noop"]

Call = Callable[..., Awaitable[Any]]


class RankerBatch(StrictModel):
    """``@serve.batch`` settings of the cluster ranker.

    Attributes:
        max_batch_size: Most requests ranked together.
        batch_wait_timeout_s: Longest wait for a batch to fill.
    """

    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)


class ServeArgs(StrictModel):
    """Arguments of :func:`deployments.app.build_app` (the ``args:`` of a Serve config).

    Attributes:
        data_dir: Data directory (``$STREAMREC_HOME`` / ``./.streamrec`` when omitted).
        composition: ``fused`` (one ingress deployment, stages in-process) or ``cluster`` (one
            deployment per stage, called through handles).
        stages: ``auto`` (trained recommender when available, else popularity), ``recommender``
            (fail when it cannot load), ``popularity`` or ``noop`` (benchmark floor).
        factory: ``module:callable`` overriding ``stages``; called as ``f(data_dir, **factory_kwargs)``.
        factory_kwargs: Keyword arguments of the recommender factory.
        popularity: Keyword arguments of ``PopularityStages.from_data_dir`` (``window_days``...).
        noop_sources: Source names of the no-op stages (match the real topology's sources).
        fallback: Keep an in-process popularity level as the last fallback (ignored when
            ``stages: popularity`` in the fused composition: nothing to fall back to).
        source_timeout_ms: Deadline of each retrieval source.
        resilience: Request budget, per-level timeouts and circuit breaker of the primary level.
        auth: API keys (``STREAMREC_API_KEY`` is read in the replica).
        limits: Body size and rate limits.
        event_log: Serve ``POST /v1/events`` with the durable log under the data directory.
        event_log_fsync: fsync before acknowledging events (keep on outside benchmarks).
        events_sink: ``module:callable`` returning the streaming sink: called as
            ``f(data_dir)`` and must return a callable taking a list of event records
            (:func:`feature_client_sink`: the feature client's ``push_interactions``).
        ranker_batch: ``@serve.batch`` settings of the cluster ranker.
        rerank: The trained recommender's re-ranking rules (per-category cap in the top
            window, freshness and fairness quotas, content policy, seen-item suppression,
            promoted boost; :class:`~streamrec.reranking.config.ReRankConfig`). Omitted keys
            keep their defaults; unknown keys are errors.
        source_threads: Worker threads that run retrieval-source calls (fused gateway, cluster
            ``Retriever``); 0 runs them on the replica's event loop, one after the other. With
            threads the sources of a request overlap (FAISS, numpy and SQLite release the GIL)
            and a source past its deadline is left behind while the request goes on.
        watch_champion_s: Poll the registry's ``champion`` alias this often (seconds) and
            hot-reload every replica when it moves (0 turns the watcher off).
    """

    data_dir: str | None = None
    composition: Literal["fused", "cluster"] = "fused"
    stages: StagesKind = "auto"
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    popularity: dict[str, Any] = Field(default_factory=dict)
    noop_sources: list[str] = Field(default_factory=lambda: ["popularity"], min_length=1)
    fallback: bool = True
    source_timeout_ms: float = Field(default=80.0, gt=0)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: GatewayLimits = Field(default_factory=GatewayLimits)
    event_log: bool = True
    event_log_fsync: bool = True
    events_sink: str | None = None
    ranker_batch: RankerBatch = Field(default_factory=RankerBatch)
    rerank: ReRankConfig = Field(default_factory=ReRankConfig)
    source_threads: int = Field(default=0, ge=0, le=64)
    watch_champion_s: float = Field(default=30.0, ge=0)

    @classmethod
    def parse(cls, args: dict[str, Any] | ServeArgs | None) -> ServeArgs:
        """Validate builder arguments into a :class:`ServeArgs`.

        Raises:
            ConfigError: naming every unknown or invalid key.
        """
        if isinstance(args, ServeArgs):
            return args
        return parse_config(args or {}, cls, "Serve application args")


def import_object(path: str) -> Any:
    """Import ``module:attribute`` (``module.attribute`` accepted too).

    Raises:
        ModuleNotFoundError: the module does not exist.
        ConfigError: the attribute does not exist.
    """
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    mod = importlib.import_module(module)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"'{module}' has no attribute '{attr}' (from '{path}')") from None


class LoadedStages:
    """A stages object and how it came to be.

    Attributes:
        stages: The object implementing :class:`~streamrec.serving.stages.Stages`.
        kind: ``recommender``, ``popularity``, ``noop`` or ``custom``.
        version: Model version (``model_version`` of the stages when they have one).
        note: Why a fallback was chosen, when one was.
        loaded_at: Epoch seconds.
        load_seconds: Time the factory took.
    """

    def __init__(self, stages: Stages, kind: str, note: str = "", load_seconds: float = 0.0) -> None:
        self.stages = stages
        self.kind = kind
        self.version = str(getattr(stages, "model_version", kind))
        self.note = note
        self.loaded_at = time.time()
        self.load_seconds = load_seconds

    def describe(self) -> dict[str, Any]:
        """Facts for ``/readyz`` and ``/v1/admin/status``."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "model_version": self.version,
            "source_names": list(self.stages.source_names),
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
        }
        if self.note:
            out["note"] = self.note
        describe = getattr(self.stages, "describe", None)
        if callable(describe):
            out["details"] = describe()
        return out


def _popularity(args: ServeArgs) -> Stages:
    from streamrec.serving.popularity import PopularityStages

    return PopularityStages.from_data_dir(args.data_dir, **args.popularity)


def load_stages(args: ServeArgs, version: int | None = None) -> LoadedStages:
    """Build the stages object chosen by ``args`` (runs in each replica; may take seconds).

    ``version`` pins the trained recommender to that registry version (a hot reload's) instead
    of whatever the ``champion`` alias names when this replica gets to it.

    ``auto`` tries the trained recommender (imported lazily: it may not exist yet) and falls back
    to popularity with a logged warning when the module or a trained bundle is missing.

    Raises:
        StreamRecError: the chosen stages cannot load (``auto`` never raises for a missing
            recommender; it still raises when even popularity cannot load, e.g. no data).
    """
    t0 = time.perf_counter()
    if args.factory:
        stages = import_object(args.factory)(args.data_dir, **args.factory_kwargs)
        return LoadedStages(stages, "custom", load_seconds=time.perf_counter() - t0)
    if args.stages == "noop":
        from deployments.noop import NoopStages

        return LoadedStages(NoopStages(tuple(args.noop_sources)), "noop")
    if args.stages == "popularity":
        return LoadedStages(_popularity(args), "popularity", load_seconds=time.perf_counter() - t0)
    try:
        factory = import_object(RECOMMENDER_FACTORY)
        pinned = {} if version is None else {"version": version}
        stages = factory(args.data_dir, **{"rerank": args.rerank, **pinned, **args.factory_kwargs})
        check = getattr(stages, "self_check", None)
        if callable(check):
            check()  # a bundle that loads but cannot answer a request must not serve
        return LoadedStages(stages, "recommender", load_seconds=time.perf_counter() - t0)
    except ModuleNotFoundError as err:
        if args.stages == "recommender":
            raise ConfigError(
                f"stages 'recommender' requested but {RECOMMENDER_FACTORY} is missing: {err}"
            ) from err
        note = f"{RECOMMENDER_FACTORY} is not available ({err}); serving popularity"
    except Exception as err:
        if args.stages == "recommender":
            raise
        note = f"the trained recommender could not load ({type(err).__name__}: {err}); serving popularity"
    log.warning(note)
    stages = _popularity(args)
    return LoadedStages(stages, "popularity", note=note, load_seconds=time.perf_counter() - t0)


def local_primary(
    holder: Callable[[], Stages], sources: SourceThreads | None = None
) -> Callable[[], Awaitable[tuple[Call, tuple[str, ...]]]]:
    """A ``primary`` for :class:`FunnelService` over in-process stages returned by ``holder()``.

    ``holder`` is read once per request, so swapping what it returns is an atomic reload;
    ``sources`` is where retrieval-source calls run (see :class:`SourceThreads`).
    """

    async def primary() -> tuple[Call, tuple[str, ...]]:
        stages = holder()
        return local_call(stages, sources), tuple(stages.source_names)

    return primary


def settle_heap() -> None:
    """Collect once, then exempt every object alive now from garbage collection (``gc.freeze``).

    A loaded replica holds ~500k Python objects (model, feature-store registry, item table);
    one full collection over them takes ~280 ms here, a latency spike for every request in
    flight whenever the collector decides to run one. Frozen objects are never scanned. Call it
    after loading stages and after every reload commit: it first unfreezes, so stages replaced
    by the previous reload can be collected (until then their reference cycles stay in memory,
    one bundle's worth at most). The collection itself blocks the replica for a few hundred
    milliseconds, once per load or reload instead of at random under traffic.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class SourceThreads:
    """Runs ``stages.retrieve`` calls in a small thread pool, or inline when ``n == 0``.

    A request's retrieval sources are awaited together (:func:`run_funnel`); a stage method run
    on the event loop blocks it, so they would run one after the other and no deadline could
    cut one short. In worker threads their GIL-free parts (FAISS search, numpy, SQLite)
    overlap, and ``asyncio.wait_for`` really leaves a late source behind (its thread finishes
    in the background; the result is dropped).

    Args:
        n: Worker threads (0: run inline on the caller's loop).
    """

    def __init__(self, n: int) -> None:
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="retrieval") if n > 0 else None

    async def retrieve(self, stages: Stages, source: str, ctx: Any) -> Any:
        """``stages.retrieve(source, ctx)``, in a worker thread when the pool has any."""
        if self._pool is None:
            return stages.retrieve(source, ctx)
        return await asyncio.get_running_loop().run_in_executor(self._pool, stages.retrieve, source, ctx)


def local_call(stages: Stages, sources: SourceThreads | None = None) -> Call:
    """A ``call`` for :func:`run_funnel` that runs the stage methods in-process (fused).

    Args:
        stages: The stages object.
        sources: Where retrieval-source calls run (default: inline).
    """

    async def call(name: str, *args: Any) -> Any:
        if name == "retrieve" and sources is not None:
            return await sources.retrieve(stages, *args)
        return getattr(stages, name)(*args)

    return call


def as_response(out: Any) -> RecommendResponse:
    """The rerank stage's output as a :class:`RecommendResponse` (a dict is validated)."""
    if isinstance(out, RecommendResponse):
        return out
    return RecommendResponse.model_validate(out)


class FunnelService:
    """Serve one request through the funnel, degrading to popularity when the funnel fails.

    The primary level runs :func:`run_funnel` through the ``call`` returned by ``primary()``
    (looked up per request, so a reload swaps it atomically: in-flight requests keep the call
    they started with). It is bounded by the request budget and guarded by a circuit breaker;
    when it fails or times out, the in-process ``fallback`` popularity stages answer (their
    response says ``degradation_level: popularity``).

    Args:
        primary: ``async () -> (call, source_names)`` for the current stages.
        fallback: In-process last-resort stages, or None (then the primary runs unbounded:
            there is nothing to degrade to, so slowness beats failure).
        resilience: Budget, primary-level timeout and breaker settings.
        source_timeout_s: Per-retrieval-source deadline.
    """

    def __init__(
        self,
        primary: Callable[[], Awaitable[tuple[Call, tuple[str, ...]]]],
        fallback: Stages | None,
        resilience: ResilienceConfig,
        source_timeout_s: float,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._resilience = resilience
        self._source_timeout_s = source_timeout_s
        self.breaker = CircuitBreaker.from_config("funnel", resilience.breaker)
        self.served: dict[str, int] = {}
        self.fallbacks = 0
        steps: list[FallbackStep[RecommendResponse]] = [
            FallbackStep(
                "full",
                self._run_primary,
                timeout_s=resilience.level_timeout_s("full") if fallback is not None else None,
                breaker=self.breaker if fallback is not None else None,
            )
        ]
        if fallback is not None:
            steps.append(FallbackStep("popularity", self._run_fallback, run_past_deadline=True))
        self._chain: FallbackChain[RecommendResponse] = FallbackChain(steps)

    def set_fallback(self, fallback: Stages | None) -> None:
        """Replace the in-process fallback stages (after a reload)."""
        if (fallback is None) != (self._fallback is None):
            raise ValueError("a FunnelService cannot gain or lose its fallback level")
        self._fallback = fallback

    async def _run_primary(self, request: RecommendRequest) -> RecommendResponse:
        call, sources = await self._primary()
        *_, out, timings = await run_funnel(call, request, sources, self._source_timeout_s)
        resp = as_response(out)
        resp.metadata.timings_ms = {k: round(v, 3) for k, v in timings.items()}
        return resp

    async def _run_fallback(self, request: RecommendRequest) -> RecommendResponse:
        stages = self._fallback
        if stages is None:  # pragma: no cover - the step exists only with a fallback
            raise ServingError("no fallback stages configured")
        *_, out, timings = await run_funnel(
            local_call(stages), request, stages.source_names, self._source_timeout_s
        )
        resp = as_response(out)
        resp.metadata.timings_ms = {k: round(v, 3) for k, v in timings.items()}
        return resp

    async def __call__(self, request: RecommendRequest) -> RecommendResponse:
        """The response for ``request`` (never raises while a fallback level exists).

        Raises:
            ServingError: every level failed (only possible without a fallback).
        """
        # Without a fallback level there is nothing to degrade to: no deadline (slow beats failed).
        deadline = (
            Deadline.after_ms(self._resilience.request_budget_ms) if self._fallback is not None else None
        )
        try:
            result = await self._chain.arun(request, deadline=deadline)
        except AllLevelsFailedError as err:
            raise ServingError(str(err)) from err
        if result.failures:
            self.fallbacks += 1
            f = result.failures[0]
            log.warning("primary funnel did not serve (%s: %s); served %s", f.reason, f.error, result.level)
            result.value.metadata.timings_ms[f"failed:{f.level}"] = round(f.elapsed_ms, 3)
        level = result.value.metadata.degradation_level
        self.served[level] = self.served.get(level, 0) + 1
        return result.value

    def snapshot(self) -> dict[str, Any]:
        """Responses per degradation level, how many the fallback answered, the breaker's state."""
        return {
            "served_by_level": dict(self.served),
            "fallbacks": self.fallbacks,
            "breaker": self.breaker.snapshot(),
        }


def load_sink(args: ServeArgs) -> Sink | None:
    """The streaming sink named by ``args.events_sink`` (None when unset or unavailable)."""
    if not args.events_sink:
        return None
    try:
        sink: Sink = import_object(args.events_sink)(args.data_dir)
        return sink
    except Exception as err:  # events are still logged durably; only the streaming path is off
        log.warning(
            "events sink %s unavailable (%s); events are logged without streaming push", args.events_sink, err
        )
        return None


def feature_client_sink(data_dir: str | None) -> Sink:
    """The feature store's streaming push (``FeatureClient.push_interactions``) as the events sink.

    Use as ``events_sink: deployments.runtime:feature_client_sink`` in the Serve config.

    Raises:
        FeatureStoreError: no feature store has been built under ``data_dir`` (the gateway then
            logs a warning and serves events without the streaming push).
    """
    from pathlib import Path

    from streamrec.errors import FeatureStoreError
    from streamrec.features.client import FeatureClient

    client = FeatureClient(data_dir)
    if not Path(client.meta_path).is_file():
        raise FeatureStoreError(
            f"no feature store under {client.features_dir}: run 'streamrec features build' and "
            "'streamrec features apply' first"
        )
    _ = client.store  # import Feast and load the registry now, not on the first event (~10 s here)
    push: Sink = client.push_interactions
    return push


def build_gateway(
    args: ServeArgs,
    recommend: Callable[[RecommendRequest], Awaitable[RecommendResponse]],
    *,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ready: Callable[[], Any] | None = None,
    info: Callable[[], Any] | None = None,
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    environ: dict[str, str] | None = None,
    behind_ray_proxy: bool = False,
) -> tuple[FastAPI, EventLog | None]:
    """The gateway app for ``args`` plus its event log.

    ``behind_ray_proxy``: Ray Serve's proxy assigns and echoes ``X-Request-ID`` itself.
    ``status``: the admin status over every replica (see ``create_app``).

    Raises:
        ConfigError: no API key is configured while authentication is enabled.
    """
    auth = ApiKeyAuth.from_config(args.auth, environ if environ is not None else dict(os.environ))
    events = None
    if args.event_log:
        events = EventLog.open(args.data_dir, sink=load_sink(args), fsync=args.event_log_fsync)
    app = create_app(
        recommend,
        events,
        auth,
        args.limits,
        reload=reload,
        ready=ready,
        info=info,
        status=status,
        echo_request_id=not behind_ray_proxy,
    )
    return app, events


__all__ = [
    "RECOMMENDER_FACTORY",
    "FunnelService",
    "LoadedStages",
    "RankerBatch",
    "ServeArgs",
    "as_response",
    "build_gateway",
    "import_object",
    "load_sink",
    "feature_client_sink",
    "load_stages",
    "SourceThreads",
    "local_call",
    "settle_heap",
    "local_primary",
]


def champion_version(data_dir: str | None) -> int | None:
    """The version behind the registry's ``champion`` alias (None when there is none)."""
    from streamrec.registry import ModelRegistry

    info = ModelRegistry(data_dir=data_dir).get("champion")
    return None if info is None else int(info.version)
