"""The ranker's training choices: the default, the opt-in preference config (ADR-015), the degraded demo model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from streamrec.features.defaults import apply_defaults
from streamrec.features.item_table import ItemFeatureTable
from streamrec.features.spec import views_for
from streamrec.pipeline.config import TrainingConfig, load_training_config
from streamrec.ranking.features import RankerFeatures

NAMES = [f for v in views_for("item") for f in v.feature_names]

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "training"


def test_the_default_ranker_and_its_file_agree() -> None:
    default = TrainingConfig()
    assert default.ranker_sampling.negatives_from == "candidates"
    assert default.ranker.dense_inputs is None and default.ranker.sparse_inputs is None
    # the file a reader sees is what runs without --config
    assert load_training_config(CONFIGS / "default.yaml").model_dump() == default.model_dump()


def test_the_preference_config_trains_on_impressions_without_sparse_fields() -> None:
    pref = load_training_config(CONFIGS / "preference.yaml")
    assert pref.ranker_sampling.negatives_from == "impressions"
    assert pref.ranker.dense_inputs is None and pref.ranker.sparse_inputs == []
    rest = TrainingConfig().model_dump()
    got = pref.model_dump()
    assert {k: v for k, v in got.items() if k not in ("ranker", "ranker_sampling")} == {
        k: v for k, v in rest.items() if k not in ("ranker", "ranker_sampling")
    }  # only the ranker's choices differ from the default
    ranker = {k: v for k, v in got["ranker"].items() if k != "sparse_inputs"}
    assert ranker == {k: v for k, v in rest["ranker"].items() if k != "sparse_inputs"}
    assert (
        got["ranker_sampling"]["negatives_per_positive"] == rest["ranker_sampling"]["negatives_per_positive"]
    )


def test_the_degraded_demo_model_ranks_by_one_input() -> None:
    weak = load_training_config(CONFIGS / "demo-weak.yaml")
    assert weak.ranker_sampling.negatives_from == "candidates"
    assert weak.ranker.dense_inputs == ["x_cf"] and weak.ranker.sparse_inputs == []
    assert weak.ranker.epochs == 1 and weak.gates.promote is False
    # The name must be one of the serving layout's, or training fails at the first ranker build.
    table = ItemFeatureTable.from_frame(
        apply_defaults(pd.DataFrame({"item_id": [1, 2]}), features=NAMES), ["news"]
    )
    layout = RankerFeatures(table, ("two_tower", "cf")).layout
    model = weak.ranker.build_model(
        n_dense=len(layout.dense),
        sparse_cardinalities=list(layout.cardinalities),
        dense_names=layout.dense,
        sparse_names=layout.sparse,
    )
    assert model.hparams["dense_columns"] == [layout.dense.index("x_cf")]
