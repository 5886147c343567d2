"""Processes for ``test_event_log_kill.py``: an event writer to SIGKILL, and a fresh reader.

Run by path with the project's interpreter (not imported by the test)::

    python event_log_crash_writer.py launcher DATA_DIR   # forks one writer per stdin command
    python event_log_crash_writer.py verify DATA_DIR SPEC_JSON OUT_JSON

``launcher`` imports the serving code once and then, for every ``{"run": ..}`` line on stdin,
forks a *writer*: a separate process that opens the event log the way a gateway replica does
(:meth:`EventLog.open` with a sink, fsync on), and appends batches parsed the way ``POST
/v1/events`` parses them until it is killed. Forking from a pre-imported launcher instead of
starting a fresh interpreter per writer keeps 50 restarts within seconds (the imports alone cost
more than a second each); the writer itself shares no state with the launcher beyond the
imported modules. The launcher prints ``pid N`` for each writer and ``exit N STATUS`` once it
has reaped it; the writer prints ``ready N`` once its log is open.

The writer's journal (one JSON line each, to ``<ack file>``):

* ``{"send": j, ...ids}`` written *before* batch ``j`` is handed to :meth:`EventLog.append`
  (what a client has sent; a line torn by the kill means the batch was never sent);
* ``{"ack": j, stored, duplicates, ...}`` written and ``fsync``'d *after* the append returned
  (what the client was told: an acknowledged batch).

Each event's content is a function of its id (:func:`content`), so the reader can check that
what the log holds is what was sent.

``verify`` runs in a fresh interpreter after the last kill: it opens the log (counting corrupt
lines), reads every stored event with :meth:`EventLog.read`, scans the raw segments, re-sends
every acknowledged event (all must be duplicates), exports the log to the events store with
:func:`export_event_log` (what ``streamrec data export-events`` and retraining run) and writes
what it found to ``OUT_JSON``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib
from datetime import datetime
from typing import Any

from streamrec.api_models import EventsRequest
from streamrec.data.event_export import export_event_log
from streamrec.data.event_log import EventLog
from streamrec.data.store import DataStore

#: Users and items of the test catalogue (the test writes these to the data directory).
USERS = list(range(1, 11))
ITEMS = list(range(100, 140))
KINDS = ("view", "click", "complete", "skip")


def content(event_id: str) -> tuple[int, int, str]:
    """``(user_id, item_id, event_type)`` of an event, derived from its id."""
    h = zlib.crc32(event_id.encode())
    return USERS[h % len(USERS)], ITEMS[(h // 16) % len(ITEMS)], KINDS[(h // 1024) % len(KINDS)]


def body(ids: list[str], timestamp: str) -> str:
    """The JSON body of ``POST /v1/events`` for ``ids``."""
    events = []
    for x in ids:
        user, item, kind = content(x)
        e: dict[str, Any] = {
            "event_id": x,
            "user_id": user,
            "item_id": item,
            "event_type": kind,
            "timestamp": timestamp,
        }
        if kind == "complete":
            e["watch_fraction"] = 1.0
        events.append(e)
    return json.dumps({"events": events})


def _journal(fd: int, rec: dict[str, Any], sync: bool) -> None:
    os.write(fd, (json.dumps(rec) + "\n").encode())
    if sync:
        os.fsync(fd)


def _batches(cmd: dict[str, Any]) -> Any:
    """``(kind, ids)`` of the batches a writer sends: the client's retries, then fresh ones forever."""
    rng = random.Random(f"{cmd['seed']}-{cmd['run']}")
    for ids in cmd["retry"]:  # the batches the previous writers never answered
        yield "retry", list(ids)
    pool = list(cmd["resend"])  # events acknowledged before: a client that did not get the answer
    if pool:
        yield "resend_acked", pool
    for j in range(10**9):
        size = rng.randint(100, 1000) if rng.random() < 0.02 else rng.randint(1, 12)
        ids = [f"r{cmd['run']:03d}-{j:05d}-{k:04d}" for k in range(size)]
        if pool and rng.random() < 0.2:  # a fresh batch that also repeats acknowledged events
            ids += rng.sample(pool, min(len(pool), rng.randint(1, 5)))
        if rng.random() < 0.1:  # the same id twice in one batch
            ids.append(ids[0])
        rng.shuffle(ids)
        yield "fresh", ids


def writer(data_dir: str, cmd: dict[str, Any]) -> None:
    """Append batches to the event log until killed (in a forked child)."""
    log = EventLog.open(data_dir, sink=lambda records: None)  # the gateway's path: fsync, then push
    fd = os.open(cmd["ack_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    print(f"ready {os.getpid()}", flush=True)
    for j, (kind, ids) in enumerate(_batches(cmd)):
        _journal(fd, {"send": j, "kind": kind, "ids": ids}, sync=False)
        # As the gateway does: the body is validated into an EventsRequest, then appended.
        req = EventsRequest.model_validate_json(body(ids, cmd["timestamp"]))
        out = log.append(req.events)
        if not out.accepted:
            raise RuntimeError(f"batch {j} refused: {out.problem()}")
        _journal(
            fd,
            {
                "ack": j,
                "kind": kind,
                "received": out.received,
                "stored": out.stored,
                "duplicates": out.duplicates,
            },
            sync=True,
        )


def launcher(data_dir: str) -> None:
    """Fork one writer per command line on stdin; report its pid and how it ended."""
    for line in sys.stdin:
        cmd = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                writer(data_dir, cmd)
                code = 0
            except BaseException as err:  # report, never return into the launcher's loop
                print(f"writer {os.getpid()} failed: {err!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


def verify(data_dir: str, spec_path: str, out_path: str) -> None:
    """Read the log back in this fresh process; write what it holds to ``out_path``.

    ``spec_path``: ``{"acked": [event ids], "timestamp": the events' timestamp}``.
    """
    with open(spec_path) as fh:
        spec = json.load(fh)
    t0 = time.monotonic()
    log = EventLog.open(data_dir)
    frame = log.read()
    sent_at = datetime.fromisoformat(spec["timestamp"])
    stored = [
        [str(r.event_id), int(r.user_id), int(r.item_id), str(r.event_type), r.timestamp == sent_at]
        for r in frame[["event_id", "user_id", "item_id", "event_type", "timestamp"]].itertuples(index=False)
    ]
    segments = []
    for seg in log.segments():
        data = seg.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        unparseable = 0
        for line in complete.splitlines():
            try:
                json.loads(line)
            except ValueError:
                unparseable += 1
        segments.append(
            {
                "name": seg.name,
                "bytes": len(data),
                "lines": complete.count(b"\n"),
                "torn_tail_bytes": len(data) - len(complete),
                "unparseable": unparseable,
            }
        )
    # A client re-sending every acknowledged event to a freshly opened log: all duplicates.
    acked: list[str] = spec["acked"]
    resent = {"received": 0, "stored": 0, "duplicates": 0}
    for i in range(0, len(acked), 1000):
        req = EventsRequest.model_validate_json(body(acked[i : i + 1000], spec["timestamp"]))
        out = log.append(req.events)
        for k in resent:
            resent[k] += getattr(out, k)
    exported = export_event_log(data_dir, retain_days=None)
    store_ids = DataStore(data_dir).events(columns=["event_id"])["event_id"].astype(str).tolist()
    result = {
        "corrupt_lines_at_open": log.corrupt_lines_at_open,
        "stored": stored,
        "segments": segments,
        "resent": resent,
        "export": exported,
        "store_ids": store_ids,
        "content_mismatches": [s for s in stored if (*content(s[0]), True) != tuple(s[1:])][:20],
        "seconds": time.monotonic() - t0,
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    if sys.argv[1] == "launcher":
        launcher(sys.argv[2])
    elif sys.argv[1] == "verify":
        verify(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
