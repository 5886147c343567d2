"""Reading the event log's new lines as they are appended (a tail), for streamed engagement.

:class:`EventTail` reads the complete lines the event log's segments gained since its last read
(the durable log of ``POST /v1/events``, :mod:`streamrec.data.event_log`), as arrays of item
ids, event times, labels and receipt times (:class:`Engagement`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.features.transforms import derive_label
from streamrec.paths import DataLayout
from streamrec.timeutil import epoch_s

#: Most bytes read from the log per call (the rest waits for the next call).
MAX_READ_BYTES = 8 << 20


@dataclass(frozen=True)
class Engagement:
    """Events read from the log: item id, Unix time, label (1 engaged) and receipt time of each."""

    item_ids: np.ndarray
    timestamps: np.ndarray
    labels: np.ndarray
    received_at: np.ndarray

    def __len__(self) -> int:
        return int(self.item_ids.size)

    @classmethod
    def empty(cls) -> Engagement:
        """No events."""
        return cls(np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64), np.empty(0))

    def after(self, since: float) -> Engagement:
        """The events received after ``since`` (Unix seconds)."""
        keep = self.received_at > since
        return Engagement(
            self.item_ids[keep], self.timestamps[keep], self.labels[keep], self.received_at[keep]
        )


class EventTail:
    """Reads the complete lines appended to the event log's segments since the last read.

    Args:
        data_dir: The data directory (``<data_dir>/event_log/segments``).
        start: Where to start reading: ``exported`` (past the export's watermarks: the events
            the events store does not hold yet), ``start`` or ``end`` of every segment.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None, start: str = "exported") -> None:
        root = DataLayout.at(data_dir).event_log
        self.dir = root / "segments"
        self._offsets: dict[str, int] = {}
        if start == "end":
            self._offsets = {p.name: p.stat().st_size for p in self._segments()}
        elif start == "exported":
            try:
                marks = json.loads((root / "exported.json").read_text())
                self._offsets = {str(k): int(v) for k, v in marks.items()}
            except (OSError, ValueError, AttributeError):
                self._offsets = {}
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
        received: list[float] = []
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
            budget -= max(end, 1)
            self._offsets[seg.name] = start + end
            for line in data[:end].splitlines():
                rec = self._record(line)
                if rec is not None:
                    ids.append(rec[0])
                    stamps.append(rec[1])
                    labels.append(rec[2])
                    received.append(rec[3])
        for name in set(self._offsets) - present:  # pruned segments
            del self._offsets[name]
        return Engagement(
            np.asarray(ids, np.int64),
            np.asarray(stamps, np.float64),
            np.asarray(labels, np.int64),
            np.asarray(received, np.float64),
        )

    def read_all(self) -> Engagement:
        """:meth:`read` until the log has nothing more (a replica's load)."""
        parts = [self.read()]
        while len(parts[-1]):
            parts.append(self.read())
        return Engagement(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def _record(self, line: bytes) -> tuple[int, float, int, float] | None:
        try:
            rec: dict[str, Any] = json.loads(line)
            when = epoch_s(str(rec["timestamp"]))
            got = epoch_s(str(rec.get("received_at") or rec["timestamp"]))
            return int(rec["item_id"]), when, derive_label(str(rec["event_type"]), rec.get("rating")), got
        except (ValueError, KeyError, TypeError):
            self.bad_lines += 1
            return None


_FIELDS = ("item_ids", "timestamps", "labels", "received_at")
