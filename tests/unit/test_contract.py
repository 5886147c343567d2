"""Data contract rules on hand-built frames; the valid + quarantined invariant."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd

from streamrec.data.contract import EVENT_RULES, validate_events

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def _ev(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1", "user_id": 1, "item_id": 10, "event_type": "click", "label": 1,
        "timestamp": pd.Timestamp("2026-10-01", tz="UTC"), "device": "mobile", "rating": None,
        "watch_fraction": 0.5,
    }  # fmt: skip
    base.update(kw)
    return base


def test_each_rule_fires_once() -> None:
    rows = [
        _ev(event_id="ok"),
        _ev(event_id="m", user_id=None),
        _ev(event_id="t", event_type="purchase"),
        _ev(event_id="l", label=3),
        _ev(event_id="r", rating=7.0),
        _ev(event_id="w", watch_fraction=1.5),
        _ev(event_id="d", device="fridge"),
        _ev(event_id="b", timestamp=pd.Timestamp("1960-01-01", tz="UTC")),
        _ev(event_id="f", timestamp=pd.Timestamp("2027-01-01", tz="UTC")),
        _ev(event_id="u", user_id=2),
        _ev(event_id="i", item_id=11),
        _ev(event_id="ok"),
    ]
    res = validate_events(pd.DataFrame(rows), [1], [10], now=NOW)
    assert len(res.valid) == 1 and res.valid["event_id"].tolist() == ["ok"]
    assert res.counts == {rule: 1 for rule in EVENT_RULES}
    assert len(res.valid) + len(res.quarantined) == len(rows)
    assert res.quarantined["reason"].tolist() == list(EVENT_RULES)


def test_first_failing_rule_wins_and_duplicates_only_among_valid() -> None:
    rows = [_ev(event_id="x", user_id=99), _ev(event_id="x")]
    res = validate_events(pd.DataFrame(rows), [1], [10], now=NOW)
    # The first row is invalid (unknown user), so the second is not a duplicate of a stored row.
    assert res.quarantined["reason"].tolist() == ["unknown_user"]
    assert res.valid["event_id"].tolist() == ["x"]
