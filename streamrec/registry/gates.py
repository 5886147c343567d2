"""Promotion gates: schema compatibility, metric comparison, and the decision they add up to.

Pure functions and value objects, usable without MLflow (:meth:`ModelRegistry.promote` runs them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from streamrec.errors import PromotionRefusedError
from streamrec.registry.manifest import BundleManifest

#: Metric base names (before any ``@k``) where lower is better; all others: higher is better.
LOWER_IS_BETTER = frozenset({"loss", "logloss", "log_loss", "bce", "mse", "rmse", "mae", "latency_ms"})


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def schema_compatible(candidate: BundleManifest, champion: BundleManifest) -> tuple[bool, str]:
    """Whether ``candidate`` can replace ``champion`` without changing what serving provides.

    The rule: equal ``feature_schema_version`` with the same set of feature names is
    compatible; a different version is compatible only when the MAJOR part (before the first
    dot) is the same and every candidate feature is one the champion already consumes (so the
    online feature store, which serves the champion, serves the candidate too). Anything else
    needs the feature pipeline rolled out first and an explicit ``allow_schema_change``.

    Returns:
        ``(compatible, explanation)``.
    """
    cv, pv = candidate.feature_schema_version, champion.feature_schema_version
    cand, champ = set(candidate.feature_names), set(champion.feature_names)
    missing = sorted(cand - champ)
    if cv == pv:
        if cand == champ:
            return True, f"same feature schema version {cv}"
        return False, (
            f"same feature schema version {cv} but different features (new: {missing[:10]}, "
            f"dropped: {sorted(champ - cand)[:10]}): bump feature_schema_version when features change"
        )
    if _major(cv) != _major(pv):
        return False, f"feature schema {cv} is a major change from champion's {pv}"
    if missing:
        return False, (
            f"feature schema {cv} needs features the champion's {pv} does not serve: {missing[:10]}"
        )
    return True, f"feature schema {cv} only uses features of champion's {pv} (same major version)"


def _higher_is_better(metric: str) -> bool:
    base = metric.split("@", 1)[0].lower()
    return base not in LOWER_IS_BETTER and not base.endswith("loss")


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


@dataclass(frozen=True)
class MetricComparison:
    """One metric of the candidate against the champion in gate 3.

    Attributes:
        metric: Metric name, e.g. ``ndcg@10``.
        candidate: Candidate value.
        champion: Champion value.
        relative_change: ``(candidate - champion) / |champion|`` (0 when both are 0).
        higher_is_better: Direction of the metric.
        passed: Within tolerance.
    """

    metric: str
    candidate: float
    champion: float
    relative_change: float
    higher_is_better: bool
    passed: bool

    def describe(self, tolerance: float) -> str:
        """E.g. ``ndcg@10 0.1012 < champion 0.1100 - 1% tolerance (-8.0%)``."""
        if self.higher_is_better:
            op, sign = ("<", "-") if not self.passed else (">=", "-")
        else:
            op, sign = (">", "+") if not self.passed else ("<=", "+")
        return (
            f"{self.metric} {self.candidate:.4f} {op} champion {self.champion:.4f} {sign} "
            f"{_pct(tolerance)} tolerance ({self.relative_change:+.1%})"
        )


def compare_metrics(
    candidate: Mapping[str, float], champion: Mapping[str, float], tolerance: float
) -> list[MetricComparison]:
    """Compare every metric the two share; a metric fails if it regresses by more than ``tolerance``.

    Args:
        candidate: Candidate metrics.
        champion: Champion metrics.
        tolerance: Allowed relative regression, e.g. ``0.01`` for 1%.

    Returns:
        One comparison per shared metric, sorted by name.
    """
    out = []
    for name in sorted(set(candidate) & set(champion)):
        c, p = float(candidate[name]), float(champion[name])
        hib = _higher_is_better(name)
        rel = (c - p) / abs(p) if p != 0 else (0.0 if c == p else math.copysign(math.inf, c - p))
        ok = c >= p - tolerance * abs(p) if hib else c <= p + tolerance * abs(p)
        out.append(MetricComparison(name, c, p, rel, hib, ok))
    return out


@dataclass(frozen=True)
class GateResult:
    """Outcome of one promotion gate.

    Attributes:
        gate: 1, 2 or 3.
        name: ``bundle``, ``feature_schema`` or ``no_regression``.
        passed: True, False, or None when skipped because an earlier gate failed.
        detail: What was checked and, on failure, by how much it missed.
    """

    gate: int
    name: str
    passed: bool | None
    detail: str


@dataclass(frozen=True)
class PromotionDecision:
    """What :meth:`ModelRegistry.promote` decided.

    Attributes:
        accepted: Whether the alias now points at ``version``.
        version: The candidate version.
        alias: The alias it was promoted to.
        previous_version: The version the alias pointed at before (None if unset).
        champion_version: The champion the candidate was compared with (None if none).
        gates: The three gates in order.
        comparisons: Gate-3 metric comparisons (empty if gate 3 did not compare).
        message: One-line summary; the refusal message names the failed gate and the gap.
    """

    accepted: bool
    version: int
    alias: str
    previous_version: int | None
    champion_version: int | None
    gates: tuple[GateResult, ...]
    comparisons: tuple[MetricComparison, ...]
    message: str

    @property
    def failed_gate(self) -> GateResult | None:
        """The first gate that failed, if any."""
        return next((g for g in self.gates if g.passed is False), None)


class PromotionGateError(PromotionRefusedError):
    """A promotion gate refused the candidate; :attr:`decision` holds the details."""

    def __init__(self, decision: PromotionDecision) -> None:
        super().__init__(decision.message)
        self.decision = decision


def schema_gate(
    candidate: BundleManifest | None, champion: BundleManifest | None, *, allow_schema_change: bool
) -> GateResult:
    """Gate 2, *feature_schema*: :func:`schema_compatible`, unless ``allow_schema_change``.

    Skipped without a candidate manifest (gate 1 failed); passes with no champion.
    """
    if candidate is None:
        return GateResult(2, "feature_schema", None, "skipped")
    if champion is None:
        return GateResult(2, "feature_schema", True, "no champion to compare with")
    ok, why = schema_compatible(candidate, champion)
    if not ok and allow_schema_change:
        ok, why = True, f"{why} (allowed by allow_schema_change)"
    elif not ok:
        why += "; roll out the feature pipeline first, then promote with allow_schema_change=True"
    return GateResult(2, "feature_schema", ok, why)


def no_regression_gate(
    candidate: BundleManifest | None,
    champion: BundleManifest | None,
    *,
    earlier_passed: bool,
    tolerance: float,
    primary_metric: str,
    online: str | None = None,
) -> tuple[GateResult, list[MetricComparison]]:
    """Gate 3, *no_regression*: no shared metric regresses by more than ``tolerance``.

    Both sides must share the evaluation set and have the primary metric. Skipped unless the
    earlier gates passed; passes with no champion. With ``online`` (the verdict of an online
    experiment the candidate won, ADR-012) the offline comparison is made and reported but does
    not refuse: the experiment measured what the offline metrics estimate.

    Returns:
        The result and the metric comparisons, primary metric first (empty if none were made).
    """
    if not earlier_passed or candidate is None:
        return GateResult(3, "no_regression", None, "skipped"), []
    if champion is None:
        return GateResult(3, "no_regression", True, "first champion: nothing to compare with"), []

    def refuse(detail: str, comparisons: list[MetricComparison]) -> tuple[GateResult, list[MetricComparison]]:
        if online is None:
            return GateResult(3, "no_regression", False, detail), comparisons
        return GateResult(
            3, "no_regression", True, f"decided online ({online}); offline, reported only: {detail}"
        ), comparisons

    if candidate.eval_set_id != champion.eval_set_id:
        return refuse(
            f"candidate was evaluated on eval set {candidate.eval_set_id} but the champion on "
            f"{champion.eval_set_id}: metrics are not comparable; re-evaluate the candidate on "
            f"{champion.eval_set_id} (or both on a common set) and register it again",
            [],
        )
    for side, m in (("candidate", candidate.metrics), ("champion", champion.metrics)):
        if primary_metric not in m:
            return refuse(f"the {side} has no primary metric '{primary_metric}' (has {sorted(m)})", [])
    comparisons = compare_metrics(candidate.metrics, champion.metrics, tolerance)
    comparisons.sort(key=lambda c: (c.metric != primary_metric, c.metric))
    failed = [c for c in comparisons if not c.passed]
    if failed:
        return refuse("; ".join(c.describe(tolerance) for c in failed), comparisons)
    return GateResult(
        3,
        "no_regression",
        True,
        f"{len(comparisons)} shared metrics within {_pct(tolerance)} on eval set {candidate.eval_set_id}",
    ), comparisons
