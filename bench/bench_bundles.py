"""What holding several bundles costs a gateway replica: load time and resident memory per bundle.

Loads the registry's versions of a data directory one after the other into one process exactly as
a replica does for the champion, the challenger and the shadow (``load_stages`` of a registry
version, then ``settle_heap``), and measures each load's wall time and the resident memory it
added. Then times requests through each loaded bundle's funnel, to show that holding more bundles
does not slow the champion's answers. Writes ``bench/results/bundles.json`` and prints a markdown
table. Not part of the test suite.

    .venv/bin/python bench/bench_bundles.py --data-dir D [--versions 1,2,1] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def _latency(stages: Any, users: list[int], n: int) -> list[float]:
    from streamrec.api_models import RecommendRequest
    from streamrec.resilience import ResilienceConfig
    from streamrec.service.policy import FunnelService
    from streamrec.service.runner import StageRunner, local_primary

    res = ResilienceConfig()
    service = FunnelService(local_primary(lambda: stages, StageRunner(res, 0.08, 2)), None, res, 0.08)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await service(RecommendRequest(user_id=users[i % len(users)], k=20))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _users(loaded: Any) -> list[int]:
    return [int(u) for u in loaded.stages.funnel.models.users.raw_ids[:500]]


def _summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(sorted(ms)[int(0.99 * len(ms))], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--versions", default="1,2,1", help="Registry versions loaded in turn (champion, challenger, shadow).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bundles.json"))
    a = ap.parse_args()

    from streamrec.service.args import ServeArgs
    from streamrec.service.loading import load_stages, settle_heap

    args = ServeArgs.parse({"data_dir": a.data_dir, "stages": "recommender"})
    base = _rss_mb()
    rows: list[dict[str, Any]] = []
    held = []
    lat: dict[int, dict[str, float]] = {}
    for role, v in zip(("champion", "challenger", "shadow"), [int(x) for x in a.versions.split(",")], strict=False):
        before = _rss_mb()
        t0 = time.perf_counter()
        loaded = load_stages(args, v)
        settle_heap()
        rows.append(
            {
                "role": role,
                "version": v,
                "load_s": round(time.perf_counter() - t0, 2),
                "added_mb": round(_rss_mb() - before, 1),
                "rss_mb": round(_rss_mb(), 1),
            }
        )
        held.append(loaded)
        if len(held) == 1:  # the champion's latency alone, before the other bundles load
            lat = {1: _summary(asyncio.run(_latency(held[0].stages, _users(held[0]), a.requests)))}
    lat[len(held)] = _summary(asyncio.run(_latency(held[0].stages, _users(held[0]), a.requests)))
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "data_dir": a.data_dir,
        "process_rss_before_mb": round(base, 1),
        "bundles": rows,
        "champion_latency_by_bundles_held": lat,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print("| role | version | load (s) | memory added (MB) | process RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['role']} | v{r['version']} | {r['load_s']} | {r['added_mb']} | {r['rss_mb']} |")
    print()
    for n_held, m in lat.items():
        print(f"champion latency with {n_held} bundle(s) held: p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms")


if __name__ == "__main__":
    main()
