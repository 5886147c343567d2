"""Torch models: two-tower retrieval, DCN-V2 ranking, their training loops, I/O and scoring.

Plain Python + torch + numpy: no Ray or Feast imports, so the models run in a test, a Ray Train
worker or a Serve replica alike. Names are imported lazily, so importing a submodule (say
``streamrec.models.dcn``) does not pull in the pydantic configs; the GPU check script relies on
this to run with only torch and numpy installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamrec.models.config import RankerConfig, TwoTowerConfig
    from streamrec.models.dcn import CrossLayer, DCNv2
    from streamrec.models.io import load_model, read_model_metadata, save_model
    from streamrec.models.scoring import RankerScorer
    from streamrec.models.train_loop import (
        EpochCallback,
        RankerData,
        ShardedBatchSampler,
        TwoTowerData,
        evaluate_ranker,
        pick_device,
        roc_auc,
        seed_everything,
        train_ranker,
        train_two_tower,
    )
    from streamrec.models.two_tower import (
        HISTORY_PAD,
        TwoTowerModel,
        estimate_log_q,
        in_batch_softmax_loss,
    )

_EXPORTS: dict[str, str] = {
    "TwoTowerConfig": "config",
    "RankerConfig": "config",
    "TwoTowerModel": "two_tower",
    "HISTORY_PAD": "two_tower",
    "in_batch_softmax_loss": "two_tower",
    "estimate_log_q": "two_tower",
    "DCNv2": "dcn",
    "CrossLayer": "dcn",
    "save_model": "io",
    "load_model": "io",
    "read_model_metadata": "io",
    "RankerScorer": "scoring",
    "TwoTowerData": "train_loop",
    "RankerData": "train_loop",
    "EpochCallback": "train_loop",
    "ShardedBatchSampler": "train_loop",
    "train_two_tower": "train_loop",
    "train_ranker": "train_loop",
    "evaluate_ranker": "train_loop",
    "seed_everything": "train_loop",
    "pick_device": "train_loop",
    "roc_auc": "train_loop",
}

__all__ = [
    "CrossLayer",
    "DCNv2",
    "EpochCallback",
    "HISTORY_PAD",
    "RankerConfig",
    "RankerData",
    "RankerScorer",
    "ShardedBatchSampler",
    "TwoTowerConfig",
    "TwoTowerData",
    "TwoTowerModel",
    "estimate_log_q",
    "evaluate_ranker",
    "in_batch_softmax_loss",
    "load_model",
    "pick_device",
    "read_model_metadata",
    "roc_auc",
    "save_model",
    "seed_everything",
    "train_ranker",
    "train_two_tower",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
