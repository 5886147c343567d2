"""Benchmark the feature store: online fetch latency (SQLite, Redis), item table, materialization.

Builds a synthetic world (default 5,000 users x 200,000 items x 3 days), computes one feature
snapshot, then for each online store (SQLite file; Redis on a private loopback redis-server):
``apply``, ``materialize`` (entity rows per second), and the request-path reads:

* ``online_user_features`` (the serving path: one direct read per user view) — p50/p95/p99 over
  ``--requests`` random users;
* Feast's ``get_online_features`` for the same single user, and for 500 items (what the ranker
  would pay per request without the item table);
* :class:`ItemFeatureTable` load time (all items, from the offline files) and a 500-item lookup;
* one ``push_interaction`` (read-modify-write of the streaming features).

Writes ``bench/results/features.json`` and prints a markdown table. Not part of the test suite.

Usage::

    python bench/bench_features.py                       # full size (several minutes)
    python bench/bench_features.py --items 20000 --users 2000 --requests 500   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from streamrec.data.synth import SynthConfig, synthesize  # noqa: E402
from streamrec.features.client import FeatureClient  # noqa: E402

OUT = ROOT / "bench" / "results" / "features.json"


def pct(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
        "n": len(samples),
    }


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            if r.ping():
                break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def bench_store(fc: FeatureClient, users: np.ndarray, items: np.ndarray, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(1)
    res: dict[str, object] = {"online_store": fc.settings.kind}
    t = time.perf_counter()
    fc.apply()
    res["apply_s"] = round(time.perf_counter() - t, 2)
    rep = fc.materialize()
    res["materialize"] = {
        "entity_rows": rep.rows,
        "seconds": rep.seconds,
        "rows_per_s": rep.rows_per_second,
        "views": {k: v.get("rows", 0) for k, v in rep.views.items()},
    }
    # warm up (first call builds the readers and connections)
    for u in users[:20]:
        fc.online_user_features(int(u))
    picks = rng.choice(users, size=args.requests)
    it = iter(picks.tolist())
    res["online_user_features"] = pct(timed(lambda: fc.online_user_features(next(it)), args.requests))
    cold = iter(range(10**9, 10**9 + args.requests))
    res["online_user_features_unknown_user"] = pct(
        timed(lambda: fc.online_user_features(next(cold)), min(args.requests, 500))
    )
    user_refs = [f"{v.name}:{f}" for v in fc_views(fc, "user") for f in v.feature_names]
    it2 = iter(rng.choice(users, size=300).tolist())
    res["feast_get_online_features_1_user"] = pct(
        timed(
            lambda: fc.store.get_online_features(
                features=user_refs, entity_rows=[{"user_id": next(it2)}]
            ).to_dict(),
            300,
        )
    )
    item_refs = [f"{v.name}:{f}" for v in fc_views(fc, "item") for f in v.feature_names]

    def feast_500() -> None:
        ids = rng.choice(items, size=500, replace=False)
        fc.store.get_online_features(
            features=item_refs, entity_rows=[{"item_id": int(i)} for i in ids]
        ).to_dict()

    res["feast_get_online_features_500_items"] = pct(timed(feast_500, 10))
    if fc.settings.kind == "redis":  # the floor: one raw round trip to the same server
        import redis

        raw = redis.Redis.from_url(fc.settings.redis_url or "")
        res["redis_ping_floor"] = pct(timed(raw.ping, args.requests))
    t_push = []
    for _ in range(100):
        u, i = int(rng.choice(users)), int(rng.choice(items))
        t = time.perf_counter()
        fc.push_interaction({"user_id": u, "item_id": i, "event_type": "click"})
        t_push.append(time.perf_counter() - t)
    res["push_interaction"] = pct(t_push)
    return res


def fc_views(fc: FeatureClient, entity: str):
    from streamrec.features.spec import views_for

    return views_for(entity)  # type: ignore[arg-type]


def bench_item_table(fc: FeatureClient, items: np.ndarray) -> dict:
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        table = fc.item_table(refresh=True)
        loads.append(time.perf_counter() - t)
    rng = np.random.default_rng(2)

    def lookup() -> None:
        rows = table.index_of(rng.choice(items, size=500, replace=False))
        _ = table.dense[rows], table.category_id[rows], table.creator_id[rows], table.published_at[rows]

    return {
        "items": len(table),
        "load_s": [round(x, 3) for x in loads],
        "load_median_s": round(float(np.median(loads)), 3),
        "nbytes_mib": round(table.nbytes / 2**20, 1),
        "lookup_500_items": pct(timed(lookup, 1000)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--keep", action="store_true", help="Keep the temporary data directory.")
    ap.add_argument(
        "--stores",
        default="sqlite,redis",
        help="Online stores to run (others are kept from --out, if present).",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    result: dict[str, object] = {
        "benchmark": "streamrec.features",
        "params": {"users": args.users, "items": args.items, "days": args.days, "requests": args.requests},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "2-core shared development box (other jobs running); Redis on loopback",
        },
        "ran_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    stores = set(args.stores.split(","))
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    redis_proc = None
    try:
        base = tmp / "sqlite"
        t = time.perf_counter()
        counts = synthesize(
            SynthConfig(users=args.users, items=args.items, days=args.days, seed=5), base, progress=False
        )
        result["world"] = {"events": counts["events"], "synth_s": round(time.perf_counter() - t, 2)}
        fc = FeatureClient(base, online="sqlite")
        build = fc.build("latest")
        result["build"] = {
            "seconds": build.seconds,
            "rows": sum(build.rows.values()),
            "events": build.events_read,
        }
        users = np.arange(1, args.users + 1)
        items = np.arange(1, args.items + 1)
        if "sqlite" in stores:
            print("sqlite ...", file=sys.stderr)
            red = tmp / "redis"
            shutil.copytree(base, red)  # the same starting point for the Redis run
            result["sqlite"] = bench_store(fc, users, items, args)
            result["item_table"] = bench_item_table(fc, items)
        else:
            red = base
            for key in ("sqlite", "item_table"):
                if key in previous:
                    result[key] = previous[key]
        if "redis" in stores:
            print("redis ...", file=sys.stderr)
            redis_proc, url = start_redis(tmp)
            result["redis"] = bench_store(
                FeatureClient(red, online="redis", redis_url=url), users, items, args
            )
        elif "redis" in previous:
            result["redis"] = previous["redis"]
        result["loadavg_at_end"] = list(os.getloadavg())
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(r: dict) -> str:
    rows = [
        "| metric | SQLite | Redis |",
        "|---|---|---|",
    ]

    def cell(store: str, key: str) -> str:
        if key not in r.get(store, {}):  # a store this run (and the previous file) did not measure
            return "-"
        return f"{r[store][key]['p50_ms']} / {r[store][key]['p99_ms']}"

    for key, label in (
        ("online_user_features", "online_user_features, 1 user"),
        ("online_user_features_unknown_user", "online_user_features, unknown user"),
        ("feast_get_online_features_1_user", "Feast get_online_features, 1 user"),
        ("feast_get_online_features_500_items", "Feast get_online_features, 500 items"),
        ("push_interaction", "push_interaction, 1 event"),
    ):
        rows.append(f"| {label}, p50 / p99 (ms) | {cell('sqlite', key)} | {cell('redis', key)} |")
    if "redis_ping_floor" in r.get("redis", {}):
        rows.append(
            f"| raw Redis PING (the floor), p50 / p99 (ms) | - | {cell('redis', 'redis_ping_floor')} |"
        )
    rate = {s: r[s]["materialize"]["rows_per_s"] if s in r else "-" for s in ("sqlite", "redis")}
    rows.append(f"| materialize (entity rows/s) | {rate['sqlite']} | {rate['redis']} |")
    if "item_table" not in r:
        return "\n".join(rows)
    it = r["item_table"]
    rows.append(f"| item table load, {it['items']} items (s, median of 3) | {it['load_median_s']} | (same) |")
    rows.append(f"| item table lookup, 500 items p50 / p99 (ms) | {it['lookup_500_items']['p50_ms']} / "
                f"{it['lookup_500_items']['p99_ms']} | (same) |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
