"""Bootstrap confidence intervals over test users, for one method and for paired differences.

Every per-user metric (:func:`~streamrec.evaluation.metrics.per_user_metrics`) is a mean over the
evaluated users, so its uncertainty comes from which users happened to be in the test window.
:func:`bootstrap_intervals` resamples users with replacement (``scipy.stats.bootstrap``) and
reports the interval of the mean. :func:`paired_differences` does the same for the per-user
difference of two methods scored on the *same* users, which is much tighter than comparing two
separate intervals because most of the between-user variance cancels.

The default is the percentile method: its cost is linear in the number of users (BCa adds a
jackknife that is quadratic), and it is what offline recommender comparisons usually report.
Coverage has no per-user value and gets no interval (a bootstrap of a distinct count is biased
downwards: a resample holds about 63% of the distinct users).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from scipy.stats import bootstrap

from streamrec.evaluation.config import IntervalMethod

#: Bound on the floats one resampling batch holds (series x resamples x users), about 160 MB.
_BATCH_FLOATS = 20_000_000


def _as_rows(per_user: Mapping[str, npt.ArrayLike]) -> tuple[list[str], npt.NDArray[np.float64]]:
    names = list(per_user)
    rows = [np.asarray(per_user[n], dtype=np.float64).ravel() for n in names]
    sizes = {r.size for r in rows}
    if len(sizes) > 1:
        raise ValueError(
            f"per-user arrays differ in length: {dict(zip(names, (r.size for r in rows), strict=True))}"
        )
    if sizes == {0}:
        raise ValueError("no users to resample")
    return names, np.vstack(rows) if rows else np.empty((0, 0))


def bootstrap_intervals(
    per_user: Mapping[str, npt.ArrayLike],
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    method: IntervalMethod = "percentile",
) -> dict[str, tuple[float, float]]:
    """Bootstrap interval of the mean of each per-user series, resampling users.

    All series are resampled with the same user draws (they must be aligned by user), so one
    call covers every metric of a method.

    Args:
        per_user: Metric name to one value per user (equal lengths).
        confidence: Two-sided confidence level, e.g. 0.95.
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling (results are reproducible).
        method: ``percentile`` (default), ``basic`` or ``BCa`` (``scipy.stats.bootstrap``).

    Returns:
        Metric name to ``(low, high)``. With a single user, or values all equal, the interval is
        that value at both ends.

    Raises:
        ValueError: series of different lengths, no users, or ``confidence`` outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not per_user:
        return {}
    names, data = _as_rows(per_user)
    n = data.shape[1]
    out: dict[str, tuple[float, float]] = {}
    constant = np.all(data == data[:, :1], axis=1)
    for name, row, const in zip(names, data, constant, strict=True):
        if n == 1 or const:
            out[name] = (float(row[0]), float(row[0]))
    todo = [i for i, name in enumerate(names) if name not in out]
    if todo:
        sample = data[todo]
        res = bootstrap(
            (sample,),
            np.mean,
            n_resamples=n_resamples,
            batch=max(1, _BATCH_FLOATS // (sample.shape[0] * n)),
            vectorized=True,
            axis=-1,
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(seed),
        )
        low = np.atleast_1d(res.confidence_interval.low)
        high = np.atleast_1d(res.confidence_interval.high)
        for j, i in enumerate(todo):
            out[names[i]] = (float(low[j]), float(high[j]))
    return {name: out[name] for name in names}


def paired_differences(
    a: Mapping[str, npt.ArrayLike],
    b: Mapping[str, npt.ArrayLike],
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    method: IntervalMethod = "percentile",
) -> dict[str, dict[str, float | list[float]]]:
    """Mean per-user difference ``a - b`` of each metric both have, with its bootstrap interval.

    Args:
        a: Metric name to one value per user (the challenger).
        b: The same for the reference, aligned user by user with ``a``.
        confidence: Two-sided confidence level.
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling.
        method: See :func:`bootstrap_intervals`.

    Returns:
        Metric name to ``{"difference": mean(a - b), "ci": [low, high]}``.

    Raises:
        ValueError: the two methods were scored on different numbers of users.
    """
    diffs: dict[str, npt.NDArray[np.float64]] = {}
    for name in a:
        if name not in b:
            continue
        x = np.asarray(a[name], dtype=np.float64).ravel()
        y = np.asarray(b[name], dtype=np.float64).ravel()
        if x.size != y.size:
            raise ValueError(
                f"'{name}': {x.size} users against {y.size}; a paired difference needs the same users"
            )
        diffs[name] = x - y
    cis = bootstrap_intervals(diffs, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method)
    return {
        name: {"difference": float(np.mean(d)), "ci": [cis[name][0], cis[name][1]]}
        for name, d in diffs.items()
    }
