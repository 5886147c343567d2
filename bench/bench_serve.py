"""Serving benchmark: both compositions and their no-op floors, open-loop load on loopback.

For each composition (fused = configs/serve/local.yaml, cluster = configs/serve/cluster.yaml) the
script deploys the application twice in the same Ray instance, one after the other: with the
stages the config chooses (``auto``: the trained recommender when a bundle exists, else
popularity) and with no-op stages of the same topology (the floor: same deployments, same hops,
stages that do nothing). Each is measured with

* an **open-loop** rate sweep: requests are *scheduled* at a fixed arrival rate whatever the
  responses do, and latency is measured from the scheduled time (no coordinated omission). The
  generator is a small asyncio HTTP/1.1 client (keep-alive connections, pre-built requests,
  uvloop when available) because Debian's ``wrk`` is closed-loop (no ``-R``; that is wrk2).
  The sweep stops once p99 > 200 ms, errors appear or the achieved rate falls behind. Reported:
  p50/p95/p99 per rate and the highest sustained rate with p99 <= 200 ms;
* **wrk** (closed loop, ``bench/wrk_recommend.lua``) at concurrency 1 (sequential latency, the
  figure DESIGN.md quotes for the floors) and 8, when ``wrk`` is installed.

The load generator shares the machine's cores with the service: every figure includes that cost.

Writes ``bench/results/serve.json`` and the "Serving (Ray Serve)" section of docs/benchmarks.md.

    .venv/bin/python bench/bench_serve.py                      # synthetic 200k-item corpus
    .venv/bin/python bench/bench_serve.py --data-dir D --quick # an existing data dir, short steps
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "bench-key-0123456789abcdef"
SECTION = "Serving (Ray Serve)"
P99_BUDGET_MS = 200.0


# ------------------------------------------------------------------------------------------
# Open-loop HTTP/1.1 load generator
# ------------------------------------------------------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection (Content-Length or chunked responses)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
            elif k == b"connection" and b"close" in v.lower():
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        if close:
            raise ConnectionResetError("server closed the connection")
        return status


def build_request(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def open_loop(
    host: str, port: int, requests: list[bytes], rate: float, duration_s: float, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Send ``rate * duration_s`` requests at fixed arrival times; latency from the scheduled time.

    Times come from ``time.perf_counter``: uvloop's ``loop.time()`` has millisecond resolution
    and is read once per loop iteration.
    """
    clock = time.perf_counter
    n = max(1, int(rate * duration_s))
    idle: list[_Conn] = []
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    opened = 0

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors, opened
        conn = idle.pop() if idle else None
        try:
            if conn is None:
                opened += 1
                conn = _Conn(*await asyncio.open_connection(host, port))
            status = await asyncio.wait_for(conn.request(requests[i % len(requests)]), timeout_s)
        except Exception:
            errors += 1
            if conn is not None:
                conn.writer.close()
            return
        latencies.append((clock() - scheduled) * 1e3)
        statuses[status] = statuses.get(status, 0) + 1
        idle.append(conn)

    start = clock() + 0.05
    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, at)))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    for c in idle:
        c.writer.close()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    ok = sum(v for s, v in statuses.items() if 200 <= s < 300)
    return {
        "target_rps": rate,
        "sent": n,
        "ok": ok,
        "non_2xx": sum(statuses.values()) - ok,
        "errors": errors,
        "achieved_rps": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(np.max(lat)), 2),
        "connections": opened,
    }


def sustained(step: dict[str, Any]) -> bool:
    """A step counts as sustained: p99 within budget, no failures, achieved >= 95% of the target."""
    return (
        step["p99_ms"] <= P99_BUDGET_MS
        and step["errors"] == 0
        and step["non_2xx"] == 0
        and step["achieved_rps"] >= 0.95 * step["target_rps"]
    )


def admin_status(host: str, port: int, prefix: str = "") -> dict[str, Any]:
    """``/v1/admin/status`` of the application (every gateway replica's counters merged, so one
    call covers the deployment whichever replica answers). ``prefix`` is the application's route
    prefix (``/s``) when several are deployed side by side.
    """
    import httpx

    url = f"http://{host}:{port}{prefix}/v1/admin/status"
    body: dict[str, Any] = httpx.get(url, headers={"X-API-Key": KEY}, timeout=10).json()
    return body


def fallbacks(host: str, port: int, prefix: str = "") -> int | None:
    """Requests the application has served from its fallback level so far (None if unknown)."""
    try:
        return int(admin_status(host, port, prefix)["stages"]["funnel"]["fallbacks"])
    except Exception:
        return None


def sweep(
    host: str,
    port: int,
    requests: list[bytes],
    rates: list[float],
    duration_s: float,
) -> dict[str, Any]:
    """Open-loop steps at ``rates`` until one is not sustained."""
    steps = []
    for rate in rates:
        before = fallbacks(host, port)
        step = asyncio.run(open_loop(host, port, requests, rate, duration_s))
        if not sustained(step):  # one retry: on a shared machine a single burst of other work can sink a step
            step = asyncio.run(open_loop(host, port, requests, rate, duration_s))
            step["retried"] = True
        after = fallbacks(host, port)
        step["fallbacks"] = after - before if before is not None and after is not None else None
        step["load_avg_1m"] = round(os.getloadavg()[0], 2)
        steps.append(step)
        print(f"    open-loop {rate:>6.0f}/s: p50 {step['p50_ms']:7.1f}  p95 {step['p95_ms']:7.1f}  "
              f"p99 {step['p99_ms']:7.1f} ms  achieved {step['achieved_rps']:6.1f}/s  "
              f"errors {step['errors'] + step['non_2xx']}  fallbacks {step['fallbacks']}  "
              f"load {step['load_avg_1m']}", flush=True)  # fmt: skip
        if not sustained(step):
            break
    best = max((s["target_rps"] for s in steps if sustained(s)), default=0.0)
    return {"steps": steps, "max_sustained_rps_p99_le_200ms": best}


def run_wrk(url: str, prefix: str, users: int, connections: int, duration_s: float) -> dict[str, Any] | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    env = {**os.environ, "STREAMREC_API_KEY": KEY, "BENCH_USERS": str(users), "BENCH_PREFIX": prefix}
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "-s",
           str(REPO / "bench/wrk_recommend.lua"), url]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + 60).stdout
    m = re.search(r"WRKJSON (\{.*\})", out)
    if not m:
        return {"error": out[-500:]}
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    errors = (
        r["errors_status"] + r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"]
    )
    return {
        "connections": connections,
        "rps": round(r["requests"] / secs, 1),
        "p50_ms": round(r["p50_us"] / 1e3, 2),
        "p95_ms": round(r["p95_us"] / 1e3, 2),
        "p99_ms": round(r["p99_us"] / 1e3, 2),
        "errors": errors,
        "requests": int(r["requests"]),
    }


def ray_cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) each Ray process on this machine has used so far, by pid.

    With each pid its name as Ray shows it in ``ps`` (``ray::ServeReplica:<app>:<deployment>``,
    ``ray::ProxyActor``, ...; ``raylet`` and ``gcs_server`` by file name), without the method a
    busy worker appends while it runs a call. Linux only (``/proc``); empty elsewhere.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        base = argv0.split()[0] if argv0 else ""
        name = base.split(".")[0] if base.startswith("ray::") else Path(base).name
        if name.startswith("ray::") or name in ("raylet", "gcs_server"):
            out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _cpu_group(process: str, app: str) -> str:
    """The row of the CPU table a Ray process counts under, while ``app`` is being measured."""
    prefix = "ray::ServeReplica:"
    if process.startswith(prefix):
        owner, _, deployment = process[len(prefix) :].partition(":")
        return deployment if owner == app else "the other app's replicas (idle)"
    if process == "ray::ProxyActor":
        return "HTTP proxy"
    return "Ray system (controller, raylet, GCS, idle workers)"


# ------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------


def make_data(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir).resolve()
    root = Path(tempfile.mkdtemp(prefix="streamrec-bench-")) / "data"
    cmd = [sys.executable, "-m", "streamrec", "data", "synth", "--users", str(args.users), "--items",
           str(args.items), "--days", str(args.days), "--data-dir", str(root), "--json"]  # fmt: skip
    print(f"generating the synthetic world: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return root


def request_mix(data_dir: Path, host: str, port: int, path: str, n: int = 2000) -> tuple[list[bytes], int]:
    from streamrec.data.store import DataStore

    store = DataStore(data_dir)
    users = store.users()["user_id"].to_numpy()
    items = store.items()["item_id"].to_numpy()
    rng = random.Random(11)
    out = []
    for _ in range(n):
        body: dict[str, Any] = {
            "user_id": int(rng.choice(users)) if rng.random() < 0.95 else 10**9 + rng.randint(0, 99)
        }
        body["k"] = 20
        if rng.random() < 0.3:
            body["exclude"] = [int(rng.choice(items)) for _ in range(rng.randint(1, 5))]
        out.append(build_request(host, port, path, body))
    return out, int(users.max()) if len(users) else 1


def app_config(
    composition: str,
    data_dir: Path,
    port: int,
    stages: str,
    sources: list[str] | None,
    fallback: bool,
    name: str = "bench",
    cpu_scale: float = 1.0,
) -> dict[str, Any]:
    """The composition's Serve config as the benchmark deploys it (bench key, no rate limit).

    ``cpu_scale`` multiplies every deployment's CPU reservation (a reservation is bookkeeping,
    not a limit: 0.5 lets two copies of a composition fit side by side).
    """
    from deployments import config

    path = REPO / ("configs/serve/local.yaml" if composition == "fused" else "configs/serve/cluster.yaml")
    base = config.load(path)
    extra: dict[str, Any] = {
        "auth": {"use_env_key": False, "keys": [{"name": "bench", "key": KEY, "scopes": ["admin"]}]},
        "stages": stages,
        "limits": {"rate_limit": {"rate_per_s": 1e6, "burst": 10**6}},
        "fallback": fallback,
    }
    if stages == "noop":
        extra["noop_sources"] = sources or ["popularity"]
    scaled = {
        d["name"]: {
            "ray_actor_options": {"num_cpus": d.get("ray_actor_options", {}).get("num_cpus", 1) * cpu_scale}
        }
        for d in base["applications"][0].get("deployments", [])
    }
    cfg = config.override(
        base,
        data_dir=data_dir,
        host="127.0.0.1",
        port=port,
        name=name,
        route_prefix="/" if name == "bench" else f"/{name}",
        args=extra,
        deployments=scaled if cpu_scale != 1.0 else None,
    )
    cfg["proxy_location"] = "HeadOnly"
    return cfg


def deploy_app(
    composition: str, data_dir: Path, port: int, stages: str, sources: list[str] | None, fallback: bool
) -> None:
    from deployments import config

    config.deploy(app_config(composition, data_dir, port, stages, sources, fallback), timeout_s=300)


def measure(
    label: str,
    data_dir: Path,
    port: int,
    args: argparse.Namespace,
    rates: list[float],
    proxy_port: int | None = None,
) -> dict[str, Any]:
    import httpx

    host = "127.0.0.1"
    reqs, n_users = request_mix(data_dir, host, port, "/v1/recommend")
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as c:
        ready = c.get("/readyz").json()
        probe = c.post("/v1/recommend", json={"user_id": 1, "k": 20}, headers={"X-API-Key": KEY}).json()
        for i in range(args.warmup):  # warm caches, handles and replicas
            c.post("/v1/recommend", json={"user_id": i + 1, "k": 20}, headers={"X-API-Key": KEY})
    # Steady state, not a cold start: a fresh replica serves the first thousand distinct users
    # markedly slower (page cache of the online store, first touches of the item arrays).
    if args.warmup_seconds > 0:
        run_wrk(f"http://{host}:{port}", "/", n_users, 8, args.warmup_seconds)
    print(f"  {label}: {ready.get('source_names')} level={probe['metadata']['degradation_level']} "
          f"model={probe['metadata']['model_version']}", flush=True)  # fmt: skip
    result: dict[str, Any] = {
        "sources": ready.get("source_names"),
        "model_version": probe["metadata"]["model_version"],
        "degradation_level": probe["metadata"]["degradation_level"],
    }
    url = f"http://{host}:{port}"
    result["load_avg_1m_before"] = round(os.getloadavg()[0], 2)
    result["wrk_sequential"] = run_wrk(url, "/", n_users, 1, args.wrk_seconds)
    result["wrk_c8"] = run_wrk(url, "/", n_users, 8, args.wrk_seconds)
    if result["wrk_sequential"]:
        print(f"    wrk c=1: {result['wrk_sequential']}\n    wrk c=8: {result['wrk_c8']}", flush=True)
    result["open_loop"] = sweep(host, port, reqs, rates, args.step_seconds)
    if proxy_port is not None and proxy_port != port:
        # Direct ingress: the same replica through Ray's proxy, in the same run (the proxy hop's cost).
        purl = f"http://{host}:{proxy_port}"
        result["via_proxy"] = {
            "wrk_sequential": run_wrk(purl, "/", n_users, 1, args.wrk_seconds),
            "wrk_c8": run_wrk(purl, "/", n_users, 8, args.wrk_seconds),
        }
        print(f"    via the proxy: {result['via_proxy']}", flush=True)
    return result


def interleaved(
    comp: str,
    data_dir: Path,
    port: int,
    sources: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The stages and their floor side by side: alternating short runs on both, same Ray instance.

    Both applications are deployed together (every deployment's CPU reservation halved so both
    fit; a reservation is bookkeeping, not a limit), so slow phases of a shared machine hit both
    alike. Each round measures each application with an open loop at ``--interleave-rate`` (the
    issue's load generator; 0 skips it) and then wrk at one connection (sequential), each for
    ``--interleave-seconds``; the order alternates between rounds. The ratios of the medians are
    the figures to compare with the target; the per-round ratios show the spread. Also records
    the CPU every Ray process used per request while each application was measured (``/proc``).
    """
    from deployments import config

    cfg = config.merge(
        *(
            app_config(comp, data_dir, port, stages, sources, args.fallback, name=name, cpu_scale=0.5)
            for name, stages in (("s", "auto"), ("f", "noop"))
        )
    )
    config.deploy(cfg, timeout_s=600)
    for name in ("s", "f"):
        wait_serving(port, noop=name == "f", prefix=f"/{name}")
    from streamrec.data.store import DataStore

    store_users = int(DataStore(data_dir).users()["user_id"].max())
    reqs = {name: request_mix(data_dir, "127.0.0.1", port, f"/{name}/v1/recommend")[0] for name in ("s", "f")}
    url = f"http://127.0.0.1:{port}"
    for name in ("s", "f"):
        run_wrk(url, f"/{name}", store_users, 8, max(args.warmup_seconds, 1.0))
    seq: dict[str, list[float]] = {"s": [], "f": []}
    opn: dict[str, list[float]] = {"s": [], "f": []}
    cpu: dict[str, dict[str, float]] = {"s": {}, "f": {}}
    served = {"s": 0, "f": 0}
    # A slow phase can open the funnel's breaker: popularity answers in ~3 ms and would flatter
    # the ratio, so the fallbacks served during the timed rounds are reported with it.
    before = {name: fallbacks("127.0.0.1", port, f"/{name}") for name in ("s", "f")}
    for r in range(args.interleave_rounds):
        for name in ("s", "f") if r % 2 == 0 else ("f", "s"):
            cpu0 = ray_cpu_seconds()
            if args.interleave_rate > 0:
                step = asyncio.run(
                    open_loop("127.0.0.1", port, reqs[name], args.interleave_rate, args.interleave_seconds)
                )
                opn[name].append(step["p50_ms"])
                served[name] += step["ok"]
            out = run_wrk(url, f"/{name}", store_users, 1, args.interleave_seconds)
            if out and "p50_ms" in out:
                seq[name].append(out["p50_ms"])
                served[name] += out["requests"]
            for pid, (proc, secs) in ray_cpu_seconds().items():
                group = _cpu_group(proc, name)
                cpu[name][group] = cpu[name].get(group, 0.0) + secs - cpu0.get(pid, ("", 0.0))[1]
        print(f"    round {r}: sequential p50 stages {seq['s'][-1:]} floor {seq['f'][-1:]}; "
              f"open loop p50 stages {opn['s'][-1:]} floor {opn['f'][-1:]}", flush=True)  # fmt: skip
    after = {name: fallbacks("127.0.0.1", port, f"/{name}") for name in ("s", "f")}
    fell_back = {
        name: (after[name] - before[name]) if after[name] is not None and before[name] is not None else None
        for name in ("s", "f")
    }
    if not seq["s"] or not seq["f"]:
        return {}

    def ratios(a: list[float], b: list[float]) -> dict[str, Any]:
        per_round = [x / y for x, y in zip(a, b, strict=False)]
        return {
            "stages_median_p50_ms": round(float(np.median(a)), 2),
            "floor_median_p50_ms": round(float(np.median(b)), 2),
            "ratio": round(float(np.median(a) / np.median(b)), 3),
            "round_ratios": [round(x, 3) for x in per_round],
        }

    result: dict[str, Any] = {
        "rounds": args.interleave_rounds,
        "seconds_each": args.interleave_seconds,
        "stages_p50_ms": seq["s"],
        "floor_p50_ms": seq["f"],
        **ratios(seq["s"], seq["f"]),
        "fallbacks": {"stages": fell_back["s"], "floor": fell_back["f"]},
        "cpu_ms_per_request": {
            label: {g: round(v * 1e3 / max(served[name], 1), 2) for g, v in sorted(cpu[name].items())}
            for label, name in (("stages", "s"), ("floor", "f"))
        },
    }
    if opn["s"] and opn["f"]:
        result["open_loop"] = {"rate": args.interleave_rate, **ratios(opn["s"], opn["f"])}
    print(f"    side by side: sequential p50 stages {result['stages_median_p50_ms']:.1f} ms, floor "
          f"{result['floor_median_p50_ms']:.1f} ms, ratio {result['ratio']:.2f}"
          + (f"; open loop at {args.interleave_rate:g}/s: ratio {result['open_loop']['ratio']:.2f}" if "open_loop" in result else "")
          + f" (fallbacks during the rounds: stages {fell_back['s']}, floor {fell_back['f']})", flush=True)  # fmt: skip
    return result


def results_name(throughput_optimized: bool, direct_ingress: bool) -> str:
    """Results file of a mode: serve.json (defaults), serve_di.json, serve_tp.json."""
    return "serve_tp.json" if throughput_optimized else "serve_di.json" if direct_ingress else "serve.json"


def free_port() -> int:
    """A loopback port that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(span: int) -> int:
    """The first of ``span`` consecutive ports that are free now (HAProxy, replicas, fallback proxy)."""
    for base in range(30000, 60000, span):
        try:
            for p in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range for the direct-ingress ports")


def wait_serving(port: int, noop: bool, timeout_s: float = 180.0, prefix: str = "") -> None:
    """Wait until ``port`` answers with the just-deployed stages (``noop`` for the floor).

    After a redeploy the replaced replicas drain for a while, and HAProxy (direct ingress)
    switches to the new ones once they report their ports: the two are told apart by the model
    version the responses report.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}{prefix}/v1/recommend", json={"user_id": 1, "k": 1},
                           headers={"X-API-Key": KEY}, timeout=5)  # fmt: skip
            if r.status_code == 200 and (r.json()["metadata"]["model_version"] == "noop") == noop:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"no {'no-op' if noop else 'real'} stages answered on port {port}{prefix}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="existing data dir (default: generate a synthetic world)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--compositions", default="fused,cluster")
    p.add_argument("--fused-rates", default="50,100,150,200,250,300,400")
    p.add_argument("--cluster-rates", default="10,20,30,40,50,60,80")
    p.add_argument("--step-seconds", type=float, default=10.0)
    p.add_argument("--wrk-seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=int, default=50, help="sequential warm-up requests per deployment")
    p.add_argument(
        "--warmup-seconds", type=float, default=15.0, help="then this long at wrk c=8 (not measured)"
    )
    p.add_argument("--quick", action="store_true", help="short steps (smoke run)")
    p.add_argument(
        "--interleave-rounds",
        type=int,
        default=8,
        help="then stages and floor side by side: this many alternating rounds on each (0: skip)",
    )
    p.add_argument("--interleave-seconds", type=float, default=6.0, help="per measurement of a round")
    p.add_argument(
        "--interleave-rate",
        type=float,
        default=10.0,
        help="open-loop rate (req/s) of the side-by-side rounds, before their wrk c=1 run (0: wrk only)",
    )
    p.add_argument("--throughput-optimized", action="store_true", help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="what `streamrec serve --direct-ingress` sets: HAProxy in front of the gateway replicas' own "
        "HTTP servers (Ray Serve's HAProxy ingress) instead of the proxy actor",
    )
    p.add_argument(
        "--fallback",
        action="store_true",
        help="keep the gateway's in-process popularity fallback on (off by default: with it, an overloaded "
        "composition answers from the fallback and the figures no longer describe the composition)",
    )
    p.add_argument(
        "--out",
        help="results file (default bench/results/serve.json; serve_tp.json with --throughput-optimized)",
    )
    p.add_argument("--docs", default=str(REPO / "docs/benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--note", default="", help="a remark printed under the results in docs/benchmarks.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.out is None:
        args.out = str(REPO / "bench/results" / results_name(args.throughput_optimized, args.direct_ingress))
    if args.quick:
        args.step_seconds, args.wrk_seconds, args.warmup, args.warmup_seconds = 4.0, 3.0, 20, 3.0
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    direct_base = None
    if args.direct_ingress:
        from streamrec.cli.serve import PROXY_PORT_OFFSET, direct_ingress_env

        direct_base = free_port_range(PROXY_PORT_OFFSET + 3)  # HAProxy, replicas, proxy, stats, metrics
        os.environ.update(direct_ingress_env(direct_base, span=50))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import ray
    from ray import serve

    data_dir = make_data(args)
    from streamrec.data.store import DataStore

    store = DataStore(data_dir)
    world = {"users": len(store.users()), "items": len(store.items()), "events": store.count_events()}
    print(f"data: {data_dir} {world}", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    if direct_base is not None:  # HAProxy answers on Serve's HTTP port, the proxy actor 100 above
        port, proxy_port = direct_base, direct_base + PROXY_PORT_OFFSET
    else:
        port = proxy_port = free_port()
    results: dict[str, Any] = {}
    t0 = time.time()
    try:
        for comp in [c.strip() for c in args.compositions.split(",") if c.strip()]:
            rates = [
                float(r) for r in (args.fused_rates if comp == "fused" else args.cluster_rates).split(",")
            ]
            print(f"{comp}:", flush=True)
            deploy_app(comp, data_dir, port, "auto", None, args.fallback)
            wait_serving(port, noop=False)
            real = measure(f"{comp} (stages)", data_dir, port, args, rates, proxy_port)
            deploy_app(comp, data_dir, port, "noop", real["sources"], args.fallback)
            wait_serving(port, noop=True)
            floor = measure(f"{comp} (no-op floor)", data_dir, port, args, rates, proxy_port)
            results[comp] = {"stages": real, "noop_floor": floor}
            if args.interleave_rounds > 0 and shutil.which("wrk"):
                try:
                    results[comp]["interleaved"] = interleaved(
                        comp, data_dir, port, real["sources"] or [], args
                    )
                except Exception as err:  # keep the measurements above
                    print(f"    interleaved run failed: {err!r}", flush=True)
                    results[comp]["interleaved"] = {"error": repr(err)}
    finally:
        serve.shutdown()
        ray.shutdown()
    payload = {
        "benchmark": "serve",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "ray": ray.__version__,
        "throughput_optimized": bool(args.throughput_optimized),
        "direct_ingress": bool(args.direct_ingress),
        "haproxy": bool(args.direct_ingress),  # since 2026-11-27 09:00 UTC: HAProxy in front
        "fallback_enabled": bool(args.fallback),
        "note": args.note,
        "data": {**world, "dir": str(data_dir)},
        "load_generator": {
            "open_loop": "asyncio HTTP/1.1 client in the benchmark process (uvloop), fixed arrival rate, "
            "latency from scheduled send time; same 2 cores as the service",
            "closed_loop": "Debian wrk 4.1 (closed loop) with bench/wrk_recommend.lua"
            if shutil.which("wrk")
            else None,
        },
        "step_seconds": args.step_seconds,
        "warmup": {"sequential_requests": args.warmup, "wrk_c8_seconds": args.warmup_seconds},
        "p99_budget_ms": P99_BUDGET_MS,
        "results": results,
    }
    loads = [
        st["load_avg_1m"]
        for res in results.values()
        for r in (res["stages"], res["noop_floor"])
        for st in r["open_loop"]["steps"]
        if "load_avg_1m" in st
    ]
    payload["load_avg_range"] = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    if not args.no_docs:
        write_docs(Path(args.docs), Path(args.out))
        print(f"updated the '{SECTION}' section of {args.docs}")


def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))


def render(payload: dict[str, Any], heading: bool = True) -> str:
    d = payload["data"]
    mode = (
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"
        if payload["throughput_optimized"]
        else "direct ingress behind HAProxy (`streamrec serve --direct-ingress`): HAProxy spreads clients "
        "over the gateway replicas' own HTTP servers"
        if payload.get("haproxy")
        else "direct ingress (`streamrec serve --direct-ingress`): clients connect to the gateway replica"
        if payload.get("direct_ingress")
        else "default Ray Serve settings (clients connect to Ray's HTTP proxy)"
    )
    lines = [f"## {SECTION}", ""] if heading else []
    lines += [
        f"### {mode}",
        "",
        f"`bench/bench_serve.py`, {payload['generated_at']}, {payload['machine']['cpus']} CPUs "
        f"({payload['machine']['platform']}), Ray {payload['ray']}"
        f"{', RAY_SERVE_THROUGHPUT_OPTIMIZED=1' if payload['throughput_optimized'] else ''}"
        f"{', RAY_SERVE_ENABLE_HA_PROXY=1' if payload.get('haproxy') else ''}"
        f"{', RAY_SERVE_ENABLE_DIRECT_INGRESS=1' if payload.get('direct_ingress') else ''}. "
        f"Data: {d['users']} users, {d['items']} items, {d['events']} events. "
        "Each composition is measured with the stages it serves and with no-op stages of the same "
        "topology (its floor), in the same run"
        + (
            f", after a warm-up ({payload['warmup']['sequential_requests']} sequential requests, then "
            f"{payload['warmup']['wrk_c8_seconds']:g} s of wrk c=8). "
            if payload.get("warmup")
            else ". "
        )
        + "Open loop: fixed arrival rate, latency from the "
        f"scheduled send time, {payload['step_seconds']:g} s per step, asyncio client on the same cores. "
        "Sequential: Debian `wrk` (closed loop) at 1 connection; c=8: 8 connections. "
        + (
            "The gateway's popularity fallback was on. "
            if payload.get("fallback_enabled")
            else "The gateway's popularity fallback was off (the figures are the composition's own). "
        )
        + f"Load average (1 min) during the steps: {payload.get('load_avg_range', 'n/a')} on "
        f"{payload['machine']['cpus']} CPUs (other work shares this machine).",
        "",
        "| composition | stages | sequential p50 ms | wrk c=8 req/s (p99 ms) "
        "| max open-loop rate with p99 <= 200 ms | p50 / p95 / p99 ms at that rate |",
        "|---|---|---|---|---|---|",
    ]
    for comp, res in payload["results"].items():
        for label, r in (("stages", res["stages"]), ("no-op floor", res["noop_floor"])):
            seq = r.get("wrk_sequential") or {}
            c8 = r.get("wrk_c8") or {}
            best = r["open_loop"]["max_sustained_rps_p99_le_200ms"]
            at = next((s for s in r["open_loop"]["steps"] if s["target_rps"] == best), None)
            what = (
                f"{r['model_version'].split('@')[0]} (sources: {', '.join(r['sources'] or [])})"
                if label == "stages"
                else "no-op floor"
            )
            pct = f"{at['p50_ms']:.1f} / {at['p95_ms']:.1f} / {at['p99_ms']:.1f}" if at else "-"
            c8s = f"{_fmt(c8.get('rps'))} ({_fmt(c8.get('p99_ms'))})"
            lines.append(
                f"| {comp} | {what} | {_fmt(seq.get('p50_ms'))} | {c8s} | {_fmt(best)} req/s | {pct} |"
            )
    via = [
        (comp, label, r["via_proxy"])
        for comp, res in payload["results"].items()
        for label, r in (("stages", res["stages"]), ("no-op floor", res["noop_floor"]))
        if r.get("via_proxy")
    ]
    if via:
        lines += [
            "",
            "The same deployments through Ray's proxy, in the same run (wrk; sequential p50 ms, c=8 req/s (p99 ms)):",
            "",
        ]
        for comp, label, v in via:
            seq, c8 = v.get("wrk_sequential") or {}, v.get("wrk_c8") or {}
            lines.append(
                f"- {comp}, {label}: sequential p50 {_fmt(seq.get('p50_ms'))}; c=8 {_fmt(c8.get('rps'))} "
                f"({_fmt(c8.get('p99_ms'))})"
            )
    if payload.get("note"):
        lines += ["", f"Note: {payload['note']}"]
    lines += ["", "Against the targets (issue 5):", ""]
    res = payload["results"]
    if "fused" in res:
        at100 = next(
            (st for st in res["fused"]["stages"]["open_loop"]["steps"] if st["target_rps"] == 100), None
        )
        best = res["fused"]["stages"]["open_loop"]["max_sustained_rps_p99_le_200ms"]
        lines.append(
            f"- fused: p99 {at100['p99_ms']:.1f} ms at 100 req/s (target <= 200 ms at >= 100 req/s); "
            f"highest sustained rate with p99 <= 200 ms: {best:g} req/s"
            if at100
            else f"- fused: highest sustained rate with p99 <= 200 ms: {best:g} req/s"
        )
    if "cluster" in res:
        a = (res["cluster"]["stages"].get("wrk_sequential") or {}).get("p50_ms")
        b = (res["cluster"]["noop_floor"].get("wrk_sequential") or {}).get("p50_ms")
        s0 = res["cluster"]["stages"]["open_loop"]["steps"][0]
        f0 = res["cluster"]["noop_floor"]["open_loop"]["steps"][0]
        if a and b:
            lines.append(
                f"- cluster: sequential p50 {a:.1f} ms vs its no-op floor {b:.1f} ms = {a / b:.2f}x (target <= 1.25x); "
                f"open loop at {s0['target_rps']:g} req/s: p50 {s0['p50_ms']:.1f} vs {f0['p50_ms']:.1f} ms = "
                f"{s0['p50_ms'] / max(f0['p50_ms'], 1e-9):.2f}x"
            )
    cpu_tables = []
    for comp, r in res.items():
        il = r.get("interleaved") or {}
        if il and "ratio" in il:
            spread = il.get("round_ratios")
            lines.append(
                f"- {comp}, side by side ({il['rounds']} alternating rounds of {il['seconds_each']:g} s per "
                f"measurement): median sequential p50 {il['stages_median_p50_ms']:.1f} ms vs floor "
                f"{il['floor_median_p50_ms']:.1f} ms = **{il['ratio']:.2f}x**"
                + (f" (rounds {min(spread):.2f}-{max(spread):.2f}x)" if spread else "")
                + (
                    f"; open loop at {il['open_loop']['rate']:g} req/s: p50 "
                    f"{il['open_loop']['stages_median_p50_ms']:.1f} vs {il['open_loop']['floor_median_p50_ms']:.1f} "
                    f"ms = **{il['open_loop']['ratio']:.2f}x** (rounds {min(il['open_loop']['round_ratios']):.2f}-"
                    f"{max(il['open_loop']['round_ratios']):.2f}x)"
                    if il.get("open_loop")
                    else ""
                )
                + (
                    f" (fallback answers during the rounds: stages {il['fallbacks']['stages']}, "
                    f"floor {il['fallbacks']['floor']})"
                    if "fallbacks" in il
                    else ""
                )
            )
        if il.get("cpu_ms_per_request"):
            cpu_tables.append((comp, il["cpu_ms_per_request"]))
    for comp, cpu in cpu_tables:
        groups = sorted(set(cpu["stages"]) | set(cpu["floor"]), key=lambda g: -cpu["stages"].get(g, 0.0))
        lines += [
            "",
            f"CPU per request, {comp} side by side (ms of user + system time of each Ray process while that "
            "application was measured, divided by the requests it served; from /proc):",
            "",
            "| process | stages | no-op floor |",
            "|---|---|---|",
        ]
        lines += [
            f"| {g} | {cpu['stages'].get(g, 0.0):.1f} | {cpu['floor'].get(g, 0.0):.1f} |" for g in groups
        ]
        lines.append(f"| total | {sum(cpu['stages'].values()):.1f} | {sum(cpu['floor'].values()):.1f} |")
    lines += ["", "Open-loop steps (target req/s: p50 / p95 / p99 ms, achieved req/s):", ""]
    for comp, res in payload["results"].items():
        for label, r in (("stages", res["stages"]), ("no-op floor", res["noop_floor"])):
            steps = "; ".join(
                f"{s['target_rps']:g}: {s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} "
                f"({s['achieved_rps']:g})"
                for s in r["open_loop"]["steps"]
            )
            lines.append(f"- {comp}, {label}: {steps}")
    raw = results_name(payload["throughput_optimized"], bool(payload.get("direct_ingress")))
    flag = (
        " --throughput-optimized"
        if payload["throughput_optimized"]
        else " --direct-ingress"
        if payload.get("direct_ingress")
        else ""
    )
    lines += [
        "",
        f"Raw numbers: `bench/results/{raw}`. Re-run: `.venv/bin/python bench/bench_serve.py{flag}`.",
        "",
    ]
    return "\n".join(lines)


def write_docs(path: Path, written: Path) -> None:
    """Replace (or append) only this benchmark's section of docs/benchmarks.md.

    The section shows the default-mode results (serve.json) and, when present next to it, the
    direct-ingress (serve_di.json) and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (serve_tp.json) results.
    """
    files = [written.parent / n for n in ("serve.json", "serve_di.json", "serve_tp.json")]
    if written not in files:
        files = [written]
    parts = [json.loads(f.read_text()) for f in files if f.is_file()]
    section = "\n".join(render(p, heading=i == 0) for i, p in enumerate(parts))
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    section = section.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    text = text.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
