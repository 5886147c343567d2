"""Benchmark the synthetic world generator: wall time and peak memory at a given size.

Runs :func:`streamrec.data.synth.synthesize` once in a temporary data directory and records the
wall time, the process's peak RSS (``resource.getrusage``; run one size per process, since the
peak is per process) and the events written, merging the run into ``bench/results/synth.json``
(a run with the same size, seed and chunk size replaces the previous one).

Usage::

    python bench/bench_synth.py --users 100000 --items 200000 --days 7
    python bench/bench_synth.py --users 1000000 --items 200000 --days 3 --label full-scale

``--tracemalloc`` also records the peak of Python-level allocations (numpy included), at a
noticeable cost in speed. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamrec.data.synth import SynthConfig, synthesize  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "synth.json"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _git_commit() -> str | None:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _machine() -> dict[str, object]:
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    return {
        "cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--chunk-size", type=int, default=SynthConfig().chunk_size)
    ap.add_argument("--label", default=None, help="name of the run in the results file")
    ap.add_argument("--tmp", default=None, help="parent directory of the temporary data dir")
    ap.add_argument("--keep", action="store_true", help="keep the generated data dir")
    ap.add_argument("--tracemalloc", action="store_true", help="also record the Python allocation peak")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    cfg = SynthConfig(
        users=args.users, items=args.items, days=args.days, seed=args.seed, chunk_size=args.chunk_size
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data_dir = Path(tempfile.mkdtemp(prefix="bench-synth-", dir=args.tmp))
    try:
        if args.tracemalloc:
            tracemalloc.start()
        t0 = time.perf_counter()
        counts = synthesize(cfg, data_dir, progress=not args.no_progress)
        wall = time.perf_counter() - t0
        traced_peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
        if args.tracemalloc:
            tracemalloc.stop()
        disk = _dir_size(data_dir)
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    run: dict[str, object] = {
        "label": args.label or f"{args.users}u-{args.items}i-{args.days}d{'-tracemalloc' * args.tracemalloc}",
        "users": args.users,
        "items": args.items,
        "days": args.days,
        "seed": args.seed,
        "chunk_size": cfg.block_chunk_size,
        "events": counts["events"],
        "positives": counts["positives"],
        "ctr": round(counts["positives"] / max(counts["events"], 1), 5),
        "wall_s": round(wall, 2),
        "events_per_s": round(counts["events"] / wall),
        "peak_rss_mib": round(peak_rss / 1024, 1),
        "rss_before_mib": round(rss_before / 1024, 1),
        "tracemalloc_peak_mib": round(traced_peak / 2**20, 1) if traced_peak is not None else None,
        "disk_mib": round(disk / 2**20, 1),
        "tracemalloc": args.tracemalloc,
        "commit": _git_commit(),
        "ran_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    key = ("users", "items", "days", "seed", "chunk_size", "tracemalloc")
    runs = [r for r in results.get("runs", []) if any(r.get(k) != run[k] for k in key)]
    runs.append(run)
    results = {
        "benchmark": "streamrec.data.synth.synthesize",
        "note": "peak_rss_mib = ru_maxrss of the benchmark process (one size per process)",
        "runs": sorted(runs, key=lambda r: (r["users"], r["items"], r["days"])),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(run, indent=2))
    return run


if __name__ == "__main__":
    main()
