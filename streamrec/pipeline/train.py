"""The training pipeline: one function per step, orchestrated by :func:`run_pipeline`.

Steps (each logged with its duration)::

    load events -> temporal split (T_rank < T_test)
    -> features: build daily snapshots, apply (Feast registry)
    -> retrieval A: fit on events < T_rank     (to mine ranker training rows without leakage)
    -> ranker rows: positives in [T_rank, T_test) + hard negatives from retrieval A candidates,
       features by the feature store's point-in-time join (get_historical_features)
    -> retrieval B: fit on events < T_test     (two-tower on Ray Train, FAISS index, CF, ...)
    -> ranker: DCN-V2 on Ray Train
    -> evaluate at T_test (:mod:`.evaluate`): baselines (tuned on a validation window before
       T_test) and the full funnel (the serving code) side by side, with bootstrap intervals
    -> refit (``refit_on_all``, :mod:`streamrec.pipeline.refit`): the steps from retrieval A on
       again with the test cutoff moved past the last event; that fit is what the bundle serves,
       while the metrics and the gates stay those measured above
    -> rolling evaluation (``evaluation.rolling.folds``, off by default; :mod:`.rolling`): the
       steps from retrieval A on again at earlier cutoffs, pooled over user-windows
    -> bundle -> registry (gates) -> batch fallback (Ray Data) -> write embeddings, materialize

Item indices everywhere are rows of the item feature table; user indices come from the
retrieval models' :class:`~streamrec.evaluation.split.IdMap`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp
import torch

from streamrec.config import record_config, utc_stamp
from streamrec.data.ids import IdMap
from streamrec.data.store import DataStore
from streamrec.errors import TrainingDataError
from streamrec.evaluation.baselines import ALSConfig
from streamrec.features.client import FeatureClient
from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
from streamrec.features.snapshot import features_as_of
from streamrec.funnel.core import Funnel, RetrievalModels
from streamrec.models.scoring import RankerScorer
from streamrec.models.train_loop import RankerData, TwoTowerData
from streamrec.models.two_tower import HISTORY_PAD
from streamrec.paths import DataLayout
from streamrec.pipeline import ray_train
from streamrec.pipeline.config import TrainingConfig
from streamrec.pipeline.snapshots import snapshot_times
from streamrec.ranking.features import (
    DEVICE_INDEX,
    FEATURE_SCHEMA_VERSION,
    SKEW_CATEGORICAL,
    category_pref_matrix,
    user_dense_matrix,
)
from streamrec.retrieval.affinity import AffinitySource
from streamrec.retrieval.cf import CFSource
from streamrec.retrieval.covisit import CovisitSource
from streamrec.retrieval.index import build_index, measure_recall
from streamrec.retrieval.new_arrivals import NewArrivalsSource
from streamrec.retrieval.trending import TrendingConfig, TrendingSource

logger = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass
class PipelineState:
    """What the steps hand each other."""

    data_dir: Path
    cfg: TrainingConfig
    run_id: str
    events: pd.DataFrame = field(default_factory=pd.DataFrame)
    t_rank: pd.Timestamp | None = None
    t_test: pd.Timestamp | None = None
    end: pd.Timestamp | None = None
    timings: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print
    snapshots: list[pd.Timestamp] = field(default_factory=list)  # the feature build's cutoffs


@contextmanager
def _step(state: PipelineState, name: str) -> Iterator[None]:
    state.log(f"[{name}] ...")
    t0 = time.perf_counter()
    yield
    state.timings[name] = round(time.perf_counter() - t0, 2)
    state.log(f"[{name}] done in {state.timings[name]:.1f}s")


def _ts(x: Any) -> pd.Timestamp:
    t = pd.Timestamp(x)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _epoch(x: Any) -> float:
    return float(_ts(x).timestamp())


# --------------------------------------------------------------------------- loading & split
def load_events(state: PipelineState) -> None:
    """Read the validated events and choose the split times."""
    store = DataStore(state.data_dir)
    ev = store.events(columns=["user_id", "item_id", "timestamp", "label", "event_type", "device"])
    if ev.empty:
        raise TrainingDataError(
            f"no events in {state.data_dir}: run `streamrec data synth` or `streamrec data ingest` first"
        )
    ts = ev["timestamp"]
    sp_cfg = state.cfg.split
    t_test = ts.quantile(1 - sp_cfg.test_fraction, interpolation="higher")
    before = ev[ts < t_test]
    if int(before["label"].sum()) < sp_cfg.min_train_events:
        raise TrainingDataError(
            f"the training window (before {t_test}) has {int(before['label'].sum())} positive events, "
            f"fewer than split.min_train_events={sp_cfg.min_train_events}: ingest more history"
        )
    t_rank = ranker_window_start(ev, t_test, sp_cfg.ranker_fraction)
    if not ((ts >= t_test) & (ev["label"] > 0)).any():
        raise TrainingDataError(f"no positive events after the split time {t_test}: nothing to evaluate on")
    state.events, state.t_rank, state.t_test, state.end = ev, t_rank, _ts(t_test), _ts(ts.max())
    state.log(
        f"  {len(ev):,} events, {int(ev['label'].sum()):,} positives; "
        f"ranker window from {state.t_rank}, test from {state.t_test} to {state.end}"
    )


def ranker_window_start(events: pd.DataFrame, cutoff: Any, fraction: float) -> pd.Timestamp:
    """Start of the ranker's label window ``[start, cutoff)`` (``split.ranker_fraction``).

    The window holds the last ``fraction`` of the events before ``cutoff``, by time quantile.
    """
    before = events["timestamp"][events["timestamp"] < cutoff]
    return _ts(before.quantile(1 - fraction, interpolation="higher"))


def refit_cutoff(end: pd.Timestamp) -> pd.Timestamp:
    """The refit's test cutoff (:mod:`.refit`): just past the last event, so every event is before it."""
    return end + pd.Timedelta(microseconds=1)


# --------------------------------------------------------------------------- features
def build_features(state: PipelineState, fc: FeatureClient) -> None:
    """Feature snapshots where the pipeline reads features (:mod:`.snapshots`), then apply.

    At the split times, at the serving snapshot, and at the midnights of event days: the
    ranker's label windows (the evaluated fit's and the refit's) first, then the rest of history.
    """
    assert state.end is not None and state.t_rank is not None and state.t_test is not None
    ts = state.events["timestamp"]
    cutoff = refit_cutoff(state.end)
    t_rank_all = ranker_window_start(state.events, cutoff, state.cfg.split.ranker_fraction)
    windows, points = (
        [(state.t_rank, state.t_test)],
        [state.t_rank, state.t_test, cutoff, state.end.ceil("D")],
    )
    if state.cfg.refit_on_all:  # the refit's label window and split time
        windows.append((t_rank_all, cutoff))
        points.append(t_rank_all)
    times = snapshot_times(ts, windows=windows, points=points)
    report = fc.build(cutoffs=[t.to_pydatetime() for t in times])
    state.snapshots = times
    state.log(f"  {len(times)} feature snapshots from {times[0]} to {times[-1]}, {report.files} files")
    fc.apply()


def item_table_as_of(fc: FeatureClient, as_of: pd.Timestamp) -> ItemFeatureTable:
    """The item table as it would have been served at ``as_of`` (offline evaluation)."""
    items = DataStore(fc.layout.root).items()["item_id"].to_numpy()
    return ItemFeatureTable.from_frame(features_as_of(fc, "item", as_of, items), fc.category_vocab)


def _user_rows(frame: pd.DataFrame, users: npt.ArrayLike) -> pd.DataFrame:
    idx = frame.set_index("user_id")
    return idx.reindex(np.asarray(users, dtype=np.int64))


# --------------------------------------------------------------------------- retrieval
def _history_matrix(recent: pd.Series, table: ItemFeatureTable, length: int) -> I64:
    out = np.full((len(recent), length), HISTORY_PAD, dtype=np.int64)
    for i, r in enumerate(recent):
        if r is not None and len(r):
            rows = table.index_of(np.asarray(r, dtype=np.int64)[:length])
            rows = rows[rows >= 0]
            out[i, : rows.size] = rows
    return out


def positives_with_features(
    state: PipelineState, fc: FeatureClient, start: pd.Timestamp | None = None
) -> pd.DataFrame:
    """Every positive before T_test with its user features by point-in-time join (one Feast call).

    With ``start``, only the positives at or after it (the refit adds those to the ones it has).
    """
    assert state.t_test is not None
    ev = state.events
    keep = (ev["timestamp"] < state.t_test) & (ev["label"] > 0)
    if start is not None:
        keep &= ev["timestamp"] >= start
    pos = ev[keep]
    rows = pos[["user_id", "item_id", "timestamp", "label"]].reset_index(drop=True)
    return fc.training_set(rows, service="ranking")


def fit_retrieval(
    state: PipelineState,
    pit: pd.DataFrame,
    table: ItemFeatureTable,
    cutoff: pd.Timestamp,
    tag: str,
) -> RetrievalModels:
    """Fit the retrieval sources on the positives before ``cutoff``.

    Args:
        state: Pipeline state (events, config).
        pit: Positives with point-in-time user features (:func:`positives_with_features`).
        table: Item table (row = item index).
        cutoff: Only positives before this time are used.
        tag: Run-name suffix.
    """
    cfg = state.cfg
    ev = state.events
    pos = pit[pit["timestamp"] < cutoff].copy()
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

    # Two-tower rows: user features by point-in-time join at each positive's time.
    ts_frame = pos.reset_index(drop=True)
    hist = _history_matrix(ts_frame["recent_item_ids"], table, cfg.retrieval.history_length)
    cats = np.asarray(table.category_matrix().toarray(), dtype=np.float32)
    data = TwoTowerData(
        user_idx=users.to_index(ts_frame["user_id"].to_numpy()),
        user_dense=user_dense_matrix(ts_frame),
        history=hist,
        item_idx=table.index_of(ts_frame["item_id"].to_numpy()),
        item_categories=cats,
        item_dense=np.zeros((n_items, 0), np.float32),
    )
    storage = cfg.storage_path or str(DataLayout.at(state.data_dir).models / "ray_results")
    model, history = ray_train.fit(
        "two_tower",
        cfg.two_tower,
        {
            "n_users": len(users),
            "n_items": n_items,
            "n_categories": cats.shape[1],
            "user_dense_dim": data.user_dense.shape[1],
            "item_dense_dim": 0,
        },
        data,
        cfg.scaling,
        storage,
        f"{state.run_id}-two_tower-{tag}",
    )
    with torch.inference_mode():
        item_vectors = model.encode_items(cats, np.zeros((n_items, 0), np.float32), np.arange(n_items))  # type: ignore[operator]
        queries = model.encode_users(  # type: ignore[operator]
            data.user_idx[: min(2000, len(data))], data.user_dense[:2000], data.history[:2000]
        )
    index = build_index(item_vectors, "ip", calibration_queries=queries)
    recall = measure_recall(index, item_vectors, queries[:500], 50)
    state.log(
        f"  two-tower[{tag}]: loss {history[-1].get('train_loss', float('nan')):.3f}; "
        f"FAISS {index.kind} recall@50 vs exact {recall:.3f}"
    )
    state.timings[f"ann_recall@50_{tag}"] = round(recall, 4)
    r = cfg.retrieval
    cf = CFSource.fit(train, ALSConfig(factors=r.cf_factors, iterations=r.cf_iterations, num_threads=1))
    affinity = AffinitySource(train, table.category_lists())
    seen_ev = ev[ev["timestamp"] < cutoff]
    eng = seen_ev[seen_ev["label"] > 0]
    trending = TrendingSource.from_events(
        n_items,
        table.index_of(eng["item_id"].to_numpy()),
        eng["timestamp"],
        config=TrendingConfig(half_life_hours=r.trending_half_life_hours),
        seen=train,
    )
    covisit = (
        CovisitSource.fit(uidx, pos["item_row"], pos["timestamp"], n_items, r.covisit, seen=train)
        if r.covisit.enabled
        else None
    )
    new_arrivals = (
        NewArrivalsSource(table.published_at, r.new_arrivals, seen=train) if r.new_arrivals.enabled else None
    )
    return RetrievalModels(
        users, train, model, item_vectors, index, cf, affinity, trending, covisit, new_arrivals  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- ranker rows
def _user_feature_dict(frame: pd.DataFrame, user_id: int) -> dict[str, Any]:
    if user_id in frame.index:
        return {k: v for k, v in frame.loc[user_id].items()}
    return {}


def ranker_rows(
    state: PipelineState,
    fc: FeatureClient,
    funnel: Funnel,
    rng: np.random.Generator,
    max_users: int = 5000,
) -> tuple[RankerData, dict[str, float]]:
    """Ranker training rows from retrieval-A candidates in the ranker window.

    Label 1: candidates the user engaged with in ``[T_rank, T_test)``; label 0: sampled other
    candidates. Only candidates are used (what the ranker sees when serving); user and item
    features come from the point-in-time join at each row's time.
    """
    assert state.t_rank is not None and state.t_test is not None
    ev = state.events
    in_window = ev[(ev["timestamp"] >= state.t_rank) & (ev["timestamp"] < state.t_test)]
    win = in_window[in_window["label"] > 0]
    by_user = {u: g for u, g in win.groupby("user_id")}
    from_impressions = state.cfg.ranker_sampling.negatives_from == "impressions"
    shown_by_user = {
        u: g["item_id"].to_numpy() for u, g in in_window[in_window["label"] <= 0].groupby("user_id")
    }
    negatives = negatives_shown = 0
    users = np.array(sorted(by_user))
    if users.size > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    ufeat = features_as_of(fc, "user", state.t_rank).set_index("user_id")
    t_rank_s = _epoch(state.t_rank)
    rows: list[dict[str, Any]] = []
    extra: list[np.ndarray] = []
    k_neg = state.cfg.ranker_sampling.negatives_per_positive
    hit = total = 0
    for u in users:
        g = by_user[u]
        ctx = funnel.context(int(u), _user_feature_dict(ufeat, int(u)), now=t_rank_s)
        parts = {name: funnel.retrieve(name, ctx) for name in funnel.source_names}
        merged, src = funnel.merge(parts)
        if len(merged) == 0:
            continue
        pos_rows = funnel.table.index_of(g["item_id"].to_numpy())
        is_pos = np.isin(merged.items, pos_rows)
        total += int(np.unique(pos_rows[pos_rows >= 0]).size)
        hit += int(is_pos.sum())
        neg_idx = np.flatnonzero(~is_pos)
        n_neg = min(neg_idx.size, k_neg * max(int(is_pos.sum()), 1))
        shown_rows = funnel.table.index_of(shown_by_user.get(u, np.empty(0, np.int64)))
        if from_impressions:  # shown and not engaged first, then the rest
            shown = np.isin(merged.items[neg_idx], shown_rows)
            first, rest = rng.permutation(neg_idx[shown]), rng.permutation(neg_idx[~shown])
            negs = np.concatenate([first, rest])[:n_neg]
        else:
            negs = rng.choice(neg_idx, n_neg, replace=False)
        negatives += negs.size
        negatives_shown += int(np.isin(merged.items[negs], shown_rows).sum())
        chosen = np.concatenate([np.flatnonzero(is_pos), negs])
        if chosen.size == 0:
            continue
        items = merged.items[chosen]
        dense_ctx = funnel.ranker_inputs(ctx, items, src[chosen])[0]
        first_ts = g["timestamp"].to_numpy()
        devices = g["device"].fillna("unknown").to_numpy()
        ts_for = {int(r): (t, d) for r, t, d in zip(pos_rows, first_ts, devices, strict=True)}
        default_ts = (first_ts[0], devices[0])
        for j, it in enumerate(items):
            rows.append(
                {
                    "user_id": int(u),
                    "item_id": int(funnel.table.item_ids[it]),
                    "timestamp": ts_for.get(int(it), default_ts)[0],
                    "_device": DEVICE_INDEX.get(
                        str(ts_for.get(int(it), default_ts)[1]), DEVICE_INDEX["unknown"]
                    ),
                    "label": int(is_pos[chosen[j]]),
                    "_item_row": int(it),
                }
            )
        extra.append(dense_ctx)
    if not rows:
        raise TrainingDataError(
            "no ranker training rows: retrieval returned no candidates in the ranker window"
        )
    frame = pd.DataFrame(rows)
    if frame["label"].nunique() < 2:
        raise TrainingDataError(
            "the ranker window has a single class among retrieval candidates "
            f"({int(frame['label'].sum())} positives of {len(frame)} rows): widen split.ranker_fraction"
        )
    # Point-in-time user and item features for every row (Feast get_historical_features).
    pit = fc.training_set(frame.drop(columns=["_item_row", "_device"]), service="ranking")
    pit = pit.set_index(frame.index) if len(pit) == len(frame) else pit
    cross = np.concatenate(extra)
    feats = funnel.features
    item_dense = np.stack(
        [pd.to_numeric(pit[n], errors="coerce").fillna(0).to_numpy(np.float32) for n in DENSE_FEATURES],
        axis=1,
    )
    item_rows = frame["_item_row"].to_numpy(np.int64)
    now = np.asarray([_epoch(t) for t in frame["timestamp"]], dtype=np.float64)
    # Retrieval-derived cross columns were computed per user at T_rank; reuse them.
    d = feats.layout.dense
    tt = cross[:, d.index("x_two_tower")]
    cf = cross[:, d.index("x_cf")]
    src_cols = cross[:, [d.index(f"x_src_{s}") for s in funnel.source_names]]
    dense, sparse = feats.build(
        user_dense=user_dense_matrix(pit),
        category_prefs=category_pref_matrix(pit["category_prefs"].tolist(), feats.n_categories),
        item_rows=item_rows,
        item_dense=item_dense,
        now=now,
        device=frame["_device"].to_numpy(np.int64),
        two_tower=tt,
        cf=cf,
        source_scores=src_cols,
    )
    stats = {
        "ranker_rows": float(len(frame)),
        "ranker_positive_rate": float(frame["label"].mean()),
        "ranker_window_candidate_recall": hit / max(total, 1),
        "ranker_negatives_shown_share": negatives_shown / max(negatives, 1),
    }
    return RankerData(dense, sparse, frame["label"].to_numpy(np.float32)), stats


def fit_ranker(
    state: PipelineState, models: RetrievalModels, table: ItemFeatureTable, data: RankerData, name: str
) -> tuple[torch.nn.Module, list[dict[str, float]], Any]:
    """DCN-V2 on Ray Train over ``data``: the model, its history and its feature layout.

    The layout is that of a funnel over ``models`` and ``table``, the retrieval models it serves with.
    """
    cfg = state.cfg
    layout = Funnel(models, table, None, cfg.retrieval).features.layout
    storage = cfg.storage_path or str(DataLayout.at(state.data_dir).models / "ray_results")
    ranker, history = ray_train.fit(
        "ranker",
        cfg.ranker,
        {
            "n_dense": data.dense.shape[1],
            "sparse_cardinalities": list(layout.cardinalities),
            "dense_names": list(layout.dense),  # ranker.dense_inputs / sparse_inputs select by name
            "sparse_names": list(layout.sparse),
        },
        data,
        cfg.scaling,
        storage,
        f"{state.run_id}-{name}",
    )
    return ranker, history, layout


# --------------------------------------------------------------------------- bundle & registry
def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _feature_stats(data: RankerData, names: tuple[str, ...]) -> dict[str, Any]:
    from streamrec.registry.manifest import FeatureHistogram, FeatureStats

    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        col = data.dense[:, j].astype(np.float64)
        finite = col[np.isfinite(col)]
        counts, edges = np.histogram(finite, bins=10) if finite.size else (np.zeros(0), np.zeros(1))
        out[name] = FeatureStats(
            count=int(col.size),
            mean=float(finite.mean()) if finite.size else None,
            std=float(finite.std()) if finite.size else None,
            min=float(finite.min()) if finite.size else None,
            max=float(finite.max()) if finite.size else None,
            null_fraction=float(1 - finite.size / max(col.size, 1)),
            histogram=FeatureHistogram(edges=edges.tolist(), counts=[int(c) for c in counts])
            if finite.size
            else None,
        )
    return out


def _categorical_stats(data: RankerData, layout: Any, top: int = 50) -> dict[str, Any]:
    """Counts per value of the ranker's low-cardinality sparse inputs (:data:`SKEW_CATEGORICAL`)."""
    from streamrec.registry.manifest import OTHER_CATEGORY, FeatureStats

    out: dict[str, Any] = {}
    for name in SKEW_CATEGORICAL:
        if name not in layout.sparse:
            continue
        col = data.sparse[:, layout.sparse.index(name)]
        values, counts = np.unique(col, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        kept = {str(int(values[i])): int(counts[i]) for i in order[:top]}
        rest = int(counts[order[top:]].sum())
        out[name] = FeatureStats(
            count=int(col.size),
            null_fraction=0.0,
            categories={**kept, **({OTHER_CATEGORY: rest} if rest else {})},
        )
    return out


def smoke_test(bundle_dir: Path) -> None:
    """Load a bundle and score a smoke batch; raises on any failure (registry gate 1)."""
    from streamrec.bundle import LoadedBundle

    b = LoadedBundle(bundle_dir)
    meta = json.loads((bundle_dir / "ranker" / "model.json").read_text())
    kw = meta.get("kwargs") or meta.get("hparams") or {}
    n_dense = int(kw.get("n_dense", 0))
    cards = list(kw.get("sparse_cardinalities", []))
    dense = np.zeros((8, n_dense), np.float32)
    sparse = np.zeros((8, len(cards)), np.int64)
    scores = b.ranker.score(dense, sparse)
    if scores.shape != (8,) or not np.isfinite(scores).all():
        raise ValueError(f"smoke batch scored {scores!r}: expected 8 finite probabilities")


# --------------------------------------------------------------------------- orchestration
def run_pipeline(
    data_dir: str | Path,
    cfg: TrainingConfig,
    *,
    register: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every step; returns the evaluation and what was registered.

    Raises:
        TrainingDataError: too little data, no positives, nothing to evaluate.
        ModelError: a training job failed.
        RegistryError: the registry is unreachable (nothing registered, champion untouched).
    """
    data_dir = Path(data_dir).resolve()
    run_id = f"train-{utc_stamp()}"
    state = PipelineState(data_dir, cfg, run_id, log=log)
    layout = DataLayout.at(data_dir)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    registry = None
    if register:
        from streamrec.registry.store import ModelRegistry

        registry = ModelRegistry(data_dir=data_dir)  # fail fast if the tracking server is down

    with _step(state, "load"):
        load_events(state)
    assert state.t_rank is not None and state.t_test is not None and state.end is not None
    if cfg.evaluation.rolling.folds:  # a rolling plan that cannot fit fails before any training
        from streamrec.pipeline.rolling import plan_folds

        plan_folds(state.events, state.t_test, cfg.evaluation.rolling, cfg.split)
    fc = FeatureClient(data_dir)
    with _step(state, "features"):
        build_features(state, fc)
    with _step(state, "training_set"):
        pit = positives_with_features(state, fc)
    # The evaluated fit: retrieval A, ranker rows, retrieval B, ranker (the refit and every
    # rolling fold repeat this same sequence with the split times moved).
    from streamrec.pipeline.refit import fit_models_at, fit_record, serve_fit

    evaluated = fit_models_at(state, fc, pit, "", steps="", rng=rng)
    funnel_b = Funnel(
        evaluated.models,
        evaluated.table,
        RankerScorer(evaluated.ranker),  # type: ignore[arg-type]
        cfg.retrieval,
    )
    from streamrec.evaluation.comparison import MethodScores
    from streamrec.pipeline.evaluate import evaluate

    rolling = cfg.evaluation.rolling.folds > 0
    scores: list[MethodScores] = []
    with _step(state, "evaluate"):
        report = evaluate(state, fc, funnel_b, rng, **({"scores_out": scores} if rolling else {}))
    report["training"] = {
        **evaluated.row_stats,
        "ranker_val_auc": float(evaluated.ranker_history[-1].get("val_auc", float("nan"))),
        "ann_recall@50": state.timings.get("ann_recall@50_b"),
    }

    # What serves: the same steps refit on all of history (streamrec.pipeline.refit) unless
    # refit_on_all is off. The metrics above, the manifest's and the gates' stay the held-out fit's.
    served, refit_skipped = serve_fit(state, fc, pit, evaluated)
    fit = fit_record(state, evaluated, served, refit_skipped)
    report["fit"] = fit.model_dump(mode="json")
    if rolling:  # more cutoffs, each fold retrained on what came before it (.rolling); after every
        # read of the main fit and the refit, since it adds older feature snapshots
        from streamrec.pipeline.rolling import rolling_evaluation

        with _step(state, "rolling"):
            report["rolling"] = rolling_evaluation(state, fc, pit, report, scores, funnel_b)

    # Bundle.
    from streamrec.bundle import save_bundle
    from streamrec.registry.manifest import (
        BundleManifest,
        describe_files,
        eval_set_fingerprint,
        write_manifest,
    )

    bundle_dir = layout.models / "bundles" / run_id
    with _step(state, "bundle"):
        files = save_bundle(
            bundle_dir,
            users=served.models.users,
            train=served.models.train,
            two_tower=served.models.two_tower,
            item_vectors=served.models.item_vectors,
            tt_index=served.models.tt_index,
            cf=served.models.cf,
            covisit=served.models.covisit,
            ranker=served.ranker,
            table=served.table,
            settings=cfg.retrieval,
            als_config=served.models.cf.model.config,
            ranker_layout={
                "dense": list(served.layout.dense),
                "sparse": list(served.layout.sparse),
                "cardinalities": list(served.layout.cardinalities),
            },
        )
        full = next(m for m in report["methods"] if m["method"] == "streamrec_full")
        metrics = {k: float(v) for k, v in full.items() if "@" in k and np.isfinite(v)}
        test = state.events[state.events["timestamp"] >= state.t_test]
        created_at = datetime.now(UTC)
        # The served models' newest data: the test cutoff, or the last event after a refit
        # (never after created_at: the data contract tolerates a little clock skew).
        data_cutoff = fit.served.last_event if fit.refit_on_all else state.t_test.to_pydatetime()
        manifest = BundleManifest(
            name=f"streamrec-{run_id}",
            created_at=created_at,
            data_cutoff=min(data_cutoff, created_at),
            git_sha=_git_sha(),
            feature_schema_version=FEATURE_SCHEMA_VERSION,
            feature_names=list(served.layout.dense) + list(served.layout.sparse),
            files=describe_files(bundle_dir, files),
            metrics=metrics,
            eval_set_id=eval_set_fingerprint(
                test["user_id"].to_numpy(),
                test["item_id"].to_numpy(),
                int(test["label"].sum()),
                cfg.evaluation.ks,
            ),
            feature_stats={
                **_feature_stats(served.rdata, served.layout.dense),
                **_categorical_stats(served.rdata, served.layout),
            },
            config=cfg.model_dump(mode="json"),
            fit=fit,
        )
        write_manifest(bundle_dir, manifest)
    record_config(bundle_dir, "training", cfg)
    report["bundle"] = str(bundle_dir)
    report["timings_s"] = state.timings

    if registry is not None:
        with _step(state, "register"):
            info = registry.register(bundle_dir, run_name=run_id)
            report["registered_version"] = info.version
            if cfg.gates.promote:
                from streamrec.errors import PromotionRefusedError

                try:
                    decision = registry.promote(
                        info.version,
                        tolerance=cfg.gates.tolerance,
                        primary_metric=cfg.gates.primary_metric,
                        smoke_test=smoke_test,
                    )
                    report["promotion"] = {"promoted": True, "message": decision.message}
                except PromotionRefusedError as err:
                    report["promotion"] = {"promoted": False, "reason": str(err)}
                    log(f"  promotion refused: {err}")
        version = f"v{report['registered_version']}"
    else:
        version = run_id

    with _step(state, "fallback"):
        known = served.models.users.raw_ids
        from streamrec.pipeline.batch import precompute_fallback  # imports this module

        fb = precompute_fallback(data_dir, bundle_dir, version, known, cfg.fallback_top_n, state.end)
        report["fallback"] = str(fb)
    with _step(state, "materialize"):
        fc.write_embeddings("item", served.table.item_ids, served.models.item_vectors)
        fc.materialize(state.end.to_pydatetime() + timedelta(seconds=1))
    report["timings_s"] = state.timings
    (bundle_dir / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
    return report
