"""What refitting on all data costs (``refit_on_all``, issue 17 item 6), on ML-100K and the demo world.

    python bench/bench_refit.py [--ml100k PATH] [--only ml-100k|synthetic-demo] [--repeats N]
                                [--out bench/results/refit.json]

Each dataset is ingested / generated once into a temporary data directory; then
``streamrec train --data-dir D --no-register --json`` runs with ``refit_on_all: false`` and with
the default (``true``), alternating, ``--repeats`` times. Recorded per run: the wall time of the
command, the pipeline's step timings (the refit's own steps are ``refit_*``), what the served fit
saw against the evaluated fit (``fit``), and whether the held-out numbers of the two runs agree
(they must: the refit runs after the evaluation). A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "streamrec"]


def _run(args: list[str], log: Path) -> str:
    with log.open("a") as err:
        p = subprocess.run(CLI + args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {p.returncode}); see {log}")
    return p.stdout


def prepare(name: str, d: Path, ml100k: Path, log: Path) -> None:
    if name == "ml-100k":
        _run(["data", "ingest", "--format", "ml-100k", "--path", str(ml100k), "--data-dir", str(d)], log)
    else:  # the demo's world (scripts/demo.sh), with a fixed end
        _run(
            [
                "data",
                "synth",
                "--users",
                "2000",
                "--items",
                "1000",
                "--days",
                "14",
                "--seed",
                "7",
                "--data-dir",
                str(d),
            ],
            log,
        )


def train(d: Path, config: Path | None, log: Path) -> dict[str, Any]:
    args = ["train", "--data-dir", str(d), "--no-register", "--json"]
    if config is not None:
        args += ["--config", str(config)]
    t0 = time.perf_counter()
    out = json.loads(_run(args, log))
    wall = time.perf_counter() - t0
    timings = out["timings_s"]
    refit_s = sum(v for k, v in timings.items() if k.startswith("refit_"))
    return {
        "wall_s": round(wall, 1),
        "refit_steps_s": round(refit_s, 1),
        "timings_s": timings,
        "fit": out["fit"],
        "methods": [
            {k: v for k, v in m.items() if "@" in k or k in ("method", "n_users")} for m in out["methods"]
        ],
        "load_average": os.getloadavg(),
    }


def markdown(results: dict[str, Any]) -> str:
    out = [
        "| dataset | run | refit_on_all: false, wall s | true, wall s | added (wall) | refit steps s "
        "| evaluated fit: positives / users / items | served fit: positives / users / items |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for i, (off, on) in enumerate(zip(r["off"], r["on"], strict=True)):
            ev, sv = on["fit"]["evaluated"], on["fit"]["served"]
            added = on["wall_s"] - off["wall_s"]
            out.append(
                f"| {name} | {i + 1} | {off['wall_s']:.0f} | {on['wall_s']:.0f} | {added:+.0f} s "
                f"({added / off['wall_s']:+.0%}) | {on['refit_steps_s']:.0f} "
                f"| {ev['positives']:,} / {ev['users']:,} / {ev['items_with_positives']:,} "
                f"| {sv['positives']:,} / {sv['users']:,} / {sv['items_with_positives']:,} |"
            )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--ml100k",
        type=Path,
        default=Path(os.environ.get("STREAMREC_ML100K", REPO.parent / "shared/data/ml-100k")),
    )
    p.add_argument("--only", choices=["ml-100k", "synthetic-demo"], default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/refit.json")
    a = p.parse_args()
    names = [a.only] if a.only else ["ml-100k", "synthetic-demo"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-refit-") as tmp:
        off_cfg = Path(tmp) / "refit-off.yaml"
        off_cfg.write_text("refit_on_all: false\n")
        for name in names:
            d = Path(tmp) / name
            log = Path(tmp) / f"{name}.log"
            prepare(name, d, a.ml100k, log)
            runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
            for _ in range(a.repeats):
                runs["off"].append(train(d, off_cfg, log))
                runs["on"].append(train(d, None, log))
                same = runs["off"][-1]["methods"] == runs["on"][-1]["methods"]
                print(
                    f"{name}: off {runs['off'][-1]['wall_s']} s, on {runs['on'][-1]['wall_s']} s, "
                    f"held-out numbers identical: {same}",
                    file=sys.stderr,
                    flush=True,
                )
            results[name] = {
                **runs,
                "held_out_numbers_identical": all(
                    o["methods"] == n["methods"] for o, n in zip(runs["off"], runs["on"], strict=True)
                ),
            }
    doc = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "streamrec train --data-dir D --no-register --json [--config refit-off.yaml]",
        "datasets": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
