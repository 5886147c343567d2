"""The rolling evaluation end to end on a tiny synthetic world: two cutoffs, each fold's models
retrained on the events before it, per-fold and pooled rows with more user-windows than the
single cutoff has test users (issue 17 item 4)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamrec.data.synth import SynthConfig, synthesize
from streamrec.pipeline.config import TrainingConfig
from streamrec.pipeline.train import run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config() -> TrainingConfig:
    cfg = TrainingConfig()
    cfg.scaling.use_ray = False
    cfg.two_tower.epochs = 1
    cfg.two_tower.embedding_dim = 16
    cfg.ranker.epochs = 1
    cfg.retrieval.per_source = 40
    cfg.retrieval.merged = 100
    cfg.evaluation.candidate_counts = [50]
    cfg.evaluation.baselines = ["most_popular", "item_knn", "ease"]
    cfg.evaluation.tuning.enabled = False
    cfg.evaluation.intervals.n_resamples = 200
    cfg.refit_on_all = False
    cfg.evaluation.rolling.folds = 2
    return cfg


@pytest.fixture(scope="module")
def rolled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("rolling")
    synthesize(SynthConfig(users=300, items=200, days=8, seed=5), d, progress=False)
    return run_pipeline(d, _config(), register=False, log=lambda m: None)


def test_folds_and_pooled_rows(rolled: dict[str, Any]) -> None:
    report = rolled
    assert {"methods", "funnel", "summary"} <= set(report)  # the single cutoff's output is unchanged
    roll = report["rolling"]
    assert roll["skipped"] == []
    first, last = roll["folds"]
    # The last fold is the pipeline's own evaluation; the first was retrained before an earlier cutoff.
    assert last["refit"] is False and first["refit"] is True
    assert last["n_users"] == report["summary"]["n_users"]
    assert last["methods"] == report["methods"]
    assert pd.Timestamp(first["cutoff"]) < pd.Timestamp(last["cutoff"]) == pd.Timestamp(first["window_end"])
    assert first["train_positives"] < last["train_positives"]
    assert "ann_recall@50_fold1_b" in report["timings_s"]
    names = {m["method"] for m in first["methods"]}
    assert {"most_popular", "item_knn", "ease", "streamrec_ranked", "streamrec_full"} <= names

    pooled = roll["pooled"]
    assert pooled["n_user_windows"] == first["n_users"] + last["n_users"] > report["summary"]["n_users"]
    assert pooled["n_distinct_users"] <= pooled["n_user_windows"]
    rows = {m["method"]: m for m in pooled["methods"]}
    assert set(rows) == names
    for name, row in rows.items():
        # the pooled mean is the user-window-weighted mean of the folds' means
        per_fold = [next(m for m in f["methods"] if m["method"] == name) for f in roll["folds"]]
        want = np.average([m["ndcg@10"] for m in per_fold], weights=[f["n_users"] for f in roll["folds"]])
        assert row["ndcg@10"] == pytest.approx(want)
        assert row["n_user_windows"] == pooled["n_user_windows"]
        lo, hi = row["ci"]["ndcg@10"]
        assert lo <= row["ndcg@10"] <= hi
    paired = pooled["paired_vs_best_baseline"]
    best = max((r for n, r in rows.items() if not n.startswith("streamrec")), key=lambda r: r["ndcg@10"])
    assert paired["baseline"] == pooled["best_baseline"] == best["method"]
    diff = paired["streamrec_full"]["ndcg@10"]
    assert diff["difference"] == pytest.approx(rows["streamrec_full"]["ndcg@10"] - best["ndcg@10"])
    json.dumps(report, default=str)  # what `streamrec train --json` prints


def test_text_report_shows_the_rolling_evaluation(rolled: dict[str, Any]) -> None:
    from streamrec.pipeline.report import format_report

    text = format_report(rolled)
    assert (
        "Rolling evaluation" in text
        and f"{rolled['rolling']['pooled']['n_user_windows']} user-windows" in text
    )
