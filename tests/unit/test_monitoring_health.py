"""Issue 15 item 5: every staleness / degradation alert is a gauge, a /readyz warning and one log
line per transition; the gateway's periodic check (GatewayObserver) feeds it the serving facts.

The monitor runs on an injected clock; the readiness route is the real gateway app's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from streamrec.monitoring.health import ALERTS, HealthConfig, HealthMonitor
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.service import observe
from streamrec.service.observe import GatewayObserver
from streamrec.service.reload import ReloadHistory
from streamrec.service.status import GatewayStatus
from streamrec.serving.gateway import create_app
from tests.unit.test_monitoring import Clock, Recorder

H = 3600.0
CFG = HealthConfig()

Facts = dict[str, Any]


def fresh(clock: Clock, served: dict[str, int] | None = None) -> Facts:
    """What a healthy replica sees: everything built an hour ago, every response ``full``."""
    return {
        "model_version": "v3",
        "trained_at": clock.t - H,
        "features_built_at": clock.t - H,
        "batch_computed_at": clock.t - H,
        "served_by_level": served if served is not None else {"full": 0},
        "breakers": {},
        "skew": None,
        "loaded_at": clock.t - H,
    }


def aged(key: str, max_h: float) -> Callable[[Clock, float], Facts]:
    """Facts whose ``key`` (a run time) is ``max_h`` hours old plus ``extra_h``."""

    def facts(clock: Clock, extra_h: float) -> Facts:
        return {**fresh(clock), key: clock.t - (max_h + extra_h) * H}

    return facts


#: alert -> (facts just past its threshold, just before it, words its warning must hold).
STALENESS = {
    "batch_fallback_stale": (aged("batch_computed_at", CFG.batch_fallback_max_age_h), "batch fallback"),
    "model_stale": (aged("trained_at", CFG.model_max_age_h), "the model"),
    "feature_snapshot_stale": (aged("features_built_at", CFG.feature_snapshot_max_age_h), "feature snapshot"),
}


@pytest.mark.parametrize("alert", sorted(STALENESS))
def test_a_staleness_alert_fires_past_its_threshold_once_and_clears_once(
    alert: str, caplog: pytest.LogCaptureFixture
) -> None:
    facts, words = STALENESS[alert]
    rec, clock = Recorder(), Clock()
    mon = HealthMonitor(CFG, ServingMetrics(rec), clock)
    assert mon.check(facts(clock, -0.1)) == []  # just below the threshold: quiet
    assert rec.last("streamrec_health_alert", alert=alert) == 0.0
    with caplog.at_level(logging.WARNING, logger="streamrec.monitoring.health"):
        for _ in range(3):  # still firing at every check: one log line, at the start
            warnings = mon.check(facts(clock, 0.1))
            clock.t += CFG.interval_s
    assert len(warnings) == 1 and words in warnings[0]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"health alert {alert} started"]
    assert rec.last("streamrec_health_alert", alert=alert) == 1.0
    assert all(rec.last("streamrec_health_alert", alert=a) == 0.0 for a in ALERTS if a != alert)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamrec.monitoring.health"):
        for _ in range(2):
            assert mon.check(fresh(clock)) == []
    assert [r.getMessage() for r in caplog.records] == [f"health alert {alert} cleared"]
    assert rec.last("streamrec_health_alert", alert=alert) == 0.0


def test_sustained_degradation_fires_once_and_clears_once(caplog: pytest.LogCaptureFixture) -> None:
    rec, clock = Recorder(), Clock()
    mon = HealthMonitor(CFG, ServingMetrics(rec), clock)
    served = {"full": 100, "batch": 0}
    assert mon.check(fresh(clock, dict(served))) == []
    with caplog.at_level(logging.WARNING, logger="streamrec.monitoring.health"):
        for _ in range(3):  # 10 of every 40 responses below full: 25% > 20%
            clock.t += CFG.interval_s
            served = {"full": served["full"] + 30, "batch": served["batch"] + 10}
            warnings = mon.check(fresh(clock, dict(served)))
    assert len(warnings) == 1 and "below 'full'" in warnings[0]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "health alert sustained_degradation started"
    ]
    assert rec.last("streamrec_health_alert", alert="sustained_degradation") == 1.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamrec.monitoring.health"):
        # the window (300 s) moves past the degraded responses: only full ones are left in it
        for _ in range(int(CFG.degradation_window_s / CFG.interval_s) + 2):
            clock.t += CFG.interval_s
            served = {"full": served["full"] + 40, "batch": served["batch"]}
            warnings = mon.check(fresh(clock, dict(served)))
    assert warnings == []
    assert [r.getMessage() for r in caplog.records] == ["health alert sustained_degradation cleared"]
    assert rec.last("streamrec_health_alert", alert="sustained_degradation") == 0.0


def _status(health: HealthMonitor) -> GatewayStatus:
    """A fused gateway's status whose stages answer and whose breakers are closed."""

    async def primary() -> tuple[Any, list[str]]:
        return None, ["popularity"]

    closed = SimpleNamespace(snapshot=lambda: {"state": "closed"})
    return GatewayStatus(
        "fused",
        stages=cast(Any, SimpleNamespace(primary=primary, local=None, events=None)),
        service=cast(Any, SimpleNamespace(breaker=closed)),
        runner=cast(Any, None),
        history=ReloadHistory(),
        health=health,
        catalogue=cast(Any, None),
    )


def test_a_firing_alert_is_a_readyz_warning_and_readiness_stays_200() -> None:
    clock = Clock()
    mon = HealthMonitor(CFG, None, clock)
    app = create_app(cast(Any, None), None, cast(Any, None), ready=_status(mon).ready)
    with TestClient(app) as c:
        mon.check(fresh(clock))
        r = c.get("/readyz")
        assert r.status_code == 200 and "warnings" not in r.json()
        mon.check({**fresh(clock), "batch_computed_at": clock.t - 40 * H})
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert [w for w in r.json()["warnings"] if "batch fallback lists is 40.0 h old" in w]
        mon.check(fresh(clock))
        assert "warnings" not in c.get("/readyz").json()


def test_the_gateway_observer_turns_stage_facts_into_alerts_and_event_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe, "FACTS_TIMEOUT_S", 0.05)
    rec, clock = Recorder(), Clock()
    metrics = ServingMetrics(rec)
    mon = HealthMonitor(CFG, metrics, clock)
    answer: dict[str, Any] = {"hang": False, "trained_at": clock.t - 50 * H}

    async def details() -> tuple[dict[str, Any] | None, float | None]:
        if answer["hang"]:
            await asyncio.sleep(60)
        built = {"model_version": "v3", "trained_at": answer["trained_at"], "features_built_at": clock.t - H}
        return {**built, "batch_computed_at": clock.t - H}, clock.t - H

    events = {"stored": 4, "duplicates": 1, "rejected": 0, "push_failed": 2}
    obs = GatewayObserver(
        mon,
        metrics,
        str(tmp_path),
        details,
        lambda: None,
        lambda: {"full": 10},
        lambda: {"online_store": {"state": "open"}},
        lambda: events,
    )
    asyncio.run(obs.check())
    assert any("the model is 50.0 h old" in w for w in mon.warnings)
    assert rec.last("streamrec_model_version") == 3.0
    assert rec.last("streamrec_model_age_seconds") == pytest.approx(50 * H)
    assert rec.last("streamrec_breaker_state", breaker="online_store") == 2.0
    assert rec.total("streamrec_events_total", outcome="push_failed") == 2

    # Stages that do not answer in time: judged on the last facts (the alert does not clear).
    answer.update(hang=True, trained_at=clock.t - H)
    asyncio.run(obs.check())
    assert any("the model is" in w for w in mon.warnings)

    # A skew check with alerts left in the data directory becomes the skew alert.
    answer["hang"] = False
    skew = tmp_path / "monitoring" / "skew" / "latest.json"
    skew.parent.mkdir(parents=True)
    skew.write_text(
        json.dumps(
            {"checked_at_epoch": clock.t, "model_version": "v3", "alerts": 1, "alerted_features": ["age"]}
        )
    )
    asyncio.run(obs.check())
    assert [w for w in mon.warnings if "(age)" in w] and not [w for w in mon.warnings if "the model is" in w]
    assert rec.last("streamrec_health_alert", alert="skew") == 1.0
