"""Daily drift and delayed-label quality on parquet logs written by RequestLog and a real events store."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.data.store import DataStore
from streamrec.errors import ConfigError
from streamrec.monitoring.drift import (
    DRIFT_COLUMNS,
    DriftConfig,
    feature_drift_by_day,
    quality_by_day,
    rate_interval,
)
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, ServedRecord
from tests.unit.test_skew import FEATURES, make_bundle, population, write_log

DAY0 = (datetime.now(UTC) - timedelta(days=6)).replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundles")


def five_days(data: Path, shift_day: int = 2, rows: int = 400) -> None:
    """Five days of traffic at noon; on day ``shift_day`` the two-tower score and the scores move up."""
    rng = np.random.default_rng(5)
    for day in range(5):
        x = population(rows, rng)
        scores = rng.beta(2, 5, rows)
        if day == shift_day:
            x[:, 2] += 0.3  # two standard deviations of the training two-tower score
            scores = rng.beta(5, 2, rows)
        write_log(data, x, start=DAY0 + timedelta(days=day, hours=12), scores=scores)


def test_shift_on_day_three_shows_in_that_days_psi(tmp_path: Path, bundle: Path) -> None:
    data = tmp_path / "data"
    five_days(data)
    drift = feature_drift_by_day(data, bundle_dir=bundle, since=DAY0)
    assert list(drift.columns) == list(DRIFT_COLUMNS)
    assert len(drift) == 5 * (len(FEATURES) + 1) and set(drift["model_version"]) == {"v1"}
    days = sorted(drift["day"].unique())
    tt = drift[drift["feature"] == "x_two_tower"].set_index("day")
    assert tt.loc[days[2], "psi_train"] > 0.2 and tt.loc[days[2], "psi_first_day"] > 0.2
    assert tt.loc[days[2], "status"] == "alert"
    quiet = [d for d in days if d != days[2]]
    assert (tt.loc[quiet, "psi_train"] < 0.1).all() and (tt.loc[quiet, "status"] == "ok").all()
    assert tt.loc[days[0], "psi_first_day"] == pytest.approx(0.0)  # the baseline against itself
    others = drift[drift["feature"].isin(["age", "engagement_rate_30d", "ctx_hour_sin"])]
    assert (others["psi_train"] < 0.1).all() and (others["status"] == "ok").all()
    score = drift[drift["kind"] == "prediction"].set_index("day")
    assert score["psi_train"].isna().all()  # no training histogram of the served scores
    assert score.loc[days[2], "psi_first_day"] > 0.2 and (score.loc[quiet, "psi_first_day"] < 0.1).all()


def test_a_thin_day_is_not_judged(tmp_path: Path, bundle: Path) -> None:
    data = tmp_path / "data"
    write_log(data, population(30, np.random.default_rng(1)), start=DAY0 + timedelta(hours=1))
    write_log(data, population(400, np.random.default_rng(2)), start=DAY0 + timedelta(days=1, hours=1))
    drift = feature_drift_by_day(data, bundle_dir=bundle, since=DAY0)
    thin = drift[drift["day"] == DAY0.date()]
    assert (thin["status"] == "insufficient").all() and thin["psi_train"].isna().all()
    # The baseline is the first day with enough rows, here the second.
    second = drift[drift["day"] == (DAY0 + timedelta(days=1)).date()]
    assert (second["psi_first_day"].abs() < 1e-12).all()


# ---- quality ---------------------------------------------------------------------------------


def serve_one(log: RequestLog, ts: datetime, user: int, items: list[int], version: str = "v1") -> None:
    log.record(
        ServedRecord(
            request_id=uuid.uuid4().hex,
            ts=ts.timestamp(),
            user_id=user,
            variant=None,
            model_version=version,
            level="full",
            reason=None,
            latency_ms=10.0,
            k=len(items),
            items=[(i, 0.5, ("two_tower",)) for i in items],
        )
    )


def events(rows: list[tuple[int, int, str, datetime]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [uuid.uuid4().hex for _ in rows],
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "label": [int(r[2] in ("click", "complete")) for r in rows],
            "timestamp": pd.to_datetime([r[3] for r in rows], utc=True),
        }
    )


def test_quality_joins_labels_within_the_window_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    t = DAY0 + timedelta(hours=8)
    log = RequestLog(data, RequestLogConfig(sample_rate=1.0), start=False)
    serve_one(log, t, user=1, items=[10, 11, 12, 13])
    serve_one(log, t + timedelta(hours=2), user=1, items=[10])  # item 10 again, later
    serve_one(log, t, user=2, items=[20, 21], version="v2")
    log.flush()
    h = timedelta(hours=1)
    DataStore(data).append_events(
        events(
            [
                (1, 10, "click", t + 3 * h),  # credited to the later impression of item 10 only
                (1, 11, "click", t + 23 * h),  # inside the 24 h window
                (1, 11, "complete", t + 23.5 * h),
                (1, 12, "click", t + 25 * h),  # outside the window
                (1, 13, "click", t - h),  # before the impression
                (9, 13, "click", t + h),  # another user
                (2, 20, "click", t + h),
                (2, 21, "view", t + h),  # not a click
                (3, 99, "impression", t + 3 * 24 * h),  # the store's labels reach three days on
            ]
        )
    )
    q = quality_by_day(data, since=DAY0).set_index("model_version")
    v1, v2 = q.loc["v1"], q.loc["v2"]
    assert (v1["impressions"], v1["clicks"], v1["completions"]) == (5, 2, 1)
    assert (v2["impressions"], v2["clicks"], v2["completions"]) == (2, 1, 0)
    assert v1["ctr"] == pytest.approx(0.4) and v1["ctr_low"] < 0.4 < v1["ctr_high"]
    assert bool(v1["labels_complete"]) is True
    # A wider window takes in the click 25 h after its impression.
    wide = quality_by_day(data, since=DAY0, config=DriftConfig(label_window_hours=26)).set_index(
        "model_version"
    )
    assert wide.loc["v1", "clicks"] == 3
    # Grouped by variant as well; an unknown grouping is refused.
    assert list(quality_by_day(data, since=DAY0, by=("model_version", "variant")).columns[:3]) == [
        "day",
        "model_version",
        "variant",
    ]
    with pytest.raises(ConfigError, match="user_id"):
        quality_by_day(data, by=("user_id",))


def test_labels_incomplete_until_the_store_covers_the_window(tmp_path: Path) -> None:
    data = tmp_path / "data"
    t = DAY0 + timedelta(hours=8)
    log = RequestLog(data, RequestLogConfig(sample_rate=1.0), start=False)
    serve_one(log, t, user=1, items=[10])
    log.flush()
    q = quality_by_day(data, since=DAY0)
    assert (q["clicks"].tolist(), bool(q["labels_complete"].iloc[0])) == ([0], False)
    DataStore(data).append_events(events([(1, 10, "click", t + timedelta(hours=30))]))
    assert (
        bool(quality_by_day(data, since=DAY0)["labels_complete"].iloc[0]) is False
    )  # day end + 24 h not reached
    DataStore(data).append_events(events([(5, 50, "view", t + timedelta(hours=41))]))
    assert bool(quality_by_day(data, since=DAY0)["labels_complete"].iloc[0]) is True


def test_wilson_interval() -> None:
    rate, low, high = rate_interval(1, 4)
    assert rate == 0.25 and low == pytest.approx(0.0456, abs=1e-4) and high == pytest.approx(0.6994, abs=1e-4)
    assert all(np.isnan(rate_interval(0, 0)))


# ---- the command -----------------------------------------------------------------------------


def test_cli_drift(tmp_path: Path, bundle: Path) -> None:
    data = tmp_path / "data"
    five_days(data)
    runner = CliRunner()
    res = runner.invoke(app, ["monitor", "drift", "--data-dir", str(data), "--bundle", str(bundle), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model_version"] == "v1" and len(out["feature_drift"]) == 25 and len(out["quality"]) == 5
    assert {a["feature"] for a in out["alerts"]} == {"x_two_tower", "score"}
    table = runner.invoke(app, ["monitor", "drift", "--data-dir", str(data), "--bundle", str(bundle)])
    assert table.exit_code == 0
    third = (DAY0 + timedelta(days=2)).date().isoformat()
    assert any(line.startswith(third) and "(x_two_tower)" in line for line in table.stdout.splitlines())
    assert f"ALERT {third}: 'x_two_tower' drifted" in table.stdout
    empty = runner.invoke(app, ["monitor", "drift", "--data-dir", str(tmp_path / "none")])
    assert empty.exit_code == 2 and "request_log.sample_rate" in empty.output
