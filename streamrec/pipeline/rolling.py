"""Rolling evaluation: several cutoffs, each fold's models retrained on what came before it.

A single temporal split evaluates on the users active both before and after one cutoff (97 on
ML-100K). With ``evaluation.rolling.folds = N`` (``streamrec train --rolling-folds N``) the
pipeline also evaluates at ``N - 1`` earlier cutoffs, so that more users contribute a
*user-window* (a user with a new positive item in a fold's test window)::

    c_1 < c_2 < ... < c_N = T_test          (event-time quantiles, window_fraction apart)
    fold i < N: events before c_i train; the test window is [c_i, c_{i+1})
    fold N:     the pipeline's own evaluation (the test window [T_test, last event]), not refit

Each earlier fold runs the evaluated fit's steps through the same functions and the same config
as the pipeline and the refit (:mod:`.refit`) do, with the split times moved: retrieval A before
``T_rank(c_i)``, ranker rows in ``[T_rank(c_i), c_i)`` with point-in-time features, retrieval B
and the ranker before ``c_i``; the baselines are tuned again on a validation window cut from the
end of that fold's training period (never its test window), then the same methods are scored on
the fold's test window (:func:`~streamrec.pipeline.evaluate.evaluate` on the world as it was up
to ``c_{i+1}``). StreamRec's own hyper-parameters are the config's in every fold (not tuned).

The report's ``rolling`` key holds every fold's methods (with intervals over that fold's users)
and the pooled result: each method's per-user-window metrics concatenated over the folds, their
mean with a bootstrap interval over user-windows, and the paired difference StreamRec minus the
best pooled baseline. A user active in several windows counts once per window; the bootstrap
treats the windows as independent (``n_distinct_users`` says how many people they are).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from streamrec.errors import ConfigError, ModelError, TrainingDataError
from streamrec.evaluation.comparison import MethodScores, add_intervals, paired_vs_best
from streamrec.features.client import FeatureClient
from streamrec.funnel.core import Funnel
from streamrec.models.scoring import RankerScorer
from streamrec.pipeline.config import RollingSettings
from streamrec.pipeline.evaluate import CHALLENGERS, evaluate, test_truth
from streamrec.pipeline.refit import fit_models_at
from streamrec.pipeline.snapshots import snapshot_times
from streamrec.pipeline.train import (
    PipelineState,
    _step,
    _ts,
    positives_with_features,
    ranker_window_start,
)


@dataclass(frozen=True)
class Fold:
    """One cutoff of the rolling evaluation.

    Attributes:
        index: 1 for the earliest cutoff, ``N`` for the global test cutoff.
        cutoff: The fold's models saw events strictly before this time.
        window_end: End (exclusive) of its test window: the next cutoff, or ``None`` for the
            last fold (the pipeline's test window, up to the last event).
        t_rank: Start of its ranker label window ``[t_rank, cutoff)``.
    """

    index: int
    cutoff: pd.Timestamp
    window_end: pd.Timestamp | None
    t_rank: pd.Timestamp


def fold_quantiles(settings: RollingSettings, test_fraction: float) -> list[float]:
    """Event-time quantiles of the cutoffs, earliest first; the last is ``1 - test_fraction``.

    Raises:
        ConfigError: the earliest cutoff would leave less than ``min_train_fraction`` of the
            events to train on.
    """
    n = settings.folds
    if n <= 0:
        return []
    last = 1.0 - test_fraction
    if n == 1:
        return [last]
    room = last - settings.min_train_fraction
    step = settings.window_fraction
    if step is None:
        step = min(test_fraction, room / (n - 1))
    first = last - (n - 1) * step
    if room <= 0 or first < settings.min_train_fraction - 1e-9:
        raise ConfigError(
            f"evaluation.rolling: {n} cutoffs {step:.3f} of the events apart end at the quantile "
            f"{last:.3f} (1 - split.test_fraction), so the first would train on {max(first, 0):.3f} of "
            f"the events, below min_train_fraction={settings.min_train_fraction}: use fewer folds, "
            "a smaller window_fraction or a smaller min_train_fraction"
        )
    return [last - (n - i) * step for i in range(1, n + 1)]


def plan_folds(
    events: pd.DataFrame, t_test: pd.Timestamp, settings: RollingSettings, split: Any
) -> list[Fold]:
    """The rolling evaluation's folds, earliest first; the last one's cutoff is ``t_test``.

    Args:
        events: Every event (``timestamp``).
        t_test: The pipeline's test cutoff.
        settings: ``evaluation.rolling``.
        split: The config's ``split`` (``test_fraction``, ``ranker_fraction``).

    Cutoffs that coincide (a history with few distinct times) are kept once, and one with no
    event before it is dropped.
    """
    ts = events["timestamp"]
    first = ts.min()
    cutoffs: list[pd.Timestamp] = []
    for q in fold_quantiles(settings, split.test_fraction)[:-1]:
        c = _ts(ts.quantile(q, interpolation="higher"))
        if first < c < t_test and (not cutoffs or c > cutoffs[-1]):
            cutoffs.append(c)
    if settings.folds:
        cutoffs.append(_ts(t_test))
    return [
        Fold(
            index=i + 1,
            cutoff=c,
            window_end=cutoffs[i + 1] if i + 1 < len(cutoffs) else None,
            t_rank=ranker_window_start(events, c, split.ranker_fraction),
        )
        for i, c in enumerate(cutoffs)
    ]


def fold_snapshot_times(
    events: pd.DataFrame, folds: Sequence[Fold], built: Sequence[pd.Timestamp]
) -> list[pd.Timestamp]:
    """Feature snapshots the earlier folds need beyond those the pipeline built (``built``).

    For each fold, the cutoffs the pipeline's feature build would choose if history ended at
    the fold's window end (:func:`~streamrec.pipeline.snapshots.snapshot_times`: its split
    times, its ranker window's days, then the newest days, up to the same bound), so that every
    fold's point-in-time joins see features as complete as the main fit's.
    """
    have = {_ts(t) for t in built}
    out: set[pd.Timestamp] = set()
    for fold in folds:
        if fold.window_end is None:
            continue
        ts = events["timestamp"][events["timestamp"] < fold.window_end]
        times = snapshot_times(ts, windows=[(fold.t_rank, fold.cutoff)], points=[fold.t_rank, fold.cutoff])
        out |= {_ts(t) for t in times} - have
    return sorted(out)


def pool_folds(
    folds: Sequence[Sequence[MethodScores]],
    *,
    challengers: Sequence[str] = CHALLENGERS,
    select_by: str = "ndcg@10",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    method: Any = "percentile",
) -> dict[str, Any]:
    """Every method's per-user-window metrics pooled over folds, with intervals and the paired line.

    Args:
        folds: Per fold, the scored methods (all scored on that fold's users, row by row).
        challengers: Methods paired against the best pooled baseline; the others are baselines.
        select_by: Metric that picks the best baseline (highest pooled mean).
        confidence: Two-sided level of the intervals (bootstrap over user-windows).
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling.
        method: Bootstrap method (:func:`~streamrec.evaluation.intervals.bootstrap_intervals`).

    Returns:
        ``{"n_user_windows", "methods": [row, ...], "best_baseline", "paired_vs_best_baseline"}``;
        a row holds ``method``, ``n_user_windows``, the pooled mean of each per-user metric and
        ``ci``. Only methods scored in every fold are pooled (a baseline skipped in one fold is
        left out, see ``left_out``).

    Raises:
        ValueError: no fold, or two methods of one fold were scored on different users.
    """
    if not folds:
        raise ValueError("no fold to pool")
    for i, fold in enumerate(folds):
        for s in fold[1:]:
            if not np.array_equal(s.rows, fold[0].rows):
                raise ValueError(
                    f"fold {i + 1}: {s.name} and {fold[0].name} were scored on different users; cannot pool them"
                )
    names = [s.name for s in folds[0]]
    in_all = [n for n in names if all(any(s.name == n for s in f) for f in folds)]
    left_out = sorted({s.name for f in folds for s in f} - set(in_all))
    pooled: list[MethodScores] = []
    for name in in_all:
        parts = [next(s for s in f if s.name == name) for f in folds]
        metrics = [m for m in parts[0].per_user if all(m in p.per_user for p in parts)]
        per_user = {
            m: np.concatenate([np.asarray(p.per_user[m], np.float64) for p in parts]) for m in metrics
        }
        n = int(next(iter(per_user.values())).size) if per_user else 0
        row: dict[str, Any] = {"method": name, "n_user_windows": n}
        row.update({m: float(v.mean()) for m, v in per_user.items()})
        pooled.append(MethodScores(name, row, per_user, np.arange(n, dtype=np.int64)))
    args = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed, "method": method}
    add_intervals(pooled, **args)
    baselines = [s.name for s in pooled if s.name not in challengers]
    paired = paired_vs_best(pooled, challengers, baselines, select_by=select_by, **args)
    return {
        "n_user_windows": int(sum(s.rows.size for s in (f[0] for f in folds if f))),
        "methods": [s.row for s in pooled],
        "best_baseline": paired["baseline"] if paired else None,
        "paired_vs_best_baseline": paired,
        "left_out": left_out,
    }


def _fold_row(
    fold: Fold, report: dict[str, Any], state: PipelineState, seconds: float | None
) -> dict[str, Any]:
    ev = state.events
    seen = ev[ev["timestamp"] < fold.cutoff]
    s = report["summary"]
    return {
        "fold": fold.index,
        "cutoff": str(fold.cutoff),
        "window_end": str(fold.window_end) if fold.window_end is not None else str(state.end),
        "ranker_window_start": str(fold.t_rank),
        "train_positives": int((seen["label"] > 0).sum()),
        "n_users": s["n_users"],
        "best_baseline": s["best_baseline"],
        "methods": report["methods"],
        "paired_vs_best_baseline": s["paired_vs_best_baseline"],
        "refit": seconds is not None,
        "seconds": round(seconds, 1) if seconds is not None else None,
    }


def evaluate_fold(
    state: PipelineState, fc: FeatureClient, pit: pd.DataFrame, fold: Fold, scores_out: list[MethodScores]
) -> tuple[dict[str, Any], npt.NDArray[np.int64]]:
    """Fit every model on the events before ``fold.cutoff`` and evaluate up to ``fold.window_end``.

    The steps of the evaluated fit (:func:`~streamrec.pipeline.refit.fit_models_at`, as the
    refit runs them), with the same config, on the world as it was up to the fold's window end.

    Returns:
        The fold's evaluation report and the raw ids of its evaluated users (row order).
    """
    assert fold.window_end is not None
    cfg = state.cfg
    ev = state.events
    visible = ev[ev["timestamp"] < fold.window_end]
    before = visible[visible["timestamp"] < fold.cutoff]
    if int((before["label"] > 0).sum()) < cfg.split.min_train_events:
        raise TrainingDataError(
            f"{int((before['label'] > 0).sum())} positives before {fold.cutoff}, fewer than "
            f"split.min_train_events={cfg.split.min_train_events}"
        )
    fstate = dataclasses.replace(
        state,
        events=visible,
        t_rank=fold.t_rank,
        t_test=fold.cutoff,
        end=_ts(visible["timestamp"].max()),
    )
    fit = fit_models_at(fstate, fc, pit, f"fold{fold.index}")
    funnel = Funnel(fit.models, fit.table, RankerScorer(fit.ranker), cfg.retrieval)  # type: ignore[arg-type]
    report = evaluate(fstate, fc, funnel, np.random.default_rng(cfg.seed), scores_out=scores_out)
    return report, _evaluated_users(fstate, funnel)


def _evaluated_users(state: PipelineState, funnel: Funnel) -> npt.NDArray[np.int64]:
    users, _ = test_truth(state, funnel)
    return np.asarray(funnel.models.users.raw_ids[users], dtype=np.int64)


def rolling_evaluation(
    state: PipelineState,
    fc: FeatureClient,
    pit: pd.DataFrame,
    main: dict[str, Any],
    main_scores: list[MethodScores],
    main_funnel: Funnel,
) -> dict[str, Any]:
    """The report's ``rolling`` key: every fold and the pooled result.

    Args:
        state: The pipeline state after its evaluation.
        fc: The feature client (snapshots built at every fold's split times).
        pit: Positives before ``T_test`` with point-in-time features (joined again after the folds' snapshots are written).
        main: The pipeline's evaluation report (the last fold).
        main_scores: Its methods' per-user scores (``evaluate(..., scores_out=)``).
        main_funnel: The evaluated funnel (for the last fold's user ids).

    A fold whose data cannot train (too few positives, a single-class ranker window, a failed
    training job) is skipped and listed under ``skipped`` with the reason.
    """
    assert state.t_test is not None
    ev_cfg = state.cfg.evaluation
    folds = plan_folds(state.events, state.t_test, ev_cfg.rolling, state.cfg.split)
    # The earlier folds' snapshots, written only now: the main fit has read all its features, so
    # its numbers are those of a run without the rolling evaluation (older snapshots would
    # change its point-in-time joins). The recorded build (defaults, materialisation) stays.
    extra = fold_snapshot_times(state.events, folds, state.snapshots)
    if extra:
        with _step(state, "rolling_features"):
            built = fc.build(cutoffs=[t.to_pydatetime() for t in extra], extra=True)
        state.log(
            f"  rolling: {len(extra)} more feature snapshots for the earlier folds, {built.files} files"
        )
        # The folds' two-tower rows join those snapshots too: the main fit's join ran before they
        # existed, so an early positive found none and trained on defaults (an empty history).
        with _step(state, "rolling_training_set"):
            pit = positives_with_features(state, fc)
    rows: list[dict[str, Any]] = []
    scored: list[list[MethodScores]] = []
    users: list[npt.NDArray[np.int64]] = []
    skipped: list[dict[str, Any]] = []
    for fold in folds:
        if fold.window_end is None:  # the pipeline's own evaluation
            rows.append(_fold_row(fold, main, state, None))
            scored.append(list(main_scores))
            users.append(_evaluated_users(state, main_funnel))
            continue
        state.log(
            f"  rolling fold {fold.index}/{len(folds)}: train before {fold.cutoff}, test to {fold.window_end}"
        )
        t0 = time.perf_counter()
        out: list[MethodScores] = []
        try:
            with _step(state, f"rolling_fold{fold.index}"):
                report, fold_users = evaluate_fold(state, fc, pit, fold, out)
        except (TrainingDataError, ModelError) as err:
            state.log(f"  rolling fold {fold.index} skipped: {type(err).__name__}: {err}")
            skipped.append(
                {"fold": fold.index, "cutoff": str(fold.cutoff), "reason": f"{type(err).__name__}: {err}"}
            )
            continue
        rows.append(_fold_row(fold, report, state, time.perf_counter() - t0))
        scored.append(out)
        users.append(fold_users)
    iv = ev_cfg.intervals
    pooled = pool_folds(
        scored, confidence=iv.confidence, n_resamples=iv.n_resamples, seed=state.cfg.seed, method=iv.method
    )
    pooled["n_distinct_users"] = int(np.unique(np.concatenate(users)).size) if not ev_cfg.max_users else None
    pooled["intervals"] = {
        "over": "user-windows",
        "confidence": iv.confidence,
        "n_resamples": iv.n_resamples,
        "method": iv.method,
        "seed": state.cfg.seed,
    }
    state.log(
        f"  rolling: {len(rows)} folds, {pooled['n_user_windows']} user-windows "
        f"({pooled['n_distinct_users']} distinct users)"
    )
    return {
        "settings": ev_cfg.rolling.model_dump(mode="json"),
        "hyper_parameters": "StreamRec: the config's in every fold; baselines: tuned again in every fold "
        "on a validation window cut from that fold's training period",
        "folds": rows,
        "skipped": skipped,
        "pooled": pooled,
    }
