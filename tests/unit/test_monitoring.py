"""Serving metrics, the sampled request/impression log and the health alerts, in-process.

The metrics module handed to ``ServingMetrics`` here records calls (Ray's own is exercised by
``tests/e2e/test_metrics.py``, which scrapes a running app); the log writes real parquet files.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.api_models import RecommendRequest
from streamrec.funnel.popularity import PopularityStages
from streamrec.funnel.stages import Candidates, UserContext
from streamrec.monitoring.health import ALERTS, HealthConfig, HealthMonitor, read_skew, version_number
from streamrec.monitoring.logs import (
    REQUEST_ID,
    RequestLog,
    RequestLogConfig,
    ServedRecord,
    feature_columns,
    read_impressions,
    read_requests,
    read_scored,
)
from streamrec.monitoring.metrics import CATALOGUE, ServingMetrics, reason_tag, route_tag
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary
from tests.unit.test_gateway import make_world
from tests.unit.test_service import Blocking, _res


class Recorder:
    """A metrics module with Ray's interface that keeps what was recorded."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], list[float]]] = defaultdict(lambda: defaultdict(list))
        self.declared: dict[str, tuple[str, tuple[str, ...]]] = {}
        rec = self

        class _Metric:
            kind = ""

            def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = (), **_: Any) -> None:
                self.name, self.tag_keys = name, tuple(tag_keys)
                rec.declared[name] = (self.kind, self.tag_keys)

            def _put(self, value: float, tags: dict[str, str] | None) -> None:
                tags = tags or {}
                assert set(tags) == set(self.tag_keys), (self.name, tags, self.tag_keys)
                rec.values[self.name][tuple(sorted(tags.items()))].append(value)

            def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
                self._put(value, tags)

            set = observe = inc

        self.Counter = type("Counter", (_Metric,), {"kind": "counter"})
        self.Gauge = type("Gauge", (_Metric,), {"kind": "gauge"})
        self.Histogram = type("Histogram", (_Metric,), {"kind": "histogram"})

    def total(self, name: str, **tags: str) -> float:
        return sum(sum(v) for k, v in self.values[name].items() if all((t, x) in k for t, x in tags.items()))

    def last(self, name: str, **tags: str) -> float | None:
        for k, v in self.values[name].items():
            if all((t, x) in k for t, x in tags.items()):
                return v[-1]
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("mon") / "data")


class Ranked(Blocking):
    """Blocking stages whose ranker hands on its inputs, as the trained recommender's does."""

    NAMES = ("user_x", "item_y")

    def rank_batch(self, ctxs: list[UserContext], cands: list[Candidates]) -> list[Candidates]:
        out = super().rank_batch(ctxs, cands)
        for c in out:
            c.ids = self._inner.item_ids[c.items]
            c.ranker_inputs = np.stack([np.full(len(c), 1.5), c.scores.astype(np.float64)], axis=1)
            c.feature_names = self.NAMES
            c.scored_sample = np.stack([np.full(3, 1.5), np.arange(3.0)], axis=1)
        return out


def _service(world: Path, stages: Any, metrics: ServingMetrics, log: RequestLog | None) -> FunnelService:
    res = _res()
    runner = StageRunner(res, 1.0, metrics=metrics)
    pop = PopularityStages.from_data_dir(world)
    return FunnelService(local_primary(lambda: stages, runner), pop, res, 1.0, metrics=metrics, request_log=log)


# ------------------------------------------------------------------------------------ metrics


def test_every_catalogue_metric_is_declared_with_its_kind_and_tags() -> None:
    rec = Recorder()
    ServingMetrics(rec)
    assert rec.declared == {n: (s.kind, s.tags) for n, s in CATALOGUE.items()}
    assert all(n.startswith("streamrec_") for n in CATALOGUE)
    assert all(not s.tags or "user" not in " ".join(s.tags) for s in CATALOGUE.values())


def test_rays_own_metrics_api_accepts_every_declaration() -> None:
    """Ray validates names, tag keys and bucket boundaries when a metric is declared (no cluster needed)."""
    from ray.util import metrics as ray_metrics

    m = ServingMetrics(ray_metrics)
    assert m.declared == len(CATALOGUE)  # a refused declaration is logged and that metric never exported
    m.request("full", None, 3.0, {"features": 1.0})
    m.sources({"two_tower": 0}, {"trending": "timeout"})
    assert m.enabled


@pytest.mark.parametrize(
    ("reason", "tag"),
    [
        (None, "none"),
        ("online_store: timeout; served the user's last known features", "online_store_timeout"),
        ("ranker: circuit open; ordered by merged retrieval score", "ranker_circuit_open"),
        ("full: error (RuntimeError)", "full_error"),
        ("full: timeout", "full_timeout"),
        ("batch: nothing for this user", "batch_empty"),
        ("3 item(s) backfilled from batch", "backfill"),
        ("user 12345 did something new", "other"),
    ],
)
def test_reasons_map_to_a_bounded_vocabulary(reason: str | None, tag: str) -> None:
    assert reason_tag(reason) == tag


def test_routes_are_bounded() -> None:
    assert route_tag("/v1/recommend") == "recommend" and route_tag("/fused/v1/events") == "events"
    assert route_tag("/v1/users/123456") == "other"


def test_a_failing_backend_disables_metrics_and_never_raises() -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("no metrics agent")

    m = ServingMetrics(Broken())
    assert not m.enabled and m.declared == 0
    m.request("full", None, 3.0, {})  # no error


def test_event_counters_add_only_the_increase() -> None:
    rec = Recorder()
    m = ServingMetrics(rec)
    m.events({"stored": 5, "duplicates": 1, "rejected": 0, "push_failed": 0})
    m.events({"stored": 8, "duplicates": 1, "rejected": 2, "push_failed": 1})
    assert rec.total("streamrec_events_total", outcome="accepted") == 8
    assert rec.total("streamrec_events_total", outcome="duplicate") == 1
    assert rec.total("streamrec_events_total", outcome="rejected") == 2
    assert rec.total("streamrec_events_total", outcome="push_failed") == 1


def test_the_funnel_records_latency_levels_sources_and_online_reads(world: Path) -> None:
    rec = Recorder()
    m = ServingMetrics(rec)
    stages = Blocking(world)
    service = _service(world, stages, m, None)
    asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    stages.store = "down"
    asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert rec.total("streamrec_requests_total", level="full", reason="none") == 1
    assert rec.total("streamrec_requests_total", level="stale_features", reason="online_store_error") == 1
    assert len(rec.values["streamrec_request_latency_ms"][(("level", "full"), ("variant", "none"))]) == 1
    assert {k[0][1] for k in rec.values["streamrec_stage_latency_ms"]} == {
        "features",
        "retrieval",
        "ranking",
        "reranking",
    }
    sources = {k[0][1] for k in rec.values["streamrec_source_candidates"]}
    assert sources == set(stages.source_names)
    assert rec.total("streamrec_online_store_read_ms", outcome="ok") > 0
    assert len(rec.values["streamrec_online_store_read_ms"][(("outcome", "error"),)]) == 1


def test_a_missed_source_is_counted_with_its_cause(world: Path) -> None:
    class TwoSources(Blocking):
        def retrieve(self, source: str, ctx: Any) -> Any:
            if source == "broken":
                raise RuntimeError("index file gone")
            return self._inner.retrieve("popularity", ctx)

    rec = Recorder()
    stages = TwoSources(world)
    stages.source_names = ("broken", "popularity")
    service = _service(world, stages, ServingMetrics(rec), None)
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert resp.metadata.degradation_level == "full" and len(resp.items) == 5
    assert rec.total("streamrec_source_missing_total", source="broken", cause="error") == 1
    assert rec.total("streamrec_source_missing_total", source="popularity") == 0
    m = ServingMetrics(rec)
    m.sources({}, {"two_tower": "timeout", "cf": "circuit_open", "x": "unheard-of"})
    assert rec.total("streamrec_source_missing_total", source="two_tower", cause="timeout") == 1
    assert rec.total("streamrec_source_missing_total", source="cf", cause="circuit_open") == 1
    assert rec.total("streamrec_source_missing_total", source="x", cause="error") == 1  # bounded values


# ------------------------------------------------------------------------------------ request log


def test_sampled_responses_are_logged_with_the_ranker_inputs_of_served_items(world: Path, tmp_path: Path) -> None:
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), start=False)
    service = _service(world, Ranked(world), ServingMetrics(None), log)

    async def one(rid: str, user: int) -> Any:
        REQUEST_ID.set(rid)
        return await service(RecommendRequest(user_id=user, k=4))

    served = [asyncio.run(one(f"r{u}", u)) for u in (3, 4)]
    assert log.flush() == 2
    reqs = read_requests(tmp_path)
    assert list(reqs["request_id"]) == ["r3", "r4"] and set(reqs["level"]) == {"full"}
    assert (reqs["latency_ms"] > 0).all() and list(reqs["n_items"]) == [4, 4]
    imps = read_impressions(tmp_path)
    assert feature_columns(imps) == ["user_x", "item_y"]
    first = imps[imps["request_id"] == "r3"].sort_values("position")
    assert list(first["item_id"]) == [it.item_id for it in served[0].items]
    assert list(first["position"]) == [0, 1, 2, 3]
    assert (first["f_user_x"] == 1.5).all()
    scored = read_scored(tmp_path)
    assert len(scored) == 6 and feature_columns(scored) == ["user_x", "item_y"]
    assert list(scored[scored["request_id"] == "r3"]["f_item_y"]) == [0.0, 1.0, 2.0]
    files = list((tmp_path / "monitoring" / "impressions").glob("date=*/*.parquet"))
    assert len(files) == 1 and not list(files[0].parent.glob(".*.tmp"))


def test_degraded_levels_log_no_features_and_the_sample_rate_holds(world: Path, tmp_path: Path) -> None:
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), start=False)
    stages = Ranked(world)
    stages.ranker = "raise"  # simple_ranking: no ranker inputs
    service = _service(world, stages, ServingMetrics(None), log)
    asyncio.run(service(RecommendRequest(user_id=3, k=4)))
    log.flush()
    imps = read_impressions(tmp_path)
    assert set(imps["level"]) == {"simple_ranking"} and feature_columns(imps) == []
    off = RequestLog(tmp_path / "off", RequestLogConfig(sample_rate=0.0), start=False)
    assert not any(off.sampled() for _ in range(1000))
    some = RequestLog(tmp_path / "some", RequestLogConfig(sample_rate=0.25), start=False)
    assert 150 < sum(some.sampled() for _ in range(1000)) < 350


def _record(i: int) -> ServedRecord:
    return ServedRecord(f"r{i}", 1_780_000_000.0 + i, i, None, "v1", "full", None, 5.0, 2, [(1, 0.5, ["a"])])


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    dropped: list[int] = []
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0, max_pending=3), on_drop=dropped.append, start=False)
    for i in range(5):
        log.record(_record(i))
    assert log.snapshot()["pending"] == 3 and log.dropped == 2 and sum(dropped) == 2
    log.flush()
    assert list(read_requests(tmp_path)["request_id"]) == ["r0", "r1", "r2"]


def test_a_failed_write_keeps_the_rows_for_the_next_flush(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), start=False)
    log.record(_record(1))
    blocker = tmp_path / "monitoring"
    blocker.write_text("not a directory")  # the writer cannot create its folders
    with pytest.raises(OSError):
        log.flush()
    assert log.snapshot()["pending"] == 1
    blocker.unlink()
    assert log.flush() == 1 and list(read_requests(tmp_path)["request_id"]) == ["r1"]


def test_a_flush_that_fails_midway_leaves_nothing_behind_and_writes_each_row_once(tmp_path: Path) -> None:
    """A full disk can fail the second table's file after the first was written: all or none."""
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), start=False)
    log.record(_record(1))
    (tmp_path / "monitoring").mkdir()
    (tmp_path / "monitoring" / "impressions").write_text("")  # requests can be written, impressions not
    for _ in range(3):
        with pytest.raises(OSError):
            log.flush()
    assert not list((tmp_path / "monitoring").rglob("*.parquet")) and not list((tmp_path / "monitoring").rglob(".*"))
    (tmp_path / "monitoring" / "impressions").unlink()
    assert log.flush() == 1
    assert list(read_requests(tmp_path)["request_id"]) == ["r1"] and len(read_impressions(tmp_path)) == 1


def test_rows_that_cannot_be_tabulated_are_dropped_not_retried_forever(tmp_path: Path) -> None:
    dropped: list[int] = []
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), on_drop=dropped.append, start=False)
    bad = _record(1)
    bad.feature_names, bad.scored = ("a", "b"), np.ones((2, 3))  # three values for two names
    log.record(bad)
    assert log.flush() == 0 and log.dropped == 1 and dropped == [1] and log.snapshot()["pending"] == 0
    log.record(_record(2))
    assert log.flush() == 1


def test_reading_since_a_time_skips_older_days(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), start=False)
    day = 86_400.0
    for i, t in enumerate((1_780_000_000.0 - 3 * day, 1_780_000_000.0)):
        rec = _record(i)
        rec.ts = t
        log.record(rec)
        log.flush()
    since = datetime.fromtimestamp(1_780_000_000.0 - day, UTC)
    assert list(read_requests(tmp_path, since)["request_id"]) == ["r1"]
    assert len(read_requests(tmp_path)) == 2


def test_the_writer_thread_flushes_and_close_writes_the_rest(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0, flush_interval_s=0.05))
    log.record(_record(1))
    for _ in range(100):
        if log.written:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert log.written == 1
    log.record(_record(2))
    log.close()
    assert list(read_requests(tmp_path)["request_id"]) == ["r1", "r2"]


def test_reading_an_empty_log_gives_empty_frames_with_the_columns(tmp_path: Path) -> None:
    assert read_requests(tmp_path).empty and "latency_ms" in read_requests(tmp_path).columns
    assert read_impressions(tmp_path).empty and "item_id" in read_impressions(tmp_path).columns


# ------------------------------------------------------------------------------------ health


class Clock:
    def __init__(self, t: float = 1_780_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _facts(clock: Clock, **kw: Any) -> dict[str, Any]:
    base = {
        "model_version": "v3",
        "trained_at": clock.t - 3600,
        "features_built_at": clock.t - 3600,
        "batch_computed_at": clock.t - 3600,
        "served_by_level": {},
        "breakers": {"online_store": {"state": "open"}},
        "skew": None,
    }
    return {**base, **kw}


def test_staleness_alerts_fire_at_their_thresholds_and_log_only_transitions(caplog: pytest.LogCaptureFixture) -> None:
    rec, clock = Recorder(), Clock()
    mon = HealthMonitor(HealthConfig(), ServingMetrics(rec), clock)
    assert mon.check(_facts(clock)) == []
    old = _facts(clock, batch_computed_at=clock.t - 37 * 3600, trained_at=clock.t - 49 * 3600)
    with caplog.at_level("WARNING"):
        warnings = mon.check(old)
        mon.check(old)  # still firing: no second log line
    assert len(warnings) == 2 and any("batch fallback" in w and "36 h" in w for w in warnings)
    started = [r for r in caplog.records if "started" in r.getMessage()]
    assert len(started) == 2
    assert rec.last("streamrec_health_alert", alert="batch_fallback_stale") == 1.0
    assert rec.last("streamrec_health_alert", alert="feature_snapshot_stale") == 0.0
    assert rec.last("streamrec_batch_fallback_age_seconds") == pytest.approx(37 * 3600)
    assert rec.last("streamrec_model_version") == 3.0
    assert rec.last("streamrec_breaker_state", breaker="online_store") == 2.0
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert mon.check(_facts(clock)) == []
    assert sum("cleared" in r.getMessage() for r in caplog.records) == 2
    assert {a for a in ALERTS} >= {"batch_fallback_stale", "model_stale", "feature_snapshot_stale"}


def test_sustained_degradation_is_a_share_over_the_window() -> None:
    clock = Clock()
    mon = HealthMonitor(HealthConfig(degradation_window_s=60, degradation_min_requests=10), None, clock)
    mon.check(_facts(clock, served_by_level={"full": 100}))
    clock.t += 30
    assert mon.check(_facts(clock, served_by_level={"full": 105, "batch": 10})) != []  # 10 of 15 degraded
    clock.t += 30
    assert not mon.check(_facts(clock, served_by_level={"full": 200, "batch": 10}))  # the window moved on
    clock.t += 30
    assert not mon.check(_facts(clock, served_by_level={"full": 200, "batch": 15}))  # too few to judge


def test_a_fresh_skew_check_for_the_serving_model_raises_the_skew_alert(tmp_path: Path) -> None:
    clock = Clock()
    rec = Recorder()
    mon = HealthMonitor(HealthConfig(), ServingMetrics(rec), clock)
    path = tmp_path / "monitoring" / "skew" / "latest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"checked_at": "2026-05-28T20:00:00+00:00", "model_version": "v3", "alerts": 2}))
    clock.t = read_skew(tmp_path)["checked_at_epoch"] + 60  # type: ignore[index]
    warnings = mon.check(_facts(clock, skew=read_skew(tmp_path)))
    assert any("2 feature(s)" in w for w in warnings) and rec.last("streamrec_skew_alerts") == 2
    assert not mon.check(_facts(clock, skew=read_skew(tmp_path), model_version="v4"))  # another model's check
    clock.t += 49 * 3600
    assert not mon.check(_facts(clock, skew=read_skew(tmp_path)))  # too old to trust
    path.write_text(
        json.dumps(
            {"checked_at_epoch": clock.t, "model_version": "v3", "alerts": 5, "alerted_features": ["age", "x_cf"]}
        )
    )
    warnings = mon.check(_facts(clock, skew=read_skew(tmp_path)))  # five alerts on two features
    assert any("2 feature(s)" in w and "(age, x_cf)" in w for w in warnings)
    assert read_skew(tmp_path / "nothing") is None and version_number("popularity") == 0


def test_the_gateway_counts_responses_by_route_and_429s_by_limiter() -> None:
    from fastapi.testclient import TestClient

    from streamrec.auth import ApiKeyAuth, AuthConfig
    from streamrec.serving.gateway import GatewayLimits, create_app
    from tests.unit.test_security import READ, _recommend

    rec = Recorder()
    auth = ApiKeyAuth.from_config(
        AuthConfig.model_validate({"keys": [{"name": "r", "key": READ, "scopes": ["read"]}], "use_env_key": False}),
        environ={},
    )
    limits = GatewayLimits.model_validate(
        {"rate_limit": {"rate_per_s": 0.001, "burst": 2}, "unauthenticated_rate_limit": {"rate_per_s": 0.001, "burst": 1}}
    )
    app = create_app(_recommend, None, auth, limits, metrics=ServingMetrics(rec))
    with TestClient(app, raise_server_exceptions=False) as c:
        codes = [c.post("/v1/recommend", json={"user_id": 1}, headers={"X-API-Key": READ}).status_code for _ in range(3)]
        anon = [c.post("/v1/recommend", json={"user_id": 1}).status_code for _ in range(2)]
    assert codes == [200, 200, 429] and anon == [401, 429]
    assert rec.total("streamrec_rate_limited_total", limiter="key") == 1
    assert rec.total("streamrec_rate_limited_total", limiter="address") == 1
    assert rec.total("streamrec_http_responses_total", route="recommend", status_class="2xx") == 2
    assert rec.total("streamrec_http_responses_total", route="recommend", status_class="4xx") == 3


def test_catalogue_reasons_and_route_have_their_own_tags() -> None:
    assert reason_tag("1 flagged item(s) removed; 1 item(s) backfilled from popularity") == "flagged_removed"
    assert route_tag("/fused/v1/admin/items") == "items"
