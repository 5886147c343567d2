"""The ranker's training choices: the default, the opt-in preference config (ADR-015), the weak demo model."""

from __future__ import annotations

from pathlib import Path

from streamrec.pipeline.config import TrainingConfig, load_training_config

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


def test_the_weak_demo_model_keeps_candidates_and_every_input() -> None:
    weak = load_training_config(CONFIGS / "demo-weak.yaml")
    assert weak.ranker_sampling.negatives_from == "candidates"
    assert weak.ranker.dense_inputs is None and weak.ranker.sparse_inputs is None
    assert weak.ranker.epochs == 1 and weak.gates.promote is False
