"""Refit on all data (``refit_on_all``): the switch, the manifest's ``fit`` record, the report line,
the ranker window rule and the fallback when a refit cannot train. The pipeline runs end to end in
tests/integration/test_training_pipeline.py (``test_served_bundle_is_refit_on_all_history``)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from streamrec.errors import ModelError, TrainingDataError
from streamrec.pipeline.config import TrainingConfig, load_training_config
from streamrec.pipeline.report import format_report
from streamrec.pipeline.train import PipelineState, ranker_window_start
from streamrec.registry import (
    BundleManifest,
    FitRecord,
    FitWindow,
    describe_files,
    read_manifest,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 10, 1, tzinfo=UTC)


def window(days: int, positives: int) -> FitWindow:
    return FitWindow(
        cutoff=T0 + timedelta(days=days),
        last_event=T0 + timedelta(days=days, seconds=-1),
        ranker_window_start=T0 + timedelta(days=days - 2),
        events=10 * positives,
        positives=positives,
        users=positives // 3,
        items_with_positives=positives // 4,
        ranker_rows=9 * positives // 10,
        ranker_positive_rate=0.1,
        ranker_val_auc=0.7,
    )


def manifest(tmp_path: Path, fit: FitRecord | None) -> BundleManifest:
    (tmp_path / "w.bin").write_bytes(b"weights")
    return BundleManifest(
        name="b",
        created_at=T0 + timedelta(days=30),
        data_cutoff=T0 + timedelta(days=10),
        git_sha="abc",
        feature_schema_version="1.0",
        feature_names=["a"],
        files=describe_files(tmp_path, {"ranker": "w.bin"}),
        metrics={"ndcg@10": 0.1},
        eval_set_id="sha256:x",
        fit=fit,
    )


def test_the_switch_defaults_on_and_every_shipped_config_says_so() -> None:
    assert TrainingConfig().refit_on_all is True
    for path in sorted((ROOT / "configs" / "training").glob("*.yaml")):
        cfg = load_training_config(path)
        assert cfg.refit_on_all is True, path.name
    assert "refit_on_all: true" in (ROOT / "configs" / "training" / "default.yaml").read_text()
    off = TrainingConfig.model_validate({"refit_on_all": False})
    assert off.refit_on_all is False


def test_fit_record_round_trips_in_the_manifest(tmp_path: Path) -> None:
    fit = FitRecord(
        refit_on_all=True,
        evaluated=window(8, 600),
        test_window_end=T0 + timedelta(days=10),
        served=window(10, 750),
    )
    write_manifest(tmp_path, manifest(tmp_path, fit))
    back = read_manifest(tmp_path)
    assert (
        back.fit == fit and back.fit.served.positives == 750 and back.fit.evaluated.cutoff.tzinfo is not None
    )
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["fit"]["evaluated"]["positives"] == 600 and raw["fit"]["served"]["positives"] == 750
    with pytest.raises(ValueError):
        FitRecord.model_validate({**fit.model_dump(), "surprise": 1})


def test_a_manifest_without_fit_keeps_its_bytes_and_digest(tmp_path: Path) -> None:
    """Bundles registered before ``fit`` existed must still verify against their recorded digest."""
    write_manifest(tmp_path, manifest(tmp_path, None))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert "fit" not in raw
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    assert read_manifest(tmp_path).digest() == hashlib.sha256(canonical.encode()).hexdigest()
    with_fit = manifest(
        tmp_path,
        FitRecord(refit_on_all=False, evaluated=window(8, 6), test_window_end=T0, served=window(8, 6)),
    )
    assert with_fit.digest() != read_manifest(tmp_path).digest()


def test_ranker_window_is_the_last_fraction_before_the_cutoff() -> None:
    ts = pd.Series(pd.date_range("2026-10-01", periods=101, freq="h", tz="UTC"))
    ev = pd.DataFrame({"timestamp": ts})
    # All 101 events before a cutoff past the last: the window starts at the 75th-percentile event.
    assert ranker_window_start(ev, ts.iloc[-1] + pd.Timedelta(microseconds=1), 0.25) == ts.iloc[75]
    # Before the 81st event (80 events): the window starts at the 60th.
    assert ranker_window_start(ev, ts.iloc[80], 0.25) == ts.iloc[60]


def report_with(fit: dict[str, Any]) -> str:
    return format_report({"methods": [], "summary": {}, "fit": fit})


def test_the_text_report_says_what_was_measured_and_what_serves() -> None:
    on = FitRecord(refit_on_all=True, evaluated=window(8, 600), test_window_end=T0, served=window(10, 750))
    text = report_with(on.model_dump(mode="json"))
    assert "Measured: the fit on events before 2026-10-09" in text and "(600 positives)" in text
    assert "Served: the same models refit on all events up to 2026-10-10" in text and "750 positives" in text
    off = FitRecord(refit_on_all=False, evaluated=window(8, 6), test_window_end=T0, served=window(8, 6))
    assert "Served: the measured fit itself." in report_with(off.model_dump(mode="json"))
    skipped = off.model_copy(update={"refit_skipped": "single class"})
    assert "refit skipped: single class" in report_with(skipped.model_dump(mode="json"))
    assert "Served" not in format_report({"methods": [], "summary": {}})


def test_a_refit_that_cannot_train_serves_the_evaluated_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrec.pipeline import refit

    def no_rows(*args: Any) -> Any:
        raise TrainingDataError("the ranker window has a single class")

    monkeypatch.setattr(refit, "refit_on_all", no_rows)
    logged: list[str] = []
    state = PipelineState(tmp_path, TrainingConfig(), "run", log=logged.append)
    evaluated: Any = object()
    served, why = refit.serve_fit(state, None, pd.DataFrame(), evaluated)  # type: ignore[arg-type]
    assert served is evaluated and why == "TrainingDataError: the ranker window has a single class"
    assert any("refit on all data skipped" in m for m in logged)

    def job_failed(*args: Any) -> Any:  # on Ray Train the worker's error arrives as a ModelError
        raise ModelError("ranker training failed: only one class in the training split")

    monkeypatch.setattr(refit, "refit_on_all", job_failed)
    served, why = refit.serve_fit(state, None, pd.DataFrame(), evaluated)  # type: ignore[arg-type]
    assert served is evaluated and why is not None and why.startswith("ModelError: ")
    state.cfg.refit_on_all = False
    assert refit.serve_fit(state, None, pd.DataFrame(), evaluated) == (evaluated, None)  # type: ignore[arg-type]
