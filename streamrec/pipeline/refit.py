"""Refit on all of history: the models that serve have seen the newest events.

The pipeline evaluates a model set fit before the test cutoff ``T_test`` (the *evaluated* fit);
its numbers are the report's metrics, the manifest's ``metrics`` and what the registry's gates
compare. Serving that fit would leave the newest ``split.test_fraction`` of history (20% by
default: the newest items, users and tastes) out of production. With ``refit_on_all`` (the
default) the pipeline then repeats the same fitting steps, through the same functions and with
the same hyper-parameters, with the test cutoff moved past the last event, and the bundle
serves that *served* fit:

    cutoff'  = the last event + 1 microsecond (every event is before it)
    T_rank'  = ranker_window_start(events, cutoff', split.ranker_fraction)
    retrieval A' fit on events < T_rank'
    ranker rows' : positives in [T_rank', cutoff') + hard negatives from retrieval A' candidates,
                   features by the point-in-time join at each row's time (as in the evaluated fit)
    retrieval B' fit on events < cutoff'     (two-tower, FAISS, CF, affinity, trending, ...)
    ranker'      DCN-V2 on ranker rows'

The ranker's label window is the last ``ranker_fraction`` of the refit's training period and
ends at the last event, exactly as the evaluated fit's window ends at ``T_test``; every row's
user and item features come from the feature store's point-in-time join at the row's time (the
pipeline's feature build writes snapshots at ``T_rank'`` and ``cutoff'`` and on the days of both
label windows: :func:`~streamrec.pipeline.train.build_features`). The
refit has no test window of its own: nothing measures it on unseen data, which is why the gates
judge the evaluated fit. The manifest's ``fit`` records both (:class:`~streamrec.registry.
manifest.FitRecord`), and ``data_cutoff`` becomes the refit's last event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from streamrec.errors import ModelError, TrainingDataError
from streamrec.features.client import FeatureClient
from streamrec.features.item_table import ItemFeatureTable
from streamrec.funnel.core import Funnel, RetrievalModels
from streamrec.models.train_loop import RankerData
from streamrec.pipeline.train import (
    PipelineState,
    _step,
    fit_ranker,
    fit_retrieval,
    item_table_as_of,
    positives_with_features,
    ranker_rows,
    ranker_window_start,
    refit_cutoff,
)
from streamrec.registry.manifest import FitRecord, FitWindow


@dataclass
class Fit:
    """One fit of everything a bundle serves: the retrieval models, the ranker and its rows.

    Attributes:
        models: Retrieval models fit on the positives before ``cutoff``.
        table: Item table as of ``cutoff`` (row = item index of ``models``).
        ranker: DCN-V2 trained on ``rdata``.
        ranker_history: The ranker's per-epoch metrics.
        rdata: The ranker's training rows.
        row_stats: :func:`~streamrec.pipeline.train.ranker_rows` statistics.
        layout: The ranker's feature layout.
        t_rank: Start of the ranker's label window ``[t_rank, cutoff)``.
        cutoff: The models saw events strictly before this time.
    """

    models: RetrievalModels
    table: ItemFeatureTable
    ranker: nn.Module
    ranker_history: list[dict[str, float]]
    rdata: RankerData
    row_stats: dict[str, float]
    layout: Any
    t_rank: pd.Timestamp
    cutoff: pd.Timestamp


def refit_on_all(state: PipelineState, fc: FeatureClient, pit: pd.DataFrame) -> Fit:
    """The evaluated fit's steps again, with the test cutoff moved past the last event.

    Args:
        state: The pipeline's state after evaluation (events, split times, config).
        fc: The feature client (snapshots already built for both fits' split times).
        pit: The evaluated fit's positives with point-in-time features (before ``T_test``);
            the positives from ``T_test`` on are joined here and appended.

    Raises:
        TrainingDataError: the refit's ranker window yields no usable rows.
    """
    assert state.t_test is not None and state.end is not None
    cfg = state.cfg
    cutoff = refit_cutoff(state.end)  # the feature build has snapshots at it and at T_rank'
    t_rank = ranker_window_start(state.events, cutoff, cfg.split.ranker_fraction)
    # Same functions, same config: only the two split times move (and the run names' tags).
    refit = dataclasses.replace(state, t_rank=t_rank, t_test=cutoff)
    state.log(
        f"  refit on all data (refit_on_all): events up to {state.end}, "
        f"ranker window from {t_rank}; the metrics stay the held-out fit's (before {state.t_test})"
    )
    with _step(state, "refit_training_set"):
        newer = positives_with_features(refit, fc, start=state.t_test)
        pit_all = pd.concat([pit, newer], ignore_index=True)
    # The ranker rows' generator is seeded as the evaluated fit's: the same sampling procedure,
    # not its draws.
    return fit_models_at(refit, fc, pit_all, "refit", steps="refit_")


def fit_models_at(
    state: PipelineState,
    fc: FeatureClient,
    pit: pd.DataFrame,
    tag: str,
    *,
    steps: str | None = None,
    rng: np.random.Generator | None = None,
) -> Fit:
    """Fit everything a bundle serves on the events before ``state.t_test``.

    The evaluated fit's sequence, which the refit (:func:`refit_on_all`) and every earlier fold
    of the rolling evaluation (:func:`~streamrec.pipeline.rolling.evaluate_fold`) repeat with
    the split times moved::

        retrieval A  on the positives before t_rank
        ranker rows  positives in [t_rank, t_test) + hard negatives from retrieval A's funnel
        retrieval B  on the positives before t_test
        ranker       DCN-V2 on the ranker rows, with retrieval B's feature layout

    Args:
        state: Events and config; ``state.t_rank`` and ``state.t_test`` are the split times.
        fc: The feature client (snapshots built at both split times).
        pit: Positives with point-in-time features (those before ``t_test`` are used).
        tag: Run-name tag: the runs are ``{tag}_a``, ``{tag}_b`` and ``ranker-{tag}`` (``a``,
            ``b`` and ``ranker`` when empty).
        steps: Prefix of the timed steps (``retrieval_a``, ``ranker_rows``, ``retrieval_b``,
            ``ranker``), which also log the ranker rows and the ranker's validation AUC; None:
            neither (the caller times the whole fit).
        rng: Generator of the ranker rows' negatives; None: a new one seeded with ``cfg.seed``.

    Raises:
        TrainingDataError: the ranker window yields no usable rows.
        ModelError: a training job failed.
    """
    assert state.t_rank is not None and state.t_test is not None
    cfg = state.cfg
    t_rank, cutoff = state.t_rank, state.t_test
    names = (f"{tag}_a", f"{tag}_b", f"ranker-{tag}") if tag else ("a", "b", "ranker")
    label = "" if steps is None else steps.replace("_", " ")

    def step(name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if steps is None else _step(state, steps + name)

    table_rank = item_table_as_of(fc, t_rank)
    with step("retrieval_a"):
        models_a = fit_retrieval(state, pit, table_rank, t_rank, names[0])
    funnel_a = Funnel(models_a, table_rank, None, cfg.retrieval)
    with step("ranker_rows"):
        rng = np.random.default_rng(cfg.seed) if rng is None else rng
        rdata, row_stats = ranker_rows(state, fc, funnel_a, rng)
    if steps is not None:
        state.log(
            f"  {label}ranker rows: {int(row_stats['ranker_rows']):,}, "
            f"positive rate {row_stats['ranker_positive_rate']:.3f}"
        )
    table = item_table_as_of(fc, cutoff)
    with step("retrieval_b"):
        models = fit_retrieval(state, pit, table, cutoff, names[1])
    with step("ranker"):
        ranker, history, layout = fit_ranker(state, models, table, rdata, names[2])
    if steps is not None:
        state.log(f"  {label}ranker: val AUC {history[-1].get('val_auc', float('nan')):.3f}")
    return Fit(models, table, ranker, history, rdata, row_stats, layout, t_rank, cutoff)


def serve_fit(
    state: PipelineState, fc: FeatureClient, pit: pd.DataFrame, evaluated: Fit
) -> tuple[Fit, str | None]:
    """The fit the bundle serves: the refit when ``refit_on_all``, else the evaluated fit.

    A refit that cannot train (its data, e.g. a single-class ranker window, or a training job
    that failed: on Ray Train the worker's error arrives as a :class:`ModelError`) falls back to
    the evaluated fit, which the gates judge anyway; the reason is returned (and recorded in the
    manifest's ``fit``).

    Args:
        state: The pipeline state (its config says whether to refit).
        fc: The feature client.
        pit: The positives before the test cutoff with their features (the refit adds the rest).
        evaluated: The held-out fit.

    Returns:
        The fit to serve, and why the refit was skipped (None when it was not).
    """
    if not state.cfg.refit_on_all:
        return evaluated, None
    try:
        return refit_on_all(state, fc, pit), None
    except (TrainingDataError, ModelError) as err:
        state.log(f"  refit on all data skipped, serving the held-out fit: {type(err).__name__}: {err}")
        return evaluated, f"{type(err).__name__}: {err}"


def _window(state: PipelineState, fit: Fit) -> FitWindow:
    ev = state.events
    seen = ev[ev["timestamp"] < fit.cutoff]
    pos = seen[seen["label"] > 0]
    auc = float(fit.ranker_history[-1].get("val_auc", float("nan"))) if fit.ranker_history else math.nan
    return FitWindow(
        cutoff=fit.cutoff.to_pydatetime(),
        last_event=pd.Timestamp(seen["timestamp"].max()).to_pydatetime(),
        ranker_window_start=fit.t_rank.to_pydatetime(),
        events=int(len(seen)),
        positives=int(len(pos)),
        users=int(len(fit.models.users)),
        items_with_positives=int(np.count_nonzero(np.diff(fit.models.train.tocsc().indptr))),
        ranker_rows=int(fit.row_stats["ranker_rows"]),
        ranker_positive_rate=float(fit.row_stats["ranker_positive_rate"]),
        ranker_val_auc=auc if math.isfinite(auc) else None,
    )


def fit_record(state: PipelineState, evaluated: Fit, served: Fit, skipped: str | None) -> FitRecord:
    """The manifest's ``fit``: which fit the metrics measure and which fit the files are."""
    assert state.end is not None
    return FitRecord(
        refit_on_all=served is not evaluated,
        evaluated=_window(state, evaluated),
        test_window_end=state.end.to_pydatetime(),
        served=_window(state, served),
        refit_skipped=skipped,
    )
