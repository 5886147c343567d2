"""The one reader of times: ISO text or datetimes, naive meaning UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest

from streamrec.timeutil import epoch_s, utc


def test_naive_means_utc_and_zones_convert() -> None:
    assert utc("2026-12-04T10:00:00") == datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert utc("2026-12-04T11:00:00+01:00") == datetime(2026, 12, 4, 10, tzinfo=UTC)
    plus2 = datetime(2026, 12, 4, 12, tzinfo=timezone(timedelta(hours=2)))
    assert utc(plus2).tzinfo == UTC and utc(plus2).hour == 10
    assert utc(datetime(2026, 12, 4, 10)).tzinfo == UTC


def test_epoch_seconds_of_text_datetimes_and_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    # A naive time is UTC whatever the machine's zone (datetime.timestamp() would use local time).
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert epoch_s("1970-01-01T00:01:40") == 100.0
        assert datetime(1970, 1, 1, 0, 1, 40).timestamp() != 100.0  # what the old readers did
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert epoch_s("1970-01-01T00:01:40") == 100.0
    assert epoch_s("1970-01-01T01:01:40+01:00") == 100.0
    assert epoch_s(100) == 100.0 and epoch_s(100.5) == 100.5


def test_bad_text_and_out_of_range_times_are_value_errors() -> None:
    with pytest.raises(ValueError):
        utc("yesterday")
    with pytest.raises(ValueError, match="NaT"):
        utc(pd.NaT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        epoch_s(True)
    with pytest.raises(ValueError, match="outside years 1..9999"):
        utc("0001-01-01T00:00:00+01:00")
