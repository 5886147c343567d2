"""Offline quality of the full StreamRec pipeline vs baselines, on ML-100K and the synthetic world.

    python bench/bench_quality.py [--ml100k PATH] [--out bench/results/quality.json] [--no-tuning]
                                  [--rolling-folds N]

Each dataset is ingested / generated into a fresh temporary data directory and trained with the
default training configuration (Ray Train, registry off); the evaluation (temporal split,
baselines side by side with the hyper-parameters chosen on a validation window before the test
window, bootstrap 95% intervals over test users, the paired difference StreamRec minus the best
baseline, the retrieval funnel stage by stage) and the wall time go to the JSON; the methods
tables (markdown, as in docs/benchmarks.md) go to stdout. With ``--rolling-folds N`` (default 4;
0 = off) the pipeline also runs its rolling evaluation (``evaluation.rolling.folds``: N cutoffs
ending at the test cutoff, each fold retrained on what came before it), reported per fold and
pooled over user-windows under ``rolling``.
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


def run(name: str, prepare, log, tuning: bool = True, rolling_folds: int = 0) -> dict:  # type: ignore[no-untyped-def]
    from streamrec.pipeline.config import TrainingConfig
    from streamrec.pipeline.train import run_pipeline

    cfg = TrainingConfig()
    cfg.evaluation.tuning.enabled = tuning
    cfg.evaluation.rolling.folds = rolling_folds
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
        "rolling": report.get("rolling"),
        "timings_s": report["timings_s"],
        "wall_s": round(wall, 1),
    }


def markdown(results: dict[str, dict]) -> str:
    """The methods table of each dataset with 95% intervals, chosen parameters and the paired line.

    Then the funnel and the rolling evaluation (the library's table:
    :func:`streamrec.pipeline.report.rolling_markdown`).
    """
    from streamrec.evaluation.config import NOT_TUNABLE
    from streamrec.pipeline.report import metric_cell, paired_lines, rolling_markdown

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
            cells = " | ".join(metric_cell(m, c) for c in ("ndcg@10", "recall@10", "ndcg@20", "recall@20"))
            out.append(f"| {m['method']} | {cells} | {m['coverage@10']:.3f} | {shown} |")
        out += paired_lines(s.get("paired_vs_best_baseline"), "per test user")
        out.append("")
        out += funnel_markdown(r.get("funnel") or [])
        out += rolling_markdown(r.get("rolling"))
    return "\n".join(out)


def funnel_markdown(funnel: list[dict]) -> list[str]:
    """Candidate recall per retrieval source and merged, at equal candidate counts."""
    if not funnel:
        return []
    names = [k.removeprefix("recall_") for k in funnel[0] if k.startswith("recall_") and k != "recall_merged"]
    out = [
        "| candidates | " + " | ".join(names) + " | merged | merged / best single |",
        "|---" * (len(names) + 3) + "|",
    ]
    for row in funnel:
        cells = " | ".join(f"{row['recall_' + n]:.3f}" for n in names)
        out.append(
            f"| {row['candidates']} | {cells} | {row['recall_merged']:.3f} | {row['merged_vs_best_single']:.3f} |"
        )
    return [*out, ""]


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
    p.add_argument(
        "--rolling-folds",
        type=int,
        default=4,
        help="Cutoffs of the rolling evaluation, the test cutoff included (0 = off).",
    )
    p.add_argument("--markdown-from", default=None, help="Print the tables of an existing JSON and exit.")
    args = p.parse_args()
    if args.markdown_from:
        print(markdown(json.loads(Path(args.markdown_from).read_text())["datasets"]))
        return

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
            rolling_folds=args.rolling_folds,
        )
    if args.only in (None, "synthetic"):
        results["synthetic-demo"] = run(
            "syn",
            lambda d: synthesize(SynthConfig(users=2000, items=1000, days=14, seed=7), d, progress=False),
            log,
            rolling_folds=args.rolling_folds,
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
        + (", evaluation.tuning.enabled=false" if args.no_tuning else "")
        + f", evaluation.rolling.folds={args.rolling_folds}",
        "datasets": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(markdown(results))


if __name__ == "__main__":
    main()
