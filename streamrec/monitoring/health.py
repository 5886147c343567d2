"""Staleness and health alerts of a serving replica, raised at the transition, not per request.

:class:`HealthMonitor` is polled every few seconds by each gateway replica with the facts of
what it serves (model, batch fallback and feature-snapshot ages, responses per level, the last
skew check). Each alert (:data:`ALERTS`) is a gauge (``streamrec_health_alert``), a ``/readyz``
warning while it fires, and one log line when it starts and one when it clears.

Ages are of the pipeline's runs (when the model was trained, the batch lists computed, the
features built), not of the data they read: a replay of old data is not stale, a pipeline that
stopped running is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from streamrec.config import StrictModel
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.paths import DataLayout
from streamrec.timeutil import epoch_s

log = logging.getLogger(__name__)

ALERTS: tuple[str, ...] = (
    "batch_fallback_stale",
    "model_stale",
    "feature_snapshot_stale",
    "sustained_degradation",
    "skew",
)


class HealthConfig(StrictModel):
    """Thresholds of the health alerts (``args.health`` in the Serve config).

    Attributes:
        interval_s: Seconds between two checks of a replica.
        batch_fallback_max_age_h: The batch top-N lists older than this raise ``batch_fallback_stale``.
        model_max_age_h: A serving model trained longer ago raises ``model_stale`` (daily retraining:
            two missed runs).
        feature_snapshot_max_age_h: Offline features built longer ago raise ``feature_snapshot_stale``.
        degradation_share: Share of responses below ``full`` over ``degradation_window_s`` that
            raises ``sustained_degradation``...
        degradation_window_s: ...over this window...
        degradation_min_requests: ...once it holds at least this many responses.
        skew_max_age_h: A skew check (``streamrec monitor skew``) older than this is ignored.
    """

    interval_s: float = Field(default=10.0, gt=0)
    batch_fallback_max_age_h: float = Field(default=36.0, gt=0)
    model_max_age_h: float = Field(default=48.0, gt=0)
    feature_snapshot_max_age_h: float = Field(default=48.0, gt=0)
    degradation_share: float = Field(default=0.2, gt=0, le=1)
    degradation_window_s: float = Field(default=300.0, gt=0)
    degradation_min_requests: int = Field(default=20, ge=1)
    skew_max_age_h: float = Field(default=48.0, gt=0)


def version_number(label: str | None) -> int:
    """``v3`` -> 3; anything else (popularity, none) -> 0."""
    if label and label.startswith("v") and label[1:].isdigit():
        return int(label[1:])
    return 0


def read_skew(data_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The last skew check's summary (``monitoring/skew/latest.json``), or None."""
    path = DataLayout.at(data_dir).root / "monitoring" / "skew" / "latest.json"
    try:
        out: dict[str, Any] = json.loads(Path(path).read_text())
        if "checked_at_epoch" not in out:
            out["checked_at_epoch"] = epoch_s(str(out["checked_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out


class HealthMonitor:
    """Evaluates the alerts of one replica and exports its state gauges (module docstring).

    Args:
        config: Thresholds.
        metrics: Where the gauges go.
        clock: Epoch-seconds clock (tests inject one).
    """

    def __init__(
        self,
        config: HealthConfig | None = None,
        metrics: ServingMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or HealthConfig()
        self.metrics = metrics or ServingMetrics(None)
        self._clock = clock
        self._firing: dict[str, str] = {}
        self._served: deque[tuple[float, int, int]] = deque()  # (time, responses, below full)

    @property
    def warnings(self) -> list[str]:
        """What fires now, one sentence each (for ``/readyz``)."""
        return list(self._firing.values())

    def check(self, facts: dict[str, Any]) -> list[str]:
        """Evaluate every alert from ``facts``; return the warnings that fire.

        Args:
            facts: ``model_version`` (``v3``), ``trained_at``, ``features_built_at``,
                ``batch_computed_at``, ``loaded_at`` (epoch seconds or None when unknown),
                ``served_by_level`` (cumulative responses per level), ``breakers`` (name ->
                snapshot), ``skew`` (:func:`read_skew`'s dict or None).
        """
        now = self._clock()
        c = self.config
        m = self.metrics
        version = version_number(facts.get("model_version"))
        if version == 0 and facts.get("trained_at") is not None:
            version = -1  # a trained bundle served from a path, not from the registry
        m.gauge("streamrec_model_version", version)
        ages = {
            "model_stale": (
                "streamrec_model_age_seconds",
                facts.get("trained_at"),
                c.model_max_age_h,
                "the model",
            ),
            "batch_fallback_stale": (
                "streamrec_batch_fallback_age_seconds",
                facts.get("batch_computed_at"),
                c.batch_fallback_max_age_h,
                "the batch fallback lists",
            ),
            "feature_snapshot_stale": (
                "streamrec_feature_snapshot_age_seconds",
                facts.get("features_built_at"),
                c.feature_snapshot_max_age_h,
                "the offline feature snapshot",
            ),
        }
        for alert, (gauge, at, max_h, what) in ages.items():
            age = None if at is None else max(0.0, now - float(at))
            m.gauge(gauge, age)
            self._set(
                alert,
                age is not None and age > max_h * 3600,
                f"{what} is {(age or 0) / 3600:.1f} h old (threshold {max_h:g} h): check the "
                "daily pipeline (docs/operations.md)",
            )
        share, total = self._degraded_share(now, facts.get("served_by_level") or {})
        self._set(
            "sustained_degradation",
            total >= c.degradation_min_requests and share > c.degradation_share,
            f"{share:.0%} of the last {total} responses were below 'full' (threshold "
            f"{c.degradation_share:.0%} over {c.degradation_window_s:g} s): see the breakers and "
            "metadata.degradation_reason",
        )
        skew = facts.get("skew")
        fresh = (
            skew is not None
            and now - float(skew.get("checked_at_epoch", 0)) <= c.skew_max_age_h * 3600
            and skew.get("model_version") in (None, facts.get("model_version"))
        )
        named = list(skew.get("alerted_features") or []) if fresh and skew is not None else []
        n_skew = len(named) if named else (int(skew.get("alerts", 0)) if fresh and skew is not None else 0)
        m.gauge("streamrec_skew_alerts", n_skew)
        # Time the serving model has gone without a skew check: since the last check of this
        # version, else since it was loaded (a reload to an unchecked version restarts the clock).
        mine = skew is not None and skew.get("model_version") in (None, facts.get("model_version"))
        since = float(skew["checked_at_epoch"]) if mine and skew is not None else facts.get("loaded_at")
        if since is not None:
            m.gauge("streamrec_skew_check_age_seconds", max(0.0, now - float(since)))
        self._set(
            "skew",
            n_skew > 0,
            f"{n_skew} feature(s) differ between training and serving"
            + (f" ({', '.join(named[:5])}{', ...' if len(named) > 5 else ''})" if named else "")
            + ": run `streamrec monitor skew --data-dir D` for the table",
        )
        m.breakers(facts.get("breakers") or {})
        for alert in ALERTS:
            m.gauge("streamrec_health_alert", 1.0 if alert in self._firing else 0.0, {"alert": alert})
        return self.warnings

    def _degraded_share(self, now: float, served: dict[str, int]) -> tuple[float, int]:
        total = sum(int(v) for v in served.values())
        below = total - int(served.get("full", 0))
        self._served.append((now, total, below))
        while len(self._served) > 1 and self._served[0][0] < now - self.config.degradation_window_s:
            self._served.popleft()
        t0, total0, below0 = self._served[0]
        n = total - total0
        return ((below - below0) / n if n > 0 else 0.0), n

    def _set(self, alert: str, firing: bool, message: str) -> None:
        was = alert in self._firing
        if firing:
            self._firing[alert] = message
            if not was:
                log.warning("health alert %s started: %s", alert, message)
        elif was:
            del self._firing[alert]
            log.warning("health alert %s cleared", alert)
