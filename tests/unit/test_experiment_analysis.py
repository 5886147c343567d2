"""Experiment analysis: the statistics against hand-computed values, the decisions, and the log path
(a request log written by the real RequestLog, events in the store and in the API's event log)."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from streamrec.api_models import EventIn
from streamrec.data.event_log import EventLog
from streamrec.data.store import DataStore
from streamrec.errors import DataNotFoundError
from streamrec.experiments.analysis import (
    ExperimentLog,
    VariantSummary,
    analyse,
    analyse_experiment,
    equal_request_coverage,
    load_experiment_log,
    load_summaries,
    summarise,
)
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig, Guardrails, preregister
from streamrec.monitoring.drift import rate_interval
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, ServedRecord


def summary(
    variant: str,
    *,
    users: int = 5000,
    impressions: int = 100_000,
    clicks: int = 5000,
    completions: int = 1000,
    errors: int = 0,
    requests: int | None = None,
    p99: float = 50.0,
    coverage: tuple[int, int] = (1000, 300),
) -> VariantSummary:
    return VariantSummary(
        variant=variant,
        users=users,
        requests=requests if requests is not None else impressions // 10,
        impressions=impressions,
        clicks=clicks,
        completions=completions,
        errors=errors,
        latency_p50_ms=p99 / 3,
        latency_p99_ms=p99,
        distinct_items=coverage[1],
        coverage_requests=coverage[0],
        coverage_items=coverage[1],
    )


def pair(control: VariantSummary, treatment: VariantSummary) -> dict[str, VariantSummary]:
    return {CONTROL: control, TREATMENT: treatment}


# ------------------------------------------------------------------------------------ statistics


def test_a_doubled_ctr_with_large_samples_ships_with_the_textbook_numbers() -> None:
    cfg = ExperimentConfig(name="ab", expected_effect=0.5)
    c = summary(CONTROL, impressions=10_000, clicks=500)
    t = summary(TREATMENT, impressions=10_000, clicks=1000)
    a = analyse(pair(c, t), cfg, expected_share=0.5, n_items=1000)
    assert a.decision == "ship", a.reasons
    assert "ctr significantly better" in a.reasons[0]
    ctr = a.metric("ctr")
    # pooled two-proportion z-test by hand
    pooled = 1500 / 20_000
    z = (0.10 - 0.05) / math.sqrt(pooled * (1 - pooled) * (2 / 10_000))
    assert ctr.p_value == pytest.approx(2 * norm.sf(z), rel=1e-6)
    # Newcombe's interval of the difference from the two Wilson intervals
    p1, l1, u1 = rate_interval(1000, 10_000)
    p2, l2, u2 = rate_interval(500, 10_000)
    assert ctr.treatment == pytest.approx((p1, l1, u1)) and ctr.control == pytest.approx((p2, l2, u2))
    d = p1 - p2
    assert ctr.diff[0] == pytest.approx(0.05)
    assert ctr.diff[1] == pytest.approx(d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), rel=1e-6)
    assert ctr.diff[2] == pytest.approx(d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2), rel=1e-6)
    # relative lift: 2x -> +100%, its interval around it and well above 0
    assert ctr.lift[0] == pytest.approx(1.0) and 0.6 < ctr.lift[1] < 1.0 < ctr.lift[2] < 1.5
    assert ctr.better and not ctr.worse
    # Cohen's h for 0.05 -> 0.075 at alpha 0.05, power 0.8: about 1,450 per variant
    h = 2 * math.asin(math.sqrt(0.075)) - 2 * math.asin(math.sqrt(0.05))
    assert a.sample_size.per_variant == pytest.approx(
        2 * ((norm.ppf(0.975) + norm.ppf(0.8)) / h) ** 2, rel=1e-4
    )
    assert a.sample_size.enough and a.srm.valid
    assert all(g.passed for g in a.guardrails)
    json.dumps(a.to_dict(), allow_nan=False)  # JSON-safe


def test_equal_rates_with_enough_samples_is_no_difference() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, impressions=300_000, clicks=15_000)
    t = summary(TREATMENT, impressions=300_000, clicks=15_000)
    a = analyse(pair(c, t), cfg, expected_share=0.5, n_items=1000)
    assert a.sample_size.per_variant > 100_000  # 5% lift over 5% CTR needs ~120k per variant
    assert a.sample_size.enough
    assert a.decision == "no_difference", a.reasons
    assert a.metric("ctr").p_value == pytest.approx(1.0) and a.metric("ctr").diff[0] == 0
    assert "no significant difference in ctr" in a.reasons[0]


def test_tiny_samples_continue_and_say_how_many_are_needed() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, users=50, impressions=200, clicks=10, completions=2)
    t = summary(TREATMENT, users=50, impressions=200, clicks=20, completions=4)
    a = analyse(pair(c, t), cfg, expected_share=0.5)
    assert a.decision == "continue", a.reasons
    assert not a.sample_size.enough and a.sample_size.treatment_required > 100_000
    assert "minimum sample size" in a.reasons[0] and "200 of" in a.reasons[0]


def test_sample_size_follows_the_allocation_of_a_canary() -> None:
    cfg = ExperimentConfig(name="canary", expected_effect=0.5)
    c = summary(CONTROL, users=9900, impressions=99_000, clicks=4950)
    t = summary(TREATMENT, users=100, impressions=500, clicks=25, completions=5)
    a = analyse(pair(c, t), cfg, expected_share=0.01)
    s = a.sample_size
    # at 198 control impressions per treatment one, the treatment needs about half the equal-split number
    assert s.treatment_required < s.per_variant < s.control_required
    assert s.control_required == pytest.approx(99_000 / 500 * s.treatment_required)
    assert a.decision == "continue" and a.srm.valid


def test_a_latency_breach_rolls_back_and_names_latency() -> None:
    cfg = ExperimentConfig(name="ab", guardrails=Guardrails(latency_p99_ratio=1.5, latency_p99_ms=200))
    c = summary(CONTROL, p99=60.0)
    t = summary(TREATMENT, p99=150.0)  # 2.5x control, under the absolute budget
    a = analyse(pair(c, t), cfg, expected_share=0.5)
    assert a.decision == "rollback"
    assert len(a.reasons) == 1 and "latency_p99_ratio" in a.reasons[0] and "2.50x" in a.reasons[0]
    over_budget = analyse(pair(c, replace(t, latency_p99_ms=80.0 * 3)), cfg, expected_share=0.5)
    assert over_budget.decision == "rollback"
    assert any("latency_p99_ms" in r and "240.0 ms" in r for r in over_budget.reasons)


def test_an_error_rate_increase_rolls_back() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, requests=10_000, errors=10)
    t = summary(TREATMENT, requests=10_000, errors=300)
    a = analyse(pair(c, t), cfg, expected_share=0.5)
    assert a.decision == "rollback"
    assert any("error_rate_increase" in r and "3.00%" in r for r in a.reasons)
    within = analyse(pair(c, replace(t, errors=90)), cfg, expected_share=0.5)  # +0.8% < 1%
    assert within.decision != "rollback"


def test_a_significantly_worse_primary_metric_rolls_back_unless_within_metric_drop() -> None:
    c = summary(CONTROL, impressions=100_000, clicks=5000)
    t = summary(TREATMENT, impressions=100_000, clicks=4500)  # -10%
    a = analyse(pair(c, t), ExperimentConfig(name="ab"), expected_share=0.5)
    assert a.decision == "rollback" and any("metric_drop" in r for r in a.reasons)
    lenient = ExperimentConfig(name="ab", guardrails=Guardrails(metric_drop=0.2), expected_effect=0.2)
    b = analyse(pair(c, t), lenient, expected_share=0.5)
    assert b.decision == "no_difference" and "significantly worse" in b.reasons[0]


def test_a_60_40_split_at_an_expected_50_50_is_invalid_before_anything_else() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, users=6000)
    t = summary(TREATMENT, users=4000, p99=1000.0)  # also a guardrail breach: SRM wins
    a = analyse(pair(c, t), cfg, expected_share=0.5)
    assert a.decision == "invalid"
    assert not a.srm.valid and a.srm.p_value < 1e-80 and a.srm.observed_share == pytest.approx(0.4)
    assert "sample ratio mismatch" in a.reasons[0] and "40.00%" in a.reasons[0]
    assert analyse(pair(c, t), cfg, expected_share=0.4).srm.valid  # the same split at its own share


def test_coverage_compares_equal_request_counts_only() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, coverage=(500, 400))
    t = summary(TREATMENT, coverage=(500, 200))
    cov = analyse(pair(c, t), cfg, expected_share=0.5, n_items=1000).metric("coverage")
    assert cov.comparable and cov.control[0] == pytest.approx(0.4) and cov.treatment[0] == pytest.approx(0.2)
    assert cov.worse
    unequal = analyse(pair(c, replace(t, coverage_requests=100)), cfg, 0.5, n_items=1000).metric("coverage")
    assert not unequal.comparable and math.isnan(unequal.p_value) and "equal request counts" in unequal.note
    assert not analyse(pair(c, t), cfg, 0.5).metric("coverage").comparable  # no catalogue size


def test_missing_treatment_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(DataNotFoundError, match="no treatment requests"):
        analyse({CONTROL: summary(CONTROL)}, ExperimentConfig(), expected_share=0.05)


def test_equal_request_coverage_subsamples_the_larger_variant() -> None:
    slates = {CONTROL: [[i] for i in range(1000)], TREATMENT: [[1], [2], [3], [3], [4]] * 2}
    cov = equal_request_coverage(slates, seed=3)
    assert cov[TREATMENT] == (10, 4)
    assert cov[CONTROL] == (10, 10)  # ten of its thousand distinct one-item slates
    assert equal_request_coverage(slates, seed=3) == cov


def test_summarise_counts_per_variant() -> None:
    frame = pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d"],
            "ts": pd.to_datetime([0, 1, 2, 3], unit="s", utc=True),
            "variant": [CONTROL, CONTROL, TREATMENT, TREATMENT],
            "user_id": [1, 1, 2, 3],
            "latency_ms": [10.0, 30.0, 20.0, math.nan],
            "error": [False, False, False, True],
            "impressions": [2, 1, 2, 0],
            "clicks": [1, 0, 2, 0],
            "completions": [1, 0, 0, 0],
            "items": [[5, 6], [6], [7, 8], []],
        }
    )
    s = summarise(frame)
    assert (s[CONTROL].users, s[CONTROL].requests, s[CONTROL].impressions, s[CONTROL].clicks) == (1, 2, 3, 1)
    assert s[CONTROL].latency_p50_ms == pytest.approx(20.0) and s[CONTROL].distinct_items == 2
    assert (s[TREATMENT].errors, s[TREATMENT].error_rate, s[TREATMENT].ctr) == (1, 0.5, 1.0)
    assert s[TREATMENT].latency_p99_ms == pytest.approx(20.0)  # the unanswered request has no latency
    assert s[TREATMENT].coverage_requests == s[CONTROL].coverage_requests == 2


# -------------------------------------------------------------------------------------- log path

T0 = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)


def served(
    log: RequestLog,
    ts: datetime,
    user: int,
    items: list[int],
    variant: str | None,
    level: str = "full",
    latency: float = 10.0,
) -> str:
    rid = uuid.uuid4().hex
    log.record(
        ServedRecord(
            request_id=rid,
            ts=ts.timestamp(),
            user_id=user,
            variant=variant,
            model_version="v2" if variant == TREATMENT else "v1",
            level=level,
            reason=None if level == "full" else "ranker timed out",
            latency_ms=latency,
            k=len(items),
            items=[(i, 0.5, ("two_tower",)) for i in items],
        )
    )
    return rid


def store_events(data: Path, rows: list[tuple[str, int, int, str, datetime]]) -> None:
    DataStore(data).append_events(
        pd.DataFrame(
            {
                "event_id": [r[0] for r in rows],
                "user_id": [r[1] for r in rows],
                "item_id": [r[2] for r in rows],
                "event_type": [r[3] for r in rows],
                "label": [int(r[3] in ("click", "complete")) for r in rows],
                "timestamp": pd.to_datetime([r[4] for r in rows], utc=True),
            }
        )
    )


@pytest.fixture
def logged(tmp_path: Path) -> Path:
    """Control: users 1-2; treatment: users 3-4; user 5 outside the experiment."""
    data = tmp_path / "data"
    DataStore(data).upsert_items(
        pd.DataFrame(
            {
                "item_id": list(range(10, 30)),
                "title": [f"i{i}" for i in range(10, 30)],
                "categories": [["a"]] * 20,
                "published_at": [T0 - timedelta(days=30)] * 20,
                "promoted": [False] * 20,
                "flagged": [False] * 20,
            }
        )
    )
    log = RequestLog(data, RequestLogConfig(sample_rate=1.0), start=False)
    served(log, T0, 1, [10, 11, 12], CONTROL, latency=20.0)
    served(log, T0, 2, [10, 13], CONTROL, latency=40.0)
    served(log, T0, 3, [20, 21, 22], TREATMENT, latency=30.0)
    served(log, T0 + timedelta(hours=1), 4, [20], TREATMENT, level="popularity", latency=5.0)
    served(log, T0, 5, [10, 11], None)
    log.flush()
    h = timedelta(hours=1)
    store_events(
        data,
        [
            ("e1", 1, 10, "click", T0 + h),  # control click
            ("e2", 1, 11, "click", T0 + 30 * h),  # outside the 24 h window
            ("e3", 3, 20, "click", T0 + h),  # treatment click ...
            ("e4", 3, 20, "complete", T0 + 2 * h),  # ... and completion
            ("e5", 5, 10, "click", T0 + h),  # outside the experiment
            ("dup", 2, 13, "click", T0 + h),  # also in the API log: counted once
        ],
    )
    api = EventLog(DataStore(data).layout.event_log, fsync=False)
    api.append(
        [
            EventIn(event_id="dup", user_id=2, item_id=13, event_type="click", timestamp=T0 + h),
            EventIn(event_id="a1", user_id=3, item_id=21, event_type="click", timestamp=T0 + 3 * h),
            EventIn(event_id="a2", user_id=4, item_id=20, event_type="click", timestamp=T0 + 2 * h),
            EventIn(
                event_id="a3", user_id=4, item_id=99, event_type="click", timestamp=T0 + 2 * h
            ),  # not shown
        ]
    )
    api.close()
    return data


def test_load_summaries_joins_the_logs_and_both_event_sources(logged: Path) -> None:
    s = load_summaries(logged, since=T0 - timedelta(hours=1))
    assert set(s) == {CONTROL, TREATMENT}  # the request without a variant is not in the experiment
    c, t = s[CONTROL], s[TREATMENT]
    assert (c.users, c.requests, c.impressions, c.clicks, c.completions, c.errors) == (2, 2, 5, 2, 0, 0)
    assert (t.users, t.requests, t.impressions, t.clicks, t.completions, t.errors) == (2, 2, 4, 3, 1, 1)
    assert c.distinct_items == 4 and t.distinct_items == 3
    assert c.latency_p50_ms == pytest.approx(30.0) and t.latency_p99_ms == pytest.approx(29.75)
    assert c.coverage_requests == t.coverage_requests == 2


def test_load_summaries_honours_the_label_window_and_until(logged: Path) -> None:
    wide = load_summaries(logged, label_window_hours=48)
    assert wide[CONTROL].clicks == 3  # e2, 30 h after its impression, now counts
    early = load_summaries(logged, until=T0 + timedelta(minutes=30))
    assert early[TREATMENT].requests == 1 and early[TREATMENT].errors == 0


def test_the_experiment_log_keeps_credited_impressions(logged: Path) -> None:
    log = load_experiment_log(logged)
    assert isinstance(log, ExperimentLog) and log.n_items == 20
    assert set(log.impressions["variant"]) == {CONTROL, TREATMENT}
    clicked = log.impressions[log.impressions["clicked"]]
    assert sorted(zip(clicked["user_id"], clicked["item_id"], strict=True)) == [
        (1, 10), (2, 13), (3, 20), (3, 21), (4, 20)
    ]  # fmt: skip


#: The logged fixture has two requests per variant: guardrails judged from the first request.
TINY = {"guardrails": {"min_requests": 1}}


def test_analyse_experiment_runs_load_then_analyse(logged: Path) -> None:
    patient = analyse_experiment(logged, ExperimentConfig(name="ab"), expected_share=0.5)
    assert patient.decision == "continue"  # two requests a variant: no guardrail is judged yet
    assert all("not judged yet" in g.message for g in patient.guardrails if g.name != "metric_drop")
    a = analyse_experiment(logged, ExperimentConfig(name="ab", **TINY), expected_share=0.5)
    assert a.decision == "rollback"  # a quarter of treatment's requests fell back to popularity...
    assert any("error_rate_increase" in r for r in a.reasons)
    assert a.metric("coverage").comparable  # ... and the catalogue's 20 items came from the store
    assert a.metric("coverage").control_counts == (4, 20)


def test_no_request_log_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="request_log.sample_rate"):
        load_summaries(tmp_path)


def test_summaries_of_random_traffic_reproduce_the_rates() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    variant = np.where(rng.random(n) < 0.5, TREATMENT, CONTROL)
    clicks = rng.binomial(10, np.where(variant == TREATMENT, 0.12, 0.1))
    frame = pd.DataFrame(
        {
            "request_id": [str(i) for i in range(n)],
            "ts": pd.to_datetime(np.arange(n), unit="s", utc=True),
            "variant": variant,
            "user_id": rng.integers(1, 1000, n),
            "latency_ms": rng.gamma(2.0, 10.0, n),
            "error": np.zeros(n, bool),
            "impressions": np.full(n, 10),
            "clicks": clicks,
            "completions": np.zeros(n, np.int64),
            "items": [list(rng.integers(1, 500, 10)) for _ in range(n)],
        }
    )
    s = summarise(frame)
    assert s[TREATMENT].ctr == pytest.approx(0.12, abs=0.01) and s[CONTROL].ctr == pytest.approx(
        0.1, abs=0.01
    )
    a = analyse(s, ExperimentConfig(name="ab", expected_effect=0.2), expected_share=0.5, n_items=500)
    assert a.decision == "ship", a.reasons


# ---------------------------------------------------------------------------------------- report


def test_the_report_is_one_html_file_with_every_section(logged: Path, tmp_path: Path) -> None:
    from streamrec.experiments.report import write_experiment_report

    out = write_experiment_report(logged, tmp_path / "r" / "exp.html", expected_share=0.5)
    assert "Decision: continue" in out.read_text()  # the defaults wait for 50 requests a variant
    assert "no experiment is registered" in out.read_text()  # the defaults were used, and the page says so
    preregister(logged, ExperimentConfig(name="tiny", **TINY))
    out = write_experiment_report(logged, tmp_path / "r" / "exp.html", name="tiny", expected_share=0.5)
    page = out.read_text()
    for anchor in (
        "decision",
        "definition",
        "variants",
        "effects",
        "over-time",
        "latency",
        "checks",
        "guardrails",
    ):
        assert f'id="{anchor}"' in page
    assert "Decision: rollback" in page and "error_rate_increase breached" in page
    assert page.count("data:image/png;base64,") == 3  # forest plot, CTR over time, latency
    assert "<script" not in page and "by streamrec experiments report" in page
