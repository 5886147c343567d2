"""Ranker levers side by side under the synthetic world's click model (issue 16).

Runs the training pipeline's steps in this process up to the ranker (features, retrieval A,
ranker rows, retrieval B) once, then trains one ranker per variant on the same retrieval models
and scores each at the test cutoff: the expected CTR (ground-truth click model) of the top 20 of
the merged candidates in the ranker's order and of the served (re-ranked) slate, the Spearman
correlation of ranker scores and true click probabilities, and NDCG@10 on the test window's new
positives (a cheap offline proxy: the same users, no baselines). Reference rows (``cand_oracle*``):
a random and an oracle order of the same candidates, the oracle order without the latent match
term, orders by the true freshness, popularity or category affinity alone, by the user's
category shares of logged impressions or clicks, and by each of the ranker's own ``x_*`` inputs
alone (``feature_*``, first variant only, with each input's Spearman correlation ``rho_*``).

Variants (:data:`VARIANTS`): rows ``candidates`` / ``impressions`` are the pipeline's
``ranker_rows`` with that ``negatives_from``; ``ctr_cand`` / ``ctr_all`` are every impression of
the ranker window (of a merged candidate / of any item) labelled by click; then columns zeroed in
training and serving (``zero``, ``keep``), the sparse fields read as unknown (``item_id``,
``no_sparse``), ranker or sampling overrides, or a logistic regression instead of the DCN
(``linear``). The base ranker reads every input (``dense_inputs``/``sparse_inputs`` unset),
whatever the training config's default, so that a variant says what it drops.

    .venv/bin/python bench/bench_ranker_levers.py --data-dir D [--config C] [--variants a,b]
        [--users 400] [--reuse-features] [--out F]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamrec.models.train_loop import RankerData  # noqa: E402

F32 = npt.NDArray[np.float32]


@dataclass
class Variant:
    """One ranker variant: how rows are built, which dense columns are zeroed, config overrides."""

    rows: str
    zero: tuple[str, ...] = ()
    ranker: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    item_id: bool = True
    no_sparse: bool = False
    keep: tuple[str, ...] | None = None  # zero every other dense column
    linear: tuple[str, ...] | None = None  # a logistic regression on these dense columns instead


USER_ACTIVITY = ("events_30d", "active_days_30d", "distinct_items_30d", "days_since_last_event")

PREF3 = ("x_category_pref", "x_log_age_days", "popularity")

VARIANTS: dict[str, Variant] = {
    "candidates": Variant("candidates"),
    "impressions": Variant("impressions"),
    "ctr_cand": Variant("ctr_cand"),
    "ctr_all": Variant("ctr_all"),
    "ctr_cand_noact": Variant("ctr_cand", zero=USER_ACTIVITY),
    "ctr_cand_notrend": Variant("ctr_cand", zero=("trending_score",)),
    "candidates_noact": Variant("candidates", zero=USER_ACTIVITY),
    "candidates_notrend": Variant("candidates", zero=("trending_score",)),
    "impressions_noact": Variant("impressions", zero=USER_ACTIVITY),
    "impressions_n4": Variant("impressions", sampling={"negatives_per_positive": 4}),
    "impressions_n16": Variant("impressions", sampling={"negatives_per_positive": 16}),
    "impressions_e10": Variant("impressions", ranker={"epochs": 10}),
    "impressions_e2": Variant("impressions", ranker={"epochs": 2}),
    "impressions_s1": Variant("impressions", ranker={"seed": 1}),
    "impressions_s2": Variant("impressions", ranker={"seed": 2}),
    "candidates_s1": Variant("candidates", ranker={"seed": 1}),
    "candidates_s2": Variant("candidates", ranker={"seed": 2}),
    "impressions_noid": Variant("impressions", item_id=False),
    "candidates_noid": Variant("candidates", item_id=False),
    "impressions_do3": Variant("impressions", ranker={"dropout": 0.3}),
    "impressions_small": Variant(
        "impressions", ranker={"deep_hidden": [32], "n_cross_layers": 1, "embedding_dim": 4}
    ),
    "impressions_wd": Variant("impressions", ranker={"weight_decay": 0.05}),
    "ctr_cand_small": Variant(
        "ctr_cand", ranker={"deep_hidden": [32], "n_cross_layers": 1, "embedding_dim": 4}
    ),
    "impressions_lr": Variant("impressions", linear=("x_category_pref", "x_log_age_days", "popularity")),
    "candidates_lr": Variant("candidates", linear=("x_category_pref", "x_log_age_days", "popularity")),
    "ctr_cand_lr": Variant("ctr_cand", linear=("x_category_pref", "x_log_age_days", "popularity")),
    "impressions_lr_all": Variant("impressions", linear=()),
    "impressions_dcn3": Variant("impressions", keep=PREF3, no_sparse=True),
    "ctr_cand_dcn3": Variant("ctr_cand", keep=PREF3, no_sparse=True),
    "candidates_dcn3": Variant("candidates", keep=PREF3, no_sparse=True),
    "impressions_dcn3_sparse": Variant("impressions", keep=PREF3),
    "impressions_nosparse": Variant("impressions", no_sparse=True),
    "candidates_nosparse": Variant("candidates", no_sparse=True),
    "impressions_nosparse_s1": Variant("impressions", no_sparse=True, ranker={"seed": 1}),
    "impressions_nosparse_s2": Variant("impressions", no_sparse=True, ranker={"seed": 2}),
    "impressions_dcn_pref": Variant(
        "impressions",
        keep=(
            *PREF3,
            "x_two_tower",
            "x_cf",
            "x_src_two_tower",
            "x_src_cf",
            "x_src_affinity",
            "x_src_trending",
            "x_src_covisit",
            "x_n_sources",
        ),
        no_sparse=True,
    ),  # fmt: skip
    "impressions_lr5": Variant("impressions", linear=(*PREF3, "x_two_tower", "item_ctr_7d")),
    "impressions_lr4": Variant("impressions", linear=(*PREF3, "x_src_affinity")),
    "candidates_small": Variant(
        "candidates", ranker={"deep_hidden": [32], "n_cross_layers": 1, "embedding_dim": 4}
    ),
}


class Linear:
    """A logistic regression on some standardised dense columns (all when none are named)."""

    def __init__(self, data: RankerData, cols: list[int]) -> None:
        from sklearn.linear_model import LogisticRegression

        self.cols = cols or list(range(data.dense.shape[1]))
        x = data.dense[:, self.cols].astype(np.float64)
        self.mean, self.std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        self.model = LogisticRegression(max_iter=1000).fit((x - self.mean) / self.std, data.labels)

    def score(self, dense: F32, sparse: npt.NDArray[np.int64]) -> F32:
        """Decision values."""
        x = (dense[:, self.cols].astype(np.float64) - self.mean) / self.std
        return np.asarray(self.model.decision_function(x), dtype=np.float32)


class Masked:
    """A scorer that zeroes some dense columns before scoring (as its training rows were).

    Items published after ``now`` (the offline item table holds the whole catalogue) get the
    lowest score: a live catalogue would not hold them yet.
    """

    def __init__(
        self,
        scorer: Any,
        cols: list[int],
        published_at: npt.NDArray[np.int64],
        now: float,
        item_id: bool = True,
    ) -> None:
        self.scorer, self.cols, self.future, self.item_id = scorer, cols, published_at > now, item_id
        self.no_sparse = False

    def score(self, dense: F32, sparse: npt.NDArray[np.int64]) -> F32:
        """Scores with the masked columns set to 0; unpublished items last."""
        if self.cols:
            dense = dense.copy()
            dense[:, self.cols] = 0.0
        ids = sparse
        if not self.item_id or self.no_sparse:
            ids = sparse.copy()
            ids[:, slice(None) if self.no_sparse else 0] = -1
        out: F32 = np.array(self.scorer.score(dense, ids), dtype=np.float32)
        rows = sparse[:, 0]
        known = rows < self.future.size
        out[np.flatnonzero(known)[self.future[rows[known]]]] = -1e9
        return out


def main() -> None:  # noqa: PLR0915
    import pandas as pd
    import scipy.sparse as sp
    import torch
    from scipy.stats import spearmanr

    from streamrec.data.click_model import pair_terms
    from streamrec.data.simulator import UserSimulator
    from streamrec.evaluation.metrics import ndcg_at_k
    from streamrec.features.client import FeatureClient
    from streamrec.features.item_table import DENSE_FEATURES
    from streamrec.features.snapshot import features_as_of
    from streamrec.funnel.core import Funnel
    from streamrec.funnel.offline import recommend_offline
    from streamrec.funnel.recommender import RecommenderStages
    from streamrec.models.scoring import RankerScorer
    from streamrec.pipeline import train as tr
    from streamrec.pipeline.config import load_training_config
    from streamrec.ranking.features import DEVICE_INDEX, category_pref_matrix, user_dense_matrix

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--reuse-features", action="store_true", help="skip the feature build (already built)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ranker_levers.json")
    a = ap.parse_args()
    cfg = load_training_config(a.config)
    cfg = cfg.model_copy(
        update={
            "scaling": cfg.scaling.model_copy(update={"use_ray": False}),
            "ranker": cfg.ranker.model_copy(update={"dense_inputs": None, "sparse_inputs": None}),
        }
    )
    state = tr.PipelineState(a.data_dir.resolve(), cfg, f"levers-{int(time.time())}")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tr.load_events(state)
    assert state.t_rank is not None and state.t_test is not None
    fc = FeatureClient(state.data_dir)
    if not a.reuse_features:
        tr.build_features(state, fc)
    pit = tr.positives_with_features(state, fc)
    table_rank = tr.item_table_as_of(fc, state.t_rank)
    models_a = tr.fit_retrieval(state, pit, table_rank, state.t_rank, "a")
    funnel_a = Funnel(models_a, table_rank, None, cfg.retrieval)
    table_test = tr.item_table_as_of(fc, state.t_test)
    models_b = tr.fit_retrieval(state, pit, table_test, state.t_test, "b")
    print(f"retrieval fits: {time.perf_counter() - t0:.0f}s", flush=True)

    # ---------------------------------------------------------------- evaluation users and truth
    sim = UserSimulator(state.data_dir)
    at = state.t_test.to_pydatetime()
    now = tr._epoch(state.t_test)
    ev = state.events
    test = ev[(ev["timestamp"] >= state.t_test) & (ev["label"] > 0)]
    m = models_b
    ids = table_test.item_ids
    uidx = m.users.to_index(test["user_id"].to_numpy())
    irow = table_test.index_of(test["item_id"].to_numpy())
    ok = (uidx >= 0) & (irow >= 0)
    truth = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (uidx[ok], irow[ok])), shape=m.train.shape)
    truth.data[:] = 1.0
    truth = sp.csr_matrix(truth - truth.multiply(m.train))
    truth.eliminate_zeros()
    cand_users = np.flatnonzero(np.diff(truth.indptr) > 0)
    eval_idx = np.sort(
        np.random.default_rng(0).choice(cand_users, min(a.users, cand_users.size), replace=False)
    )
    eval_users = m.users.raw_ids[eval_idx]
    ufeat = features_as_of(fc, "user", state.t_test).set_index("user_id")
    p = sim.params

    def rows_for(mode: str, sampling: dict[str, Any]) -> tuple[RankerData, dict[str, float]]:
        if mode in ("candidates", "impressions"):
            state.cfg = cfg.model_copy(
                update={
                    "ranker_sampling": cfg.ranker_sampling.model_copy(
                        update={"negatives_from": mode, **sampling}
                    )
                }
            )
            try:
                return tr.ranker_rows(state, fc, funnel_a, np.random.default_rng(cfg.seed))
            finally:
                state.cfg = cfg
        return ctr_rows(mode)

    def ctr_rows(mode: str) -> tuple[RankerData, dict[str, float]]:
        """Every impression in the ranker window (of a candidate, or of any item), label = click."""
        assert state.t_rank is not None and state.t_test is not None
        win = ev[(ev["timestamp"] >= state.t_rank) & (ev["timestamp"] < state.t_test)]
        ufeat_r = features_as_of(fc, "user", state.t_rank).set_index("user_id")
        t_rank_s = tr._epoch(state.t_rank)
        frames, extra = [], []
        for u, g in win.groupby("user_id"):
            ctx = funnel_a.context(int(u), tr._user_feature_dict(ufeat_r, int(u)), now=t_rank_s)
            parts = {name: funnel_a.retrieve(name, ctx) for name in funnel_a.source_names}
            merged, src = funnel_a.merge(parts)
            rows = funnel_a.table.index_of(g["item_id"].to_numpy())
            keep = rows >= 0
            pos_in = np.full(rows.size, -1, np.int64)
            if len(merged):
                lookup = {int(it): j for j, it in enumerate(merged.items)}
                pos_in = np.array([lookup.get(int(r), -1) for r in rows], np.int64)
            if mode == "ctr_cand":
                keep &= pos_in >= 0
            if not keep.any():
                continue
            gg = g[keep]
            r = rows[keep]
            s_rows = np.zeros(
                (r.size, src.shape[1] if len(merged) else len(funnel_a.source_names)), np.float32
            )
            hit = pos_in[keep] >= 0
            if hit.any():
                s_rows[hit] = src[pos_in[keep][hit]]
            extra.append(funnel_a.ranker_inputs(ctx, r, s_rows)[0])
            frames.append(
                pd.DataFrame(
                    {
                        "user_id": int(u),
                        "item_id": gg["item_id"].to_numpy(),
                        "timestamp": gg["timestamp"].to_numpy(),
                        "_device": [
                            DEVICE_INDEX.get(str(d), DEVICE_INDEX["unknown"])
                            for d in gg["device"].fillna("unknown")
                        ],
                        "label": (gg["label"].to_numpy() > 0).astype(np.int64),
                        "_item_row": r,
                    }
                )
            )
        frame = pd.concat(frames, ignore_index=True)
        pit_r = fc.training_set(frame.drop(columns=["_item_row", "_device"]), service="ranking")
        pit_r = pit_r.set_index(frame.index) if len(pit_r) == len(frame) else pit_r
        cross = np.concatenate(extra)
        feats = funnel_a.features
        item_dense = np.stack(
            [pd.to_numeric(pit_r[n], errors="coerce").fillna(0).to_numpy(np.float32) for n in DENSE_FEATURES],
            axis=1,
        )
        d = feats.layout.dense
        dense, sparse_ = feats.build(
            user_dense=user_dense_matrix(pit_r),
            category_prefs=category_pref_matrix(pit_r["category_prefs"].tolist(), feats.n_categories),
            item_rows=frame["_item_row"].to_numpy(np.int64),
            item_dense=item_dense,
            now=np.asarray([tr._epoch(t) for t in frame["timestamp"]], dtype=np.float64),
            device=frame["_device"].to_numpy(np.int64),
            two_tower=cross[:, d.index("x_two_tower")],
            cf=cross[:, d.index("x_cf")],
            source_scores=cross[:, [d.index(f"x_src_{s}") for s in funnel_a.source_names]],
        )
        stats = {"ranker_rows": float(len(frame)), "ranker_positive_rate": float(frame["label"].mean())}
        return RankerData(dense, sparse_, frame["label"].to_numpy(np.float32)), stats

    def age_of(rows: np.ndarray) -> np.ndarray:
        return np.asarray((now - table_test.published_at[rows]) / 86400.0, np.float64)

    def cat_of(user: int, rows: np.ndarray) -> np.ndarray:
        ur = sim._rows(np.full(rows.size, user), sim.n_users, "user")
        it = sim.items
        return pair_terms(np.asarray(sim.user_latent[ur]), np.asarray(sim.user_affinity[ur]), np.arange(rows.size),
                          it.latent, it.primary, it.secondary, ids[rows] - 1)[1]  # fmt: skip

    # Category shares of each evaluation user's logged events before the cutoff: of every impression
    # (what the logging policy showed them) and of the clicks only.
    item_cats = Funnel(models_b, table_test, None, cfg.retrieval).features.item_categories
    before = ev[ev["timestamp"] < state.t_test]
    b_rows = table_test.index_of(before["item_id"].to_numpy())
    b_users = before["user_id"].to_numpy()
    b_label = before["label"].to_numpy() > 0
    share: dict[str, dict[int, np.ndarray]] = {"impressions": {}, "clicks": {}}
    for u in eval_users:
        mine = (b_users == u) & (b_rows >= 0)
        for kind, sel in (("impressions", mine), ("clicks", mine & b_label)):
            v = np.asarray(item_cats[b_rows[sel]].sum(axis=0)).ravel()
            share[kind][int(u)] = v / max(v.sum(), 1e-9)

    def evaluate(funnel: Funnel, name: str, want_features: bool) -> dict[str, float]:
        answers = recommend_offline(
            RecommenderStages(funnel, None, name),
            eval_users,
            lambda u: tr._user_feature_dict(ufeat, u),
            k=a.k,
            now=now,
        )
        k = a.k

        def ctr(user: int, rows: np.ndarray) -> float:
            return float(sim.click_probabilities(int(user), ids[rows], at=at).mean())

        served, ranked, cand, rnd, orc, nodot, rho = [], [], [], [], [], [], []
        refs: dict[str, list[float]] = {}
        ages: list[tuple[float, float]] = []
        feat_rho: dict[str, list[float]] = {}
        top10 = np.full((len(answers), 10), -1, np.int64)
        for i, x in enumerate(answers):
            assert x.served is not None
            served.append(ctr(x.user_id, x.served[:k]))
            top10[i, : min(10, x.served.size)] = x.served[:10]
            ranked.append(ctr(x.user_id, x.unranked_top(k).items))
            merged = funnel.merge({s: (c.items, c.scores) for s, c in x.parts.items()})
            mc, msrc = merged
            items = mc.items
            live = table_test.published_at[items] <= now
            items, msrc = items[live], msrc[live]
            if items.size < k:
                continue
            sc = funnel.score_with_inputs([x.context.state], [items], [msrc])[0][0]
            pr = sim.click_probabilities(
                int(x.user_id), ids[items], positions=np.zeros(items.size, np.int64), at=at
            )
            uu = np.full(items.size, int(x.user_id) - 0)
            _, dot = sim._score(sim._rows(uu, sim.n_users, "user"), sim._rows(ids[items], sim.n_items, "item"),
                                np.zeros(items.size, np.int64), at)  # fmt: skip
            with np.errstate(divide="ignore"):
                logit_nodot = np.log(pr / (1 - pr)) - p.w_aff * dot
            for kind, sh in share.items():
                key_s = np.asarray(item_cats[items] @ sh[int(x.user_id)]).ravel()
                refs.setdefault(f"{kind}_category_share", []).append(
                    ctr(x.user_id, items[np.argsort(-key_s)[:k]])
                )
            for ref, key in (
                ("fresh", -age_of(items)),
                ("pop", sim._log_pop[ids[items] - 1]),
                ("cat", cat_of(x.user_id, items)),
            ):
                refs.setdefault(ref, []).append(ctr(x.user_id, items[np.argsort(-key)[:k]]))
            top = items[np.argsort(-sc)[:k]]
            ages.append((np.median(age_of(top)), np.median(age_of(items[np.argsort(-pr)[:k]]))))
            if want_features:
                dense_in = funnel.ranker_inputs(x.context.state, items, msrc)[0]
                for j, nm in enumerate(dense_names):
                    col = dense_in[:, j]
                    if np.ptp(col) > 0:
                        feat_rho.setdefault(nm, []).append(spearmanr(col, pr).statistic)
                    if nm.startswith("x_"):
                        sign = -1.0 if nm == "x_log_age_days" else 1.0
                        top_f = items[np.argsort(-sign * col, kind="stable")[:k]]
                        refs.setdefault(f"feature_{nm}", []).append(ctr(x.user_id, top_f))
            cand.append(ctr(x.user_id, items[np.argsort(-sc)[:k]]))
            orc.append(ctr(x.user_id, items[np.argsort(-pr)[:k]]))
            nodot.append(ctr(x.user_id, items[np.argsort(-logit_nodot)[:k]]))
            rnd.append(ctr(x.user_id, rng.choice(items, k, replace=False)))
            rho.append(spearmanr(sc, pr).statistic)
        return {
            "served": float(np.mean(served)),
            "ranker_order": float(np.mean(ranked)),
            "cand_ranker": float(np.mean(cand)),
            "cand_random": float(np.mean(rnd)),
            "cand_oracle": float(np.mean(orc)),
            "cand_oracle_without_latent": float(np.mean(nodot)),
            "spearman_median": float(np.nanmedian(rho)),
            "ndcg@10_proxy": float(ndcg_at_k(top10, truth[eval_idx], 10)),
            **{f"cand_oracle_{r}_only": float(np.mean(v)) for r, v in refs.items()},
            "median_age_days_top_ranker": float(np.mean([x[0] for x in ages])),
            "median_age_days_top_oracle": float(np.mean([x[1] for x in ages])),
            **{f"rho_{nm}": float(np.nanmedian(v)) for nm, v in feat_rho.items()},
        }

    cache: dict[str, tuple[RankerData, dict[str, float]]] = {}
    results: dict[str, Any] = {}
    dense_names = Funnel(models_b, table_test, None, cfg.retrieval).features.layout.dense
    for name in a.variants.split(","):
        var = VARIANTS[name]
        t1 = time.perf_counter()
        key = json.dumps([var.rows, var.sampling], sort_keys=True)
        if key not in cache:
            cache[key] = rows_for(var.rows, var.sampling or {})
        data, stats = cache[key]
        zero = var.zero if var.keep is None else tuple(c for c in dense_names if c not in var.keep)
        cols = [dense_names.index(c) for c in zero if c in dense_names]
        if cols:
            dense = data.dense.copy()
            dense[:, cols] = 0.0
            data = RankerData(dense, data.sparse, data.labels)
        if not var.item_id or var.no_sparse:
            sparse_ = data.sparse.copy()
            sparse_[:, slice(None) if var.no_sparse else 0] = -1
            data = RankerData(data.dense, sparse_, data.labels)
        if var.ranker:
            state.cfg = cfg.model_copy(update={"ranker": cfg.ranker.model_copy(update=var.ranker)})
        if var.linear is not None:
            scorer: Any = Linear(data, [dense_names.index(c) for c in var.linear])
            hist: list[dict[str, float]] = [{}]
        else:
            ranker, hist, _ = tr.fit_ranker(state, models_b, table_test, data, name)
            scorer = RankerScorer(ranker)  # type: ignore[arg-type]
        state.cfg = cfg
        masked = Masked(scorer, cols, table_test.published_at, now, var.item_id)
        masked.no_sparse = var.no_sparse
        funnel = Funnel(models_b, table_test, masked, cfg.retrieval)  # type: ignore[arg-type]
        res = evaluate(funnel, name, not results)
        res |= {"val_auc": float(hist[-1].get("val_auc", float("nan"))), **stats}
        res["seconds"] = round(time.perf_counter() - t1, 1)
        results[name] = res
        print(name, json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)
    out = {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data_dir": str(a.data_dir), "k": a.k,
           "users": int(eval_users.size), "t_test": str(state.t_test), "variants": results}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
