"""The co-visitation retrieval source, side by side: the whole pipeline with and without it.

    python bench/bench_covisit.py [--ml100k PATH] [--only ml-100k|synthetic] [--work-dir DIR]
                                  [--compare covisit|covisit-for-cf|new-arrivals|new-arrivals-for-cf]
                                  [--grid]
                                  [--out bench/results/covisit.json]

For each dataset (ML-100K; the synthetic demo world: 2,000 users, 1,000 items, 14 days, seed 7) the
data is ingested / generated once into ``--work-dir`` and the training pipeline runs twice in this
one process on it, with the default training configuration (``configs/training/default.yaml``)
and ``retrieval.covisit.enabled`` true, then false (registry off; baselines: most_popular only and
untuned, since only the two StreamRec runs are compared). ``--compare covisit-for-cf`` makes the
*with* run merge co-visitation in place of CF's candidates (``retrieval.merged_sources``);
``--compare new-arrivals`` / ``new-arrivals-for-cf`` do the same with the new-arrivals source
(``retrieval.new_arrivals.enabled``; co-visitation off in both runs). Recorded per run: the funnel's per-source
and merged candidate recall (``funnel``), NDCG/recall of ``streamrec_ranked`` and
``streamrec_full`` with their bootstrap intervals, and wall time; across runs: the paired
difference *with minus without* per test user (same split, same test users) with its bootstrap
interval.

``--grid`` also measures co-visitation settings and merge options on the trained *with* run's
funnel without retraining: each variant's source is fitted on the training positives, and
per-source and merged recall@N are computed for the same test users and contexts as the
evaluation's (the ranker is not involved).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _prepare(name: str, root: Path, ml100k: str) -> Path:
    from streamrec.data.ingest import IngestConfig, ingest
    from streamrec.data.store import DataStore
    from streamrec.data.synth import SynthConfig, synthesize

    d = root / name
    if d.exists() and not DataStore(d).events(columns=["user_id"]).empty:
        return d
    d.mkdir(parents=True, exist_ok=True)
    if name == "ml-100k":
        ingest(IngestConfig(format="ml-100k", path=ml100k, data_dir=str(d)))
    else:
        synthesize(SynthConfig(users=2000, items=1000, days=14, seed=7), d, progress=False)
    return d


class _Recorder:
    """Keeps each method's per-user metrics and the evaluated funnel of a pipeline run.

    The pipeline reports aggregates only; the paired difference between two runs needs the
    per-user values, so this wraps the pipeline's own ``score_ranking`` and ``evaluate`` (their
    results are returned unchanged).
    """

    def __init__(self) -> None:
        self.per_user: dict[str, dict[str, np.ndarray]] = {}
        self.truth_digest = ""
        self.evaluated: tuple[Any, Any, Any] | None = None

    def __enter__(self) -> _Recorder:
        import streamrec.pipeline.evaluate as evaluation

        self._module = evaluation
        self._score, self._evaluate = evaluation.score_ranking, evaluation.evaluate

        def score(name: str, ranked: Any, truth: Any, *a: Any, **kw: Any) -> Any:
            out = self._score(name, ranked, truth, *a, **kw)
            self.per_user[name] = {k: np.asarray(v) for k, v in out.per_user.items()}
            h = hashlib.sha256(np.asarray(truth.indptr).tobytes() + np.asarray(truth.indices).tobytes())
            self.truth_digest = h.hexdigest()[:16]
            return out

        def evaluate(state: Any, fc: Any, funnel: Any, rng: Any, **kw: Any) -> Any:
            self.evaluated = (state, fc, funnel)
            return self._evaluate(state, fc, funnel, rng, **kw)

        evaluation.score_ranking = score
        evaluation.evaluate = evaluate
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.score_ranking = self._score
        self._module.evaluate = self._evaluate


#: The challenger's merged sources per ``--compare``: None = every source the bundle has.
CHALLENGERS: dict[str, list[str] | None] = {
    "covisit": None,  # a fifth source
    "covisit-for-cf": ["two_tower", "affinity", "trending", "covisit"],  # in place of CF's candidates
    "new-arrivals": None,  # the new-arrivals source as a fifth source
    "new-arrivals-for-cf": ["two_tower", "affinity", "trending", "new_arrivals"],
}


def _config(covisit: bool, merged_sources: list[str] | None = None, new_arrivals: bool = False) -> Any:
    from streamrec.pipeline.config import load_training_config

    cfg = load_training_config(REPO / "configs/training/default.yaml")
    cfg.retrieval.covisit.enabled = covisit
    cfg.retrieval.new_arrivals.enabled = new_arrivals
    if merged_sources is not None:  # validated: names of sources
        cfg.retrieval = type(cfg.retrieval).model_validate(
            {**cfg.retrieval.model_dump(), "merged_sources": merged_sources}
        )
    cfg.evaluation.baselines = ["most_popular"]
    cfg.evaluation.tuning.enabled = False
    return cfg


def run_variant(
    data_dir: Path,
    covisit: bool,
    log: Any,
    merged_sources: list[str] | None = None,
    new_arrivals: bool = False,
) -> tuple[dict[str, Any], _Recorder]:
    """One pipeline run; its report (trimmed) and the recorder."""
    from streamrec.pipeline.train import run_pipeline

    t0 = time.perf_counter()
    with _Recorder() as rec:
        report = run_pipeline(
            data_dir, _config(covisit, merged_sources, new_arrivals), register=False, log=log
        )
    wall = time.perf_counter() - t0
    methods = {m["method"]: m for m in report["methods"]}
    keep = ("ndcg@10", "recall@10", "ndcg@20", "recall@20", "coverage@10", "ci")
    return {
        "covisit": covisit,
        "new_arrivals": new_arrivals,
        "merged_sources": merged_sources,
        "funnel": report["funnel"],
        "methods": {k: {m: v[m] for m in keep if m in v} for k, v in methods.items()},
        "n_users": report["summary"]["n_users"],
        "truth_digest": rec.truth_digest,
        "timings_s": report["timings_s"],
        "wall_s": round(wall, 1),
    }, rec


def _test_users(state: Any, funnel: Any) -> tuple[np.ndarray, Any]:
    """The evaluation's test users and their truth rows (:func:`streamrec.pipeline.evaluate.test_truth`)."""
    from streamrec.pipeline.evaluate import test_truth

    users, truth = test_truth(state, funnel)
    return users, truth[users]


def grid(evaluated: tuple[Any, Any, Any], n: int, log: Any, dump: str | None = None) -> list[dict[str, Any]]:
    """Per-source and merged recall@n of co-visitation settings and merge options (no retraining)."""
    from streamrec.evaluation.metrics import candidate_recall
    from streamrec.features.snapshot import features_as_of
    from streamrec.pipeline.train import _epoch, _user_feature_dict
    from streamrec.retrieval.base import UserContext
    from streamrec.retrieval.covisit import CovisitSource
    from streamrec.retrieval.merge import merge_candidates

    state, fc, funnel = evaluated
    users, truth = _test_users(state, funnel)
    ufeat = features_as_of(fc, "user", state.t_test).set_index("user_id")
    now = _epoch(state.t_test)
    ctxs = [
        funnel.context(int(u), _user_feature_dict(ufeat, int(u)), now=now)
        for u in funnel.models.users.raw_ids[users]
    ]
    fixed = ("two_tower", "cf", "affinity", "trending")
    base = {s: [funnel.retrieve(s, c, n) for c in ctxs] for s in fixed}
    ev = state.events
    pos = ev[(ev["timestamp"] < state.t_test) & (ev["label"] > 0)]
    u_idx = funnel.models.users.to_index(pos["user_id"].to_numpy())
    rows = funnel.table.index_of(pos["item_id"].to_numpy())
    ok = (u_idx >= 0) & (rows >= 0)
    u_idx, rows, ts = u_idx[ok], rows[ok], pos["timestamp"].to_numpy()[ok]
    recall = {s: candidate_recall([r[0] for r in base[s]], truth, n) for s in fixed}
    variants: list[dict[str, Any]] = [
        {},
        {"window": 5},
        {"window": 20},
        {"window": 50},
        {"window_hours": 24.0},
        {"popularity_exponent": 0.75},
        {"popularity_exponent": 1.0},
        {"popularity_exponent": 0.25},
        {"recency_decay": 0.7},
        {"recency_decay": 1.0},
        {"profile_weight": 0.0},
        {"profile_weight": 0.5},
        {"profile_weight": 1.0},
        {"neighbours": 50},
        {"neighbours": 300},
    ]
    merges: list[dict[str, Any]] = [
        {"agreement_bonus": 0.3},
        {"agreement_bonus": 0.1},
        {"agreement_bonus": 0.0},
        {"agreement_bonus": 0.3, "weights": {"covisit": 1.2}},
        {"agreement_bonus": 0.1, "weights": {"covisit": 1.2}},
        {"agreement_bonus": 0.3, "weights": {"covisit": 1.5}},
        {"agreement_bonus": 0.3, "weights": {"covisit": 0.8}},
        {"agreement_bonus": 0.6},
    ]
    out: list[dict[str, Any]] = []
    default = funnel.settings.covisit
    if dump:
        import pickle

        cov0 = [funnel.retrieve("covisit", c, n) for c in ctxs] if "covisit" in funnel.source_names else None
        Path(dump).write_bytes(pickle.dumps({"base": base, "covisit": cov0, "truth": truth, "n": n}))
    for v in variants:
        cfg = default.model_copy(update={**v, "enabled": True})
        t0 = time.perf_counter()
        src = CovisitSource.fit(u_idx, rows, ts, len(funnel.table), cfg, seen=funnel.models.train)
        fit_s = time.perf_counter() - t0
        cov = [
            src.retrieve(UserContext(c.user_idx, c.retrieval.recent_items, history=c.history), n)
            for c in ctxs
        ]
        r_cov = candidate_recall([c[0] for c in cov], truth, n)
        best = max(max(recall.values()), r_cov)
        union = [np.concatenate([cov[i][0], *(base[s][i][0] for s in fixed)]) for i in range(len(ctxs))]
        row: dict[str, Any] = {
            "variant": v,
            "fit_s": round(fit_s, 2),
            "recall_covisit": r_cov,
            **{f"recall_{s}": recall[s] for s in fixed},
            "recall_union_uncut": candidate_recall(union, truth),
        }
        for mo in merges:
            merged = [
                merge_candidates(
                    {**{s: base[s][i] for s in fixed}, "covisit": cov[i]},
                    n,
                    mo["agreement_bonus"],
                    weights=mo.get("weights"),
                    normalisation=funnel.settings.normalisation,
                ).items
                for i in range(len(ctxs))
            ]
            r = candidate_recall(merged, truth, n)
            row[f"merged {json.dumps(mo, sort_keys=True)}"] = {"recall": r, "vs_best": r / best}
        log(json.dumps(row))
        out.append(row)
    without = [
        merge_candidates(
            {s: base[s][i] for s in fixed}, n, 0.3, normalisation=funnel.settings.normalisation
        ).items
        for i in range(len(ctxs))
    ]
    r0 = candidate_recall(without, truth, n)
    out.append({"variant": "without covisit", "merged": r0, "vs_best": r0 / max(recall.values())})
    log(json.dumps(out[-1]))
    return out


def fusion_study(dump: str) -> dict[str, Any]:
    """Merge variants, source subsets and unique hits on the candidate lists a ``--dump`` wrote.

    All at the dump's ``n`` (300) per source and merged: the current merge (best rank-normalised
    score + agreement bonus), CombSUM, reciprocal-rank fusion, round-robin (equal quotas), and
    per-source hit rates by rank bucket learned on one half of the test users and applied to the
    other (cross-fitted: an upper bound for a learned fusion of these lists); the union of the
    lists before the cut; per source, the share of test items only it retrieves.
    """
    import itertools
    import pickle

    from streamrec.evaluation.metrics import candidate_recall
    from streamrec.retrieval.merge import merge_candidates

    d = pickle.loads(Path(dump).read_bytes())  # our own dump of this script, not outside data
    srcs: dict[str, list[Any]] = {**d["base"], "covisit": d["covisit"]}
    truth, n = d["truth"], d["n"]
    users = truth.shape[0]
    targets = [set(truth[i].indices.tolist()) for i in range(users)]

    def rec(lists: list[np.ndarray]) -> float:
        return round(candidate_recall(lists, truth, n), 4)

    def by_score(acc: dict[int, float]) -> np.ndarray:
        return np.array(sorted(acc, key=lambda a: (-acc[a], a))[:n], dtype=np.int64)

    def fused(use: tuple[str, ...], score: Any) -> list[np.ndarray]:
        out = []
        for i in range(users):
            acc: dict[int, float] = {}
            for s in use:
                items = srcs[s][i][0]
                for a, v in zip(
                    items.tolist(), score(np.arange(items.size), items.size).tolist(), strict=True
                ):
                    acc[a] = acc.get(a, 0.0) + v
            out.append(by_score(acc))
        return out

    def round_robin(use: tuple[str, ...]) -> list[np.ndarray]:
        out = []
        for i in range(users):
            lists, seen, kept = [srcs[s][i][0] for s in use], set(), []
            for r in range(max(x.size for x in lists)):
                for x in lists:
                    if r < x.size and x[r] not in seen:
                        seen.add(x[r])
                        kept.append(x[r])
            out.append(np.array(kept[:n], dtype=np.int64))
        return out

    edges = np.array([0, 5, 10, 20, 40, 70, 100, 150, 200, 250, 300])
    halves = np.array_split(np.random.default_rng(0).permutation(users), 2)

    def calibrated(use: tuple[str, ...]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0, np.int64)] * users
        for fit_half, apply_half in ((halves[0], halves[1]), (halves[1], halves[0])):
            rate = {}
            for s in use:
                hits, tot = np.zeros(edges.size - 1), np.zeros(edges.size - 1)
                for i in fit_half:
                    items = srcs[s][i][0]
                    bucket = np.searchsorted(edges, np.arange(items.size), side="right") - 1
                    np.add.at(hits, bucket, [a in targets[i] for a in items.tolist()])
                    np.add.at(tot, bucket, 1)
                rate[s] = (hits + 0.01) / (tot + 1)
            for i in apply_half:
                acc: dict[int, float] = {}
                for s in use:
                    items = srcs[s][i][0]
                    bucket = np.searchsorted(edges, np.arange(items.size), side="right") - 1
                    for a, q in zip(items.tolist(), rate[s][bucket].tolist(), strict=True):
                        acc[a] = acc.get(a, 0.0) + q
                out[i] = by_score(acc)
        return out

    single = {s: rec([x[0] for x in srcs[s]]) for s in srcs}
    best = max(single.values())
    four = tuple(s for s in srcs if s != "covisit")
    out: dict[str, Any] = {"n": n, "single": single, "merges": {}, "subsets": {}}
    for use in (four, tuple(srcs)):
        tag = "five sources" if len(use) == 5 else "four sources (no covisit)"
        variants = {
            **{
                f"best + bonus {b}": [
                    merge_candidates({s: srcs[s][i] for s in use}, n, b, normalisation="rank").items
                    for i in range(users)
                ]
                for b in (0.0, 0.3, 1.0)
            },
            "combsum rank": fused(use, lambda r, length: 1 - r / length),
            "rrf k=10": fused(use, lambda r, length: 1.0 / (10 + r)),
            "rrf k=60": fused(use, lambda r, length: 1.0 / (60 + r)),
            "round robin (equal quotas)": round_robin(use),
            "calibrated hit rate sum (cross-fitted)": calibrated(use),
        }
        out["merges"][tag] = {
            k: {"recall": rec(v), "vs_best": round(rec(v) / best, 4)} for k, v in variants.items()
        }
        union = [np.unique(np.concatenate([srcs[s][i][0] for s in use])) for i in range(users)]
        out["merges"][tag]["union before the cut"] = round(candidate_recall(union, truth), 4)
    for k in (3, 4):
        for use in itertools.combinations(srcs, k):
            lists = [
                merge_candidates({s: srcs[s][i] for s in use}, n, 0.3, normalisation="rank").items
                for i in range(users)
            ]
            out["subsets"]["+".join(use)] = {"recall": rec(lists), "vs_best": round(rec(lists) / best, 4)}
    unique = {}
    for s in srcs:
        share = 0.0
        for i in range(users):
            mine = set(srcs[s][i][0].tolist()) & targets[i]
            others = set().union(*(set(srcs[o][i][0].tolist()) for o in srcs if o != s))
            share += len(mine - others) / len(targets[i])
        unique[s] = round(share / users, 4)
    out["only_this_source_share"] = unique
    return out


def scale(n_items: int, n_users: int, n_events: int, data_dir: str | None, log: Any) -> dict[str, Any]:
    """Fit cost and per-request cost of the source at catalogue scale.

    Events are the positives of ``data_dir`` (e.g. the 200k world) when given, else ``n_events``
    synthetic positives: Zipf(1.1) item popularity over ``n_items``, users with Zipf activity,
    one event a minute within a user. Peak memory is the peak of numpy's allocations traced
    during the fit (``tracemalloc``), which includes the co-visit counts before the cut.
    """
    import tracemalloc

    from streamrec.retrieval.base import UserContext
    from streamrec.retrieval.covisit import CovisitConfig, CovisitSource

    if data_dir:
        from streamrec.data.store import DataStore

        ev = DataStore(data_dir).events(columns=["user_id", "item_id", "timestamp", "label"])
        ev = ev[ev["label"] > 0]
        item_ids = np.unique(DataStore(data_dir).items()["item_id"].to_numpy())
        n_items = int(item_ids.size)
        users = ev["user_id"].to_numpy()
        items = np.searchsorted(item_ids, ev["item_id"].to_numpy())
        times = ev["timestamp"]
        source = f"positives of {data_dir}"
    else:
        rng = np.random.default_rng(0)
        users = np.minimum(rng.zipf(1.3, n_events), n_users) - 1
        items = np.minimum(rng.zipf(1.1, n_events), n_items) - 1
        items = rng.permutation(n_items)[items]  # popular items spread over the index range
        times = np.arange(n_events, dtype=np.float64) * 60.0
        source = f"{n_events:,} synthetic positives (Zipf items and users)"
    cfg = CovisitConfig()
    tracemalloc.start()
    t0 = time.perf_counter()
    src = CovisitSource.fit(users, items, times, n_items, cfg)
    fit_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    nb = src.neighbours
    stored = nb.data.nbytes + nb.indices.nbytes + nb.indptr.nbytes
    rng = np.random.default_rng(1)
    popular = np.argsort(-np.bincount(np.asarray(items), minlength=n_items))[:2000]
    histories = [rng.choice(popular, 10, replace=False) for _ in range(1000)]
    lat = []
    for h in histories:
        t = time.perf_counter()
        src.retrieve(UserContext(history=h), 150)
        lat.append(time.perf_counter() - t)
    row = {
        "events": source,
        "n_items": n_items,
        "n_positives": int(len(items)),
        "fit_s": round(fit_s, 2),
        "fit_peak_mib": round(peak / 2**20, 1),
        "neighbour_entries": int(nb.nnz),
        "stored_mib": round(stored / 2**20, 1),
        "retrieve_ms_p50": round(1000 * float(np.median(lat)), 3),
        "retrieve_ms_p99": round(1000 * float(np.quantile(lat, 0.99)), 3),
    }
    log(json.dumps(row))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ml100k", default=os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared/data/ml-100k"))
    )
    p.add_argument("--only", choices=["ml-100k", "synthetic"], default=None)
    p.add_argument("--work-dir", default="/tmp/covisit-bench")
    p.add_argument(
        "--compare",
        choices=sorted(CHALLENGERS),
        default="covisit",
        help="The 'with' run: co-visitation (or the new-arrivals source) as a fifth source, or in place of CF's candidates.",
    )
    p.add_argument("--grid", action="store_true", help="Also measure co-visit settings and merge options.")
    p.add_argument("--grid-only", action="store_true", help="Only the 'with' run and the grid.")
    p.add_argument("--scale", action="store_true", help="Only the fit/request cost at catalogue scale.")
    p.add_argument(
        "--scale-data-dir", default=None, help="Take the events of this data dir (e.g. the 200k world)."
    )
    p.add_argument("--fusion", default=None, help="Only the fusion study on the lists a --dump DUMP wrote.")
    p.add_argument("--dump", default=None, help="Write the grid's candidate lists to DUMP.<dataset>.pkl.")
    p.add_argument(
        "--out",
        default=None,
        help="Default: bench/results/covisit.json (new_arrivals.json for --compare new-arrivals*).",
    )
    args = p.parse_args()
    arrivals = args.compare.startswith("new-arrivals")
    if arrivals and (args.grid or args.grid_only or args.dump):
        p.error(
            "--grid, --grid-only and --dump study the co-visitation source; not with --compare new-arrivals*"
        )
    if args.out is None:
        args.out = str(REPO / "bench/results" / ("new_arrivals.json" if arrivals else "covisit.json"))

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    from streamrec.evaluation.intervals import paired_differences

    names = [n for n in ("ml-100k", "synthetic") if args.only in (None, n)]
    if args.fusion:
        study = {name: fusion_study(f"{args.fusion}.{name}.pkl") for name in names}
        Path(args.out).write_text(
            json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"), "fusion": study}, indent=2)
        )
        log(json.dumps(study, indent=1))
        return
    if args.scale:
        rows = [scale(200_000, 20_000, 5_000_000, None, log)]
        if args.scale_data_dir:
            rows.append(scale(0, 0, 0, args.scale_data_dir, log))
        Path(args.out).write_text(
            json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"), "scale": rows}, indent=2)
        )
        return

    results: dict[str, Any] = {}
    for name in names:
        d = _prepare(name, Path(args.work_dir), args.ml100k)
        with_run, rec_with = run_variant(
            d, not arrivals, log, CHALLENGERS[args.compare], new_arrivals=arrivals
        )
        res: dict[str, Any] = {"with": with_run}
        if args.grid or args.grid_only:
            assert rec_with.evaluated is not None
            dump = f"{args.dump}.{name}.pkl" if args.dump else None
            res["grid@300"] = grid(rec_with.evaluated, 300, log, dump)
        if not args.grid_only:
            without_run, rec_without = run_variant(d, False, log)
            res["without"] = without_run
            if with_run["truth_digest"] != without_run["truth_digest"]:
                raise SystemExit(f"{name}: the two runs evaluated different test users; no paired difference")
            res["paired_with_minus_without"] = {
                m: paired_differences(
                    rec_with.per_user[m], rec_without.per_user[m], n_resamples=1000, seed=42
                )
                for m in ("streamrec_ranked", "streamrec_full")
            }
        results[name] = res
        log(json.dumps({name: {k: v for k, v in res.items() if k != "grid@300"}}, indent=1, default=str))
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "2-core shared development box, CPU only, other agents' jobs running",
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": "configs/training/default.yaml; baselines most_popular only, untuned",
        "compare": args.compare,
        "datasets": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
