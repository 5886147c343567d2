"""Two-tower training with sparse embedding updates vs dense AdamW: time and retrieval quality.

    .venv/bin/python bench/bench_two_tower_sparse.py --big-dir D [--ml100k PATH] [--pairs 3]

Issue 17, item 7. ``D`` is a data directory holding the 200,000-item synthetic world
(``streamrec data synth --users 20000 --items 200000 --days 7``); its features are (re)built here.

* **Time**: the two-tower's training rows of the pipeline's second retrieval fit (every positive
  before the test cutoff, user features by point-in-time join, as ``fit_retrieval`` builds them),
  trained with the default configuration for ``--fit-epochs`` epochs, dense and sparse
  alternately ``--pairs`` times, one torch thread (as the pipeline's Ray worker).
* **Quality**: on ML-100K and on the demo synthetic world (2,000 users x 1,000 items x 14 days),
  the same training rows, a full default fit per seed with each optimiser; every test user
  (a new positive after the cutoff) is queried with features as of the cutoff, scored against all
  items by exact inner product (training items excluded): recall@{50,150} and NDCG@10 per user.
  The paired difference sparse minus dense (per user, averaged over seeds) gets a bootstrap 95%
  interval; dense seed A minus dense seed B is the reference for training noise.

Writes ``bench/results/two_tower_sparse.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KS_RECALL = (50, 150)
K_NDCG = 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """The two-tower rows and the test truth of one data directory (pipeline split, cutoff T_test)."""

    data: Any  # TwoTowerData
    build_kwargs: dict[str, Any]
    cats: np.ndarray
    train: Any  # csr users x items
    test_users: np.ndarray  # user indices with a new positive after the cutoff
    truth: Any  # csr, rows = test_users
    query_dense: np.ndarray
    query_hist: np.ndarray
    prep_s: float
    data_dir: Path | None = None


def prepare(data_dir: Path, max_test_users: int = 0, seed: int = 0) -> Prepared:
    """Build the rows ``fit_retrieval(..., cutoff=T_test)`` trains on, and the test truth."""
    import scipy.sparse as sp

    from streamrec.data.ids import IdMap
    from streamrec.features.client import FeatureClient
    from streamrec.features.snapshot import features_as_of
    from streamrec.models.train_loop import TwoTowerData
    from streamrec.pipeline import train as pt
    from streamrec.pipeline.config import TrainingConfig
    from streamrec.ranking.features import user_dense_matrix

    t0 = time.perf_counter()
    cfg = TrainingConfig()
    state = pt.PipelineState(data_dir, cfg, "bench", log=log)
    pt.load_events(state)
    fc = FeatureClient(data_dir)
    pt.build_features(state, fc)
    pit = pt.positives_with_features(state, fc)
    assert state.t_test is not None
    table = pt.item_table_as_of(fc, state.t_test)
    pos = pit[pit["timestamp"] < state.t_test].copy()
    pos["item_row"] = table.index_of(pos["item_id"].to_numpy())
    pos = pos[pos["item_row"] >= 0]
    users = IdMap.fit(pos["user_id"].to_numpy())
    uidx = users.to_index(pos["user_id"].to_numpy())
    n_items = len(table)
    train = sp.csr_matrix(
        (np.ones(len(pos), np.float32), (uidx, pos["item_row"].to_numpy())), shape=(len(users), n_items)
    )
    train.sum_duplicates()
    train.data[:] = 1.0
    ts_frame = pos.reset_index(drop=True)
    hist = pt._history_matrix(ts_frame["recent_item_ids"], table, cfg.retrieval.history_length)
    cats = np.asarray(table.category_matrix().toarray(), dtype=np.float32)
    data = TwoTowerData(
        user_idx=users.to_index(ts_frame["user_id"].to_numpy()),
        user_dense=user_dense_matrix(ts_frame),
        history=hist,
        item_idx=table.index_of(ts_frame["item_id"].to_numpy()),
        item_categories=cats,
        item_dense=np.zeros((n_items, 0), np.float32),
    )
    build_kwargs = {
        "n_users": len(users),
        "n_items": n_items,
        "n_categories": cats.shape[1],
        "user_dense_dim": data.user_dense.shape[1],
        "item_dense_dim": 0,
    }
    # Test truth as the pipeline's evaluate(): new positives after T_test of known users.
    ev = state.events
    test = ev[(ev["timestamp"] >= state.t_test) & (ev["label"] > 0)]
    tu = users.to_index(test["user_id"].to_numpy())
    ti = table.index_of(test["item_id"].to_numpy())
    ok = (tu >= 0) & (ti >= 0)
    truth = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (tu[ok], ti[ok])), shape=train.shape)
    truth.sum_duplicates()
    truth.data[:] = 1.0
    truth = sp.csr_matrix(truth - truth.multiply(train))
    truth.eliminate_zeros()
    test_users = np.flatnonzero(np.diff(truth.indptr) > 0)
    if max_test_users and test_users.size > max_test_users:
        rng = np.random.default_rng(seed)
        test_users = np.sort(rng.choice(test_users, max_test_users, replace=False))
    ufeat = features_as_of(fc, "user", state.t_test).set_index("user_id")
    frame = ufeat.reindex(users.raw_ids[test_users]).reset_index()
    qhist = pt._history_matrix(frame["recent_item_ids"], table, cfg.retrieval.history_length)
    return Prepared(
        data,
        build_kwargs,
        cats,
        train,
        test_users,
        truth[test_users],
        user_dense_matrix(frame),
        qhist,
        time.perf_counter() - t0,
    )


def fit(p: Prepared, sparse: bool, seed: int, epochs: int | None = None) -> tuple[Any, dict[str, Any]]:
    """One default-config two-tower fit; returns the model and its timing/loss summary."""
    import torch

    from streamrec.models.train_loop import train_two_tower
    from streamrec.pipeline.config import TrainingConfig

    base = TrainingConfig().two_tower
    update: dict[str, Any] = {"sparse_embeddings": sparse, "seed": seed}
    if epochs is not None:
        update["epochs"] = epochs
    cfg = base.model_copy(update=update)
    torch.set_num_threads(1)
    model = cfg.build_model(**p.build_kwargs)
    t0 = time.perf_counter()
    hist = train_two_tower(model, p.data, cfg, "cpu")
    wall = time.perf_counter() - t0
    model.eval()
    return model, {
        "sparse": sparse,
        "seed": seed,
        "epochs": len(hist),
        "rows": len(p.data),
        "wall_s": round(wall, 2),
        "epoch_s": [round(h["seconds"], 2) for h in hist],
        "train_loss": [round(h["train_loss"], 4) for h in hist],
    }


def per_user_metrics(model: Any, p: Prepared) -> dict[str, np.ndarray]:
    """Recall@k and NDCG@10 of exact two-tower retrieval, one value per test user."""
    import torch

    n_items = p.build_kwargs["n_items"]
    with torch.inference_mode():
        items = model.encode_items(p.cats, np.zeros((n_items, 0), np.float32), np.arange(n_items))
        q = model.encode_users(p.test_users, p.query_dense, p.query_hist)
    kmax = max(*KS_RECALL, K_NDCG)
    out: dict[str, list[float]] = {f"recall@{k}": [] for k in KS_RECALL}
    out[f"ndcg@{K_NDCG}"] = []
    discounts = 1.0 / np.log2(np.arange(2, K_NDCG + 2))
    for start in range(0, len(p.test_users), 512):
        rows = slice(start, start + 512)
        scores = q[rows] @ items.T
        seen = p.train[p.test_users[rows]]
        r, c = seen.nonzero()
        scores[r, c] = -np.inf
        top = np.argpartition(-scores, kmax, axis=1)[:, :kmax]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        truth = p.truth[rows]
        for i in range(top.shape[0]):
            rel = set(truth.indices[truth.indptr[i] : truth.indptr[i + 1]].tolist())
            hits = np.fromiter((t in rel for t in top[i]), dtype=bool, count=kmax)
            for k in KS_RECALL:
                out[f"recall@{k}"].append(hits[:k].sum() / len(rel))
            ideal = discounts[: min(len(rel), K_NDCG)].sum()
            out[f"ndcg@{K_NDCG}"].append(float((hits[:K_NDCG] * discounts).sum() / ideal))
    return {k: np.asarray(v) for k, v in out.items()}


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over users with a bootstrap 95% interval (users resampled)."""
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def quality(name: str, p: Prepared, seeds: list[int]) -> dict[str, Any]:
    """Fit dense and sparse per seed; per-user metrics and paired intervals."""
    per: dict[bool, list[dict[str, np.ndarray]]] = {False: [], True: []}
    fits = []
    for seed in seeds:
        for sparse in (False, True):
            model, info = fit(p, sparse, seed)
            per[sparse].append(per_user_metrics(model, p))
            fits.append(info)
            log(
                f"  {name} seed {seed} {'sparse' if sparse else 'dense '}: {info['wall_s']} s, loss {info['train_loss'][-1]}"
            )
    metrics = list(per[False][0])
    res: dict[str, Any] = {"test_users": int(p.test_users.size), "train_rows": len(p.data), "fits": fits}
    for m in metrics:
        dense = np.mean([r[m] for r in per[False]], axis=0)
        sparse = np.mean([r[m] for r in per[True]], axis=0)
        res[m] = {
            "dense": float(dense.mean()),
            "sparse": float(sparse.mean()),
            "dense_per_seed": [float(r[m].mean()) for r in per[False]],
            "sparse_per_seed": [float(r[m].mean()) for r in per[True]],
            "sparse_minus_dense": paired(sparse, dense),
        }
        if len(seeds) > 1:
            res[m]["dense_seed_noise"] = paired(per[False][0][m], per[False][1][m])
    return res


def ranker_quality(name: str, data_dir: Path, seeds: list[int]) -> dict[str, Any]:
    """The ranker's rows as the pipeline builds them (retrieval A candidates); dense vs sparse fits.

    Both fits of a seed share the rows and the seeded validation split, so their validation AUC
    and log loss are paired; the ranker's row-level AUC difference gets no bootstrap here.
    """
    import torch

    from streamrec.features.client import FeatureClient
    from streamrec.funnel.core import Funnel
    from streamrec.models.train_loop import train_ranker
    from streamrec.pipeline import train as pt
    from streamrec.pipeline.config import TrainingConfig

    cfg = TrainingConfig()
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_ray": False})})
    state = pt.PipelineState(data_dir, cfg, "bench-ranker", log=log)
    torch.set_num_threads(1)
    pt.load_events(state)
    fc = FeatureClient(data_dir)
    pt.build_features(state, fc)
    pit = pt.positives_with_features(state, fc)
    assert state.t_rank is not None
    table = pt.item_table_as_of(fc, state.t_rank)
    models_a = pt.fit_retrieval(state, pit, table, state.t_rank, "a")
    rdata, _ = pt.ranker_rows(
        state, fc, Funnel(models_a, table, None, cfg.retrieval), np.random.default_rng(cfg.seed)
    )
    layout = Funnel(models_a, table, None, cfg.retrieval).features.layout
    fits = []
    for seed in seeds:
        for sparse in (False, True):
            rc = cfg.ranker.model_copy(update={"sparse_embeddings": sparse, "seed": seed})
            model = rc.build_model(
                n_dense=rdata.dense.shape[1], sparse_cardinalities=list(layout.cardinalities)
            )
            t0 = time.perf_counter()
            hist = train_ranker(model, rdata, rc)
            fits.append(
                {
                    "sparse": sparse,
                    "seed": seed,
                    "wall_s": round(time.perf_counter() - t0, 2),
                    "val_auc": hist[-1]["val_auc"],
                    "val_logloss": hist[-1]["val_logloss"],
                }
            )
            log(f"  {name} ranker seed {seed} {'sparse' if sparse else 'dense '}: {fits[-1]}")
    out: dict[str, Any] = {"rows": len(rdata), "fits": fits}
    for m in ("val_auc", "val_logloss"):
        d = [f[m] for f in fits if not f["sparse"]]
        sp_ = [f[m] for f in fits if f["sparse"]]
        out[m] = {
            "dense": d,
            "sparse": sp_,
            "sparse_minus_dense": [b - a for a, b in zip(d, sp_, strict=True)],
        }
    return out


def timing(p: Prepared, pairs: int, epochs: int) -> dict[str, Any]:
    """Alternate dense and sparse fits ``pairs`` times."""
    runs = []
    for i in range(pairs):
        for sparse in (False, True) if i % 2 == 0 else (True, False):
            _, info = fit(p, sparse, 42, epochs=epochs)
            runs.append(info)
            log(f"  timing {'sparse' if sparse else 'dense '}: {info['wall_s']} s ({info['epoch_s']})")
    out: dict[str, Any] = {"runs": runs}
    for sparse in (False, True):
        w = [r["wall_s"] for r in runs if r["sparse"] == sparse]
        out["sparse" if sparse else "dense"] = {
            "median_s": float(np.median(w)),
            "min_s": min(w),
            "max_s": max(w),
        }
    out["speedup_median"] = out["dense"]["median_s"] / out["sparse"]["median_s"]
    return out


def with_dir(make: Callable[[Path], object]) -> Callable[[], Prepared]:
    def run() -> Prepared:
        d = Path(tempfile.mkdtemp(prefix="tt-sparse-"))
        make(d)
        prepared = prepare(d)
        prepared.data_dir = d
        return prepared

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-dir", help="data dir of the 200k-item world (timing; skipped when absent)")
    ap.add_argument("--pairs", type=int, default=3, help="alternating dense/sparse timing pairs")
    ap.add_argument("--fit-epochs", type=int, default=1, help="epochs per timing fit (default config: 8)")
    ap.add_argument("--big-quality", action="store_true", help="also full fits + quality on the big world")
    ap.add_argument(
        "--ml100k", default=os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared/data/ml-100k"))
    )
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-two-tower", action="store_true", help="quality worlds: the ranker check only")
    ap.add_argument("--ranker", action="store_true", help="also the ranker's paired check per world")
    ap.add_argument("--worlds", default="ml-100k,synthetic-demo", help="quality worlds, comma-separated")
    ap.add_argument(
        "--full-train", nargs="*", default=[], help="LABEL=PATH of `streamrec train --json` outputs"
    )
    ap.add_argument("--out", default=str(REPO / "bench/results/two_tower_sparse.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    from streamrec.data.ingest import IngestConfig, ingest
    from streamrec.data.synth import SynthConfig, synthesize

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "two_tower_sparse",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "note": "2-core shared development box, CPU only, other agents' jobs running",
        },
        "config": "TrainingConfig() defaults: two_tower batch 256, 8 epochs, AdamW lr 1e-3 wd 1e-5; 1 torch thread",
    }
    if args.big_dir:
        log("[big world] preparing the rows of fit_retrieval(cutoff=T_test) ...")
        big = prepare(Path(args.big_dir), max_test_users=2000)
        result["big_world"] = {
            "dir": args.big_dir,
            "n_items": big.build_kwargs["n_items"],
            "n_users": big.build_kwargs["n_users"],
            "train_rows": len(big.data),
            "prepare_s": round(big.prep_s, 1),
            "timing": timing(big, args.pairs, args.fit_epochs),
        }
        if args.big_quality:
            result["big_world"]["quality"] = quality("big", big, seeds[:1])
    if not args.skip_quality:
        worlds: dict[str, Callable[[], Prepared]] = {}
        wanted = set(args.worlds.split(","))
        if "ml-100k" in wanted and Path(args.ml100k, "u.data").is_file():
            worlds["ml-100k"] = with_dir(
                lambda d: ingest(IngestConfig(format="ml-100k", path=args.ml100k, data_dir=str(d)))
            )
        if "synthetic-demo" in wanted:
            worlds["synthetic-demo"] = with_dir(
                lambda d: synthesize(SynthConfig(users=2000, items=1000, days=14, seed=7), d, progress=False)
            )
        result["quality"] = {}
        for name, make in worlds.items():
            log(f"[{name}] ...")
            prepared = make()
            if not args.skip_two_tower:
                result["quality"][name] = quality(name, prepared, seeds)
            if args.ranker and prepared.data_dir is not None:
                result.setdefault("ranker_quality", {})[name] = ranker_quality(name, prepared.data_dir, seeds)
    for spec in args.full_train:
        label, path = spec.split("=", 1)
        rep = json.loads(Path(path).read_text())
        result.setdefault("full_train", {})[label] = {
            "timings_s": rep.get("timings_s"),
            "summary": rep.get("summary"),
            "methods": [
                {k: v for k, v in m.items() if k == "method" or "ndcg@10" in k or "recall@50" in k}
                for m in rep.get("methods", [])
            ],
        }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(
        json.dumps({k: v for k, v in result.items() if k in ("big_world", "seconds")}, indent=2, default=str)[
            :4000
        ]
    )


if __name__ == "__main__":
    main()
