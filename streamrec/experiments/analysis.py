"""The analysis of an experiment: treatment against control on the pre-registered metrics.

One core serves both sources of data. :func:`summarise` turns a frame of requests (who, which
variant, latency, whether the variant's model answered, the items shown and what was clicked
and completed) into one :class:`VariantSummary` per variant; :func:`analyse` compares the
summaries under the experiment's :class:`~streamrec.experiments.config.ExperimentConfig`.

* From the logs: :func:`streamrec.experiments.logged.load_experiment_log` reads the sampled request and impression log
  (:mod:`streamrec.monitoring.logs`), credits the clicks and completions of the events store and
  of the API's event log not yet exported (each event to the latest impression of its user and
  item at most ``label_window_hours`` before it,
  :func:`~streamrec.monitoring.drift.credit_events`), and ``load_summaries`` summarises it.
* From the HTTP user simulator (:mod:`streamrec.experiments.simulate`): it builds the same
  request frame from what it sent and what its simulated users did.

Users are the unit of randomisation, so CTR and completion rate are compared with users as
clusters (the statistics: :mod:`streamrec.experiments.stats`); each variant's own rate keeps its
Wilson interval (descriptive, per impression).

Coverage (distinct items shown over the catalogue) grows with the number of requests, so a 1%
canary would always look worse: it is computed on equal request counts, the larger variant's
requests subsampled (seeded) to the smaller one's count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from streamrec.errors import DataNotFoundError
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig
from streamrec.experiments.stats import (
    NAN3,
    RatioEstimate,
    difference_lower_bound,
    proportion_difference,
    ratio_difference,
    ratio_estimate,
    srm_test,
    users_required,
)
from streamrec.jsonsafe import json_safe
from streamrec.monitoring.drift import rate_interval

#: Levels at which the variant's own model answered; any other level counts as an error.
ANSWERED_LEVELS: frozenset[str] = frozenset({"full", "stale_features", "simple_ranking"})
#: Decisions of :func:`analyse`, in order of precedence.
DECISIONS: tuple[str, ...] = ("invalid", "rollback", "continue", "ship", "no_difference")
#: Default label window: a click or completion counts for an impression this long after it.
LABEL_WINDOW_HOURS = 24.0
#: Columns of the request frame :func:`summarise` takes.
REQUEST_FRAME_COLUMNS: tuple[str, ...] = (
    "request_id",
    "ts",
    "variant",
    "user_id",
    "latency_ms",
    "error",
    "impressions",
    "clicks",
    "completions",
    "items",
)
#: Variant label of requests served outside any experiment (simulator tallies).
NO_VARIANT = "none"


@dataclass(frozen=True)
class VariantSummary:
    """What one variant served and what its users did.

    Attributes:
        variant: ``control``, ``treatment`` (or ``none`` outside an experiment).
        users: Distinct users.
        requests: Requests.
        impressions: Items shown.
        clicks: Impressions clicked.
        completions: Impressions completed.
        errors: Requests the variant's model did not answer (a level outside
            :data:`ANSWERED_LEVELS`, or no answer at all).
        latency_p50_ms: Median latency of the answered requests (NaN when none).
        latency_p99_ms: 99th percentile latency (NaN when none).
        distinct_items: Distinct items shown over all requests.
        coverage_requests: Requests of the equal-size subsample coverage is computed on.
        coverage_items: Distinct items shown in that subsample.
        impressions_sq: Sum over users of (the user's impressions)^2.
        clicks_sq: Sum over users of (the user's clicks)^2.
        completions_sq: Sum over users of (the user's completions)^2.
        clicks_x_impressions: Sum over users of the user's clicks times impressions.
        completions_x_impressions: Sum over users of the user's completions times impressions.

    With ``users`` and the totals (the sums of the per-user counts) the last five are the
    sufficient statistics of the user-clustered comparison (:meth:`ratio`). None when unknown
    (a summary not built by :func:`summarise`): the rates then cannot be compared.
    """

    variant: str
    users: int
    requests: int
    impressions: int
    clicks: int
    completions: int
    errors: int
    latency_p50_ms: float
    latency_p99_ms: float
    distinct_items: int
    coverage_requests: int = 0
    coverage_items: int = 0
    impressions_sq: int | None = None
    clicks_sq: int | None = None
    completions_sq: int | None = None
    clicks_x_impressions: int | None = None
    completions_x_impressions: int | None = None

    @property
    def ctr(self) -> float:
        """Clicks per impression (NaN without impressions)."""
        return self.clicks / self.impressions if self.impressions else math.nan

    @property
    def completion_rate(self) -> float:
        """Completions per impression (NaN without impressions)."""
        return self.completions / self.impressions if self.impressions else math.nan

    @property
    def error_rate(self) -> float:
        """Errors per request (NaN without requests)."""
        return self.errors / self.requests if self.requests else math.nan

    def ratio(self, metric: str) -> RatioEstimate:
        """``ctr`` or ``completion_rate`` as a ratio of per-user means, with its variance over users.

        Raises:
            ValueError: ``metric`` is not a per-impression rate.
        """
        if metric == "ctr":
            succ, succ_sq, cross = self.clicks, self.clicks_sq, self.clicks_x_impressions
        elif metric == "completion_rate":
            succ, succ_sq, cross = self.completions, self.completions_sq, self.completions_x_impressions
        else:
            raise ValueError(f"{metric!r} is not a per-impression rate (ctr, completion_rate)")
        return ratio_estimate(self.users, self.impressions, succ, self.impressions_sq, succ_sq, cross)

    def to_dict(self) -> dict[str, Any]:
        """The counts and rates, JSON-safe (NaN as None)."""
        out = asdict(self)
        out.update(ctr=self.ctr, completion_rate=self.completion_rate, error_rate=self.error_rate)
        return json_safe(out)


@dataclass(frozen=True)
class MetricComparison:
    """One pre-registered metric, treatment against control.

    CTR and completion rate are compared with users as clusters (:class:`RatioEstimate`): the
    difference's interval is ``diff +- z sqrt(var_c + var_t)``, the p-value the two-sided z-test
    of that difference, the lift's interval the delta method's on ``R_t / R_c``. Coverage uses
    the two-proportion statistics (Newcombe, log-adjusted ratio, pooled z-test).

    Attributes:
        metric: ``ctr``, ``completion_rate`` or ``coverage``.
        control: Control's ``(rate, low, high)`` (Wilson interval at ``1 - alpha``, per impression:
            descriptive; the comparison below is the clustered one).
        treatment: Treatment's ``(rate, low, high)``.
        control_counts: Control's ``(successes, trials)``.
        treatment_counts: Treatment's ``(successes, trials)``.
        diff: Absolute difference treatment - control and its interval ``(diff, low, high)``.
        lift: Relative lift treatment / control - 1 and its interval ``(lift, low, high)``.
        p_value: Two-sided z-test of the difference (NaN when it cannot be computed).
        significant: ``p_value < alpha``.
        comparable: Whether the two rates may be compared (rates: at least 2 users and an
            impression in each variant; coverage: equal request counts).
        note: What the numbers are counted on, or why they cannot be compared.
        design_effect: Variance of the clustered difference over the variance impressions as
            independent trials would give it (rates only; NaN otherwise).
    """

    metric: str
    control: tuple[float, float, float]
    treatment: tuple[float, float, float]
    control_counts: tuple[int, int]
    treatment_counts: tuple[int, int]
    diff: tuple[float, float, float]
    lift: tuple[float, float, float]
    p_value: float
    significant: bool
    comparable: bool = True
    note: str = ""
    design_effect: float = math.nan

    @property
    def better(self) -> bool:
        """Treatment significantly above control."""
        return self.comparable and self.significant and self.diff[0] > 0

    @property
    def worse(self) -> bool:
        """Treatment significantly below control."""
        return self.comparable and self.significant and self.diff[0] < 0


@dataclass(frozen=True)
class SrmCheck:
    """Sample ratio mismatch: whether the split of users is what the assignment gives.

    Attributes:
        unit: What was counted (``users``: the unit of assignment).
        control: Control's count.
        treatment: Treatment's count.
        expected_share: Treatment share the assignment was set to.
        observed_share: Treatment share observed.
        chi2: Chi-square statistic (NaN when it cannot be computed).
        p_value: Its p-value.
        valid: ``p_value >= srm_alpha``.
    """

    unit: str
    control: int
    treatment: int
    expected_share: float
    observed_share: float
    chi2: float
    p_value: float
    valid: bool


@dataclass(frozen=True)
class SampleSize:
    """Minimum sample size of the primary metric.

    For CTR and completion rate it is in users (the unit of randomisation; the formula:
    :func:`~streamrec.experiments.stats.users_required`). The implied impressions are these
    times control's impressions per user.

    Attributes:
        metric: The primary metric.
        unit: What is counted (``users``; ``requests`` for coverage).
        baseline: Control's observed rate the effect is relative to (NaN when unknown).
        expected_effect: Relative lift the test is sized for.
        per_variant: Minimum per variant with equal allocation (the classic number).
        control_required: Minimum for control at the observed allocation.
        treatment_required: Minimum for treatment at the observed allocation.
        control: Control's count so far.
        treatment: Treatment's count so far.
        enough: Both variants reached their minimum.
        per_user_sd: Control's per-user standard deviation ``sigma`` the size rests on (NaN for
            coverage or when unknown).
        impressions_per_user: Control's impressions per user (NaN for coverage).
        per_variant_impressions: ``per_variant`` in impressions.
        control_impressions_required: ``control_required`` in impressions.
        treatment_impressions_required: ``treatment_required`` in impressions.
    """

    metric: str
    unit: str
    baseline: float
    expected_effect: float
    per_variant: float
    control_required: float
    treatment_required: float
    control: int
    treatment: int
    enough: bool
    per_user_sd: float = math.nan
    impressions_per_user: float = math.nan
    per_variant_impressions: float = math.nan
    control_impressions_required: float = math.nan
    treatment_impressions_required: float = math.nan


@dataclass(frozen=True)
class GuardrailCheck:
    """One guardrail.

    Attributes:
        name: ``latency_p99_ratio``, ``latency_p99_ms``, ``error_rate_increase`` or ``metric_drop``.
        value: What was measured.
        limit: The limit it is held to.
        passed: Within the limit (also when it could not be measured: ``note`` says so).
        message: The check in words, with its numbers.
    """

    name: str
    value: float
    limit: float
    passed: bool
    message: str


@dataclass(frozen=True)
class ExperimentAnalysis:
    """The comparison of an experiment's variants and the decision it leads to.

    Attributes:
        experiment: The experiment's name.
        config: The pre-registered definition (as JSON).
        expected_share: Treatment share the SRM check expects.
        variants: Summary per variant.
        metrics: The pre-registered metrics, compared.
        srm: The sample-ratio-mismatch check.
        sample_size: The minimum sample size and where the variants stand.
        guardrails: The guardrail checks.
        decision: One of :data:`DECISIONS`.
        reasons: Why, in words, naming every failed check and its numbers.
    """

    experiment: str
    config: dict[str, Any]
    expected_share: float
    variants: dict[str, VariantSummary]
    metrics: list[MetricComparison]
    srm: SrmCheck
    sample_size: SampleSize
    guardrails: list[GuardrailCheck]
    decision: str
    reasons: list[str] = field(default_factory=list)

    def metric(self, name: str) -> MetricComparison:
        """The comparison of metric ``name``.

        Raises:
            KeyError: the metric is not in the pre-registered suite.
        """
        for m in self.metrics:
            if m.metric == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-safe values (NaN and infinities as None)."""
        return json_safe(
            {
                "experiment": self.experiment,
                "decision": self.decision,
                "reasons": list(self.reasons),
                "expected_share": self.expected_share,
                "variants": {k: v.to_dict() for k, v in self.variants.items()},
                "metrics": [{**asdict(m), "better": m.better, "worse": m.worse} for m in self.metrics],
                "srm": asdict(self.srm),
                "sample_size": asdict(self.sample_size),
                "guardrails": [asdict(g) for g in self.guardrails],
                "config": self.config,
            }
        )


# ------------------------------------------------------------------------------------ summaries
def summarise(requests: pd.DataFrame, *, seed: int = 0) -> dict[str, VariantSummary]:
    """One :class:`VariantSummary` per variant of a request frame.

    Args:
        requests: One row per request, columns :data:`REQUEST_FRAME_COLUMNS`: ``variant`` (str),
            ``user_id``, ``latency_ms`` (NaN when unanswered), ``error`` (bool), ``impressions``,
            ``clicks`` and ``completions`` (counts of the request's items) and ``items`` (the
            item ids shown).
        seed: Seed of the subsample coverage is computed on.

    Returns:
        Summaries by variant, sorted by name, with the per-user sums of squares and
        cross-products the clustered comparison needs.
    """
    out: dict[str, VariantSummary] = {}
    groups = {str(v): g for v, g in requests.groupby("variant", sort=True)}
    coverage = equal_request_coverage({v: list(g["items"]) for v, g in groups.items()}, seed=seed)
    for variant, g in groups.items():
        lat = g["latency_ms"].to_numpy(np.float64)
        lat = lat[np.isfinite(lat)]
        items: set[int] = set()
        for shown in g["items"]:
            items.update(int(i) for i in shown)
        cov_requests, cov_items = coverage.get(variant, (0, 0))
        per_user = g.groupby("user_id", sort=False)[["impressions", "clicks", "completions"]].sum()
        x, y_click, y_comp = (
            per_user[c].to_numpy(np.int64) for c in ("impressions", "clicks", "completions")
        )
        out[variant] = VariantSummary(
            variant=variant,
            users=int(g["user_id"].nunique()),
            requests=len(g),
            impressions=int(g["impressions"].sum()),
            clicks=int(g["clicks"].sum()),
            completions=int(g["completions"].sum()),
            errors=int(g["error"].astype(bool).sum()),
            latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else math.nan,
            latency_p99_ms=float(np.percentile(lat, 99)) if lat.size else math.nan,
            distinct_items=len(items),
            coverage_requests=cov_requests,
            coverage_items=cov_items,
            impressions_sq=int(x @ x),
            clicks_sq=int(y_click @ y_click),
            completions_sq=int(y_comp @ y_comp),
            clicks_x_impressions=int(y_click @ x),
            completions_x_impressions=int(y_comp @ x),
        )
    return out


def equal_request_coverage(
    slates: Mapping[str, Sequence[Sequence[int]]], *, seed: int = 0
) -> dict[str, tuple[int, int]]:
    """Distinct items shown per variant on equal request counts.

    Every variant's slates are subsampled (without replacement, seeded) to the smallest
    variant's request count, so that a variant with more traffic does not cover more of the
    catalogue only because it served more.

    Returns:
        ``(requests in the subsample, distinct items in it)`` per variant.
    """
    if not slates:
        return {}
    n = min(len(s) for s in slates.values())
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[int, int]] = {}
    for variant in sorted(slates):
        rows = list(slates[variant])
        pick = rng.choice(len(rows), size=n, replace=False) if len(rows) > n else np.arange(len(rows))
        items: set[int] = set()
        for i in pick:
            items.update(int(x) for x in rows[int(i)])
        out[variant] = (n, len(items))
    return out


# ------------------------------------------------------------------------------------- analysis
def analyse(
    summaries: Mapping[str, VariantSummary],
    config: ExperimentConfig,
    expected_share: float,
    n_items: int | None = None,
) -> ExperimentAnalysis:
    """Compare treatment with control and decide.

    Decision, the first that applies:

    * ``invalid``: the split of users between the variants does not match ``expected_share``
      (SRM p-value below ``config.srm_alpha``): the assignment or the logging is broken and no
      comparison can be trusted.
    * ``rollback``: a guardrail is breached (latency p99 above control's times
      ``latency_p99_ratio`` or above ``latency_p99_ms``; error rate more than
      ``error_rate_increase`` above control's; the primary metric significantly worse than
      ``-metric_drop`` relative to control).
    * ``continue``: fewer users than the minimum sample size for ``config.expected_effect``
      (requests for coverage).
    * ``ship``: the primary metric is significantly better (two-sided z-test at ``alpha``; for
      CTR and completion rate with users as clusters, see :class:`MetricComparison`).
    * ``no_difference``: enough samples and no significant improvement.

    Args:
        summaries: Summaries by variant; ``control`` and ``treatment`` are compared.
        config: The pre-registered experiment.
        expected_share: Treatment share the assignment was set to (for the SRM check).
        n_items: Catalogue size (coverage is reported only when given).

    Returns:
        The analysis.

    Raises:
        DataNotFoundError: ``control`` or ``treatment`` has no requests.
    """
    missing = [v for v in (CONTROL, TREATMENT) if v not in summaries or summaries[v].requests == 0]
    if missing:
        raise DataNotFoundError(
            f"no {' or '.join(missing)} requests to compare (variants seen: {sorted(summaries) or 'none'}): "
            "an experiment needs a challenger in the registry and a treatment share above 0; send traffic "
            "(or widen --since) and analyse again"
        )
    control, treatment = summaries[CONTROL], summaries[TREATMENT]
    metrics = [_compare(name, control, treatment, config.alpha, n_items) for name in config.metrics]
    by_name = {m.metric: m for m in metrics}
    primary = by_name[config.primary_metric]
    srm = _srm(control, treatment, expected_share, config.srm_alpha)
    size = _sample_size(config, control, treatment)
    guards = _guardrails(config, control, treatment, primary)

    reasons: list[str] = []
    if not srm.valid:
        decision = "invalid"
        reasons.append(
            f"sample ratio mismatch: treatment has {srm.observed_share:.2%} of {srm.unit} "
            f"({srm.treatment:,} of {srm.control + srm.treatment:,}), expected {srm.expected_share:.2%} "
            f"(chi-square p = {srm.p_value:.2g} < {config.srm_alpha:g}): check the assignment and the "
            "logging before reading any metric"
        )
    elif any(not g.passed for g in guards):
        decision = "rollback"
        reasons += [f"guardrail {g.name} breached: {g.message}" for g in guards if not g.passed]
    elif not size.enough:
        decision = "continue"
        reasons.append(_size_reason(size))
    elif primary.better:
        decision = "ship"
        reasons.append(f"{primary.metric} significantly better: {_effect_words(primary)}")
    else:
        decision = "no_difference"
        if primary.worse:
            reasons.append(
                f"{primary.metric} significantly worse but within the metric_drop guardrail "
                f"({config.guardrails.metric_drop:.1%}): {_effect_words(primary)}"
            )
        elif not primary.comparable:
            reasons.append(f"{primary.metric} cannot be compared: {primary.note}")
        else:
            reasons.append(f"no significant difference in {primary.metric}: {_effect_words(primary)}")
    return ExperimentAnalysis(
        experiment=config.name,
        config=config.model_dump(mode="json"),
        expected_share=expected_share,
        variants=dict(summaries),
        metrics=metrics,
        srm=srm,
        sample_size=size,
        guardrails=guards,
        decision=decision,
        reasons=reasons,
    )


def _compare(
    metric: str, control: VariantSummary, treatment: VariantSummary, alpha: float, n_items: int | None
) -> MetricComparison:
    if metric == "coverage":
        return _compare_coverage(control, treatment, alpha, n_items)
    return _compare_rates(metric, control, treatment, alpha)


def _compare_rates(
    metric: str, control: VariantSummary, treatment: VariantSummary, alpha: float
) -> MetricComparison:
    """CTR or completion rate with users as clusters (see :class:`MetricComparison`)."""
    c, t = control.ratio(metric), treatment.ratio(metric)
    why: list[str] = []
    for v, r in ((control, c), (treatment, t)):
        if r.users < 2:
            why.append(
                f"{v.variant} has {r.users} user{'' if r.users == 1 else 's'} (a variance over users needs 2)"
            )
        elif r.trials == 0:
            why.append(f"{v.variant} has no impressions")
        elif not math.isfinite(r.per_user_variance):
            why.append(f"{v.variant} has no per-user counts")
    counts = (c.successes, c.trials), (t.successes, t.trials)
    if why:
        return MetricComparison(
            metric, NAN3, NAN3, *counts, NAN3, NAN3, math.nan, False, comparable=False, note="; ".join(why)
        )
    d = ratio_difference(c, t, alpha)
    p, deff = d.p_value, d.design_effect
    confidence = 1 - alpha
    return MetricComparison(
        metric=metric,
        control=rate_interval(c.successes, c.trials, confidence),
        treatment=rate_interval(t.successes, t.trials, confidence),
        control_counts=counts[0],
        treatment_counts=counts[1],
        diff=d.diff,
        lift=d.lift,
        p_value=p,
        significant=math.isfinite(p) and p < alpha,
        comparable=True,
        note=(
            f"per impression, users as clusters (delta method over {c.users:,} control and {t.users:,} "
            f"treatment users; design effect {deff:.2f})"
            if math.isfinite(deff)
            else f"per impression, users as clusters ({c.users:,} control and {t.users:,} treatment users)"
        ),
        design_effect=deff,
    )


def _compare_coverage(
    control: VariantSummary, treatment: VariantSummary, alpha: float, n_items: int | None
) -> MetricComparison:
    """Distinct items over the catalogue: two proportions of the catalogue (Newcombe, z-test)."""
    n = n_items or 0
    c_succ, c_n = control.coverage_items, n
    t_succ, t_n = treatment.coverage_items, n
    comparable = True
    note = (
        f"distinct items over the catalogue ({n_items} items) on {control.coverage_requests:,} "
        "requests of each variant (the larger variant subsampled)"
    )
    if not n_items:
        comparable, note = False, "catalogue size unknown"
    elif control.coverage_requests != treatment.coverage_requests or control.coverage_requests == 0:
        comparable, note = False, "not computed on equal request counts"
    confidence = 1 - alpha
    d = proportion_difference(c_succ, c_n, t_succ, t_n, alpha)
    p = d.p_value
    return MetricComparison(
        metric="coverage",
        control=rate_interval(c_succ, c_n, confidence) if comparable else NAN3,
        treatment=rate_interval(t_succ, t_n, confidence) if comparable else NAN3,
        control_counts=(c_succ, c_n),
        treatment_counts=(t_succ, t_n),
        diff=d.diff if comparable else NAN3,
        lift=d.lift if comparable else NAN3,
        p_value=p if comparable else math.nan,
        significant=comparable and math.isfinite(p) and p < alpha,
        comparable=comparable,
        note=note,
    )


def _srm(control: VariantSummary, treatment: VariantSummary, expected: float, srm_alpha: float) -> SrmCheck:
    c, t = control.users, treatment.users
    total = c + t
    observed = t / total if total else math.nan
    chi2, p = srm_test(c, t, expected)  # with all users in one variant, any in the other is a mismatch
    return SrmCheck("users", c, t, expected, observed, chi2, p, p >= srm_alpha)


def _sample_size(config: ExperimentConfig, control: VariantSummary, treatment: VariantSummary) -> SampleSize:
    """The minimum sample size of the primary metric (the formula: :class:`SampleSize`)."""
    metric = config.primary_metric
    if metric == "coverage":  # a catalogue share: judged once each variant served min_requests_per_step
        need = float(config.min_requests_per_step)
        c, t = control.coverage_requests, treatment.coverage_requests
        return SampleSize(
            metric, "requests", math.nan, config.expected_effect, need, need, need, c, t, min(c, t) >= need
        )
    est = control.ratio(metric)
    c, t = control.users, treatment.users
    baseline, sd = est.rate, math.sqrt(est.per_user_variance)
    per_user = control.impressions / c if c else math.nan
    per_variant, c_req, t_req = users_required(
        baseline, sd, config.expected_effect, alpha=config.alpha, power=config.power, control=c, treatment=t
    )
    enough = math.isfinite(t_req) and t >= t_req and c >= c_req
    return SampleSize(
        metric,
        "users",
        baseline,
        config.expected_effect,
        per_variant,
        c_req,
        t_req,
        c,
        t,
        enough,
        per_user_sd=sd,
        impressions_per_user=per_user,
        per_variant_impressions=per_variant * per_user,
        control_impressions_required=c_req * per_user,
        treatment_impressions_required=t_req * per_user,
    )


def _guardrails(
    config: ExperimentConfig, control: VariantSummary, treatment: VariantSummary, primary: MetricComparison
) -> list[GuardrailCheck]:
    g = config.guardrails
    out: list[GuardrailCheck] = []
    fewest = min(control.requests, treatment.requests)
    if fewest < g.min_requests:  # too few requests for a p99 or a rate: not judged yet
        wait = f"not judged yet: {fewest:,} of the {g.min_requests:,} requests per variant it needs"
        for name, limit in (
            ("latency_p99_ratio", g.latency_p99_ratio),
            ("latency_p99_ms", g.latency_p99_ms),
            ("error_rate_increase", g.error_rate_increase),
        ):
            out.append(GuardrailCheck(name, math.nan, limit, True, wait))
        out.append(_metric_drop(g.metric_drop, primary))
        return out
    c99, t99 = control.latency_p99_ms, treatment.latency_p99_ms
    if math.isfinite(c99) and math.isfinite(t99) and c99 > 0:
        ratio = t99 / c99
        out.append(
            GuardrailCheck(
                "latency_p99_ratio",
                ratio,
                g.latency_p99_ratio,
                ratio <= g.latency_p99_ratio,
                f"treatment latency p99 {t99:.1f} ms is {ratio:.2f}x control's {c99:.1f} ms "
                f"(limit {g.latency_p99_ratio:g}x)",
            )
        )
    else:
        out.append(
            GuardrailCheck(
                "latency_p99_ratio", math.nan, g.latency_p99_ratio, True, "not measured: no answered request"
            )
        )
    out.append(
        GuardrailCheck(
            "latency_p99_ms",
            t99,
            g.latency_p99_ms,
            not math.isfinite(t99) or t99 <= g.latency_p99_ms,
            f"treatment latency p99 {t99:.1f} ms (limit {g.latency_p99_ms:g} ms)"
            if math.isfinite(t99)
            else "not measured: no answered treatment request",
        )
    )
    increase = treatment.error_rate - control.error_rate
    # Breached only when the increase is above the limit with confidence 1 - alpha (the one-sided
    # lower bound of Newcombe's interval): 5 failed of 61 against 3% is noise, not a verdict.
    low = difference_lower_bound(
        control.errors, control.requests, treatment.errors, treatment.requests, config.alpha
    )
    out.append(
        GuardrailCheck(
            "error_rate_increase",
            increase,
            g.error_rate_increase,
            not low > g.error_rate_increase,
            f"treatment error rate {treatment.error_rate:.2%} ({treatment.errors:,} of {treatment.requests:,} "
            f"requests) vs control {control.error_rate:.2%}: {increase:+.2%}, at least {low:+.2%} with "
            f"{1 - config.alpha:.0%} confidence (limit +{g.error_rate_increase:.2%})",
        )
    )
    out.append(_metric_drop(g.metric_drop, primary))
    return out


def _metric_drop(limit: float, primary: MetricComparison) -> GuardrailCheck:
    """The primary metric significantly worse than ``-limit`` (relative) is a breach."""
    lift_high = primary.lift[2]
    measured = primary.comparable and math.isfinite(lift_high)
    breached = measured and primary.worse and lift_high < -limit
    return GuardrailCheck(
        "metric_drop",
        primary.lift[0],
        limit,
        not breached,
        f"{primary.metric} {_effect_words(primary)}; the whole interval must not lie below {-limit:+.1%}"
        if measured
        else f"{primary.metric} not measured: {primary.note or 'no baseline'}",
    )


def _effect_words(m: MetricComparison) -> str:
    lift = m.lift
    words = (
        f"control {m.control[0]:.4f}, treatment {m.treatment[0]:.4f}, difference {m.diff[0]:+.4f} "
        f"[{m.diff[1]:+.4f}, {m.diff[2]:+.4f}]"
    )
    if math.isfinite(lift[0]):
        words += f", lift {lift[0]:+.1%} [{lift[1]:+.1%}, {lift[2]:+.1%}]"
    return words + (f", p = {m.p_value:.3g}" if math.isfinite(m.p_value) else ", p not computable")


def _size_reason(s: SampleSize) -> str:
    if not math.isfinite(s.treatment_required):
        sd = f", per-user sd {s.per_user_sd:.4g}" if s.unit == "users" else ""
        return (
            f"not enough data to size the test: control's {s.metric} is {s.baseline:.4g}{sd} "
            f"({s.control:,} {s.unit}); keep the experiment running"
        )
    implied = ""
    if math.isfinite(s.impressions_per_user):
        implied = (
            f" (about {math.ceil(s.control_impressions_required):,} and "
            f"{math.ceil(s.treatment_impressions_required):,} impressions at control's "
            f"{s.impressions_per_user:.1f} per user)"
        )
    return (
        f"below the minimum sample size for a {s.expected_effect:.0%} lift in {s.metric} over "
        f"{s.baseline:.4f}: control {s.control:,} of {math.ceil(s.control_required):,} {s.unit}, "
        f"treatment {s.treatment:,} of {math.ceil(s.treatment_required):,}{implied}; keep the experiment running"
    )
