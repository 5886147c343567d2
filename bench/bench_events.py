"""Events benchmark: what ``POST /v1/events`` costs, and that nothing is lost under load.

Two parts:

* **in-process**: :meth:`EventLog.append` alone (validation of ids, one ``write`` and, with
  ``fsync``, one ``fsync`` per batch) in a scratch directory, for batches of 1, 10 and 100
  events, with and without ``fsync``; milliseconds per append and events per second;
* **HTTP**: the fused composition (``configs/serve/local.yaml``: durable log with ``fsync`` and
  the streaming push to the online store) under an open-loop sweep of ``POST /v1/events`` with
  batches of ``--batch`` events, every event id new. Reported per rate: p50/p95/p99, and the
  highest sustained rate with p99 <= 200 ms. Then every request is sent again (what clients
  whose requests timed out do): afterwards the log must hold every event sent exactly once.

The HTTP part writes events into the data directory (its event log and online store), so by
default it builds a small scratch world (synthetic data, ``streamrec train --local``) in a
temporary directory. Writes ``bench/results/events.json`` and prints a markdown table.

    .venv/bin/python bench/bench_events.py                 # scratch world (~3 min to build)
    .venv/bin/python bench/bench_events.py --data-dir D    # D's event log and online store change
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# The serving benchmark's own helpers: one load generator, one deployment recipe.
from bench_serve import KEY, admin_status, app_config, build_request, free_port, open_loop, sustained  # noqa: E402


def scratch_world(users: int, items: int) -> Path:
    """A small trained world in a temporary directory (the HTTP part writes into it)."""
    root = Path(tempfile.mkdtemp(prefix="streamrec-bench-events-")) / "data"
    for cmd in (
        [
            "data",
            "synth",
            "--users",
            str(users),
            "--items",
            str(items),
            "--days",
            "14",
            "--data-dir",
            str(root),
        ],
        ["train", "--local", "--data-dir", str(root), "--json"],
    ):
        print(f"  streamrec {' '.join(cmd[:2])} ...", flush=True)
        subprocess.run([sys.executable, "-m", "streamrec", *cmd], check=True, capture_output=True, text=True)
    return root


def catalogue(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from streamrec.data.store import DataStore

    store = DataStore(data_dir)
    return store.users()["user_id"].to_numpy(np.int64), store.items()["item_id"].to_numpy(np.int64)


def event_bodies(users: np.ndarray, items: np.ndarray, n: int, batch: int, seed: int) -> list[dict[str, Any]]:
    """``n`` request bodies of ``batch`` events each, every event id new."""
    rng = np.random.default_rng(seed)
    run = uuid.uuid4().hex[:8]
    kinds = ("view", "click", "complete", "skip")
    now = datetime.now(UTC).isoformat()
    return [
        {
            "events": [
                {
                    "event_id": f"bench-{run}-{i}-{j}",
                    "user_id": int(rng.choice(users)),
                    "item_id": int(rng.choice(items)),
                    "event_type": kinds[(i + j) % 4],
                    "timestamp": now,
                }
                for j in range(batch)
            ]
        }
        for i in range(n)
    ]


def in_process(users: np.ndarray, items: np.ndarray, appends: int) -> list[dict[str, Any]]:
    """EventLog.append alone, per batch size and fsync setting."""
    from streamrec.api_models import EventIn
    from streamrec.data.event_log import EventLog

    rows = []
    for fsync in (True, False):
        for batch in (1, 10, 100):
            bodies = event_bodies(users, items, appends, batch, seed=batch)
            batches = [[EventIn.model_validate(e) for e in b["events"]] for b in bodies]
            with tempfile.TemporaryDirectory() as tmp:
                log = EventLog(Path(tmp) / "event_log", users, items, fsync=fsync)
                times = []
                for b in batches:
                    t = time.perf_counter()
                    out = log.append(b)
                    times.append(time.perf_counter() - t)
                    assert out.stored == batch
                log.close()
            ms = np.asarray(times) * 1e3
            row = {
                "fsync": fsync,
                "batch": batch,
                "appends": appends,
                "p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
                "events_per_s": round(batch * appends / float(ms.sum() / 1e3)),
            }
            print(f"  in-process fsync={fsync!s:5} batch {batch:>3}: p50 {row['p50_ms']:.3f} ms  "
                  f"p99 {row['p99_ms']:.3f} ms  {row['events_per_s']} events/s", flush=True)  # fmt: skip
            rows.append(row)
    return rows


def log_counters(port: int) -> dict[str, Any]:
    """The event log's counters, summed over the gateway replicas."""
    events: dict[str, Any] = admin_status("127.0.0.1", port)["events"]
    return events


def over_http(data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Open-loop sweep of POST /v1/events on the fused composition, then every request resent."""
    import httpx
    import ray
    from ray import serve

    from deployments import config

    users, items = catalogue(data_dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    port = free_port()
    sent: list[dict[str, Any]] = []
    try:
        config.deploy(app_config("fused", data_dir, port, "auto", None, fallback=True), timeout_s=300)
        before = log_counters(port)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=60)
        for body in event_bodies(users, items, 50, args.batch, seed=0):  # warm-up
            client.post("/v1/events", json=body).raise_for_status()
            sent.append(body)
        steps = []
        for k, rate in enumerate(float(r) for r in args.rates.split(",")):
            n = max(1, int(rate * args.step_seconds))  # what open_loop sends
            bodies = event_bodies(users, items, n, args.batch, seed=k + 1)
            reqs = [build_request("127.0.0.1", port, "/v1/events", b) for b in bodies]
            step = asyncio.run(open_loop("127.0.0.1", port, reqs, rate, args.step_seconds))
            sent += bodies[: step["sent"]]
            step["events_per_s"] = round(step["achieved_rps"] * args.batch, 1)
            step["load_avg_1m"] = round(os.getloadavg()[0], 2)
            steps.append(step)
            print(f"  http {rate:>5.0f} req/s x {args.batch}: p50 {step['p50_ms']:7.1f}  p95 {step['p95_ms']:7.1f}  "
                  f"p99 {step['p99_ms']:7.1f} ms  achieved {step['achieved_rps']:6.1f}/s  "
                  f"errors {step['errors'] + step['non_2xx']}", flush=True)  # fmt: skip
            if not sustained(step):
                break
        # A client that timed out retries: resend everything (the log is idempotent by event_id).
        # Afterwards every event sent must be in the log exactly once.
        time.sleep(5.0)  # requests the client gave up on may still be finishing on the server
        swept = log_counters(port)
        retry_stored = 0
        for body in sent:
            r = client.post("/v1/events", json=body)
            r.raise_for_status()
            retry_stored += int(r.json()["stored"])
        client.close()
        after = log_counters(port)
    finally:
        serve.shutdown()
        ray.shutdown()
    keys = ("received", "stored", "duplicates", "rejected", "push_failed", "push_calls")
    n_events = len(sent) * args.batch
    stored = after["stored"] - before["stored"]
    print(f"  resent {len(sent)} requests: {retry_stored} events stored by the retries; the log holds "
          f"{stored} of the {n_events} events sent", flush=True)  # fmt: skip
    return {
        "batch": args.batch,
        "steps": steps,
        "max_sustained_rps_p99_le_200ms": max((s["target_rps"] for s in steps if sustained(s)), default=0.0),
        "events_sent": n_events,
        "log_counters_after_sweep": {k: swept[k] - before[k] for k in keys},
        "stored_by_retries": retry_stored,
        "log_counters_after_retries": {k: after[k] - before[k] for k in keys},
        "nothing_lost": stored == n_events and after["rejected"] == before["rejected"] and after["balanced"],
    }


def render(payload: dict[str, Any]) -> str:
    lines = [
        "| fsync | batch | p50 ms | p99 ms | events/s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['fsync']} | {r['batch']} | {r['p50_ms']} | {r['p99_ms']} | {r['events_per_s']} |"
            for r in payload["in_process"]
        ),
    ]
    http = payload.get("http")
    if http:
        lines += [
            "",
            f"HTTP, fused composition, {http['batch']} events per request:",
            "",
            "| target req/s | achieved req/s | events/s | p50 ms | p95 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {s['target_rps']:g} | {s['achieved_rps']} | {s['events_per_s']} | {s['p50_ms']} | "
                f"{s['p95_ms']} | {s['p99_ms']} | {s['errors'] + s['non_2xx']} |"
                for s in http["steps"]
            ),
            "",
            f"Highest sustained rate with p99 <= 200 ms: {http['max_sustained_rps_p99_le_200ms']:g} req/s. "
            f"Every request then resent: of {http['events_sent']} events sent, the log holds "
            f"{http['log_counters_after_retries']['stored']} ({http['stored_by_retries']} stored by the retries; "
            f"nothing lost: {http['nothing_lost']}). During the sweep, "
            f"{http['log_counters_after_sweep'].get('push_calls', '?')} sink calls pushed "
            f"{http['log_counters_after_sweep']['stored']} events.",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="a trained data dir (its event log and online store get the events)")
    p.add_argument("--users", type=int, default=2000, help="scratch world size")
    p.add_argument("--items", type=int, default=5000, help="scratch world size")
    p.add_argument("--appends", type=int, default=300, help="in-process appends per setting")
    p.add_argument("--batch", type=int, default=10, help="events per HTTP request")
    p.add_argument("--rates", default="25,50,100,150,200,300", help="HTTP requests per second, in order")
    p.add_argument("--step-seconds", type=float, default=8.0)
    p.add_argument("--no-http", action="store_true", help="in-process part only")
    p.add_argument("--out", default=str(REPO / "bench/results/events.json"))
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    t0 = time.time()
    if args.data_dir:
        data_dir = Path(args.data_dir).resolve()
    else:
        print("building a scratch world:", flush=True)
        data_dir = scratch_world(args.users, args.items)
    users, items = catalogue(data_dir)
    print(f"data: {data_dir} ({len(users)} users, {len(items)} items)", flush=True)
    payload: dict[str, Any] = {
        "benchmark": "events",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "data_dir": str(data_dir),
        "in_process": in_process(users, items, args.appends),
    }
    if not args.no_http:
        payload["http"] = over_http(data_dir, args)
    payload["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}\n\n{render(payload)}")


if __name__ == "__main__":
    main()
