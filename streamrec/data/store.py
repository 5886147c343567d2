"""Parquet storage of validated data under a data directory.

Layout (see :class:`streamrec.paths.DataLayout`)::

    users.parquet                      upserted by user_id
    items.parquet                      upserted by item_id
    events/event_date=YYYY-MM-DD/*.parquet   appended; event_id unique across the store
    ingest_manifest.json               sha256 of every file already ingested

Ingest is idempotent at two levels: a source file whose content hash is in the manifest is
skipped whole, and event ids already stored are never written twice. New days simply add new
partitions, so ingest is incremental.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from streamrec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, empty_frame, to_table
from streamrec.paths import DataLayout

PARTITION = "event_date"


@dataclass(frozen=True)
class AppendResult:
    """Outcome of :meth:`DataStore.append_events`."""

    added: int
    already_present: int


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a parquet file atomically (temp file + rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class DataStore:
    """Reads and writes the validated users, items and events of one data directory.

    Args:
        data_dir: The data directory (see :func:`streamrec.paths.resolve_data_dir`).
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.layout = DataLayout.at(data_dir)

    # ------------------------------------------------------------------ reads
    def users(self) -> pd.DataFrame:
        """All users (empty frame with the canonical columns if none were ingested)."""
        return self._read_dim(self.layout.users, USER_SCHEMA)

    def items(self) -> pd.DataFrame:
        """All items (empty frame with the canonical columns if none were ingested)."""
        return self._read_dim(self.layout.items, ITEM_SCHEMA)

    def event_dates(self) -> list[date]:
        """The event dates (partitions) present, sorted."""
        if not self.layout.events.is_dir():
            return []
        out = []
        for p in self.layout.events.iterdir():
            if p.is_dir() and p.name.startswith(f"{PARTITION}="):
                out.append(date.fromisoformat(p.name.split("=", 1)[1]))
        return sorted(out)

    def events(
        self,
        start: datetime | None = None,
        end: datetime | None = None,
        columns: list[str] | None = None,
    ) -> pd.DataFrame:
        """Events with ``start <= timestamp < end`` (either bound optional), sorted by time.

        Only the partitions that can hold matching rows are read.
        """
        files = self._event_files(start, end)
        if not files:
            frame = empty_frame(EVENT_SCHEMA)
            return frame[columns] if columns else frame
        dataset = ds.dataset(files, schema=EVENT_SCHEMA, format="parquet")
        flt = None
        if start is not None:
            flt = ds.field("timestamp") >= pa.scalar(_utc(start), type=EVENT_SCHEMA.field("timestamp").type)
        if end is not None:
            cond = ds.field("timestamp") < pa.scalar(_utc(end), type=EVENT_SCHEMA.field("timestamp").type)
            flt = cond if flt is None else flt & cond
        table = dataset.to_table(columns=columns, filter=flt)
        frame = table.to_pandas()
        if "timestamp" in frame.columns:
            frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
        return frame

    def count_events(self) -> int:
        """Number of stored events (reads parquet footers only)."""
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self._event_files(None, None))

    def stored_event_ids(self, dates: Iterable[date]) -> set[str]:
        """Event ids already stored in the given date partitions."""
        ids: set[str] = set()
        for d in dates:
            part = self._partition_dir(d)
            if part.is_dir():
                for f in sorted(part.glob("*.parquet")):
                    ids.update(pq.read_table(f, columns=["event_id"]).column(0).to_pylist())
        return ids

    # ----------------------------------------------------------------- writes
    def upsert_users(self, users: pd.DataFrame) -> int:
        """Insert or replace users by ``user_id``; returns how many ids were new."""
        return self._upsert_dim(self.layout.users, users, "user_id", USER_SCHEMA)

    def upsert_items(self, items: pd.DataFrame) -> int:
        """Insert or replace items by ``item_id``; returns how many ids were new."""
        return self._upsert_dim(self.layout.items, items, "item_id", ITEM_SCHEMA)

    def append_events(self, events: pd.DataFrame, *, assume_new: bool = False) -> AppendResult:
        """Append validated events, partitioned by event date, skipping ids already stored.

        Args:
            events: Frame in :data:`~streamrec.data.schema.EVENT_SCHEMA` (already validated;
                event ids unique within the frame).
            assume_new: Skip the lookup of stored ids (for generators that write fresh ids into
                an empty store in many chunks, where the lookup would cost O(n^2)).

        Returns:
            How many rows were written and how many were already present.
        """
        if events.empty:
            return AppendResult(0, 0)
        ts = pd.to_datetime(events["timestamp"], utc=True)
        day = ts.dt.date
        already = 0
        added = 0
        for d, chunk in events.groupby(day, sort=True):
            if not assume_new:
                stored = self.stored_event_ids([d])
                if stored:
                    mask = chunk["event_id"].isin(stored)
                    already += int(mask.sum())
                    chunk = chunk[~mask]
            if chunk.empty:
                continue
            digest = hashlib.sha256("\n".join(chunk["event_id"].astype(str)).encode()).hexdigest()[:16]
            _atomic_write_table(
                to_table(chunk, EVENT_SCHEMA), self._partition_dir(d) / f"part-{digest}.parquet"
            )
            added += len(chunk)
        return AppendResult(added, already)

    # --------------------------------------------------------------- manifest
    def manifest(self) -> dict[str, dict[str, object]]:
        """The ingest manifest: ``{sha256: {"source": ..., "ingested_at": ...}}``."""
        if not self.layout.manifest.is_file():
            return {}
        data: dict[str, dict[str, object]] = json.loads(self.layout.manifest.read_text())
        return data

    def record_ingested(self, digest: str, source: str, counts: dict[str, int]) -> None:
        """Remember that a source with content hash ``digest`` has been ingested."""
        man = self.manifest()
        man[digest] = {"source": source, "ingested_at": datetime.now(UTC).isoformat(), "counts": counts}
        self.layout.ensure()
        tmp = self.layout.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(man, indent=2))
        os.replace(tmp, self.layout.manifest)

    # ---------------------------------------------------------------- helpers
    def _partition_dir(self, d: date) -> Path:
        return self.layout.events / f"{PARTITION}={d.isoformat()}"

    def _event_files(self, start: datetime | None, end: datetime | None) -> list[str]:
        lo = _utc(start).date() if start is not None else None
        hi = _utc(end).date() if end is not None else None
        files: list[str] = []
        for d in self.event_dates():
            if (lo is not None and d < lo) or (hi is not None and d > hi):
                continue
            files.extend(str(f) for f in sorted(self._partition_dir(d).glob("*.parquet")))
        return files

    @staticmethod
    def _read_dim(path: Path, schema: pa.Schema) -> pd.DataFrame:
        if not path.is_file():
            return empty_frame(schema)
        return pq.read_table(path, schema=schema).to_pandas()

    def _upsert_dim(self, path: Path, new: pd.DataFrame, key: str, schema: pa.Schema) -> int:
        if new.empty:
            return 0
        self.layout.ensure()
        old = self._read_dim(path, schema)
        n_new = int((~new[key].isin(old[key])).sum()) if not old.empty else len(new)
        merged = new if old.empty else pd.concat([old[~old[key].isin(new[key])], new], ignore_index=True)
        merged = merged.sort_values(key, kind="stable").reset_index(drop=True)
        _atomic_write_table(to_table(merged, schema), path)
        return n_new


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 over the contents of ``paths`` (in the order given)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
