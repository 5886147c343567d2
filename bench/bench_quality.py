"""Offline quality of the full StreamRec pipeline vs baselines, on ML-100K and the synthetic world.

    python bench/bench_quality.py [--ml100k PATH] [--out bench/results/quality.json] [--no-tuning]

Each dataset is ingested / generated into a fresh temporary data directory and trained with the
default training configuration (Ray Train, registry off); the evaluation (temporal split,
baselines side by side with the hyper-parameters chosen on a validation window before the test
window, bootstrap 95% intervals over test users, the paired difference StreamRec minus the best
baseline, the retrieval funnel stage by stage) and the wall time go to the JSON; the methods
tables (markdown, as in docs/benchmarks.md) go to stdout.
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


def run(name: str, prepare, log, tuning: bool = True) -> dict:  # type: ignore[no-untyped-def]
    from streamrec.pipeline.config import TrainingConfig
    from streamrec.pipeline.train import run_pipeline

    cfg = TrainingConfig()
    cfg.evaluation.tuning.enabled = tuning
    with tempfile.TemporaryDirectory(prefix=f"quality-{name}-") as d:
        t0 = time.perf_counter()
        prepare(Path(d))
        report = run_pipeline(d, cfg, register=False, log=log)
        wall = time.perf_counter() - t0
    return {
        "methods": report["methods"],
        "funnel": report["funnel"],
        "summary": report["summary"],
        "baselines": report.get("baselines"),
        "training": report["training"],
        "timings_s": report["timings_s"],
        "wall_s": round(wall, 1),
    }


def _ci(row: dict, metric: str) -> str:
    lo, hi = row.get("ci", {}).get(metric, (float("nan"), float("nan")))
    return f"{row[metric]:.4f} [{lo:.3f}, {hi:.3f}]"


def markdown(results: dict[str, dict]) -> str:
    """The methods table of each dataset with 95% intervals, chosen parameters and the paired line."""
    from streamrec.evaluation.config import NOT_TUNABLE

    out: list[str] = []
    for name, r in results.items():
        s = r["summary"]
        out += [
            f"**{name}** ({s['n_users']} test users, whole pipeline {r['wall_s']:.0f} s wall)",
            "",
            "| method | NDCG@10 [95% CI] | Recall@10 [95% CI] | NDCG@20 [95% CI] | Recall@20 [95% CI] | Coverage@10 | chosen parameters |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in r["methods"]:
            params = m.get("params")
            shown = ", ".join(f"{k}={v}" for k, v in params.items() if k not in NOT_TUNABLE) if params else ""
            if params is not None and not m.get("tuned"):
                shown = f"{shown} (defaults)" if shown else "-"
            out.append(
                f"| {m['method']} | {_ci(m, 'ndcg@10')} | {_ci(m, 'recall@10')} | {_ci(m, 'ndcg@20')} | "
                f"{_ci(m, 'recall@20')} | {m['coverage@10']:.3f} | {shown} |"
            )
        paired = s.get("paired_vs_best_baseline") or {}
        for challenger in ("streamrec_ranked", "streamrec_full"):
            d = paired.get(challenger, {}).get("ndcg@10")
            if d:
                out.append(
                    f"\n{challenger} minus {paired['baseline']} (paired, per test user): NDCG@10 "
                    f"{d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                )
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ml100k", default=os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared/data/ml-100k"))
    )
    p.add_argument("--out", default=str(REPO / "bench/results/quality.json"))
    p.add_argument("--only", choices=["ml-100k", "synthetic"], default=None)
    p.add_argument(
        "--no-tuning", action="store_true", help="Run the baselines with their default parameters."
    )
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
            tuning=not args.no_tuning,
        )
    if args.only in (None, "synthetic"):
        results["synthetic-demo"] = run(
            "syn",
            lambda d: synthesize(SynthConfig(users=2000, items=1000, days=14, seed=7), d, progress=False),
            log,
            tuning=not args.no_tuning,
        )
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "2-core shared development box, CPU only",
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": "TrainingConfig() defaults"
        + (", evaluation.tuning.enabled=false" if args.no_tuning else ""),
        "datasets": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(markdown(results))


if __name__ == "__main__":
    main()
