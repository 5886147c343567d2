"""What the fused gateway's stage dispatch costs under concurrency, in-process (no Ray, no HTTP).

Loads the trained recommender of a data directory as a fused replica does (``load_stages`` of the
champion, the popularity fallback, ``settle_heap``) and serves known users through the whole
serving policy (``FunnelService``: level timeout, breaker, batch and popularity levels) with
``c`` requests in flight on one event loop, as a replica's loop sees them under wrk. Dispatch
variants, alternated by round in one process (the box is shared: only within-run comparisons
mean anything):

* ``inline``: every stage method on the event loop, no worker thread, no dependency guard (the
  fused gateway before the serving-core round, 970d75b: the floor, but a hung dependency then
  holds the whole replica);
* ``hops``: the runner as it was before ADR-016 (``StageRunner(..., dispatch="hops")``): one
  worker-thread hop per dependency call (online read, context, each source, ranker);
* ``grouped``: the runner's default since ADR-016 (online read and context in one worker call,
  the four sources in one call, then the ranker), each dependency still under its own budget
  and breaker;
* ``grouped-solo``: as ``grouped`` with the FAISS source in a worker call of its own;
* ``grouped-1t`` / ``hops-1t``: an experiment, every dependency on one shared worker thread (not
  a configuration: a hung call there would hold every thread);
* a suffix ``@MS`` (``grouped@1``): ``sys.setswitchinterval(MS / 1000)`` during that variant's
  blocks (the GIL's hand-off interval, 5 ms by default).

Per variant: throughput (requests / wall second), latency percentiles and the process CPU per
request (all threads; on a saturated box CPU per request is what bounds throughput). Writes
``bench/results/dispatch.json`` and prints a markdown table. Not part of the test suite.

    .venv/bin/python bench/bench_dispatch.py --data-dir D [--rounds 6 --block 300 --concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Inline:
    """The stages with ``blocking = False``: the runner then calls every method on the loop."""

    blocking = False

    def __init__(self, stages: Any) -> None:
        self._stages = stages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stages, name)


class SoloFaiss(Inline):
    """The stages with the FAISS source in a worker call of its own, apart from the other sources."""

    blocking = True
    solo_sources: tuple[str, ...] = ("two_tower",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=300, help="requests per variant and round")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (1: sequential)")
    ap.add_argument("--variants", default="inline,hops,grouped,grouped-solo")
    ap.add_argument(
        "--serve-budgets",
        action="store_true",
        help="the Serve config's budgets (default: budgets of seconds, so no variant degrades on a busy box)",
    )
    ap.add_argument(
        "--switch-interval-ms", type=float, default=0.0, help="sys.setswitchinterval (0: default)"
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dispatch.json"))
    a = ap.parse_args()

    from streamrec.api_models import RecommendRequest
    from streamrec.service.args import ServeArgs
    from streamrec.service.loading import load_fallback, load_stages, settle_heap
    from streamrec.service.policy import FunnelService
    from streamrec.service.runner import StageRunner, local_primary

    if a.switch_interval_ms > 0:
        sys.setswitchinterval(a.switch_interval_ms / 1e3)
    serve: dict[str, Any] = {"data_dir": a.data_dir, "stages": "recommender", "fallback": True}
    if not a.serve_budgets:  # every request at `full`: the variants differ only in their dispatch
        serve["source_timeout_ms"] = 2000
        serve["resilience"] = {
            "request_budget_ms": 5000,
            "online_store_ms": 2000,
            "ranker_ms": 2000,
            "context_ms": 2000,
            "level_timeouts_ms": {"full": 4000},
        }
    args = ServeArgs.model_validate(serve)
    loaded = load_stages(args)
    fallback = load_fallback(args, loaded)
    settle_heap()
    stages = loaded.stages
    users = [int(u) for u in stages.funnel.models.users.raw_ids[:1000]]
    res = args.resilience
    src_s = args.source_timeout_ms / 1e3
    names = [v for v in a.variants.split(",") if v]
    services: dict[str, FunnelService] = {}
    runners: dict[str, StageRunner] = {}
    switch: dict[str, float] = {}
    for name in names:
        base, _, si = name.partition("@")  # "grouped@1": sys.setswitchinterval(1 ms) during its blocks
        if si:
            switch[name] = float(si) / 1e3
        dispatch = "hops" if base in ("inline", "hops", "hops-1t") else "grouped"
        runner = StageRunner(res, src_s, args.source_threads, dispatch=dispatch)
        held: Any = (
            Inline(stages) if base == "inline" else SoloFaiss(stages) if base == "grouped-solo" else stages
        )
        if base in ("grouped-1t", "hops-1t"):  # experiment: every dependency on ONE shared worker thread
            from concurrent.futures import ThreadPoolExecutor

            one = ThreadPoolExecutor(1, thread_name_prefix="one")
            for dep in (runner.online, runner.context, runner.ranker):
                dep._pool = one
            runner._retrieval = one
        runners[name] = runner
        services[name] = FunnelService(
            local_primary(lambda held=held: held, runner), fallback.stages if fallback else None, res, src_s
        )
    lat: dict[str, list[float]] = {n: [] for n in names}
    rps: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    levels: dict[str, dict[str, int]] = {n: {} for n in names}

    async def block(name: str, start: int, keep: bool = True) -> None:
        svc = services[name]
        todo = iter(range(a.block))

        async def worker() -> None:
            for i in todo:
                t = time.perf_counter()
                resp = await svc(RecommendRequest(user_id=users[(start + i) % len(users)], k=20))
                if keep:
                    lat[name].append((time.perf_counter() - t) * 1e3)
                    lv = resp.metadata.degradation_level
                    levels[name][lv] = levels[name].get(lv, 0) + 1

        default = sys.getswitchinterval()
        sys.setswitchinterval(switch.get(name, default))
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        sys.setswitchinterval(default)
        if keep:
            rps[name].append(a.block / wall)
            cpu[name].append(used * 1e3 / a.block)

    async def run() -> None:
        for name in names:  # warm-up (threads, caches), discarded
            await block(name, 0, keep=False)
        for r in range(a.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                await block(name, (r + 1) * a.block)
            print(f"round {r + 1}: " + ", ".join(f"{n} {rps[n][-1]:.1f}/s" for n in names), file=sys.stderr)

    asyncio.run(run())
    for runner in runners.values():
        runner.close()
    result: dict[str, Any] = {
        "benchmark": "dispatch",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": list(os.getloadavg()),
        },
        "data_dir": a.data_dir,
        "model_version": getattr(stages, "model_version", None),
        "items": len(stages.funnel.table),
        "concurrency": a.concurrency,
        "rounds": a.rounds,
        "block": a.block,
        "switch_interval_s": sys.getswitchinterval(),
        "budgets": "serve config" if a.serve_budgets else "seconds (no variant degrades)",
        "variants": {
            n: {
                "req_per_s_by_round": [round(x, 2) for x in rps[n]],
                "req_per_s_median": round(statistics.median(rps[n]), 2),
                "cpu_ms_per_request_by_round": [round(x, 3) for x in cpu[n]],
                "cpu_ms_per_request_median": round(statistics.median(cpu[n]), 3),
                "latency_ms": {
                    "p50": round(_pct(lat[n], 0.5), 3),
                    "p95": round(_pct(lat[n], 0.95), 3),
                    "p99": round(_pct(lat[n], 0.99), 3),
                },
                "levels": levels[n],
            }
            for n in names
        },
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| variant (c={a.concurrency}) | req/s (median of {a.rounds}) | CPU ms/request | p50 ms | p95 ms | p99 ms |"
        " levels |\n|---|---|---|---|---|---|---|"
    )
    for n in names:
        v = result["variants"][n]
        m = v["latency_ms"]
        print(
            f"| {n} | {v['req_per_s_median']:.1f} | {v['cpu_ms_per_request_median']:.2f} | {m['p50']:.2f} |"
            f" {m['p95']:.2f} | {m['p99']:.2f} | {v['levels']} |"
        )


if __name__ == "__main__":
    main()
