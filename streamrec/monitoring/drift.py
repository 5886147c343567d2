"""Drift over time: daily feature and prediction drift, and delayed-label quality per model version.

:func:`feature_drift_by_day` takes one model version's sampled ranker inputs (the ``scored``
table of :mod:`streamrec.monitoring.logs`) and gives, per UTC day and feature, the PSI against
the bundle's training histogram and against the window's first day (the baseline: the first day
with ``min_rows`` values), plus the same for the scores of the served items (prediction drift;
no training histogram, so bucketed on the baseline day's deciles).

:func:`quality_by_day` joins the logged impressions to the clicks and completions in the events
store (:class:`streamrec.data.store.DataStore`): an impression counts as clicked (completed)
when the same user clicked (completed) the same item within ``label_window_hours`` after it;
each event is credited to the latest impression before it. Rates come with a Wilson interval
(``scipy.stats.binomtest``). Events the API logged reach the store only through
``streamrec data export-events``; a day whose label window is not yet covered by the store is
marked ``labels_complete = False``.

Statistics are scipy/numpy, not Evidently: the training side is a histogram in the manifest,
not a sample, and Evidently's drift tests compare two samples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field
from scipy.stats import binomtest

from streamrec.config import StrictModel
from streamrec.errors import ConfigError
from streamrec.monitoring.logs import FEATURE_PREFIX, feature_columns, read_impressions
from streamrec.monitoring.skew import (
    bucket_counts,
    load_ranker_inputs,
    load_scored_impressions,
    psi,
    require_request_log,
    resolve_version,
    select_version,
    training_manifest,
)
from streamrec.registry.manifest import read_manifest

if TYPE_CHECKING:
    from streamrec.data.store import DataStore

#: Columns of :func:`feature_drift_by_day`.
DRIFT_COLUMNS: tuple[str, ...] = (
    "day",
    "model_version",
    "feature",
    "kind",
    "rows",
    "mean",
    "psi_train",
    "psi_first_day",
    "status",
)
#: Columns of :func:`quality_by_day` after the grouping columns.
QUALITY_COLUMNS: tuple[str, ...] = (
    "impressions",
    "clicks",
    "completions",
    "ctr",
    "ctr_low",
    "ctr_high",
    "completion_rate",
    "completion_low",
    "completion_high",
    "labels_complete",
)
#: The served score's row in :func:`feature_drift_by_day` (``kind == "prediction"``).
SCORE = "score"
_GROUPABLE = ("model_version", "variant", "level")


class DriftConfig(StrictModel):
    """Settings of the daily drift and quality tables (``streamrec monitor drift --config``).

    Attributes:
        days: Days of log to look at (when no ``since`` is given).
        max_psi: A day's PSI above this (against training or the first day) is an ``alert``.
        min_rows: A day with fewer values of a feature is ``insufficient`` (and cannot be the baseline).
        score_bins: Quantile bins of the baseline day's scores (prediction drift).
        psi_epsilon: Floor of a bin's share in the PSI.
        label_window_hours: A click or completion counts for an impression this long after it.
        confidence: Confidence level of the rate intervals.
    """

    days: int = Field(default=14, ge=1)
    max_psi: float = Field(default=0.2, gt=0)
    min_rows: int = Field(default=200, ge=1)
    score_bins: int = Field(default=10, ge=2, le=100)
    psi_epsilon: float = Field(default=1e-4, gt=0, lt=0.1)
    label_window_hours: float = Field(default=24.0, gt=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)


def _start(since: datetime | None, days: int) -> datetime:
    if since is not None:
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    return datetime.now(UTC) - timedelta(days=days)


def _quantile_edges(values: npt.NDArray[np.float64], bins: int) -> list[float] | None:
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    return edges.tolist() if edges.size >= 3 else None


def feature_drift_by_day(
    data_dir: str | os.PathLike[str] | None,
    *,
    model_version: str | None = None,
    config: DriftConfig | None = None,
    since: datetime | None = None,
    bundle_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Per day and feature of one model version: PSI against training and against the first day.

    Args:
        data_dir: StreamRec data directory.
        model_version: Version as logged (``"v3"``). Default: the champion's when it served in
            the window, else the version most served (as :func:`~streamrec.monitoring.skew.check_skew`).
        config: Settings (defaults: :class:`DriftConfig`).
        since: Start of the window (default: ``config.days`` before now).
        bundle_dir: Training statistics from this bundle directory instead of the registry.

    Returns:
        One row per (day, feature) and per day for the score (``feature == "score"``,
        ``kind == "prediction"``, ``psi_train`` NaN), columns :data:`DRIFT_COLUMNS`.
        ``psi_first_day`` is NaN before the baseline day and on days without ``min_rows`` values.

    Raises:
        DataNotFoundError: no request log, nothing scored by a ranker in the window, or no
            bundle for the version.
    """
    cfg = config or DriftConfig()
    start = _start(since, cfg.days)
    scored = load_scored_impressions(data_dir, start)
    label, _ = resolve_version(data_dir, scored, model_version, champion=bundle_dir is None)
    mine = select_version(scored, label, start)  # served items: their scores are the predictions
    inputs = load_ranker_inputs(data_dir, start)
    sample = inputs[inputs["model_version"] == label].dropna(axis=1, how="all")  # sampled over all scored
    manifest = read_manifest(bundle_dir) if bundle_dir is not None else training_manifest(data_dir, label)
    rows: list[dict[str, Any]] = []

    def series(
        frame: pd.DataFrame, column: str, kind: str, name: str, edges: Sequence[float] | None, train: Any
    ) -> None:
        days = frame["ts"].dt.date
        values = {d: g[column].to_numpy(np.float64) for d, g in frame.groupby(days, sort=True)}
        finite = {d: v[np.isfinite(v)] for d, v in values.items()}
        # The baseline: the first day with enough values, bucketed on the training edges (the
        # score: on that day's quantiles).
        baseline: tuple[date, list[float], npt.NDArray[np.int64]] | None = None
        base_day = next((d for d, v in finite.items() if v.size >= cfg.min_rows), None)
        if base_day is not None:
            b_edges = list(edges) if edges is not None else _quantile_edges(finite[base_day], cfg.score_bins)
            if b_edges is not None:
                baseline = (base_day, b_edges, bucket_counts(finite[base_day], b_edges))
        for d, v in finite.items():
            p_train = p_first = math.nan
            enough = v.size >= cfg.min_rows
            if enough and train is not None and edges is not None:
                p_train = psi(train, bucket_counts(v, edges), cfg.psi_epsilon)
            if enough and baseline is not None and d >= baseline[0]:
                p_first = psi(baseline[2], bucket_counts(v, baseline[1]), cfg.psi_epsilon)
            drifted = any(math.isfinite(p) and p > cfg.max_psi for p in (p_train, p_first))
            rows.append(
                {
                    "day": d,
                    "model_version": label,
                    "feature": name,
                    "kind": kind,
                    "rows": int(values[d].size),
                    "mean": float(v.mean()) if v.size else math.nan,
                    "psi_train": p_train,
                    "psi_first_day": p_first,
                    "status": "insufficient" if not enough else ("alert" if drifted else "ok"),
                }
            )

    for name in feature_columns(sample):
        stats = manifest.feature_stats.get(name)
        hist = stats.histogram if stats is not None else None
        series(
            sample,
            FEATURE_PREFIX + name,
            "feature",
            name,
            hist.edges if hist is not None else None,
            np.asarray(hist.counts, np.float64) if hist is not None else None,
        )
    series(mine, "score", "prediction", SCORE, None, None)
    return pd.DataFrame(rows, columns=list(DRIFT_COLUMNS))


def quality_row(impressions: int, clicks: int, completions: int, confidence: float = 0.95) -> dict[str, Any]:
    """Counts, CTR and completion rate with their intervals (the quality tables' columns)."""
    ctr = rate_interval(clicks, impressions, confidence)
    comp = rate_interval(completions, impressions, confidence)
    return {
        "impressions": impressions,
        "clicks": clicks,
        "completions": completions,
        "ctr": ctr[0],
        "ctr_low": ctr[1],
        "ctr_high": ctr[2],
        "completion_rate": comp[0],
        "completion_low": comp[1],
        "completion_high": comp[2],
    }


def rate_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Rate and Wilson score interval of ``successes`` out of ``trials`` (scipy's ``binomtest``).

    Returns:
        ``(rate, low, high)``; all NaN when ``trials`` is 0.
    """
    if trials <= 0:
        return math.nan, math.nan, math.nan
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return successes / trials, float(ci.low), float(ci.high)


def credit_events(impressions: pd.DataFrame, events: pd.DataFrame, window: pd.Timedelta) -> npt.NDArray[np.bool_]:
    """Which impressions (by position) an event of ``events`` is credited to.

    ``impressions`` needs ``ts``, ``user_id`` and ``item_id``; ``events`` needs ``timestamp``,
    ``user_id`` and ``item_id``. Each event goes to the latest impression of the same (user,
    item) at or before it, if that impression is at most ``window`` older.
    """
    hit = np.zeros(len(impressions), dtype=bool)
    if events.empty or impressions.empty:
        return hit
    right = pd.DataFrame(
        {
            "ts": impressions["ts"].astype("datetime64[ns, UTC]").to_numpy(),
            "user_id": impressions["user_id"].astype(np.int64).to_numpy(),
            "item_id": impressions["item_id"].astype(np.int64).to_numpy(),
            "_imp": np.arange(len(impressions)),
        }
    ).sort_values("ts", kind="stable")
    left = pd.DataFrame(
        {
            "ts": events["timestamp"].astype("datetime64[ns, UTC]").to_numpy(),
            "user_id": events["user_id"].astype(np.int64).to_numpy(),
            "item_id": events["item_id"].astype(np.int64).to_numpy(),
        }
    ).sort_values("ts", kind="stable")
    matched = pd.merge_asof(
        left, right, on="ts", by=["user_id", "item_id"], direction="backward", tolerance=window
    )
    idx = matched["_imp"].dropna().astype(np.int64).to_numpy()
    hit[idx] = True
    return hit


def quality_by_day(
    data_dir: str | os.PathLike[str] | None,
    *,
    config: DriftConfig | None = None,
    since: datetime | None = None,
    by: Sequence[str] = ("model_version",),
) -> pd.DataFrame:
    """Delayed-label quality of what was served: impressions, CTR and completion rate per day.

    Args:
        data_dir: StreamRec data directory (the request log and the events store).
        config: Label window and confidence (defaults: :class:`DriftConfig`).
        since: Start of the window (default: ``config.days`` before now).
        by: Grouping columns after ``day``: any of ``model_version``, ``variant``, ``level``.

    Returns:
        One row per day and group: ``day``, the ``by`` columns, then :data:`QUALITY_COLUMNS`
        (rates with their Wilson interval at ``config.confidence``).

    Raises:
        ConfigError: ``by`` names another column.
        DataNotFoundError: no request log in ``data_dir``.
    """
    from streamrec.data.store import DataStore

    cfg = config or DriftConfig()
    bad = [c for c in by if c not in _GROUPABLE]
    if bad:
        raise ConfigError(f"quality_by_day cannot group by {bad}: use any of {list(_GROUPABLE)}")
    keys = ["day", *by]
    require_request_log(data_dir)
    # Every served impression counts here, also those no ranker scored (fallback levels).
    imps = read_impressions(data_dir)
    imps = imps[imps["ts"] >= pd.Timestamp(_start(since, cfg.days))].reset_index(drop=True)
    if imps.empty:
        return pd.DataFrame(columns=[*keys, *QUALITY_COLUMNS])
    window = pd.Timedelta(hours=cfg.label_window_hours)
    store = DataStore(data_dir)
    events = store.events(
        start=imps["ts"].min().floor("us").to_pydatetime(),  # datetime has no nanoseconds
        end=(imps["ts"].max() + window).ceil("us").to_pydatetime() + timedelta(microseconds=1),
        columns=["user_id", "item_id", "event_type", "timestamp"],
    )
    imps["clicked"] = credit_events(imps, events[events["event_type"] == "click"], window)
    imps["completed"] = credit_events(imps, events[events["event_type"] == "complete"], window)
    imps["day"] = imps["ts"].dt.date
    labels_until = _labels_until(store)
    rows: list[dict[str, Any]] = []
    for key, g in imps.groupby(keys, sort=True, dropna=False):
        values = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        n, clicks, done = len(g), int(g["clicked"].sum()), int(g["completed"].sum())
        day: date = values["day"]
        day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        rows.append(
            {
                **values,
                **quality_row(n, clicks, done, cfg.confidence),
                "labels_complete": labels_until is not None and day_end + window <= labels_until,
            }
        )
    return pd.DataFrame(rows, columns=[*keys, *QUALITY_COLUMNS])


def _labels_until(store: DataStore) -> datetime | None:
    """The newest event time in the store: labels are known up to there."""
    dates = store.event_dates()
    if not dates:
        return None
    last = store.events(
        start=datetime(dates[-1].year, dates[-1].month, dates[-1].day, tzinfo=UTC), columns=["timestamp"]
    )
    return None if last.empty else pd.Timestamp(last["timestamp"].max()).floor("us").to_pydatetime()
