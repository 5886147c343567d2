"""Soak: a fixed-rate open-loop load on the fused composition for minutes, reported per minute.

Deploys ``configs/serve/local.yaml`` (the fused composition, its two Gateway replicas, the
trained recommender, the durable event log and the streaming push to the online store) in a
local Ray on loopback, the way ``bench/bench_serve.py`` and ``bench/bench_events.py`` do (their
helpers: the world, the Serve config with the bench key, the readiness wait), then sends

* ``POST /v1/recommend`` (k=20, known users, 30% with an ``exclude`` list), and
* ``POST /v1/events`` (``--event-batch`` events of valid user/item ids, every event id new),
  one events batch after every ``--events-every`` recommends,

at ``--rps`` requests per second in all, on a fixed schedule whatever the responses do (open
loop: an asyncio scheduler, ``httpx.AsyncClient``; latency is measured from the *scheduled* send
time, so a stall shows up as latency and not as fewer requests). In-flight requests are capped
(``--max-inflight``): a request due while the cap is reached is not sent and counts as
*dropped*; one the scheduler itself sends more than ``--late-ms`` after its time counts as
*late* (the load generator was starved, e.g. by other work on the machine).

Per minute of scheduled time: requests sent (recommend / events), 2xx, non-2xx by status,
client timeouts (``--timeout-s``), other client errors, dropped, late, the degradation levels
(``metadata.degradation_level``) of the recommend answers, recommend answers with fewer than k
items, p50/p99 latency of each kind, and the RSS (``/proc/PID/status`` VmRSS) of every Serve
replica process of the application, found through Ray's state API (``list_actors``: the actor's
pid) or, without it, among this process's descendants by their ``ray::ServeReplica:<app>:``
process title. Memory growth per replica: the slope of a least-squares line through its RSS
samples (every ``--sample-s`` seconds) from the start of minute 2 to the end, in MiB/minute, and
its RSS at the end of minute 1 against the end of the last minute.

It stops by itself: ``rps * minutes * 60`` requests, then waits at most ``--timeout-s`` for the
last answers. Only 127.0.0.1 is targeted. Serve and Ray are shut down at the end, also on
Ctrl-C or SIGTERM (the minutes measured so far are still written).

Writes ``bench/results/soak-<UTC timestamp>.json`` and prints a markdown table.

    make soak                                   # 10 minutes at 20 req/s, scratch world
    make soak SOAK_MINUTES=2 SOAK_RPS=20
    .venv/bin/python bench/soak.py --minutes 3 --rps 20 --data-dir D   # D gets the events
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# The serving benchmarks' own helpers: one world recipe, one deployment recipe, one key.
from bench_events import catalogue, event_bodies, scratch_world  # noqa: E402
from bench_serve import KEY, admin_status, app_config, free_port, ray_cpu_seconds, wait_serving  # noqa: E402

HOST = "127.0.0.1"  # the only address this script sends to
APP = "soak"
MIB = 1024.0 * 1024.0
MAX_MINUTES = 24 * 60
_DURATION = re.compile(r"\b\d+\.\d+ ?s\b")  # "refused for another 29.787s"


# ------------------------------------------------------------------------------------------
# Replica processes and their memory
# ------------------------------------------------------------------------------------------


def _descendants(root: int) -> set[int]:
    """PIDs of every process below ``root`` (Ray's local GCS, raylet and workers hang below the driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _serve_processes_proc(app: str) -> dict[int, str]:
    """pid -> role of this run's Serve processes, from process titles (``ps``), own descendants only.

    Other people's Ray instances on the same machine have replicas with the same titles; only the
    processes below this one belong to this run.
    """
    mine = _descendants(os.getpid())
    out: dict[int, str] = {}
    for pid, (name, _) in ray_cpu_seconds().items():
        if pid not in mine:
            continue
        if name.startswith(f"ray::ServeReplica:{app}:"):
            out[pid] = "replica:" + name.rsplit(":", 1)[1]
        elif name == "ray::ProxyActor":
            out[pid] = "proxy"
        elif name == "ray::ServeController":
            out[pid] = "controller"
    return out


def _serve_processes_state(app: str) -> dict[int, str]:
    """pid -> role of the live Serve actors, from Ray's state API (needs the dashboard)."""
    import ray
    from ray.util.state import list_actors

    out: dict[int, str] = {}
    for a in list_actors(
        address=ray.get_runtime_context().gcs_address,  # this run's Ray: others may run on the machine
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        timeout=10,
        raise_on_missing_output=False,
    ):
        cls, pid = a.class_name or "", a.pid
        if not pid:
            continue
        if cls.startswith(f"ServeReplica:{app}:"):
            out[int(pid)] = "replica:" + cls.rsplit(":", 1)[1]
        elif cls == "ProxyActor":
            out[int(pid)] = "proxy"
        elif cls == "ServeController":
            out[int(pid)] = "controller"
    return out


class ProcessFinder:
    """Finds this run's Serve processes: the state API when it answers, else the process titles."""

    def __init__(self, app: str, state_api: bool) -> None:
        self.app = app
        self.method = "ray.util.state.list_actors" if state_api else "process titles (/proc), own descendants"

    def __call__(self) -> dict[int, str]:
        if self.method == "ray.util.state.list_actors":
            try:
                found = _serve_processes_state(self.app)
                if any(r.startswith("replica:") for r in found.values()):
                    return found
            except Exception:
                pass
            self.method = "process titles (/proc), own descendants"
        return _serve_processes_proc(self.app)


def rss_bytes(pid: int) -> int | None:
    """VmRSS of ``pid`` from ``/proc/PID/status`` (None once the process has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_rss(pids: dict[int, str]) -> dict[int, int | None]:
    return {pid: rss_bytes(pid) for pid in pids}


# ------------------------------------------------------------------------------------------
# Open-loop load
# ------------------------------------------------------------------------------------------


class Minute:
    """What happened to the requests *scheduled* in one minute."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()  # recommend / events
        self.ok: Counter[str] = Counter()
        self.status: Counter[int] = Counter()  # non-2xx only
        self.timeouts = 0
        self.other_errors: Counter[str] = Counter()
        self.dropped = 0
        self.late = 0
        self.levels: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.short = 0  # recommend answers with fewer than k items
        self.events_acked = 0
        self.events_stored = 0
        self.lat: dict[str, list[float]] = {"recommend": [], "events": []}

    def summary(self) -> dict[str, Any]:
        def pct(xs: list[float], q: float) -> float | None:
            return round(float(np.percentile(xs, q)), 1) if xs else None

        return {
            "sent": dict(self.sent),
            "ok": dict(self.ok),
            "non_2xx": {str(k): v for k, v in sorted(self.status.items())},
            "client_timeouts": self.timeouts,
            "other_errors": dict(self.other_errors),
            "dropped": self.dropped,
            "late": self.late,
            "levels": dict(self.levels),
            "reasons": dict(self.reasons),
            "short_answers": self.short,
            "events_acked": self.events_acked,
            "events_stored": self.events_stored,
            "recommend_p50_ms": pct(self.lat["recommend"], 50),
            "recommend_p99_ms": pct(self.lat["recommend"], 99),
            "events_p50_ms": pct(self.lat["events"], 50),
            "events_p99_ms": pct(self.lat["events"], 99),
            "recommend_max_ms": round(max(self.lat["recommend"]), 1) if self.lat["recommend"] else None,
        }


def recommend_bodies(users: np.ndarray, items: np.ndarray, n: int, k: int, seed: int) -> list[dict[str, Any]]:
    """``n`` recommend bodies: known users, ``k`` items, 30% with 1-5 excluded items."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body: dict[str, Any] = {"user_id": int(rng.choice(users)), "k": k}
        if rng.random() < 0.3:
            body["exclude"] = [int(x) for x in rng.choice(items, size=int(rng.integers(1, 6)))]
        out.append(body)
    return out


async def soak(args: argparse.Namespace, port: int, users: np.ndarray, items: np.ndarray) -> dict[str, Any]:
    """The open-loop run and the RSS sampler; returns the per-minute record (partial if interrupted)."""
    import httpx

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)

    clock = time.perf_counter
    rate = float(args.rps)
    total = max(1, int(rate * args.minutes * 60))
    period = args.events_every + 1
    n_events = total // period + 1
    ev_bodies = event_bodies(users, items, n_events, args.event_batch, seed=1)
    rec_bodies = recommend_bodies(users, items, 4096, args.k, seed=2)
    n_minutes = math.ceil(args.minutes)
    minutes = [Minute() for _ in range(n_minutes)]
    samples: list[dict[str, Any]] = []
    finder = ProcessFinder(APP, args.dashboard)
    stop = asyncio.Event()
    interrupted = False
    inflight = 0
    max_inflight_seen = 0
    prefix = f"/{APP}"

    start = clock() + 0.2

    def bucket(at: float) -> Minute:
        return minutes[min(int((at - start) // 60), n_minutes - 1)]

    async def sampler() -> None:
        """RSS (and CPU seconds) of every Serve process every ``sample_s``, off the event loop."""
        roles: dict[int, str] = {}
        last_lookup = -1e9
        while not stop.is_set():
            t = clock() - start
            if t - last_lookup >= 30.0 or not roles:  # replicas can be replaced: look again now and then
                roles = await asyncio.to_thread(finder)
                last_lookup = t
            rss = await asyncio.to_thread(read_rss, roles)
            if any(v is None for v in rss.values()):  # one went away: look again at once
                roles = await asyncio.to_thread(finder)
                last_lookup = t
                rss = await asyncio.to_thread(read_rss, roles)
            samples.append(
                {
                    "t_s": round(t, 2),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "rss_mib": {
                        f"{roles[p]}:{p}": round(v / MIB, 1) for p, v in rss.items() if v is not None
                    },
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.sample_s)

    async def progress() -> None:
        """One line per minute while it runs (the table at the end is the record)."""
        m = 0
        while m < n_minutes:
            await asyncio.sleep(max(0.0, start + (m + 1) * 60 - clock()) + 0.5)
            s = minutes[m].summary()
            rss = samples[-1]["rss_mib"] if samples else {}
            reps = " ".join(f"{k.split(':')[-1]}={v:.0f}" for k, v in rss.items() if k.startswith("replica:"))
            print(f"  minute {m + 1}: sent {sum(s['sent'].values())} ok {sum(s['ok'].values())} "
                  f"non-2xx {s['non_2xx']} timeouts {s['client_timeouts']} dropped {s['dropped']} "
                  f"levels {s['levels']} rec p50/p99 {s['recommend_p50_ms']}/{s['recommend_p99_ms']} ms "
                  f"RSS MiB {reps} (in flight {inflight})", flush=True)  # fmt: skip
            m += 1

    async def one(client: httpx.AsyncClient, kind: str, body: dict[str, Any], at: float) -> None:
        nonlocal inflight
        m = bucket(at)
        try:
            r = await client.post(f"{prefix}/v1/{kind}", json=body)
        except httpx.TimeoutException:
            m.timeouts += 1
            return
        except httpx.HTTPError as err:
            m.other_errors[type(err).__name__] += 1
            return
        finally:
            inflight -= 1
        m.lat[kind].append((clock() - at) * 1e3)
        if not 200 <= r.status_code < 300:
            m.status[r.status_code] += 1
            return
        m.ok[kind] += 1
        try:
            data = r.json()
        except ValueError:
            m.other_errors["invalid JSON"] += 1
            return
        if kind == "recommend":
            meta = data.get("metadata") or {}
            m.levels[str(meta.get("degradation_level"))] += 1
            if meta.get("degradation_reason"):  # by level; durations that vary per request made alike
                reason = _DURATION.sub("N s", str(meta["degradation_reason"]))
                m.reasons[f"{meta.get('degradation_level')}: {reason}"] += 1
            if len(data.get("items") or []) < body["k"]:
                m.short += 1
        else:
            m.events_acked += len(body["events"])
            m.events_stored += int(data.get("stored", 0))

    limits = httpx.Limits(max_connections=args.max_inflight, max_keepalive_connections=args.max_inflight)
    timeout = httpx.Timeout(args.timeout_s)
    tasks: set[asyncio.Task[None]] = set()
    helpers: list[asyncio.Task[None]] = []
    sent = 0
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}", headers={"X-API-Key": KEY}, limits=limits, timeout=timeout
    ) as client:
        helpers = [asyncio.create_task(sampler()), asyncio.create_task(progress())]
        try:
            for i in range(total):
                at = start + i / rate
                delay = at - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                m = bucket(at)
                if clock() - at > args.late_ms / 1e3:
                    m.late += 1
                if inflight >= args.max_inflight:
                    m.dropped += 1
                    continue
                if i % period == args.events_every:
                    kind, body = "events", ev_bodies[i // period]
                    now = datetime.now(UTC).isoformat()
                    for e in body["events"]:
                        e["timestamp"] = now
                else:
                    kind, body = "recommend", rec_bodies[i % len(rec_bodies)]
                m.sent[kind] += 1
                inflight += 1
                max_inflight_seen = max(max_inflight_seen, inflight)
                sent += 1
                task = asyncio.create_task(one(client, kind, body, at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:  # the last answers, for at most one client timeout
                await asyncio.wait(set(tasks), timeout=args.timeout_s + 2.0)
        except asyncio.CancelledError:  # Ctrl-C / SIGTERM: keep what was measured
            interrupted = True
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            stop.set()
            for t in [*tasks, *helpers]:
                t.cancel()
            await asyncio.gather(*tasks, *helpers, return_exceptions=True)
            loop.remove_signal_handler(signal.SIGTERM)
    elapsed = clock() - start
    done = min(n_minutes, max(1, math.ceil(elapsed / 60))) if interrupted else n_minutes
    return {
        "interrupted": interrupted,
        "scheduled": total,
        "sent": sent,
        "elapsed_s": round(elapsed, 1),
        "max_inflight_seen": max_inflight_seen,
        "replica_discovery": finder.method,
        "minutes": [mn.summary() for mn in minutes[:done]],
        "rss_samples": samples,
    }


# ------------------------------------------------------------------------------------------
# Memory growth and the report
# ------------------------------------------------------------------------------------------


def memory(samples: list[dict[str, Any]], n_minutes: int) -> dict[str, Any]:
    """Per process: RSS at the end of each minute, and the growth (slope over minutes 2..end)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for key, mib in s["rss_mib"].items():
            series.setdefault(key, []).append((s["t_s"], mib))
    out: dict[str, Any] = {}
    for key, pts in series.items():
        per_minute: list[float | None] = []
        for m in range(n_minutes):
            inside = [v for t, v in pts if m * 60 <= t < (m + 1) * 60]
            per_minute.append(inside[-1] if inside else None)
        fit = [(t / 60.0, v) for t, v in pts if t >= 60.0]
        slope = (
            round(float(np.polyfit([x for x, _ in fit], [y for _, y in fit], 1)[0]), 3)
            if len(fit) >= 3 and fit[-1][0] - fit[0][0] > 0.5
            else None
        )
        known = [v for v in per_minute if v is not None]
        out[key] = {
            "rss_mib_end_of_minute": per_minute,
            "slope_mib_per_min_min2_to_end": slope,
            "first_minute_mib": known[0] if known else None,
            "last_minute_mib": known[-1] if known else None,
            "first_to_last_mib": round(known[-1] - known[0], 1) if len(known) >= 2 else None,
            "samples": len(pts),
        }
    return out


def _short(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def render(payload: dict[str, Any]) -> str:
    run, mem = payload["run"], payload["memory"]
    replicas = sorted(k for k in mem if k.startswith("replica:"))
    names = {k: f"{k.split(':')[1]} {i + 1}" for i, k in enumerate(replicas)}
    head = ["min", "recommend / events sent", "2xx", "non-2xx", "timeouts", "dropped / late", "levels",
            "rec p50 ms", "rec p99 ms", "events p99 ms"] + [f"RSS MiB {names[k]}" for k in replicas] + ["load 1m"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if run["interrupted"]:
        lines = [f"Interrupted after {run['elapsed_s']:g} s: the last minute is partial.", "", *lines]
    loads: dict[int, float] = {}
    for s in run["rss_samples"]:
        loads[min(int(s["t_s"] // 60), len(run["minutes"]) - 1)] = s["load_avg_1m"]
    for i, m in enumerate(run["minutes"]):
        sent = m["sent"]
        errs = m["non_2xx"] or {}
        other = sum(m["other_errors"].values())
        row = [
            str(i + 1),
            f"{sent.get('recommend', 0)} / {sent.get('events', 0)}",
            str(sum(m["ok"].values())),
            (_short(errs) if errs else "0") + (f" (+{other} other)" if other else ""),
            str(m["client_timeouts"]),
            f"{m['dropped']} / {m['late']}",
            _short(m["levels"]) + (f" ({m['short_answers']} short)" if m["short_answers"] else ""),
            f"{m['recommend_p50_ms']}",
            f"{m['recommend_p99_ms']}",
            f"{m['events_p99_ms']}",
        ]
        for k in replicas:
            per = mem[k]["rss_mib_end_of_minute"]
            row.append(f"{per[i]:.0f}" if i < len(per) and per[i] is not None else "-")
        row.append(f"{loads.get(i, float('nan')):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Memory growth (RSS; slope of a least-squares line over minutes 2..end, and end of minute "
              "1 vs end of the last minute):", ""]  # fmt: skip
    for k in sorted(mem):
        g = mem[k]
        role, pid = k.rsplit(":", 1)
        label = names.get(k, role)
        slope = g["slope_mib_per_min_min2_to_end"]
        lines.append(
            f"- {label} (pid {pid}): {'-' if slope is None else f'{slope:+.2f}'} MiB/min; "
            f"{g['first_minute_mib']} -> {g['last_minute_mib']} MiB "
            + (
                f"({g['first_to_last_mib']:+.1f} MiB)"
                if g["first_to_last_mib"] is not None
                else "(one minute only)"
            )
        )
    reasons: Counter[str] = Counter()
    for m in run["minutes"]:
        for r, n in m["reasons"].items():
            reasons[_DURATION.sub("N s", r)] += n
    if reasons:
        lines += ["", "Most frequent degradation reasons (`metadata.degradation_reason`) over the run:", ""]
        lines += [f"- {n} x {r}" for r, n in reasons.most_common(6)]
    acked = sum(m["events_acked"] for m in run["minutes"])
    log = payload.get("event_log") or {}
    if log:
        lines += ["", f"Events acknowledged to the client: {acked}; the event log's counters over the run: "
                  + ", ".join(f"{k} {v}" for k, v in log.items() if k != "ids_in_memory") + "."]  # fmt: skip
    funnel = ((payload.get("admin_status_after") or {}).get("stages") or {}).get("funnel") or {}
    if funnel:
        lines += ["", f"Gateway counters at the end (since start, warm-up included): served by level "
                  f"{funnel.get('served_by_level')}, fallbacks {funnel.get('fallbacks')}, funnel breaker "
                  f"{(funnel.get('breaker') or {}).get('state')} (opened {(funnel.get('breaker') or {}).get('times_opened')} times)."]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help=f"length of the load (at most {MAX_MINUTES})")
    p.add_argument(
        "--rps", type=float, default=20.0, help="requests per second, recommends and events together"
    )
    p.add_argument("--events-every", type=int, default=5, help="one events batch after this many recommends")
    p.add_argument("--event-batch", type=int, default=5, help="events per POST /v1/events")
    p.add_argument("--k", type=int, default=20, help="items per recommend request")
    p.add_argument("--timeout-s", type=float, default=10.0, help="client timeout per request")
    p.add_argument("--max-inflight", type=int, default=256, help="requests in flight at most (more: dropped)")
    p.add_argument("--late-ms", type=float, default=100.0, help="a send this late counts as late")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--data-dir", help="a trained data dir (it gets the events); default: a scratch world")
    p.add_argument("--users", type=int, default=2000, help="scratch world size")
    p.add_argument("--items", type=int, default=5000, help="scratch world size")
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray's dashboard and find the replicas with its state API (default: by process title, "
        "which spares the 2-core box the dashboard's processes)",
    )
    p.add_argument("--out", help="results file (default bench/results/soak-<UTC timestamp>.json)")
    args = p.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES or args.rps <= 0 or args.events_every < 1 or args.max_inflight < 1:
        p.error(f"need 0 < --minutes <= {MAX_MINUTES}, --rps > 0, --events-every >= 1, --max-inflight >= 1")
    return args


def _shutdown(ray: Any, serve: Any) -> None:
    """Serve, then Ray; Serve's shutdown bounded (a controller killed by Ctrl-C must not hang us)."""
    t = threading.Thread(target=serve.shutdown, daemon=True)
    t.start()
    t.join(60)
    ray.shutdown()


def _git(*argv: str) -> str:
    try:
        return subprocess.run(
            ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    args = parse_args()

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # outside the load too: always reach the finally below
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out) if args.out else REPO / "bench/results" / f"soak-{stamp}.json"
    t0 = time.time()
    if args.data_dir:
        data_dir = Path(args.data_dir).resolve()
        world = "given"
    else:
        print(f"building a scratch world ({args.users} users, {args.items} items, 14 days; trained with "
              "`streamrec train --local`):", flush=True)  # fmt: skip
        data_dir = scratch_world(args.users, args.items)
        world = "scratch"
    users, items = catalogue(data_dir)
    print(f"data: {data_dir} ({len(users)} users, {len(items)} items)", flush=True)

    import httpx
    import ray
    from ray import serve

    from deployments import config

    port = free_port()
    payload: dict[str, Any] = {
        "benchmark": "soak",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "ray": ray.__version__,
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_paths": len(_git("status", "--porcelain").splitlines()),
        "composition": "fused (configs/serve/local.yaml, popularity fallback on as configured)",
        "data": {"dir": str(data_dir), "world": world, "users": len(users), "items": len(items)},
        "load": {
            "generator": "bench/soak.py: open loop, asyncio scheduler + httpx.AsyncClient in the driver process, "
            "latency from the scheduled send time, same cores as the service",
            "rps": args.rps,
            "minutes": args.minutes,
            "events_every": args.events_every,
            "event_batch": args.event_batch,
            "k": args.k,
            "timeout_s": args.timeout_s,
            "max_inflight": args.max_inflight,
            "late_ms": args.late_ms,
        },
    }
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=args.dashboard,
            namespace="serve",
            log_to_driver=False,
        )
        config.deploy(
            app_config("fused", data_dir, port, "auto", None, fallback=True, name=APP), timeout_s=300
        )
        wait_serving(port, noop=False, prefix=f"/{APP}")
        with httpx.Client(
            base_url=f"http://{HOST}:{port}/{APP}", headers={"X-API-Key": KEY}, timeout=30
        ) as c:
            probe = c.post("/v1/recommend", json={"user_id": int(users[0]), "k": args.k}).json()
            for u in users[:30]:  # load the stages on both replicas before the clock starts
                c.post("/v1/recommend", json={"user_id": int(u), "k": args.k})
        meta = probe["metadata"]
        payload["model_version"] = meta["model_version"]
        print(f"serving on {HOST}:{port}/{APP}: model {meta['model_version']}, level {meta['degradation_level']}",
              flush=True)  # fmt: skip
        if meta["model_version"] in ("popularity", "noop"):
            print("warning: not the trained recommender", flush=True)
        before = admin_status(HOST, port, f"/{APP}")
        print(f"soak: {args.minutes:g} min at {args.rps:g} req/s (1 events batch of {args.event_batch} per "
              f"{args.events_every} recommends)", flush=True)  # fmt: skip
        payload["run"] = asyncio.run(soak(args, port, users, items))
        try:
            after = admin_status(HOST, port, f"/{APP}")
            ev0, ev1 = before.get("events") or {}, after.get("events") or {}
            payload["event_log"] = {
                k: ev1[k] - ev0.get(k, 0)
                for k in ev1
                if isinstance(ev1[k], int | float) and not isinstance(ev1[k], bool)
            }
            payload["admin_status_after"] = after
        except Exception as err:  # the record above is what matters
            payload["admin_status_after"] = {"error": repr(err)}
    except KeyboardInterrupt:
        print("interrupted: shutting Serve and Ray down", flush=True)
        payload.setdefault("run", None)
        payload["interrupted"] = True
    finally:
        _shutdown(ray, serve)
    payload["seconds"] = round(time.time() - t0, 1)
    if payload.get("run"):
        payload["memory"] = memory(payload["run"]["rss_samples"], len(payload["run"]["minutes"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    if payload.get("run"):
        print("\n" + render(payload))


if __name__ == "__main__":
    main()
