"""The application builder's arguments (the ``args:`` block of a Serve config), validated strictly."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from streamrec.auth import AuthConfig
from streamrec.config import StrictModel, parse_config
from streamrec.experiments.config import ExperimentConfig
from streamrec.funnel.stages import ALL_SOURCES
from streamrec.monitoring.health import HealthConfig
from streamrec.monitoring.logs import RequestLogConfig
from streamrec.reranking.config import ReRankConfig
from streamrec.resilience import ResilienceConfig
from streamrec.serving.gateway import GatewayLimits

#: The stages a composition may be asked to serve.
StagesKind = Literal["auto", "recommender", "popularity", "noop"]


class RankerBatch(StrictModel):
    """``@serve.batch`` settings of the cluster ranker.

    Attributes:
        max_batch_size: Most requests ranked together.
        batch_wait_timeout_s: Longest wait for a batch to fill.
    """

    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)


class FaultInjection(StrictModel):
    """Faults injected on purpose (fault tests, game days); all off by default.

    Attributes:
        ranker_error: Every ranker call raises :class:`~streamrec.errors.InjectedFaultError`.
        ranker_delay_ms: Every ranker call first sleeps this long in its worker thread (a slow
            or hung ranker; past the ranker budget the request is served at ``simple_ranking``).
        source_delay_ms: Retrieval source name -> milliseconds each of its calls first sleeps in
            its worker thread (a slow source; past ``source_timeout_ms`` the request goes on
            without it and the miss is counted with cause ``timeout``).
    """

    ranker_error: bool = False
    ranker_delay_ms: float = Field(default=0.0, ge=0)
    source_delay_ms: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)

    @field_validator("source_delay_ms")
    @classmethod
    def _known_sources(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(ALL_SOURCES))
        if unknown:
            raise ValueError(
                f"faults.source_delay_ms names no retrieval source: {', '.join(unknown)}"
                f" (sources: {', '.join(ALL_SOURCES)})"
            )
        return v

    @property
    def active(self) -> bool:
        """Whether any fault is switched on."""
        return self.ranker_error or self.ranker_delay_ms > 0 or any(self.source_delay_ms.values())


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
        events_sink_timeout_ms: Budget of one streaming push; past it the events are answered
            as ``push_failed`` (they are in the log) and the push counts as a sink failure.
        ranker_batch: ``@serve.batch`` settings of the cluster ranker.
        rerank: The trained recommender's re-ranking rules (per-category cap in the top
            window, freshness and fairness quotas, content policy, seen-item suppression,
            promoted boost; :class:`~streamrec.reranking.config.ReRankConfig`). Omitted keys
            keep their defaults; unknown keys are errors.
        source_threads: Worker threads that run retrieval-source calls of the trained stages
            (fused gateway, cluster ``Retriever``), at least 2 whatever is set here (a hung
            source holds all but one at most, however many requests overlap): never the
            replica's event loop. More threads let more of a request's sources overlap (FAISS
            and numpy release the GIL), one worker call each; with the default 2, the fused
            gateway makes one worker call for all of a request's sources, each still under its
            own deadline and breaker (ADR-016).
        watch_champion_s: Poll the registry's ``champion`` alias this often (seconds) and
            hot-reload every replica when it moves (0 turns the watcher off).
        faults: Fault injection (off by default; see :class:`FaultInjection`).
        treatment_faults: Faults injected into the experiment's challenger only (its own stage
            runner): a game day for the guardrails, which must roll such a challenger back.
        metrics: Record the serving metrics through ``ray.serve.metrics`` (exported by Ray's
            metrics agent for Prometheus; ``docs/operations.md``).
        request_log: Sampling of the request / impression log under ``<data_dir>/monitoring``
            (:class:`~streamrec.monitoring.logs.RequestLogConfig`; ``sample_rate: 0`` turns it off).
        health: Thresholds of the staleness and degradation alerts
            (:class:`~streamrec.monitoring.health.HealthConfig`).
        experiment: An experiment (:class:`~streamrec.experiments.config.ExperimentConfig`):
            the gateway then also serves the registry's ``challenger`` to the treated share of
            users and shadows the ``shadow`` version (None: the champion serves everyone).
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
    events_sink_timeout_ms: float = Field(default=1000.0, gt=0)
    ranker_batch: RankerBatch = Field(default_factory=RankerBatch)
    rerank: ReRankConfig = Field(default_factory=ReRankConfig)
    source_threads: int = Field(default=0, ge=0, le=64)
    watch_champion_s: float = Field(default=30.0, ge=0)
    faults: FaultInjection = Field(default_factory=FaultInjection)
    treatment_faults: FaultInjection = Field(default_factory=FaultInjection)
    metrics: bool = True
    request_log: RequestLogConfig = Field(default_factory=RequestLogConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    experiment: ExperimentConfig | None = None

    @classmethod
    def parse(cls, args: dict[str, Any] | ServeArgs | None) -> ServeArgs:
        """Validate builder arguments into a :class:`ServeArgs`.

        Raises:
            ConfigError: naming every unknown or invalid key.
        """
        if isinstance(args, ServeArgs):
            return args
        return parse_config(args or {}, cls, "Serve application args")
