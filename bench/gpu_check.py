"""GPU check: train the two-tower model and the DCN-V2 ranker for one epoch, time ranker scoring.

Needs only torch + numpy + this repository on PYTHONPATH (no Ray, Feast, FAISS, pydantic), so it
runs on a bare GPU machine:

    PYTHONPATH=. python bench/gpu_check.py --out bench/results/gpu_check.json
    PYTHONPATH=. python bench/gpu_check.py --device cpu --users 2000 --items 1000 \
        --interactions 20000 --rank-rows 20000 --out /tmp/gpu_check.json   # small CPU smoke run

It generates a synthetic world with a planted signal (users prefer a category; items have
power-law popularity), trains each model for ``--epochs`` epochs with the production training
loops (``streamrec.models.train_loop``), embeds the whole catalog, and times
``RankerScorer.score`` on ``--candidates`` rows (median of ``--calls`` calls after
``--warmup`` calls) on the chosen device and, for reference, on CPU with one thread.
Prints a JSON report and a markdown table; ``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrec.models.dcn import DCNv2
from streamrec.models.io import load_model, save_model
from streamrec.models.scoring import RankerScorer
from streamrec.models.train_loop import (
    RankerData,
    TwoTowerData,
    pick_device,
    seed_everything,
    train_ranker,
    train_two_tower,
)
from streamrec.models.two_tower import TwoTowerModel


@dataclass
class TwoTowerSettings:
    """Training settings (same attributes as streamrec.models.config.TwoTowerConfig)."""

    epochs: int = 1
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip_norm: float | None = None
    standardize_dense: bool = True
    seed: int = 0
    temperature: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True


@dataclass
class RankerSettings:
    """Training settings (same attributes as streamrec.models.config.RankerConfig)."""

    epochs: int = 1
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip_norm: float | None = None
    standardize_dense: bool = True
    seed: int = 0
    val_fraction: float = 0.05


@dataclass
class World:
    n_users: int
    n_items: int
    n_categories: int
    item_cat: np.ndarray
    item_categories: np.ndarray
    item_dense: np.ndarray
    user_pref: np.ndarray
    user_dense: np.ndarray
    creator: np.ndarray
    popularity: np.ndarray
    sampler: dict[str, Any] = field(default_factory=dict)


def make_world(args: argparse.Namespace, rng: np.random.Generator) -> World:
    n_u, n_i, n_c = args.users, args.items, args.categories
    item_cat = rng.integers(0, n_c, n_i)
    second = rng.integers(0, n_c, n_i)
    cats = np.zeros((n_i, n_c), dtype=np.float32)
    cats[np.arange(n_i), item_cat] = 1.0
    has_second = rng.random(n_i) < 0.3
    cats[np.flatnonzero(has_second), second[has_second]] = 1.0
    popularity = 1.0 / (rng.permutation(n_i) + 10.0) ** 0.8
    popularity /= popularity.sum()
    item_dense = np.concatenate(
        [np.log(popularity)[:, None], rng.normal(size=(n_i, args.item_dense - 1))], axis=1
    ).astype(np.float32)
    user_pref = rng.integers(0, n_c, n_u)
    proj = rng.normal(size=(n_c, args.user_dense))
    user_dense = (proj[user_pref] + 0.5 * rng.normal(size=(n_u, args.user_dense))).astype(np.float32)
    creator = rng.integers(0, 1000, n_i)
    # per-category popularity CDFs for vectorised sampling
    order = np.argsort(item_cat, kind="stable")
    starts = np.searchsorted(item_cat[order], np.arange(n_c))
    ends = np.searchsorted(item_cat[order], np.arange(n_c), side="right")
    cdfs = []
    for c in range(n_c):
        p = popularity[order[starts[c] : ends[c]]]
        cdfs.append(np.cumsum(p) / p.sum() if p.size else np.ones(0))
    w = World(n_u, n_i, n_c, item_cat, cats, item_dense, user_pref, user_dense, creator, popularity)
    w.sampler = {"order": order, "starts": starts, "cdfs": cdfs, "global_cdf": np.cumsum(popularity)}
    return w


def sample_items(w: World, users: np.ndarray, rng: np.random.Generator, p_pref: float = 0.7) -> np.ndarray:
    """Each draw: w.p. ``p_pref`` a popular item of the user's category, else a popular item."""
    flat = users.ravel()
    out = np.searchsorted(w.sampler["global_cdf"], rng.random(flat.size) * w.sampler["global_cdf"][-1])
    out = np.minimum(out, w.n_items - 1)
    pref = rng.random(flat.size) < p_pref
    cats = w.user_pref[flat]
    for c in range(w.n_categories):
        sel = np.flatnonzero(pref & (cats == c))
        cdf = w.sampler["cdfs"][c]
        if sel.size == 0 or cdf.size == 0:
            continue
        pos = np.minimum(np.searchsorted(cdf, rng.random(sel.size)), cdf.size - 1)
        out[sel] = w.sampler["order"][w.sampler["starts"][c] + pos]
    return out.reshape(users.shape).astype(np.int64)


def make_two_tower_data(w: World, args: argparse.Namespace, rng: np.random.Generator) -> TwoTowerData:
    n = args.interactions
    users = rng.integers(0, w.n_users, n)
    items = sample_items(w, users, rng)
    hist = sample_items(w, np.repeat(users[:, None], args.history_len, axis=1), rng)
    lengths = rng.integers(0, args.history_len + 1, n)
    hist[np.arange(args.history_len)[None, :] >= lengths[:, None]] = -1
    user_idx = users.astype(np.int64)
    return TwoTowerData(user_idx, w.user_dense[users], hist, items, w.item_categories, w.item_dense)


def make_ranker_data(
    w: World, args: argparse.Namespace, rng: np.random.Generator
) -> tuple[RankerData, list[int]]:
    n = args.rank_rows
    users = rng.integers(0, w.n_users, n)
    items = sample_items(w, users, rng, p_pref=0.4)
    device = rng.integers(0, 5, n)
    hour = rng.integers(0, 24, n)
    affinity = (w.item_cat[items] == w.user_pref[users]).astype(np.float32)
    extra = rng.normal(size=(n, args.dense - 4)).astype(np.float32)
    dense = np.concatenate(
        [
            w.user_dense[users][:, :2],
            w.item_dense[items][:, :1],
            rng.normal(size=(n, 1)).astype(np.float32),
            extra,
        ],
        axis=1,
    ).astype(np.float32)
    logit = 2.5 * affinity - 1.0 + 0.3 * w.item_dense[items, 0] / 5 + 0.5 * dense[:, 3] + 0.3 * (device == 0)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    fields = [users, items, w.item_cat[items], w.creator[items], device, hour]
    sparse = np.stack(fields, axis=1).astype(np.int64)
    cards = [w.n_users, w.n_items, w.n_categories, 1000, 5, 24]
    return RankerData(dense, sparse, labels), cards


def time_scoring(
    scorer: RankerScorer, dense: np.ndarray, sparse: np.ndarray, warmup: int, calls: int
) -> dict[str, float]:
    for _ in range(warmup):
        scorer.score(dense, sparse)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        scorer.score(dense, sparse)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))],
        "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
        "min_ms": times[0],
        "calls": float(calls),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--interactions", type=int, default=500_000)
    ap.add_argument("--rank-rows", type=int, default=500_000, help="ranker training rows")
    ap.add_argument("--categories", type=int, default=20)
    ap.add_argument("--user-dense", type=int, default=16)
    ap.add_argument("--item-dense", type=int, default=8)
    ap.add_argument("--dense", type=int, default=32, help="ranker dense features (>= 4)")
    ap.add_argument("--history-len", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--tt-batch", type=int, default=1024)
    ap.add_argument("--rank-batch", type=int, default=2048)
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--cross-rank", type=int, default=None, help="low-rank cross layers (default full)")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    if args.dense < 4 or args.item_dense < 1:
        ap.error("--dense must be >= 4 and --item-dense >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    device = pick_device(args.device != "cpu")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        torch.ones(1, device=device).matmul(torch.ones(1, 1, device=device))  # CUDA context + cuBLAS
        sync(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"

    report: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "sizes": {
            k: getattr(args, k)
            for k in (
                "users",
                "items",
                "interactions",
                "rank_rows",
                "categories",
                "user_dense",
                "item_dense",
                "dense",
                "history_len",
                "epochs",
                "candidates",
                "calls",
                "warmup",
            )
        },
    }

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    world = make_world(args, rng)
    tt_data = make_two_tower_data(world, args, rng)
    rk_data, cards = make_ranker_data(world, args, rng)
    report["datagen_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- two-tower
    seed_everything(args.seed)
    tt = TwoTowerModel(
        n_users=world.n_users,
        n_items=world.n_items,
        n_categories=world.n_categories,
        user_dense_dim=args.user_dense,
        item_dense_dim=args.item_dense,
        embedding_dim=args.embedding_dim,
        user_id_dropout=0.05,
    )
    tt_cfg = TwoTowerSettings(epochs=args.epochs, batch_size=args.tt_batch, seed=args.seed)
    t0 = time.perf_counter()
    tt_hist = train_two_tower(tt, tt_data, tt_cfg, device)
    sync(device)
    tt_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    item_emb = tt.encode_items(world.item_categories, world.item_dense)
    sync(device)
    enc_items = time.perf_counter() - t0
    n_q = min(10_000, world.n_users)
    t0 = time.perf_counter()
    user_emb = tt.encode_users(np.arange(n_q), world.user_dense[:n_q], tt_data.history[:n_q])
    enc_users = time.perf_counter() - t0
    top = np.argsort(-(user_emb[:2000] @ item_emb.T), axis=1)[:, :20]
    pref_hit = float((world.item_cat[top] == world.user_pref[:2000, None]).mean())
    report["two_tower"] = {
        "params": sum(p.numel() for p in tt.parameters()),
        "settings": asdict(tt_cfg),
        "epochs": tt_hist,
        "train_total_s": tt_total,
        "encode_all_items_s": enc_items,
        f"encode_{n_q}_users_s": enc_users,
        "top20_in_preferred_category": pref_hit,
        "chance_preferred_category": 1.0 / world.n_categories,
    }

    # ---------------------------------------------------------------- ranker
    seed_everything(args.seed)
    ranker = DCNv2(
        n_dense=args.dense,
        sparse_cardinalities=cards,
        embedding_dim=16,
        n_cross_layers=3,
        cross_rank=args.cross_rank,
        structure="parallel",
        deep_hidden=(256, 128),
        dropout=0.1,
    )
    rk_cfg = RankerSettings(epochs=args.epochs, batch_size=args.rank_batch, seed=args.seed)
    t0 = time.perf_counter()
    rk_hist = train_ranker(ranker, rk_data, rk_cfg, device)
    sync(device)
    report["ranker"] = {
        "params": sum(p.numel() for p in ranker.parameters()),
        "settings": asdict(rk_cfg),
        "epochs": rk_hist,
        "train_total_s": time.perf_counter() - t0,
        "positive_rate": float(rk_data.labels.mean()),
    }

    # ---------------------------------------------------------------- scoring
    idx = rng.choice(len(rk_data), size=args.candidates, replace=False)
    dense = np.ascontiguousarray(rk_data.dense[idx], dtype=np.float32)
    sparse = np.ascontiguousarray(rk_data.sparse[idx], dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ranker, Path(tmp) / "ranker")
        cpu_model = load_model(Path(tmp) / "ranker", "cpu", expected=DCNv2)
    scoring: dict[str, Any] = {}
    scorer = RankerScorer(ranker, device)
    scoring[str(device)] = time_scoring(scorer, dense, sparse, args.warmup, args.calls)
    cpu_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_scorer = RankerScorer(cpu_model, "cpu")
    scoring["cpu_1_thread"] = time_scoring(cpu_scorer, dense, sparse, args.warmup, args.calls)
    torch.set_num_threads(cpu_threads)
    diff = float(np.abs(scorer.score(dense, sparse) - cpu_scorer.score(dense, sparse)).max())
    scoring["max_abs_diff_device_vs_cpu"] = diff
    report["scoring"] = scoring

    print(json.dumps(report, indent=2, default=float))
    print(markdown(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.out}", file=sys.stderr)
    return report


def markdown(r: dict[str, Any]) -> str:
    tt, rk, sc = r["two_tower"], r["ranker"], r["scoring"]
    dev = r["device"]
    e_tt, e_rk = tt["epochs"][0], rk["epochs"][0]
    rows = [
        ("device", f"{r['device_name']} ({dev}), torch {r['torch']}, python {r['python']}"),
        (
            "two-tower epoch 1",
            f"{e_tt['seconds']:.2f} s, {e_tt['rows_per_s']:.0f} rows/s, loss {e_tt['train_loss']:.3f}",
        ),
        ("two-tower encode all items", f"{tt['encode_all_items_s'] * 1e3:.1f} ms"),
        (
            "two-tower top-20 in preferred category",
            f"{tt['top20_in_preferred_category']:.2f} (chance {tt['chance_preferred_category']:.2f})",
        ),
        (
            "ranker epoch 1",
            f"{e_rk['seconds']:.2f} s, {e_rk['rows_per_s']:.0f} rows/s, "
            f"val AUC {e_rk.get('val_auc', float('nan')):.3f}",
        ),
        (
            f"score {r['sizes']['candidates']} candidates ({dev})",
            f"median {sc[dev]['median_ms']:.3f} ms, p99 {sc[dev]['p99_ms']:.3f} ms",
        ),
        (
            f"score {r['sizes']['candidates']} candidates (cpu, 1 thread)",
            f"median {sc['cpu_1_thread']['median_ms']:.3f} ms, p99 {sc['cpu_1_thread']['p99_ms']:.3f} ms",
        ),
    ]
    lines = ["| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
