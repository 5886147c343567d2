"""The feature store client used by training pipelines and serving stages.

:class:`FeatureClient` wraps Feast for one StreamRec data directory. It never imports Ray, so a
Serve deployment simply holds one. Typical use::

    fc = FeatureClient(data_dir, online="redis", redis_url="redis://127.0.0.1:6379/0")
    fc.build(as_of)               # batch features -> offline parquet
    fc.apply()                    # register definitions (feature_repo/) in the registry
    fc.materialize()              # offline -> online, incremental
    train = fc.training_set(labelled_events)           # point-in-time correct, defaults applied
    feats = fc.online_user_features(42)                 # one user, milliseconds
    table = fc.item_table()                             # numpy arrays for the ranker
    fc.push_interaction({"user_id": 42, "item_id": 7, "event_type": "click", "timestamp": t})

Errors: :class:`~streamrec.errors.OnlineStoreUnavailableError` when the online store cannot be
reached (serving catches it to degrade), :class:`~streamrec.errors.InvalidPayloadError` for a
malformed push (nothing written), :class:`~streamrec.errors.MissingFeatureColumnsError` for
inputs without required columns, :class:`~streamrec.errors.FeatureStoreError` otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from streamrec.data.schema import storable_id
from streamrec.data.store import DataStore
from streamrec.errors import (
    FeatureStoreError,
    InvalidPayloadError,
    MissingFeatureColumnsError,
    OnlineStoreUnavailableError,
)
from streamrec.features import offline
from streamrec.features.defaults import DefaultContext, apply_defaults
from streamrec.features.item_table import ItemFeatureTable
from streamrec.features.pipeline import MAX_WINDOW, compute_snapshot
from streamrec.features.push import (
    PushBatch,
    category_prefs_rows,
    recent_rows,
    trending_rows,
    utc_timestamp,
)
from streamrec.features.repo import OnlineStoreSettings, load_definitions, repo_config
from streamrec.features.spec import (
    CREATED_FIELD,
    FEATURES,
    TIMESTAMP_FIELD,
    VIEWS,
    VIEWS_BY_NAME,
    View,
    service_views,
    views_for,
)
from streamrec.features.versions import VersionedWriter
from streamrec.paths import DataLayout, exclusive_file_lock

if TYPE_CHECKING:
    from streamrec.features.check import CheckReport

#: Entity keys per SQLite statement of the one-statement online read (SQLite caps bound variables).
_SQLITE_KEYS_PER_STATEMENT = 500
#: The Redis push lock expires this long after it was taken (a holder that died frees it).
_PUSH_LOCK_TTL_S = 30.0
#: How long a push waits for the Redis push lock before giving up.
_PUSH_LOCK_WAIT_S = 10.0


#: The ``pending`` key of a data directory from before per-store windows: the next store's.
_ANY_STORE = "*"


def _pending_by_store(meta: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``meta.json`` ``pending``: per online store, per view, the earliest cutoff built since.

    Every store this data directory materialized into (``online_ends``) has its own window; a
    store never materialized into loads every view from its earliest row and needs none. A data
    directory from before per-store windows (one ``view -> time`` map, or no ``online_ends``)
    keeps its map under :data:`_ANY_STORE` for the next store to materialize.
    """
    raw = dict(meta.get("pending", {}))
    stores = list(meta.get("online_ends", {}))
    if "online_ends" not in meta:
        stores.append(_ANY_STORE)
    if any(isinstance(v, str) for v in raw.values()):  # one map for every store
        return {s: {k: v for k, v in raw.items() if isinstance(v, str)} for s in stores}
    return {s: dict(raw.get(s, {})) for s in stores}


def _online_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.RedisError, sqlite3.Error, ConnectionError, TimeoutError, OSError)


def resolve_as_of(value: str | datetime | None, store: DataStore) -> pd.Timestamp:
    """Parse a build cutoff: ISO time, ``now``, or ``latest``/None (one second after the last event).

    Raises:
        FeatureStoreError: ``latest`` with no stored events, or an unparseable time.
    """
    if value is None or (isinstance(value, str) and value.lower() == "latest"):
        dates = store.event_dates()
        if not dates:
            raise FeatureStoreError(
                f"no validated events in {store.layout.root}: "
                "run `streamrec data ingest` or `streamrec data synth` first"
            )
        last = store.events(
            start=datetime.combine(dates[-1], datetime.min.time(), tzinfo=UTC), columns=["timestamp"]
        )
        return utc_timestamp(last["timestamp"].max()).floor("s") + pd.Timedelta(seconds=1)
    if isinstance(value, str) and value.lower() == "now":
        return pd.Timestamp.now(tz="UTC").floor("s")
    try:
        return utc_timestamp(value)
    except (ValueError, TypeError) as err:
        raise FeatureStoreError(
            f"invalid --as-of '{value}': use an ISO time, 'now' or 'latest' ({err})"
        ) from None


@dataclass
class BuildReport:
    """What :meth:`FeatureClient.build` wrote."""

    as_of: str
    snapshots: list[str]
    rows: dict[str, int]
    users: int
    items: int
    events_read: int
    files: int
    compacted: int
    seconds: float
    rewritten: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


@dataclass
class MaterializeReport:
    """What :meth:`FeatureClient.materialize` wrote to the online store."""

    end: str
    online_store: str
    views: dict[str, dict[str, Any]]
    rows: int
    seconds: float
    rows_per_second: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


@dataclass
class PushResult:
    """What one :meth:`FeatureClient.push_interactions` call updated."""

    events: int
    interactions: int
    positives: int
    users_updated: int
    items_updated: int
    seconds: float


class FeatureClient:
    """Feature store access for one data directory (offline build, Feast, online, item table).

    Args:
        data_dir: StreamRec data directory (default: ``$STREAMREC_HOME`` or ``./.streamrec``);
            features live in ``<data_dir>/features``.
        online: ``sqlite`` or ``redis`` (default: ``$STREAMREC_ONLINE_STORE``, else Redis when a
            Redis URL is configured, else SQLite).
        redis_url: ``redis://host:port/db`` (default: ``$STREAMREC_REDIS_URL``).
        timeout_s: Redis socket timeout; a dead server fails within about this time.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        online: str | None = None,
        redis_url: str | None = None,
        *,
        timeout_s: float = 0.5,
    ) -> None:
        self.layout = DataLayout.at(data_dir)
        self.features_dir = self.layout.features
        self.settings = OnlineStoreSettings.resolve(online, redis_url, timeout_s)
        self.stats: Counter[str] = Counter()
        self._store: Any = None
        self._context: DefaultContext | None = None
        self._item_table: ItemFeatureTable | None = None
        self._readers: dict[str, list[tuple[Any, list[str]]]] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def meta_path(self) -> os.PathLike[str]:
        """``features/meta.json``: category vocabulary, data-dependent defaults, last build."""
        return self.features_dir / "meta.json"

    def built_at(self) -> float | None:
        """When the offline features were last built (epoch seconds; None before the first build)."""
        at = self._meta().get("last_build", {}).get("built_at")
        return pd.Timestamp(at).timestamp() if at else None

    def _meta(self) -> dict[str, Any]:
        p = self.features_dir / "meta.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def _write_meta(self, meta: dict[str, Any]) -> None:
        self.features_dir.mkdir(parents=True, exist_ok=True)
        p = self.features_dir / "meta.json"
        tmp = p.with_name(f".meta.json.{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, p)
        self._context = None

    @property
    def context(self) -> DefaultContext:
        """Data-dependent defaults of the latest build (cached; reloaded after build/embeddings)."""
        if self._context is None:
            self._context = DefaultContext(dict(self._meta().get("defaults", {})))
        return self._context

    @property
    def category_vocab(self) -> list[str]:
        """Category vocabulary of the builds (the ``category_prefs`` vector positions)."""
        return list(self._meta().get("category_vocab", []))

    @property
    def store(self) -> Any:
        """The :class:`feast.FeatureStore` of this data directory (created on first use)."""
        if self._store is None:
            from feast import FeatureStore

            config = repo_config(self.features_dir, self.settings)
            self._store = FeatureStore(repo_path=str(self.features_dir), config=config)
            if self.settings.kind == "redis":
                self._fail_fast_redis()
        return self._store

    def _fail_fast_redis(self) -> None:
        """One immediate retry instead of redis-py's default backoff (seconds when Redis is down).

        Serving must learn within its deadline that the store is down, to fall back.
        """
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        online = self._store._get_provider().online_store
        get_client = getattr(online, "_get_client", None)
        if get_client is not None:
            get_client(self._store.config.online_store).set_retry(Retry(NoBackoff(), 1))

    def _registered(self, refresh: bool = False) -> dict[str, Any]:
        if refresh:
            self.store.refresh_registry()
        try:
            fvs = self.store.list_feature_views(allow_cache=True)
        except Exception as err:  # registry file absent or unreadable
            raise FeatureStoreError(
                f"Feast registry in {self.features_dir} is not readable ({err}); "
                "run `streamrec features apply`"
            ) from None
        return {fv.name: fv for fv in fvs}

    def _require_applied(self, refresh: bool = False) -> dict[str, Any]:
        fvs = self._registered(refresh)
        missing = [v.name for v in VIEWS if v.name not in fvs]
        if missing:
            raise FeatureStoreError(
                f"feature views not registered in {self.features_dir}: {', '.join(missing)}; "
                "run `streamrec features apply`"
            )
        return fvs

    @contextlib.contextmanager
    def _feast_output(self, progress: bool) -> Iterator[None]:
        """Feast prints to stdout; keep stdout clean (JSON) by sending it to stderr or nowhere."""
        target = sys.stderr if progress else io.StringIO()
        with contextlib.redirect_stdout(target):
            yield

    @contextlib.contextmanager
    def _online_guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except OnlineStoreUnavailableError:
            raise
        except _online_errors() as err:
            self.stats["online_errors"] += 1
            raise OnlineStoreUnavailableError(
                f"online store ({self.settings.describe()}) unavailable during {what}: {err}"
            ) from err

    @contextlib.contextmanager
    def _push_lock(self) -> Iterator[None]:
        """Serialise the read-modify-write of :meth:`push_interactions` across processes.

        A push reads the current rows, merges the events in and writes the rows back: two
        gateway replicas pushing for the same user or item at the same moment would otherwise
        each write a merge that lacks the other's events. SQLite (a local file, so one machine):
        an exclusive ``flock`` on ``<features>/push.lock``. Redis (possibly many machines): a
        Redis lock per project that expires after ``_PUSH_LOCK_TTL_S`` if its holder dies.
        """
        if self.settings.kind == "redis":
            online = self.store._get_provider().online_store
            client = online._get_client(self.store.config.online_store)
            lock = client.lock(
                f"streamrec:{self.store.config.project}:push-lock",
                timeout=_PUSH_LOCK_TTL_S,
                blocking_timeout=_PUSH_LOCK_WAIT_S,
            )
            with self._online_guard("push lock"):
                acquired = lock.acquire()
            if not acquired:
                raise OnlineStoreUnavailableError(
                    f"online store ({self.settings.describe()}): the push lock stayed taken for "
                    f"{_PUSH_LOCK_WAIT_S:g} s; another process is pushing or died holding it (it expires "
                    f"after {_PUSH_LOCK_TTL_S:g} s)"
                )
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # expired meanwhile: nothing left to release
                    lock.release()
            return
        with exclusive_file_lock(self.features_dir / "push.lock"):
            yield

    # --------------------------------------------------------------------- build
    def build(
        self,
        as_of: str | datetime | None = None,
        *,
        snapshots: int = 1,
        every: timedelta = timedelta(days=1),
        cutoffs: Sequence[datetime | pd.Timestamp] | None = None,
        progress: bool = False,
        extra: bool = False,
    ) -> BuildReport:
        """Compute the batch features of the validated data into the offline store.

        Writes one snapshot file per batch/stream view for each cutoff ``as_of - k * every``
        (``k < snapshots``), or for each of ``cutoffs``; rebuilding a cutoff replaces its files.
        Several snapshots give point-in-time training sets a value close before every event.
        A versioned view (:attr:`~streamrec.features.spec.View.versioned`) gets at each cutoff
        only the rows that differ from the stored state before it (:mod:`.versions`; an
        existing later cutoff is rewritten when that state changed: :attr:`BuildReport.rewritten`,
        and it is materialized again). ``rows`` counts the rows written. Records the category
        vocabulary and data-dependent defaults in ``features/meta.json`` and compacts push files.

        Args:
            as_of: Cutoff: ISO time, ``now``, or ``latest``/None (just after the last event).
            snapshots: Number of daily (``every``) cutoffs ending at ``as_of``.
            every: Spacing of the cutoffs.
            cutoffs: Explicit cutoffs instead of ``as_of`` / ``snapshots`` / ``every`` (the
                training pipeline's: the times it reads features at).
            progress: Show a progress bar on stderr.
            extra: Add snapshots for point-in-time reads only (the rolling evaluation's earlier
                cutoffs, :mod:`streamrec.pipeline.rolling`): the recorded data-dependent
                defaults, the pending materialisation and the last build stay those of the
                previous build (the vocabulary still grows). A versioned view's cutoff that
                changed rows enters the pending window when it is at or after the newest
                stored cutoff (it holds the newest state); an earlier one reaches the online
                store through the next stored cutoff, rewritten when its state changed.

        Returns:
            Rows per view, files written, timing.

        Raises:
            FeatureStoreError: no data, bad ``as_of``.
            MissingFeatureColumnsError: the stored data lacks a required column.
        """
        from tqdm import tqdm

        t0 = time.perf_counter()
        if snapshots < 1:
            raise FeatureStoreError("--snapshots must be at least 1")
        ds = DataStore(self.layout.root)
        users, items = ds.users(), ds.items()
        if users.empty and items.empty:
            raise FeatureStoreError(
                f"no validated users or items in {self.layout.root}: "
                "run `streamrec data ingest` or `streamrec data synth` first"
            )
        times: list[pd.Timestamp]
        if cutoffs is not None:
            times = sorted({utc_timestamp(t) for t in cutoffs})
            if not times:
                raise FeatureStoreError("features build: cutoffs is empty; give at least one time")
            cutoff = times[-1]
        else:
            cutoff = resolve_as_of(as_of, ds)
            times = [cutoff - k * every for k in reversed(range(snapshots))]
        cols = ["user_id", "item_id", "event_type", "label", "timestamp"]
        events = ds.events(
            start=(times[0] - MAX_WINDOW).to_pydatetime(), end=cutoff.to_pydatetime(), columns=cols
        )
        meta = self._meta()
        vocab = list(meta.get("category_vocab", []))
        rows: Counter[str] = Counter()
        files = 0
        snap = None
        pending = _pending_by_store(meta)
        bar = tqdm(
            total=len(times), desc="features build", unit="snapshot", disable=not progress, file=sys.stderr
        )
        for v in VIEWS:  # files written before a feature was added: the new files' schema
            offline.upgrade_files(self.features_dir, v)
        made = pd.Timestamp.now(tz="UTC")
        writers = {v.name: VersionedWriter(self.features_dir, v, times, made) for v in VIEWS if v.versioned}

        def enter_pending(name: str, t: pd.Timestamp) -> None:
            for views in pending.values():  # every online store has its own window
                prev = views.get(name)
                views[name] = t.isoformat() if prev is None else min(utc_timestamp(prev), t).isoformat()

        for t in times:
            snap = compute_snapshot(users, items, events, t, vocab, created=made)
            vocab = snap.vocab
            for name, frame in snap.frames.items():
                view = VIEWS_BY_NAME[name]
                if name in writers:
                    w = writers[name]
                    w.add(t, frame)
                    if extra and w.written.get(t) and (w.newest_stored is None or t >= w.newest_stored):
                        enter_pending(name, t)  # the newest state: no later cutoff's rewrite carries it
                else:
                    offline.write_snapshot(self.features_dir, view, frame, t)
                    rows[name] += len(frame)
                files += 1
                if not extra:
                    enter_pending(name, t)
            bar.update(1)
        bar.close()
        rewritten: dict[str, list[str]] = {}
        for name, w in writers.items():
            again = w.finish()
            files += len(again)
            rows[name] += w.rows
            for t in again:  # already materialized maybe, with rows that no longer hold there
                enter_pending(name, t)
            if again:
                rewritten[name] = [t.isoformat() for t in again]
        compacted = sum(offline.compact(self.features_dir, v) for v in VIEWS if v.mode == "stream")
        assert snap is not None
        if extra:  # snapshots for point-in-time reads only: the recorded build stays as it was
            meta["category_vocab"] = vocab
            meta["pending"] = pending  # changed only by versioned views (see extra)
        else:
            defaults = dict(meta.get("defaults", {}))
            defaults.update(snap.defaults)
            meta.update(
                {
                    "category_vocab": vocab,
                    "defaults": defaults,
                    "pending": pending,
                    "last_build": {
                        "as_of": cutoff.isoformat(),
                        "snapshots": [t.isoformat() for t in times],
                        "built_at": pd.Timestamp.now(tz="UTC").isoformat(),
                    },
                }
            )
        self._write_meta(meta)
        return BuildReport(
            as_of=cutoff.isoformat(),
            snapshots=[t.isoformat() for t in times],
            rows=dict(rows),
            users=int(users["user_id"].nunique()),
            items=int(items["item_id"].nunique()),
            events_read=len(events),
            files=files,
            compacted=compacted,
            seconds=round(time.perf_counter() - t0, 3),
            rewritten=rewritten,
        )

    # --------------------------------------------------------------------- apply
    def apply(self) -> dict[str, Any]:
        """Register the definitions of ``feature_repo/`` for this data directory (idempotent).

        Renders ``features/feature_store.yaml``, registers entities, sources, views, push
        sources and services, creates the online tables, and removes views that are no longer
        defined.

        Returns:
            ``{"registry": path, "online_store": ..., "feature_views": [...], "removed": [...],
            "upgraded_files": n}`` (offline files rewritten to the current schema: a feature the
            spec added since they were written is null in them, i.e. its default).
        """
        mod = load_definitions(self.features_dir)
        objects = list(mod.ALL_OBJECTS)
        defined = {v.name for v in VIEWS}
        stale = []
        with contextlib.suppress(Exception):
            stale = [fv for fv in self.store.list_feature_views() if fv.name not in defined]
        upgraded = 0
        for v in VIEWS:  # Feast validates that the source folders exist
            offline.view_dir(self.features_dir, v).mkdir(parents=True, exist_ok=True)
            upgraded += offline.upgrade_files(self.features_dir, v)  # files older than the spec
        with self._online_guard("apply"), self._feast_output(False):
            self.store.apply(objects, objects_to_delete=stale, partial=not stale)
        self._readers.clear()
        return {
            "registry": str(self.features_dir / "registry.db"),
            "config": str(self.features_dir / "feature_store.yaml"),
            "online_store": self.settings.describe(),
            "feature_views": sorted(defined),
            "feature_services": sorted(mod.FEATURE_SERVICES),
            "removed": [fv.name for fv in stale],
            "upgraded_files": upgraded,
        }

    # --------------------------------------------------------------- materialize
    def materialize(self, end: datetime | str | None = None, *, progress: bool = False) -> MaterializeReport:
        """Load the newest offline rows into the online store, incrementally per view.

        Each view is materialized from its previous materialization end into this online
        store (``meta.json`` ``online_ends``, per store and view; Feast's registry end, shared
        by the stores, only for a data directory from before those) or its earliest row the
        first time, or the earliest cutoff built since that this store has not materialized
        (``meta.json`` ``pending``, per store), whichever is earlier, to ``end`` (inclusive;
        default now). Views without offline rows are skipped. The item table, if
        loaded, is reloaded.

        A versioned view has no row in the window for an entity unchanged since long ago: the
        online store keeps what it had. So a versioned view is materialized from its earliest
        row into an online store this data directory has not materialized it into before
        (``meta.json`` ``online_ends``, per store: a Redis store next to a used SQLite one gets
        every entity) or that holds nothing of it (an emptied SQLite table, or a Redis database without the
        view's marker key: flushed, even if pushes wrote to it since). On Redis, which never writes a row dated at or before the one it holds,
        the entities with rows in the window lose their stored time first (also when the view
        is reloaded from its earliest row: Redis may hold it from before markers), so a cutoff
        rebuilt with other values overwrites them as on SQLite.

        Returns:
            Per-view windows and entity rows written, total throughput.

        Raises:
            FeatureStoreError: definitions not applied.
            OnlineStoreUnavailableError: the online store cannot be written.
        """
        t0 = time.perf_counter()
        stop = utc_timestamp(end) if end is not None else pd.Timestamp.now(tz="UTC")
        fvs = self._require_applied(refresh=True)
        meta = self._meta()
        here = self.settings.describe()
        legacy = "online_ends" not in meta  # a data directory from before per-store ends
        by_store = _pending_by_store(meta)
        pending = by_store.pop(_ANY_STORE, None) or by_store.get(here, {})
        meta["pending"] = {**by_store, here: pending}
        ends = meta.setdefault("online_ends", {}).setdefault(here, {})
        fresh = {  # before writing anything: Redis keys hold every view of an entity together
            v.name
            for v in VIEWS
            if v.versioned and (v.name not in ends or self._online_view_empty(fvs[v.name]))
        }
        report: dict[str, dict[str, Any]] = {}
        total = 0
        for v in VIEWS:
            rng = offline.time_range(self.features_dir, v)
            if rng is None:
                report[v.name] = {"skipped": "no offline rows"}
                continue
            prev = self._previous_end(v.name, ends, fvs, legacy)
            if v.name in fresh:
                prev = None  # a store that holds nothing of this view: every entity
            start = utc_timestamp(prev) if prev is not None else rng[0]
            if v.name in pending:
                start = min(start, utc_timestamp(pending[v.name]))
            if start > stop:
                report[v.name] = {"skipped": f"already materialized until {start.isoformat()}"}
                continue
            n = self._count_entities(v, start, stop)
            if n == 0:
                report[v.name] = {"skipped": f"no rows between {start.isoformat()} and {stop.isoformat()}"}
                continue
            if v.versioned and self.settings.kind == "redis":  # whatever it holds, also when
                self._redis_forget_times(v, start, stop)  # reloaded: upgraded, marker lost
            with self._online_guard(f"materialize {v.name}"), self._feast_output(progress):
                self.store.materialize(
                    start_date=start.to_pydatetime(), end_date=stop.to_pydatetime(), feature_views=[v.name]
                )
            if v.versioned:
                self._mark_materialized(v.name, stop)
            pending.pop(v.name, None)
            ends[v.name] = stop.isoformat()
            report[v.name] = {"start": start.isoformat(), "end": stop.isoformat(), "rows": n}
            total += n
            self._write_meta(meta)  # a later view failing keeps this one's end and pending
        self._write_meta(meta)
        self.store.refresh_registry()
        if self._item_table is not None:
            self._item_table = None
            self.item_table()
        secs = time.perf_counter() - t0
        return MaterializeReport(
            end=stop.isoformat(),
            online_store=self.settings.describe(),
            views=report,
            rows=total,
            seconds=round(secs, 3),
            rows_per_second=round(total / secs, 1) if secs > 0 else 0.0,
        )

    @staticmethod
    def _previous_end(
        name: str, ends: dict[str, str], fvs: dict[str, Any], legacy: bool
    ) -> pd.Timestamp | None:
        """The previous materialization end into this client's online store of view ``name`` (None: never).

        ``meta.json`` ``online_ends`` per store; Feast's registry end, shared by every store of
        the data directory, only for a data directory from before those were recorded.
        """
        if name in ends:
            return utc_timestamp(ends[name])
        end = fvs[name].most_recent_end_time if legacy else None
        return utc_timestamp(end) if end is not None else None

    def materialized_until(self, name: str, fvs: dict[str, Any] | None = None) -> pd.Timestamp | None:
        """Until when view ``name`` was materialized into this client's online store (None: never)."""
        meta = self._meta()
        fvs = fvs if fvs is not None else self._registered()
        ends = meta.get("online_ends", {}).get(self.settings.describe(), {})
        if name not in fvs:
            return None
        return self._previous_end(name, ends, fvs, "online_ends" not in meta)

    def _entities_between(self, view: View, start: pd.Timestamp, stop: pd.Timestamp) -> np.ndarray:
        import pyarrow.parquet as pq

        keys: list[np.ndarray] = []
        for f in offline.files(self.features_dir, view):
            t = pq.read_table(f, columns=[view.join_key, TIMESTAMP_FIELD]).to_pandas()
            ts = pd.to_datetime(t[TIMESTAMP_FIELD], utc=True)
            keys.append(t.loc[(ts >= start) & (ts <= stop), view.join_key].to_numpy())
        return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)

    def _count_entities(self, view: View, start: pd.Timestamp, stop: pd.Timestamp) -> int:
        return len(self._entities_between(view, start, stop))

    def _online_view_empty(self, fv: Any) -> bool:
        """Whether the online store holds nothing of the view (a SQLite file or Redis db emptied).

        SQLite: the view's table has no row. Redis: the view's marker key, set after each
        materialization (:meth:`_redis_marker`), is missing: a flushed database, even one that
        pushes wrote to since, or one materialized by a version before markers (its keys hold
        every view of an entity together, so their count cannot tell). Unknown stores: False.
        """
        online = self.store._get_provider().online_store
        config = self.store.config
        with self._online_guard("materialize"):
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
                return not online._get_client(config.online_store).exists(self._redis_marker(fv.name))
        return False

    def _redis_marker(self, view: str) -> str:
        """The Redis key set after each materialization of ``view`` (gone: flushed or never)."""
        return f"streamrec:{self.store.config.project}:materialized:{view}"

    def _mark_materialized(self, view: str, stop: pd.Timestamp) -> None:
        online = self.store._get_provider().online_store
        if self.settings.kind == "redis" and hasattr(online, "_get_client"):
            with self._online_guard(f"materialize {view}"):
                online._get_client(self.store.config.online_store).set(
                    self._redis_marker(view), stop.isoformat()
                )

    def _redis_forget_times(self, view: View, start: pd.Timestamp, until: pd.Timestamp) -> int:
        """Drop Redis's stored time of ``view`` for the entities with rows in ``[start, until]``.

        Feast's Redis store skips a row dated at or before the time it holds for the entity
        (an equal time too). A versioned view's rebuilt cutoff carries the same date as the row
        materialized from it before: without this, a changed value there would never reach
        Redis. Only the time field goes: the values stay readable until overwritten.
        Returns how many entities were touched.
        """
        from feast.infra.online_stores.redis import _versioned_fv_name
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        online = self.store._get_provider().online_store
        config = self.store.config
        with self._online_guard(f"materialize {view.name}"):
            if not online._get_client(config.online_store).dbsize():  # nothing stored: no time
                return 0
        ids = self._entities_between(view, start, until)
        if not len(ids):
            return 0
        ts_key = f"_ts:{_versioned_fv_name(self._require_applied()[view.name], config)}"
        keys = [
            EntityKeyProto(join_keys=[view.join_key], entity_values=[ValueProto(int64_val=int(i))])
            for i in ids
        ]
        with self._online_guard(f"materialize {view.name}"):
            client = online._get_client(config.online_store)
            pipe = client.pipeline(transaction=False)
            for k in online._generate_redis_keys_for_entities(config, keys):
                pipe.hdel(k, ts_key)
            pipe.execute()
        return len(ids)

    # -------------------------------------------------------------- training set
    def training_set(self, labelled_events: pd.DataFrame, *, service: str = "ranking") -> pd.DataFrame:
        """Point-in-time correct features for labelled events (Feast ``get_historical_features``).

        Each row gets, per view, the newest feature row with ``event_timestamp <= timestamp``
        and not older than the view's TTL; anything else is a default (:func:`apply_defaults`).
        Views with no offline rows yet (e.g. embeddings before training) are all defaults.

        Args:
            labelled_events: Columns ``user_id``, ``item_id``, ``timestamp`` (UTC), ``label``;
                extra columns are carried through.
            service: Feature service whose views are joined (``ranking``, ``retrieval``,
                ``ranking_with_embeddings``).

        Returns:
            The input rows in input order, with one column per feature of the service.
            ``frame.attrs`` holds ``defaults_filled`` (per feature) and
            ``rows_without_user_features`` / ``rows_without_item_features`` (unknown entities).

        Raises:
            MissingFeatureColumnsError: a required input column is missing.
            FeatureStoreError: definitions not applied.
        """
        need = ["user_id", "item_id", "timestamp", "label"]
        missing = [c for c in need if c not in labelled_events.columns]
        if missing:
            raise MissingFeatureColumnsError(
                f"training_set: labelled events lack column(s) {', '.join(missing)} (needs {', '.join(need)})"
            )
        views = service_views(service)
        self._require_applied()
        df = labelled_events.copy().reset_index(drop=True)
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True).astype("datetime64[ns, UTC]")
        df["user_id"] = df["user_id"].astype("int64")
        df["item_id"] = df["item_id"].astype("int64")
        present = [v for v in views if offline.has_data(self.features_dir, v)]
        for v in present:
            df = df.drop(columns=[c for c in v.feature_names if c in df.columns])
            if len(df):
                df = df.merge(
                    self._historical(v, df[[v.join_key, "timestamp"]]),
                    on=[v.join_key, "timestamp"],
                    how="left",
                )
        attrs: dict[str, Any] = {}
        for entity in ("user", "item"):
            cols = [f for v in present if v.entity == entity for f in v.feature_names]
            attrs[f"rows_without_{entity}_features"] = (
                int(df[cols].isna().all(axis=1).sum()) if cols else len(df)
            )
        counts: dict[str, int] = {}
        names = [f for v in views for f in v.feature_names]
        df = apply_defaults(df, self.context, features=names, counts=counts)
        attrs["defaults_filled"] = counts
        df.attrs.update(attrs)
        return df

    def _historical(self, view: View, keys: pd.DataFrame) -> pd.DataFrame:
        """One view's point-in-time values for unique ``(join key, timestamp)`` pairs.

        One Feast call per view on de-duplicated pairs keeps the result independent of the
        offline store. The configured DuckDB store needs none of it, but Feast's file (Dask)
        store drops entity rows whose candidate rows all fall outside the TTL (which would also
        drop the row for every other view of the same call), collapses rows sharing a join key
        and timestamp (feast-dev/feast#6787), and fails to sort the null rows of entities with
        no offline row at all (so those are not sent). Pairs missing from the answer have no
        valid value: the caller's left join leaves them null, :func:`apply_defaults` fills them.
        """
        ent = keys.drop_duplicates().rename(columns={"timestamp": TIMESTAMP_FIELD})
        ent = ent[ent[view.join_key].isin(offline.entity_ids(self.features_dir, view))].reset_index(drop=True)
        if ent.empty:
            return keys.iloc[:0].assign(**{f: pd.Series(dtype=object) for f in view.feature_names})
        refs = [f"{view.name}:{f}" for f in view.feature_names]
        with self._feast_output(False):
            got = self.store.get_historical_features(entity_df=ent, features=refs).to_df()
        got = got.rename(columns={TIMESTAMP_FIELD: "timestamp"})
        got["timestamp"] = pd.to_datetime(got["timestamp"], utc=True).astype("datetime64[ns, UTC]")
        got = got.drop_duplicates([view.join_key, "timestamp"], keep="last")
        return got[[view.join_key, "timestamp", *view.feature_names]]

    # -------------------------------------------------------------------- online
    def _reader(self, entity: str) -> list[tuple[Any, list[str]]]:
        if entity not in self._readers:
            fvs = self._require_applied()
            self._readers[entity] = [(fvs[v.name], v.feature_names) for v in views_for(entity)]  # type: ignore[arg-type]
        return self._readers[entity]

    def _online_rows(
        self, entity: str, ids: list[int], views: list[View] | None = None
    ) -> dict[str, list[Any]]:
        """Raw online rows: ``view -> [(event_ts, {feature: python value}) | None per id]``."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto
        from feast.type_map import feast_value_type_to_python_type

        key = "user_id" if entity == "user" else "item_id"
        keys = [EntityKeyProto(join_keys=[key], entity_values=[ValueProto(int64_val=int(i))]) for i in ids]
        reader = self._reader(entity)
        if views is not None:
            wanted = {v.name for v in views}
            reader = [(fv, names) for fv, names in reader if fv.name in wanted]
        provider = self.store._get_provider()
        online = provider.online_store
        out: dict[str, list[Any]] = {}
        with self._online_guard("read"):
            if self.settings.kind == "redis" and hasattr(online, "_generate_hset_keys_for_features"):
                results = self._redis_read(online, reader, keys)
            elif self.settings.kind == "sqlite" and hasattr(online, "_get_conn"):
                results = self._sqlite_read(online, reader, keys)
            else:  # copies: Feast appends to the list it is given
                results = [
                    provider.online_read(self.store.config, fv, keys, list(names)) for fv, names in reader
                ]
            for (fv, _), res in zip(reader, results, strict=True):
                rows: list[Any] = []
                for ts, values in res:
                    conv = {k: feast_value_type_to_python_type(v) for k, v in (values or {}).items()}
                    # SQLite answers None for an absent entity, Redis empty values (and epoch 0)
                    rows.append((ts, conv) if any(v is not None for v in conv.values()) else None)
                out[fv.name] = rows
        return out

    def _redis_read(
        self, online: Any, reader: list[tuple[Any, list[str]]], keys: list[Any]
    ) -> list[list[Any]]:
        """All views of one entity in one pipelined round trip.

        Feast keeps every view of an entity in one Redis hash (field = hash of ``view:feature``);
        its ``online_read`` issues one round trip per view. This reads all the views' fields with
        one ``HMGET`` per entity, using the online store's own key and decoding helpers (pinned
        Feast 0.67; see ADR-002).
        """
        config = self.store.config
        plan = []
        fields: list[Any] = []
        for fv, names in reader:
            requested, hset_keys = online._generate_hset_keys_for_features(fv, list(names))
            plan.append((fv.name, requested, len(fields), len(hset_keys)))
            fields += hset_keys
        redis_keys = online._generate_redis_keys_for_entities(config, keys)
        client = online._get_client(config.online_store)
        pipe = client.pipeline(transaction=False)
        for k in redis_keys:
            pipe.hmget(k, fields)
        replies = pipe.execute()
        return [
            [online._get_features_for_entity(reply[start : start + n], name, requested) for reply in replies]
            for name, requested, start, n in plan
        ]

    def _sqlite_read(
        self, online: Any, reader: list[tuple[Any, list[str]]], keys: list[Any]
    ) -> list[list[Any]]:
        """All views of one entity in one SQLite statement.

        Feast keeps one table per view and its ``online_read`` runs one query per view (five
        for a user, ~0.3 ms together here). This runs one ``UNION ALL`` over the same tables on
        the online store's own connection and decodes the rows as Feast does: per entity the
        requested features present (a row of a feature the view no longer has, such as
        ``user_profile``'s ``tenure_days`` written before ``user_tenure``, is left out) and the
        row timestamp (UTC), ``(None, None)`` when it has no row
        (pinned Feast 0.67; see ADR-002).
        """
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.infra.online_stores.sqlite import _quote_id, _table_id
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        config = self.store.config
        versioned = bool(getattr(config.registry, "enable_online_feature_view_versioning", False))
        version = config.entity_key_serialization_version
        blobs = [serialize_entity_key(k, entity_key_serialization_version=version) for k in keys]
        tables = [_quote_id(_table_id(config.project, fv, versioned)) for fv, _ in reader]
        conn = online._get_conn(config)
        found: list[dict[bytes, tuple[Any, dict[str, Any]]]] = [{} for _ in reader]
        wanted = [set(names) for _, names in reader]  # a table may keep a feature the view dropped
        for start in range(0, len(blobs), _SQLITE_KEYS_PER_STATEMENT):  # stay under SQLite's variable cap
            chunk = blobs[start : start + _SQLITE_KEYS_PER_STATEMENT]
            marks = ",".join(f"?{i + 1}" for i in range(len(chunk)))
            sql = " UNION ALL ".join(
                f"SELECT {j}, entity_key, feature_name, value, event_ts FROM {t} WHERE entity_key IN ({marks})"
                for j, t in enumerate(tables)
            )
            for j, key, name, blob, ts in conn.execute(sql, chunk).fetchall():
                if name not in wanted[j]:
                    continue
                value = ValueProto()
                value.ParseFromString(blob)
                ts = ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
                feats = found[j].get(key, (None, {}))[1]
                feats[name] = value
                found[j][key] = (ts, feats)  # like Feast: the timestamp of the entity's last row
        return [[view.get(b, (None, None)) for b in blobs] for view in found]

    def online_user_features(self, user_id: int) -> dict[str, Any]:
        """Every user feature of one user from the online store, defaults applied.

        The serving hot path: the online store's own read on the cached views, without Feast's
        per-call registry lookups and response building; on Redis one pipelined round trip.
        An unknown user gets all defaults and is counted in ``stats["unknown_users"]``.

        Args:
            user_id: The user.

        Returns:
            ``feature name -> value`` for every user feature in the spec (numeric lists as
            numpy arrays).

        Raises:
            OnlineStoreUnavailableError: the online store cannot be reached.
        """
        # An id beyond int64 cannot be stored (the store's keys are int64): unknown, all defaults.
        rows = self._online_rows("user", [int(user_id)]) if storable_id(user_id) else {}
        values: dict[str, Any] = {}
        found = False
        for view_rows in rows.values():
            r = view_rows[0]
            if r is not None:
                found = True
                values.update(r[1])
        self.stats["online_reads"] += 1
        if not found:
            self.stats["unknown_users"] += 1
        names = [f for v in views_for("user") for f in v.feature_names]
        return apply_defaults(values, self.context, features=names)

    def online_features(self, entity: str, ids: Iterable[int], *, defaults: bool = True) -> pd.DataFrame:
        """Feature rows of several users or items via Feast's ``get_online_features``.

        The standard (slow for hundreds of ids) Feast path; for checks, tests and tools — serving
        uses :meth:`online_user_features` and :meth:`item_table`.

        Args:
            entity: ``user`` or ``item``.
            ids: Entity ids.
            defaults: Apply :func:`apply_defaults` (else missing values stay None).

        Raises:
            OnlineStoreUnavailableError: the online store cannot be reached.
        """
        key = "user_id" if entity == "user" else "item_id"
        refs = [f"{v.name}:{f}" for v in views_for(entity) for f in v.feature_names]  # type: ignore[arg-type]
        rows = [{key: int(i)} for i in ids]
        with self._online_guard("get_online_features"):
            data = self.store.get_online_features(features=refs, entity_rows=rows).to_dict()
        df = pd.DataFrame(data)
        if defaults:
            df = apply_defaults(df, self.context)
        return df

    # ----------------------------------------------------------------- streaming
    def push_interaction(self, event: Mapping[str, Any], *, feast_push: bool = False) -> PushResult:
        """Push one interaction; see :meth:`push_interactions`."""
        return self.push_interactions([event], feast_push=feast_push)

    def push_interactions(
        self, events: Iterable[Mapping[str, Any]], *, feast_push: bool = False
    ) -> PushResult:
        """Update the streaming features from interactions, online and in the offline log.

        For each user with interactions, ``recent_*`` (last 10) is merged with the online value
        and their positives are added to ``category_prefs`` (the item's online categories); for
        each item with positive events, ``trending_score`` is decayed and incremented. The
        new rows are written to the online store of the views behind the push sources, and
        appended to the offline store (``offline/<view>/push-*.parquet``), so training sees them.
        A row's timestamp is just after its latest event (and after the stored row), so a
        training row never sees its own event. Send events in batches where possible: one call
        costs about one online read and one write per view.

        Args:
            events: Mappings with ``user_id``, ``item_id`` (non-negative ints), ``event_type``
                (one of the canonical types), optional ``timestamp`` (datetime, ISO string or Unix
                seconds; default now), optional ``label`` (0/1; default derived from the type:
                click/complete engage, rating >= 4 engages), optional ``rating``.
            feast_push: Write through ``FeatureStore.push(<view>_push, df)`` instead of the
                provider's ``online_write_batch`` on cached views: same rows, but Feast 0.67
                deserialises the registry on every push (~0.1-0.2 s per call here).

        Returns:
            Counts of events, interactions, positives, users and items updated.

        Raises:
            InvalidPayloadError: a payload is malformed (nothing is written for any of them).
            OnlineStoreUnavailableError: the online store cannot be reached (nothing written).
            FeatureStoreError: definitions not applied.
        """
        t0 = time.perf_counter()
        batch = PushBatch.parse(events)
        if not batch.events:
            return PushResult(0, 0, 0, 0, 0, 0.0)
        now = pd.Timestamp.now(tz="UTC")
        with self._push_lock():
            written = self._merge_and_write(batch, now, feast_push)
        for view, rows in written:  # each push appends its own file: outside the lock
            offline.write_rows(self.features_dir, view, rows, "push")
        self.stats["pushed_events"] += len(batch.events)
        return PushResult(
            events=len(batch.events),
            interactions=batch.n_interactions,
            positives=batch.n_positives,
            users_updated=len(batch.interactions),
            items_updated=len(batch.positives),
            seconds=round(time.perf_counter() - t0, 4),
        )

    def _merge_and_write(
        self, batch: PushBatch, now: pd.Timestamp, feast_push: bool
    ) -> list[tuple[View, list[dict[str, Any]]]]:
        """Read the current rows, merge the events in, write them online (push lock held).

        Returns:
            ``(view, rows)`` for each view that got rows (the user views first).
        """
        recent_v, prefs_v = VIEWS_BY_NAME["user_recent_interactions"], VIEWS_BY_NAME["user_category_prefs"]
        trend_v, meta_v = VIEWS_BY_NAME["item_trending"], VIEWS_BY_NAME["item_metadata"]
        users, items = list(batch.interactions), list(batch.positives)
        user_read = self._online_rows("user", users, [recent_v, prefs_v]) if users else {}
        item_read = self._online_rows("item", items, [trend_v, meta_v]) if items else {}

        def stored(read: dict[str, list[Any]], view: View, ids: list[int]) -> dict[int, Any]:
            return dict(zip(ids, read.get(view.name, [None] * len(ids)), strict=True))

        item_cats = {
            iid: list((row[1] if row is not None else {}).get("categories") or [])
            for iid, row in stored(item_read, meta_v, items).items()
        }
        meta = self._meta()  # the vocabulary and the prior of the same build
        prior = list(
            DefaultContext(dict(meta.get("defaults", {}))).resolve(FEATURES["category_prefs"].default) or []
        )
        written = [
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
        self._check_registered([view for view, _ in written])  # before writing any of them
        for view, rows in written:
            if feast_push:
                with self._online_guard(f"push {view.name}"), self._feast_output(False):
                    self.store.push(view.push_source, pd.DataFrame(rows))
            else:
                self._write_online(view, rows)
        return written

    def _check_registered(self, views: list[View]) -> None:
        """Raise unless the Feast registry holds every feature of ``views`` (a stale registry).

        Raises:
            FeatureStoreError: a view lacks features the spec declares; says to run apply.
        """
        for view in views:
            fv = next(fv for fv, _ in self._reader(view.entity) if fv.name == view.name)
            missing = sorted(set(view.feature_names) - {f.name for f in fv.features})
            if missing:
                raise FeatureStoreError(
                    f"the Feast registry in {self.features_dir} defines {view.name} without "
                    f"{', '.join(missing)} (definitions changed since it was applied): "
                    "run `streamrec features apply`"
                )

    def _write_online(self, view: View, rows: list[dict[str, Any]]) -> None:
        """Write feature rows to the online store through the provider, on the cached view.

        The same conversion and ``online_write_batch`` that ``FeatureStore.push`` and
        ``write_to_online_store`` end in, without their per-call registry deserialisation.
        """
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto
        from feast.type_map import python_values_to_proto_values

        fv = next(fv for fv, _ in self._reader(view.entity) if fv.name == view.name)
        types = {f.name: f.dtype.to_value_type() for f in fv.features}
        protos = {
            name: python_values_to_proto_values([r[name] for r in rows], types[name])
            for name in view.feature_names
        }
        data = [
            (
                EntityKeyProto(
                    join_keys=[view.join_key], entity_values=[ValueProto(int64_val=int(r[view.join_key]))]
                ),
                {name: protos[name][i] for name in view.feature_names},
                utc_timestamp(r[TIMESTAMP_FIELD]).to_pydatetime(),
                utc_timestamp(r[CREATED_FIELD]).to_pydatetime(),
            )
            for i, r in enumerate(rows)
        ]
        with self._online_guard(f"write {view.name}"):
            self.store._get_provider().online_write_batch(self.store.config, fv, data, progress=None)

    # ---------------------------------------------------------------- embeddings
    def write_embeddings(
        self,
        kind: str,
        ids: np.ndarray | list[int],
        vectors: np.ndarray,
        ts: datetime | None = None,
        *,
        version: str = "unknown",
    ) -> int:
        """Store user or item embeddings written by training, online and offline.

        Args:
            kind: ``user`` or ``item``.
            ids: ``(n,)`` entity ids.
            vectors: ``(n, d)`` float embeddings (finite).
            ts: Feature timestamp (default now): training rows before it never see these values.
            version: Model version recorded with each vector.

        Returns:
            Rows written.

        Raises:
            InvalidPayloadError: wrong kind, shapes or non-finite values (nothing written).
            OnlineStoreUnavailableError: the online store cannot be written.
        """
        if kind not in ("user", "item"):
            raise InvalidPayloadError(f"write_embeddings: kind must be 'user' or 'item', not {kind!r}")
        id_arr = np.asarray(ids, dtype=np.int64).ravel()
        vec = np.asarray(vectors, dtype=np.float32)
        if vec.ndim != 2 or vec.shape[0] != len(id_arr) or vec.shape[1] == 0:
            raise InvalidPayloadError(
                "write_embeddings: vectors must be (n, d) with n == len(ids) == "
                f"{len(id_arr)}, got {vec.shape}"
            )
        if not np.isfinite(vec).all():
            raise InvalidPayloadError("write_embeddings: vectors contain NaN or infinite values")
        if len(np.unique(id_arr)) != len(id_arr):
            raise InvalidPayloadError("write_embeddings: ids are not unique")
        view = VIEWS_BY_NAME[f"{kind}_embedding"]
        stamp = utc_timestamp(ts) if ts is not None else pd.Timestamp.now(tz="UTC")
        frame = pd.DataFrame(
            {
                view.join_key: id_arr,
                f"{kind}_embedding": list(vec),
                f"{kind}_embedding_version": version,
                TIMESTAMP_FIELD: stamp,
                CREATED_FIELD: pd.Timestamp.now(tz="UTC"),
            }
        )
        self._require_applied()
        self._write_online(view, frame.to_dict("records"))
        offline.write_rows(self.features_dir, view, frame, "training")
        meta = self._meta()
        meta.setdefault("defaults", {})[f"{kind}_embedding_dim"] = int(vec.shape[1])
        self._write_meta(meta)
        if kind == "item":
            self._item_table = None
        return len(frame)

    # ---------------------------------------------------------------- item table
    def item_table(self, refresh: bool = False) -> ItemFeatureTable:
        """The in-memory item feature table (loaded once; reloaded by :meth:`materialize`).

        Loaded from the item views' offline rows exactly as the online store holds them
        (newest row per item up to each view's materialization end, plus pushed and training
        rows), with :func:`apply_defaults`.

        Args:
            refresh: Reload even if already loaded (e.g. after another process materialized).
        """
        if self._item_table is not None and not refresh:
            return self._item_table
        t0 = time.perf_counter()
        fvs = self._registered(refresh=True)
        frame: pd.DataFrame | None = None
        until: dict[str, str | None] = {}
        for v in views_for("item"):
            end = self.materialized_until(v.name, fvs)
            until[v.name] = end.isoformat() if end is not None else None
            part = offline.read_latest(self.features_dir, v, end).drop([TIMESTAMP_FIELD, CREATED_FIELD])
            df = part.to_pandas()
            frame = df if frame is None else frame.merge(df, on="item_id", how="outer")
        assert frame is not None
        names = [f for v in views_for("item") for f in v.feature_names]
        frame = apply_defaults(frame, self.context, features=names)
        self._item_table = ItemFeatureTable.from_frame(
            frame, self.category_vocab, materialized_until=until, started=t0
        )
        return self._item_table

    def item_table_is_stale(self) -> bool:
        """Whether a materialization happened since the item table was loaded (re-reads the registry)."""
        if self._item_table is None:
            return True
        fvs = self._registered(refresh=True)
        for v in views_for("item"):
            end = self.materialized_until(v.name, fvs)
            now = end.isoformat() if end is not None else None
            if now != self._item_table.materialized_until.get(v.name):
                return True
        return False

    # --------------------------------------------------------------------- check
    def check(self, sample: int = 100, seed: int = 0, *, max_details: int = 20) -> CheckReport:
        """Compare online values with the offline store for a sample of entities.

        See :func:`streamrec.features.check.check_store`.

        Raises:
            OnlineStoreUnavailableError: the online store cannot be reached.
            FeatureStoreError: definitions not applied.
        """
        from streamrec.features.check import check_store

        return check_store(self, sample, seed, max_details=max_details)
