"""Typed training configuration (``configs/training/*.yaml``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from streamrec.config import StrictModel, load_config
from streamrec.errors import ConfigError
from streamrec.evaluation.config import DEFAULT_GRIDS, BaselineName, IntervalMethod, validate_grid
from streamrec.models.config import RankerConfig, TwoTowerConfig
from streamrec.retrieval.config import RetrievalSettings


class ScalingSettings(StrictModel):
    """Ray Train scaling: mapped onto ``ray.train.ScalingConfig``.

    Attributes:
        use_ray: Run training as Ray Train jobs (TorchTrainer); ``False`` trains in-process.
        num_workers: Data-parallel workers.
        use_gpu: One GPU per worker (falls back to CPU with a warning when none is present).
        cpus_per_worker: CPUs reserved per worker (fractional values fit small machines).
    """

    use_ray: bool = True
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)


class SplitSettings(StrictModel):
    """Temporal split: train before T, evaluate after.

    Attributes:
        test_fraction: Share of the time span (by event quantile) held out for evaluation.
        ranker_fraction: Share of the *training* window (its end) whose events train the ranker
            on candidates from retrieval models fit before it (no leakage of retrieval scores).
        min_train_events: Fewer positive training events than this is an error.
    """

    test_fraction: float = Field(0.2, gt=0, lt=1)
    ranker_fraction: float = Field(0.25, gt=0, lt=1)
    min_train_events: int = Field(200, ge=1)


class RankerSampling(StrictModel):
    """How ranker training rows are built.

    Attributes:
        negatives_per_positive: Hard negatives sampled from retrieval candidates per positive.
        negatives_from: ``candidates`` (the default): any retrieval candidate the user did not
            engage with (shown or not); ``impressions``: candidates the user was shown in the
            window and did not engage with (impression or skip events), topped up from the other
            candidates when there are too few. Negatives never shown teach the ranker what the
            logging policy showed rather than what users prefer when shown (ADR-015: with
            ``ranker.sparse_inputs: []``, configs/training/preference.yaml).
    """

    negatives_per_positive: int = Field(8, ge=1)
    negatives_from: Literal["candidates", "impressions"] = "candidates"


class TuningSettings(StrictModel):
    """Hyper-parameter search of the baselines (:mod:`streamrec.evaluation.tuning`).

    The validation window is the last ``validation_fraction`` of the training period (events
    before the test cutoff, by time quantile); each grid point is fit on what precedes it and
    scored on its new positives, the best point is refit on the whole training period. The test
    window is never used for choosing.

    Attributes:
        enabled: Search the grids; ``False`` runs every baseline with its default parameters.
        validation_fraction: Share of the training period that forms the validation window.
        metric: Validation metric to maximise (``ndcg@K``, ``recall@K`` or ``hit_rate@K``).
        max_users: Score each grid point on at most this many validation users (sampled with
            the seed; 0 = all): ranking cost grows with users x catalogue.
        grids: Per baseline, hyper-parameter name to candidate values (cartesian product).
            Baselines not named keep their default grid
            (:data:`~streamrec.evaluation.config.DEFAULT_GRIDS`); ``{}`` means defaults only.
    """

    enabled: bool = True
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    metric: str = Field("ndcg@10", pattern=r"^(recall|ndcg|hit_rate)@[1-9][0-9]*$")
    max_users: int = Field(5000, ge=0)
    grids: dict[BaselineName, dict[str, list[Any]]] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_GRIDS)
    )

    @field_validator("grids", mode="before")
    @classmethod
    def _merge_defaults(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {**copy.deepcopy(DEFAULT_GRIDS), **v}
        return v

    @field_validator("grids")
    @classmethod
    def _valid_grids(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for name, grid in v.items():
            try:
                validate_grid(name, grid)
            except ConfigError as err:  # pydantic reports ValueErrors with the key's location
                raise ValueError(str(err)) from None
        return v


class IntervalSettings(StrictModel):
    """Bootstrap confidence intervals over test users (:mod:`streamrec.evaluation.intervals`).

    Attributes:
        confidence: Two-sided level.
        n_resamples: Bootstrap resamples (the seed is the run's ``seed``).
        method: ``percentile`` (linear in users), ``basic`` or ``BCa`` (quadratic in users).
    """

    confidence: float = Field(0.95, gt=0, lt=1)
    n_resamples: int = Field(1000, ge=10)
    method: IntervalMethod = "percentile"


class RollingSettings(StrictModel):
    """Rolling evaluation: several cutoffs, each with models retrained on what came before it.

    The last cutoff is the global test cutoff ``T_test`` (its fold is the main evaluation, not
    refit); the others lie before it at event-time quantiles spaced ``window_fraction`` apart.
    Fold ``i`` trains every model (retrieval, ranker, tuned baselines) on the events before
    cutoff ``i`` with the same config and evaluates on the events up to the next cutoff. See
    :mod:`streamrec.pipeline.rolling`.

    Attributes:
        folds: Number of cutoffs including ``T_test``; 0 = off (the default: no extra fits).
        window_fraction: Share of all events between two cutoffs (an earlier fold's test window);
            ``None`` = ``split.test_fraction``, narrowed so that the first cutoff keeps
            ``min_train_fraction`` of the events before it.
        min_train_fraction: Share of all events the first fold trains on, at least.
    """

    folds: int = Field(0, ge=0, le=20)
    window_fraction: float | None = Field(None, gt=0, lt=1)
    min_train_fraction: float = Field(0.2, gt=0, lt=1)


class EvaluationSettings(StrictModel):
    """Offline evaluation.

    Attributes:
        ks: Cut-offs for Recall/NDCG.
        candidate_counts: Candidate counts for the funnel's per-source recall.
        max_users: Evaluate at most this many test users (sampled with the seed); 0 = all.
        baselines: Baselines run side by side (ItemKNN's dense similarity blocks grow with the
            catalogue: drop it for corpora of 10^5+ items; EASE is skipped, with the reason in
            the report, above ``ease_max_items``).
        tuning: Hyper-parameter search of the baselines on a validation window.
        intervals: Confidence intervals of every per-user metric and of the paired differences.
        ease_max_items: Largest catalogue EASE accepts (memory 16 bytes * items^2).
        baseline_threads: Threads of the ALS/BPR baselines (0 = all cores).
        rolling: Rolling evaluation over several cutoffs (off by default).
    """

    ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    candidate_counts: list[int] = Field(default_factory=lambda: [100, 300])
    max_users: int = Field(0, ge=0)
    baselines: list[BaselineName] = Field(default_factory=lambda: list(get_args(BaselineName)))
    tuning: TuningSettings = Field(default_factory=TuningSettings)
    intervals: IntervalSettings = Field(default_factory=IntervalSettings)
    ease_max_items: int = Field(20_000, ge=1)
    baseline_threads: int = Field(1, ge=0)
    rolling: RollingSettings = Field(default_factory=RollingSettings)


class GateSettings(StrictModel):
    """Promotion gates (see :mod:`streamrec.registry`)."""

    tolerance: float = Field(0.01, ge=0)
    primary_metric: str = "ndcg@10"
    promote: bool = True


class TrainingConfig(StrictModel):
    """Everything one training run needs; ``configs/training/default.yaml`` holds the defaults."""

    seed: int = 42
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    storage_path: str | None = None
    split: SplitSettings = Field(default_factory=SplitSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    # Small batches: the demo world has a few thousand positives; big batches mean few steps.
    two_tower: TwoTowerConfig = Field(default_factory=lambda: TwoTowerConfig(batch_size=256, epochs=8))
    ranker: RankerConfig = Field(default_factory=lambda: RankerConfig(batch_size=256, epochs=5))
    ranker_sampling: RankerSampling = Field(default_factory=RankerSampling)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    gates: GateSettings = Field(default_factory=GateSettings)
    fallback_top_n: int = Field(50, ge=1)
    #: After evaluation, refit every served model (retrieval sources, FAISS index, ranker) on all
    #: of history with the same hyper-parameters and serve that; the metrics and the gates stay
    #: those of the held-out fit (streamrec.pipeline.refit, ADR-006). False: serve the held-out fit.
    refit_on_all: bool = True


def load_training_config(path: str | Path | None) -> TrainingConfig:
    """Load a training YAML, or the defaults when ``path`` is None."""
    return TrainingConfig() if path is None else load_config(path, TrainingConfig)
