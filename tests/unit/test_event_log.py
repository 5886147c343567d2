"""EventLog: durable (fsync'd) before acknowledging, idempotent by event_id, nothing unaccounted for."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamrec.api_models import EventIn
from streamrec.data.event_export import export_event_log, export_to_store, prune
from streamrec.data.event_log import SEGMENT_MAX_AGE_S, AppendOutcome, EventLog
from streamrec.data.store import DataStore
from streamrec.errors import ConfigError

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
USERS = list(range(1, 11))
ITEMS = list(range(100, 140))


def make_store(root: Path) -> DataStore:
    """A tiny validated store: 10 users, 40 items, a few events."""
    store = DataStore(root)
    store.upsert_users(pd.DataFrame({"user_id": USERS, "signup_at": [NOW - timedelta(days=30)] * len(USERS)}))
    store.upsert_items(
        pd.DataFrame(
            {
                "item_id": ITEMS,
                "title": [f"Item {i}" for i in ITEMS],
                "categories": [["a"]] * len(ITEMS),
                "published_at": [NOW - timedelta(days=10)] * len(ITEMS),
                "promoted": [False] * len(ITEMS),
                "flagged": [False] * len(ITEMS),
            }
        )
    )
    return store


def ev(event_id: str, user: int = 1, item: int = 100, kind: str = "click", **kw: object) -> EventIn:
    return EventIn.model_validate(
        {"event_id": event_id, "user_id": user, "item_id": item, "event_type": kind, "timestamp": NOW, **kw},
        context={"now": NOW},
    )


@pytest.fixture
def store(tmp_path: Path) -> DataStore:
    return make_store(tmp_path / "data")


@pytest.fixture
def log_(store: DataStore) -> EventLog:
    return EventLog.open(store.layout.root)


def log_lines(log: EventLog) -> list[dict[str, object]]:
    return [json.loads(line) for seg in log.segments() for line in seg.read_text().splitlines()]


def test_append_is_durable_before_ack(store: DataStore, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = EventLog.open(store.layout.root)
    out = log.append([ev("a"), ev("b", kind="complete", watch_fraction=0.9)])
    assert (out.received, out.stored, out.duplicates, out.rejected) == (2, 2, 0, 0)
    assert synced, "the segment must be fsync'd before append returns"
    recs = log_lines(log)
    assert [r["event_id"] for r in recs] == ["a", "b"]
    assert recs[1]["watch_fraction"] == 0.9 and recs[1]["event_type"] == "complete"
    assert log.segments()[0].parent == store.layout.event_log / "segments"


def test_idempotent_by_event_id_within_batch_and_across_restarts(store: DataStore) -> None:
    log = EventLog.open(store.layout.root)
    assert log.append([ev("a"), ev("a"), ev("b")]).duplicates == 1
    again = log.append([ev("a"), ev("c")])
    assert (again.stored, again.duplicates) == (1, 1)
    log.close()
    reopened = EventLog.open(store.layout.root)  # a restarted replica remembers the logged ids
    out = reopened.append([ev("a"), ev("b"), ev("c"), ev("d")])
    assert (out.stored, out.duplicates) == (1, 3)
    assert sorted(r["event_id"] for r in log_lines(reopened)) == ["a", "b", "c", "d"]


def test_unknown_ids_reject_the_whole_batch_and_are_named(store: DataStore) -> None:
    log_ = EventLog.open(store.layout.root, accept_new_users=False)  # unknown users refused too
    out = log_.append([ev("ok"), ev("u", user=999), ev("i", item=5), ev("both", user=998, item=2**70)])
    assert not out.accepted and out.stored == 0 and out.rejected == 4
    assert out.unknown_user_ids == (998, 999)
    assert out.unknown_item_ids == (5, 2**70)
    assert "998" in out.problem() and "1180591620717411303424" in out.problem()
    assert log_lines(log_) == []
    assert log_.append([ev("ok")]).stored == 1  # the good event alone goes through


def test_invariant_count_in_equals_stored_plus_duplicates_plus_rejected(log_: EventLog) -> None:
    rng = random.Random(3)
    sent = 0
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 8)):
            user = rng.choice([*USERS, 777]) if rng.random() < 0.05 else rng.choice(USERS)  # 777: new
            item = rng.choice([*ITEMS, 5]) if rng.random() < 0.05 else rng.choice(ITEMS)  # 5: unknown
            batch.append(ev(f"e{rng.randint(0, 120)}", user=user, item=item))
        sent += len(batch)
        log_.append(batch)
    s = log_.stats
    assert s.received == sent
    assert s.balanced() and s.received == s.stored + s.duplicates + s.rejected
    assert s.stored == len(log_lines(log_)) == len({r["event_id"] for r in log_lines(log_)})
    assert log_.snapshot()["balanced"] is True


def test_sink_gets_new_events_once_and_failure_keeps_them(store: DataStore) -> None:
    pushed: list[list[str]] = []
    down = {"now": False}

    def sink(records: list[dict[str, object]]) -> None:
        if down["now"]:
            raise ConnectionError("online store down")
        pushed.append([str(r["event_id"]) for r in records])

    log = EventLog.open(store.layout.root, sink=sink)
    assert log.append([ev("good"), ev("good"), ev("g2")]).push_failed == 0
    assert pushed == [["good", "g2"]]  # one call per batch, new events only
    down["now"] = True
    out = log.append([ev("bad1"), ev("bad2")])
    assert (out.stored, out.push_failed) == (2, 2)
    assert {r["event_id"] for r in log_lines(log)} == {"good", "g2", "bad1", "bad2"}
    assert (log.stats.push_failed, log.stats.pushed) == (2, 2)
    assert log.append([ev("bad1")]).duplicates == 1  # a retry is neither stored nor pushed again
    assert pushed == [["good", "g2"]]


def test_sink_breaker_skips_a_dead_sink(store: DataStore) -> None:
    from streamrec.resilience import CircuitBreaker

    calls = []
    now = [0.0]

    def dead(records: list[dict[str, object]]) -> None:
        calls.append(len(records))
        raise TimeoutError("redis timeout")

    breaker = CircuitBreaker("sink", failure_threshold=2, reset_timeout_s=10.0, clock=lambda: now[0])
    log = EventLog.open(store.layout.root, sink=dead, sink_breaker=breaker)
    for i in range(5):
        assert log.append([ev(f"d{i}")]).push_failed == 1
    assert calls == [1, 1]  # opened after two failures: later batches skip the sink
    now[0] += 11.0
    log.append([ev("d5")])
    assert calls == [1, 1, 1]  # one trial after the reset timeout
    assert log.stats.push_failed == 6 and log.stats.stored == 6 and log.snapshot()["sink"]["state"] == "open"


def test_a_hung_sink_costs_an_append_its_budget_then_the_breaker_skips_it(store: DataStore) -> None:
    import threading

    from streamrec.resilience import CircuitBreaker

    release = threading.Event()
    calls = []

    def hung(records: list[dict[str, object]]) -> None:
        calls.append(len(records))
        release.wait(10)

    breaker = CircuitBreaker("sink", failure_threshold=2, reset_timeout_s=60.0)
    log = EventLog.open(store.layout.root, sink=hung, sink_breaker=breaker, sink_timeout_s=0.05)
    try:
        for i in range(4):
            t0 = time.perf_counter()
            out = log.append([ev(f"h{i}")])
            assert out.stored == 1 and out.push_failed == 1  # stored and acknowledged all the same
            assert time.perf_counter() - t0 < 2.0  # never the 10 s of the hung push
        assert calls == [1]  # one thread stuck in the hung push; the next call queued, then the breaker
    finally:
        release.set()
    time.sleep(0.1)
    assert calls == [1]  # the queued push that missed its budget was cancelled, not run late
    assert log.stats.stored == 4 and log.snapshot()["sink"]["state"] == "open"


def test_write_failure_is_raised_not_acknowledged(store: DataStore, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EventLog.open(store.layout.root)

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        log.append([ev("x")])
    monkeypatch.undo()
    assert log.stats.write_errors == 1 and log.stats.received == 0
    assert log.append([ev("x")]).stored == 1  # the retry succeeds (id was not remembered)


def test_a_retry_after_a_failed_write_reaches_the_sink_on_another_replica(
    store: DataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[str] = []
    a = EventLog.open(store.layout.root, sink=lambda recs: pushed.extend(r["event_id"] for r in recs))
    b = EventLog.open(store.layout.root, sink=lambda recs: pushed.extend(r["event_id"] for r in recs))
    assert a.append([ev("kept")]).stored == 1  # acknowledged earlier in the same segment

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        a.append([ev("x"), ev("y")])  # the lines are written, the fsync fails: a 503
    monkeypatch.undo()
    out = b.append([ev("x"), ev("y")])  # the client's retry lands on the other replica
    assert (out.stored, out.duplicates) == (2, 0)
    assert pushed == ["kept", "x", "y"]
    assert sorted(b.read()["event_id"]) == ["kept", "x", "y"]  # the acknowledged line survived


def test_a_failed_flush_leaves_nothing_for_the_close_to_write_later(store: DataStore) -> None:
    a = EventLog.open(store.layout.root)
    b = EventLog.open(store.layout.root)
    assert a.append([ev("kept")]).stored == 1

    class FlushFails:  # the buffered file keeps the bytes when flush fails; close writes them
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def write(self, data: bytes) -> int:
            return int(self.fh.write(data))

        def flush(self) -> None:
            raise OSError(28, "No space left on device")

        def fileno(self) -> int:
            return int(self.fh.fileno())

        def close(self) -> None:
            self.fh.close()

    a._fh = FlushFails(a._fh)  # type: ignore[assignment]
    with pytest.raises(OSError):
        a.append([ev("x")])
    assert b.append([ev("x")]).stored == 1  # the retry is new on the other replica
    assert sorted(b.read()["event_id"]) == ["kept", "x"]


def test_torn_tail_is_ignored_on_reopen(store: DataStore) -> None:
    log = EventLog.open(store.layout.root)
    log.append([ev("a")])
    log.close()
    with open(log.segments()[0], "ab") as fh:
        fh.write(b'{"event_id": "torn", "user_')  # a crash mid-write (never acknowledged)
    reopened = EventLog.open(store.layout.root)
    assert reopened.append([ev("a"), ev("torn")]).stored == 1  # "a" known; "torn" never was
    assert set(reopened.read()["event_id"]) == {"a", "torn"}


def test_segments_rotate_and_each_writer_has_its_own(store: DataStore) -> None:
    log = EventLog.open(store.layout.root, segment_max_bytes=300)
    for i in range(6):
        log.append([ev(f"r{i}")])
    other = EventLog.open(store.layout.root)
    other.append([ev("o1")])
    assert len(log.segments()) >= 3
    assert len({r["event_id"] for r in log_lines(log)}) == 7


def test_a_retry_that_lands_on_another_replica_is_a_duplicate(store: DataStore) -> None:
    a = EventLog.open(store.layout.root)
    b = EventLog.open(store.layout.root)  # opened before a logged anything
    assert a.append([ev("x1"), ev("x2")]).stored == 2
    out = b.append([ev("x1"), ev("y1")])  # x1 retried on the other replica
    assert (out.stored, out.duplicates) == (1, 1)
    assert (a.append([ev("y1"), ev("x2")]).duplicates, a.append([ev("z")]).stored) == (2, 1)
    assert sorted(r["event_id"] for r in log_lines(a)) == ["x1", "x2", "y1", "z"]
    assert a.stats.balanced() and b.stats.balanced()


def _append_ids(root: str, ids: list[str], start, out) -> None:
    """One replica process: append ``ids`` one event per batch once ``start`` is released."""
    log = EventLog.open(root)
    start.wait(timeout=60)
    stored = dup = 0
    for j, x in enumerate(ids):
        res = log.append([ev(x, user=1 + j % 10, item=100 + j % 40)])
        stored, dup = stored + res.stored, dup + res.duplicates
    out.put((stored, dup, log.stats.balanced()))


def test_replica_processes_appending_the_same_ids_at_once_log_each_id_once(store: DataStore) -> None:
    """Two replicas get every event at the same moment (a client retrying on both): one logs it."""
    ctx = multiprocessing.get_context("spawn")  # clean interpreters, like two replicas
    start, out = ctx.Barrier(2), ctx.Queue()
    ids = [f"e{i:04d}" for i in range(300)]
    root = str(store.layout.root)
    procs = [ctx.Process(target=_append_ids, args=(root, ids, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    logged = [r["event_id"] for r in log_lines(EventLog.open(store.layout.root))]
    assert sorted(logged) == ids  # every id once: none lost, none twice
    assert sum(r[0] for r in results) == 300 and sum(r[1] for r in results) == 300
    assert all(r[2] for r in results)


def test_export_to_store_is_incremental_and_dedupes_across_writers(store: DataStore) -> None:
    a = EventLog.open(store.layout.root)
    # A writer that does not see a's lines (another node, flock not shared): logs a's retry again.
    b = EventLog.open(store.layout.root, load_existing=False)
    a.append([ev("x1", kind="click"), ev("x2", kind="view"), ev("x3", kind="skip", user=2, item=101)])
    b.append([ev("x1", kind="click")])  # the same retried event, logged by another replica
    before = store.count_events()
    res = export_to_store(a, store, now=NOW)
    assert (res.read, res.duplicates, res.added, res.quarantined) == (4, 1, 3, 0)
    assert store.count_events() == before + 3
    stored = store.events(columns=["event_id", "label", "event_type"]).set_index("event_id")
    assert (
        stored.loc["x1", "label"] == 1 and stored.loc["x2", "label"] == 0 and stored.loc["x3", "label"] == 0
    )
    assert export_to_store(a, store, now=NOW).read == 0  # watermarks: nothing new
    a.append([ev("x4", kind="complete", watch_fraction=1.0)])
    res2 = export_to_store(a, store, now=NOW)
    assert (res2.read, res2.added) == (1, 1)
    assert store.count_events() == before + 4


def test_unreadable_watermarks_mean_a_full_re_export_not_a_failure(store: DataStore) -> None:
    log_ = EventLog.open(store.layout.root)
    log_.append([ev("m1", kind="click"), ev("m2", kind="view")])
    before = store.count_events()
    assert export_to_store(log_, store, now=NOW).added == 2
    (log_.root / "exported.json").write_text("")  # e.g. torn by a crash on a filesystem without fsync
    again = export_to_store(log_, store, now=NOW)
    assert (again.read, again.added, again.already_present) == (2, 0, 2)  # re-read, stored once
    assert store.count_events() == before + 2
    assert prune(log_, retain_days=1, now=NOW).deleted == 0


def test_users_and_items_ingested_after_start_are_accepted_without_a_restart(store: DataStore) -> None:
    fresh = EventLog.open(store.layout.root, catalogue_refresh_s=0.0, accept_new_users=False)
    slow = EventLog.open(store.layout.root, accept_new_users=False)  # at most one re-read a minute
    assert fresh.append([ev("n1", user=999, item=100)]).unknown_user_ids == (999,)
    store.upsert_users(pd.DataFrame({"user_id": [999], "signup_at": [NOW]}))  # ingested meanwhile
    assert slow.append([ev("n1", user=999, item=100)]).unknown_user_ids == (999,)  # not re-read yet
    out = fresh.append([ev("n1", user=999, item=100), ev("n2", user=999, item=10**9)])
    assert out.unknown_item_ids == (10**9,) and out.stored == 0  # still all or nothing
    assert fresh.append([ev("n1", user=999, item=100)]).stored == 1


def test_an_exporter_whose_clock_is_behind_quarantines_nothing_the_api_accepted(store: DataStore) -> None:
    log_ = EventLog.open(store.layout.root)
    ahead = ev("s1", timestamp=NOW + timedelta(minutes=4))  # the API allows 5 minutes of skew
    assert log_.append([ahead], received_at=NOW).stored == 1
    res = export_to_store(log_, store, now=NOW - timedelta(minutes=2))  # the exporter's clock lags
    assert (res.added, res.quarantined) == (1, 0)


def test_a_batch_that_waited_for_another_threads_catalogue_re_read_uses_its_result(store: DataStore) -> None:
    reading, release = threading.Event(), threading.Event()
    users = np.asarray(sorted([*USERS, 999]), dtype=np.int64)

    def slow_catalogue() -> tuple[np.ndarray, np.ndarray]:
        reading.set()
        release.wait(10)
        return users, np.asarray(ITEMS, dtype=np.int64)

    log_ = EventLog(
        store.layout.event_log,
        USERS,
        ITEMS,
        catalogue=slow_catalogue,
        catalogue_refresh_s=60.0,
        accept_new_users=False,
    )
    log_._catalogue_read_at = time.monotonic() - 120  # due for a re-read
    out: dict[str, Any] = {}
    first = threading.Thread(target=lambda: out.__setitem__("a", log_.append([ev("w1", user=999)])))
    first.start()
    assert reading.wait(10)  # the first batch is re-reading the catalogue
    second = threading.Thread(target=lambda: out.__setitem__("b", log_.append([ev("w2", user=999)])))
    second.start()
    time.sleep(0.2)  # the second batch now waits for that re-read
    release.set()
    first.join(10)
    second.join(10)
    assert out["a"].stored == 1 and out["b"].stored == 1 and out["b"].unknown_user_ids == ()


def test_export_quarantines_what_the_contract_refuses(store: DataStore) -> None:
    log = EventLog(store.layout.event_log)  # no id checks at append time
    log.append([ev("fine"), ev("ghost", item=5)])
    with open(log.segments()[0], "ab") as fh:
        fh.write(b"not json\n")
    res = export_to_store(log, store, now=NOW)
    assert (res.added, res.quarantined, res.corrupt_lines) == (1, 1, 1)
    q = pd.read_parquet(res.quarantine_path)
    assert sorted(q["reason"]) == ["malformed_line", "unknown_item"]


# ------------------------------------------------------------------------ new users
NEW = 5000  # a user id the catalogue has never seen


def test_new_users_events_are_accepted_durable_pushed_and_exactly_once(
    store: DataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[list[tuple[object, object]]] = []
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = EventLog.open(
        store.layout.root, sink=lambda recs: pushed.append([(r["user_id"], r["item_id"]) for r in recs])
    )
    assert log.accept_new_users  # the default
    out = log.append([ev("n1", user=NEW, item=100), ev("n2", user=NEW, item=101, kind="view"), ev("k1")])
    assert out.accepted and (out.stored, out.duplicates, out.rejected, out.push_failed) == (3, 0, 0, 0)
    assert out.unknown_user_ids == () and out.unknown_item_ids == ()
    assert synced, "a new user's events are fsync'd before the append returns, like any other"
    assert pushed == [[(NEW, 100), (NEW, 101), (1, 100)]]  # streamed exactly like a known user's
    assert log.append([ev("n1", user=NEW, item=100)]).duplicates == 1  # a retry: not stored, not pushed
    log.close()
    restarted = EventLog.open(store.layout.root)  # a restarted replica still recognises the retry
    assert restarted.append([ev("n2", user=NEW, item=101, kind="view")]).duplicates == 1
    assert sorted(r["event_id"] for r in log_lines(restarted)) == ["k1", "n1", "n2"]
    assert len(pushed) == 1 and log.stats.balanced() and restarted.stats.balanced()


def test_unknown_items_stay_refused_whole_for_new_users_too(store: DataStore) -> None:
    pushed: list[object] = []
    log = EventLog.open(store.layout.root, sink=pushed.append)
    out = log.append([ev("a", user=NEW, item=100), ev("b", user=NEW, item=5), ev("c", item=10**9)])
    assert not out.accepted and (out.stored, out.rejected) == (0, 3)
    assert out.unknown_item_ids == (5, 10**9) and out.unknown_user_ids == ()  # a new user is no problem
    assert "unknown item_id(s) [5, 1000000000]" in out.problem()
    assert log_lines(log) == [] and pushed == []
    huge = log.append([ev("h", user=2**70)])  # no store can hold this id: refused, new user or not
    assert not huge.accepted and huge.unknown_user_ids == (2**70,)
    assert log.stats.balanced() and log.stats.rejected == 4


def test_export_adds_new_users_to_the_users_table_and_quarantines_none_of_their_events(
    store: DataStore,
) -> None:
    log = EventLog.open(store.layout.root)
    early = ev("n1", user=NEW, item=100, timestamp=NOW - timedelta(hours=2))
    log.append([ev("n2", user=NEW, item=101), early, ev("n3", user=NEW + 1, item=102, kind="view"), ev("k1")])
    res = export_to_store(log, store, now=NOW)
    assert (res.added, res.quarantined, res.new_users) == (4, 0, 2)
    users = store.users().set_index("user_id")
    assert {NEW, NEW + 1} <= set(users.index) and len(users) == len(USERS) + 2
    assert users.loc[NEW, "signup_at"] == pd.Timestamp(NOW - timedelta(hours=2))  # their first event
    assert pd.isna(users.loc[NEW, "age"]) and pd.isna(users.loc[NEW, "gender"])  # demographics unknown
    stored = store.events(columns=["event_id", "user_id"])
    assert sorted(stored.loc[stored["user_id"] >= NEW, "event_id"]) == ["n1", "n2", "n3"]
    # The next export knows them: nothing new, and an ingest with a profile replaces the row.
    log.append([ev("n4", user=NEW, item=103)])
    again = export_to_store(log, store, now=NOW)
    assert (again.added, again.new_users) == (1, 0)
    store.upsert_users(pd.DataFrame({"user_id": [NEW], "age": [31], "signup_at": [NOW]}))
    assert store.users().set_index("user_id").loc[NEW, "age"] == 31


def test_items_upserted_while_serving_can_be_clicked_at_once_and_join_the_items_table(
    store: DataStore,
) -> None:
    from streamrec.data.catalogue import CatalogueLog

    log = EventLog.open(store.layout.root)
    assert not log.append([ev("x0", item=5000)]).accepted  # unknown: 422
    CatalogueLog(store.layout.root).append(
        [{"item_id": 5000, "title": "New", "categories": ["drama"], "published_at": NOW - timedelta(hours=1)},
         {"item_id": 5001, "flagged": True}]
    )  # fmt: skip
    out = log.append([ev("x1", item=5000)])  # acknowledged upsert: known now
    assert out.accepted and out.stored == 1
    assert not log.append([ev("x2", item=5001)]).accepted  # a flag alone creates no item: still 422
    assert not log.append([ev("x3", item=5002)]).accepted  # never named: unknown
    res = export_to_store(log, store, now=NOW)
    assert (res.added, res.quarantined, res.new_items) == (1, 0, 1)
    items = store.items().set_index("item_id")
    assert items.loc[5000, "title"] == "New" and list(items.loc[5000, "categories"]) == ["drama"]
    assert items.loc[5000, "published_at"] == pd.Timestamp(NOW - timedelta(hours=1))
    assert 5001 not in items.index
    assert export_to_store(log, store, now=NOW).new_items == 0  # stored now


def test_a_new_user_whose_only_event_is_quarantined_is_not_created(store: DataStore) -> None:
    log = EventLog(store.layout.event_log)  # no id checks at append time: the contract decides
    log.append([ev("x", user=NEW, item=5)])
    res = export_to_store(log, store, now=NOW)
    assert (res.added, res.quarantined, res.new_users) == (0, 1, 0)
    assert NEW not in set(store.users()["user_id"])


# ------------------------------------------------------------------------ retention
DAY = 86400.0


class Clock:
    """A writer's wall clock that tests move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def age(path: Path, days: float) -> None:
    """Make ``path`` look last written ``days`` ago."""
    when = time.time() - days * DAY
    os.utime(path, (when, when))


def test_a_writer_rotates_once_its_segment_reaches_the_maximum_age(store: DataStore) -> None:
    clock = Clock()
    log = EventLog.open(store.layout.root, clock=clock)
    log.append([ev("a1")])
    clock.offset = SEGMENT_MAX_AGE_S - 60
    log.append([ev("a2")])
    assert len(log.segments()) == 1
    clock.offset = SEGMENT_MAX_AGE_S + 1
    log.append([ev("a3")])
    assert len(log.segments()) == 2
    assert sorted(r["event_id"] for r in log_lines(log)) == ["a1", "a2", "a3"]


def test_prune_deletes_only_exported_segments_past_the_retention(store: DataStore) -> None:
    clock = Clock()
    a = EventLog.open(store.layout.root, clock=clock)
    b = EventLog.open(store.layout.root)
    c = EventLog.open(store.layout.root)
    a.append([ev("x1"), ev("x2")])
    b.append([ev("y1")])
    assert export_to_store(a, store, now=NOW).added == 3  # a's and b's segments are exported
    c.append([ev("z1", user=2)])  # c's segment is not
    seg_a, seg_b, seg_c = (log._segment for log in (a, b, c))
    assert seg_a and seg_b and seg_c
    age(seg_a, 10)
    age(seg_c, 10)
    res = prune(a, retain_days=7)
    assert (res.deleted, res.kept, res.kept_not_exported) == (1, 2, 1)
    assert res.deleted_bytes > 0
    assert sorted(p.name for p in a.segments()) == sorted([seg_b.name, seg_c.name])
    marks = json.loads((store.layout.event_log / "exported.json").read_text())
    assert seg_a.name not in marks and seg_b.name in marks
    assert prune(a, retain_days=7).deleted == 0  # idempotent


def test_after_a_prune_writers_forget_its_ids_and_lose_nothing(store: DataStore) -> None:
    clock = Clock()
    a = EventLog.open(store.layout.root, clock=clock)
    b = EventLog.open(store.layout.root)
    a.append([ev("x1"), ev("x2")])
    b.append([ev("y1")])
    export_to_store(a, store, now=NOW)
    assert b.snapshot()["ids_in_memory"] == 3  # its own y1, and a's ids read before its append
    b.append([ev("x1")])  # a's retry on b: still a duplicate
    assert b.stats.duplicates == 1 and b.snapshot()["ids_in_memory"] == 3
    assert a._segment is not None
    age(a._segment, 10)  # a has been idle for 10 days...
    clock.offset = 10 * DAY  # ...by its own clock too
    assert prune(a, retain_days=7).deleted == 1
    b.append([ev("y2")])
    assert b.snapshot()["ids_in_memory"] == 2  # x1, x2 left with their segment
    # a's open segment is gone: its next append goes to a fresh segment, nothing is lost.
    out = a.append([ev("x3"), ev("x1")])
    assert (out.stored, out.duplicates) == (2, 0)  # x1 is past the dedup window now
    assert sorted(r["event_id"] for r in log_lines(a)) == ["x1", "x3", "y1", "y2"]
    res = export_to_store(a, store, now=NOW)
    assert (res.added, res.already_present) == (2, 1)  # the store still holds x1 once
    assert a.stats.balanced() and b.stats.balanced()


def test_prune_keeps_unexported_lines_but_not_a_torn_tail(store: DataStore) -> None:
    log = EventLog.open(store.layout.root)
    log.append([ev("t1")])
    seg = log._segment
    assert seg is not None
    log.close()
    export_to_store(log, store, now=NOW)
    with open(seg, "ab") as fh:
        fh.write(b'{"event_id": "torn"')  # a write that died half-way (never acknowledged)
    age(seg, 30)
    assert prune(log, retain_days=7).deleted == 1

    log2 = EventLog.open(store.layout.root)
    log2.append([ev("t2")])
    assert log2._segment is not None
    age(log2._segment, 30)
    res = prune(log2, retain_days=7)  # t2 was never exported: kept, whatever its age
    assert (res.deleted, res.kept_not_exported) == (0, 1)


@pytest.mark.parametrize("days", [0, 0.5, -3, float("nan")])
def test_prune_refuses_a_retention_writers_could_still_be_inside(store: DataStore, days: float) -> None:
    log = EventLog.open(store.layout.root)
    with pytest.raises(ConfigError, match="at least 1 day"):
        prune(log, retain_days=days)


def test_export_event_log_exports_then_prunes(store: DataStore) -> None:
    assert export_event_log(store.layout.root) is None  # the API never logged anything here
    log = EventLog.open(store.layout.root)
    log.append([ev("e1"), ev("e2", kind="view")])
    assert log._segment is not None
    age(log._segment, 8)
    before = store.count_events()
    out = export_event_log(store.layout.root, retain_days=7)
    assert out is not None
    assert out["export"]["added"] == 2 and out["prune"]["deleted"] == 1
    assert store.count_events() == before + 2
    again = export_event_log(store.layout.root, retain_days=None)
    assert again is not None and again["export"]["read"] == 0 and again["prune"] is None


def test_cli_export_events(store: DataStore) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "streamrec",
            "data",
            "export-events",
            "--data-dir",
            str(store.layout.root),
        ]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)

    p = cli("--json")
    assert p.returncode == 0, p.stderr
    assert "logged no events" in json.loads(p.stdout)["event_log"]
    EventLog.open(store.layout.root).append([ev("c1"), ev("c2", user=3)])
    p = cli("--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["export.added"], out["export.read"], out["prune.deleted"], out["prune.kept"]) == (2, 2, 0, 1)
    p = cli("--retain-days", "0.1")
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr


# ------------------------------------------------------------------------ group push
class SlowFirstSink:
    """A sink whose first call waits for ``release``; later calls fail when ``fail_later``."""

    def __init__(self, fail_later: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.fail_later = fail_later

    def __call__(self, records: list[dict[str, object]]) -> None:
        self.calls.append(sorted(str(r["event_id"]) for r in records))
        if len(self.calls) == 1:
            assert self.release.wait(10)
        elif self.fail_later:
            raise ConnectionError("online store down")


def push_in_two_groups(
    log: EventLog, sink: SlowFirstSink, batches: list[list[EventIn]]
) -> list[AppendOutcome]:
    """Append ``batches[0]``; while its push waits in the sink, append the rest concurrently."""
    out: list[AppendOutcome] = []
    threads = [threading.Thread(target=lambda b=b: out.append(log.append(b))) for b in batches]
    deadline = time.monotonic() + 10
    threads[0].start()
    while not sink.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    for t in threads[1:]:
        t.start()
    while len(log._push_queue) < len(batches) - 1 and time.monotonic() < deadline:
        time.sleep(0.005)  # every later append is queued behind the first push
    sink.release.set()
    for t in threads:
        t.join(10)
    return out


def test_concurrent_appends_share_one_sink_call(store: DataStore) -> None:
    sink = SlowFirstSink()
    log = EventLog.open(store.layout.root, sink=sink)
    later = [[ev(f"b{i}-{j}", user=1 + j) for j in range(2)] for i in range(5)]
    outcomes = push_in_two_groups(log, sink, [[ev("a-0")], *later])
    assert sink.calls == [["a-0"], sorted(f"b{i}-{j}" for i in range(5) for j in range(2))]
    assert all(o.stored == o.received and o.push_failed == 0 for o in outcomes)
    assert (log.stats.pushed, log.stats.push_failed, log.stats.push_calls) == (11, 0, 2)
    assert log.stats.balanced()


def test_a_failed_group_push_counts_every_append_in_it(store: DataStore) -> None:
    sink = SlowFirstSink(fail_later=True)
    log = EventLog.open(store.layout.root, sink=sink)
    outcomes = push_in_two_groups(log, sink, [[ev("lead")], *([ev(f"g{i}"), ev(f"h{i}")] for i in range(3))])
    assert [len(c) for c in sink.calls] == [1, 6]
    assert sorted(o.push_failed for o in outcomes) == [0, 2, 2, 2]
    assert (log.stats.pushed, log.stats.push_failed, log.stats.stored) == (1, 6, 7)
    assert len(log_lines(log)) == 7  # the log has them all: nothing lost


def test_a_writer_whose_segment_was_deleted_by_hand_starts_a_new_one(store: DataStore) -> None:
    log = EventLog.open(store.layout.root)
    log.append([ev("d1")])
    assert log._segment is not None
    log._segment.unlink()  # an operator cleaning up a young segment: d1 is gone with it
    log.append([ev("d2")])
    assert [r["event_id"] for r in log_lines(log)] == ["d2"]  # d2 reached a file on disk
