"""The rows a streaming push writes: pure functions of the events and the stored rows.

:meth:`~streamrec.features.client.FeatureClient.push_interactions` reads the stored online rows,
builds the new rows here and writes them (online, and appended offline). Each builder applies the
arithmetic of :mod:`streamrec.features.transforms`, the batch build's, to the new events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from streamrec.data.schema import EVENT_TYPES
from streamrec.errors import InvalidPayloadError
from streamrec.features.defaults import DefaultContext
from streamrec.features.spec import CREATED_FIELD, FEATURES, TIMESTAMP_FIELD, VIEWS_BY_NAME, View
from streamrec.features.transforms import add_category_positives, derive_label, merge_recent, trending_update

_ONE_US = pd.Timedelta(microseconds=1)

#: A stored online row as the client reads it: ``(event timestamp, {feature: value})`` or None.
Stored = tuple[Any, dict[str, Any]] | None


def utc_timestamp(ts: Any) -> pd.Timestamp:
    """``ts`` as a UTC :class:`pandas.Timestamp` (a naive time is UTC)."""
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


@dataclass(frozen=True)
class PushBatch:
    """Parsed push events, in time order, grouped as the views need them.

    Attributes:
        events: Every parsed event.
        interactions: Per user, their interactions (any non-impression event, or an engaged
            impression), in time order.
        positives: Per item, its positive events (label 1), in time order.
    """

    events: list[dict[str, Any]]
    interactions: dict[int, list[dict[str, Any]]]
    positives: dict[int, list[dict[str, Any]]]

    @classmethod
    def parse(cls, events: Iterable[Any]) -> PushBatch:
        """Validate and group push payloads (nothing is kept when one is malformed).

        Raises:
            InvalidPayloadError: a payload is malformed, naming it and the field.
        """
        parsed = sorted((parse_event(e, i) for i, e in enumerate(list(events))), key=lambda e: e["timestamp"])
        by_user: dict[int, list[dict[str, Any]]] = {}
        by_item: dict[int, list[dict[str, Any]]] = {}
        for e in parsed:
            if e["event_type"] != "impression" or e["label"] == 1:
                by_user.setdefault(e["user_id"], []).append(e)
            if e["label"] == 1:
                by_item.setdefault(e["item_id"], []).append(e)
        return cls(parsed, by_user, by_item)

    @property
    def n_interactions(self) -> int:
        """Interactions over all users."""
        return sum(len(v) for v in self.interactions.values())

    @property
    def n_positives(self) -> int:
        """Positive events over all items."""
        return sum(len(v) for v in self.positives.values())


def row_time(latest_event: pd.Timestamp, stored: Stored) -> pd.Timestamp:
    """Timestamp of a pushed row: just after its latest event and after the stored row.

    A training row at the event's own time therefore never sees the event.
    """
    t = utc_timestamp(latest_event) + _ONE_US
    if stored is not None and stored[0] is not None:
        t = max(t, utc_timestamp(stored[0]) + _ONE_US)
    return t


def recent_rows(
    interactions: Mapping[int, list[dict[str, Any]]], stored: Mapping[int, Stored], now: pd.Timestamp
) -> list[dict[str, Any]]:
    """``user_recent_interactions`` rows: each user's new interactions merged into the stored list."""
    out: list[dict[str, Any]] = []
    for uid, evs in interactions.items():
        row = stored.get(uid)
        cur = row[1] if row is not None else {}
        ids, types, stamps = merge_recent(
            list(cur.get("recent_item_ids") or []),
            list(cur.get("recent_event_types") or []),
            list(cur.get("recent_timestamps") or []),
            [e["item_id"] for e in evs],
            [e["event_type"] for e in evs],
            [int(math.floor(e["timestamp"].timestamp())) for e in evs],
        )
        out.append(
            {
                "user_id": uid,
                "recent_item_ids": ids,
                "recent_event_types": types,
                "recent_timestamps": stamps,
                "last_interaction_at": stamps[0] if stamps else 0,
                TIMESTAMP_FIELD: row_time(evs[-1]["timestamp"], row),
                CREATED_FIELD: now,
            }
        )
    return out


def trending_rows(
    positives: Mapping[int, list[dict[str, Any]]], stored: Mapping[int, Stored], now: pd.Timestamp
) -> list[dict[str, Any]]:
    """``item_trending`` rows: each item's stored score decayed and incremented by its positives."""
    out: list[dict[str, Any]] = []
    for iid, evs in positives.items():
        row = stored.get(iid)
        cur = row[1] if row is not None else {}
        score = float(cur.get("trending_score") or 0.0)
        at = float(cur.get("trending_updated_at") or 0.0)
        for e in evs:
            score, at = trending_update(score, at, e["timestamp"].timestamp())
        out.append(
            {
                "item_id": iid,
                "trending_score": float(np.float32(score)),
                "trending_updated_at": int(math.floor(at)),
                TIMESTAMP_FIELD: row_time(evs[-1]["timestamp"], row),
                CREATED_FIELD: now,
            }
        )
    return out


def category_prefs_rows(
    interactions: Mapping[int, list[dict[str, Any]]],
    stored: Mapping[int, Stored],
    item_categories: Mapping[int, Sequence[str]],
    vocab: Sequence[str],
    prior: Sequence[float],
    now: pd.Timestamp,
) -> list[dict[str, Any]]:
    """``user_category_prefs`` rows with each user's pushed positives added to their shares.

    A user without a stored row starts from the population ``prior`` with no positives. Users
    whose stored row is not aligned with ``vocab``, or has no positives count (a row written
    before the count existed), keep their row until the next build; so do users whose positives
    name no item with a category in ``vocab``.
    """
    known = set(vocab)
    out: list[dict[str, Any]] = []
    for uid, evs in interactions.items():
        cats = [
            [c for c in item_categories.get(e["item_id"], ()) if c in known] for e in evs if e["label"] == 1
        ]
        if not any(cats):  # no positive on an item with a category of the vocabulary
            continue
        row = stored.get(uid)
        cur: dict[str, Any] = (
            row[1] if row is not None else {"category_prefs": prior, "category_positives": 0.0}
        )
        prefs, count = cur.get("category_prefs"), cur.get("category_positives")
        if prefs is None or count is None or len(prefs) != len(vocab):
            continue
        shares, positives = add_category_positives(list(prefs), float(count), cats, vocab)
        out.append(
            {
                "user_id": uid,
                "category_prefs": shares,
                "top_category": vocab[int(np.argmax(shares))],
                "category_positives": float(np.float32(positives)),
                TIMESTAMP_FIELD: row_time(evs[-1]["timestamp"], row),
                CREATED_FIELD: now,
            }
        )
    return out


def parse_event(e: Any, i: int) -> dict[str, Any]:
    """Validate one push payload into ``user_id, item_id, event_type, label, timestamp``.

    Raises:
        InvalidPayloadError: naming the event's position and the field.
    """
    if not isinstance(e, Mapping):
        raise InvalidPayloadError(f"event {i}: expected an object, got {type(e).__name__}")
    out: dict[str, Any] = {}
    for key in ("user_id", "item_id"):
        v = e.get(key)
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise InvalidPayloadError(f"event {i}: '{key}' must be a non-negative integer, got {v!r}")
        if v < 0:
            raise InvalidPayloadError(f"event {i}: '{key}' must be a non-negative integer, got {v!r}")
        out[key] = int(v)
    et = e.get("event_type")
    if et not in EVENT_TYPES:
        raise InvalidPayloadError(
            f"event {i}: 'event_type' must be one of {', '.join(EVENT_TYPES)}, got {et!r}"
        )
    out["event_type"] = et
    rating = e.get("rating")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int | float)):
        raise InvalidPayloadError(f"event {i}: 'rating' must be a number, got {rating!r}")
    label = e.get("label")
    if label is None:
        label = derive_label(et, rating)
    elif isinstance(label, bool) or label not in (0, 1):
        raise InvalidPayloadError(f"event {i}: 'label' must be 0 or 1, got {label!r}")
    out["label"] = int(label)
    ts = e.get("timestamp")
    try:
        if ts is None:
            t = pd.Timestamp.now(tz="UTC")
        elif isinstance(ts, int | float) and not isinstance(ts, bool):
            if not math.isfinite(ts):
                raise ValueError("not finite")
            t = pd.Timestamp(ts, unit="s", tz="UTC")
        elif isinstance(ts, str | datetime | pd.Timestamp):
            t = utc_timestamp(ts)
        else:
            raise ValueError(f"unsupported type {type(ts).__name__}")
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidPayloadError(f"event {i}: 'timestamp' {ts!r} is not a time ({err})") from None
    if pd.isna(t):
        raise InvalidPayloadError(f"event {i}: 'timestamp' is missing")
    out["timestamp"] = t
    return out


def merged_rows(
    batch: PushBatch,
    user_read: Mapping[str, list[Stored]],
    item_read: Mapping[str, list[Stored]],
    meta: Mapping[str, Any],
    now: pd.Timestamp,
) -> list[tuple[View, list[dict[str, Any]]]]:
    """The new rows of the push views: the stored online rows with the events of ``batch`` merged in.

    ``user_read`` / ``item_read``: the stored online rows of the batch's users (their
    interactions) and items (their positives), ``view -> [row | None per id]`` in the batch's
    order; ``meta``: the build's ``meta.json`` (the vocabulary and the prior of the same build).

    Returns:
        ``(view, rows)`` for each view that gets rows (the user views first).
    """
    recent_v, prefs_v = VIEWS_BY_NAME["user_recent_interactions"], VIEWS_BY_NAME["user_category_prefs"]
    trend_v, meta_v = VIEWS_BY_NAME["item_trending"], VIEWS_BY_NAME["item_metadata"]
    users, items = list(batch.interactions), list(batch.positives)

    def stored(read: Mapping[str, list[Stored]], view: View, ids: list[int]) -> dict[int, Any]:
        return dict(zip(ids, read.get(view.name, [None] * len(ids)), strict=True))

    item_cats = {
        iid: list((row[1] if row is not None else {}).get("categories") or [])
        for iid, row in stored(item_read, meta_v, items).items()
    }
    prior = list(
        DefaultContext(dict(meta.get("defaults", {}))).resolve(FEATURES["category_prefs"].default) or []
    )
    return [
        (view, rows)
        for view, rows in (
            (recent_v, recent_rows(batch.interactions, stored(user_read, recent_v, users), now)),
            (
                prefs_v,
                category_prefs_rows(
                    batch.interactions,
                    stored(user_read, prefs_v, users),
                    item_cats,
                    list(meta.get("category_vocab", [])),
                    prior,
                    now,
                ),
            ),
            (trend_v, trending_rows(batch.positives, stored(item_read, trend_v, items), now)),
        )
        if rows
    ]
