"""The offline evaluation at the test cutoff: baselines and the serving funnel side by side.

:func:`evaluate` is the pipeline's ``evaluate`` step (:func:`~streamrec.pipeline.train.run_pipeline`):
the baselines, tuned on a validation window cut from the training period, and the full funnel
(the serving code) score the same test users; every per-user metric gets a bootstrap interval
over those users, and the paired difference StreamRec minus the best baseline is reported with
its own interval. The retrieval funnel is measured stage by stage on the same users.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from streamrec.errors import TrainingDataError
from streamrec.evaluation.comparison import (
    MethodScores,
    add_intervals,
    paired_vs_best,
    run_baselines,
    score_ranking,
)
from streamrec.evaluation.metrics import candidate_recall
from streamrec.features.client import FeatureClient
from streamrec.features.snapshot import features_as_of
from streamrec.funnel.core import Funnel
from streamrec.funnel.offline import recommend_offline
from streamrec.funnel.recommender import RecommenderStages
from streamrec.pipeline.train import PipelineState, _epoch, _user_feature_dict
from streamrec.retrieval.merge import merge_candidates

I64 = npt.NDArray[np.int64]

#: StreamRec's methods, paired against the best baseline (every other method is a baseline).
CHALLENGERS = ("streamrec_ranked", "streamrec_full")


def _pad(rows: list[I64], k: int) -> I64:
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : min(k, r.size)] = r[:k]
    return out


def test_truth(state: PipelineState, funnel: Funnel) -> tuple[I64, sp.csr_matrix]:
    """The test window's new positives: ``(users with at least one, truth matrix)``.

    Args:
        state: Pipeline state (events and the test cutoff).
        funnel: The evaluated funnel (its user index, item rows and training matrix).

    Returns:
        The user rows with a positive after ``T_test`` on an item they did not have in training,
        and the binary ``(users, items)`` truth over all users (items seen in training removed).
    """
    assert state.t_test is not None
    m = funnel.models
    ev = state.events
    test = ev[(ev["timestamp"] >= state.t_test) & (ev["label"] > 0)]
    uidx = m.users.to_index(test["user_id"].to_numpy())
    irow = funnel.table.index_of(test["item_id"].to_numpy())
    ok = (uidx >= 0) & (irow >= 0)
    truth = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (uidx[ok], irow[ok])), shape=m.train.shape)
    truth.sum_duplicates()
    truth.data[:] = 1.0
    truth = sp.csr_matrix(truth - truth.multiply(m.train))  # items seen in training are not test targets
    truth.eliminate_zeros()
    return np.flatnonzero(np.diff(truth.indptr) > 0), truth


def evaluate(
    state: PipelineState,
    fc: FeatureClient,
    funnel: Funnel,
    rng: np.random.Generator,
    *,
    scores_out: list[MethodScores] | None = None,
) -> dict[str, Any]:
    """Baselines and the full funnel on the test window, side by side, plus the funnel by stage.

    The baselines' hyper-parameters are chosen on a validation window cut from the end of the
    training period (never the test window) and refit on the whole of it; every per-user metric
    gets a bootstrap interval over the test users, and ``summary["paired_vs_best_baseline"]``
    holds StreamRec minus the best baseline, user by user, with its interval. The tuning record
    (validation window, grid scores, chosen parameters, skipped baselines) is ``baselines``.

    With ``scores_out``, every method's :class:`~streamrec.evaluation.comparison.MethodScores`
    (its per-user values) is appended to it: the rolling evaluation pools them over folds.
    """
    assert state.t_test is not None
    cfg = state.cfg.evaluation
    m = funnel.models
    ev = state.events
    users, truth = test_truth(state, funnel)
    if users.size == 0:
        raise TrainingDataError("no test user has a new positive item after the split: nothing to evaluate")
    if cfg.max_users and users.size > cfg.max_users:
        users = np.sort(rng.choice(users, cfg.max_users, replace=False))
    ks = sorted(set(cfg.ks))
    kmax = max(ks)
    sub_truth = truth[users]
    n_items = truth.shape[1]

    # Baselines on the same training matrix, the same users, the same truth; hyper-parameters
    # chosen on a validation window cut from the end of the training period (events < T_test).
    tuning = cfg.tuning
    threads = {"num_threads": cfg.baseline_threads}
    baseline_scores, baseline_report = run_baselines(
        [str(name) for name in cfg.baselines],
        m.train,
        users,
        sub_truth,
        ks,
        events=ev if tuning.enabled else None,
        test_cutoff=state.t_test,
        grids={str(name): grid for name, grid in tuning.grids.items()},
        validation_fraction=tuning.validation_fraction,
        metric=tuning.metric,
        max_validation_users=tuning.max_users,
        seed=state.cfg.seed,
        fixed={"als": threads, "bpr": threads, "ease": {"max_items": cfg.ease_max_items}},
        log=state.log,
    )
    baselines = [s.row for s in baseline_scores]

    # The serving funnel (same stages, same orchestration) for every test user, features as of T_test.
    ufeat = features_as_of(fc, "user", state.t_test).set_index("user_id")
    raw_users = m.users.raw_ids[users]
    t0 = time.perf_counter()
    answers = recommend_offline(
        RecommenderStages(funnel, None, "evaluation"),
        raw_users,
        lambda u: _user_feature_dict(ufeat, u),
        k=kmax,
        now=_epoch(state.t_test),
    )
    t_funnel = time.perf_counter() - t0
    full = [a.served for a in answers if a.served is not None]
    no_rerank = [a.unranked_top(kmax).items for a in answers]
    # Funnel measurement: every source and the merge at the same candidate count.
    per_source: dict[str, list[I64]] = {s: [] for s in funnel.source_names}
    merged_at: dict[int, list[I64]] = {n: [] for n in cfg.candidate_counts}
    n_big = max(cfg.candidate_counts)
    for a in answers:
        ctx = a.context.state
        big = {name: funnel.retrieve(name, ctx, n_big) for name in funnel.source_names}
        for name in funnel.source_names:
            per_source[name].append(big[name][0])
        for n in cfg.candidate_counts:
            cut = {name: (it[:n], sc[:n]) for name, (it, sc) in big.items()}
            merged_at[n].append(
                merge_candidates(
                    cut, n, funnel.settings.agreement_bonus, normalisation=funnel.settings.normalisation
                ).items
            )
    ms_per_user = 1000 * t_funnel / max(len(raw_users), 1)

    after = {"recommend_ms_per_user": ms_per_user}
    scores = [
        *baseline_scores,
        score_ranking("streamrec_ranked", _pad(no_rerank, kmax), sub_truth, ks, n_items, after=after),
        score_ranking("streamrec_full", _pad(full, kmax), sub_truth, ks, n_items, after=after),
    ]
    iv = cfg.intervals
    interval_args: dict[str, Any] = {
        "confidence": iv.confidence,
        "n_resamples": iv.n_resamples,
        "seed": state.cfg.seed,
        "method": iv.method,
    }
    add_intervals(scores, **interval_args)
    methods = [s.row for s in scores]
    funnel_rows: list[dict[str, Any]] = []
    for n in cfg.candidate_counts:
        row: dict[str, Any] = {"candidates": n}
        for name in funnel.source_names:
            row[f"recall_{name}"] = candidate_recall(per_source[name], sub_truth, n)
        row["recall_merged"] = candidate_recall(merged_at[n], sub_truth, n)
        best = max(row[f"recall_{s}"] for s in funnel.source_names)
        row["merged_vs_best_single"] = row["recall_merged"] / best if best > 0 else float("nan")
        funnel_rows.append(row)
    best_baseline = max(baselines, key=lambda r: r.get("ndcg@10", 0.0)) if baselines else None
    full_ndcg = methods[-1].get("ndcg@10", float("nan"))
    summary = {
        "n_users": int(users.size),
        "best_baseline": best_baseline["method"] if best_baseline else None,
        "ndcg@10_vs_best_baseline": (full_ndcg / best_baseline["ndcg@10"])
        if best_baseline and best_baseline.get("ndcg@10")
        else float("nan"),
        "intervals": {"over": "test users", **interval_args},
        "paired_vs_best_baseline": paired_vs_best(
            scores, CHALLENGERS, [b["method"] for b in baselines], **interval_args
        ),
    }
    if scores_out is not None:
        scores_out.extend(scores)
    return {"methods": methods, "funnel": funnel_rows, "summary": summary, "baselines": baseline_report}
