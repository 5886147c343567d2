"""How far can merged candidate recall go? Each source, the merge, the union, and the world's own model.

    python bench/bench_recall_bound.py [--ml100k PATH] [--only ml-100k|synthetic] [--work-dir DIR]
                                       [--out bench/results/recall_bound.json]

Issue 17 item 5 asks for merged recall@300 >= 1.18x the best single source. This measures what
bounds that ratio, on the evaluation's own test users and contexts (one pipeline run per data set,
``configs/training/default.yaml`` with the co-visitation source on; baselines reduced to
most_popular, since only the funnel is read):

* per source and merged recall@N (the merge of the default four sources and of all five);
* the union of every source's top N before the cut to N (what a perfect merge could keep);
* the share of test targets published after the test cutoff (no source can return an item that
  does not exist yet at the cutoff);
* the share of the targets the merge misses that were published shortly before the cutoff or
  after it, and an exploratory *new-arrivals* list (items published in the last
  ``NEW_ARRIVALS_DAYS`` before the cutoff, newest first) merged as a sixth source and in place
  of CF's candidates (not a StreamRec source: what one would add);
* two conventions for every list: *as served* (what the sources return; the pipeline's funnel
  recall counts these) and *at the cutoff* (items published after the cutoff dropped from every
  list before the cut to N, as the catalogue at the cutoff would have it);
* on the synthetic world only, the *generating model itself*: every item published by the
  cutoff scored with the world's ground truth (exposure by the logging policy's three candidate
  sources x click probability of the click model, averaged over slate positions and over the
  test window), top N per user: over the items published by the cutoff for the *at the cutoff*
  lists, over every item for the *as served* ones. No retrieval stage can be expected to beat
  it; the ratio target is compared with it.

Data sets are prepared as ``bench/bench_covisit.py`` does (the same ``--work-dir`` is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

NS = (100, 300)
TIME_STEPS = 13  # points over the test window at which the world's model is evaluated
NEW_ARRIVALS_DAYS = 3.0


def world_scores(
    data_dir: Path, user_ids: np.ndarray, item_ids: np.ndarray, t0: datetime, t1: datetime
) -> np.ndarray:
    """Expected clicks of each (user, item) over ``[t0, t1]`` under the synthetic world's truth.

    Exposure follows the logging policy's candidate mix (popular by popularity; category-affine:
    a category by the user's affinities, then an item of it by popularity; fresh: uniform over
    items published in the last ``fresh_window_days``), among items already published; it is
    multiplied by the click model's probability averaged over the slate's positions.

    Returns:
        ``(len(user_ids), len(item_ids))`` float64.
    """
    from streamrec.data.simulator import UserSimulator

    sim = UserSimulator(data_dir)
    cfg = sim.config
    it = sim.items
    rows = np.searchsorted(it.item_id, item_ids)
    if not np.array_equal(it.item_id[rows], item_ids):
        raise SystemExit("the item table holds items the world does not")
    pop = it.popularity[rows].astype(np.float64)
    prim = it.primary[rows].astype(np.int64)
    pub_s = it.published_us[rows] / 1e6
    aff = np.asarray(sim.user_affinity)[np.asarray(user_ids) - 1].astype(np.float64)  # ids 1..n_users
    mix = np.array([cfg.mix_popular, cfg.mix_affine, cfg.mix_fresh], dtype=np.float64)
    mix /= mix.sum()
    n_cat = aff.shape[1]
    uu = np.repeat(np.asarray(user_ids), item_ids.size)
    ii = np.tile(item_ids, len(user_ids))
    out = np.zeros((len(user_ids), item_ids.size))
    for t in pd.date_range(t0, t1, periods=TIME_STEPS):
        ts = t.timestamp()
        live = pub_s <= ts
        fresh = live & (pub_s > ts - cfg.fresh_window_days * 86400)
        p_pop = np.where(live, pop, 0.0) / pop[live].sum()
        cat_total = np.bincount(prim[live], weights=pop[live], minlength=n_cat)
        p_aff = aff[:, prim] * np.where(live, pop / np.maximum(cat_total[prim], 1e-12), 0.0)
        p_fresh = fresh / max(int(fresh.sum()), 1)
        exposure = mix[0] * p_pop + mix[1] * p_aff + mix[2] * p_fresh
        click = np.zeros(uu.size)
        for pos in range(cfg.slate_size):
            click += sim.pair_click_probabilities(uu, ii, np.full(uu.size, pos), at=t.to_pydatetime())
        out += exposure * (click / cfg.slate_size).reshape(out.shape)
    return out


def top_lists(scores: np.ndarray, exclude: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Per row, the ``n`` best columns (``-inf`` never), ``exclude[row]`` left out."""
    out = []
    for r in range(scores.shape[0]):
        s = scores[r].copy()
        s[exclude[r]] = -np.inf
        order = np.argsort(-s, kind="stable")[:n]
        out.append(order[np.isfinite(s[order])])
    return out


def measure(name: str, data_dir: Path, evaluated: tuple[Any, Any, Any], log: Any) -> dict[str, Any]:
    """The bound's rows for one data set."""
    from bench_covisit import _test_users

    from streamrec.evaluation.metrics import candidate_recall
    from streamrec.features.snapshot import features_as_of
    from streamrec.pipeline.train import _epoch, _user_feature_dict
    from streamrec.retrieval.merge import merge_candidates

    state, fc, funnel = evaluated
    users, truth = _test_users(state, funnel)
    ufeat = features_as_of(fc, "user", state.t_test).set_index("user_id")
    now = _epoch(state.t_test)
    raw_users = funnel.models.users.raw_ids[users]
    ctxs = [funnel.context(int(u), _user_feature_dict(ufeat, int(u)), now=now) for u in raw_users]
    sources = list(funnel.source_names)
    big = max(NS)
    four = [s for s in sources if s != "covisit"]
    settings = funnel.settings
    table = funnel.table
    pub = np.asarray(table.published_at, dtype=np.float64)
    future = pub > now
    targets = truth.indices
    raw = {s: [funnel.retrieve(s, c, big + int(future.sum())) for c in ctxs] for s in sources}
    row: dict[str, Any] = {
        "test_users": int(users.size),
        "targets": int(targets.size),
        "catalogue_items": len(table),
        "items_published_after_cutoff": int(future.sum()),
        "targets_published_after_cutoff": round(float(future[targets].mean()), 4),
    }
    # Two conventions: the lists as the sources return them (what the pipeline's funnel recall
    # measures: items published after the cutoff included), and the catalogue at the cutoff
    # (those items dropped from every list before the cut to N; the targets unchanged).
    conventions = {
        "as_served": {s: [(it[:big], sc[:big]) for it, sc in raw[s]] for s in sources},
        "at_cutoff": {
            s: [(it[~future[it]][:big], sc[~future[it]][:big]) for it, sc in raw[s]] for s in sources
        },
    }
    for convention, lists in conventions.items():
        for n in NS:
            at: dict[str, Any] = {}
            for s in sources:
                at[f"recall_{s}"] = candidate_recall([x[0] for x in lists[s]], truth, n)
            best = max(at[f"recall_{s}"] for s in sources)
            for label, use in (("merged_4", four), ("merged_5", sources)):
                merged = [
                    merge_candidates(
                        {s: (lists[s][i][0][:n], lists[s][i][1][:n]) for s in use},
                        n,
                        settings.agreement_bonus,
                        normalisation=settings.normalisation,
                    ).items
                    for i in range(len(ctxs))
                ]
                at[f"recall_{label}"] = candidate_recall(merged, truth, n)
                union = [np.concatenate([lists[s][i][0][:n] for s in use]) for i in range(len(ctxs))]
                at[f"recall_union_{label[-1]}"] = candidate_recall(union, truth)
            at["best_single"] = best
            at["needed_for_1.18x"] = 1.18 * best
            row.setdefault(convention, {})[f"@{n}"] = at
    lists = conventions["at_cutoff"]
    # The targets the default merge misses at the largest N: how many are new items?
    merged = [
        merge_candidates(
            {s: (lists[s][i][0][:big], lists[s][i][1][:big]) for s in four},
            big,
            settings.agreement_bonus,
            normalisation=settings.normalisation,
        ).items
        for i in range(len(ctxs))
    ]
    age_days = (now - pub) / 86400.0
    recent = (pub > 0) & (age_days < NEW_ARRIVALS_DAYS)
    missed = np.concatenate(
        [
            np.setdiff1d(truth.indices[truth.indptr[i] : truth.indptr[i + 1]], merged[i])
            for i in range(len(ctxs))
        ]
    )
    row[f"missed_by_merged_4@{big}"] = int(missed.size)
    row[f"missed_published_under_{NEW_ARRIVALS_DAYS:g}d_before_or_after"] = round(
        float(recent[missed].mean()), 4
    )
    # Exploratory new-arrivals list: published in the last NEW_ARRIVALS_DAYS, newest first, unseen.
    seen = funnel.models.train
    window = np.flatnonzero((pub > 0) & (age_days >= 0) & (age_days < NEW_ARRIVALS_DAYS))
    window = window[np.argsort(age_days[window], kind="stable")]
    arrivals = []
    for u in users:
        keep = window[~np.isin(window, seen.indices[seen.indptr[u] : seen.indptr[u + 1]])][:big]
        arrivals.append((keep, (-age_days[keep]).astype(np.float32)))
    for n in NS:
        at = row["at_cutoff"][f"@{n}"]
        at["recall_new_arrivals"] = candidate_recall([a[0] for a in arrivals], truth, n)
        for label, use in (
            ("merged_4_plus_new_arrivals", four),
            ("merged_new_arrivals_for_cf", [s for s in four if s != "cf"]),
        ):
            at[f"recall_{label}"] = candidate_recall(
                [
                    merge_candidates(
                        {
                            **{s: (lists[s][i][0][:n], lists[s][i][1][:n]) for s in use},
                            "new_arrivals": (arrivals[i][0][:n], arrivals[i][1][:n]),
                        },
                        n,
                        settings.agreement_bonus,
                        normalisation=settings.normalisation,
                    ).items
                    for i in range(len(ctxs))
                ],
                truth,
                n,
            )
    from streamrec.paths import DataLayout

    if (DataLayout.at(data_dir).truth / "params.json").is_file():  # a synthetic world: its truth
        t0, t1 = state.t_test.to_pydatetime(), state.end.to_pydatetime()
        t_start = time.perf_counter()
        scores = world_scores(data_dir, raw_users, np.asarray(table.item_ids), t0, t1)
        excl = [seen.indices[seen.indptr[u] : seen.indptr[u + 1]] for u in users]
        excl_pub = [np.union1d(e, np.flatnonzero(future)) for e in excl]
        for n in NS:  # each convention against the world model that knows the same items
            row["at_cutoff"][f"@{n}"]["recall_world_model"] = candidate_recall(
                top_lists(scores, excl_pub, n), truth, n
            )
            row["as_served"][f"@{n}"]["recall_world_model"] = candidate_recall(
                top_lists(scores, excl, n), truth, n
            )
        row["world_model_s"] = round(time.perf_counter() - t_start, 1)
    log(json.dumps({name: row}, indent=1))
    return row


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md."""
    lines = [
        "| data | lists | N | best single (source) | merged, 4 / 5 sources | union before the cut, 4 / 5 | "
        "1.18x best single | the world's own model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        for convention in ("at_cutoff", "as_served"):
            for n in NS:
                at = row[convention][f"@{n}"]
                srcs = {
                    k[len("recall_") :]: v
                    for k, v in at.items()
                    if k.startswith("recall_")
                    and not any(w in k for w in ("merged", "union", "world", "new_arrivals"))
                }
                best = max(srcs, key=lambda s: srcs[s])
                world = at.get("recall_world_model")
                lines.append(
                    f"| {name} | {convention.replace('_', ' ')} | {n} | {at['best_single']:.3f} ({best}) | "
                    f"{at['recall_merged_4']:.3f} / {at['recall_merged_5']:.3f} | "
                    f"{at['recall_union_4']:.3f} / {at['recall_union_5']:.3f} | {at['needed_for_1.18x']:.3f} | "
                    f"{'-' if world is None else f'{world:.3f}'} |"
                )
    lines += [
        "",
        "| data | N | new arrivals alone | merged 4 + new arrivals | new arrivals in place of CF | "
        "missed by the merge@300 that are new or unpublished | targets published after the cutoff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        missed = next(v for k, v in row.items() if k.startswith("missed_published_under"))
        for n in NS:
            at = row["at_cutoff"][f"@{n}"]
            lines.append(
                f"| {name} | {n} | {at['recall_new_arrivals']:.3f} | {at['recall_merged_4_plus_new_arrivals']:.3f} | "
                f"{at['recall_merged_new_arrivals_for_cf']:.3f} | {missed:.1%} | "
                f"{row['targets_published_after_cutoff']:.1%} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ml100k", default=os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared/data/ml-100k"))
    )
    p.add_argument("--only", choices=["ml-100k", "synthetic"], default=None)
    p.add_argument("--work-dir", default="/tmp/covisit-bench")
    p.add_argument("--out", default=str(REPO / "bench/results/recall_bound.json"))
    args = p.parse_args()

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    from bench_covisit import _prepare, run_variant

    results: dict[str, Any] = {}
    for name in [n for n in ("ml-100k", "synthetic") if args.only in (None, n)]:
        d = _prepare(name, Path(args.work_dir), args.ml100k)
        run, rec = run_variant(d, True, log)
        assert rec.evaluated is not None
        results[name] = {**measure(name, d, rec.evaluated, log), "pipeline_wall_s": run["wall_s"]}
    previous = Path(args.out)
    if args.only and previous.is_file():  # keep the other data set's results
        results = {**json.loads(previous.read_text()).get("datasets", {}), **results}
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "2-core shared development box, CPU only",
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": "configs/training/default.yaml + retrieval.covisit.enabled; baselines most_popular only",
        "datasets": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(markdown(results))


if __name__ == "__main__":
    main()
