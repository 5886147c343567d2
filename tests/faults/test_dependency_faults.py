"""Real faults under load on the fused composition: a hung or dead online store, a failing ranker.

Each test drives 20 requests/s open loop (``tests/faults/conftest.py``) while the fault holds and
checks what the issue asks of the degradation chain: no error reaches the client, the tail stays
inside the budget, the answers say ``stale_features`` / ``simple_ranking`` and carry ``k`` items,
and the service is back at ``full`` soon after the fault ends. The numbers of the last run are in
``docs/operations.md`` ("What each fault costs").
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from tests.faults.conftest import FaultApps, level_share, open_loop, pct, summary, wait_full

pytestmark = [pytest.mark.slow]

RPS = 20.0
HOLD_S = 15.0
USERS = range(1, 301)

_LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _warm(apps: FaultApps, app: str, level: str = "full") -> None:
    """Ten answers in a row at ``level`` before the measurement (a fresh replica's first calls are slow)."""
    deadline = time.monotonic() + 90
    streak, user = 0, 1
    with apps.client() as c:
        while streak < 10:
            assert time.monotonic() < deadline, f"/{app} never served 10 requests in a row at '{level}'"
            r = c.post(f"/{app}/v1/recommend", json={"user_id": user, "k": 10}, headers=apps.headers)
            ok = r.status_code == 200 and r.json()["metadata"]["degradation_level"] == level
            streak = streak + 1 if ok else 0
            user += 1
            if not ok:
                time.sleep(0.5)


def _check_hung_store(apps: FaultApps, app: str, outcomes: list) -> None:  # type: ignore[type-arg]
    print(f"\n[fault] {app} hung store: {summary(outcomes)}")
    assert all(o.status == 200 for o in outcomes), summary(outcomes)
    assert all(o.items == 10 for o in outcomes), summary(outcomes)
    # The deadline cuts the hung read: requests cost the read budget, never the store's own
    # wait (SQLite's 5 s busy timeout, a paused Redis: forever; before the fix p50 was 9.4 s).
    # The latency targets (p99 <= 250 ms) are measured, not asserted (no timed asserts in
    # tests): each run prints its distribution, docs/operations.md has the table.
    assert pct(outcomes, 50) <= 250.0, summary(outcomes)
    assert max(o.latency_ms for o in outcomes) <= 3000.0, summary(outcomes)
    # Most answers are stale_features (the bug was: none were). On this 2-core box a CPU stall
    # during the fault pushes some requests further down the chain (the ranker's or the funnel's
    # budget runs out: simple_ranking, batch, popularity) — the chain working as designed, so the
    # share is not held to a timing-dependent bar (a CI run measured 76%, local runs 95-100%).
    assert level_share(outcomes, "stale_features") >= 0.5, summary(outcomes)
    assert not any(o.level == "full" for o in outcomes), summary(outcomes)  # the lock holds throughout
    below = [o for o in outcomes if o.level != "stale_features"]
    assert all(o.reason for o in below), summary(outcomes)  # every other answer says why
    assert any("online_store" in o.reason for o in outcomes), summary(outcomes)


def _metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels match ``labels`` (regular expressions)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(re.fullmatch(v, tags.get(k, "")) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _scrape_until(port: int, ok: Callable[[str], bool], timeout_s: float = 60.0) -> str:
    """Ray's Prometheus endpoint once ``ok`` holds for it (the agent exports every few seconds)."""
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
        except httpx.HTTPError:
            text = ""
        if ok(text):
            break
        time.sleep(2)
    return text


def test_sqlite_online_store_locked_by_another_process(fault_apps: FaultApps, metrics_port: int) -> None:
    """(a) An exclusive lock held by another process for 15 s: stale features, then full again.

    The operator sees it in the metrics: online-store reads cut at their budget (or refused by
    the open breaker) and responses counted at ``stale_features`` with an ``online_store_*`` reason.
    """
    _warm(fault_apps, "sqlite")
    db = fault_apps.world.data_dir / "features" / "online_store.db"
    assert db.is_file()
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db), str(HOLD_S + 1)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        outcomes = open_loop(fault_apps, "sqlite", RPS, HOLD_S, USERS)
    finally:
        locker.kill()
        locker.wait()
    _check_hung_store(fault_apps, "sqlite", outcomes)
    with sqlite3.connect(db, timeout=1) as con:  # the lock is gone
        con.execute("SELECT 1").fetchone()
    print(f"[fault] sqlite back to full after {wait_full(fault_apps, 'sqlite', 60.0):.1f}s")

    def seen(text: str) -> bool:
        cut = _metric_total(
            text,
            "ray_streamrec_online_store_read_ms_count",
            application="sqlite",
            outcome="timeout|circuit_open",
        )
        stale = _metric_total(
            text,
            "ray_streamrec_requests_total",
            application="sqlite",
            level="stale_features",
            reason="online_store_(timeout|circuit_open|error)",
        )
        return cut > 0 and stale > 0

    text = _scrape_until(metrics_port, seen)
    assert seen(text), [ln for ln in text.splitlines() if 'application="sqlite"' in ln][:20]
    # A trained model's facts reach the gauges: its version and the ages the staleness alerts watch.
    for gauge in (
        "ray_streamrec_model_version",
        "ray_streamrec_model_age_seconds",
        "ray_streamrec_batch_fallback_age_seconds",
        "ray_streamrec_feature_snapshot_age_seconds",
    ):
        assert _metric_total(text, gauge, application="sqlite") > 0, gauge


def test_redis_online_store_paused(fault_apps: FaultApps) -> None:
    """(a) Redis ``SIGSTOP``ped for 15 s (a hung store: connections open, no answer)."""
    _warm(fault_apps, "redis")
    redis = fault_apps.world.redis
    redis.signal(signal.SIGSTOP)
    try:
        outcomes = open_loop(fault_apps, "redis", RPS, HOLD_S, USERS)
    finally:
        redis.signal(signal.SIGCONT)
    _check_hung_store(fault_apps, "redis", outcomes)
    print(f"[fault] redis back to full after {wait_full(fault_apps, 'redis', 60.0):.1f}s")


def test_redis_killed_and_restarted_mid_load(fault_apps: FaultApps) -> None:
    """(b) Redis ``SIGKILL``ed under load and restarted 5 s later (durable: its data comes back)."""
    _warm(fault_apps, "redis")
    redis = fault_apps.world.redis
    import threading

    def chaos() -> None:
        time.sleep(2.0)
        redis.kill()
        time.sleep(5.0)
        redis.start()

    t = threading.Thread(target=chaos)
    t.start()
    try:
        outcomes = open_loop(fault_apps, "redis", RPS, 12.0, USERS)
    finally:
        t.join()
    print(f"\n[fault] redis killed: {summary(outcomes)}")
    assert all(o.status == 200 and o.items == 10 for o in outcomes), summary(outcomes)
    assert level_share(outcomes, "stale_features") > 0, summary(outcomes)
    print(f"[fault] redis back to full after {wait_full(fault_apps, 'redis', 60.0):.1f}s")


def test_ranker_raising_serves_simple_ranking(fault_apps: FaultApps) -> None:
    """(d) ``faults.ranker_error``: every answer is ordered by retrieval score, with k items."""
    _warm(fault_apps, "ranker-error", "simple_ranking")
    outcomes = open_loop(fault_apps, "ranker-error", RPS, 5.0, USERS)
    print(f"\n[fault] ranker raising: {summary(outcomes)}")
    assert all(o.status == 200 and o.items == 10 for o in outcomes), summary(outcomes)
    assert level_share(outcomes, "simple_ranking") == 1.0, summary(outcomes)
    assert any("ranker" in o.reason for o in outcomes), summary(outcomes)


def test_ranker_timing_out_serves_simple_ranking_within_budget(fault_apps: FaultApps) -> None:
    """(d) ``faults.ranker_delay_ms: 400`` (past the 60 ms ranker budget): simple ranking, in time."""
    _warm(fault_apps, "ranker-slow", "simple_ranking")
    outcomes = open_loop(fault_apps, "ranker-slow", RPS, 8.0, USERS)
    print(f"\n[fault] ranker slow: {summary(outcomes)}")
    assert all(o.status == 200 and o.items == 10 for o in outcomes), summary(outcomes)
    assert level_share(outcomes, "simple_ranking") >= 0.95, summary(outcomes)
    # Cut at the 60 ms ranker budget, never the 400 ms the ranker takes (see the store tests).
    assert pct(outcomes, 50) <= 250.0, summary(outcomes)


def test_a_hung_source_is_left_out_and_counted(fault_apps: FaultApps, metrics_port: int) -> None:
    """``faults.source_delay_ms: {trending: 400}``: answers go on without the source, the misses are scraped.

    The other sources fill every answer; the source's own breaker and its one abandoned call
    keep it from holding the retrieval threads. The share at ``full`` is printed, not held to a
    bar (a CPU stall on this box pushes answers down the chain, as in the store tests).
    """
    _warm(fault_apps, "source-slow")
    outcomes = open_loop(fault_apps, "source-slow", RPS, 8.0, USERS)
    print(f"\n[fault] trending source hung: {summary(outcomes)}")
    assert all(o.status == 200 and o.items == 10 for o in outcomes), summary(outcomes)
    assert level_share(outcomes, "full") > 0, summary(outcomes)

    def seen(text: str) -> bool:
        return (
            _metric_total(
                text,
                "ray_streamrec_source_missing_total",
                application="source-slow",
                source="trending",
                cause="timeout",
            )
            > 0
        )

    text = _scrape_until(metrics_port, seen)
    assert seen(text), [ln for ln in text.splitlines() if "source_missing" in ln][:20]
