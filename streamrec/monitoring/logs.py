"""The sampled request and impression log: what serving did, for skew, drift and experiments.

A sampled request writes one row to ``requests`` (who, when, which model and variant, the level
that served, why, latency), one row per served item to ``impressions`` (position, score,
sources, and the ranker's input features of that item as ``f_<feature>`` columns; absent when
no ranker scored it, e.g. at the ``batch`` level), and a few rows to ``scored``: the ranker's
inputs of candidates drawn uniformly from all it scored, the unbiased sample the skew check
compares with training (served items are the top of the ranking, not a sample of its inputs).
Files are parquet under ``<data_dir>/monitoring/<table>/date=YYYY-MM-DD/``, one per flush per
replica.

The request path only appends to a bounded in-memory queue (:meth:`RequestLog.record`); a
writer thread flushes it every few seconds. When the writer falls behind, new rows are dropped
and counted (``streamrec_request_log_dropped_total``): the log never slows a request down.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from streamrec.config import StrictModel
from streamrec.paths import DataLayout

log = logging.getLogger(__name__)

#: Request id of the request being served (set by the gateway, read by the request log).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("streamrec_request_id", default="")

#: Prefix of the ranker-input feature columns of the impressions table.
FEATURE_PREFIX = "f_"

#: Columns every table's rows carry about their request.
REQUEST_KEYS: tuple[str, ...] = ("request_id", "ts", "user_id", "variant", "model_version", "level")
REQUEST_COLUMNS: tuple[str, ...] = (*REQUEST_KEYS, "reason", "latency_ms", "k", "n_items")
IMPRESSION_COLUMNS: tuple[str, ...] = (*REQUEST_KEYS, "item_id", "position", "score", "sources")


SCORED_COLUMNS: tuple[str, ...] = ("request_id", "ts", "user_id", "variant", "model_version")
#: Columns of the ``shadow`` table: one row per shadow run (:mod:`streamrec.experiments.shadow`).
SHADOW_COLUMNS: tuple[str, ...] = (
    "request_id",
    "ts",
    "user_id",
    "model_version",
    "shadow_version",
    "latency_ms",
    "error",
    "common",
    "correlation",
    "production_scores",
    "shadow_scores",
)


class RequestLogConfig(StrictModel):
    """Sampling and buffering of the request / impression log (``args.request_log``).

    Attributes:
        sample_rate: Fraction of recommend requests logged (0 turns the log off).
        flush_interval_s: Seconds between the writer's flushes.
        max_pending: Requests buffered in memory at most; beyond it new ones are dropped and counted.
    """

    sample_rate: float = Field(default=0.1, ge=0, le=1)
    flush_interval_s: float = Field(default=5.0, gt=0)
    max_pending: int = Field(default=5_000, ge=1)


@dataclass
class ServedRecord:
    """One sampled response as the log keeps it.

    Attributes:
        items: ``(item_id, score, sources)`` per served item, in served order.
        features: Ranker inputs by item id (rows of ``feature_names``), for the items a ranker scored.
        scored: Ranker input rows (``feature_names``) of candidates sampled over all it scored.
    """

    request_id: str
    ts: float
    user_id: int
    variant: str | None
    model_version: str
    level: str
    reason: str | None
    latency_ms: float
    k: int
    items: list[tuple[int, float, Sequence[str]]]
    feature_names: tuple[str, ...] = ()
    features: dict[int, np.ndarray] = field(default_factory=dict)
    scored: np.ndarray | None = None


def log_dir(data_dir: str | os.PathLike[str] | None, table: str) -> Path:
    """``<data_dir>/monitoring/<table>`` (``requests``, ``impressions`` or ``scored``)."""
    return DataLayout.at(data_dir).root / "monitoring" / table


class RequestLog:
    """Samples responses into a bounded queue; a writer thread writes them as parquet.

    Args:
        data_dir: StreamRec data directory.
        config: Sampling and buffering.
        on_drop: Called with the number of rows dropped (e.g. ``ServingMetrics.log_dropped``).
        start: Start the writer thread (tests flush by hand with ``start=False``).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        config: RequestLogConfig | None = None,
        *,
        on_drop: Any = None,
        start: bool = True,
    ) -> None:
        self.config = config or RequestLogConfig()
        self.root = DataLayout.at(data_dir).root / "monitoring"
        self._pending: deque[ServedRecord] = deque()
        self._shadow: deque[dict[str, Any]] = deque()
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self.logged = 0
        self.dropped = 0
        self.written = 0
        self._thread: threading.Thread | None = None
        if start and self.config.sample_rate > 0:
            self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
            self._thread.start()

    def sampled(self) -> bool:
        """Whether to log the current request (a Bernoulli draw at ``sample_rate``)."""
        rate = self.config.sample_rate
        return rate >= 1.0 or (rate > 0 and random.random() < rate)

    def record_shadow(self, row: dict[str, Any]) -> None:
        """Queue one shadow run's row (:data:`SHADOW_COLUMNS`, ``ts`` in epoch seconds) (never blocks)."""
        with self._lock:
            if len(self._shadow) >= self.config.max_pending:
                self.dropped += 1
                dropped = True
            else:
                self._shadow.append(row)
                dropped = False
        if dropped and self._on_drop is not None:
            self._on_drop(1)

    def record(self, rec: ServedRecord) -> None:
        """Queue one response (never blocks; dropped and counted when the queue is full)."""
        with self._lock:
            if len(self._pending) >= self.config.max_pending:
                self.dropped += 1
                dropped = True
            else:
                self._pending.append(rec)
                self.logged += 1
                dropped = False
        if dropped and self._on_drop is not None:
            self._on_drop(1)

    # ------------------------------------------------------------------ writer
    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.config.flush_interval_s):
            try:
                self.flush()
            except Exception as err:  # a full disk must not kill the writer; rows stay queued
                if not failing:
                    log.warning("request log flush failed (%s: %s); retrying", type(err).__name__, err)
                failing = True
            else:
                if failing:
                    log.warning("request log flushes again")
                failing = False

    def flush(self) -> int:
        """Write everything queued now, all three tables or none; the number of requests written.

        Raises:
            OSError: a file could not be written (a full disk): nothing of this flush is left
                on disk and its rows stay queued for the next one.
        """
        with self._flush_lock:
            with self._lock:
                batch = list(self._pending)
                shadow = list(self._shadow)
            if not batch and not shadow:
                return 0
            try:
                frames = (*to_frames(batch), _shadow_frame(shadow))
            except Exception as err:  # rows that cannot be tabulated would block the queue forever
                log.error("request log: dropping %d rows that cannot be written: %s", len(batch), err)
                self._take(len(batch), len(shadow))
                self.dropped += len(batch)
                if self._on_drop is not None:
                    self._on_drop(len(batch))
                return 0
            day = datetime.fromtimestamp(batch[-1].ts if batch else shadow[-1]["ts"], UTC).strftime("%Y-%m-%d")
            self._seq += 1
            name = f"{self._name}-{int(time.time() * 1e3)}-{self._seq:06d}.parquet"
            staged: list[tuple[Path, Path]] = []
            try:
                for table, frame in zip(("requests", "impressions", "scored", "shadow"), frames, strict=True):
                    if frame.empty:
                        continue
                    d = self.root / table / f"date={day}"
                    d.mkdir(parents=True, exist_ok=True)
                    staged.append((d / f".{name}.tmp", d / name))
                    frame.to_parquet(staged[-1][0], index=False)
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise
            for tmp, final in staged:  # renames in place: readers never see a half-written file
                os.replace(tmp, final)
            self._take(len(batch), len(shadow))
            self.written += len(batch)
            return len(batch)

    def _take(self, n: int, n_shadow: int = 0) -> None:
        with self._lock:
            for _ in range(n):
                self._pending.popleft()
            for _ in range(n_shadow):
                self._shadow.popleft()

    def close(self) -> None:
        """Stop the writer and write what is queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception as err:
            log.warning("request log: last flush failed (%s: %s)", type(err).__name__, err)

    def snapshot(self) -> dict[str, Any]:
        """Counters for the admin status."""
        with self._lock:
            pending = len(self._pending)
        return {
            "sample_rate": self.config.sample_rate,
            "logged": self.logged,
            "written": self.written,
            "pending": pending,
            "dropped": self.dropped,
            "dir": str(self.root),
        }


def to_frames(records: Sequence[ServedRecord]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The ``requests``, ``impressions`` and ``scored`` rows of ``records``.

    Built column-wise (one array per column and feature layout), not a dict per row: the writer
    thread holds the GIL while it builds them, and a request waiting for it pays that time.
    """
    ts = pd.to_datetime(np.asarray([r.ts for r in records], np.float64), unit="s", utc=True)
    requests = pd.DataFrame(
        {
            "request_id": [r.request_id for r in records],
            "ts": ts,
            "user_id": np.asarray([r.user_id for r in records], np.int64),
            "variant": [r.variant for r in records],
            "model_version": [r.model_version for r in records],
            "level": [r.level for r in records],
            "reason": [r.reason for r in records],
            "latency_ms": np.asarray([r.latency_ms for r in records], np.float64),
            "k": np.asarray([r.k for r in records], np.int64),
            "n_items": np.asarray([len(r.items) for r in records], np.int64),
        },
        columns=list(REQUEST_COLUMNS),
    )
    imp_parts: list[pd.DataFrame] = []
    scored_parts: list[pd.DataFrame] = []
    by_layout: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(records):
        by_layout.setdefault(r.feature_names if r.features or r.scored is not None else (), []).append(i)
    for names, idx in by_layout.items():
        group = [records[i] for i in idx]
        counts = np.asarray([len(r.items) for r in group], np.int64)
        if counts.sum():
            imp = _repeat(group, ts[idx], counts)
            imp["item_id"] = np.asarray([it[0] for r in group for it in r.items], np.int64)
            imp["position"] = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
            imp["score"] = np.asarray([it[1] for r in group for it in r.items], np.float64)
            imp["sources"] = [",".join(it[2]) for r in group for it in r.items]
            if names:
                width = len(names)
                rows = np.full((int(counts.sum()), width), np.nan, np.float32)
                at = 0
                for r in group:
                    for j, it in enumerate(r.items):
                        f = r.features.get(int(it[0]))
                        if f is not None:
                            rows[at + j] = f
                    at += len(r.items)
                imp = pd.concat([imp, pd.DataFrame(rows, columns=[FEATURE_PREFIX + n for n in names])], axis=1)
            imp_parts.append(imp)
        sampled = [(k, r) for k, r in zip(idx, group, strict=True) if r.scored is not None and len(r.scored)]
        if names and sampled:
            n_rows = np.asarray([len(r.scored) for _, r in sampled], np.int64)  # type: ignore[arg-type]
            sc = _repeat([r for _, r in sampled], ts[[k for k, _ in sampled]], n_rows)
            sc = sc[list(SCORED_COLUMNS)]
            values = np.concatenate([np.asarray(r.scored, np.float32) for _, r in sampled])
            scored_parts.append(
                pd.concat([sc, pd.DataFrame(values, columns=[FEATURE_PREFIX + n for n in names])], axis=1)
            )
    impressions = (
        pd.concat(imp_parts, ignore_index=True, sort=False) if imp_parts else pd.DataFrame(columns=list(IMPRESSION_COLUMNS))
    )
    scored = (
        pd.concat(scored_parts, ignore_index=True, sort=False)
        if scored_parts
        else pd.DataFrame(columns=list(SCORED_COLUMNS))
    )
    return requests, impressions, scored


def _shadow_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The ``shadow`` table of queued rows (``ts`` in epoch seconds, as queued)."""
    frame = pd.DataFrame(list(rows), columns=list(SHADOW_COLUMNS))
    frame["ts"] = pd.to_datetime(frame["ts"].astype(np.float64), unit="s", utc=True)
    return frame


def _repeat(group: Sequence[ServedRecord], ts: pd.DatetimeIndex, counts: npt.NDArray[np.int64]) -> pd.DataFrame:
    """The per-request columns of ``group``, each request's value repeated ``counts`` times."""
    return pd.DataFrame(
        {
            "request_id": np.repeat(np.asarray([r.request_id for r in group], object), counts),
            "ts": np.repeat(ts, counts),
            "user_id": np.repeat(np.asarray([r.user_id for r in group], np.int64), counts),
            "variant": np.repeat(np.asarray([r.variant for r in group], object), counts),
            "model_version": np.repeat(np.asarray([r.model_version for r in group], object), counts),
            "level": np.repeat(np.asarray([r.level for r in group], object), counts),
        }
    )


def _read(
    table: str, data_dir: str | os.PathLike[str] | None, columns: tuple[str, ...], since: datetime | None = None
) -> pd.DataFrame:
    files = sorted(log_dir(data_dir, table).glob("date=*/*.parquet"))
    if since is not None:  # a flush is filed under its last row's day: keep one day of slack
        first = (pd.Timestamp(since).tz_localize(None) - pd.Timedelta(days=1)).strftime("%Y-%m-%d")
        files = [f for f in files if f.parent.name[len("date=") :] >= first]
    frames = [pd.read_parquet(f) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        out = pd.DataFrame(columns=list(columns))
        out["ts"] = pd.to_datetime(out["ts"], utc=True)
        return out
    out = pd.concat(frames, ignore_index=True, sort=False)
    out["ts"] = pd.to_datetime(out["ts"], utc=True)
    if since is not None:
        start = pd.Timestamp(since)
        out = out[out["ts"] >= (start.tz_localize("UTC") if start.tzinfo is None else start)]
    return out.sort_values("ts", kind="stable").reset_index(drop=True)


def read_requests(data_dir: str | os.PathLike[str] | None, since: datetime | None = None) -> pd.DataFrame:
    """Logged requests from ``since`` on (columns :data:`REQUEST_COLUMNS`; empty when none).

    Only the day partitions that can hold them are read.
    """
    return _read("requests", data_dir, REQUEST_COLUMNS, since)


def read_impressions(data_dir: str | os.PathLike[str] | None, since: datetime | None = None) -> pd.DataFrame:
    """Logged impressions from ``since`` on: :data:`IMPRESSION_COLUMNS` plus ``f_<feature>`` columns."""
    return _read("impressions", data_dir, IMPRESSION_COLUMNS, since)


def read_shadow(data_dir: str | os.PathLike[str] | None, since: datetime | None = None) -> pd.DataFrame:
    """The shadow runs (:data:`SHADOW_COLUMNS`), oldest first."""
    return _read("shadow", data_dir, SHADOW_COLUMNS, since)


def read_scored(data_dir: str | os.PathLike[str] | None, since: datetime | None = None) -> pd.DataFrame:
    """Logged samples of scored candidates from ``since`` on: :data:`SCORED_COLUMNS` plus ``f_<feature>``."""
    return _read("scored", data_dir, SCORED_COLUMNS, since)


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """The ranker-input feature names present in an impressions frame (prefix removed)."""
    return [c[len(FEATURE_PREFIX) :] for c in frame.columns if c.startswith(FEATURE_PREFIX)]
