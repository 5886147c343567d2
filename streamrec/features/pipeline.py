"""Batch feature pipelines: validated data as of a cutoff -> one snapshot per view.

:func:`compute_snapshot` is a pure function of the users, items and events *strictly before*
``as_of``; every row it returns is stamped ``event_timestamp = as_of``, so a point-in-time join
can never hand an event a value computed from itself or from later events. Every snapshot covers
every known user / item (zeros and empty lists for the idle ones), so a materialization always
overwrites yesterday's online value instead of leaving it stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from streamrec.errors import MissingFeatureColumnsError
from streamrec.features.spec import (
    CATEGORY_PRIOR_STRENGTH,
    CREATED_FIELD,
    RATE_PRIOR_STRENGTH,
    RECENT_N,
    TIMESTAMP_FIELD,
)
from streamrec.features.transforms import TRENDING_LAMBDA, epoch_seconds, is_interaction

#: Longest window any batch feature looks back over.
MAX_WINDOW = timedelta(days=30)

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("user_id", "item_id", "event_type", "label", "timestamp"),
    "users": ("user_id", "signup_at"),
    "items": ("item_id", "categories", "creator", "published_at", "promoted", "flagged"),
}


@dataclass
class Snapshot:
    """Feature frames of one cutoff, plus the data-dependent defaults it implies.

    Attributes:
        as_of: The cutoff; events at or after it are not used.
        frames: ``view name -> frame`` (join key, features, event/created timestamps).
        defaults: Values for :class:`~streamrec.features.defaults.DefaultContext`.
        vocab: Category vocabulary the ``category_prefs`` vectors are aligned with.
    """

    as_of: pd.Timestamp
    frames: dict[str, pd.DataFrame]
    defaults: dict[str, Any] = field(default_factory=dict)
    vocab: list[str] = field(default_factory=list)


def check_columns(frame: pd.DataFrame, table: str) -> None:
    """Raise :class:`MissingFeatureColumnsError` naming every required column ``frame`` lacks."""
    missing = [c for c in REQUIRED_COLUMNS[table] if c not in frame.columns]
    if missing:
        raise MissingFeatureColumnsError(
            f"feature build: the {table} input lacks column(s) {', '.join(missing)} "
            f"(needs {', '.join(REQUIRED_COLUMNS[table])}); re-ingest the data or fix the source"
        )


def extend_vocab(vocab: list[str], items: pd.DataFrame) -> list[str]:
    """Append categories not yet in ``vocab`` (sorted), keeping existing positions (append-only)."""
    seen = set(vocab)
    new = sorted({str(c) for cats in items["categories"] for c in (cats if cats is not None else ())} - seen)
    return list(vocab) + new


def _utc(ts: datetime | pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _stamp(frame: pd.DataFrame, as_of: pd.Timestamp, created: pd.Timestamp) -> pd.DataFrame:
    frame[TIMESTAMP_FIELD] = as_of
    frame[CREATED_FIELD] = created
    return frame.reset_index(drop=True)


def compute_snapshot(
    users: pd.DataFrame,
    items: pd.DataFrame,
    events: pd.DataFrame,
    as_of: datetime | pd.Timestamp,
    vocab: list[str] | None = None,
    created: datetime | pd.Timestamp | None = None,
) -> Snapshot:
    """Compute every batch-built view as of ``as_of``.

    Args:
        users: Canonical users (``user_id``, ``signup_at``; optional ``age``, ``gender``,
            ``occupation``, ``region``).
        items: Canonical items (``item_id``, ``categories``, ``creator``, ``published_at``,
            ``promoted``, ``flagged``).
        events: Canonical events; only those with ``timestamp`` in ``[as_of - 30 d, as_of)`` are used.
        as_of: The cutoff (UTC; naive means UTC).
        vocab: Existing category vocabulary (extended append-only with the items' categories).
        created: Write time recorded in ``created_timestamp`` (default: now).

    Returns:
        The snapshot (frames for ``user_profile``, ``user_tenure``, ``user_activity_30d``,
        ``user_category_prefs``, ``user_recent_interactions``, ``item_metadata``,
        ``item_engagement_7d``, ``item_popularity``, ``item_trending``).

    Raises:
        MissingFeatureColumnsError: an input lacks a required column (all are named).
    """
    for frame, table in ((events, "events"), (users, "users"), (items, "items")):
        check_columns(frame, table)
    t = _utc(as_of)
    made = _utc(created) if created is not None else pd.Timestamp.now(tz="UTC")
    vocab = extend_vocab(list(vocab or []), items)
    ts = pd.to_datetime(events["timestamp"], utc=True)
    ev = events.loc[(ts >= t - MAX_WINDOW) & (ts < t)].copy()
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], utc=True)
    ev["label"] = ev["label"].astype("int64")
    t_s = float(epoch_seconds(pd.Series([t]))[0])

    user_ids = np.union1d(users["user_id"].to_numpy(dtype=np.int64), ev["user_id"].to_numpy(dtype=np.int64))
    item_ids = np.union1d(items["item_id"].to_numpy(dtype=np.int64), ev["item_id"].to_numpy(dtype=np.int64))
    p30 = float(ev["label"].mean()) if len(ev) else 0.0
    ev7 = ev.loc[ev["timestamp"] >= t - timedelta(days=7)]
    p7 = float(ev7["label"].mean()) if len(ev7) else p30

    frames: dict[str, pd.DataFrame] = {}
    frames["user_profile"] = _stamp(_user_profile(users, user_ids), t, made)
    frames["user_tenure"] = _stamp(_user_tenure(users, user_ids, t), t, made)
    frames["user_activity_30d"] = _stamp(_user_activity(ev, user_ids, t, p30), t, made)
    prefs, prior = _category_prefs(ev, items, user_ids, vocab)
    frames["user_category_prefs"] = _stamp(prefs, t, made)
    frames["user_recent_interactions"] = _stamp(_recent(ev, user_ids), t, made)
    frames["item_metadata"] = _stamp(_item_metadata(items, item_ids), t, made)
    frames["item_engagement_7d"] = _stamp(_item_engagement(ev7, item_ids, p7), t, made)
    frames["item_popularity"] = _stamp(_item_popularity(ev, item_ids), t, made)
    frames["item_trending"] = _stamp(_item_trending(ev, item_ids, t_s), t, made)
    defaults = {
        "engagement_rate_prior": p30,
        "item_ctr_prior": p7,
        "category_prior": [float(x) for x in prior],
        "top_category_prior": vocab[int(np.argmax(prior))] if len(vocab) else "unknown",
    }
    return Snapshot(t, frames, defaults, vocab)


def _users_at(users: pd.DataFrame, user_ids: np.ndarray) -> pd.DataFrame:
    return users.drop_duplicates("user_id", keep="last").set_index("user_id").reindex(user_ids)


def _user_profile(users: pd.DataFrame, user_ids: np.ndarray) -> pd.DataFrame:
    u = _users_at(users, user_ids)
    out = pd.DataFrame({"user_id": user_ids})

    def col(name: str) -> pd.Series:
        return u[name].reset_index(drop=True) if name in u.columns else pd.Series([None] * len(u))

    age = pd.to_numeric(col("age"), errors="coerce")
    out["age"] = age.astype("Int64")
    for name in ("gender", "occupation", "region"):
        c = col(name)
        out[name] = c.where(c.notna(), None).astype(object)
    return out


def _user_tenure(users: pd.DataFrame, user_ids: np.ndarray, t: pd.Timestamp) -> pd.DataFrame:
    signup = pd.to_datetime(_users_at(users, user_ids)["signup_at"].reset_index(drop=True), utc=True)
    tenure = ((t - signup) / pd.Timedelta(days=1)).clip(lower=0.0)
    return pd.DataFrame({"user_id": user_ids, "tenure_days": tenure.astype("float32").to_numpy()})


def _user_activity(ev: pd.DataFrame, user_ids: np.ndarray, t: pd.Timestamp, prior: float) -> pd.DataFrame:
    g = ev.assign(day=ev["timestamp"].dt.floor("D")).groupby("user_id")
    agg = pd.DataFrame(
        {
            "events_30d": g.size(),
            "positives_30d": g["label"].sum(),
            "active_days_30d": g["day"].nunique(),
            "distinct_items_30d": g["item_id"].nunique(),
            "last": g["timestamp"].max(),
        }
    ).reindex(user_ids)
    out = pd.DataFrame({"user_id": user_ids})
    n = agg["events_30d"].fillna(0).to_numpy(dtype=np.int64)
    pos = agg["positives_30d"].fillna(0).to_numpy(dtype=np.int64)
    out["events_30d"] = n
    out["positives_30d"] = pos
    out["engagement_rate_30d"] = ((pos + RATE_PRIOR_STRENGTH * prior) / (n + RATE_PRIOR_STRENGTH)).astype(
        np.float32
    )
    out["active_days_30d"] = agg["active_days_30d"].fillna(0).to_numpy(dtype=np.int64)
    out["distinct_items_30d"] = agg["distinct_items_30d"].fillna(0).to_numpy(dtype=np.int64)
    days = ((t - pd.to_datetime(agg["last"], utc=True)) / pd.Timedelta(days=1)).fillna(30.0).clip(upper=30.0)
    out["days_since_last_event"] = days.to_numpy(dtype=np.float32)
    return out


def _category_prefs(
    ev: pd.DataFrame, items: pd.DataFrame, user_ids: np.ndarray, vocab: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    c = len(vocab)
    pos = ev.loc[ev["label"] == 1, ["user_id", "item_id"]]
    cats = items[["item_id", "categories"]].drop_duplicates("item_id", keep="last")
    joined = pos.merge(cats, on="item_id", how="inner")
    sizes = joined["categories"].map(lambda v: len(v) if v is not None else 0).to_numpy()
    joined = joined.loc[sizes > 0]
    sizes = sizes[sizes > 0]
    exploded = joined.assign(w=1.0 / sizes).explode("categories")
    index = {name: i for i, name in enumerate(vocab)}
    cidx = exploded["categories"].map(index).to_numpy()
    uidx = np.searchsorted(user_ids, exploded["user_id"].to_numpy(dtype=np.int64))
    counts = np.zeros((len(user_ids), c), dtype=np.float64)
    if len(exploded):
        np.add.at(counts, (uidx, cidx.astype(np.int64)), exploded["w"].to_numpy(dtype=np.float64))
    totals = counts.sum(axis=0)
    prior = (totals + 1.0) / (totals.sum() + c) if c else np.zeros(0)
    user_tot = counts.sum(axis=1, keepdims=True)
    prefs = (counts + CATEGORY_PRIOR_STRENGTH * prior) / (user_tot + CATEGORY_PRIOR_STRENGTH)
    out = pd.DataFrame({"user_id": user_ids})
    out["category_prefs"] = list(prefs.astype(np.float32))
    out["top_category"] = [vocab[i] for i in prefs.argmax(axis=1)] if c else ["unknown"] * len(user_ids)
    out["category_positives"] = user_tot.ravel().astype(np.float32)
    return out, prior


def _recent(ev: pd.DataFrame, user_ids: np.ndarray) -> pd.DataFrame:
    inter = ev.loc[is_interaction(ev["event_type"], ev["label"])]
    # Events are in time order; most recent first, later rows first among equal timestamps.
    inter = inter.iloc[::-1].sort_values(["user_id", "timestamp"], ascending=[True, False], kind="stable")
    top = inter.groupby("user_id", sort=True).head(RECENT_N)
    uids = top["user_id"].to_numpy(dtype=np.int64)
    cuts = np.flatnonzero(uids[1:] != uids[:-1]) + 1
    firsts = uids[np.r_[0, cuts]] if len(uids) else uids
    secs = np.floor(epoch_seconds(top["timestamp"])).astype(np.int64)
    items_split = np.split(top["item_id"].to_numpy(dtype=np.int64), cuts) if len(uids) else []
    types_split = np.split(top["event_type"].to_numpy(dtype=object), cuts) if len(uids) else []
    secs_split = np.split(secs, cuts) if len(uids) else []
    pos = dict(zip(firsts.tolist(), range(len(firsts)), strict=True))
    empty_i = np.zeros(0, dtype=np.int64)
    rec_items: list[np.ndarray] = []
    rec_types: list[list[str]] = []
    rec_secs: list[np.ndarray] = []
    last: list[int] = []
    for u in user_ids.tolist():
        k = pos.get(u)
        if k is None:
            rec_items.append(empty_i)
            rec_types.append([])
            rec_secs.append(empty_i)
            last.append(0)
        else:
            rec_items.append(items_split[k])
            rec_types.append([str(x) for x in types_split[k]])
            rec_secs.append(secs_split[k])
            last.append(int(secs_split[k][0]))
    out = pd.DataFrame({"user_id": user_ids})
    out["recent_item_ids"] = rec_items
    out["recent_event_types"] = rec_types
    out["recent_timestamps"] = rec_secs
    out["last_interaction_at"] = np.asarray(last, dtype=np.int64)
    return out


def _item_metadata(items: pd.DataFrame, item_ids: np.ndarray) -> pd.DataFrame:
    it = items.drop_duplicates("item_id", keep="last").set_index("item_id").reindex(item_ids).reset_index()
    out = pd.DataFrame({"item_id": item_ids})
    cats = [list(v) if isinstance(v, list | np.ndarray) else None for v in it["categories"]]
    out["primary_category"] = [str(v[0]) if v else None for v in cats]
    out["categories"] = [[str(x) for x in v] if v is not None else None for v in cats]
    out["creator"] = it["creator"].where(it["creator"].notna(), None).astype(object)
    pub = pd.to_datetime(it["published_at"], utc=True)
    secs = pd.Series(np.floor(epoch_seconds(pub)), dtype="float64")
    out["published_at"] = secs.where(pub.notna()).astype("Int64")
    out["promoted"] = it["promoted"].astype("boolean")
    out["flagged"] = it["flagged"].astype("boolean")
    return out


def _item_engagement(ev7: pd.DataFrame, item_ids: np.ndarray, prior: float) -> pd.DataFrame:
    g = ev7.groupby("item_id")
    agg = pd.DataFrame({"n": g.size(), "pos": g["label"].sum(), "users": g["user_id"].nunique()}).reindex(
        item_ids
    )
    n = agg["n"].fillna(0).to_numpy(dtype=np.int64)
    pos = agg["pos"].fillna(0).to_numpy(dtype=np.int64)
    out = pd.DataFrame({"item_id": item_ids})
    out["item_events_7d"] = n
    out["item_positives_7d"] = pos
    out["item_ctr_7d"] = ((pos + RATE_PRIOR_STRENGTH * prior) / (n + RATE_PRIOR_STRENGTH)).astype(np.float32)
    out["item_users_7d"] = agg["users"].fillna(0).to_numpy(dtype=np.int64)
    return out


def _item_popularity(ev: pd.DataFrame, item_ids: np.ndarray) -> pd.DataFrame:
    pos = ev.loc[ev["label"] == 1].groupby("item_id").size().reindex(item_ids).fillna(0).astype(np.int64)
    out = pd.DataFrame({"item_id": item_ids})
    out["item_positives_30d"] = pos.to_numpy()
    out["popularity"] = np.log1p(pos.to_numpy(dtype=np.float64)).astype(np.float32)
    pct = pos.rank(method="average", pct=True).where(pos > 0, 0.0)
    out["popularity_pct"] = pct.to_numpy(dtype=np.float32)
    return out


def _item_trending(ev: pd.DataFrame, item_ids: np.ndarray, t_s: float) -> pd.DataFrame:
    pos = ev.loc[ev["label"] == 1, ["item_id", "timestamp"]]
    pos = pos.loc[pos["timestamp"] >= pd.Timestamp(t_s, unit="s", tz="UTC") - timedelta(days=7)]
    w = TRENDING_LAMBDA * np.exp(-TRENDING_LAMBDA * (t_s - epoch_seconds(pos["timestamp"])) / 3600.0)
    score = pd.Series(w, index=pos["item_id"].to_numpy()).groupby(level=0).sum().reindex(item_ids).fillna(0.0)
    out = pd.DataFrame({"item_id": item_ids})
    out["trending_score"] = score.to_numpy(dtype=np.float32)
    out["trending_updated_at"] = np.full(len(item_ids), int(np.floor(t_s)), dtype=np.int64)
    return out
