"""The logged side of an experiment: the request log joined with the events, summarised per variant.

Impressions come from the sampled request log (:mod:`streamrec.monitoring.logs`); clicks and
completions from the events store and the API's event log (not yet exported), credited to the
latest impression of the same user and item within the label window. :func:`analyse_experiment`
feeds them to :func:`streamrec.experiments.analysis.analyse`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from streamrec.errors import DataNotFoundError
from streamrec.experiments.analysis import (
    ANSWERED_LEVELS,
    LABEL_WINDOW_HOURS,
    REQUEST_FRAME_COLUMNS,
    ExperimentAnalysis,
    VariantSummary,
    analyse,
    summarise,
)
from streamrec.experiments.config import ExperimentConfig
from streamrec.monitoring.drift import credit_events
from streamrec.monitoring.logs import log_dir, read_impressions, read_requests
from streamrec.paths import DataLayout


# ------------------------------------------------------------------------------------ from logs
@dataclass(frozen=True)
class ExperimentLog:
    """The experiment's part of the request log, labelled.

    Attributes:
        requests: Logged requests with a variant (columns of ``read_requests``).
        impressions: Their impressions with ``clicked`` and ``completed`` (bool) credited.
        n_items: Catalogue size (None when the store has no items).
    """

    requests: pd.DataFrame
    impressions: pd.DataFrame
    n_items: int | None

    def request_frame(self) -> pd.DataFrame:
        """One row per request in :data:`REQUEST_FRAME_COLUMNS` (what :func:`summarise` takes)."""
        req = self.requests
        imps = self.impressions
        per = imps.groupby("request_id", sort=False).agg(
            impressions=("item_id", "size"), clicks=("clicked", "sum"), completions=("completed", "sum")
        )
        items = imps.groupby("request_id", sort=False)["item_id"].agg(list)
        out = pd.DataFrame(
            {
                "request_id": req["request_id"].to_numpy(),
                "ts": req["ts"].to_numpy(),
                "variant": req["variant"].astype(str).to_numpy(),
                "user_id": req["user_id"].to_numpy(),
                "latency_ms": pd.to_numeric(req["latency_ms"], errors="coerce").to_numpy(np.float64),
                "error": ~req["level"].isin(ANSWERED_LEVELS).to_numpy(),
            }
        )
        for col in ("impressions", "clicks", "completions"):
            out[col] = out["request_id"].map(per[col]).fillna(0).astype(np.int64).to_numpy()
        out["items"] = [v if isinstance(v, list) else [] for v in out["request_id"].map(items)]
        return out[list(REQUEST_FRAME_COLUMNS)]


def load_experiment_log(
    data_dir: str | os.PathLike[str] | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    label_window_hours: float = LABEL_WINDOW_HOURS,
) -> ExperimentLog:
    """The logged requests of the experiment's variants, their impressions and credited labels.

    Clicks and completions come from the events store and from the API's event log (the events
    not yet exported by ``streamrec data export-events``), de-duplicated by ``event_id``. Each is
    credited to the latest logged impression of the same user and item at most
    ``label_window_hours`` before it (any logged impression, so an event after a request outside
    the experiment is not credited to an older one inside it). The log is sampled: an event
    following an unlogged request may be credited to an earlier logged impression of that item.

    Args:
        data_dir: StreamRec data directory.
        since: First request time (default: the whole log).
        until: Requests before this time only (default: no end).
        label_window_hours: How long after an impression its click or completion counts.

    Raises:
        DataNotFoundError: no request log in ``data_dir``.
    """
    from streamrec.data.store import DataStore

    root = DataLayout.at(data_dir).root
    requests = read_requests(root, since)
    if requests.empty and not any(log_dir(root, "requests").glob("date=*/*.parquet")):
        raise DataNotFoundError(
            f"no request log in {log_dir(root, 'requests')}: set request_log.sample_rate in the Serve "
            "config (args.request_log), send traffic and wait for a flush before analysing"
        )
    impressions = read_impressions(root, since)
    impressions = impressions[[c for c in impressions.columns if not c.startswith("f_")]]
    if until is not None:
        end = pd.Timestamp(until if until.tzinfo else until.replace(tzinfo=UTC))
        requests = requests[requests["ts"] < end]
        impressions = impressions[impressions["ts"] < end]
    window = pd.Timedelta(hours=label_window_hours)
    impressions = impressions.reset_index(drop=True)
    clicked = np.zeros(len(impressions), dtype=bool)
    completed = np.zeros(len(impressions), dtype=bool)
    if not impressions.empty:
        start = impressions["ts"].min().floor("us").to_pydatetime()
        end_ts = (impressions["ts"].max() + window).ceil("us").to_pydatetime() + timedelta(microseconds=1)
        events = _events(root, start, end_ts)
        clicked = credit_events(impressions, events[events["event_type"] == "click"], window)
        completed = credit_events(impressions, events[events["event_type"] == "complete"], window)
    impressions = impressions.assign(clicked=clicked, completed=completed)
    store = DataStore(root)
    n_items = len(store.items())
    in_experiment = requests["variant"].notna()
    requests = requests[in_experiment].reset_index(drop=True)
    impressions = impressions[impressions["variant"].notna()].reset_index(drop=True)
    return ExperimentLog(requests, impressions, n_items or None)


def _events(root: Any, start: datetime, end: datetime) -> pd.DataFrame:
    """Events in ``[start, end)`` of the store and of the API's event log, unique by ``event_id``."""
    from streamrec.data.event_log import EventLog
    from streamrec.data.store import DataStore

    columns = ["event_id", "user_id", "item_id", "event_type", "timestamp"]
    frames = [DataStore(root).events(start=start, end=end, columns=columns)]
    layout = DataLayout.at(root)
    if (layout.event_log / "segments").is_dir():  # read only: no catch-up of ids, nothing written
        api = EventLog(layout.event_log, load_existing=False)
        try:
            logged = api.read()
        finally:
            api.close()
        if not logged.empty:
            logged = logged[columns].dropna(subset=["user_id", "item_id", "timestamp"])
            ts = pd.to_datetime(logged["timestamp"], utc=True)
            frames.append(logged[(ts >= pd.Timestamp(start)) & (ts < pd.Timestamp(end))])
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    events = pd.concat(frames, ignore_index=True)
    events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
    return events.drop_duplicates("event_id", keep="first").reset_index(drop=True)


def load_summaries(
    data_dir: str | os.PathLike[str] | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    label_window_hours: float = LABEL_WINDOW_HOURS,
    seed: int = 0,
) -> dict[str, VariantSummary]:
    """Per-variant summaries of the logged experiment traffic (see :func:`load_experiment_log`).

    Requests logged without a variant (no experiment running) are left out.

    Raises:
        DataNotFoundError: no request log in ``data_dir``.
    """
    log = load_experiment_log(data_dir, since=since, until=until, label_window_hours=label_window_hours)
    return summarise(log.request_frame(), seed=seed)


def analyse_experiment(
    data_dir: str | os.PathLike[str] | None,
    config: ExperimentConfig,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    expected_share: float,
    label_window_hours: float = LABEL_WINDOW_HOURS,
) -> ExperimentAnalysis:
    """:func:`load_summaries` then :func:`analyse`.

    Raises:
        DataNotFoundError: no request log, or no control or treatment requests in it.
    """
    log = load_experiment_log(data_dir, since=since, until=until, label_window_hours=label_window_hours)
    return analyse(summarise(log.request_frame()), config, expected_share, log.n_items)
