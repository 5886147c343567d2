"""The full training pipeline as a Ray job.

Locally:   python -m training.pipeline --data-dir D [--config configs/training/default.yaml]
On Ray:    ray job submit --working-dir . -- python -m training.pipeline --data-dir D

Connects to the cluster in ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else starts a
local Ray. Prints the evaluation report; exits non-zero with a one-line error on user errors.
"""

from __future__ import annotations

import argparse
import json
import sys

from streamrec.errors import StreamRecError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the pipeline, print the report."""
    p = argparse.ArgumentParser(
        prog="python -m training.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", default=None, help="StreamRec data directory")
    p.add_argument("--config", default=None, help="training YAML")
    p.add_argument("--no-register", action="store_true", help="skip the MLflow registry")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    from streamrec.paths import resolve_data_dir
    from streamrec.pipeline.config import load_training_config
    from streamrec.pipeline.report import format_report
    from streamrec.pipeline.train import run_pipeline

    try:
        report = run_pipeline(
            resolve_data_dir(args.data_dir),
            load_training_config(args.config),
            register=not args.no_register,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except StreamRecError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(report, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
