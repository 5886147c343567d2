"""The offline build: batch feature snapshots per cutoff, versioned views' changes, pending windows."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from streamrec.data.store import DataStore
from streamrec.errors import FeatureStoreError
from streamrec.features import offline
from streamrec.features.materialize import pending_by_store
from streamrec.features.pipeline import MAX_WINDOW, compute_snapshot
from streamrec.features.push import utc_timestamp
from streamrec.features.spec import VIEWS, VIEWS_BY_NAME
from streamrec.features.versions import VersionedWriter
from streamrec.paths import DataLayout


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
    """What :meth:`~streamrec.features.client.FeatureClient.build` wrote."""

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
class OfflineBuild:
    """Builds one data directory's offline features.

    ``read_meta`` reads ``meta.json``; ``update_meta(change)`` applies ``change`` to it re-read
    under the caller's lock (the build changes only the vocabulary, pending, defaults and last build).
    """

    layout: DataLayout
    read_meta: Callable[[], dict[str, Any]]
    update_meta: Callable[[Callable[[dict[str, Any]], None]], None]

    def run(
        self,
        as_of: str | datetime | None,
        *,
        snapshots: int,
        every: timedelta,
        cutoffs: Sequence[datetime | pd.Timestamp] | None,
        progress: bool,
        extra: bool,
    ) -> BuildReport:
        """Compute the batch features of the validated data into the offline store.

        See :meth:`streamrec.features.client.FeatureClient.build`.
        """
        from tqdm import tqdm

        features_dir = self.layout.features
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
        meta = self.read_meta()
        vocab = list(meta.get("category_vocab", []))
        rows: Counter[str] = Counter()
        files = 0
        snap = None
        bar = tqdm(
            total=len(times), desc="features build", unit="snapshot", disable=not progress, file=sys.stderr
        )
        for v in VIEWS:  # files written before a feature was added: the new files' schema
            offline.upgrade_files(features_dir, v)
        made = pd.Timestamp.now(tz="UTC")
        writers = {v.name: VersionedWriter(features_dir, v, times, made) for v in VIEWS if v.versioned}

        entered: dict[str, pd.Timestamp] = {}  # per view, the earliest cutoff to materialize again

        def enter_pending(name: str, t: pd.Timestamp) -> None:
            entered[name] = min(entered.get(name, t), t)

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
                    offline.write_snapshot(features_dir, view, frame, t)
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
        compacted = sum(offline.compact(features_dir, v) for v in VIEWS if v.mode == "stream")
        assert snap is not None
        built_as_of, built_times = cutoff.isoformat(), [t.isoformat() for t in times]
        defaults_now = dict(snap.defaults)

        def record(meta: dict[str, Any]) -> None:  # meta re-read under the lock: keep the rest
            current = list(meta.get("category_vocab", []))
            meta["category_vocab"] = current + [c for c in vocab if c not in current]
            pending = pending_by_store(meta)
            for views in pending.values():  # every online store has its own window
                for name, t in entered.items():
                    prev = views.get(name)
                    views[name] = t.isoformat() if prev is None else min(utc_timestamp(prev), t).isoformat()
            meta["pending"] = pending
            if extra:  # snapshots for point-in-time reads only: the recorded build stays as it was
                return
            meta["defaults"] = {**meta.get("defaults", {}), **defaults_now}
            meta["last_build"] = {
                "as_of": built_as_of,
                "snapshots": built_times,
                "built_at": pd.Timestamp.now(tz="UTC").isoformat(),
            }

        self.update_meta(record)
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
