"""Daily retraining as a Ray job (idempotent per day).

python -m training.retrain --data-dir D [--config C] [--force]
ray job submit --working-dir . -- python -m training.retrain --data-dir D
"""

from __future__ import annotations

import argparse
import json
import sys

from streamrec.errors import StreamRecError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, retrain if today's run has not seen this data, print the record."""
    p = argparse.ArgumentParser(
        prog="python -m training.retrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from streamrec.paths import resolve_data_dir
    from streamrec.pipeline.config import load_training_config
    from streamrec.pipeline.retrain import retrain

    try:
        rec = retrain(
            resolve_data_dir(args.data_dir),
            load_training_config(args.config),
            force=args.force,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except StreamRecError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(rec, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
