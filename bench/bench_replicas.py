"""Fused composition: HAProxy over every Gateway replica vs one replica alone, side by side.

Deploys ``configs/serve/local.yaml`` (its ``num_replicas``, the popularity fallback off so that
overload shows as latency, not as fast fallback answers) the way ``streamrec serve
--direct-ingress`` does: HAProxy on one port, each Gateway replica on its own direct-ingress
port. Then alternates open-loop steps (fixed arrival rate, latency from the scheduled send time,
``bench_serve``'s generator) between HAProxy, which spreads requests over all replicas, and the
first replica's own port, which is what a single replica can do on the same machine in the same
minutes. Writes ``bench/results/replicas.json`` and prints a markdown table. Not part of the
test suite.

    .venv/bin/python bench/bench_replicas.py --data-dir D       # e.g. the 200k-item world
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
sys.path.insert(0, str(REPO / "bench"))

import bench_serve as bs  # noqa: E402  (the generator, the app config and the wait helpers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a data dir with a trained champion model")
    p.add_argument("--rates", default="100,130,160", help="open-loop rates (requests/s)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per rate")
    p.add_argument("--step-seconds", type=float, default=10.0)
    p.add_argument("--out", default=str(REPO / "bench/results/replicas.json"))
    args = p.parse_args()

    from streamrec.cli.serve import PROXY_PORT_OFFSET, direct_ingress_env

    base = bs.free_port_range(PROXY_PORT_OFFSET + 3)
    os.environ.update(direct_ingress_env(base))
    import ray
    from ray import serve

    from deployments import config

    data_dir = Path(args.data_dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        cfg = bs.app_config("fused", data_dir, base, "auto", None, fallback=False)
        replicas = int(cfg["applications"][0]["deployments"][0]["num_replicas"])
        config.deploy(cfg, timeout_s=600)
        bs.wait_serving(base, noop=False)
        ports = [q for q in range(base + 1, base + 51) if bs.fallbacks("127.0.0.1", q) is not None]
        if not ports:
            raise RuntimeError(f"no Gateway replica answered on its own port ({base + 1}-{base + 50})")
        targets = {"haproxy": base, "one_replica": ports[0]}
        reqs, n_users = bs.request_mix(data_dir, "127.0.0.1", base, "/v1/recommend")
        bs.run_wrk(f"http://127.0.0.1:{base}", "/", n_users, 8, 15.0)  # warm every replica
        rows: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            for rate in [float(r) for r in args.rates.split(",")]:
                order = list(targets) if rnd % 2 == 0 else list(reversed(targets))
                for name in order:
                    step = asyncio.run(
                        bs.open_loop("127.0.0.1", targets[name], reqs, rate, args.step_seconds)
                    )
                    row = {"round": rnd, "target": name, **step}
                    rows.append(row)
                    print(f"  {name:>11} {rate:>5.0f}/s: p50 {step['p50_ms']:7.1f}  p99 {step['p99_ms']:7.1f} ms  "
                          f"achieved {step['achieved_rps']:6.1f}/s  errors {step['errors'] + step['non_2xx']}",
                          flush=True)  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    summary: dict[str, dict[str, Any]] = {}
    for name in targets:
        for rate in sorted({r["target_rps"] for r in rows}):
            mine = [r for r in rows if r["target"] == name and r["target_rps"] == rate]
            summary.setdefault(name, {})[f"{rate:g}"] = {
                "p99_ms_median": round(statistics.median(r["p99_ms"] for r in mine), 1),
                "p50_ms_median": round(statistics.median(r["p50_ms"] for r in mine), 1),
                "sustained_every_round": all(bs.sustained(r) for r in mine),
            }
    payload = {
        "benchmark": "replicas",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "data_dir": str(data_dir),
        "gateway_replicas": replicas,
        "step_seconds": args.step_seconds,
        "rounds": args.rounds,
        "summary": summary,
        "steps": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}\n")
    print(f"| open-loop rate | HAProxy over {replicas} replicas: p50 / p99 ms | one replica: p50 / p99 ms |")
    print("|---|---|---|")
    for rate, h in summary["haproxy"].items():
        o = summary["one_replica"][rate]
        mark = {True: "", False: " (not sustained)"}
        print(f"| {rate} req/s | {h['p50_ms_median']} / {h['p99_ms_median']}{mark[h['sustained_every_round']]} "
              f"| {o['p50_ms_median']} / {o['p99_ms_median']}{mark[o['sustained_every_round']]} |")  # fmt: skip


if __name__ == "__main__":
    main()
