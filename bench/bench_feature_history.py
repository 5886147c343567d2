"""Cost of the training pipeline's feature build against history length (issue 17 item 1).

For synthetic worlds of the same users and catalogue spanning 1, 30, 365 and 3650 days, builds
the features three times in fresh copies: *before*, as the pipeline did until 2026-12-04 (120
daily snapshots ending at the last event, every view in full); *full*, at the pipeline's cutoffs
(``streamrec.pipeline.snapshots``: the split times and the label windows' event days, at most
120 days) with every view in full at each cutoff (as until versioned views); *versioned*, the
same cutoffs with the slowly changing views (``item_metadata``, ``user_profile``) stored as
versions (``streamrec.features.versions``). Records files, bytes, rows of the versioned views,
build seconds and whether the item table at the ranker's window start has the catalogue (the
failure of a long history before). Writes ``bench/results/feature_history.json`` and prints a
markdown table. Not part of the test suite.

    .venv/bin/python bench/bench_feature_history.py [--users 200 --items 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _size(d: Path) -> tuple[int, int]:
    files = [f for f in d.rglob("*.parquet")]
    return len(files), sum(f.stat().st_size for f in files)


def _rows(d: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in d.glob("*.parquet"))


def _run(world: Path, mode: str) -> dict[str, Any]:
    import dataclasses
    from contextlib import ExitStack
    from unittest import mock

    import pandas as pd

    from streamrec.features import build as build_module
    from streamrec.features import client as client_module
    from streamrec.features.client import FeatureClient
    from streamrec.features.spec import VIEWS
    from streamrec.pipeline.config import TrainingConfig
    from streamrec.pipeline.train import PipelineState, build_features, item_table_as_of, load_events

    d = Path(tempfile.mkdtemp(prefix=f"fh-{mode}-"))
    shutil.copytree(world, d / "data")
    cfg = TrainingConfig()
    cfg.split.min_train_events = 20  # the one-day world is small
    state = PipelineState(d / "data", cfg, "bench", log=lambda m: None)
    load_events(state)
    fc = FeatureClient(d / "data")
    versioned = [v.name for v in VIEWS if v.versioned]
    t0 = time.perf_counter()
    with ExitStack() as stack:
        if mode != "versioned":  # every view in full at each cutoff
            full = tuple(dataclasses.replace(v, versioned=False) for v in VIEWS)
            stack.enter_context(mock.patch.object(client_module, "VIEWS", full))
            stack.enter_context(mock.patch.object(build_module, "VIEWS", full))  # the build reads these
        if mode == "before":
            assert state.end is not None
            days = int((state.end - state.events["timestamp"].min()) / timedelta(days=1)) + 2
            fc.build(as_of=state.end.ceil("D").to_pydatetime(), snapshots=min(days, 120))
        else:
            stack.enter_context(mock.patch.object(FeatureClient, "apply", lambda self: {}))  # not the cost
            build_features(state, fc)
    seconds = time.perf_counter() - t0
    files, size = _size(fc.features_dir / "offline")
    assert state.t_rank is not None
    table = item_table_as_of(fc, pd.Timestamp(state.t_rank))
    out = {
        "files": files,
        "mb": round(size / 2**20, 2),
        "seconds": round(seconds, 1),
        "rows": {n: _rows(fc.features_dir / "offline" / n) for n in versioned},
        "items_with_metadata_at_ranker_start": int((table.category_id >= 0).sum()),
    }
    shutil.rmtree(d, ignore_errors=True)
    return out


def main() -> None:
    from streamrec.data.store import DataStore
    from streamrec.data.synth import SynthConfig, synthesize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--days", default="1,30,365,3650")
    ap.add_argument("--events-per-world", type=int, default=60_000, help="about this many events each")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "feature_history.json")
    a = ap.parse_args()
    rows = []
    for days in [int(x) for x in a.days.split(",")]:
        w = Path(tempfile.mkdtemp(prefix=f"fh-world-{days}-")) / "data"
        rate = min(1.0, a.events_per_world / (a.users * days * 40))  # ~40 impressions per active day
        synthesize(SynthConfig(users=a.users, items=a.items, days=days, seed=3, daily_active_rate=rate), w)
        n_events = DataStore(w).count_events()
        row = {"days": days, "events": n_events, **{m: _run(w, m) for m in ("before", "full", "versioned")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(w.parent, ignore_errors=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, shared 2-core box)",
        "users": a.users,
        "items": a.items,
        "rows": rows,
    }
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| history | events | before: files / MB / s | full: files / MB / s | versioned: files / MB / s "
        "| item_metadata + user_profile rows (full / versioned) | items with metadata at the ranker's "
        "window start (before / full / versioned) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, f, v = r["before"], r["full"], r["versioned"]
        print(
            f"| {r['days']} d | {r['events']:,} | {b['files']} / {b['mb']} / {b['seconds']} | "
            f"{f['files']} / {f['mb']} / {f['seconds']} | {v['files']} / {v['mb']} / {v['seconds']} | "
            f"{sum(f['rows'].values()):,} / {sum(v['rows'].values()):,} | "
            f"{b['items_with_metadata_at_ranker_start']} / {f['items_with_metadata_at_ranker_start']} / "
            f"{v['items_with_metadata_at_ranker_start']} |"
        )


if __name__ == "__main__":
    main()
