"""Export of the event log to the events store, and pruning of exported segments.

:func:`export_to_store` moves logged events (:mod:`streamrec.data.event_log`) into the validated
events store (:meth:`streamrec.data.store.DataStore.append_events`, through the data contract)
for the next training run; it is incremental (a byte watermark per segment, ``exported.json``)
and safe to re-run. Users named by exported events but absent from the users table (new users)
are first added to it (:func:`implicit_users`: ``signup_at`` = their first event, demographics
unknown), so an acknowledged event is never quarantined as ``unknown_user`` and the next feature
build and training know the user; a later ingest carrying the user's profile replaces that row.

:func:`prune` deletes the segments that are fully exported and untouched for the retention
period (default :data:`DEFAULT_RETAIN_DAYS`); a segment not yet exported is never deleted.
:func:`export_event_log` is what ``streamrec data export-events`` and the daily ``streamrec
retrain`` run: the export, then the prune.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.config import utc_stamp
from streamrec.data.catalogue import CatalogueView, new_item_rows
from streamrec.data.contract import quarantine_rows, validate_events
from streamrec.data.event_log import APPEND_LOCK, EventLog, fsync_dir, records_frame
from streamrec.data.store import DataStore
from streamrec.errors import ConfigError
from streamrec.paths import DataLayout, exclusive_file_lock
from streamrec.timeutil import utc

log = logging.getLogger(__name__)

#: Default retention of exported segments (days since their last write).
DEFAULT_RETAIN_DAYS = 7.0
#: The shortest retention :func:`prune` accepts: it must outlast
#: :data:`~streamrec.data.event_log.SEGMENT_MAX_AGE_S` with a margin for clock differences
#: between nodes.
MIN_RETAIN_DAYS = 1.0
#: Held by an export or a prune, in the log's directory (they take turns).
EXPORT_LOCK = "export.lock"
#: The export watermarks, in the log's directory: bytes of each segment already exported.
WATERMARKS = "exported.json"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_to_store` did.

    Attributes:
        read: Complete log lines read past the watermarks.
        duplicates: Lines whose ``event_id`` repeated within the export (kept once).
        added: Events written to the events store.
        already_present: Events the store already held.
        quarantined: Events refused by the data contract (written to the quarantine).
        corrupt_lines: Lines that could not be parsed (written to the quarantine).
        quarantine_path: The quarantine file, when one was written.
        new_users: Users added to the users table because exported events named them (new
            users created implicitly by their first events).
        new_items: Items added to the items table from the catalogue log (items upserted
            while serving, :mod:`streamrec.data.catalogue`), so that training knows them.
    """

    read: int
    duplicates: int
    added: int
    already_present: int
    quarantined: int
    corrupt_lines: int
    quarantine_path: str | None = None
    new_users: int = 0
    new_items: int = 0


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        deleted: Segments deleted (fully exported, untouched for the retention period).
        deleted_bytes: Their size.
        kept: Segments kept.
        kept_not_exported: Of those, segments with lines not yet exported (never deleted).
    """

    deleted: int
    deleted_bytes: int
    kept: int
    kept_not_exported: int


def implicit_users(events: pd.DataFrame, known_users: np.ndarray | Iterable[int]) -> pd.DataFrame:
    """Rows of the users table for the users of ``events`` not in ``known_users``.

    A new user is created by their first events: ``signup_at`` is the earliest of their event
    timestamps; demographics are unknown (null, the features' defaults), as for users derived
    from a ratings file.

    Args:
        events: Events with ``user_id`` and ``timestamp`` (nulls ignored).
        known_users: Ids already in the users table.
    """
    ok = events[events["user_id"].notna() & events["timestamp"].notna()]
    known = np.asarray(list(known_users) if not isinstance(known_users, np.ndarray) else known_users)
    ok = ok[~ok["user_id"].isin(known)]
    if ok.empty:
        return pd.DataFrame(
            {"user_id": pd.Series(dtype="int64"), "signup_at": pd.Series(dtype="datetime64[ns, UTC]")}
        )
    first = ok.groupby(ok["user_id"].astype("int64"))["timestamp"].min()
    return pd.DataFrame(
        {
            "user_id": first.index.to_numpy(dtype=np.int64),
            "signup_at": pd.to_datetime(first.to_numpy(), utc=True),
        }
    )


def _export_now(records: list[dict[str, Any]], now: datetime | None) -> datetime:
    """The contract's "now" for exporting ``records``: the latest receipt time if it is later.

    The API accepted each event up to five minutes ahead of the receiving gateway's clock; an
    exporter whose clock is behind that gateway's must not quarantine what was acknowledged.
    """
    ref = now or datetime.now(UTC)
    for rec in records:
        try:
            got = utc(str(rec.get("received_at")))
        except ValueError:
            continue
        if got > ref:
            ref = got
    return ref


def export_to_store(
    event_log: EventLog, store: DataStore | None = None, now: datetime | None = None
) -> ExportResult:
    """Append logged events not yet exported to the validated events store.

    Reads every segment from its watermark up to its last complete line, removes repeated
    ids, applies the data contract (:func:`~streamrec.data.contract.validate_events`; refused
    and unparseable lines go to ``quarantine/event_log-<utc>.parquet``), appends the valid
    rows with :meth:`DataStore.append_events` (which skips ids already stored), then advances
    the watermarks. Users the events name that the users table lacks (new users) are added to
    it first (:func:`implicit_users`), and items upserted while serving (the catalogue log) join
    the items table, so their events are stored, not quarantined. Safe to re-run and to run while
    replicas keep appending; exports and prunes take turns (``export.lock``).

    Args:
        event_log: The event log.
        store: The events store (default: the data directory holding the log).
        now: Reference time of the contract's future-timestamp rule.
    """
    with exclusive_file_lock(event_log.root / EXPORT_LOCK):
        return _export(event_log, store or DataStore(event_log.root.parent), now)


def _export(event_log: EventLog, store: DataStore, now: datetime | None) -> ExportResult:
    marks = _marks(event_log.root)
    records: list[dict[str, Any]] = []
    corrupt: list[str] = []
    new_marks: dict[str, int] = {}  # segments deleted by hand drop out of the manifest
    for seg in event_log.segments():
        start = marks.get(seg.name, 0)
        try:
            with open(seg, "rb") as fh:
                fh.seek(start)
                data = fh.read()
        except FileNotFoundError:  # removed meanwhile (an operator cleaning up)
            continue
        end = data.rfind(b"\n") + 1  # complete lines only: a writer may be mid-append
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append(rec)
            except ValueError:
                corrupt.append(line.decode(errors="replace"))
        new_marks[seg.name] = start + end
    frame = records_frame(records)
    before = len(frame)
    frame = frame.drop_duplicates("event_id", keep="first").reset_index(drop=True)
    dups = before - len(frame)
    users = store.users()["user_id"].to_numpy(dtype=np.int64)
    items = store.items()["item_id"].to_numpy(dtype=np.int64)
    # Items upserted while serving (the catalogue log) join the items table first: events
    # naming them are then stored, and the next training knows them.
    added = new_item_rows(CatalogueView(store.layout.root).state.items, items, now)
    if added:
        store.upsert_items(pd.DataFrame(added))
        items = np.union1d(items, [r["item_id"] for r in added])
    # Users the store lacks are new users, created by these events: they count as known for the
    # contract, and those with a valid event join the users table before their events do.
    candidates = implicit_users(frame, users)
    result = validate_events(
        frame,
        np.union1d(users, candidates["user_id"].to_numpy(dtype=np.int64)),
        items,
        source=str(event_log.root),
        now=_export_now(records, now),
    )
    new_users = candidates[candidates["user_id"].isin(result.valid["user_id"])]
    if len(new_users):  # re-read: never replace a profile an ingest stored meanwhile
        new_users = new_users[~new_users["user_id"].isin(store.users()["user_id"])]
        store.upsert_users(new_users)
    appended = store.append_events(result.valid) if len(result.valid) else None
    qpath: str | None = None
    quarantine = result.quarantined
    if corrupt:
        extra = quarantine_rows(
            "events", str(event_log.root), [None] * len(corrupt), ["malformed_line"] * len(corrupt), corrupt
        )
        quarantine = pd.concat([quarantine, extra], ignore_index=True)
    if len(quarantine):
        layout = DataLayout(store.layout.root)
        layout.quarantine.mkdir(parents=True, exist_ok=True)
        path = layout.quarantine / f"event_log-{utc_stamp()}-{secrets.token_hex(3)}.parquet"
        quarantine.astype({"line": "Int64"}).to_parquet(path, index=False)
        qpath = str(path)
    _write_marks(event_log.root, new_marks)
    return ExportResult(
        read=before + len(corrupt),
        duplicates=dups,
        added=appended.added if appended else 0,
        already_present=appended.already_present if appended else 0,
        quarantined=len(result.quarantined),
        corrupt_lines=len(corrupt),
        quarantine_path=qpath,
        new_users=len(new_users),
        new_items=len(added),
    )


def _marks(root: Path) -> dict[str, int]:
    """The export watermarks of the log at ``root``: segment name -> bytes already exported."""
    path = root / WATERMARKS
    if not path.is_file():
        return {}
    try:
        marks: dict[str, int] = json.loads(path.read_text())
    except ValueError as err:
        # Unreadable marks must not stop every export and retrain: start over. Re-exported
        # rows are recognised by their event ids (``already_present``), and prune keeps
        # every segment until a fresh export has marked it.
        log.warning("export watermarks %s are unreadable (%s); exporting the whole log again", path, err)
        return {}
    return marks


def _write_marks(root: Path, marks: dict[str, int]) -> None:
    path = root / WATERMARKS
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:  # durable before the rename: a crash leaves the old or the new
        fh.write(json.dumps(marks, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def prune(
    event_log: EventLog, retain_days: float = DEFAULT_RETAIN_DAYS, now: datetime | None = None
) -> PruneResult:
    """Delete the segments that are fully exported and were last written ``retain_days`` ago.

    Safe while replicas keep appending: writers rotate before a segment is
    :data:`~streamrec.data.event_log.SEGMENT_MAX_AGE_S` old, so none writes to a segment this old
    again. A segment with lines not yet exported is kept whatever its age (run
    :func:`export_to_store` first); a final line without its newline (a torn write, never
    acknowledged) does not count as unexported. Replicas forget the deleted segments' ids at
    their next append.

    Args:
        event_log: The event log.
        retain_days: Days since a segment's last write before it may go (at least
            :data:`MIN_RETAIN_DAYS`).
        now: Reference time (default: now).

    Raises:
        ConfigError: ``retain_days`` is shorter than :data:`MIN_RETAIN_DAYS`.
    """
    if not retain_days >= MIN_RETAIN_DAYS:
        raise ConfigError(
            f"event log retention must be at least {MIN_RETAIN_DAYS:g} day(s), got {retain_days!r}: "
            "writers may still append to younger segments"
        )
    cutoff = (now or datetime.now(UTC)).timestamp() - retain_days * 86400.0
    deleted = deleted_bytes = kept = unexported = 0
    with (
        exclusive_file_lock(event_log.root / EXPORT_LOCK),
        exclusive_file_lock(event_log.root / APPEND_LOCK),
    ):
        marks = _marks(event_log.root)
        for seg in event_log.segments():
            try:
                st = seg.stat()
                if not _fully_exported(seg, marks.get(seg.name, 0), st.st_size):
                    unexported += 1
                elif st.st_mtime <= cutoff:
                    seg.unlink()
                    marks.pop(seg.name, None)
                    deleted, deleted_bytes = deleted + 1, deleted_bytes + st.st_size
                    continue
            except FileNotFoundError:
                continue
            kept += 1
        if deleted:
            _write_marks(event_log.root, marks)
            fsync_dir(event_log.segments_dir)
    if deleted:
        log.info("event log: pruned %d exported segment(s), %d bytes", deleted, deleted_bytes)
    return PruneResult(deleted, deleted_bytes, kept, unexported)


def _fully_exported(seg: Path, mark: int, size: int) -> bool:
    """Whether no complete line lies past the export watermark ``mark``."""
    if mark >= size:
        return True
    with open(seg, "rb") as fh:
        fh.seek(mark)
        return b"\n" not in fh.read()


def export_event_log(
    data_dir: str | os.PathLike[str] | None = None, retain_days: float | None = DEFAULT_RETAIN_DAYS
) -> dict[str, Any] | None:
    """Export a data directory's event log to its events store, then prune old exported segments.

    What ``streamrec data export-events`` and the daily ``streamrec retrain`` run.

    Args:
        data_dir: The data directory.
        retain_days: Retention for :func:`prune`; ``None`` exports without pruning.

    Returns:
        ``{"export": ExportResult fields, "prune": PruneResult fields or None}``, or ``None`` when
        the data directory has no event log.
    """
    store = DataStore(data_dir)
    if not (store.layout.event_log / "segments").is_dir():
        return None
    elog = EventLog(store.layout.event_log, load_existing=False)
    exported = export_to_store(elog, store)
    pruned = prune(elog, retain_days) if retain_days is not None else None
    return {"export": asdict(exported), "prune": asdict(pruned) if pruned is not None else None}


__all__ = [
    "DEFAULT_RETAIN_DAYS",
    "MIN_RETAIN_DAYS",
    "ExportResult",
    "PruneResult",
    "export_event_log",
    "export_to_store",
    "implicit_users",
    "prune",
]
