"""What a catalogue change costs a replica (``POST /v1/admin/items``, ``streamrec catalogue sync``).

For a catalogue of ``--items`` items and upserts of 1 to all of them (promoted and flagged; every
tenth also changes its categories): the durable append (flock,
write, fsync), a replica's view reading the log, the per-answer ``stat`` that tells whether the
log changed, and the re-ranking metadata rebuild that applies promoted / categories (in a worker
thread, once per change). Writes ``bench/results/catalogue.json`` and prints a markdown table.
Not part of the test suite.

    .venv/bin/python bench/bench_catalogue.py [--items 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamrec.data.catalogue import CatalogueLog, CatalogueView  # noqa: E402
from streamrec.reranking import ItemMetadata  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "catalogue.json")
    a = ap.parse_args()
    n = a.items
    rng = np.random.default_rng(0)
    meta = ItemMetadata(
        np.arange(n), [[int(c)] for c in rng.integers(0, 20, n)], np.full(n, -1), np.zeros(n),
        category_names=[f"c{i}" for i in range(20)],
    )  # fmt: skip
    rows = []
    for changed in sorted({1, 100, 10_000, n}):
        ids = rng.choice(n, min(changed, n), replace=False)
        changes: dict[int, dict[str, object]] = {int(i): {"promoted": True, "flagged": bool(i % 2)} for i in ids}
        for i in ids[::10]:  # every tenth also changes its categories, one of them new
            changes[int(i)]["categories"] = ["c1", "brand-new"]
        with tempfile.TemporaryDirectory() as d:
            log = CatalogueLog(d)
            t = time.perf_counter()
            log.append([{"item_id": i, **f} for i, f in changes.items()])
            append_s = time.perf_counter() - t
            t = time.perf_counter()
            view = CatalogueView(d)
            view_s = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(10_000):
                view.stale()
            stat_us = (time.perf_counter() - t) / 10_000 * 1e6
            size = log.size()
        t = time.perf_counter()
        meta.with_changes(changes)
        rebuild_s = time.perf_counter() - t
        rows.append({"items": n, "changed": len(changes), "append_s": append_s, "view_read_s": view_s,
                     "stat_us": stat_us, "metadata_rebuild_s": rebuild_s, "log_bytes": size})  # fmt: skip
    out = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rows": rows}  # fmt: skip
    a.out.write_text(json.dumps(out, indent=2))
    print("| changed | append (fsync) | view reads them | stat per answer | metadata rebuild | log size |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['changed']:,} | {r['append_s'] * 1e3:.1f} ms | {r['view_read_s'] * 1e3:.1f} ms | "
              f"{r['stat_us']:.1f} µs | {r['metadata_rebuild_s'] * 1e3:.0f} ms | {r['log_bytes'] / 1e6:.2f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
