"""A composition's stages and its no-op floor side by side, repeated: the ratio target of issue 5.

``bench_serve.py`` measures each composition in full (throughput, open-loop sweep) and ends with
one side-by-side step. The cluster target (p50 <= 1.25x the composition's own no-op floor) is a
ratio of two latencies that this shared 2-core box moves by up to 2x within minutes, so one
run says little. This script runs only that step (:func:`bench_serve.interleaved`: both
applications deployed in one Ray instance, alternating rounds of an open loop at a low fixed
rate and of sequential wrk requests, CPU per request of every Ray process), and *appends* each
run to ``bench/results/side_by_side.json``, so repeated runs build the spread to judge by.

    .venv/bin/python bench/bench_side_by_side.py --data-dir D                   # through Ray's proxy
    .venv/bin/python bench/bench_side_by_side.py --data-dir D --direct-ingress  # behind HAProxy

Needs ``wrk`` (Debian package). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_serve  # noqa: E402  (the benchmark's own helpers: one implementation of each step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a data dir with a trained champion model")
    p.add_argument("--composition", choices=("cluster", "fused"), default="cluster")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds on each application")
    p.add_argument("--seconds", type=float, default=6.0, help="per measurement of a round")
    p.add_argument("--rate", type=float, default=10.0, help="open-loop rate of each round (0: wrk only)")
    p.add_argument(
        "--warmup-seconds", type=float, default=15.0, help="wrk c=8 on each app first (not measured)"
    )
    p.add_argument(
        "--direct-ingress", action="store_true", help="HAProxy ingress, as `streamrec serve --direct-ingress`"
    )
    p.add_argument(
        "--fallback",
        action="store_true",
        help="keep the popularity fallback on (off: the composition's own figures)",
    )
    p.add_argument("--out", default=str(REPO / "bench/results/side_by_side.json"), help="runs are appended")
    args = p.parse_args()

    from streamrec.cli.serve import PROXY_PORT_OFFSET, direct_ingress_env

    if args.direct_ingress:  # HAProxy answers on the first port of the range
        port = bench_serve.free_port_range(PROXY_PORT_OFFSET + 3)
        os.environ.update(direct_ingress_env(port, span=50))
    else:
        port = bench_serve.free_port()
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    # The floor pretends to have the real stages' sources, so that it makes the same calls.
    from streamrec.funnel.core import SOURCE_NAMES

    sources = list(SOURCE_NAMES)
    ns = argparse.Namespace(
        fallback=args.fallback,
        warmup_seconds=args.warmup_seconds,
        interleave_rounds=args.rounds,
        interleave_seconds=args.seconds,
        interleave_rate=args.rate,
    )
    t0 = time.time()
    load0 = os.getloadavg()[0]
    try:
        result = bench_serve.interleaved(args.composition, Path(args.data_dir), port, sources, ns)
    finally:
        serve.shutdown()
        ray.shutdown()
    run: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "ray": ray.__version__,
        "composition": args.composition,
        "ingress": "haproxy" if args.direct_ingress else "ray_proxy",
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        # Ray settings from the environment (the workers inherit them): part of what was measured.
        "ray_env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith(("RAY_SERVE_", "RAY_worker"))
        },
        "data_dir": str(args.data_dir),
        **result,
    }
    ingress_env = set(direct_ingress_env(1, span=1))  # what the ingress column already says
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.is_file() else []
    runs.append(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=2))
    print(f"appended run {len(runs)} to {out}")
    print("\n| run (UTC) | composition | ingress | other settings | sequential p50 stages / floor ms "
          "| ratio (rounds) | open loop p50 stages / floor ms | ratio (rounds) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in runs:
        ol = r.get("open_loop") or {}
        rr, orr = r.get("round_ratios") or [0], ol.get("round_ratios") or [0]
        print(
            f"| {r['generated_at'][:16].replace('T', ' ')} | {r['composition']} | {r['ingress']} "
            f"| {', '.join(f'{k}={v}' for k, v in (r.get('ray_env') or {}).items() if k not in ingress_env) or '-'} "
            f"| {r.get('stages_median_p50_ms')} / {r.get('floor_median_p50_ms')} "
            f"| {r.get('ratio')} ({min(rr):.2f}-{max(rr):.2f}) "
            f"| {ol.get('stages_median_p50_ms', '-')} / {ol.get('floor_median_p50_ms', '-')} "
            f"| {ol.get('ratio', '-')} ({min(orr):.2f}-{max(orr):.2f}) |"
        )


if __name__ == "__main__":
    main()
