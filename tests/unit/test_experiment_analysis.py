"""Experiment analysis: the user-clustered statistics against hand-computed values (the delta method
written out, the all-or-nothing and one-impression-per-user limits, A/A false positives), the
decisions, and the log path (a request log written by the real RequestLog, events in the store and
in the API's event log)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom, norm
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_effectsize, proportions_ztest

from streamrec.api_models import EventIn
from streamrec.data.event_log import EventLog
from streamrec.data.store import DataStore
from streamrec.errors import DataNotFoundError
from streamrec.experiments.analysis import VariantSummary, analyse, equal_request_coverage, summarise
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig, Guardrails, preregister
from streamrec.experiments.logged import (
    ExperimentLog,
    analyse_experiment,
    load_experiment_log,
    load_summaries,
)
from streamrec.monitoring.drift import rate_interval
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, ServedRecord


def users_with(
    n: int, m: int | Sequence[int], ctr: float, completion: float = 0.0, *, clustered: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user impressions, clicks and completions of ``n`` users, deterministic.

    Impressions cycle through ``m``. Clicks and completions are the binomial quantiles of each
    user's impressions (independent impressions, like a binomial draw but without the noise), or
    with ``clustered`` all-or-nothing: ``round(ctr * n)`` users click every impression they saw.
    """
    x = np.resize(np.atleast_1d(np.asarray(m, np.int64)), n)
    q = (np.arange(n) * 7919 % n + 0.5) / n  # quantiles, shuffled against the impression cycle
    if clustered:
        clicks = np.where(np.arange(n) < round(ctr * n), x, 0)
    else:
        clicks = binom.ppf(q, x, ctr).astype(np.int64)
    completions = binom.ppf(q[::-1], x, completion).astype(np.int64)
    return x, clicks, completions


def summary(
    variant: str,
    *,
    users: int = 5000,
    m: int | Sequence[int] = 20,
    ctr: float = 0.05,
    completion: float = 0.01,
    clustered: bool = False,
    per_user: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    errors: int = 0,
    requests: int | None = None,
    p99: float = 50.0,
    coverage: tuple[int, int] = (1000, 300),
) -> VariantSummary:
    """A variant's summary with the per-user sums of ``per_user`` (default: :func:`users_with`)."""
    x, y, z = per_user if per_user is not None else users_with(users, m, ctr, completion, clustered=clustered)
    return VariantSummary(
        variant=variant,
        users=len(x),
        requests=requests if requests is not None else int(x.sum()) // 10,
        impressions=int(x.sum()),
        clicks=int(y.sum()),
        completions=int(z.sum()),
        errors=errors,
        latency_p50_ms=p99 / 3,
        latency_p99_ms=p99,
        distinct_items=coverage[1],
        coverage_requests=coverage[0],
        coverage_items=coverage[1],
        impressions_sq=int(x @ x),
        clicks_sq=int(y @ y),
        completions_sq=int(z @ z),
        clicks_x_impressions=int(y @ x),
        completions_x_impressions=int(z @ x),
    )


def pair(control: VariantSummary, treatment: VariantSummary) -> dict[str, VariantSummary]:
    return {CONTROL: control, TREATMENT: treatment}


def delta_method(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Ratio of means and its variance, Deng et al.'s formula written out: (R, var(R))."""
    n = len(x)
    r = y.sum() / x.sum()
    s_xx, s_yy, s_xy = np.var(x, ddof=1), np.var(y, ddof=1), np.cov(x, y, ddof=1)[0, 1]
    return float(r), float((s_yy - 2 * r * s_xy + r**2 * s_xx) / x.mean() ** 2 / n)


Z95 = float(norm.ppf(0.975))
Z_POWER = float(norm.ppf(0.8))


# ------------------------------------------------------------------------------------ statistics


def test_a_doubled_ctr_ships_with_the_hand_computed_clustered_numbers() -> None:
    cfg = ExperimentConfig(name="ab", expected_effect=0.5)
    cu, tu = users_with(4000, [10, 20, 30], 0.05), users_with(4000, [10, 20, 30], 0.10)
    c, t = summary(CONTROL, per_user=cu), summary(TREATMENT, per_user=tu)
    a = analyse(pair(c, t), cfg, expected_share=0.5, n_items=1000)
    assert a.decision == "ship", a.reasons
    assert "ctr significantly better" in a.reasons[0]
    ctr = a.metric("ctr")
    rc, vc = delta_method(cu[0], cu[1])
    rt, vt = delta_method(tu[0], tu[1])
    assert rc == pytest.approx(0.05, abs=0.002) and rt == pytest.approx(0.10, abs=0.002)
    # the difference: diff +- z sqrt(var_c + var_t), two-sided z-test on it
    se = math.sqrt(vc + vt)
    assert ctr.diff == pytest.approx((rt - rc, rt - rc - Z95 * se, rt - rc + Z95 * se), rel=1e-9)
    assert ctr.p_value == pytest.approx(2 * norm.sf((rt - rc) / se), rel=1e-6)
    # the lift: delta method on R_t / R_c
    ratio = rt / rc
    lift_se = ratio * math.sqrt(vt / rt**2 + vc / rc**2)
    assert ctr.lift == pytest.approx(
        (ratio - 1, ratio - 1 - Z95 * lift_se, ratio - 1 + Z95 * lift_se), rel=1e-9
    )
    assert 0.6 < ctr.lift[1] < ctr.lift[0] < ctr.lift[2] < 1.5
    # each variant's own rate keeps its Wilson interval per impression
    assert ctr.control == pytest.approx(rate_interval(c.clicks, c.impressions))
    assert ctr.treatment == pytest.approx(rate_interval(t.clicks, t.impressions))
    assert ctr.control_counts == (c.clicks, c.impressions)
    # independent impressions: the clustered variance is the binomial one, give or take
    naive = rc * (1 - rc) / c.impressions + rt * (1 - rt) / t.impressions
    assert ctr.design_effect == pytest.approx((vc + vt) / naive) and 0.85 < ctr.design_effect < 1.15
    assert "users as clusters" in ctr.note and "4,000 control" in ctr.note
    assert ctr.better and not ctr.worse
    # minimum sample size in users: 2 (z + z)^2 sigma^2 / delta^2, sigma^2 = n var(R_c)
    s = a.sample_size
    sigma2, delta = 4000 * vc, 0.5 * rc
    assert s.unit == "users" and s.per_user_sd == pytest.approx(math.sqrt(sigma2))
    assert s.per_variant == pytest.approx(2 * (Z95 + Z_POWER) ** 2 * sigma2 / delta**2, rel=1e-4)
    assert s.per_variant == pytest.approx(s.control_required) == pytest.approx(s.treatment_required)
    assert s.impressions_per_user == pytest.approx(c.impressions / 4000)
    assert s.per_variant_impressions == pytest.approx(s.per_variant * c.impressions / 4000)
    assert (s.control, s.treatment) == (4000, 4000) and s.enough and a.srm.valid
    assert all(g.passed for g in a.guardrails)
    json.dumps(a.to_dict(), allow_nan=False)  # JSON-safe


def test_all_or_nothing_users_widen_the_interval_by_sqrt_m_and_stop_a_false_ship() -> None:
    n, m = 1500, 20
    c = summary(CONTROL, users=n, m=m, ctr=75 / n, clustered=True)  # 75 users click all 20 items
    t = summary(TREATMENT, users=n, m=m, ctr=95 / n, clustered=True)  # 95 users do
    a = analyse(pair(c, t), ExperimentConfig(name="ab", expected_effect=0.5), expected_share=0.5)
    ctr = a.metric("ctr")
    pc, pt = c.ctr, t.ctr
    assert (pc, pt) == (0.05, 95 / n)
    # each user is one Bernoulli trial of weight m: var(R) = p (1 - p) / (n - 1), m n / (n - 1)
    # times the binomial variance over the n m impressions
    wald = Z95 * math.sqrt(pc * (1 - pc) / (n * m) + pt * (1 - pt) / (n * m))
    half = (ctr.diff[2] - ctr.diff[1]) / 2
    assert half == pytest.approx(Z95 * math.sqrt((pc * (1 - pc) + pt * (1 - pt)) / (n - 1)), rel=1e-9)
    assert half / wald == pytest.approx(math.sqrt(m * n / (n - 1)), rel=1e-9)
    assert ctr.design_effect == pytest.approx(m * n / (n - 1), rel=1e-9)
    # the Newcombe interval the impressions-as-trials analysis reported is about sqrt(20) = 4.5x narrower
    low, high = confint_proportions_2indep(t.clicks, t.impressions, c.clicks, c.impressions, compare="diff")
    assert 4.2 < (ctr.diff[2] - ctr.diff[1]) / (high - low) < 4.8
    # impressions as trials: overwhelmingly significant; users as clusters: not at all
    assert proportions_ztest([t.clicks, c.clicks], [t.impressions, c.impressions])[1] < 1e-6
    assert ctr.p_value == pytest.approx(2 * norm.sf((pt - pc) / (half / Z95)), rel=1e-9)
    assert 0.05 < ctr.p_value < 0.2 and not ctr.significant
    # enough users for a 50% lift (each user is one trial: about 1,200 needed), and no win
    assert a.sample_size.enough and 1000 < a.sample_size.per_variant < n
    assert a.decision == "no_difference", a.reasons
    assert "no significant difference in ctr" in a.reasons[0]


def test_one_impression_per_user_is_the_binomial_comparison() -> None:
    n = 20_000
    c = summary(CONTROL, users=n, m=1, ctr=0.05, completion=0.02)
    t = summary(TREATMENT, users=n, m=1, ctr=0.0575, completion=0.02)
    a = analyse(pair(c, t), ExperimentConfig(name="ab", expected_effect=0.15), expected_share=0.5)
    ctr = a.metric("ctr")
    pc, pt = c.ctr, t.ctr
    assert c.clicks == 1000 and t.clicks == 1150
    # var(R) = p (1 - p) / (n - 1): the Wald interval up to n / (n - 1)
    wald = Z95 * math.sqrt(pc * (1 - pc) / n + pt * (1 - pt) / n)
    assert (ctr.diff[2] - ctr.diff[1]) / 2 / wald == pytest.approx(math.sqrt(n / (n - 1)), rel=1e-9)
    assert ctr.design_effect == pytest.approx(n / (n - 1), rel=1e-9)
    # ... and close to what statsmodels gives for two proportions
    low, high = confint_proportions_2indep(t.clicks, n, c.clicks, n, compare="diff")
    assert ctr.diff[1] == pytest.approx(low, rel=0.02) and ctr.diff[2] == pytest.approx(high, rel=0.02)
    pooled = proportions_ztest([t.clicks, c.clicks], [n, n])[1]
    assert ctr.p_value == pytest.approx(pooled, rel=0.05) and ctr.p_value < 0.05
    # the size in users is the classic two-proportion size in impressions at control's variance
    # p (1 - p) (times n / (n - 1)) when a user is one impression ...
    classic = 2 * (Z95 + Z_POWER) ** 2 * 0.05 * 0.95 / (0.05 * 0.15) ** 2
    assert a.sample_size.per_variant == pytest.approx(classic * n / (n - 1), rel=1e-4)
    # ... and near Cohen's h's (the arcsine spreads the variance over both rates: about 7% more)
    h = abs(float(proportion_effectsize(0.05 * 1.15, 0.05)))
    assert a.sample_size.per_variant == pytest.approx(2 * ((Z95 + Z_POWER) / h) ** 2, rel=0.1)
    assert a.sample_size.per_variant_impressions == pytest.approx(a.sample_size.per_variant)
    assert a.decision == "ship", a.reasons


def test_clustered_ab_tests_keep_false_ships_near_alpha_where_impressions_as_trials_do_not() -> None:
    """A/A experiments of users with their own CTR (beta): the clustered test is significant about
    alpha of the time; the two-proportion z-test on impressions several times as often."""
    rng = np.random.default_rng(7)
    runs, n, m = 200, 300, 20
    clustered = naive = 0
    cfg = ExperimentConfig(name="aa", expected_effect=0.5)
    for _ in range(runs):
        arms = []
        for _variant in (CONTROL, TREATMENT):
            x = rng.integers(1, 2 * m, n)
            y = rng.binomial(x, rng.beta(0.2, 3.8, n))  # mean CTR 5%, ICC 0.2
            arms.append((x, y, np.zeros(n, np.int64)))
        c, t = summary(CONTROL, per_user=arms[0]), summary(TREATMENT, per_user=arms[1])
        clustered += analyse(pair(c, t), cfg, expected_share=0.5).metric("ctr").significant
        naive += proportions_ztest([t.clicks, c.clicks], [t.impressions, c.impressions])[1] < 0.05
    assert 0.01 <= clustered / runs <= 0.10
    assert naive / runs > 0.3  # about 0.4: the design effect here is about 5


def test_fewer_than_two_users_cannot_be_compared() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, users=100)
    one = summary(TREATMENT, users=1, m=20, ctr=0.1)
    a = analyse(pair(c, one), cfg, expected_share=1 / 101)
    ctr = a.metric("ctr")
    assert not ctr.comparable and not ctr.significant and math.isnan(ctr.p_value)
    assert ctr.note == "treatment has 1 user (a variance over users needs 2)"
    assert ctr.treatment_counts == (one.clicks, 20)
    assert a.decision == "continue", a.reasons  # one user is far below the minimum
    assert any(g.name == "metric_drop" and "not measured" in g.message for g in a.guardrails)
    # a summary without per-user sums (not built by summarise) is not compared either
    bare = replace(c, impressions_sq=None, clicks_sq=None, clicks_x_impressions=None)
    b = analyse(pair(bare, summary(TREATMENT, users=100)), cfg, expected_share=0.5)
    assert not b.metric("ctr").comparable and b.metric("ctr").note == "control has no per-user counts"
    assert not b.sample_size.enough and "not enough data to size the test" in b.reasons[0]


def test_equal_rates_with_enough_users_is_no_difference() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, users=10_000)
    t = summary(TREATMENT, users=10_000)  # the very same users' counts
    a = analyse(pair(c, t), cfg, expected_share=0.5, n_items=1000)
    # 5% lift over 5% CTR with 20 independent impressions per user: about 6,000 users per variant
    assert 5000 < a.sample_size.per_variant < 7000 and a.sample_size.unit == "users"
    assert a.sample_size.per_variant_impressions == pytest.approx(20 * a.sample_size.per_variant)
    assert a.sample_size.enough
    assert a.decision == "no_difference", a.reasons
    assert a.metric("ctr").p_value == pytest.approx(1.0) and a.metric("ctr").diff[0] == 0
    assert "no significant difference in ctr" in a.reasons[0]


def test_tiny_samples_continue_and_say_how_many_users_are_needed() -> None:
    cfg = ExperimentConfig(name="ab")
    c = summary(CONTROL, users=50, m=4, ctr=0.05, completion=0.01)
    t = summary(TREATMENT, users=50, m=4, ctr=0.10, completion=0.02)
    a = analyse(pair(c, t), cfg, expected_share=0.5)
    assert a.decision == "continue", a.reasons
    assert not a.sample_size.enough and a.sample_size.treatment_required > 10_000
    reason = a.reasons[0]
    assert "minimum sample size" in reason and "control 50 of" in reason and " users" in reason
    assert "impressions at control's 4.0 per user" in reason


def test_sample_size_follows_the_allocation_of_a_canary() -> None:
    cfg = ExperimentConfig(name="canary", expected_effect=0.2)
    c = summary(CONTROL, users=9900, m=10)
    t = summary(TREATMENT, users=100, m=5)
    a = analyse(pair(c, t), cfg, expected_share=0.01)
    s = a.sample_size
    # at 99 control users per treatment user, the treatment needs about half the equal-split number:
    # n_t = (z + z)^2 sigma^2 (1 + 1/99) / delta^2
    assert s.treatment_required < s.per_variant < s.control_required
    assert s.treatment_required == pytest.approx(s.per_variant / 2 * (1 + 1 / 99), rel=1e-3)
    assert s.control_required == pytest.approx(99 * s.treatment_required)
    assert s.control_impressions_required == pytest.approx(10 * s.control_required)
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
    # 3 of 61 against 16 of 600 is +2.3%, over the limit, but noise at this size: the one-sided
    # lower bound is below +1%; 5 of 61 is a breach (its bound is +1.2%)
    few_c = summary(CONTROL, requests=600, errors=16)
    noisy = analyse(pair(few_c, summary(TREATMENT, requests=61, errors=3)), cfg, expected_share=61 / 661)
    check = next(g for g in noisy.guardrails if g.name == "error_rate_increase")
    assert check.passed and check.value > 0.02 and "with 95% confidence" in check.message
    clear = analyse(pair(few_c, summary(TREATMENT, requests=61, errors=5)), cfg, expected_share=61 / 661)
    assert not next(g for g in clear.guardrails if g.name == "error_rate_increase").passed


def test_a_significantly_worse_primary_metric_rolls_back_unless_within_metric_drop() -> None:
    c = summary(CONTROL, ctr=0.05)
    t = summary(TREATMENT, ctr=0.045)  # -10%
    a = analyse(pair(c, t), ExperimentConfig(name="ab"), expected_share=0.5)
    assert a.metric("ctr").worse and a.metric("ctr").lift[2] < 0
    assert a.decision == "rollback" and any("metric_drop" in r for r in a.reasons)
    lenient = ExperimentConfig(name="ab", guardrails=Guardrails(metric_drop=0.2), expected_effect=0.2)
    b = analyse(pair(c, t), lenient, expected_share=0.5)
    assert b.decision == "no_difference" and "significantly worse" in b.reasons[0]
    # all-or-nothing users: the same -10% is well within the noise of 5,000 users, no rollback
    cc = summary(CONTROL, ctr=0.05, clustered=True)
    tc = summary(TREATMENT, ctr=0.045, clustered=True)
    d = analyse(pair(cc, tc), ExperimentConfig(name="ab"), expected_share=0.5)
    assert not d.metric("ctr").significant and d.decision != "rollback", d.reasons


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
    # per-user sums: user 1's two requests are one user with 3 impressions, 1 click, 1 completion
    c, t = s[CONTROL], s[TREATMENT]
    assert (c.impressions_sq, c.clicks_sq, c.completions_sq) == (9, 1, 1)
    assert (c.clicks_x_impressions, c.completions_x_impressions) == (3, 3)
    assert (t.impressions_sq, t.clicks_sq, t.clicks_x_impressions, t.completions_sq) == (4, 4, 4, 0)
    assert math.isnan(c.ratio("ctr").per_user_variance)  # one user: no variance over users
    assert t.ratio("ctr").rate == 1.0 and t.ratio("ctr").users == 2


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
    # users 1 and 2: (3 impressions, 1 click), (2, 1); users 3 and 4: (3, 2 clicks, 1 completion), (1, 1)
    assert (c.impressions_sq, c.clicks_sq, c.clicks_x_impressions) == (13, 2, 5)
    assert (t.impressions_sq, t.clicks_sq, t.clicks_x_impressions, t.completions_x_impressions) == (
        10,
        5,
        7,
        3,
    )


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
TINY = {"guardrails": {"min_requests": 1, "latency_p99_ms": 25.0}}  # treatment's p99 is 29.8 ms


def test_analyse_experiment_runs_load_then_analyse(logged: Path) -> None:
    patient = analyse_experiment(logged, ExperimentConfig(name="ab"), expected_share=0.5)
    assert patient.decision == "continue"  # two requests a variant: no guardrail is judged yet
    assert all("not judged yet" in g.message for g in patient.guardrails if g.name != "metric_drop")
    a = analyse_experiment(logged, ExperimentConfig(name="ab", **TINY), expected_share=0.5)
    assert a.decision == "rollback"  # over the latency ceiling (one popularity answer in two is no verdict)...
    assert any("latency_p99_ms" in r for r in a.reasons) and not any("error_rate" in r for r in a.reasons)
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
    assert "Decision: rollback" in page and "latency_p99_ms breached" in page
    assert page.count("data:image/png;base64,") == 3  # forest plot, CTR over time, latency
    assert "<script" not in page and "by streamrec experiments report" in page
