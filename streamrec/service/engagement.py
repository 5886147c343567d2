"""Streamed engagement in serving: the event log's new events reach the item table and trending.

Every replica tails the event log of its data directory (the segments ``POST /v1/events``
appends to, on any replica) and, once a second, counts the new events into its stages
(:meth:`~streamrec.funnel.core.Funnel.with_engagement`, copy-on-write): positives feed the
trending source, every event the item table's engagement columns the ranker reads. A replica
starts at the log's end: what came before is in the features and the events it loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.features.transforms import derive_label
from streamrec.paths import DataLayout

log = logging.getLogger(__name__)

#: Most bytes read from the log per call (the rest waits for the next second).
MAX_READ_BYTES = 8 << 20


@dataclass(frozen=True)
class Engagement:
    """Events read from the log: item id, Unix time and label (1 engaged) of each."""

    item_ids: np.ndarray
    timestamps: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.item_ids.size)


class EventTail:
    """Reads the complete lines appended to the event log's segments since the last read.

    Args:
        data_dir: The data directory (``<data_dir>/event_log/segments``).
        from_start: Read the segments from their start (default: from their current end).
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None, from_start: bool = False) -> None:
        self.dir = DataLayout.at(data_dir).event_log / "segments"
        self._offsets: dict[str, int] = {}
        if not from_start:
            self._offsets = {p.name: p.stat().st_size for p in self._segments()}
        self.bad_lines = 0

    def _segments(self) -> list[Path]:
        try:
            return sorted(self.dir.glob("seg-*.jsonl"))
        except OSError:
            return []

    def read(self) -> Engagement:
        """The events of the lines completed since the last call (a partial last line waits)."""
        ids: list[int] = []
        stamps: list[float] = []
        labels: list[int] = []
        budget = MAX_READ_BYTES
        present = set()
        for seg in self._segments():
            present.add(seg.name)
            start = self._offsets.get(seg.name, 0)
            try:
                size = seg.stat().st_size
                if size <= start or budget <= 0:
                    continue
                with open(seg, "rb") as fh:
                    fh.seek(start)
                    data = fh.read(min(size - start, budget))
            except OSError:  # pruned meanwhile
                continue
            end = data.rfind(b"\n") + 1
            budget -= end
            self._offsets[seg.name] = start + end
            for line in data[:end].splitlines():
                rec = self._record(line)
                if rec is not None:
                    ids.append(rec[0])
                    stamps.append(rec[1])
                    labels.append(rec[2])
        for name in set(self._offsets) - present:  # pruned segments
            del self._offsets[name]
        return Engagement(
            np.asarray(ids, np.int64), np.asarray(stamps, np.float64), np.asarray(labels, np.int64)
        )

    def _record(self, line: bytes) -> tuple[int, float, int] | None:
        try:
            rec: dict[str, Any] = json.loads(line)
            when = datetime.fromisoformat(str(rec["timestamp"])).timestamp()
            return int(rec["item_id"]), when, derive_label(str(rec["event_type"]), rec.get("rating"))
        except (ValueError, KeyError, TypeError):
            self.bad_lines += 1
            return None


class EngagementSync:
    """One replica's tail of the event log, applied to the stages it serves.

    Args:
        data_dir: The data directory.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        self.tail = EventTail(data_dir)
        self.events_applied = 0
        self.apply_errors = 0

    async def apply(self, stages: Sequence[Any]) -> int:
        """Count the log's new events into each of ``stages`` (worker threads); returns how many."""
        try:
            new = await asyncio.to_thread(self.tail.read)
        except OSError as err:
            log.warning("event log unreadable for streamed engagement: %s", err)
            return 0
        if not len(new):
            return 0
        for s in stages:
            apply = getattr(s, "apply_engagement", None)
            if s is None or apply is None:
                continue
            try:
                await asyncio.to_thread(apply, new.item_ids, new.timestamps, new.labels)
            except Exception as err:  # keep serving the previous values
                self.apply_errors += 1
                log.warning("streamed engagement not applied: %s: %s", type(err).__name__, err)
        self.events_applied += len(new)
        return len(new)

    def snapshot(self) -> dict[str, Any]:
        """Facts for ``/v1/admin/status``."""
        return {
            "events_applied": self.events_applied,
            "apply_errors": self.apply_errors,
            "bad_lines": self.tail.bad_lines,
        }
