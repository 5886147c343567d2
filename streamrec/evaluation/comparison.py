"""Methods side by side on one test set: tuned baselines, intervals, paired differences.

This is the offline comparison the training pipeline reports (``methods`` and ``summary`` of
``streamrec train --json``):

* :func:`run_baselines` tunes every baseline on a validation window cut from the training period
  (:mod:`streamrec.evaluation.tuning`), refits the chosen parameters on the whole training
  matrix and scores the test users;
* :func:`score_ranking` scores any ranking (a baseline's or the serving funnel's) per user;
* :func:`add_intervals` attaches a bootstrap interval over test users to every per-user metric;
* :func:`paired_vs_best` reports challenger minus the best baseline, user by user, with its interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from streamrec.errors import ModelError, TrainingDataError
from streamrec.evaluation.baselines import EASE, make_baseline
from streamrec.evaluation.config import EASEConfig, IntervalMethod, baseline_config
from streamrec.evaluation.intervals import bootstrap_intervals, paired_differences
from streamrec.evaluation.metrics import per_user_metrics, ranking_metrics
from streamrec.evaluation.tuning import tune, validation_window

F64 = npt.NDArray[np.float64]


@dataclass
class MethodScores:
    """One method's result on the test users.

    Attributes:
        name: Method name.
        row: The result-table row: ``method``, the mean metrics and any extras (``fit_s``,
            ``recommend_ms_per_user``, ``params``, and ``ci`` once :func:`add_intervals` ran).
        per_user: Per-user metric values (:func:`~streamrec.evaluation.metrics.per_user_metrics`).
        rows: The truth rows those values belong to (equal for methods that can be paired).
    """

    name: str
    row: dict[str, Any]
    per_user: dict[str, F64] = field(default_factory=dict)
    rows: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))


def score_ranking(
    name: str,
    ranked: npt.ArrayLike,
    truth: sp.spmatrix | sp.sparray,
    ks: Iterable[int],
    n_items: int | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> MethodScores:
    """Mean and per-user metrics of one ranking of the test users.

    Args:
        name: Method name.
        ranked: ``(n_users, K)`` item indices, rows aligned with ``truth``.
        truth: ``(n_users, n_items)`` test positives.
        ks: Cut-offs.
        n_items: Catalogue size for coverage.
        before: Row entries placed after ``method`` and before the metrics (e.g. ``fit_s``).
        after: Row entries placed after the metrics.
    """
    ks = tuple(ks)
    per_user, rows = per_user_metrics(ranked, truth, ks)
    row = {"method": name, **(before or {}), **ranking_metrics(ranked, truth, ks, n_items), **(after or {})}
    return MethodScores(name, row, per_user, rows)


def run_baselines(
    names: Sequence[str],
    train: sp.csr_matrix,
    users: npt.ArrayLike,
    truth: sp.csr_matrix,
    ks: Iterable[int],
    *,
    events: pd.DataFrame | None = None,
    test_cutoff: Any = None,
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    validation_fraction: float = 0.15,
    metric: str = "ndcg@10",
    max_validation_users: int = 0,
    seed: int = 0,
    fixed: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[list[MethodScores], dict[str, Any]]:
    """Tune, refit and score every baseline on the same training matrix, users and truth.

    Tuning sees only ``events`` strictly before ``test_cutoff``
    (:func:`~streamrec.evaluation.tuning.validation_window` drops the rest before anything
    else), so the test window cannot influence a choice.

    Args:
        names: Baselines to run, in table order.
        train: The training matrix (whole training period) the chosen parameters are refit on.
        users: Test users (rows of ``train``) to rank.
        truth: ``(len(users), n_items)`` test positives of those users, row by row.
        ks: Cut-offs.
        events: Interactions (``user_id``, ``item_id``, ``timestamp``, ``label``) of at least
            the training period; ``None`` disables tuning (defaults everywhere).
        test_cutoff: Start of the test window.
        grids: Per baseline, the grid to search (absent or empty = defaults, not searched).
        validation_fraction: Share of the training period used as the validation window.
        metric: Validation metric to maximise.
        max_validation_users: Score at most this many validation users per grid point (0 = all).
        seed: Seed of that sample.
        fixed: Per baseline, settings under every point and the refit (threads, size guards).
        log: Progress lines.

    Returns:
        ``(scores, report)``: one :class:`MethodScores` per baseline run (row with ``fit_s``,
        metrics, ``recommend_ms_per_user`` and the ``params`` used) and the tuning report
        ``{"validation": ..., "tuning": {name: ...}, "skipped": {name: reason}}``.
    """
    ks = tuple(sorted(set(ks)))
    u = np.asarray(users, dtype=np.int64).ravel()
    n_items = int(train.shape[1])
    fixed = fixed or {}
    grids = grids or {}
    report: dict[str, Any] = {"validation": None, "tuning": {}, "skipped": {}}
    runnable: list[str] = []
    for name in names:
        if name == "ease":
            try:
                EASE.check_size(n_items, EASEConfig.model_validate(dict(fixed.get(name, {}))).max_items)
            except ModelError as err:
                report["skipped"][name] = str(err)
                log(f"  baseline {name} skipped: {err}")
                continue
        runnable.append(name)

    window = None
    if events is not None and test_cutoff is not None and any(grids.get(n) for n in runnable):
        try:
            window = validation_window(events, test_cutoff, validation_fraction)
            report["validation"] = {
                "cutoff": str(window.cutoff),
                "test_cutoff": str(test_cutoff),
                "fraction": validation_fraction,
                "metric": metric,
                "fit_rows": window.stats["train_rows"],
                "users": window.stats["test_users"],
                "targets": window.stats["test_rows"],
            }
        except TrainingDataError as err:
            report["validation"] = {"skipped": str(err)}
            log(f"  baseline tuning skipped (defaults used): {err}")

    scores: list[MethodScores] = []
    for name in runnable:
        base = dict(fixed.get(name, {}))
        params: Mapping[str, Any] = base
        if window is not None and grids.get(name):
            result = tune(
                name, grids[name], window, base=base, metric=metric, max_users=max_validation_users, seed=seed
            )
            report["tuning"][name] = result.as_dict()
            params = result.params
            chosen = result.best.params if result.best else {}
            log(f"  {name}: {len(result.trials)} grid points in {result.seconds:.1f}s -> {chosen}")
        config = baseline_config(name, params)
        model = make_baseline(name, config)
        t0 = time.perf_counter()
        model.fit(train)
        fit_s = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        ranked = model.recommend(u, max(ks))
        ms = 1000.0 * (time.perf_counter() - t0) / max(u.size, 1)
        scores.append(
            score_ranking(
                name,
                ranked,
                truth,
                ks,
                n_items,
                before={"fit_s": fit_s},
                after={
                    "recommend_ms_per_user": ms,
                    "params": config.model_dump(),
                    "tuned": name in report["tuning"],
                },
            )
        )
    return scores, report


def add_intervals(
    scores: Iterable[MethodScores],
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    method: IntervalMethod = "percentile",
) -> None:
    """Set ``row["ci"] = {metric: [low, high]}`` for every per-user metric of every method.

    Every method is resampled with the same seed, hence the same user draws.
    """
    for s in scores:
        cis = bootstrap_intervals(
            s.per_user, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method
        )
        s.row["ci"] = {name: [lo, hi] for name, (lo, hi) in cis.items()}


def paired_vs_best(
    scores: Sequence[MethodScores],
    challengers: Iterable[str],
    baselines: Iterable[str],
    *,
    select_by: str = "ndcg@10",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    method: IntervalMethod = "percentile",
) -> dict[str, Any] | None:
    """Each challenger minus the best baseline, user by user, with bootstrap intervals.

    The best baseline is the one with the highest mean ``select_by`` on the test users (the
    hardest competitor; the same choice as ``summary["best_baseline"]``).

    Returns:
        ``{"baseline", "selected_by", "confidence", <challenger>: {metric: {"difference", "ci"}}}``
        or ``None`` when there is no baseline.

    Raises:
        ValueError: a challenger was scored on other test rows than the baseline.
    """
    by_name = {s.name: s for s in scores}
    pool = [by_name[b] for b in baselines if b in by_name]
    if not pool:
        return None
    best = max(pool, key=lambda s: float(s.row.get(select_by, float("-inf"))))
    out: dict[str, Any] = {"baseline": best.name, "selected_by": select_by, "confidence": confidence}
    for name in challengers:
        if name not in by_name:
            continue
        c = by_name[name]
        if not np.array_equal(c.rows, best.rows):
            raise ValueError(f"{name} and {best.name} were scored on different test users; cannot pair them")
        out[name] = paired_differences(
            c.per_user,
            best.per_user,
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            method=method,
        )
    return out
