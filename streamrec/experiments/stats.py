"""The statistics of a two-variant comparison, with users as the unit of randomisation.

A rate per impression (CTR, completion rate) is a ratio of per-user means; its variance is the
delta method's over users (Deng et al. 2018, "Applying the Delta Method in Metric Analytics"),
never a binomial variance over impressions, which would ignore that one user's impressions are
correlated and understate the variance by the design effect 1 + (m - 1) ICC. From it: the
interval of the difference, a two-sided z-test on it, the delta-method interval of the relative
lift (:func:`ratio_difference`) and the minimum sample size in users (:func:`users_required`).
A share of a fixed total (coverage of the catalogue, error rates) keeps the two-proportion
statistics: statsmodels' Newcombe interval of the difference, log-adjusted interval of the
ratio, z-test (:func:`proportion_difference`, :func:`difference_lower_bound`). The
sample-ratio-mismatch test is scipy's chi-square (:func:`srm_test`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import chisquare, norm
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportions_ztest,
)

#: A value with its interval: ``(value, low, high)``.
Interval = tuple[float, float, float]
#: The interval of what cannot be computed.
NAN3: Interval = (math.nan, math.nan, math.nan)


@dataclass(frozen=True)
class RatioEstimate:
    """A per-impression rate of one variant with users as clusters.

    With per user ``x`` (impressions) and ``y`` (clicks or completions) over ``n`` users, the
    rate is ``R = sum(y) / sum(x)`` (a ratio of means) and, by the delta method (Deng et al.
    2018), ``var(R) = per_user_variance / n`` with

        per_user_variance = (s_y^2 - 2 R s_xy + R^2 s_x^2) / mean(x)^2
                          = sum((y - R x)^2) / (n - 1) / mean(x)^2

    (sample variances and covariance with ``n - 1``; the two forms are equal because
    ``y - R x`` has mean 0). With one impression per user it is the binomial ``R (1 - R)``
    (times ``n / (n - 1)``); when a user's impressions are all clicked or all not, it is ``m``
    times the binomial variance per impression.

    Attributes:
        users: ``n``.
        successes: ``sum(y)``.
        trials: ``sum(x)``.
        rate: ``R`` (NaN without trials).
        per_user_variance: The variance above (NaN with fewer than 2 users, no trials or no
            per-user sums).
    """

    users: int
    successes: int
    trials: int
    rate: float
    per_user_variance: float

    @property
    def variance(self) -> float:
        """``var(R)``: the per-user variance over the number of users."""
        return self.per_user_variance / self.users if self.users > 0 else math.nan

    @property
    def naive_variance(self) -> float:
        """The binomial variance ``R (1 - R) / trials`` that treats impressions as independent."""
        return self.rate * (1 - self.rate) / self.trials if self.trials > 0 else math.nan


def ratio_estimate(
    users: int,
    trials: int,
    successes: int,
    trials_sq: int | None,
    successes_sq: int | None,
    cross: int | None,
) -> RatioEstimate:
    """:class:`RatioEstimate` from the sums over users of ``x``, ``y``, ``x^2``, ``y^2`` and ``x y``."""
    rate = successes / trials if trials > 0 else math.nan
    var = math.nan
    if users >= 2 and trials > 0 and None not in (trials_sq, successes_sq, cross):
        assert trials_sq is not None and successes_sq is not None and cross is not None
        # sum((y - R x)^2) = sum(y^2) - 2 R sum(x y) + R^2 sum(x^2)
        ss = float(successes_sq) - 2 * rate * float(cross) + rate * rate * float(trials_sq)
        mean_x = trials / users
        var = max(ss, 0.0) / (users - 1) / (mean_x * mean_x)
    return RatioEstimate(int(users), int(successes), int(trials), rate, var)


@dataclass(frozen=True)
class Difference:
    """Treatment against control.

    Attributes:
        diff: Absolute difference treatment - control and its interval ``(diff, low, high)``.
        lift: Relative lift treatment / control - 1 and its interval ``(lift, low, high)`` (NaN
            without a control rate).
        p_value: Two-sided z-test of the difference (NaN when it cannot be computed).
        design_effect: Variance of the clustered difference over the variance impressions as
            independent trials would give it (:func:`ratio_difference` only; NaN otherwise).
    """

    diff: Interval
    lift: Interval
    p_value: float
    design_effect: float = math.nan


def ratio_difference(control: RatioEstimate, treatment: RatioEstimate, alpha: float) -> Difference:
    """Two rates with users as clusters, at confidence ``1 - alpha``.

    The difference's interval is ``diff +- z sqrt(var_c + var_t)``, the p-value the two-sided
    z-test of that difference, the lift's interval the delta method's on ``R_t / R_c``
    (independent variants).
    """
    c, t = control, treatment
    z = float(norm.ppf(1 - alpha / 2))
    diff_value = t.rate - c.rate
    var = c.variance + t.variance
    se = math.sqrt(var) if math.isfinite(var) else math.nan
    diff = (diff_value, diff_value - z * se, diff_value + z * se)
    p = float(2 * norm.sf(abs(diff_value) / se)) if se > 0 else math.nan
    lift = NAN3
    if c.rate > 0:  # delta method on R_t / R_c (independent variants)
        ratio = t.rate / c.rate
        lift_se = math.sqrt(t.variance / c.rate**2 + t.rate**2 * c.variance / c.rate**4)
        lift = (ratio - 1, ratio - 1 - z * lift_se, ratio - 1 + z * lift_se)
    naive = c.naive_variance + t.naive_variance
    deff = var / naive if naive > 0 else math.nan
    return Difference(diff, lift, p, deff)


def proportion_difference(
    control_successes: int, control_trials: int, treatment_successes: int, treatment_trials: int, alpha: float
) -> Difference:
    """Two independent proportions at confidence ``1 - alpha`` (all NaN without trials).

    Newcombe's interval of the difference, the log-adjusted interval of the ratio (without
    control successes: NaN) and the pooled z-test (NaN unless the pooled rate lies in (0, 1)).
    """
    c_succ, c_n, t_succ, t_n = control_successes, control_trials, treatment_successes, treatment_trials
    diff, lift, p = NAN3, NAN3, math.nan
    if c_n > 0 and t_n > 0:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            d_low, d_high = confint_proportions_2indep(t_succ, t_n, c_succ, c_n, compare="diff", alpha=alpha)
            diff = (t_succ / t_n - c_succ / c_n, float(d_low), float(d_high))
            if c_succ > 0:
                r_low, r_high = confint_proportions_2indep(
                    t_succ, t_n, c_succ, c_n, compare="ratio", alpha=alpha
                )
                lift = ((t_succ / t_n) / (c_succ / c_n) - 1, float(r_low) - 1, float(r_high) - 1)
            if 0 < c_succ + t_succ < c_n + t_n:  # the z-test needs a pooled rate strictly in (0, 1)
                p = float(proportions_ztest([t_succ, c_succ], [t_n, c_n])[1])
    return Difference(diff, lift, p)


def difference_lower_bound(
    control_successes: int, control_trials: int, treatment_successes: int, treatment_trials: int, alpha: float
) -> float:
    """The one-sided lower bound of treatment's minus control's proportion at confidence ``1 - alpha``.

    The lower end of Newcombe's two-sided interval at ``1 - 2 alpha``.
    """
    return float(
        confint_proportions_2indep(
            treatment_successes, treatment_trials, control_successes, control_trials,
            method="newcomb", compare="diff", alpha=2 * alpha,
        )[0]
    )  # fmt: skip


def srm_test(control: int, treatment: int, expected_share: float) -> tuple[float, float]:
    """Chi-square test of a split against the treatment share ``expected_share``.

    Returns:
        ``(chi2, p_value)``. With a share of 0 or 1 all units belong in one variant: ``chi2``
        is NaN and ``p_value`` 1 when none is in the other, else 0.
    """
    c, t = control, treatment
    total = c + t
    if 0 < expected_share < 1:
        chi2, p = chisquare([c, t], [total * (1 - expected_share), total * expected_share])
        return float(chi2), float(p)
    stray = t if expected_share <= 0 else c  # all units belong in one variant
    return math.nan, 1.0 if stray == 0 else 0.0


def users_required(
    baseline: float,
    per_user_sd: float,
    expected_effect: float,
    alpha: float,
    power: float,
    control: int,
    treatment: int,
) -> tuple[float, float, float]:
    """The minimum number of users to detect a relative lift of a rate.

    With ``sigma = per_user_sd`` control's per-user standard deviation
    (:attr:`RatioEstimate.per_user_variance`, assumed for both variants), ``delta = baseline *
    expected_effect`` (the target rate capped at 1) and ``k`` control users per treatment user
    (the observed allocation ``control / treatment``), the z-test of the difference has power
    ``power`` at ``alpha`` (two-sided) when

        n_treatment = (z_{1-alpha/2} + z_{1-beta})^2 * sigma^2 * (1 + 1/k) / delta^2,
        n_control = k * n_treatment

    (``per_variant``: ``k = 1``, ``2 (z + z)^2 sigma^2 / delta^2``); statsmodels'
    ``NormalIndPower`` solves it with the standardised effect ``delta / sigma``.

    Returns:
        ``(per_variant, control_required, treatment_required)``; infinite when the baseline or
        ``sigma`` is not positive, or the effect is nil.
    """
    sd = per_user_sd
    per_variant = c_req = t_req = math.inf
    if math.isfinite(baseline) and baseline > 0 and math.isfinite(sd) and sd > 0:
        delta = min(baseline * (1 + expected_effect), 1.0) - baseline  # a rate is at most 1
        if delta != 0:
            effect = abs(delta) / sd  # the difference in units of the per-user standard deviation
            solver = NormalIndPower()
            per_variant = float(solver.solve_power(effect_size=effect, alpha=alpha, power=power, ratio=1.0))
            ratio = control / treatment if treatment else 1.0  # control's users per treatment user
            t_req = float(solver.solve_power(effect_size=effect, alpha=alpha, power=power, ratio=ratio))
            c_req = t_req * ratio
    return per_variant, c_req, t_req


__all__ = [
    "NAN3",
    "Difference",
    "Interval",
    "RatioEstimate",
    "difference_lower_bound",
    "proportion_difference",
    "ratio_difference",
    "ratio_estimate",
    "srm_test",
    "users_required",
]
