"""The durable event log behind ``POST /v1/events``.

Nothing lost (DESIGN.md, principle 4): an event is acknowledged only after it is written to an
append-only JSON-lines segment under :attr:`streamrec.paths.DataLayout.event_log` and
``fsync``'d. Only then is the optional *sink* (the feature client's streaming push, e.g.
``FeatureClient.push_interactions``) called once with the batch's new events; a sink failure
never loses them — they are in the log and counted as ``push_failed``. The sink sits behind a
circuit breaker: after repeated failures it is skipped (still counted) until its reset timeout,
so a dead online store costs the events endpoint nothing.

Layout::

    event_log/
        segments/seg-<utc>-<pid>-<rand>.jsonl   one writer (process) per segment, append-only
        append.lock                             held by the process that is appending
        export.lock, exported.json              the export's (:mod:`streamrec.data.event_export`)

Guarantees and counts:

* **idempotent by event_id**: an id already in the log is counted as a duplicate and not
  written again, also when another replica logged it. Each process writes its own segments;
  an append holds an exclusive ``flock`` on ``append.lock`` and first reads the lines the other
  writers added since its last append (the ids are kept in memory), so a retry that lands on
  another replica is recognised. Where ``flock`` is not shared between the writers (some
  network filesystems across nodes), a retry on another node may be logged twice:
  :func:`~streamrec.data.event_export.export_to_store` removes such duplicates (and the events
  store itself is unique by ``event_id`` within an event date), but the sink has then seen the
  event twice.
* **all or nothing per batch**: a batch naming items the catalogue does not know is rejected
  whole (nothing written) and the unknown ids are reported (the API answers 422). A user the
  catalogue does not know is a *new user*, created implicitly (``accept_new_users``, the
  default): the events are logged and pushed like any other, and the export adds the user to
  the users table (:func:`~streamrec.data.event_export.implicit_users`). With
  ``accept_new_users=False`` unknown users are refused like unknown items. A user id beyond
  int64 is refused either way (no store can hold it).
* **invariant**: ``received == stored + duplicates + rejected`` at all times
  (:meth:`EventLogStats.balanced`).

Retention: a writer starts a new segment when its current one is :data:`SEGMENT_MAX_AGE_S` old
(or :data:`DEFAULT_SEGMENT_BYTES` big), so no segment is written to after that age and
:func:`streamrec.data.event_export.prune` can delete old exported segments while writers run.
Disk, the ids each replica holds in memory and the per-append catch-up are bounded by the
retention: a retry is recognised as a duplicate for at least that long (later, the events
store, unique by ``event_id`` within an event date, still keeps it once when the retry carries
its original timestamp, but the sink sees it again).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from streamrec.api_models import EventIn
from streamrec.config import utc_stamp
from streamrec.data.catalogue import CatalogueView, creates_item
from streamrec.data.schema import EVENT_SCHEMA, storable_id
from streamrec.data.store import DataStore
from streamrec.features.spec import ENGAGED_EVENT_TYPES
from streamrec.paths import exclusive_file_lock
from streamrec.resilience import CircuitBreaker

log = logging.getLogger(__name__)

#: Sink signature: called with the records (:func:`event_record`) of a batch's newly stored events,
#: after the durable write.
Sink = Callable[[list[dict[str, Any]]], Any]

#: API event types that count as a positive label in the events store (the feature spec's
#: definition of engagement, so training labels and streaming features agree).
POSITIVE_TYPES: frozenset[str] = frozenset(ENGAGED_EVENT_TYPES)
#: Default segment size before rotating to a new file.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
#: Age at which a writer rotates to a new segment: no segment is appended to once this old,
#: which is what lets :func:`streamrec.data.event_export.prune` delete old segments while
#: writers keep running.
SEGMENT_MAX_AGE_S = 6 * 3600.0
#: Held (``flock``) by the process that is appending, in the log's directory.
APPEND_LOCK = "append.lock"


@dataclass
class EventLogStats:
    """Counters of one :class:`EventLog` (this process).

    Attributes:
        received: Events offered to :meth:`EventLog.append`.
        stored: Events written to the log.
        duplicates: Events whose ``event_id`` was already logged (or repeated within a batch).
        rejected: Events refused (a batch naming unknown items, or unknown users when new users
            are not accepted).
        push_failed: Stored events the sink failed to take (they are still in the log).
        pushed: Stored events the sink took.
        push_calls: Calls to the sink (concurrent appends share one, so under load this grows
            slower than the number of requests).
        write_errors: Batches the log failed to write (not acknowledged, so not counted as
            received: the client gets a server error and retries).
    """

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    push_failed: int = 0
    pushed: int = 0
    push_calls: int = 0
    write_errors: int = 0

    def balanced(self) -> bool:
        """Whether ``received == stored + duplicates + rejected`` (nothing unaccounted for)."""
        return self.received == self.stored + self.duplicates + self.rejected


@dataclass(frozen=True)
class AppendOutcome:
    """What :meth:`EventLog.append` did with one batch.

    Attributes:
        received: Events in the batch.
        stored: Events newly written (and fsync'd).
        duplicates: Events already logged (not written again).
        rejected: Events refused (the whole batch when any id is unknown).
        push_failed: Stored events the sink failed to take.
        unknown_user_ids: User ids refused (sorted, unique): not known to the catalogue while new
            users are not accepted, or beyond int64.
        unknown_item_ids: Item ids not in the catalogue (sorted, unique).
    """

    received: int
    stored: int
    duplicates: int
    rejected: int
    push_failed: int = 0
    unknown_user_ids: tuple[int, ...] = ()
    unknown_item_ids: tuple[int, ...] = ()

    @property
    def accepted(self) -> bool:
        """Whether the batch was taken (nothing rejected)."""
        return self.rejected == 0

    def problem(self) -> str:
        """A message naming the unknown ids (empty when accepted)."""
        parts = []
        if self.unknown_user_ids:
            parts.append(f"unknown user_id(s) {list(self.unknown_user_ids[:50])}")
        if self.unknown_item_ids:
            parts.append(f"unknown item_id(s) {list(self.unknown_item_ids[:50])}")
        if not parts:
            return ""
        return "; ".join(parts) + ": nothing in this batch was stored; fix or drop those events and resend"


def _sorted_ids(ids: Iterable[int] | np.ndarray | None) -> np.ndarray | None:
    if ids is None:
        return None
    return np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64))


def _unknown(known: np.ndarray | None, ids: Sequence[int]) -> list[int]:
    """The ids of ``ids`` not in the sorted array ``known`` (none when ``known`` is None)."""
    if known is None or not ids:
        return []
    huge = sorted({i for i in ids if not storable_id(i)})
    arr = np.unique(np.asarray([i for i in ids if storable_id(i)], dtype=np.int64))
    if known.size == 0:
        return sorted(arr.tolist()) + huge
    pos = np.minimum(np.searchsorted(known, arr), known.size - 1)
    missing: list[int] = arr[known[pos] != arr].tolist()
    return missing + huge


def _beyond_int64(ids: Sequence[int]) -> list[int]:
    """The ids of ``ids`` that no store can hold (sorted, unique)."""
    return sorted({i for i in ids if not storable_id(i)})


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a new file's name) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def event_record(event: EventIn, received_at: datetime) -> dict[str, Any]:
    """The JSON-lines record of one event (what the log stores)."""
    return {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "event_type": event.event_type,
        "timestamp": event.timestamp.isoformat(),
        "session_id": event.session_id,
        "device": event.device,
        "watch_fraction": event.watch_fraction,
        "experiment_variant": event.experiment_variant,
        "received_at": received_at.isoformat(),
    }


class _PushSlot:
    """One append's records waiting for the sink, and what became of them."""

    __slots__ = ("done", "failed", "records")

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.done = False
        self.failed = 0


#: Read position of a segment whose tail must never be read into the seen ids.
_NEVER_REREAD = 2**62


class EventLog:
    """Append-only, fsync'd, idempotent log of API events.

    Thread-safe: one lock serialises writers in this process (the gateway calls :meth:`append`
    from a worker thread so the event loop never waits on ``fsync``).

    Args:
        root: The log directory (usually ``DataLayout.event_log``).
        known_users: User ids the catalogue knows (None: any). Only checked when
            ``accept_new_users`` is off.
        known_items: Item ids events may name (None: any).
        sink: Called with the records of each batch's newly stored events after the durable
            write (e.g. the feature client's ``push_interactions``); its exceptions are counted,
            never raised.
        sink_breaker: Circuit breaker around the sink (default: open after 5 consecutive
            failures, retry after 30 s).
        sink_timeout_s: Budget of one sink call: past it the append stops waiting, the call
            counts as a breaker failure and its events as ``push_failed`` (they are in the log;
            the call may still finish in its thread). None waits as long as the sink takes.
        fsync: Flush to stable storage before acknowledging (turn off only in benchmarks of
            other parts).
        segment_max_bytes: Rotate to a new segment file beyond this size.
        load_existing: Read the ids already logged so that retries are recognised.
        clock: Wall clock (epoch seconds) for segment ages; tests pass their own.
        catalogue: ``() -> (user ids, item ids)`` re-read when a batch names ids the sets do
            not hold, at most every ``catalogue_refresh_s`` (users and items ingested after
            the gateway started are accepted without a restart or reload). None: fixed sets.
        catalogue_refresh_s: Shortest pause between two such re-reads.
        accept_new_users: Accept events of users the catalogue does not know (new users, created
            implicitly; the export adds them to the users table). Off: such a batch is refused
            like one naming unknown items.
        added_items: ``() -> ids`` of items added while serving (the catalogue log,
            :mod:`streamrec.data.catalogue`), asked on every batch naming items the sets do not
            hold (it should cost a ``stat`` when nothing changed): a new item can be clicked as
            soon as its upsert is acknowledged. None: none.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        known_users: Iterable[int] | np.ndarray | None = None,
        known_items: Iterable[int] | np.ndarray | None = None,
        sink: Sink | None = None,
        *,
        sink_breaker: CircuitBreaker | None = None,
        sink_timeout_s: float | None = 1.0,
        fsync: bool = True,
        segment_max_bytes: int = DEFAULT_SEGMENT_BYTES,
        load_existing: bool = True,
        clock: Callable[[], float] = time.time,
        catalogue: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
        catalogue_refresh_s: float = 60.0,
        accept_new_users: bool = True,
        added_items: Callable[[], Container[int]] | None = None,
    ) -> None:
        self.root = Path(root)
        self._added_items = added_items
        self.segments_dir = self.root / "segments"
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self.known_users = _sorted_ids(known_users)
        self.known_items = _sorted_ids(known_items)
        self.accept_new_users = bool(accept_new_users)
        self.sink = sink
        self.sink_breaker = sink_breaker or CircuitBreaker(
            "event_sink", failure_threshold=5, reset_timeout_s=30.0
        )
        self.sink_timeout_s = sink_timeout_s
        # One thread: a hung sink holds it, later pushes queue behind it and miss their budget
        # until the breaker opens; never more than one thread stuck in a hung store.
        self._sink_pool = ThreadPoolExecutor(1, thread_name_prefix="event-sink")
        self.fsync = fsync
        self.segment_max_bytes = int(segment_max_bytes)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._fh: IO[bytes] | None = None
        self._segment: Path | None = None
        self._segment_bytes = 0
        self._segment_opened_at = 0.0
        self._clock = clock
        # Bytes of each segment whose ids are in _seen (complete lines only), and those ids (so
        # that they leave memory when the segment is pruned).
        self._read_upto: dict[Path, int] = {}
        self._ids_by_segment: dict[Path, list[str]] = {}
        self._load_existing = load_existing
        # Group commit of the sink pushes (see _push).
        self._push_cv = threading.Condition()
        self._push_queue: list[_PushSlot] = []
        self._pushing = False
        self.stats = EventLogStats()
        self.corrupt_lines_at_open = 0
        self._catalogue = catalogue
        self._catalogue_refresh_s = float(catalogue_refresh_s)
        self._catalogue_read_at = time.monotonic()
        self._catalogue_lock = threading.Lock()
        if load_existing:
            self._catch_up(count_corrupt=True)

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str] | None = None, sink: Sink | None = None, **kwargs: Any
    ) -> EventLog:
        """The log of a data directory, checking ids against its stored users and items.

        Args:
            data_dir: The data directory.
            sink: See the class arguments.
            **kwargs: Passed to the constructor (``fsync``, ``segment_max_bytes``...).
        """
        store = DataStore(data_dir)

        def catalogue() -> tuple[np.ndarray, np.ndarray]:
            return store.users()["user_id"].to_numpy(dtype=np.int64), store.items()["item_id"].to_numpy(
                dtype=np.int64
            )

        view = CatalogueView(data_dir)
        created: dict[int, frozenset[int]] = {}  # per state generation

        def added_items() -> Container[int]:
            view.refresh()  # one stat when the log did not change
            state = view.state
            if state.generation not in created:
                created.clear()
                created[state.generation] = frozenset(i for i, f in state.items.items() if creates_item(f))
            return created[state.generation]

        users, items = catalogue()
        kwargs.setdefault("added_items", added_items)
        return cls(store.layout.event_log, users, items, sink, catalogue=catalogue, **kwargs)

    # ------------------------------------------------------------------------ writing
    def append(self, events: Sequence[EventIn], received_at: datetime | None = None) -> AppendOutcome:
        """Log a batch durably; return what happened to it.

        The batch is rejected whole when it names unknown items (or unknown users, when new
        users are not accepted). Otherwise every event whose id is new is written in one
        ``write`` + ``fsync``, then handed to the sink. Events of new users are logged and
        pushed like any other.

        Args:
            events: Validated events.
            received_at: Server receipt time recorded with each event (default: now).

        Raises:
            OSError: the log could not be written (nothing was acknowledged; the caller answers
                with a server error and the client retries — ids make the retry safe).
        """
        n = len(events)
        user_ids = [e.user_id for e in events]
        # New users accepted: any id a store can hold (the user is created implicitly).
        bad_users = _beyond_int64(user_ids) if self.accept_new_users else _unknown(self.known_users, user_ids)
        bad_items = _unknown(self.known_items, [e.item_id for e in events])
        if bad_users or bad_items:
            self._refresh_catalogue()  # (or another thread just did: check the current sets again)
            if not self.accept_new_users:
                bad_users = _unknown(self.known_users, bad_users)
            bad_items = _unknown(self.known_items, bad_items)
            if bad_items and self._added_items is not None:
                added = self._added_items()
                bad_items = [i for i in bad_items if i not in added]
        if bad_users or bad_items:
            with self._lock:
                self.stats.received += n
                self.stats.rejected += n
            return AppendOutcome(n, 0, 0, n, 0, tuple(bad_users), tuple(bad_items))
        when = received_at or datetime.now(UTC)
        records: list[dict[str, Any]] = []
        with self._lock, exclusive_file_lock(self.root / APPEND_LOCK):  # one appending process
            if self._load_existing:
                self._catch_up()  # ids other replicas logged since our last append
            fresh: list[EventIn] = []
            batch_ids: set[str] = set()
            for e in events:
                if e.event_id in self._seen or e.event_id in batch_ids:
                    continue
                batch_ids.add(e.event_id)
                fresh.append(e)
            if fresh:
                records = [event_record(e, when) for e in fresh]
                payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
                try:
                    self._write(payload.encode())
                except OSError:
                    self.stats.write_errors += 1
                    raise
                self._seen.update(batch_ids)
                assert self._segment is not None
                self._ids_by_segment.setdefault(self._segment, []).extend(batch_ids)
            dup = n - len(fresh)
            self.stats.received += n
            self.stats.stored += len(fresh)
            self.stats.duplicates += dup
        failed = self._push(records)
        return AppendOutcome(n, len(fresh), dup, 0, failed)

    def _push(self, records: list[dict[str, Any]]) -> int:
        """Hand the new records to the sink; return how many it failed to take (never raises).

        Group commit: the batches of concurrent appends go to the sink together, in one call, so
        under load the sink's fixed cost per call (an online-store commit and an offline file per
        view for the feature push) is paid once per group instead of once per request. A lone
        append pushes at once; an append returns only after its own records were pushed (or
        counted as failed), as before.
        """
        sink = self.sink
        if sink is None or not records:
            return 0
        mine = _PushSlot(records)
        with self._push_cv:
            self._push_queue.append(mine)
            while not mine.done:
                if self._pushing:  # another append is pushing: ours goes in the next group
                    self._push_cv.wait()
                    continue
                group, self._push_queue = self._push_queue, []
                self._pushing = True
                self._push_cv.release()
                failed: int | None = None  # stays None if the push is interrupted
                try:
                    failed = self._push_group(sink, [r for slot in group for r in slot.records])
                finally:
                    self._push_cv.acquire()
                    self._pushing = False
                    for slot in group:
                        slot.failed = 0 if failed == 0 else len(slot.records)
                        slot.done = True
                    self._push_cv.notify_all()
        return mine.failed

    def _push_group(self, sink: Sink, records: list[dict[str, Any]]) -> int:
        """One ``sink`` call for ``records`` behind the breaker; how many it failed to take."""
        failed = 0
        called = self.sink_breaker.allow()
        if not called:
            failed = len(records)  # the sink is known to be down: skip it, the log has the events
        else:
            try:
                if self.sink_timeout_s is None:
                    sink(records)
                else:
                    fut = self._sink_pool.submit(sink, records)
                    try:
                        fut.result(timeout=self.sink_timeout_s)
                    except FuturesTimeoutError:
                        fut.cancel()  # still queued behind a hung push: it never starts
                        raise
            except FuturesTimeoutError:
                self.sink_breaker.record_failure()
                failed = len(records)
                log.warning(
                    "%d event(s) logged but the push to the sink did not finish within %.0f ms",
                    failed,
                    self.sink_timeout_s * 1e3 if self.sink_timeout_s else 0.0,
                )
            except Exception as exc:  # the events are durable already; count and go on
                self.sink_breaker.record_failure()
                failed = len(records)
                log.warning("%d event(s) logged but the push to the sink failed: %s", failed, exc)
            else:
                self.sink_breaker.record_success()
        with self._lock:
            self.stats.push_failed += failed
            self.stats.pushed += len(records) - failed
            self.stats.push_calls += int(called)
        return failed

    def _write(self, data: bytes) -> None:
        """Append ``data`` to the current segment and make it durable (lock held)."""
        if (
            self._fh is None
            or self._segment_bytes >= self.segment_max_bytes
            or self._clock() - self._segment_opened_at >= SEGMENT_MAX_AGE_S
            or os.fstat(self._fh.fileno()).st_nlink == 0  # deleted under us: never write to it
        ):
            self._rotate()
        assert self._fh is not None
        try:
            self._fh.write(data)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except OSError:
            # Do not append after a possibly torn write: the next batch starts a fresh segment.
            # What reached this one was never acknowledged: cut it off again (we still hold the
            # append lock, so no other replica has read it), or the client's retry would count
            # as a duplicate there and never reach the streaming features. If even that fails,
            # our catch-up skips the rest of this segment, so a retry here is stored again.
            self._close_segment()  # (its buffer may still hold the bytes: let the close try them)
            self._truncate_to(self._segment_bytes)
            if self._segment is not None:
                self._read_upto[self._segment] = _NEVER_REREAD
            raise
        self._segment_bytes += len(data)
        assert self._segment is not None
        self._read_upto[self._segment] = self._segment_bytes  # our own lines: ids already seen

    def _truncate_to(self, size: int) -> None:
        """Best effort: cut the closed current segment back to ``size`` bytes (lock held)."""
        if self._segment is None:
            return
        try:
            fd = os.open(self._segment, os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            log.warning("could not cut an unacknowledged write off %s: %s", self._segment, err)

    def _catch_up(self, count_corrupt: bool = False) -> None:
        """Add the ids of complete lines appended to any segment since the last call.

        Also forgets the ids of segments that were pruned meanwhile.
        """
        present = self.segments()
        gone = self._read_upto.keys() - set(present)
        for seg in gone:
            self._seen.difference_update(self._ids_by_segment.pop(seg, ()))
            del self._read_upto[seg]
        for seg in present:
            start = self._read_upto.get(seg, 0)
            try:
                if seg.stat().st_size <= start:
                    continue
                with open(seg, "rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except FileNotFoundError:  # removed meanwhile (an operator cleaning up)
                continue
            end = data.rfind(b"\n") + 1  # a torn final write was never acknowledged
            ids = [str(rec["event_id"]) for rec in self._records(data[:end].splitlines(), count_corrupt)]
            self._seen.update(ids)
            self._ids_by_segment.setdefault(seg, []).extend(ids)
            self._read_upto[seg] = start + end

    def _rotate(self) -> None:
        self._close_segment()
        name = f"seg-{utc_stamp()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._segment = self.segments_dir / name
        self._fh = open(self._segment, "ab")  # noqa: SIM115 - long-lived handle, closed in close()
        self._segment_bytes = 0
        self._segment_opened_at = self._clock()
        if self.fsync:
            fsync_dir(self.segments_dir)

    def _close_segment(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):  # closing after a failed write
                self._fh.close()
        self._fh = None

    def close(self) -> None:
        """Close the current segment (a later append opens a new one)."""
        with self._lock:
            self._close_segment()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_catalogue(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The catalogue's current ``(user ids, item ids)`` (None when the log has no catalogue).

        For :meth:`refresh_known_ids` after a catalogue update (a hot reload reads it while it
        prepares, and swaps it in at commit).
        """
        return None if self._catalogue is None else self._catalogue()

    def _refresh_catalogue(self) -> None:
        """Re-read the known ids, unless that was done in the last ``catalogue_refresh_s``."""
        if self._catalogue is None:
            return
        with self._catalogue_lock:  # one re-read at a time; the others wait for its result
            if time.monotonic() - self._catalogue_read_at < self._catalogue_refresh_s:
                return
            self._catalogue_read_at = time.monotonic()
            try:
                users, items = self._catalogue()
            except Exception as err:  # the fixed sets keep working; the batch gets its 422
                log.warning("re-reading the catalogue for unknown ids failed: %s", err)
                return
            self.refresh_known_ids(users, items)

    def refresh_known_ids(
        self, known_users: Iterable[int] | np.ndarray | None, known_items: Iterable[int] | np.ndarray | None
    ) -> None:
        """Replace the id sets events are checked against (e.g. after a catalogue update)."""
        users, items = _sorted_ids(known_users), _sorted_ids(known_items)
        with self._lock:
            self.known_users, self.known_items = users, items

    # ------------------------------------------------------------------------ reading
    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        return sorted(self.segments_dir.glob("seg-*.jsonl"))

    def _iter_records(self, paths: Iterable[Path], count_corrupt: bool = False) -> Iterator[dict[str, Any]]:
        for p in paths:
            with open(p, "rb") as fh:
                # A final line without its newline is a torn write (never acknowledged).
                yield from self._records(
                    itertools.takewhile(lambda ln: ln.endswith(b"\n"), fh), count_corrupt
                )

    def _records(self, lines: Iterable[bytes], count_corrupt: bool) -> Iterator[dict[str, Any]]:
        """The event records among complete JSON lines (corrupt ones skipped, counted on request)."""
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                if count_corrupt:
                    self.corrupt_lines_at_open += 1
                continue
            if isinstance(rec, dict) and "event_id" in rec:
                yield rec

    def read(self) -> pd.DataFrame:
        """Every logged event as a frame in :data:`~streamrec.data.schema.EVENT_SCHEMA` columns."""
        return records_frame(list(self._iter_records(self.segments())))

    def snapshot(self) -> dict[str, Any]:
        """Counters plus the log's location, for admin endpoints."""
        with self._lock:
            out: dict[str, Any] = asdict(self.stats)
            out["balanced"] = self.stats.balanced()
            out["segment"] = str(self._segment) if self._segment else None
            out["ids_in_memory"] = len(self._seen)
            out["sink"] = None if self.sink is None else self.sink_breaker.snapshot()
        return out


def _int_column(values: pd.Series) -> pd.arrays.IntegerArray:
    """Ids as nullable int64; anything that is not an int64-sized integer becomes null."""
    ok = (int, np.integer)
    out = [
        int(v) if isinstance(v, ok) and not isinstance(v, bool) and storable_id(v) else None for v in values
    ]
    return pd.array(out, dtype="Int64")


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Log records -> frame with the canonical event columns (label derived from the type)."""
    cols = [f.name for f in EVENT_SCHEMA]
    if not records:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    df = pd.DataFrame.from_records(records)
    out = pd.DataFrame(
        {
            "event_id": df["event_id"].astype(str),
            "user_id": _int_column(df["user_id"]),
            "item_id": _int_column(df["item_id"]),
            "event_type": df["event_type"],
            "label": df["event_type"].isin(POSITIVE_TYPES).astype("int8"),
            "timestamp": pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="ISO8601"),
            "session_id": df.get("session_id"),
            "device": df.get("device"),
            "position": pd.array([None] * len(df), dtype="Int16"),
            "rating": np.full(len(df), math.nan, dtype=np.float32),
            "watch_fraction": (
                pd.to_numeric(df["watch_fraction"], errors="coerce").astype(np.float32)
                if "watch_fraction" in df
                else np.full(len(df), math.nan, dtype=np.float32)
            ),
            "experiment_variant": df.get("experiment_variant"),
        },
        columns=cols,
    )
    return out


__all__ = [
    "APPEND_LOCK",
    "AppendOutcome",
    "EventLog",
    "EventLogStats",
    "POSITIVE_TYPES",
    "Sink",
    "event_record",
    "fsync_dir",
    "records_frame",
]
