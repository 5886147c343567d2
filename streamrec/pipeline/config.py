"""Typed training configuration (``configs/training/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field

from streamrec.config import StrictModel, load_config
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
        negatives_from: ``candidates``: any retrieval candidate the user did not engage with
            (shown or not); ``impressions``: candidates the user was shown in the window and did
            not engage with (impression or skip events), topped up from the other candidates
            when there are too few. Negatives never shown teach the ranker what the logging
            policy showed rather than what users prefer when shown.
    """

    negatives_per_positive: int = Field(8, ge=1)
    negatives_from: Literal["candidates", "impressions"] = "candidates"


BaselineName = Literal["most_popular", "item_knn", "als", "bpr"]


class EvaluationSettings(StrictModel):
    """Offline evaluation.

    Attributes:
        ks: Cut-offs for Recall/NDCG.
        candidate_counts: Candidate counts for the funnel's per-source recall.
        max_users: Evaluate at most this many test users (sampled with the seed); 0 = all.
        baselines: Baselines run side by side (ItemKNN's dense similarity blocks grow with the
            catalogue: drop it for corpora of 10^5+ items).
    """

    ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    candidate_counts: list[int] = Field(default_factory=lambda: [100, 300])
    max_users: int = Field(0, ge=0)
    baselines: list[BaselineName] = Field(default_factory=lambda: list(get_args(BaselineName)))


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


def load_training_config(path: str | Path | None) -> TrainingConfig:
    """Load a training YAML, or the defaults when ``path`` is None."""
    return TrainingConfig() if path is None else load_config(path, TrainingConfig)
