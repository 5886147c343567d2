"""Hyper-parameter search for the baselines on a validation window cut from the training period.

The protocol mirrors the test protocol one step earlier in time, so the test window is never
seen while choosing:

1. :func:`validation_window` keeps only the events strictly before the test cutoff (the
   training period) and cuts *that* period again at a time quantile: the last
   ``fraction`` of it is the validation window, whose new positives (items a user had not
   engaged with before) are the validation targets; everything before is the fit window.
2. :func:`tune` fits each grid point on the fit window and scores NDCG@10 (or another metric)
   on the validation targets, with the same seen-item masking as the test evaluation; the best
   point wins (ties: the earlier point in grid order).
3. The caller refits the chosen parameters on the whole training period and evaluates once on
   the test window.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from streamrec.errors import TrainingDataError
from streamrec.evaluation.baselines import make_baseline
from streamrec.evaluation.config import baseline_config, grid_points, validate_grid
from streamrec.evaluation.metrics import ranking_metrics
from streamrec.evaluation.split import REQUIRED_COLUMNS, TemporalSplit, temporal_split


def validation_window(
    events: pd.DataFrame, test_cutoff: Any, fraction: float = 0.15, min_users: int = 1
) -> TemporalSplit:
    """Cut the validation window from the end of the training period.

    Args:
        events: Interactions with ``user_id``, ``item_id``, ``timestamp`` and ``label``; rows at
            or after ``test_cutoff`` may be present and are dropped first.
        test_cutoff: Start of the test window; nothing at or after it is used.
        fraction: Share of the training period's rows (by time quantile) that forms the
            validation window.
        min_users: Fewest validation users with a new positive acceptable.

    Returns:
        A :class:`~streamrec.evaluation.split.TemporalSplit` of the training period: ``train``
        is the fit window, ``test`` the validation targets; its ``cutoff`` is the validation
        cutoff, always before ``test_cutoff``.

    Raises:
        TrainingDataError: the training period is empty or too small to hold a validation window
            with ``min_users`` users.
    """
    period = events.loc[(events["timestamp"] < test_cutoff).to_numpy(), list(REQUIRED_COLUMNS)]
    if len(period) == 0:
        raise TrainingDataError(f"no training events before the test cutoff {test_cutoff} to tune on")
    return temporal_split(period, quantile=1.0 - fraction, min_test_users=min_users)


@dataclass(frozen=True)
class Trial:
    """One grid point scored on the validation window.

    Attributes:
        params: The grid point (only the searched names).
        metrics: Validation metrics (means over validation users).
        fit_s: Fit time in seconds.
    """

    params: dict[str, Any]
    metrics: dict[str, float]
    fit_s: float


@dataclass
class TuningResult:
    """The outcome of :func:`tune` for one baseline.

    Attributes:
        name: Baseline name.
        params: The chosen configuration, every field (defaults, ``base`` and the best point).
        metric: What was maximised, e.g. ``ndcg@10``.
        trials: Every grid point in order.
        seconds: Wall time of the whole search.
    """

    name: str
    params: dict[str, Any]
    metric: str
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best(self) -> Trial | None:
        """The winning trial (``None`` when nothing was searched)."""
        if not self.trials:
            return None
        return max(self.trials, key=lambda t: (t.metrics.get(self.metric, -np.inf), -self.trials.index(t)))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record: chosen params, the validation score of each point, the time."""
        best = self.best
        return {
            "params": self.params,
            "metric": self.metric,
            "validation": best.metrics.get(self.metric) if best else None,
            "trials": [
                {"params": t.params, self.metric: t.metrics.get(self.metric), "fit_s": t.fit_s}
                for t in self.trials
            ],
            "tuning_s": round(self.seconds, 2),
        }


def _metric_k(metric: str) -> int:
    try:
        return int(metric.split("@", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"metric must look like 'ndcg@10', got '{metric}'") from None


def tune(
    name: str,
    grid: Mapping[str, Sequence[Any]],
    window: TemporalSplit,
    *,
    base: Mapping[str, Any] | None = None,
    metric: str = "ndcg@10",
    max_users: int = 0,
    seed: int = 0,
) -> TuningResult:
    """Grid search of one baseline on a validation window.

    Args:
        name: Baseline name (see :data:`~streamrec.evaluation.config.BASELINE_NAMES`).
        grid: Hyper-parameter name to candidate values; empty = the defaults only, not scored.
        window: From :func:`validation_window` (fit window and validation targets).
        base: Fixed settings under every point (e.g. ``num_threads``, ``max_items``).
        metric: Validation metric to maximise, ``<name>@<K>`` of
            :func:`~streamrec.evaluation.metrics.ranking_metrics`.
        max_users: Score at most this many validation users (a seeded sample, the same for
            every point); 0 = all. Bounds the ranking cost on large catalogues.
        seed: Seed of that sample.

    Returns:
        The :class:`TuningResult`; ``params`` is the full chosen configuration.

    Raises:
        ConfigError: unknown baseline or an invalid grid.
        ModelError: a point cannot be fitted (e.g. EASE over its size guard).
    """
    validate_grid(name, grid)
    fixed = dict(base or {})
    t_start = time.perf_counter()
    if not grid:
        return TuningResult(name, baseline_config(name, fixed).model_dump(), metric)
    k = _metric_k(metric)
    fit = window.train_matrix()
    truth = window.test_matrix()
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    if 0 < max_users < users.size:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    trials: list[Trial] = []
    for point in grid_points(grid):
        model = make_baseline(name, {**fixed, **point})
        t0 = time.perf_counter()
        model.fit(fit)
        fit_s = round(time.perf_counter() - t0, 3)
        ranked = model.recommend(users, k)
        trials.append(Trial(point, ranking_metrics(ranked, truth[users], (k,)), fit_s))
    result = TuningResult(name, {}, metric, trials)
    best = result.best
    assert best is not None
    result.params = baseline_config(name, {**fixed, **best.params}).model_dump()
    result.seconds = time.perf_counter() - t_start
    return result
