"""What a catalogue change costs a replica (``POST /v1/admin/items``, ``streamrec catalogue sync``).

For a catalogue of ``--items`` items and upserts of 1 to all of them (promoted and flagged; every
tenth also changes its categories): the durable append (flock,
write, fsync), a replica's view reading the log, the per-answer ``stat`` that tells whether the
log changed, and the re-ranking metadata rebuild that applies promoted / categories (in a worker
thread, once per change). Then what a *new* item costs a replica (appended copy-on-write to the
item table, the two-tower vectors through the item tower, a FAISS index copy, the affinity and
trending sources, the ranker's feature rows and the re-ranking metadata) and what a second of
streamed engagement costs (events counted into the item table and trending). Writes
``bench/results/catalogue.json`` and prints markdown tables. Not part of the test suite.

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
    new_rows, engagement_rows = new_items(n)
    out = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rows": rows, "new_items": new_rows, "engagement": engagement_rows}  # fmt: skip
    a.out.write_text(json.dumps(out, indent=2))
    print("| changed | append (fsync) | view reads them | stat per answer | metadata rebuild | log size |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['changed']:,} | {r['append_s'] * 1e3:.1f} ms | {r['view_read_s'] * 1e3:.1f} ms | "
              f"{r['stat_us']:.1f} µs | {r['metadata_rebuild_s'] * 1e3:.0f} ms | {r['log_bytes'] / 1e6:.2f} MB |")  # fmt: skip

    print("\n| new items | table | item tower | index copy + add | affinity | trending | ranker rows | metadata | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in new_rows:
        print(f"| {r['new']:,} | " + " | ".join(f"{r[k] * 1e3:.1f} ms" for k in STEPS) + f" | {r['total_s'] * 1e3:.0f} ms |")
    print("\n| events in a sync | item table | trending | ranker rows | total |")
    print("|---|---|---|---|---|")
    for r in engagement_rows:
        print(f"| {r['events']:,} | {r['table_s'] * 1e3:.1f} ms | {r['trending_s'] * 1e3:.1f} ms | "
              f"{r['features_s'] * 1e3:.2f} ms | {r['total_s'] * 1e3:.1f} ms |")  # fmt: skip


STEPS = ("table_s", "item_tower_s", "index_s", "affinity_s", "trending_s", "features_s", "metadata_s")


def new_items(n: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The per-structure cost of appending new items, and of a sync of streamed events."""
    import faiss
    import scipy.sparse as sp
    import torch

    from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
    from streamrec.funnel.core import SOURCE_NAMES
    from streamrec.models.two_tower import TwoTowerModel
    from streamrec.ranking.features import RankerFeatures
    from streamrec.retrieval.affinity import AffinitySource
    from streamrec.retrieval.index import build_index
    from streamrec.retrieval.trending import TrendingSource

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(1)
    n_cat, dim = 20, 64
    cats = rng.integers(0, n_cat, n)
    table = ItemFeatureTable(
        item_ids=np.arange(n, dtype=np.int64), dense=rng.random((n, len(DENSE_FEATURES)), dtype=np.float32),
        dense_names=DENSE_FEATURES, category_id=cats.astype(np.int32),
        categories_indptr=np.arange(n + 1, dtype=np.int64), categories_indices=cats.astype(np.int32),
        creator_id=np.zeros(n, np.int32), published_at=np.zeros(n, np.int64), promoted=np.zeros(n, bool),
        flagged=np.zeros(n, bool), trending_updated_at=np.zeros(n, np.int64), embedding=np.zeros((n, 0), np.float32),
        embedding_version=np.full(n, "none", dtype=object), category_vocab=[f"c{i}" for i in range(n_cat)],
        creator_vocab=["a"],
    )  # fmt: skip
    model = TwoTowerModel(n_users=1000, n_items=n, n_categories=n_cat, user_dense_dim=4, item_dense_dim=0,
                          embedding_dim=dim).eval()  # fmt: skip
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    index = build_index(vectors, "ip")
    users = rng.integers(0, 1000, 20 * n // 10)
    inter = sp.csr_matrix((np.ones(users.size, np.float32), (users, rng.integers(0, n, users.size))), shape=(1000, n))
    affinity = AffinitySource(inter, [[int(c)] for c in cats])
    trending = TrendingSource.from_events(n, rng.integers(0, n, 10_000), rng.uniform(0, 86400, 10_000))
    features = RankerFeatures(table, SOURCE_NAMES)
    meta = ItemMetadata(np.arange(n), [[int(c)] for c in cats], np.full(n, -1), np.zeros(n),
                        category_names=[f"c{i}" for i in range(n_cat)])  # fmt: skip
    new_rows = []
    for k in (1, 100, 1000):
        ids = list(range(n, n + k))
        r: dict[str, float] = {"items": n, "new": k}
        t = time.perf_counter()
        grown = table.with_items(ids, [["c3"]] * k, [int(time.time())] * k, {})
        r["table_s"] = time.perf_counter() - t
        t = time.perf_counter()
        multi = np.zeros((k, n_cat), np.float32)
        multi[:, 3] = 1.0
        with torch.inference_mode():
            new_vec = model.encode_items(multi, np.zeros((k, 0), np.float32), np.full(k, -1))
        np.vstack([vectors, new_vec])
        r["item_tower_s"] = time.perf_counter() - t
        t = time.perf_counter()
        index.with_added(new_vec, np.arange(n, n + k))
        r["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        affinity.with_items([[3]] * k)
        r["affinity_s"] = time.perf_counter() - t
        t = time.perf_counter()
        trending.with_items(k)
        r["trending_s"] = time.perf_counter() - t
        t = time.perf_counter()
        features.with_table(grown)
        r["features_s"] = time.perf_counter() - t
        t = time.perf_counter()
        meta.with_items(ids).with_changes({i: {"categories": ["c3"], "published_at": time.time()} for i in ids})
        r["metadata_s"] = time.perf_counter() - t
        r["total_s"] = sum(r[s] for s in STEPS)
        new_rows.append(r)
    engagement_rows = []
    for events in (10, 1000):
        rows = rng.integers(0, n, events)
        stamps = np.full(events, time.time())
        labels = rng.integers(0, 2, events)
        e: dict[str, float] = {"items": n, "events": events}
        t = time.perf_counter()
        engaged = table.with_engagement(rows, stamps, labels)
        e["table_s"] = time.perf_counter() - t
        t = time.perf_counter()
        trending.with_events(rows[labels == 1], stamps[labels == 1])
        e["trending_s"] = time.perf_counter() - t
        t = time.perf_counter()
        features.with_table(engaged)
        e["features_s"] = time.perf_counter() - t
        e["total_s"] = e["table_s"] + e["trending_s"] + e["features_s"]
        engagement_rows.append(e)
    return new_rows, engagement_rows


if __name__ == "__main__":
    main()
