"""Retrieval funnel benchmark: baselines, retrieval sources, merge and FAISS ANN, with measured numbers.

Usage::

    .venv/bin/python bench/bench_retrieval.py [--ml100k PATH] [--out bench/results/retrieval.json]
                                              [--skip-lightgcn] [--skip-faiss] [--threads N]

Writes JSON (and prints a markdown summary). Sections:

* ``baselines``: MostPopular, ItemKNN, ALS, BPR on ML-100K with a temporal split (last 20% of
  time = test; every rating is an interaction). Recall@10/20, NDCG@10/20, HitRate, coverage.
  ``baselines_rating_ge4`` repeats it with the loader's label (rating >= 4) for reference.
* ``cf_comparison`` (ADR-004): LightGCN (torch, CPU) vs ALS/BPR/ItemKNN: quality and fit cost.
* ``sources``: candidate recall at N=100 and 300 of each retrieval source, and of merged sets at
  the same total N; per-request latency p50 of each source and of the merge.
* ``faiss``: 200k items, random and "learned" vectors: build time, recall@10 vs exact search,
  single-query latency p50 (1 thread) for exact, IVF and HNSW.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamrec.data.movielens import load_ml100k  # noqa: E402
from streamrec.evaluation.baselines import (  # noqa: E402
    ALS,
    BPR,
    ALSConfig,
    BPRConfig,
    ItemKNN,
    MostPopular,
    compare,
)
from streamrec.evaluation.metrics import candidate_recall, ranking_metrics, topk_items  # noqa: E402
from streamrec.evaluation.split import TemporalSplit, temporal_split  # noqa: E402
from streamrec.retrieval.affinity import AffinitySource, encode_categories  # noqa: E402
from streamrec.retrieval.base import RetrievalSource  # noqa: E402
from streamrec.retrieval.cf import CFSource  # noqa: E402
from streamrec.retrieval.index import (  # noqa: E402
    AnnSource,
    IndexConfig,
    VectorIndex,
    build_index,
    measure_recall,
)
from streamrec.retrieval.merge import merge_candidates  # noqa: E402
from streamrec.retrieval.trending import TrendingConfig, TrendingSource  # noqa: E402

DEFAULT_ML100K = Path(os.environ.get("STREAMREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
KS = (10, 20)
NS = (100, 300)


def machine_info(threads: int) -> dict[str, Any]:
    import implicit
    import torch

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "implicit": implicit.__version__,
        "torch": torch.__version__,
        "threads": threads,
        "note": "shared 2-core development machine; other work may have run concurrently (see load_avg_at_start)",
    }


def p50_ms(samples: list[float]) -> float:
    return round(float(np.median(samples)) * 1000, 4)


# --------------------------------------------------------------------------- data


def load_split(path: Path, label: str = "any_rating") -> tuple[TemporalSplit, list[list[str]]]:
    data = load_ml100k(path)
    events = data.events
    if label == "any_rating":
        events = events.assign(label=np.int8(1))
    split = temporal_split(events, quantile=0.8)
    cats = data.items.set_index("item_id")["categories"].reindex(split.items.raw_ids)
    return split, [list(c) if isinstance(c, list | np.ndarray) else [] for c in cats]


# --------------------------------------------------------------------------- baselines


def baseline_models(threads: int) -> list[Any]:
    return [
        MostPopular(),
        ItemKNN(neighbours=100),
        ALS(ALSConfig(num_threads=threads)),
        BPR(BPRConfig(num_threads=threads)),
    ]


def run_baselines(split: TemporalSplit, threads: int) -> list[dict[str, Any]]:
    rows = compare(baseline_models(threads), split.train_matrix(), split.test_matrix(), ks=KS)
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


# --------------------------------------------------------------------------- LightGCN (ADR-004 only)


def train_lightgcn(
    train: sp.csr_matrix,
    dim: int = 64,
    layers: int = 3,
    epochs: int = 100,
    lr: float = 1e-2,
    reg: float = 1e-4,
    batch: int = 8192,
    seed: int = 0,
    threads: int = 2,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimal LightGCN (He et al. 2020): mean of 0..L propagations, BPR loss, uniform negatives.

    Only for the ADR-004 measurement; not part of the library (ALS was chosen).
    """
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    n_u, n_i = train.shape
    a = sp.bmat([[None, train], [train.T, None]]).tocoo()
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = np.where(deg > 0, np.power(np.maximum(deg, 1e-12), -0.5), 0.0)
    vals = (dinv[a.row] * dinv[a.col]).astype(np.float32)
    # COO measured 2x faster than CSR for forward+backward of torch.sparse.mm here.
    adj = torch.sparse_coo_tensor(np.vstack([a.row, a.col]), vals, a.shape).coalesce()
    emb = torch.nn.Parameter(torch.randn(n_u + n_i, dim) * 0.1)
    opt = torch.optim.Adam([emb], lr=lr)
    coo = train.tocoo()
    pu, pi = coo.row.astype(np.int64), coo.col.astype(np.int64)

    def propagate() -> Any:
        e, acc = emb, emb
        for _ in range(layers):
            e = torch.sparse.mm(adj, e)
            acc = acc + e
        return acc / (layers + 1)

    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = rng.permutation(pu.size)
        for s in range(0, perm.size, batch):
            b = perm[s : s + batch]
            u = torch.from_numpy(pu[b])
            p = torch.from_numpy(pi[b]) + n_u
            n = torch.from_numpy(rng.integers(0, n_i, b.size)) + n_u
            out = propagate()
            loss = -torch.nn.functional.logsigmoid((out[u] * out[p]).sum(1) - (out[u] * out[n]).sum(1)).mean()
            l2 = (emb[u].pow(2).sum() + emb[p].pow(2).sum() + emb[n].pow(2).sum()) / b.size
            opt.zero_grad()
            (loss + reg * l2).backward()
            opt.step()
    with torch.no_grad():
        out = propagate().numpy()
    return out[:n_u], out[n_u:], time.perf_counter() - t0


def eval_factors(user_f: np.ndarray, item_f: np.ndarray, split: TemporalSplit) -> dict[str, float]:
    train, test = split.train_matrix(), split.test_matrix()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    ranked = topk_items(user_f[users] @ item_f.T, max(KS), train[users])
    return {k: round(v, 4) for k, v in ranking_metrics(ranked, test[users], KS).items()}


def run_cf_comparison(split: TemporalSplit, threads: int, epochs: int) -> dict[str, Any]:
    u, v, secs = train_lightgcn(split.train_matrix(), epochs=epochs, threads=threads)
    row = {"method": "lightgcn", "fit_s": round(secs, 2), "epochs": epochs, **eval_factors(u, v, split)}
    return {
        "lightgcn": row,
        "lightgcn_config": {"dim": 64, "layers": 3, "lr": 1e-2, "reg": 1e-4, "batch": 8192, "epochs": epochs},
        "note": "LightGCN trained with torch CPU; epochs chosen on the validation split (see ADR-004)",
    }


# --------------------------------------------------------------------------- sources


def build_sources(
    split: TemporalSplit, categories: list[list[str]], threads: int
) -> dict[str, RetrievalSource]:
    train = split.train_matrix()
    als = ALS(ALSConfig(num_threads=threads)).fit(train)
    ann_index = build_index(als.item_factors, "ip", calibration_queries=als.user_factors)
    codes, _ = encode_categories(categories)
    tr = split.train
    return {
        # Stand-in for the two-tower ANN source (not written yet): ALS vectors through the ANN path.
        "ann_als_vectors": AnnSource(ann_index, als.user_factors, name="ann_als_vectors", seen=train),
        "cf": CFSource(als, ann_index, name="cf"),
        "affinity": AffinitySource(train, codes),
        "trending": TrendingSource.from_events(
            split.n_items,
            tr["item_idx"].to_numpy(),
            tr["timestamp"],
            config=TrendingConfig(half_life_hours=24 * 7),
            seen=train,
        ),
    }


def run_sources(split: TemporalSplit, categories: list[list[str]], threads: int) -> dict[str, Any]:
    test = split.test_matrix()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    truth = test[users]
    sources = build_sources(split, categories, threads)
    n_max = max(NS)
    results: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    latency: dict[str, float] = {}
    for name, src in sources.items():
        out, times = [], []
        for u in users:
            t0 = time.perf_counter()
            out.append(src.retrieve(int(u), n_max))
            times.append(time.perf_counter() - t0)
        results[name] = out
        latency[name] = p50_ms(times)

    per_source = {
        name: {f"recall@{n}": round(candidate_recall([r[0] for r in res], truth, n=n), 4) for n in NS}
        for name, res in results.items()
    }
    distinct = ["cf", "affinity", "trending"]  # the ANN stand-in duplicates CF (both ALS) here
    merged: dict[str, Any] = {}
    merge_times: list[float] = []
    for label, names in (("all_4_sources", list(sources)), ("cf_affinity_trending", distinct)):
        for norm in ("minmax", "rank"):
            for bonus in (0.0, 0.1):
                key = f"{label}|{norm}|bonus={bonus}"
                merged[key] = {}
                for n in NS:
                    for budget in ("n_each", "n_split"):
                        per = n if budget == "n_each" else n // len(names)
                        cands = []
                        for i in range(users.size):
                            srcs = {s: (results[s][i][0][:per], results[s][i][1][:per]) for s in names}
                            t0 = time.perf_counter()
                            m = merge_candidates(srcs, n, agreement_bonus=bonus, normalisation=norm)
                            merge_times.append(time.perf_counter() - t0)
                            cands.append(m.items)
                        merged[key][f"recall@{n}|{budget}"] = round(candidate_recall(cands, truth), 4)
    # Merge latency at the production shape: 4 sources x 150 candidates -> 500.
    shape_times = []
    for i in range(users.size):
        srcs = {s: (results[s][i][0][:150], results[s][i][1][:150]) for s in sources}
        t0 = time.perf_counter()
        merge_candidates(srcs, 500)
        shape_times.append(time.perf_counter() - t0)
    return {
        "users_evaluated": int(users.size),
        "per_source": per_source,
        "merged": merged,
        "latency_p50_ms": {**latency, "merge_4x150_to_500": p50_ms(shape_times)},
        "notes": [
            "n_each: every source returns N candidates, the merge keeps the best N of the union; "
            "n_split: every source returns N / #sources (a hard per-source budget)",
            "ann_als_vectors stands in for the two-tower source until it exists; with ALS vectors it "
            "returns exactly what the CF source returns, so cf_affinity_trending is the honest merge",
            "source latencies are per retrieve(user, 300) call, one thread, including seen-item filtering",
        ],
    }


# --------------------------------------------------------------------------- FAISS


def learned_like_vectors(
    item_f: np.ndarray, user_f: np.ndarray, n: int, n_queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """200k vectors shaped like learned embeddings: ALS item factors plus noise, ALS user queries."""
    rng = np.random.default_rng(seed)
    sd = item_f.std(axis=0)
    x = item_f[rng.integers(0, len(item_f), n)] + 0.5 * sd * rng.standard_normal((n, item_f.shape[1]))
    q = user_f[rng.integers(0, len(user_f), n_queries)]
    return x.astype(np.float32), q.astype(np.float32)


def query_latency(index: VectorIndex, queries: np.ndarray, k: int, n: int = 200) -> float:
    faiss.omp_set_num_threads(1)
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - t0)
    return p50_ms(times)


def knob_sweep(
    index: VectorIndex, knob: str, values: list[int], x: np.ndarray, q: np.ndarray, k: int, threads: int
) -> list[dict[str, Any]]:
    """Recall@k and single-query p50 for each value of a search knob (``nprobe`` or ``ef_search``)."""
    rows = []
    for v in values:
        index.set_search_params(**{knob: v})
        faiss.omp_set_num_threads(threads)  # query_latency drops to 1 thread; recall uses ``threads``
        rows.append(
            {
                knob: v,
                "recall@10": round(measure_recall(index, x, q, k), 4),
                "query_p50_ms": query_latency(index, q, k),
            }
        )
    return rows


def faiss_case(name: str, x: np.ndarray, q: np.ndarray, threads: int, hnsw_m: int) -> dict[str, Any]:
    k = 10
    out: dict[str, Any] = {
        "items": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "queries": int(q.shape[0]),
        "k": k,
    }
    flat = build_index(x, config=IndexConfig(kind="flat"))
    out["exact_flat"] = {"query_p50_ms": query_latency(flat, q, k)}
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    ivf = build_index(x, config=IndexConfig(kind="ivf"), calibration_queries=q)
    build_s = time.perf_counter() - t0
    calibrated = ivf.search_params["nprobe"]
    sweep = knob_sweep(ivf, "nprobe", sorted({8, 16, 32, 64, 128, calibrated}), x, q, k, threads)
    nlist = int(faiss.extract_index_ivf(ivf.index).nlist)
    out["ivf"] = {
        "build_s_incl_calibration": round(build_s, 2),
        "nlist": nlist,
        "calibrated_nprobe": calibrated,
        "sweep": sweep,
    }

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    hnsw = build_index(x, config=IndexConfig(kind="hnsw", hnsw_m=hnsw_m, ef_construction=80, ef_search=64))
    build_s = time.perf_counter() - t0
    sweep = knob_sweep(hnsw, "ef_search", [32, 64, 128, 256], x, q, k, threads)
    out["hnsw"] = {"build_s": round(build_s, 2), "M": hnsw_m, "ef_construction": 80, "sweep": sweep}
    print(f"  faiss {name}: done", flush=True)
    return out


def run_faiss(split: TemporalSplit, threads: int, n_items: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    als = ALS(ALSConfig(num_threads=threads)).fit(split.train_matrix())
    random_x = rng.standard_normal((n_items, 64)).astype(np.float32)
    random_q = rng.standard_normal((500, 64)).astype(np.float32)
    learned_x, learned_q = learned_like_vectors(als.item_factors, als.user_factors, n_items, 500)
    return {
        "random_gaussian_d64": faiss_case("random", random_x, random_q, threads, hnsw_m=32),
        "learned_als_like_d32": faiss_case("learned", learned_x, learned_q, threads, hnsw_m=32),
        "notes": [
            "recall@10 against exact inner-product search over the same vectors, 500 queries",
            "query latency: single query, 1 thread, p50 of 200; build uses --threads threads",
            "learned_als_like: ALS item factors (ML-100K) resampled with noise to 200k items; queries are "
            "ALS user factors",
            "IVF for inner product uses the MIPS-to-L2 reduction (see streamrec/retrieval/index.py)",
        ],
    }


# --------------------------------------------------------------------------- main


def markdown(result: dict[str, Any]) -> str:
    lines = ["## Baselines (ML-100K, temporal 80/20, any rating = interaction)", ""]
    lines.append("| method | recall@10 | recall@20 | ndcg@10 | hit_rate@10 | coverage@10 | fit_s |")
    lines.append("|---|---|---|---|---|---|---|")
    rows = list(result["baselines"])
    if "cf_comparison" in result:
        rows.append(result["cf_comparison"]["lightgcn"])
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['recall@10']} | {r['recall@20']} | {r['ndcg@10']} | {r['hit_rate@10']} "
            f"| {r['coverage@10']} | {r['fit_s']} |"
        )
    src = result.get("sources")
    if src:
        lines += ["", "## Candidate recall", "", "| source | @100 | @300 | p50 ms |", "|---|---|---|---|"]
        for name, r in src["per_source"].items():
            lines.append(
                f"| {name} | {r['recall@100']} | {r['recall@300']} | {src['latency_p50_ms'][name]} |"
            )
        for key, r in src["merged"].items():
            lines.append(f"| merged {key} (n_each) | {r['recall@100|n_each']} | {r['recall@300|n_each']} | |")
        lines.append(f"\nmerge 4x150 -> 500 p50: {src['latency_p50_ms']['merge_4x150_to_500']} ms")
    fa = result.get("faiss")
    if fa:
        lines += ["", "## FAISS (200k items)", ""]
        for case in ("random_gaussian_d64", "learned_als_like_d32"):
            c = fa[case]
            lines.append(f"### {case}: exact p50 {c['exact_flat']['query_p50_ms']} ms")
            lines.append(f"IVF nlist={c['ivf']['nlist']} build {c['ivf']['build_s_incl_calibration']} s:")
            for s in c["ivf"]["sweep"]:
                lines.append(f"- nprobe {s['nprobe']}: recall {s['recall@10']}, p50 {s['query_p50_ms']} ms")
            lines.append(f"HNSW M={c['hnsw']['M']} build {c['hnsw']['build_s']} s:")
            for s in c["hnsw"]["sweep"]:
                lines.append(
                    f"- efSearch {s['ef_search']}: recall {s['recall@10']}, p50 {s['query_p50_ms']} ms"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ml100k", type=Path, default=DEFAULT_ML100K)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "retrieval.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--faiss-items", type=int, default=200_000)
    ap.add_argument("--lightgcn-epochs", type=int, default=100)
    ap.add_argument("--skip-lightgcn", action="store_true")
    ap.add_argument("--skip-faiss", action="store_true")
    args = ap.parse_args(argv)
    if not (args.ml100k / "u.data").is_file():
        print(f"ML-100K not found at {args.ml100k}; set STREAMREC_ML100K or pass --ml100k", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*clustering.*")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    faiss.omp_set_num_threads(args.threads)

    result: dict[str, Any] = {"machine": machine_info(args.threads)}
    t_all = time.perf_counter()
    split, categories = load_split(args.ml100k)
    result["split"] = {
        "protocol": "temporal: cutoff at the 0.8 quantile of time; every rating is an interaction; test = "
        "post-cutoff interactions of users and items seen before the cutoff",
        "cutoff_utc": str(split.cutoff),
        "n_users": split.n_users,
        "n_items": split.n_items,
        **split.stats,
    }
    print("baselines ...", flush=True)
    result["baselines"] = run_baselines(split, args.threads)
    split_ge4, _ = load_split(args.ml100k, label="rating_ge4")
    result["baselines_rating_ge4"] = run_baselines(split_ge4, args.threads)
    if not args.skip_lightgcn:
        print("lightgcn ...", flush=True)
        result["cf_comparison"] = run_cf_comparison(split, args.threads, args.lightgcn_epochs)
    print("sources ...", flush=True)
    faiss.omp_set_num_threads(1)
    result["sources"] = run_sources(split, categories, args.threads)
    if not args.skip_faiss:
        print("faiss ...", flush=True)
        result["faiss"] = run_faiss(split, args.threads, args.faiss_items)
    result["total_s"] = round(time.perf_counter() - t_all, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
