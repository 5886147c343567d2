"""The serving metrics: one catalogue, recorded through Ray's metrics API.

Every metric StreamRec exports is declared once in :data:`CATALOGUE` (name, kind, tags, help).
:class:`ServingMetrics` records them through a *metrics module* with Ray's interface
(``Counter``, ``Gauge``, ``Histogram`` classes taking ``name``, ``description``, ``tag_keys`` and
``boundaries``): the Serve deployments pass ``ray.serve.metrics`` (adds the ``application``,
``deployment`` and ``replica`` tags; Ray's metrics agent on every node exports them for Prometheus
with a ``ray_`` prefix). ``None`` disables recording (in-process tools, offline evaluation).

Tag values are bounded: levels, reasons (a fixed vocabulary, :func:`reason_tag`), stage and
source names from the config, breaker names, event outcomes. Never user or item ids.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

#: Latency buckets in milliseconds (the p95 target is 200 ms).
LATENCY_MS: tuple[float, ...] = (2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 3000)
#: Candidate-count buckets of one retrieval source.
CANDIDATES: tuple[float, ...] = (1, 10, 25, 50, 100, 200, 300, 500, 1000)

#: Values of the ``state`` gauge of a breaker.
BREAKER_STATE: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric (Prometheus name: ``ray_`` + ``name``; counters keep ``_total``)."""

    name: str
    kind: Kind
    help: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


CATALOGUE: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(
            "streamrec_request_latency_ms",
            "histogram",
            "Recommend latency in the gateway (ms), by the level that served and the experiment variant",
            ("level", "variant"),
            LATENCY_MS,
        ),
        MetricSpec(
            "streamrec_stage_latency_ms",
            "histogram",
            "Latency of one funnel stage (ms): features, retrieval, ranking, reranking",
            ("stage",),
            LATENCY_MS,
        ),
        MetricSpec(
            "streamrec_requests_total",
            "counter",
            "Recommend responses by degradation level, the first reason (a fixed vocabulary) and variant",
            ("level", "reason", "variant"),
        ),
        MetricSpec(
            "streamrec_source_candidates",
            "histogram",
            "Candidates one retrieval source returned for one request",
            ("source",),
            CANDIDATES,
        ),
        MetricSpec(
            "streamrec_source_missing_total",
            "counter",
            "Requests a retrieval source missed, by cause: timeout, error or circuit_open",
            ("source", "cause"),
        ),
        MetricSpec(
            "streamrec_breaker_state",
            "gauge",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ("breaker",),
        ),
        MetricSpec(
            "streamrec_model_version",
            "gauge",
            "Registry version of the serving model (0: no trained model; -1: a bundle served by path)",
        ),
        MetricSpec("streamrec_model_age_seconds", "gauge", "Seconds since the serving model was trained"),
        MetricSpec(
            "streamrec_batch_fallback_age_seconds",
            "gauge",
            "Seconds since the batch fallback's top-N lists were computed",
        ),
        MetricSpec(
            "streamrec_feature_snapshot_age_seconds",
            "gauge",
            "Seconds since the newest offline user-feature snapshot the serving stages hold",
        ),
        MetricSpec(
            "streamrec_online_store_read_ms",
            "histogram",
            "Online-store user-feature read (ms), by outcome (ok, timeout, error, circuit_open)",
            ("outcome",),
            LATENCY_MS,
        ),
        MetricSpec(
            "streamrec_events_total",
            "counter",
            "Events by outcome: accepted, duplicate, rejected, push_failed",
            ("outcome",),
        ),
        MetricSpec(
            "streamrec_rate_limited_total",
            "counter",
            "Requests refused with 429, by limiter: key, address, admin_reload",
            ("limiter",),
        ),
        MetricSpec(
            "streamrec_http_responses_total",
            "counter",
            "HTTP responses of the gateway by route and status class (2xx, 4xx, 5xx)",
            ("route", "status_class"),
        ),
        MetricSpec(
            "streamrec_health_alert",
            "gauge",
            "1 while a health alert fires: batch_fallback_stale, model_stale, "
            "feature_snapshot_stale, sustained_degradation, skew",
            ("alert",),
        ),
        MetricSpec(
            "streamrec_skew_alerts",
            "gauge",
            "Features alerting in the last training-serving skew check (streamrec monitor skew)",
        ),
        MetricSpec(
            "streamrec_skew_check_age_seconds",
            "gauge",
            "Seconds the serving model has gone without a skew check (since its last check, else since it loaded)",
        ),
        MetricSpec(
            "streamrec_reloads_total",
            "counter",
            "Hot reloads started by this replica, by outcome: committed, refused, failed",
            ("outcome",),
        ),
        MetricSpec(
            "streamrec_request_log_dropped_total",
            "counter",
            "Sampled request / impression log rows dropped because the writer fell behind",
        ),
    )
}

#: Stages of the funnel's ``timings_ms`` exported as ``streamrec_stage_latency_ms``.
STAGES: tuple[str, ...] = ("features", "retrieval", "ranking", "reranking")
#: The values of ``streamrec_source_missing_total``'s ``cause`` tag.
MISS_CAUSE_TAGS: tuple[str, ...] = ("timeout", "error", "circuit_open")

#: Components a degradation reason can name (the ``reason`` tag is ``<component>_<cause>``).
_COMPONENTS = ("online_store", "ranker", "full", "funnel", "batch", "popularity", "cached", "source")
_CAUSES = (
    ("circuit open", "circuit_open"),
    ("timeout", "timeout"),
    ("error", "error"),
    ("no ", "empty"),
    ("nothing", "empty"),
)
_ROUTES = ("recommend", "events", "reload", "items", "status", "healthz", "readyz")


def variant_tag(variant: str | None) -> str:
    """The ``variant`` tag: ``control``, ``treatment`` or ``none`` (outside experiments); bounded."""
    return variant if variant in ("control", "treatment") else "none"


def reason_tag(reason: str | None) -> str:
    """The bounded ``reason`` tag of a ``degradation_reason`` (its first cause).

    ``"online_store: timeout; served ..."`` -> ``online_store_timeout``; ``None`` -> ``none``;
    anything outside the vocabulary -> ``other``.
    """
    if not reason:
        return "none"
    first = reason.split(";", 1)[0].strip()
    if "backfilled from" in first:
        return "backfill"
    if "flagged item(s) removed" in first:
        return "flagged_removed"
    head, _, rest = first.partition(":")
    component = head.strip().split(":", 1)[0]
    if component not in _COMPONENTS:
        return "other"
    cause = next((tag for text, tag in _CAUSES if text in rest), "other")
    return f"{component}_{cause}"


def route_tag(path: str) -> str:
    """The bounded ``route`` tag of a request path (``other`` for anything unknown)."""
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last if last in _ROUTES else "other"


def _sanitise(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_:.\-]", "_", value)[:64]


class ServingMetrics:
    """Records the :data:`CATALOGUE` through ``module`` (``ray.serve.metrics``; None: off).

    Thread-safe as the backend is (Ray's metrics are). Recording never raises: a metric that
    cannot be declared or recorded is logged and disabled, the others and the request go on.

    Args:
        module: An object with ``Counter``, ``Gauge`` and ``Histogram`` classes of Ray's
            interface, or None.
    """

    def __init__(self, module: Any | None = None) -> None:
        self._m: dict[str, Any] = {}
        self._events_seen: dict[str, int] = {}
        self.enabled = module is not None
        self.declared = 0
        if module is None:
            return
        for spec in CATALOGUE.values():
            try:
                if spec.kind == "histogram":
                    self._m[spec.name] = module.Histogram(
                        spec.name, description=spec.help, boundaries=list(spec.boundaries), tag_keys=spec.tags
                    )
                else:
                    cls = module.Counter if spec.kind == "counter" else module.Gauge
                    self._m[spec.name] = cls(spec.name, description=spec.help, tag_keys=spec.tags)
            except Exception as err:  # a metric is never worth a replica that does not start
                log.warning("metric %s disabled: %s: %s", spec.name, type(err).__name__, err)
        self.enabled = bool(self._m)
        self.declared = len(self._m)

    # ------------------------------------------------------------------ primitives
    def _record(self, name: str, op: str, value: float, tags: dict[str, str] | None = None) -> None:
        metric = self._m.get(name)
        if metric is None:
            return
        try:
            if op == "inc":
                if value > 0:
                    metric.inc(value, tags=tags)
            elif op == "set":
                metric.set(value, tags=tags)
            else:
                metric.observe(value, tags=tags)
        except Exception as err:
            log.warning("metric %s failed (%s: %s); it is disabled", name, type(err).__name__, err)
            self._m.pop(name, None)
            self.enabled = bool(self._m)

    # ------------------------------------------------------------------ requests
    def request(
        self,
        level: str,
        reason: str | None,
        latency_ms: float,
        timings_ms: dict[str, float],
        variant: str | None = None,
    ) -> None:
        """One recommend response: its latency, level, reason, variant and per-stage times."""
        v = variant_tag(variant)
        self._record("streamrec_request_latency_ms", "observe", latency_ms, {"level": level, "variant": v})
        self._record(
            "streamrec_requests_total", "inc", 1, {"level": level, "reason": reason_tag(reason), "variant": v}
        )
        for stage in STAGES:
            if stage in timings_ms:
                self._record("streamrec_stage_latency_ms", "observe", timings_ms[stage], {"stage": stage})

    def sources(self, counts: dict[str, int], missing: dict[str, str]) -> None:
        """Candidates per retrieval source of one request, and the sources it missed (``source -> cause``)."""
        for source, n in counts.items():
            self._record("streamrec_source_candidates", "observe", n, {"source": _sanitise(source)})
        for source, cause in missing.items():
            tags = {"source": _sanitise(source), "cause": cause if cause in MISS_CAUSE_TAGS else "error"}
            self._record("streamrec_source_missing_total", "inc", 1, tags)

    def online_read(self, ms: float, outcome: str) -> None:
        """One online-store read (``ok``, ``timeout``, ``error``, ``circuit_open``)."""
        self._record("streamrec_online_store_read_ms", "observe", ms, {"outcome": outcome})

    def rate_limited(self, limiter: str) -> None:
        """One 429 (``key``, ``address`` or ``admin_reload``)."""
        self._record("streamrec_rate_limited_total", "inc", 1, {"limiter": limiter})

    def http_response(self, path: str, status: int) -> None:
        """One HTTP response of the gateway."""
        self._record(
            "streamrec_http_responses_total",
            "inc",
            1,
            {"route": route_tag(path), "status_class": f"{status // 100}xx"},
        )

    def reload(self, outcome: str) -> None:
        """One hot reload this replica ran (``committed``, ``refused`` or ``failed``)."""
        self._record("streamrec_reloads_total", "inc", 1, {"outcome": outcome})

    def log_dropped(self, n: int) -> None:
        """Request-log rows dropped (the writer fell behind)."""
        self._record("streamrec_request_log_dropped_total", "inc", n)

    # ------------------------------------------------------------------ state (polled)
    def breakers(self, snapshot: dict[str, dict[str, Any]]) -> None:
        """Breaker states from ``{name: {"state": ...}}`` snapshots."""
        for name, b in snapshot.items():
            state = b.get("state") if isinstance(b, dict) else None
            if state in BREAKER_STATE:
                self._record("streamrec_breaker_state", "set", BREAKER_STATE[state], {"breaker": _sanitise(name)})

    def events(self, stats: dict[str, Any]) -> None:
        """Event-log counters (cumulative, as :meth:`EventLog.snapshot` gives them): adds the increase."""
        for outcome, key in (
            ("accepted", "stored"),
            ("duplicate", "duplicates"),
            ("rejected", "rejected"),
            ("push_failed", "push_failed"),
        ):
            now = int(stats.get(key) or 0)
            before = self._events_seen.get(outcome, 0)
            if now > before:
                self._record("streamrec_events_total", "inc", now - before, {"outcome": outcome})
            self._events_seen[outcome] = now

    def gauge(self, name: str, value: float | None, tags: dict[str, str] | None = None) -> None:
        """Set one gauge of the catalogue (``None`` values are skipped)."""
        if name not in CATALOGUE or CATALOGUE[name].kind != "gauge":
            raise KeyError(f"{name} is not a gauge of the metrics catalogue")
        if value is not None:
            self._record(name, "set", float(value), tags)
