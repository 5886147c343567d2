"""Materialization into one online store: windows, per-store ends and pending, Redis markers and times."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.features import offline
from streamrec.features.push import utc_timestamp
from streamrec.features.repo import OnlineStoreSettings
from streamrec.features.spec import TIMESTAMP_FIELD, VIEWS, View

#: The ``pending`` key of a data directory from before per-store windows: the next store's.
ANY_STORE = "*"

#: Redis keys per pipeline of :meth:`Materializer.forget_times` (one pipeline of 200k keys took
#: about 2.3 s and its whole reply in memory).
FORGET_CHUNK = 10_000


def pending_by_store(meta: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``meta.json`` ``pending``: per online store, per view, the earliest cutoff built since.

    Every store this data directory materialized into (``online_ends``) has its own window; a
    store never materialized into loads every view from its earliest row and needs none. A data
    directory from before per-store windows (one ``view -> time`` map, or no ``online_ends``)
    keeps its map under :data:`ANY_STORE` for the next store to materialize.
    """
    raw = dict(meta.get("pending", {}))
    stores = list(meta.get("online_ends", {}))
    if "online_ends" not in meta:
        stores.append(ANY_STORE)
    if any(isinstance(v, str) for v in raw.values()):  # one map for every store
        return {s: {k: v for k, v in raw.items() if isinstance(v, str)} for s in stores}
    return {s: dict(raw.get(s, {})) for s in stores}


def previous_end(name: str, ends: dict[str, str], fvs: dict[str, Any], legacy: bool) -> pd.Timestamp | None:
    """The previous materialization end into an online store of view ``name`` (None: never).

    ``ends``: that store's ``meta.json`` ``online_ends``; Feast's registry end, shared by every
    store of the data directory, only for a data directory from before those were recorded
    (``legacy``).
    """
    if name in ends:
        return utc_timestamp(ends[name])
    end = fvs[name].most_recent_end_time if legacy else None
    return utc_timestamp(end) if end is not None else None


def recorded_end(name: str, meta: Mapping[str, Any], here: str, fvs: dict[str, Any]) -> pd.Timestamp | None:
    """Until when view ``name`` was materialized, for reads of the offline rows (None: never).

    This store's end (``meta.json`` ``online_ends[here]``); when it has none recorded (another
    spelling of the same Redis URL, the default SQLite client of a data directory served from
    Redis), the newest end recorded for any store, else Feast's registry end. The item table
    and the check need what has been materialized, not per-store precision; materialization
    itself uses :func:`previous_end`.
    """
    all_ends = meta.get("online_ends", {})
    if name in all_ends.get(here, {}):
        return utc_timestamp(all_ends[here][name])
    recorded = [utc_timestamp(e[name]) for e in all_ends.values() if name in e]
    if recorded:
        return max(recorded)
    fv = fvs.get(name)
    end = fv.most_recent_end_time if fv is not None else None
    return utc_timestamp(end) if end is not None else None


def entities_between(features_dir: Path, view: View, start: pd.Timestamp, stop: pd.Timestamp) -> np.ndarray:
    """The entity ids of the view's offline rows dated in ``[start, stop]``."""
    import pyarrow.parquet as pq

    keys: list[np.ndarray] = []
    for f in offline.files(features_dir, view):
        t = pq.read_table(f, columns=[view.join_key, TIMESTAMP_FIELD]).to_pandas()
        ts = pd.to_datetime(t[TIMESTAMP_FIELD], utc=True)
        keys.append(t.loc[(ts >= start) & (ts <= stop), view.join_key].to_numpy())
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)


def redis_marker(project: str, view: str) -> str:
    """The Redis key set after each materialization of ``view`` (gone: flushed or never)."""
    return f"streamrec:{project}:materialized:{view}"


@dataclass
class Materializer:
    """Materializes one data directory's offline rows into one online store.

    ``guard(what)`` turns the online store's errors into
    :class:`~streamrec.errors.OnlineStoreUnavailableError` (the client's).
    """

    store: Any
    settings: OnlineStoreSettings
    features_dir: Path
    guard: Callable[[str], AbstractContextManager[None]]

    def run(
        self,
        meta: dict[str, Any],
        fvs: dict[str, Any],
        stop: pd.Timestamp,
        *,
        quiet: Callable[[], AbstractContextManager[None]],
        update_meta: Callable[[Callable[[dict[str, Any]], None]], None],
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Materialize every view up to ``stop``, recording ends and pending in ``meta.json``.

        See :meth:`streamrec.features.client.FeatureClient.materialize`. ``meta`` is the
        contents read at the start; after each view, ``update_meta`` records its end in the
        contents re-read under the caller's lock and drops its pending entry only if it still
        holds the value read (a build meanwhile may have entered an earlier cutoff). ``quiet``
        wraps Feast's output.

        Returns:
            Per-view windows and entity rows written, and the total rows.
        """
        here = self.settings.describe()
        legacy = "online_ends" not in meta  # a data directory from before per-store ends
        by_store = pending_by_store(meta)
        pending = by_store.pop(ANY_STORE, None) or by_store.get(here, {})
        read = dict(pending)  # pending as read: entries a build changed since stay
        ends = dict(meta.get("online_ends", {}).get(here, {}))

        def record(name: str | None) -> None:
            def change(m: dict[str, Any]) -> None:
                now = pending_by_store(m)
                mine = now.pop(ANY_STORE, None) or now.get(here, {})
                if name is not None:
                    if name in read and mine.get(name) == read[name]:
                        mine.pop(name)
                    m.setdefault("online_ends", {}).setdefault(here, {})[name] = stop.isoformat()
                m["pending"] = {**now, here: mine}
                m.setdefault("online_ends", {}).setdefault(here, {})

            update_meta(change)

        fresh = {  # before writing anything: Redis keys hold every view of an entity together
            v.name for v in VIEWS if v.versioned and (v.name not in ends or self.view_empty(fvs[v.name]))
        }
        restored: dict[str, str] = {}  # a Redis marker older than the recorded end, or unreadable
        for v in VIEWS:
            if v.versioned and v.name not in fresh:
                why = self.marker_behind(v.name, utc_timestamp(ends[v.name]))
                if why is not None:
                    restored[v.name] = why
        fresh |= set(restored)  # reloaded from the earliest row, as a flushed Redis
        report: dict[str, dict[str, Any]] = {}
        total = 0
        for v in VIEWS:
            rng = offline.time_range(self.features_dir, v)
            if rng is None:
                report[v.name] = {"skipped": "no offline rows"}
                continue
            prev = previous_end(v.name, ends, fvs, legacy)
            if v.name in fresh:
                prev = None  # a store that holds nothing (or less than recorded) of this view: every entity
            start = utc_timestamp(prev) if prev is not None else rng[0]
            if v.name in pending:
                start = min(start, utc_timestamp(pending[v.name]))
            if start > stop:
                report[v.name] = {"skipped": f"already materialized until {start.isoformat()}"}
                continue
            ids = entities_between(self.features_dir, v, start, stop)  # read once per view
            n = len(ids)
            if n == 0:  # the window was processed: its end is recorded (a legacy view's first)
                report[v.name] = {"skipped": f"no rows between {start.isoformat()} and {stop.isoformat()}"}
                if v.versioned:  # the marker keeps up with the recorded end (behind it: a restore)
                    self.mark(v.name, stop)
                ends[v.name] = stop.isoformat()
                record(v.name)
                continue
            if v.versioned and self.settings.kind == "redis":  # whatever it holds, also when
                self.forget_times(v, fvs[v.name], start, stop, ids=ids)  # reloaded: upgraded, marker lost
            with self.guard(f"materialize {v.name}"), quiet():
                self.store.materialize(
                    start_date=start.to_pydatetime(), end_date=stop.to_pydatetime(), feature_views=[v.name]
                )
            if v.versioned:
                self.mark(v.name, stop)
            ends[v.name] = stop.isoformat()
            record(v.name)  # a later view failing keeps this one's end and pending
            report[v.name] = {"start": start.isoformat(), "end": stop.isoformat(), "rows": n}
            if v.name in restored:
                report[v.name]["reloaded"] = restored[v.name]
            total += n
        record(None)  # a legacy directory's pending becomes this store's
        return report, total

    def view_empty(self, fv: Any) -> bool:
        """Whether the online store holds nothing of the view (a SQLite file or Redis db emptied).

        SQLite: the view's table has no row. Redis: the view's marker key, set after each
        materialization (:func:`redis_marker`), is missing: a flushed database, even one that
        pushes wrote to since, or one materialized by a version before markers (its keys hold
        every view of an entity together, so their count cannot tell). Unknown stores: False.
        """
        online = self.store._get_provider().online_store
        config = self.store.config
        with self.guard("materialize"):
            if self.settings.kind == "sqlite" and hasattr(online, "_get_conn"):
                from feast.infra.online_stores.sqlite import _quote_id, _table_id

                versioned = bool(getattr(config.registry, "enable_online_feature_view_versioning", False))
                table = _quote_id(_table_id(config.project, fv, versioned))
                try:
                    return (
                        online._get_conn(config).execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
                    )
                except sqlite3.OperationalError:  # no table yet: apply creates it
                    return True
            if self.settings.kind == "redis" and hasattr(online, "_get_client"):
                return not online._get_client(config.online_store).exists(
                    redis_marker(config.project, fv.name)
                )
        return False

    def marker_end(self, view: str) -> pd.Timestamp | None:
        """The end the view's Redis marker (:func:`redis_marker`) holds; None: no marker, not Redis.

        Raises:
            ValueError: the marker does not parse as a time.
        """
        online = self.store._get_provider().online_store
        if self.settings.kind != "redis" or not hasattr(online, "_get_client"):
            return None
        with self.guard(f"materialize {view}"):
            raw = online._get_client(self.store.config.online_store).get(
                redis_marker(self.store.config.project, view)
            )
        if raw is None:
            return None
        try:
            end = utc_timestamp(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (ValueError, TypeError) as e:
            raise ValueError(f"marker {raw!r} is not a time") from e
        if pd.isna(end):
            raise ValueError(f"marker {raw!r} is not a time")
        return end

    def marker_behind(self, view: str, recorded: pd.Timestamp) -> str | None:
        """Why the view's Redis marker says Redis holds less than its recorded end, or None.

        ``recorded``: the view's end in ``meta.json`` for this store. None: not Redis, no
        marker (:meth:`view_empty` tells), or a marker at or after ``recorded``. Each materialization sets the marker before recording its end, also for a window with
        no rows, so a marker older than the recorded end means a Redis restored from an older
        snapshot (RDB, AOF): it holds that snapshot's rows, and a cutoff rebuilt at or before
        the snapshot's time and materialized since is in neither window. An unreadable marker
        tells nothing either. The caller reloads the view from its earliest row, as for a
        missing marker (:meth:`view_empty`).
        """
        try:
            end = self.marker_end(view)
        except ValueError as e:
            return f"{e}: reloaded from the earliest row"
        if end is None or end >= recorded:
            return None
        return (
            f"marker end {end.isoformat()} is before the recorded end {recorded.isoformat()} "
            "(restored from an older snapshot?): reloaded from the earliest row"
        )

    def mark(self, view: str, stop: pd.Timestamp) -> None:
        """Set the view's Redis marker (:func:`redis_marker`) to ``stop``; other stores: nothing."""
        online = self.store._get_provider().online_store
        if self.settings.kind == "redis" and hasattr(online, "_get_client"):
            with self.guard(f"materialize {view}"):
                online._get_client(self.store.config.online_store).set(
                    redis_marker(self.store.config.project, view), stop.isoformat()
                )

    def forget_times(
        self,
        view: View,
        fv: Any,
        start: pd.Timestamp,
        until: pd.Timestamp,
        *,
        ids: np.ndarray | None = None,
        chunk: int = FORGET_CHUNK,
    ) -> int:
        """Drop Redis's stored time of ``view`` (``fv``) for the entities with rows in ``[start, until]``.

        Feast's Redis store skips a row dated at or before the time it holds for the entity
        (an equal time too). A versioned view's rebuilt cutoff carries the same date as the row
        materialized from it before: without this, a changed value there would never reach
        Redis. Only the time field goes: the values stay readable until overwritten. One
        pipeline per ``chunk`` entities. ``ids``: those entities when the caller has read them
        (:func:`entities_between`), else they are read here.
        Returns how many entities were touched.
        """
        from feast.infra.online_stores.redis import _versioned_fv_name
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        online = self.store._get_provider().online_store
        config = self.store.config
        with self.guard(f"materialize {view.name}"):
            if not online._get_client(config.online_store).dbsize():  # nothing stored: no time
                return 0
        if ids is None:
            ids = entities_between(self.features_dir, view, start, until)
        if not len(ids):
            return 0
        ts_key = f"_ts:{_versioned_fv_name(fv, config)}"
        step = max(1, int(chunk))
        with self.guard(f"materialize {view.name}"):
            client = online._get_client(config.online_store)
            for lo in range(0, len(ids), step):
                keys = [
                    EntityKeyProto(join_keys=[view.join_key], entity_values=[ValueProto(int64_val=int(i))])
                    for i in ids[lo : lo + step]
                ]
                pipe = client.pipeline(transaction=False)
                for k in online._generate_redis_keys_for_entities(config, keys):
                    pipe.hdel(k, ts_key)
                pipe.execute()
        return len(ids)
