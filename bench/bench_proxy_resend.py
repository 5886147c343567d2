"""Ray's proxy with and without ``ResendUnanswered`` (issue 14, 4(c)): what the resend costs a request.

``streamrec serve`` (configs/serve/local.yaml: the fused composition, two gateway replicas, Ray's
HTTP proxy in front) is started on one data dir, in rounds that alternate the two variants (A B
B A ...): *without* (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=""``: Ray's proxy as it ships)
and *with* (the default: the proxy wraps its app in
:class:`streamrec.service.ingress_retry.ResendUnanswered`). Each round measures wrk at
concurrency 1 (sequential latency) and 8 (throughput) after a warm-up. Appends the run to
``bench/results/proxy_resend.json``.

    .venv/bin/python bench/bench_proxy_resend.py --data-dir D [--rounds 2] [--seconds 15]

Needs ``wrk`` (Debian package). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_serve  # noqa: E402  (run_wrk, free_port: one implementation of each step)

KEY = bench_serve.KEY  # the key run_wrk sends
VARIANTS = {"without": "", "with": None}  # None: leave it to `streamrec serve` (the default)


def serve(data_dir: Path, port: int, callback: str | None, log: Path) -> subprocess.Popen[bytes]:
    """Start ``streamrec serve`` in its own Ray; return once it prints that it serves."""
    env = {**os.environ, "STREAMREC_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)
    if callback is not None:
        env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = callback
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamrec", "serve", "--config", "configs/serve/local.yaml",
             "--data-dir", str(data_dir), "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while "StreamRec is serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamrec serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def one_round(data_dir: Path, variant: str, seconds: float, users: int, log: Path) -> dict[str, Any]:
    port = bench_serve.free_port()
    proc = serve(data_dir, port, VARIANTS[variant], log)
    try:
        url = f"http://127.0.0.1:{port}"
        bench_serve.run_wrk(url, "", users, 8, 10.0)  # warm-up
        c1 = bench_serve.run_wrk(url, "", users, 1, seconds)
        c8 = bench_serve.run_wrk(url, "", users, 8, seconds)
        installed = _proxy_log_mentions()
        return {"variant": variant, "c1": c1, "c8": c8, "callback_logged": installed}
    finally:
        stop(proc)


def _proxy_log_mentions() -> bool:
    """Whether the newest Ray session's proxy log says it called our callback."""
    sessions = sorted(Path("/tmp/ray").glob("session_2*"), key=lambda p: p.stat().st_mtime)
    if not sessions:
        return False
    logs = (sessions[-1] / "logs" / "serve").glob("proxy_*.log")
    return any("ingress_retry" in p.read_text(errors="replace") for p in logs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="a data dir with a trained champion")
    p.add_argument("--rounds", type=int, default=2, help="pairs of rounds (A B B A per pair)")
    p.add_argument("--seconds", type=float, default=15.0, help="wrk duration per measurement")
    p.add_argument("--users", type=int, default=900)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/proxy_resend.json")
    args = p.parse_args()
    order = [
        v for i in range(args.rounds) for v in (("without", "with") if i % 2 == 0 else ("with", "without"))
    ]
    rounds = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for i, variant in enumerate(order):
        r = one_round(
            args.data_dir, variant, args.seconds, args.users, Path(f"/tmp/bench_proxy_resend_{i}.log")
        )
        r["load_avg"] = os.getloadavg()
        rounds.append(r)
        print(json.dumps({k: r[k] for k in ("variant", "c1", "c8", "callback_logged")}), flush=True)
    summary = {}
    for v in VARIANTS:
        rs = [r for r in rounds if r["variant"] == v and r["c8"] and r["c1"]]
        summary[v] = {
            "c8_req_s": [round(r["c8"]["rps"], 1) for r in rs],
            "c1_p50_ms": [round(r["c1"]["p50_ms"], 2) for r in rs],
            "c8_p99_ms": [round(r["c8"]["p99_ms"], 1) for r in rs],
            "c8_req_s_median": round(statistics.median(r["c8"]["rps"] for r in rs), 1) if rs else None,
        }
    run = {
        "started": started,
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "data_dir": str(args.data_dir),
        "seconds": args.seconds,
        "order": order,
        "rounds": rounds,
        "summary": summary,
    }
    history = json.loads(args.out.read_text()) if args.out.exists() else []
    history.append(run)
    args.out.write_text(json.dumps(history, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
