"""Issue 14, item 4(f): an event writer SIGKILLed at random moments, 50 times.

Every acknowledged event is in the log exactly once after the restarts, nothing is stored twice,
and the log (torn tails included) reads back, through :meth:`EventLog.read` and through the
export that feeds training.

Real processes: a launcher (``event_log_crash_writer.py``, started with this interpreter) forks
one writer at a time; the writer opens the log as a gateway replica does and appends batches
parsed as ``POST /v1/events`` parses them, journalling each batch before it sends it and, after
the append returned (the acknowledgement), an ``fsync``'d ack. This process kills the writer
with ``SIGKILL`` after a random (seeded) delay and starts the next one, which first re-sends
what a retrying client would: the batches left unanswered, and some acknowledged events. After
some kills the dead writer's segment also gets the torn tail a kill inside ``write()`` leaves
(:func:`tear`: the kill itself almost never lands there). After the last kill a fresh interpreter
reads everything back (``verify``).

This covers the death of a process (what survives is what reached the kernel), not of the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from streamrec.api_models import EventsRequest
from streamrec.data.event_log import event_record
from streamrec.data.store import DataStore

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("event_log_crash_writer.py")
KILLS = 50
SEED = 14_4_6  # issue 14, item 4(f)
USERS = list(range(1, 11))  # as in the helper's content()
ITEMS = list(range(100, 140))
#: Share of the kills aimed at the writer's start (fork, opening the log, reading its ids).
EARLY_KILLS = 0.15
#: Longest wait after the writer is ready before the kill (it appends all along).
MAX_DELAY_S = 0.25
#: Share of the kills after which the dead writer's segment gets a torn tail (see tear()).
TEARS = 0.3


def make_store(root: Path) -> DataStore:
    """A data directory whose catalogue knows the helper's users and items."""
    then = datetime.now(UTC) - timedelta(days=30)
    store = DataStore(root)
    store.upsert_users(pd.DataFrame({"user_id": USERS, "signup_at": [then] * len(USERS)}))
    store.upsert_items(
        pd.DataFrame(
            {
                "item_id": ITEMS,
                "title": [f"Item {i}" for i in ITEMS],
                "categories": [["a"]] * len(ITEMS),
                "published_at": [then] * len(ITEMS),
                "promoted": [False] * len(ITEMS),
                "flagged": [False] * len(ITEMS),
            }
        )
    )
    return store


class Launcher:
    """The helper's launcher process and the lines it (and its writers) print."""

    def __init__(self, data_dir: Path, stderr_path: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "launcher", str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def start_writer(self, cmd: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.expect("pid").split()[1])

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """The next line starting with ``prefix`` (``ready`` lines of earlier writers skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} from the launcher in {timeout:g}s; {self.stderr()}"
                ) from None
            if line is None:
                raise AssertionError(f"the launcher ended waiting for {prefix!r}; {self.stderr()}")
            if line.startswith(prefix):
                return line
            if not line.startswith("ready "):
                raise AssertionError(f"expected {prefix!r}, got {line!r}; {self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return "stderr: " + self.stderr_path.read_text()[-3000:]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def read_journal(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """A writer's ``send`` and ``ack`` records by batch; a last line torn by the kill is ignored."""
    sends: dict[int, dict[str, Any]] = {}
    acks: dict[int, dict[str, Any]] = {}
    if not path.exists():  # killed before it opened the journal
        return sends, acks
    lines = path.read_bytes().split(b"\n")
    for n, line in enumerate(lines):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            assert n == len(lines) - 1, f"{path}: only the last line may be torn, line {n} is not JSON"
            continue
        if "send" in rec:
            sends[rec["send"]] = rec
        else:
            acks[rec["ack"]] = rec
    return sends, acks


def _helper() -> Any:
    """The helper module (loaded by path: the test directories are not packages)."""
    spec = importlib.util.spec_from_file_location("event_log_crash_writer", HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tear(segments_dir: Path, pid: int, run: int, timestamp: str, rng: random.Random) -> list[str]:
    """Leave what a kill inside ``write()`` leaves: a batch cut off mid-line at the dead writer's tail.

    A ``SIGKILL`` almost never lands inside the ``write`` syscall itself (the writer spends its
    time in ``fsync``), so the torn tail it could leave is made here, on the dead writer's own
    segment: the complete lines of the batch's first events, then part of the next line. That is
    the state of a writer killed while writing a second request's batch (writes are serialised,
    so only the last one can be torn). Returns the batch's ids (sent, never answered), or ``[]``
    when the writer has no segment or its segment already ends torn.
    """
    mine = [p for p in segments_dir.glob("seg-*.jsonl") if p.stem.split("-")[-2] == str(pid)]
    if len(mine) != 1 or not mine[0].read_bytes().endswith(b"\n"):
        return []
    ids = [f"t{run:03d}-{k:04d}" for k in range(rng.randint(1, 12))]
    events = EventsRequest.model_validate_json(_helper().body(ids, timestamp)).events
    now = datetime.now(UTC)
    lines = [json.dumps(event_record(e, now), separators=(",", ":")).encode() + b"\n" for e in events]
    whole = rng.randrange(len(lines))  # lines that made it whole; the next one is cut
    torn = b"".join(lines[:whole]) + lines[whole][: rng.randrange(1, len(lines[whole]) - 1)]
    with open(mine[0], "ab") as fh:
        fh.write(torn)
        fh.flush()
        os.fsync(fh.fileno())
    return ids


def test_writer_sigkilled_50_times_keeps_every_acknowledged_event_exactly_once(tmp_path: Path) -> None:
    t0 = time.monotonic()
    store = make_store(tmp_path / "data")
    data_dir = store.layout.root
    timestamp = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0).isoformat()
    schedule = random.Random(SEED)  # when each kill comes: the same every run
    rng = random.Random(SEED + 1)  # what is re-sent and torn (draws depend on what was acknowledged)
    acked: set[str] = set()  # answered to the client at least once
    sent: set[str] = set()  # handed to EventLog.append at least once
    retry: list[list[str]] = []  # the batches the client still has to send again
    in_flight_kills = early = resend_batches = tears = 0
    segments_dir = store.layout.event_log / "segments"
    launcher = Launcher(data_dir, tmp_path / "launcher.stderr")
    live: int | None = None  # a writer not yet reaped (killed in `finally` if the test fails)
    try:
        for run in range(KILLS):
            journal = tmp_path / f"journal-{run:03d}.jsonl"
            cmd = {
                "run": run,
                "seed": SEED,
                "ack_file": str(journal),
                "timestamp": timestamp,
                "retry": retry,
                "resend": rng.sample(sorted(acked), min(30, len(acked))),
            }
            pid = live = launcher.start_writer(cmd)
            if schedule.random() < EARLY_KILLS:
                early += 1
                time.sleep(schedule.uniform(0.0, 0.05))
            else:
                launcher.expect(f"ready {pid}")
                time.sleep(schedule.uniform(0.0, MAX_DELAY_S))
            os.kill(pid, signal.SIGKILL)
            status = int(launcher.expect(f"exit {pid}").split()[2])
            live = None
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"writer {run} ended by itself (status {status}), not by the kill; {launcher.stderr()}"
            )

            sends, acks = read_journal(journal)
            for j, ack in acks.items():
                assert j in sends
                assert ack["received"] == ack["stored"] + ack["duplicates"]
                acked.update(sends[j]["ids"])
                if ack["kind"] == "resend_acked":  # every one of them was acknowledged before
                    resend_batches += 1
                    assert ack["stored"] == 0, f"run {run}: an acknowledged event was stored again: {ack}"
            for rec in sends.values():
                sent.update(rec["ids"])
            unanswered = sorted(sends.keys() - acks.keys())
            assert unanswered in ([], [max(sends, default=-1)]), f"run {run}: unanswered batches {unanswered}"
            in_flight_kills += bool(unanswered)
            # Still due: the retries this writer did not get to, the batch it did not answer.
            retry = [ids for j, ids in enumerate(retry) if j not in sends]
            retry += [sends[j]["ids"] for j in unanswered]
            if rng.random() < TEARS and (cut := tear(segments_dir, pid, run, timestamp, rng)):
                tears += 1
                sent.update(cut)
                retry.append(cut)
    finally:
        if live is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(live, signal.SIGKILL)
        launcher.close()
    kill_s = time.monotonic() - t0

    spec, out = tmp_path / "verify-spec.json", tmp_path / "verify-out.json"
    spec.write_text(json.dumps({"acked": sorted(acked), "timestamp": timestamp}))
    done = subprocess.run(
        [sys.executable, str(HELPER), "verify", str(data_dir), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())

    stored = Counter(rec[0] for rec in got["stored"])
    twice = {x: n for x, n in stored.items() if n > 1}
    segments = got["segments"]
    torn = sum(1 for s in segments if s["torn_tail_bytes"])
    summary = (
        f"{KILLS} kills ({early} early, {in_flight_kills} with a batch in flight), {len(segments)} segments, "
        f"{torn} torn tails ({tears} made by tear()), {len(sent)} ids sent, {len(acked)} acknowledged, {len(stored)} stored; "
        f"kills {kill_s:.1f}s, verify {got['seconds']:.1f}s"
    )
    print(summary)

    # The log reads back: complete lines all parse; at most a torn tail per dead writer's segment.
    assert got["corrupt_lines_at_open"] == 0, summary
    assert all(s["unparseable"] == 0 for s in segments), segments
    assert tears <= torn <= KILLS, summary
    # Every acknowledged event exactly once, nothing stored twice, nothing that was not sent.
    assert not twice, f"stored more than once: {dict(list(twice.items())[:20])}; {summary}"
    lost = acked - stored.keys()
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:20]}; {summary}"
    assert stored.keys() <= sent, f"stored but never sent: {sorted(stored.keys() - sent)[:20]}"
    due = {x for ids in retry for x in ids}  # sent, unanswered, not yet retried when the test ended
    assert sent - stored.keys() <= due, (
        f"sent, retried, still missing: {sorted(sent - stored.keys() - due)[:20]}"
    )
    assert not got["content_mismatches"], got["content_mismatches"]
    # After the restarts the log still knows every acknowledged id: a client's retry is a duplicate.
    assert got["resent"] == {"received": len(acked), "stored": 0, "duplicates": len(acked)}
    # The export that feeds training reads the same events, each once, none refused.
    export = got["export"]["export"]
    assert export["corrupt_lines"] == 0 and export["quarantined"] == 0 and export["duplicates"] == 0, export
    assert export["read"] == export["added"] == len(stored), export
    assert Counter(got["store_ids"]) == stored
    # The faults were exercised: kills hit writers with a batch in flight, retries were answered.
    assert in_flight_kills >= KILLS // 4 and resend_batches > 0 and tears >= 3, summary
