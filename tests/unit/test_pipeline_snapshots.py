"""Where the training pipeline builds feature snapshots, whatever the history's length."""

from __future__ import annotations

import pandas as pd

from streamrec.pipeline.snapshots import snapshot_times

T0 = pd.Timestamp("2016-01-01T00:00:00Z")


def _days(*offsets: float) -> pd.Series:
    return pd.Series([T0 + pd.Timedelta(days=d) for d in offsets])


def test_split_times_are_snapshots_exactly_and_event_days_at_midnight() -> None:
    ev = _days(0.5, 0.7, 3.2, 10.9)
    t_rank, t_test = T0 + pd.Timedelta(days=3, hours=1), T0 + pd.Timedelta(days=10, hours=2)
    got = snapshot_times(ev, windows=[(t_rank, t_test)], points=[t_rank, t_test])
    days = [T0 + pd.Timedelta(days=d) for d in (0, 3, 10)]
    assert got == sorted([*days, t_rank, t_test])  # each once, sorted


def test_a_long_history_keeps_its_label_windows_and_the_split_times_under_the_bound() -> None:
    # ten years, one event a day; the ranker window is one month eight years in
    ev = _days(*[float(d) + 0.5 for d in range(3650)])
    start, stop = T0 + pd.Timedelta(days=2920, hours=6), T0 + pd.Timedelta(days=2950, hours=6)
    got = snapshot_times(ev, windows=[(start, stop)], points=[start, stop], max_daily=40)
    window_days = [T0 + pd.Timedelta(days=d) for d in range(2920, 2951)]
    assert set(window_days) <= set(got)  # every day of the label window, though years from the end
    assert start in got and stop in got
    assert len(got) == 40 + 2  # the bound, plus the two split times (not at midnight)
    newest = [T0 + pd.Timedelta(days=d) for d in range(3641, 3650)]  # 40 - 31 window days
    assert set(newest) <= set(got)  # the rest of the bound goes to the newest days


def test_one_day_of_history() -> None:
    ev = _days(0.1, 0.2, 0.9)
    t = T0 + pd.Timedelta(hours=12)
    got = snapshot_times(ev, windows=[(T0 + pd.Timedelta(hours=6), t)], points=[t, T0 + pd.Timedelta(days=1)])
    assert got == [T0, t, T0 + pd.Timedelta(days=1)]
