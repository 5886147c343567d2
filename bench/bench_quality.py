"""Offline quality of the full StreamRec pipeline vs baselines, on ML-100K and the synthetic world.

    python bench/bench_quality.py [--ml100k PATH] [--out bench/results/quality.json]

Each dataset is ingested / generated into a fresh temporary data directory and trained with the
default training configuration (Ray Train, registry off); the evaluation (temporal split,
baselines side by side, the retrieval funnel stage by stage) and the wall time go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(name: str, prepare, log) -> dict:  # type: ignore[no-untyped-def]
    from streamrec.pipeline.config import TrainingConfig
    from streamrec.pipeline.train import run_pipeline

    with tempfile.TemporaryDirectory(prefix=f"quality-{name}-") as d:
        t0 = time.perf_counter()
        prepare(Path(d))
        report = run_pipeline(d, TrainingConfig(), register=False, log=log)
        wall = time.perf_counter() - t0
    return {
        "methods": report["methods"],
        "funnel": report["funnel"],
        "summary": report["summary"],
        "training": report["training"],
        "timings_s": report["timings_s"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ml100k", default=os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared/data/ml-100k"))
    )
    p.add_argument("--out", default=str(REPO / "bench/results/quality.json"))
    p.add_argument("--only", choices=["ml-100k", "synthetic"], default=None)
    args = p.parse_args()

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    from streamrec.data.ingest import IngestConfig, ingest
    from streamrec.data.synth import SynthConfig, synthesize

    results: dict[str, dict] = {}
    if args.only in (None, "ml-100k") and Path(args.ml100k, "u.data").is_file():
        results["ml-100k"] = run(
            "ml",
            lambda d: ingest(IngestConfig(format="ml-100k", path=args.ml100k, data_dir=str(d))),
            log,
        )
    if args.only in (None, "synthetic"):
        results["synthetic-demo"] = run(
            "syn",
            lambda d: synthesize(SynthConfig(users=2000, items=1000, days=14, seed=7), d, progress=False),
            log,
        )
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "2-core shared development box, CPU only",
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": "configs/training/default.yaml (defaults)",
        "datasets": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps({k: v["summary"] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
