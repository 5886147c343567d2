"""The data contract: row-level validation with a quarantine.

Each rule below marks the rows it rejects with a reason. The first failing rule of a row is its
reason (rules run in the order listed), so every input row ends in exactly one place:
``valid + quarantined == input rows`` is an invariant, checked by :func:`validate_events` itself.

Rules for events:

=====================  ===============================================================
``missing_field``      a required field (ids, type, label, timestamp) is null
``bad_event_type``     event_type not in :data:`~streamrec.data.schema.EVENT_TYPES`
``bad_label``          label not 0/1
``rating_out_of_range``  rating outside [0.5, 5]
``watch_fraction_out_of_range``  watch_fraction outside [0, 1]
``bad_device``         device not in :data:`~streamrec.data.schema.DEVICES`
``timestamp_before_epoch``  timestamp before 1970-01-01
``timestamp_in_future``    timestamp later than now + allowed clock skew
``unknown_user``       user_id not among known users
``unknown_item``       item_id not among known items
``duplicate_event_id`` event_id seen earlier in the same input (first occurrence kept)
=====================  ===============================================================

Parse-level failures (malformed lines, non-numeric ids) are found by the loaders, which
produce the same quarantine rows (:func:`quarantine_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from streamrec.data.schema import DEVICES, EVENT_TYPES

#: Columns of every quarantine file.
QUARANTINE_COLUMNS = ["table", "source", "line", "reason", "record"]

#: Default tolerated clock skew for "future" timestamps.
DEFAULT_FUTURE_SKEW = timedelta(minutes=5)

EVENT_RULES: tuple[str, ...] = (
    "missing_field",
    "bad_event_type",
    "bad_label",
    "rating_out_of_range",
    "watch_fraction_out_of_range",
    "bad_device",
    "timestamp_before_epoch",
    "timestamp_in_future",
    "unknown_user",
    "unknown_item",
    "duplicate_event_id",
)


@dataclass
class ValidationResult:
    """Valid rows, quarantined rows (with reasons) and counts per rule."""

    valid: pd.DataFrame
    quarantined: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def quarantine_rows(
    table: str, source: str, lines: Iterable[int | None], reasons: Iterable[str], records: Iterable[str]
) -> pd.DataFrame:
    """Build quarantine rows in the common layout.

    Args:
        table: ``users``, ``items`` or ``events``.
        source: The file or generator the rows came from.
        lines: 1-based line numbers in the source (None where not applicable).
        reasons: One reason code per row.
        records: The raw row (line text or a JSON rendering).
    """
    return pd.DataFrame(
        {
            "table": table,
            "source": source,
            "line": pd.array(list(lines), dtype="Int64"),
            "reason": list(reasons),
            "record": list(records),
        },
        columns=QUARANTINE_COLUMNS,
    )


def _json_records(frame: pd.DataFrame) -> list[str]:
    """One JSON line per row (pandas renders an empty frame as '[]', hence the guard)."""
    if frame.empty:
        return []
    return frame.to_json(orient="records", lines=True, date_format="iso").splitlines()


def validate_events(
    events: pd.DataFrame,
    known_users: Iterable[int] | np.ndarray,
    known_items: Iterable[int] | np.ndarray,
    *,
    source: str = "",
    now: datetime | None = None,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
    line_column: str | None = None,
    raw_column: str | None = None,
) -> ValidationResult:
    """Apply the event rules; return valid rows and quarantined rows with reasons.

    Args:
        events: Typed events (canonical columns; nullable where a loader could not fill).
        known_users: Ids of all users (already stored or in this batch).
        known_items: Ids of all items (already stored or in this batch).
        source: Name of the input, recorded in the quarantine.
        now: Reference time for the future rule (default: wall clock).
        future_skew: Allowed clock skew before a timestamp counts as future.
        line_column: Optional column holding source line numbers (dropped from valid rows).
        raw_column: Optional column holding the raw line text (dropped from valid rows).
    """
    n = len(events)
    reason = np.full(n, "", dtype=object)

    def mark(rule: str, bad: np.ndarray) -> None:
        sel = bad & (reason == "")
        reason[sel] = rule

    if "_reason" in events:  # reasons a loader already found (e.g. a timestamp pandas cannot hold)
        pre = events["_reason"].fillna("").to_numpy(dtype=object)
        reason[:] = pre
    req = ["event_id", "user_id", "item_id", "event_type", "label", "timestamp"]
    mark("missing_field", events[req].isna().any(axis=1).to_numpy())
    mark("bad_event_type", ~events["event_type"].isin(EVENT_TYPES).to_numpy())
    mark("bad_label", ~events["label"].isin([0, 1]).to_numpy())
    if "rating" in events:
        r = pd.to_numeric(events["rating"], errors="coerce")
        mark("rating_out_of_range", (r.notna() & ((r < 0.5) | (r > 5))).to_numpy())
    if "watch_fraction" in events:
        w = pd.to_numeric(events["watch_fraction"], errors="coerce")
        mark("watch_fraction_out_of_range", (w.notna() & ((w < 0) | (w > 1))).to_numpy())
    if "device" in events:
        d = events["device"]
        mark("bad_device", (d.notna() & ~d.isin(DEVICES)).to_numpy())
    ts = pd.to_datetime(events["timestamp"], utc=True, errors="coerce")
    epoch = pd.Timestamp(0, tz="UTC")
    limit = pd.Timestamp(now or datetime.now(UTC)) + future_skew
    if limit.tzinfo is None:
        limit = limit.tz_localize("UTC")
    mark("timestamp_before_epoch", (ts < epoch).fillna(False).to_numpy(dtype=bool))
    mark("timestamp_in_future", (ts > limit).fillna(False).to_numpy(dtype=bool))
    users = np.asarray(list(known_users) if not isinstance(known_users, np.ndarray) else known_users)
    items = np.asarray(list(known_items) if not isinstance(known_items, np.ndarray) else known_items)
    mark("unknown_user", ~events["user_id"].isin(users).to_numpy())
    mark("unknown_item", ~events["item_id"].isin(items).to_numpy())
    # Duplicates among rows that passed everything else: the first occurrence wins.
    ok_so_far = reason == ""
    dup = np.zeros(n, dtype=bool)
    dup[ok_so_far] = events.loc[ok_so_far, "event_id"].duplicated(keep="first").to_numpy()
    mark("duplicate_event_id", dup)

    bad = reason != ""
    extra = [c for c in (line_column, raw_column, "_reason" if "_reason" in events else None) if c]
    valid = events.loc[~bad].drop(columns=extra).reset_index(drop=True)
    qrows = events.loc[bad]
    lines = qrows[line_column].tolist() if line_column else [None] * len(qrows)
    if raw_column:
        records = qrows[raw_column].astype(str).tolist()
    else:
        records = _json_records(qrows.drop(columns=extra))
    quarantined = quarantine_rows("events", source, lines, reason[bad].tolist(), records)
    counts = {rule: int((reason == rule).sum()) for rule in EVENT_RULES}
    for r in set(reason[bad]) - set(EVENT_RULES):
        counts[r] = int((reason == r).sum())
    assert len(valid) + len(quarantined) == n, "contract invariant broken: valid + quarantined != input"
    return ValidationResult(valid, quarantined, counts)


def validate_dimension(
    frame: pd.DataFrame, key: str, table: str, required: list[str], *, source: str = ""
) -> ValidationResult:
    """Validate users or items: required fields present, key unique (first occurrence kept).

    Extra per-table range rules (e.g. age) are applied by the caller before this.
    """
    n = len(frame)
    reason = np.full(n, "", dtype=object)
    if "_reason" in frame:
        pre = frame["_reason"].fillna("").to_numpy(dtype=object)
        reason[:] = pre
    missing = frame[required].isna().any(axis=1).to_numpy()
    reason[(reason == "") & missing] = "missing_field"
    dup = np.zeros(n, dtype=bool)
    ok = reason == ""
    dup[ok] = frame.loc[ok, key].duplicated(keep="first").to_numpy()
    reason[dup] = f"duplicate_{key}"
    bad = reason != ""
    extra = [c for c in ("_reason", "_line", "_raw") if c in frame]
    valid = frame.loc[~bad].drop(columns=extra).reset_index(drop=True)
    q = frame.loc[bad]
    lines = q["_line"].tolist() if "_line" in q else [None] * len(q)
    records = q["_raw"].astype(str).tolist() if "_raw" in q else _json_records(q.drop(columns=extra))
    quarantined = quarantine_rows(table, source, lines, reason[bad].tolist(), records)
    counts: dict[str, int] = {}
    for r in reason[bad]:
        counts[r] = counts.get(r, 0) + 1
    return ValidationResult(valid, quarantined, counts)
