"""What a gateway replica watches between requests: health facts, alerts, event counters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from streamrec.funnel.fallback import BatchTopN

log = logging.getLogger(__name__)


def health_facts(
    details: dict[str, Any] | None,
    batch: BatchTopN | None,
    served_by_level: dict[str, int],
    breakers: dict[str, dict[str, Any]],
    skew: dict[str, Any] | None,
) -> dict[str, Any]:
    """The facts :meth:`~streamrec.monitoring.health.HealthMonitor.check` evaluates.

    Args:
        details: The serving stages' ``describe()`` (the trained recommender's has
            ``model_version``, ``trained_at``, ``features_built_at``, ``batch_computed_at``).
        batch: The batch level's lists (their age when ``details`` has none).
        served_by_level: Cumulative responses per level of this replica.
        breakers: Breaker snapshots by name.
        skew: The last skew check (:func:`~streamrec.monitoring.health.read_skew`).
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
