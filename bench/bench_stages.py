"""Per-request CPU of each serving stage, in-process (no Ray, no HTTP).

Loads the trained recommender of a data directory (``build_stages``: the registry's champion,
the online store, the item table) and runs known users through the five stage calls a request
makes, timing each. Two passes:

* **tight**: requests back to back (warm caches): the floor of what a stage costs;
* **idle gaps**: ``--gap-ms`` of sleep between requests, as a replica sees at low load (cold
  caches; in the cluster composition every stage process idles between its calls).

Then the cluster ``Ranker``'s batching: ``rank_batch`` over groups of B requests (what
``@serve.batch`` hands it under concurrent load: one DCN-V2 forward pass per group) against
``rank`` one request at a time, in milliseconds per request.

This is what the serving compositions spend on top of their no-op floors (bench/bench_serve.py);
it tells which stage to work on. Writes ``bench/results/stages.json`` and prints a markdown
table. Not part of the test suite.

    .venv/bin/python bench/bench_stages.py --data-dir D           # e.g. the 200k-item world
"""

from __future__ import annotations

import argparse
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


def one_request(stages: Any, request: Any) -> dict[str, float]:
    """Run the five stage calls of one request; milliseconds per call (and per source)."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ctx = stages.user_context(request)
    t["user_context"] = time.perf_counter() - t0
    parts = {}
    for source in stages.source_names:
        a = time.perf_counter()
        parts[source] = stages.retrieve(source, ctx)
        t[f"retrieve:{source}"] = time.perf_counter() - a
    a = time.perf_counter()
    merged = stages.merge(ctx, parts)
    b = time.perf_counter()
    ranked = stages.rank(ctx, merged)
    c = time.perf_counter()
    stages.rerank(ctx, ranked)
    t["merge"], t["rank"], t["rerank"] = b - a, c - b, time.perf_counter() - c
    t["total"] = time.perf_counter() - t0
    return {k: v * 1e3 for k, v in t.items()}


def run_pass(stages: Any, requests: list[Any], gap_s: float) -> dict[str, float]:
    """Median milliseconds per step over ``requests`` (sleeping ``gap_s`` between them)."""
    rows = []
    for r in requests:
        rows.append(one_request(stages, r))
        if gap_s > 0:
            time.sleep(gap_s)
    return {k: round(statistics.median(row[k] for row in rows), 3) for k in rows[0]}


def batched_rank(stages: Any, requests: list[Any], sizes: tuple[int, ...], passes: int) -> dict[str, float]:
    """Milliseconds per request of ranking in groups of each size (1 = ``rank`` alone)."""
    prepared = []
    for r in requests:
        ctx = stages.user_context(r)
        parts = {s: stages.retrieve(s, ctx) for s in stages.source_names}
        prepared.append((ctx, stages.merge(ctx, parts)))
    out: dict[str, float] = {}
    for size in sizes:
        groups = [prepared[i : i + size] for i in range(0, len(prepared) - size + 1, size)]
        per_pass = []
        for _ in range(passes):
            t0 = time.perf_counter()
            for g in groups:
                if size == 1:
                    stages.rank(*g[0])
                else:
                    stages.rank_batch([c for c, _ in g], [m for _, m in g])
            per_pass.append((time.perf_counter() - t0) * 1e3 / (len(groups) * size))
        out[f"batch_{size}"] = round(statistics.median(per_pass), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a data dir with a trained champion model")
    p.add_argument("--users", type=int, default=300, help="requests per pass")
    p.add_argument("--passes", type=int, default=3, help="passes of each kind (medians of their medians)")
    p.add_argument("--gap-ms", type=float, default=30.0)
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="group sizes of the batched-rank pass")
    p.add_argument("--out", default=str(REPO / "bench/results/stages.json"))
    args = p.parse_args()

    from streamrec.api_models import RecommendRequest
    from streamrec.data.store import DataStore
    from streamrec.funnel.recommender import build_stages

    t0 = time.perf_counter()
    stages = build_stages(args.data_dir)
    load_s = time.perf_counter() - t0
    users = DataStore(args.data_dir).users()["user_id"].to_numpy()
    step = max(1, len(users) // args.users)
    requests = [RecommendRequest(user_id=int(u), k=20) for u in users[::step][: args.users]]
    run_pass(stages, requests, 0.0)  # warm-up: first touches of the item arrays, the page cache
    results: dict[str, Any] = {}
    for label, gap in (("tight", 0.0), ("idle_gaps", args.gap_ms / 1e3)):
        passes = [run_pass(stages, requests, gap) for _ in range(args.passes)]
        results[label] = {k: round(statistics.median(ps[k] for ps in passes), 3) for k in passes[0]}
        print(f"{label}: {results[label]}", flush=True)
    sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    batched = batched_rank(stages, requests, sizes, args.passes)
    print(f"rank per request by group size: {batched}", flush=True)
    payload = {
        "benchmark": "stages",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "data_dir": str(args.data_dir),
        "model_version": stages.model_version,
        "load_seconds": round(load_s, 1),
        "requests_per_pass": len(requests),
        "passes": args.passes,
        "gap_ms": args.gap_ms,
        "median_ms": results,
        "rank_ms_per_request_by_batch_size": batched,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}\n")
    keys = list(results["tight"])
    print("| step | tight ms | with idle gaps ms |\n|---|---|---|")
    for k in keys:
        print(f"| {k} | {results['tight'][k]:.2f} | {results['idle_gaps'][k]:.2f} |")
    print("\n| requests per forward pass | " + " | ".join(str(n) for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    print("| rank, ms per request | " + " | ".join(f"{batched[f'batch_{n}']:.2f}" for n in sizes) + " |")


if __name__ == "__main__":
    main()
