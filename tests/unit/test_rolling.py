"""Rolling evaluation: where the folds' cutoffs fall and how per-user-window metrics pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamrec.errors import ConfigError
from streamrec.evaluation.comparison import MethodScores
from streamrec.pipeline.config import RollingSettings, SplitSettings
from streamrec.pipeline.report import format_report, rolling_markdown
from streamrec.pipeline.rolling import fold_quantiles, plan_folds, pool_folds


def test_fold_quantiles_end_at_the_test_cutoff_and_keep_the_minimum_training_share() -> None:
    assert fold_quantiles(RollingSettings(folds=0), 0.2) == []
    assert fold_quantiles(RollingSettings(folds=1), 0.2) == pytest.approx([0.8])
    assert fold_quantiles(RollingSettings(folds=2), 0.2) == pytest.approx([0.6, 0.8])
    assert fold_quantiles(RollingSettings(folds=4), 0.2) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # more folds than fit at test_fraction apart: the spacing narrows, the first keeps 20%
    assert fold_quantiles(RollingSettings(folds=7), 0.2) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert fold_quantiles(RollingSettings(folds=3, window_fraction=0.05), 0.2) == pytest.approx(
        [0.7, 0.75, 0.8]
    )
    with pytest.raises(ConfigError, match="min_train_fraction"):
        fold_quantiles(RollingSettings(folds=4, window_fraction=0.3), 0.2)
    with pytest.raises(ConfigError, match="min_train_fraction"):
        fold_quantiles(RollingSettings(folds=2, min_train_fraction=0.9), 0.2)


def _events(n: int = 1000) -> pd.DataFrame:
    ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="h")
    return pd.DataFrame({"timestamp": ts, "label": 1})


def test_plan_folds_chains_the_windows_up_to_the_test_cutoff() -> None:
    ev = _events()
    split = SplitSettings()
    t_test = pd.Timestamp(ev["timestamp"].quantile(0.8, interpolation="higher"))
    folds = plan_folds(ev, t_test, RollingSettings(folds=4), split)
    assert [f.index for f in folds] == [1, 2, 3, 4]
    assert folds[-1].cutoff == t_test and folds[-1].window_end is None
    for a, b in zip(folds, folds[1:], strict=False):
        assert a.window_end == b.cutoff and a.cutoff < b.cutoff
    for f in folds:
        assert f.t_rank < f.cutoff
    # about a fifth of the events between two cutoffs, and the first trains on about a fifth
    n_before = [int((ev["timestamp"] < f.cutoff).sum()) for f in folds]
    assert n_before == pytest.approx([200, 400, 600, 800], abs=2)
    assert plan_folds(ev, t_test, RollingSettings(folds=0), split) == []


def test_plan_folds_keeps_coinciding_cutoffs_once() -> None:
    ts = [pd.Timestamp("2026-01-01", tz="UTC")] * 900 + [pd.Timestamp("2026-01-02", tz="UTC")] * 100
    ev = pd.DataFrame({"timestamp": ts, "label": 1})
    folds = plan_folds(ev, pd.Timestamp("2026-01-02", tz="UTC"), RollingSettings(folds=4), SplitSettings())
    assert len(folds) == 1 and folds[0].window_end is None  # no event before the earlier cutoffs
    days = [pd.Timestamp(f"2026-01-0{d}", tz="UTC") for d in (1, 2, 3)]
    ev = pd.DataFrame({"timestamp": [days[0]] * 100 + [days[1]] * 800 + [days[2]] * 100, "label": 1})
    folds = plan_folds(ev, days[2], RollingSettings(folds=4), SplitSettings())
    assert [f.cutoff for f in folds] == [days[1], days[2]]  # 0.2, 0.4 and 0.6 all fall on day 2


def _scores(name: str, values: list[float], rows: list[int] | None = None) -> MethodScores:
    v = np.asarray(values, np.float64)
    r = np.arange(v.size) if rows is None else np.asarray(rows)
    return MethodScores(
        name, {"method": name, "ndcg@10": float(v.mean())}, {"ndcg@10": v, "recall@10": v / 2}, r
    )


def test_pool_folds_concatenates_user_windows_and_pairs_with_the_best_pooled_baseline() -> None:
    fold1 = [_scores("a", [1.0, 1.0]), _scores("b", [0.0, 0.0]), _scores("streamrec_full", [1.0, 0.0])]
    fold2 = [
        _scores("a", [0.0, 0.0, 0.0, 0.0]),
        _scores("b", [0.5, 0.5, 0.5, 0.5]),
        _scores("streamrec_full", [1.0, 1.0, 1.0, 0.0]),
    ]
    out = pool_folds([fold1, fold2], n_resamples=200)
    rows = {m["method"]: m for m in out["methods"]}
    assert out["n_user_windows"] == 6 and rows["a"]["n_user_windows"] == 6
    assert rows["a"]["ndcg@10"] == pytest.approx(2 / 6)  # not the mean of the fold means (0.5)
    assert rows["b"]["ndcg@10"] == pytest.approx(2 / 6)
    assert rows["streamrec_full"]["ndcg@10"] == pytest.approx(4 / 6)
    assert rows["streamrec_full"]["recall@10"] == pytest.approx(2 / 6)
    lo, hi = rows["streamrec_full"]["ci"]["ndcg@10"]
    assert 0.0 <= lo < 4 / 6 < hi <= 1.0
    # a wins fold 1 and b fold 2; pooled they tie, and the first listed wins the tie (max is stable)
    assert out["best_baseline"] == "a"
    paired = out["paired_vs_best_baseline"]["streamrec_full"]["ndcg@10"]
    assert paired["difference"] == pytest.approx(4 / 6 - 2 / 6)
    assert out["left_out"] == []


def test_pool_folds_leaves_out_a_method_missing_in_a_fold_and_refuses_misaligned_users() -> None:
    fold1 = [_scores("a", [1.0]), _scores("ease", [0.0]), _scores("streamrec_full", [1.0])]
    fold2 = [_scores("a", [0.5, 0.5]), _scores("streamrec_full", [0.0, 1.0])]  # ease skipped here
    out = pool_folds([fold1, fold2], n_resamples=50)
    assert [m["method"] for m in out["methods"]] == ["a", "streamrec_full"]
    assert out["left_out"] == ["ease"] and out["best_baseline"] == "a"
    with pytest.raises(ValueError, match="different users"):
        pool_folds([[_scores("a", [1.0, 0.0]), _scores("streamrec_full", [1.0, 0.0], rows=[0, 2])]])
    with pytest.raises(ValueError, match="no fold"):
        pool_folds([])


def test_text_report_prints_the_pooled_rows_and_the_folds() -> None:
    fold = {
        "fold": 1,
        "cutoff": "c1",
        "window_end": "c2",
        "train_positives": 900,
        "n_users": 120,
        "best_baseline": "als",
        "refit": True,
        "methods": [{"method": "als", "ndcg@10": 0.1}, {"method": "streamrec_full", "ndcg@10": 0.2}],
        "paired_vs_best_baseline": {
            "baseline": "als",
            "streamrec_full": {"ndcg@10": {"difference": 0.1, "ci": [0.02, 0.18]}},
        },
    }
    pooled = pool_folds([[_scores("als", [0.1, 0.2]), _scores("streamrec_full", [0.3, 0.2])]], n_resamples=50)
    pooled["n_distinct_users"] = 2
    roll = {"folds": [fold], "pooled": pooled, "skipped": []}
    text = format_report({"methods": [], "summary": {}, "rolling": roll})
    assert "Rolling evaluation: 1 folds, 2 user-windows (2 distinct users)" in text
    assert "streamrec_full minus als (paired, per user-window, pooled): NDCG@10 +0.1000" in text
    assert "| 1 | c1 | c2 | 900 | 120 | als (0.1000) | 0.2000 | +0.1000 [+0.0200, +0.1800] |" in text
    assert "| streamrec_full | 0.2500 [" in text  # the pooled rows, with intervals over user-windows
    assert "Rolling" not in format_report({"methods": [], "summary": {}})
    # The same section as the benchmark's tables (bench/bench_quality.py): one renderer.
    assert "\n".join(rolling_markdown(roll)) in text


def test_cli_rolling_folds_sets_the_config_and_keeps_the_json_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    import streamrec.pipeline.train as train
    from streamrec.cli import app

    seen: list[int] = []

    def fake(data_dir: Any, cfg: Any, **kw: Any) -> dict[str, Any]:
        seen.append(cfg.evaluation.rolling.folds)
        return {"methods": [], "funnel": [], "summary": {}, "rolling": {"folds": []}}

    monkeypatch.setattr(train, "run_pipeline", fake)
    runner = CliRunner()
    args = ["train", "--data-dir", str(tmp_path), "--no-register", "--json"]
    out = runner.invoke(app, [*args, "--rolling-folds", "3"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.stdout)) == {"methods", "funnel", "summary", "rolling"}
    assert runner.invoke(app, args).exit_code == 0  # without the flag: the config's (0)
    assert seen == [3, 0]
    assert runner.invoke(app, [*args, "--rolling-folds", "-1"]).exit_code != 0


def test_fold_snapshots_cover_each_fold_as_the_pipeline_covers_its_own_cutoff() -> None:
    from streamrec.pipeline.rolling import fold_snapshot_times
    from streamrec.pipeline.snapshots import MAX_DAILY_SNAPSHOTS, snapshot_times

    ev = _events(24 * 300)  # one event an hour for 300 days: more days than one build keeps
    split = SplitSettings()
    t_test = pd.Timestamp(ev["timestamp"].quantile(0.8, interpolation="higher"))
    folds = plan_folds(ev, t_test, RollingSettings(folds=3), split)
    main = snapshot_times(ev["timestamp"], windows=[(folds[-1].t_rank, t_test)], points=[t_test])
    assert (
        len(main) <= MAX_DAILY_SNAPSHOTS + 1 and min(main) > folds[0].t_rank
    )  # the earliest fold is uncovered
    extra = fold_snapshot_times(ev, folds, main)
    assert not set(extra) & set(main)
    have = set(main) | set(extra)
    for f in folds[:-1]:
        assert f.cutoff in have and f.t_rank in have
        days = pd.date_range(f.t_rank.ceil("D"), f.cutoff.floor("D"), freq="D")
        assert set(days) <= have  # every day of its ranker window has its own snapshot
        assert max(extra) < folds[-1].cutoff
    assert fold_snapshot_times(ev, folds[-1:], main) == []  # the test cutoff's fold is the pipeline's own


def test_an_extra_build_adds_snapshots_and_leaves_the_recorded_build_alone(tmp_path: Path) -> None:
    import json

    from streamrec.data.store import DataStore
    from streamrec.data.synth import SynthConfig, synthesize
    from streamrec.features.client import FeatureClient
    from streamrec.features.snapshot import features_as_of

    d = tmp_path / "data"
    synthesize(SynthConfig(users=60, items=50, days=10, seed=4), d, progress=False)
    fc = FeatureClient(d)
    end = DataStore(d).events()["timestamp"].max()
    fc.build(cutoffs=[end])
    meta_file = fc.features_dir / "meta.json"
    before = json.loads(meta_file.read_text())
    early = end - pd.Timedelta(days=6)
    assert features_as_of(fc, "user", early).empty
    report = fc.build(cutoffs=[early, end - pd.Timedelta(days=3)], extra=True)
    assert report.files > 0
    after = json.loads(meta_file.read_text())
    for key in ("defaults", "pending", "last_build"):
        assert after.get(key) == before.get(key), key
    assert not features_as_of(fc, "user", early).empty  # readable point in time
    fc.build(cutoffs=[early])  # an ordinary build records itself
    assert json.loads(meta_file.read_text())["last_build"] != before["last_build"]


def test_a_rolling_plan_that_cannot_fit_fails_before_any_training(tmp_path: Path) -> None:
    from streamrec.data.synth import SynthConfig, synthesize
    from streamrec.pipeline.config import TrainingConfig
    from streamrec.pipeline.train import run_pipeline

    synthesize(SynthConfig(users=150, items=60, days=4, seed=2), tmp_path, progress=False)
    cfg = TrainingConfig()
    cfg.split.min_train_events = 1
    cfg.evaluation.rolling.folds = 5
    cfg.evaluation.rolling.window_fraction = 0.3
    lines: list[str] = []
    with pytest.raises(ConfigError, match="min_train_fraction"):
        run_pipeline(tmp_path, cfg, register=False, log=lines.append)
    assert not any(line.startswith("[features]") for line in lines)
