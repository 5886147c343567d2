"""Catalogue changes while serving: a durable, append-only log of item upserts, and a view of it.

An operator's upsert (``POST /v1/admin/items`` or ``streamrec catalogue sync``) is appended to
``<data_dir>/catalogue/updates.jsonl`` (one JSON line per item, under an exclusive ``flock``,
fsynced before the call returns). Every serving process keeps a :class:`CatalogueView` of it: a
``stat`` tells whether the file grew, and only the new lines are read. Replicas on one data
directory therefore agree on the catalogue without a broadcast, and a restarted replica reads
the whole log (the state survives restarts). ADR-013 has the reasoning.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamrec.errors import DataError
from streamrec.paths import DataLayout, exclusive_file_lock
from streamrec.timeutil import utc

log = logging.getLogger(__name__)

#: Fields an upsert may set besides ``item_id`` (an absent field keeps its current value).
ITEM_FIELDS: tuple[str, ...] = ("title", "categories", "creator", "published_at", "promoted", "flagged")


def catalogue_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``<data_dir>/catalogue``."""
    return DataLayout.at(data_dir).root / "catalogue"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean(update: Mapping[str, Any]) -> dict[str, Any]:
    """One update as stored: ``item_id`` plus the fields it sets (JSON-safe)."""
    if "item_id" not in update:
        raise DataError("every catalogue update needs an item_id")
    out: dict[str, Any] = {"item_id": int(update["item_id"])}
    for name in ITEM_FIELDS:
        if name not in update or update[name] is None:
            continue
        value = update[name]
        if name == "published_at":  # whole seconds: what the serving item table holds
            when = utc(value)  # whole seconds (a pandas Timestamp may carry nanoseconds)
            value = datetime(*when.timetuple()[:6], tzinfo=UTC).isoformat()
        elif name == "categories":
            value = list(dict.fromkeys(str(c) for c in value))  # each once, in order
        elif name in ("promoted", "flagged"):
            value = bool(value)
        else:
            value = str(value)
        out[name] = value
    return out


class CatalogueLog:
    """The append-only log of item upserts of one data directory.

    Args:
        data_dir: The data directory (``<data_dir>/catalogue/updates.jsonl``).
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        self.dir = catalogue_dir(data_dir)
        self.path = self.dir / "updates.jsonl"
        self._counted = (0, 0)  # (bytes, lines) of the last count

    def append(self, updates: Sequence[Mapping[str, Any]], source: str = "api") -> int:
        """Durably append ``updates``; returns how many lines the log holds after them.

        The lines are on disk (fsynced) when this returns: a reader that starts after it sees them.

        Raises:
            DataError: an update has no ``item_id`` or an unreadable ``published_at``.
        """
        try:
            rows = [_clean(u) for u in updates]
        except (TypeError, ValueError) as err:
            raise DataError(f"invalid catalogue update: {err}") from err
        if not rows:
            return self.count()
        at = datetime.now(UTC).isoformat()
        self.dir.mkdir(parents=True, exist_ok=True)
        with exclusive_file_lock(self.dir / "append.lock"):
            new = not self.path.exists()
            if not new:
                self._cut_torn_tail()
            with open(self.path, "ab") as fh:
                fh.write(
                    b"".join(json.dumps({**r, "at": at, "source": source}).encode() + b"\n" for r in rows)
                )
                fh.flush()
                os.fsync(fh.fileno())
            if new:
                _fsync_dir(self.dir)
            return self.count()

    def _cut_torn_tail(self) -> None:
        """Drop a last line without its newline (an append that failed midway was never acknowledged)."""
        with open(self.path, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read()
            keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
            log.warning("catalogue log %s: cut a torn last line (%d bytes)", self.path, size - keep)

    def count(self) -> int:
        """Lines in the log (only the bytes added since the last count are read)."""
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size < self._counted[0]:  # cut or replaced: count again
                    self._counted = (0, 0)
                fh.seek(self._counted[0])
                lines = self._counted[1] + fh.read().count(b"\n")
        except FileNotFoundError:
            self._counted = (0, 0)
            return 0
        self._counted = (size, lines)
        return lines

    def size(self) -> int:
        """Bytes in the log (0 when absent)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The complete lines after byte ``offset``, and the offset after the last of them."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return [], 0
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        rows = []
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                int(row["item_id"])
            except (ValueError, KeyError, TypeError):  # never written by append: skip, say so
                log.warning("catalogue log %s: skipped an unreadable line: %r", self.path, line[:200])
                continue
            rows.append(row)
        return rows, offset + end


_GENERATIONS = itertools.count(1)

#: Fields that create an item the catalogue did not hold (a flag or promotion alone does not).
CREATING_FIELDS: tuple[str, ...] = ("title", "categories", "creator", "published_at")


def creates_item(fields: Mapping[str, Any]) -> bool:
    """Whether a logged item's fields describe an item (not only a flag or promotion for an id)."""
    return any(fields.get(name) is not None for name in CREATING_FIELDS)


@dataclass
class CatalogueState:
    """The catalogue changes applied so far (immutable once published by a view).

    Attributes:
        items: ``item_id -> fields`` (the newest value of every field ever set).
        flagged: Items whose newest ``flagged`` is true: never served.
        lines: Log lines applied.
        generation: Increases with every state any view of this process publishes: of two
            states, the higher one was read later (also across a replaced log).
    """

    items: dict[int, dict[str, Any]] = field(default_factory=dict)
    flagged: frozenset[int] = frozenset()
    lines: int = 0
    generation: int = field(default_factory=lambda: next(_GENERATIONS))


class CatalogueView:
    """One process's view of the catalogue log, brought up to date by :meth:`refresh`.

    :meth:`refresh` costs one ``stat`` when nothing changed. A new state is built aside and
    published by one reference swap (copy-on-write): a reader holds a consistent state.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        self.log = CatalogueLog(data_dir)
        self._offset = 0  # end of the last complete line applied
        self._seen = 0  # the log's size at the last refresh (a partial tail is not re-read)
        self._lock = threading.Lock()
        self.state = CatalogueState()
        self.refresh()

    @property
    def flagged(self) -> frozenset[int]:
        """Items never to serve, as of the last refresh."""
        return self.state.flagged

    def stale(self) -> bool:
        """Whether the log changed since the last refresh (one ``stat``)."""
        return self.log.size() != self._seen

    def refresh(self) -> bool:
        """Apply the lines appended since the last refresh; True when the state changed.

        A log that shrank (replaced, emptied, deleted) is read again from the start.
        """
        if not self.stale():
            return False
        with self._lock:
            size = self.log.size()
            replaced = size < self._offset
            offset = 0 if replaced else self._offset
            rows, end = self.log.read_from(offset)
            self._seen = size
            if not rows and not replaced:
                self._offset = end
                return False
            base = CatalogueState() if offset == 0 else self.state
            items = dict(base.items)
            for row in rows:
                iid = int(row["item_id"])
                fields = {k: row[k] for k in ITEM_FIELDS if k in row}
                # When the log first described it: a flag or promotion for an id that does not
                # exist yet (an operator blocking it in advance) does not date the item.
                if "first_seen_at" not in items.get(iid, {}) and "at" in row and creates_item(fields):
                    fields["first_seen_at"] = row["at"]
                if "flagged" in fields:  # who set the flag: a sync never clears an operator's
                    fields["flagged_by"] = str(row.get("source", "api"))
                items[iid] = {**items.get(iid, {}), **fields}
            flagged = frozenset(i for i, f in items.items() if f.get("flagged"))
            self.state = CatalogueState(items, flagged, base.lines + len(rows))
            self._offset = end
            return True


def _differs(name: str, old: Any, new: Any) -> bool:
    if name == "categories" and old is not None:
        return sorted(old) != sorted(new)  # the feature table keeps categories in vocabulary order
    return bool(old != new)


def differences(
    current: Iterable[Mapping[str, Any]], known: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The items of ``current`` whose fields differ from ``known`` (what a sync must upsert)."""
    out = []
    for row in current:
        new = _clean(row)
        old = known.get(new["item_id"])
        if old is None or any(_differs(k, old.get(k), v) for k, v in new.items() if k != "item_id"):
            out.append(new)
    return out


def new_item_rows(
    items: Mapping[int, Mapping[str, Any]], known: Iterable[int], now: datetime | None = None
) -> list[dict[str, Any]]:
    """Items-table rows for the items the catalogue log added that ``known`` lacks, in log order.

    Rows are in :data:`~streamrec.data.schema.ITEM_SCHEMA` (``known``: the stored item ids).

    Only upserts that describe an item create one (:func:`creates_item`: a flag alone for an
    unknown id does not). An upsert that never set ``published_at`` is published when the log
    first described it (else ``now``); missing categories are empty, promoted and flagged false.

    Args:
        items: The log's items (:attr:`CatalogueState.items`).
        known: Item ids the items table holds.
        now: Publication time of items without one (default: now).
    """
    have = set(int(i) for i in known)
    when = now or datetime.now(UTC)
    rows = []
    for iid, f in items.items():
        if iid in have or not creates_item(f):
            continue
        pub = f.get("published_at") or f.get("first_seen_at")
        rows.append(
            {
                "item_id": int(iid),
                "title": f.get("title"),
                "categories": list(f.get("categories") or []),
                "creator": f.get("creator"),
                "published_at": utc(pub) if pub is not None else when,
                "promoted": bool(f.get("promoted", False)),
                "flagged": bool(f.get("flagged", False)),
            }
        )
    return rows


#: Fields :func:`sync_from_store` compares (what serving uses of an item's metadata).
SYNC_FIELDS: tuple[str, ...] = ("categories", "published_at", "promoted", "flagged")


def serving_baseline(data_dir: str | os.PathLike[str] | None) -> dict[int, dict[str, Any]]:
    """What serving knows of each item before the log: the feature store's item table.

    Empty when no features were built (then every item counts as changed).
    """
    from streamrec.errors import StreamRecError
    from streamrec.features.client import FeatureClient

    try:
        table = FeatureClient(data_dir).item_table()
    except (StreamRecError, OSError) as err:
        import logging

        logging.getLogger(__name__).info("no feature item table (%s): every item is new to serving", err)
        return {}
    vocab = table.category_vocab
    out: dict[int, dict[str, Any]] = {}
    for iid, cats, pub, promoted, flagged in zip(
        table.item_ids.tolist(),
        table.category_lists(),
        table.published_at.tolist(),
        table.promoted.tolist(),
        table.flagged.tolist(),
        strict=True,
    ):
        out[int(iid)] = {
            "categories": [vocab[c] for c in cats],
            "published_at": datetime.fromtimestamp(int(pub), UTC).isoformat(),
            "promoted": bool(promoted),
            "flagged": bool(flagged),
        }
    return out


def sync_from_store(data_dir: str | os.PathLike[str] | None, *, dry_run: bool = False) -> dict[str, Any]:
    """Upsert what the ingested items table changed since serving last knew it (``catalogue sync``).

    Categories, publication time and promoted are compared with what serving knows: the feature
    store's item table (the last feature build) plus the catalogue log. Flags are compared with
    the log alone, the only source every replica filters on at every level: every ingested
    flagged item is made flagged there (also when a feature build already holds it), and an
    ingest clears only flags that a sync set, never one an operator set through the API. Items
    serving has never seen are sent with all their fields.

    Returns:
        ``{"items": ingested items, "changed": upserts written, "new": of them new to serving,
        "flagged": ids flagged by this sync, "catalogue_lines": lines after it}``.
    """
    from streamrec.data.store import DataStore

    items = DataStore(data_dir).items()
    known = serving_baseline(data_dir)
    logged = CatalogueView(data_dir).state.items
    for iid, fields in logged.items():
        known[iid] = {**known.get(iid, {}), **fields}
    for iid, fields in known.items():  # flags: the log's word only
        fields["flagged"] = bool(logged.get(iid, {}).get("flagged", False))
    rows = []
    for rec in items.to_dict("records"):
        iid = int(rec["item_id"])
        row = {k: rec[k] for k in ("item_id", *SYNC_FIELDS) if k in rec}
        if iid not in known:  # new to serving: every field
            row.update({k: rec[k] for k in ("title", "creator") if isinstance(rec.get(k), str)})
        cats = row.get("categories")
        row["categories"] = [] if cats is None else [str(c) for c in cats if c is not None]
        mine = logged.get(iid, {})
        if not row.get("flagged") and mine.get("flagged") and mine.get("flagged_by") != "sync":
            row["flagged"] = True  # an operator's flag stands until an operator clears it
        rows.append(row)
    changed = differences(rows, known)
    new = [r for r in changed if r["item_id"] not in known]
    flagged = sorted(
        r["item_id"] for r in changed if r.get("flagged") and not known.get(r["item_id"], {}).get("flagged")
    )
    log = CatalogueLog(data_dir)
    lines = log.count() if dry_run or not changed else log.append(changed, source="sync")
    return {
        "items": len(rows),
        "changed": len(changed),
        "new": len(new),
        "flagged": flagged,
        "catalogue_lines": lines,
    }
