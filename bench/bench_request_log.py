"""What the sampled request / impression log costs a request, side by side in one run.

Loads the trained recommender of a data directory (the registry's champion) and serves known
users in-process through the whole serving policy (``FunnelService`` + ``StageRunner``: worker
threads, budgets, breakers), alternating blocks with the log off (``sample_rate 0``) and logging
a tenth (the default ``0.1``) and every request (``1.0``), so all see the same machine state. The writer thread runs
as in a replica (its default flush every 5 s). Also times
the writer's flush per logged request. Writes ``bench/results/request_log.json`` and prints a
markdown table. Not part of the test suite.

    .venv/bin/python bench/bench_request_log.py --data-dir D [--rounds 6 --block 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=200)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "request_log.json"))
    a = ap.parse_args()

    from streamrec.api_models import RecommendRequest
    from streamrec.funnel.recommender import build_stages
    from streamrec.monitoring.logs import RequestLog, RequestLogConfig
    from streamrec.resilience import ResilienceConfig
    from streamrec.service.policy import FunnelService
    from streamrec.service.runner import StageRunner, local_primary

    stages = build_stages(a.data_dir)
    users = [int(u) for u in stages.funnel.models.users.raw_ids[:500]]
    res = ResilienceConfig()
    runner = StageRunner(res, 0.08, 2)
    out_dir = Path(tempfile.mkdtemp(prefix="streamrec-bench-log-"))
    logs = {
        "0.1": RequestLog(out_dir / "r01", RequestLogConfig(sample_rate=0.1)),
        "1.0": RequestLog(out_dir / "r1", RequestLogConfig(sample_rate=1.0)),
    }
    services = {"off": FunnelService(local_primary(lambda: stages, runner), None, res, 0.08)}
    for rate, log in logs.items():
        services[rate] = FunnelService(local_primary(lambda: stages, runner), None, res, 0.08, request_log=log)
    lat: dict[str, list[float]] = {name: [] for name in services}

    async def block(name: str, start: int) -> None:
        svc = services[name]
        for i in range(a.block):
            t0 = time.perf_counter()
            await svc(RecommendRequest(user_id=users[(start + i) % len(users)], k=20))
            lat[name].append((time.perf_counter() - t0) * 1e3)

    async def run() -> None:
        await block("off", 0)  # warm-up, discarded
        lat["off"].clear()
        names = list(services)
        for r in range(a.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                await block(name, r * a.block)

    asyncio.run(run())
    for log in logs.values():
        log.close()
    # The writer's own cost per request (off the request path): one flush of a block's worth.
    from streamrec.monitoring.logs import read_impressions, read_requests, to_frames

    rows = len(read_requests(out_dir / "r1"))
    imps = read_impressions(out_dir / "r1")
    width = sum(c.startswith("f_") for c in imps.columns)
    sample = [
        _one_record(i, width) for i in range(a.block)
    ]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for j, frame in enumerate(to_frames(sample)):
            frame.to_parquet(Path(d) / f"{j}.parquet")
    flush_ms = (time.perf_counter() - t0) * 1e3 / a.block
    result: dict[str, Any] = {
        "benchmark": "request_log",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "data_dir": a.data_dir,
        "items": len(stages.funnel.table),
        "requests_per_mode": len(lat["off"]),
        "logged_requests_at_1.0": rows,
        "feature_columns": width,
        "latency_ms": {
            k: {"p50": _pct(v, 0.5), "p95": _pct(v, 0.95), "p99": _pct(v, 0.99), "mean": statistics.fmean(v)}
            for k, v in lat.items()
        },
        "writer_ms_per_request": flush_ms,
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| request log sample_rate | p50 ms | p95 ms | p99 ms | mean ms |\n|---|---|---|---|---|")
    for k in lat:
        m = result["latency_ms"][k]
        print(f"| {k} | {m['p50']:.2f} | {m['p95']:.2f} | {m['p99']:.2f} | {m['mean']:.2f} |")
    print(f"\nwriter (off the request path): {flush_ms:.3f} ms per logged request ({width} feature columns)")


def _one_record(i: int, width: int) -> Any:
    import numpy as np

    from streamrec.monitoring.logs import ServedRecord

    names = tuple(f"x{j}" for j in range(width))
    items = [(1000 + j, 0.5, ["two_tower"]) for j in range(20)]
    feats = {1000 + j: np.random.default_rng(j).random(width).astype(np.float32) for j in range(20)}
    scored = np.random.default_rng(i).random((16, width)).astype(np.float32)
    return ServedRecord(f"r{i}", time.time(), i, None, "v1", "full", None, 10.0, 20, items, names, feats, scored)


if __name__ == "__main__":
    main()
