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
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from streamrec.data.schema import storable_id
from streamrec.errors import (
    FeatureStoreError,
    InvalidPayloadError,
    MissingFeatureColumnsError,
    OnlineStoreUnavailableError,
)
from streamrec.features import offline
from streamrec.features.build import BuildReport, OfflineBuild
from streamrec.features.build import resolve_as_of as resolve_as_of
from streamrec.features.defaults import DefaultContext, apply_defaults
from streamrec.features.historical import training_frame
from streamrec.features.item_table import ItemFeatureTable
from streamrec.features.materialize import Materializer, recorded_end, redis_marker
from streamrec.features.online import online_errors, push_lock, read_rows, write_rows
from streamrec.features.push import (
    PushBatch,
    merged_rows,
    utc_timestamp,
)
from streamrec.features.repo import OnlineStoreSettings, load_definitions, repo_config
from streamrec.features.spec import (
    CREATED_FIELD,
    TIMESTAMP_FIELD,
    VIEWS,
    VIEWS_BY_NAME,
    View,
    service_views,
    views_for,
)
from streamrec.paths import DataLayout, exclusive_file_lock

if TYPE_CHECKING:
    from streamrec.features.check import CheckReport


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


#: Linux's per-process status file; its ``Umask:`` line (Linux 4.7+) reads the umask unchanged.
_PROC_STATUS = "/proc/self/status"


def _umask_from_status(text: str) -> int | None:
    """The umask in a ``/proc/<pid>/status`` text (a line ``Umask:  0022``), None when absent."""
    for line in text.splitlines():
        if line.startswith("Umask:"):
            try:
                return int(line.split(":", 1)[1].strip(), 8)
            except ValueError:
                return None
    return None


def _process_umask() -> int:
    """The process's umask: from ``/proc/self/status`` on Linux, else by setting and restoring it.

    ``os.umask`` can only read it by changing it: process-wide, other threads creating files
    meanwhile would get mode 0o666/0o777. Used only where ``/proc`` has no ``Umask:`` line.
    """
    try:
        with open(_PROC_STATUS) as fh:
            umask = _umask_from_status(fh.read())
    except OSError:
        umask = None
    if umask is None:
        umask = os.umask(0)
        os.umask(umask)
    return umask


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the process's umask."""
    return 0o666 & ~_process_umask()


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
        """Replace ``meta.json`` atomically (a unique temporary file, synced, then renamed).

        Callers changing it hold the meta lock (:meth:`_update_meta`).
        """
        self.features_dir.mkdir(parents=True, exist_ok=True)
        p = self.features_dir / "meta.json"
        fd, tmp = tempfile.mkstemp(prefix=".meta.json.", dir=self.features_dir)
        try:
            # mkstemp makes the file 0600: keep the mode other users (serving pods) read it with.
            os.fchmod(fd, p.stat().st_mode & 0o777 if p.exists() else _default_file_mode())
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(meta, indent=2, default=str))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._context = None

    def _update_meta(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write ``meta.json`` under an exclusive file lock (``features/meta.lock``).

        ``change`` gets the current contents, re-read under the lock, and changes only the keys
        its operation owns: a build and a materialization running at once keep each other's.
        """
        self.features_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_file_lock(self.features_dir / "meta.lock"):
            meta = self._meta()
            change(meta)
            self._write_meta(meta)

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
        except online_errors() as err:
            self.stats["online_errors"] += 1
            raise OnlineStoreUnavailableError(
                f"online store ({self.settings.describe()}) unavailable during {what}: {err}"
            ) from err

    def _push_lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialise the read-modify-write of :meth:`push_interactions` across processes.

        See :func:`streamrec.features.online.push_lock`.
        """
        return push_lock(self.store, self.settings, self.features_dir, self._online_guard)

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
        job = OfflineBuild(self.layout, self._meta, self._update_meta)
        return job.run(
            as_of, snapshots=snapshots, every=every, cutoffs=cutoffs, progress=progress, extra=extra
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
        view's marker key: flushed, even if pushes wrote to it since, or whose marker is older
        than the end ``meta.json`` records for that store or unreadable: restored from an older
        snapshot, so its rows are older too; the report's ``reloaded`` says why). On Redis, which never writes a row dated at or before the one it holds,
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
        materializer = Materializer(self.store, self.settings, self.features_dir, self._online_guard)
        report, total = materializer.run(
            self._meta(), fvs, stop, quiet=lambda: self._feast_output(progress), update_meta=self._update_meta
        )
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

    def materialized_until(self, name: str, fvs: dict[str, Any] | None = None) -> pd.Timestamp | None:
        """Until when view ``name`` was materialized into the online store (None: never).

        This client's store's end, or when it has none recorded the newest of any store's
        (:func:`~streamrec.features.materialize.recorded_end`): what the item table and the
        check read the offline rows up to.
        """
        fvs = fvs if fvs is not None else self._registered()
        if name not in fvs:
            return None
        return recorded_end(name, self._meta(), self.settings.describe(), fvs)

    def _redis_marker(self, view: str) -> str:
        """The Redis key set after each materialization of ``view`` (gone: flushed or never)."""
        return redis_marker(self.store.config.project, view)

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
        return training_frame(
            self.store,
            self.features_dir,
            labelled_events,
            views,
            self.context,
            lambda: self._feast_output(False),
        )

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

        key = "user_id" if entity == "user" else "item_id"
        keys = [EntityKeyProto(join_keys=[key], entity_values=[ValueProto(int64_val=int(i))]) for i in ids]
        reader = self._reader(entity)
        if views is not None:
            wanted = {v.name for v in views}
            reader = [(fv, names) for fv, names in reader if fv.name in wanted]
        store = self.store
        with self._online_guard("read"):
            return read_rows(store, self.settings.kind, reader, keys)

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
        meta = self._meta()  # the vocabulary and the prior of the same build
        written = merged_rows(batch, user_read, item_read, meta, now)
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
        fv = next(fv for fv, _ in self._reader(view.entity) if fv.name == view.name)
        store = self.store
        with self._online_guard(f"write {view.name}"):
            write_rows(store, fv, view, rows)

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
        dim = int(vec.shape[1])
        self._update_meta(
            lambda meta: meta.setdefault("defaults", {}).__setitem__(f"{kind}_embedding_dim", dim)
        )
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
