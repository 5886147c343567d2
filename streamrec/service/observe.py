"""What a serving replica watches between requests: breaker states, health facts and alerts."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from streamrec.funnel.fallback import BatchTopN
from streamrec.monitoring.health import HealthMonitor, read_skew
from streamrec.monitoring.metrics import ServingMetrics

log = logging.getLogger(__name__)

#: How long the health check waits for a remote stage's facts before using the last ones.
FACTS_TIMEOUT_S = 2.0


def health_facts(
    details: dict[str, Any] | None,
    batch: BatchTopN | None,
    served_by_level: dict[str, int],
    breakers: dict[str, dict[str, Any]],
    skew: dict[str, Any] | None,
    loaded_at: float | None = None,
) -> dict[str, Any]:
    """The facts :meth:`~streamrec.monitoring.health.HealthMonitor.check` evaluates.

    Args:
        details: The serving stages' ``describe()`` (the trained recommender's has
            ``model_version``, ``trained_at``, ``features_built_at``, ``batch_computed_at``).
        batch: The batch level's lists (their age when ``details`` has none).
        served_by_level: Cumulative responses per level of this replica.
        breakers: Breaker snapshots by name.
        skew: The last skew check (:func:`~streamrec.monitoring.health.read_skew`).
        loaded_at: When the serving stages were loaded (epoch seconds).
    """
    d = details or {}
    return {
        "model_version": d.get("model_version"),
        "trained_at": d.get("trained_at"),
        "features_built_at": d.get("features_built_at"),
        "batch_computed_at": d.get("batch_computed_at") or (batch.computed_at if batch is not None else None),
        "served_by_level": dict(served_by_level),
        "breakers": breakers,
        "skew": skew,
        "loaded_at": loaded_at,
    }


async def every(interval_s: float, fn: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``fn`` every ``interval_s`` seconds until cancelled; a failing run is logged, not fatal."""
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("%s failed: %s: %s", name, type(err).__name__, err)
        await asyncio.sleep(interval_s)


class BreakerExporter:
    """Exports one replica's breaker states every ``interval_s`` from a daemon thread.

    A stage replica of the cluster composition has no loop task of its own until it is called;
    a thread starts with the replica and needs none (Ray's metrics are thread-safe).

    Args:
        snapshot: ``() -> {name: {"state": ...}}`` (e.g. ``StageRunner.snapshot``).
        metrics: Where the ``streamrec_breaker_state`` gauges go.
        interval_s: Seconds between two exports.
    """

    def __init__(
        self, snapshot: Callable[[], dict[str, dict[str, Any]]], metrics: ServingMetrics, interval_s: float
    ) -> None:
        self._snapshot = snapshot
        self._metrics = metrics
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="breaker-export", daemon=True)
        if metrics.enabled:
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._metrics.breakers(self._snapshot())
            except Exception as err:  # a snapshot race must not end the exports
                log.warning("breaker export failed: %s: %s", type(err).__name__, err)
            if self._stop.wait(self._interval_s):
                return

    def stop(self) -> None:
        """Stop exporting."""
        self._stop.set()


class GatewayObserver:
    """The gateway replica's periodic check: facts -> alerts, gauges and event counters.

    Args:
        monitor: The replica's health monitor.
        metrics: Its metrics.
        data_dir: Where the last skew check is read from.
        details: ``async () -> (stage details, loaded_at)`` of the serving stages (a remote
            call in the cluster composition: bounded by :data:`FACTS_TIMEOUT_S`, the last
            answer is used when it does not come).
        batch: ``() -> BatchTopN | None`` of the batch level.
        served: ``() -> {level: responses}`` (cumulative).
        breakers: ``() -> {name: snapshot}`` of this replica.
        events: ``() -> event-log counters`` (None: no event log).
    """

    def __init__(
        self,
        monitor: HealthMonitor,
        metrics: ServingMetrics,
        data_dir: str | None,
        details: Callable[[], Awaitable[tuple[dict[str, Any] | None, float | None]]],
        batch: Callable[[], BatchTopN | None],
        served: Callable[[], dict[str, int]],
        breakers: Callable[[], dict[str, dict[str, Any]]],
        events: Callable[[], dict[str, Any] | None],
    ) -> None:
        self.monitor = monitor
        self._metrics = metrics
        self._data_dir = data_dir
        self._details = details
        self._batch = batch
        self._served = served
        self._breakers = breakers
        self._events = events
        self._last: tuple[dict[str, Any] | None, float | None] = (None, None)

    async def check(self) -> None:
        """One check (what :func:`every` runs)."""
        try:
            self._last = await asyncio.wait_for(self._details(), FACTS_TIMEOUT_S)
        except Exception as err:  # the stages are down or slow: judge on what was known
            log.debug("stage facts unavailable (%s: %s); using the last ones", type(err).__name__, err)
        details, loaded_at = self._last
        skew = await asyncio.to_thread(read_skew, self._data_dir)
        self.monitor.check(
            health_facts(details, self._batch(), self._served(), self._breakers(), skew, loaded_at)
        )
        counters = self._events()
        if counters is not None:
            self._metrics.events(counters)
