"""HTTP API models: good bodies parse, bad ones fail with messages that name the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from streamrec.api_models import (
    MAX_EXCLUDE,
    ErrorBody,
    EventIn,
    EventsRequest,
    EventsResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    ResponseMetadata,
    error_from_validation,
)
from streamrec.data.schema import DEVICES

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def problems(model: Any, body: Any, **kw: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as ei:
        if isinstance(body, str):
            model.model_validate_json(body, **kw)
        else:
            model.model_validate(body, **kw)
    detail = error_from_validation(ei.value).detail
    assert isinstance(detail, list)
    return detail


def fields(ps: list[dict[str, str]]) -> list[str]:
    return [p["field"] for p in ps]


# ---------------------------------------------------------------------------------- /recommend


def test_recommend_request_defaults() -> None:
    req = RecommendRequest.model_validate_json('{"user_id": 7}')
    assert req.user_id == 7 and req.k == 20 and req.exclude == []
    assert req.context.device == "unknown" and req.context.timestamp is None


def test_recommend_request_full_body_and_utc_normalisation() -> None:
    req = RecommendRequest.model_validate_json(
        '{"user_id": 0, "k": 100, "exclude": [1, 2, 3],'
        ' "context": {"device": "tv", "timestamp": "2026-11-27T14:00:00+02:00"}}'
    )
    assert req.k == 100 and req.exclude == [1, 2, 3] and req.context.device == "tv"
    assert req.context.timestamp == datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    naive = RecommendRequest.model_validate({"user_id": 1, "context": {"timestamp": "2026-11-27T12:00:00"}})
    assert naive.context.timestamp is not None and naive.context.timestamp.tzinfo is UTC


@pytest.mark.parametrize("device", DEVICES)
def test_every_schema_device_is_accepted(device: str) -> None:
    assert (
        RecommendRequest.model_validate({"user_id": 1, "context": {"device": device}}).context.device
        == device
    )


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ('{"user_id": 1, "k": 0}', "k", "greater than or equal to 1"),
        ('{"user_id": 1, "k": 101}', "k", "less than or equal to 100"),
        ('{"user_id": 1, "k": "20"}', "k", "valid integer"),
        ('{"user_id": 1, "k": 2.5}', "k", "valid integer"),
        ('{"user_id": "abc"}', "user_id", "valid integer"),
        ('{"user_id": "5"}', "user_id", "valid integer"),
        ('{"user_id": true}', "user_id", "valid integer"),
        ('{"user_id": -1}', "user_id", "greater than or equal to 0"),
        ("{}", "user_id", "Field required"),
        ('{"user_id": 1, "kk": 5}', "kk", "unknown field 'kk'"),
        ('{"user_id": 1, "context": {"device": "phone"}}', "context.device", "'mobile'"),
        ('{"user_id": 1, "context": {"locale": "fr"}}', "context.locale", "unknown field"),
        ('{"user_id": 1, "context": {"timestamp": "yesterday"}}', "context.timestamp", "datetime"),
        ('{"user_id": 1, "exclude": [1, "x"]}', "exclude.1", "valid integer"),
        ('{"user_id": 1, "exclude": 5}', "exclude", "valid array"),
    ],
)
def test_bad_recommend_requests_fail_with_clear_messages(body: str, field: str, message: str) -> None:
    ps = problems(RecommendRequest, body)
    assert field in fields(ps)
    (p,) = [p for p in ps if p["field"] == field]
    assert message in p["message"], p


def test_exclude_is_capped() -> None:
    RecommendRequest.model_validate({"user_id": 1, "exclude": list(range(MAX_EXCLUDE))})
    ps = problems(RecommendRequest, {"user_id": 1, "exclude": list(range(MAX_EXCLUDE + 1))})
    assert fields(ps) == ["exclude"] and "at most 1000" in ps[0]["message"]


def test_recommend_response_round_trip() -> None:
    resp = RecommendResponse(
        user_id=3,
        items=[
            RecommendedItem(item_id=10, score=0.9, sources=["two_tower", "cf"], title="A", reasons=["fresh"]),
            RecommendedItem(item_id=11, score=0.5, sources=["trending"]),
        ],
        metadata=ResponseMetadata(
            model_version="dcn-v2:7",
            degradation_level="stale_features",
            experiment_variant="B",
            timings_ms={"retrieval": 4.2, "total": 11.0},
            unknown_exclude_ids=2,
            request_id="r-1",
        ),
    )
    again = RecommendResponse.model_validate_json(resp.model_dump_json())
    assert again == resp
    assert json.loads(resp.model_dump_json())["items"][1]["title"] is None


def test_response_metadata_rejects_unknown_level() -> None:
    ps = problems(
        ResponseMetadata, {"model_version": "x", "degradation_level": "degraded", "request_id": "r"}
    )
    assert fields(ps) == ["degradation_level"] and "'cached'" in ps[0]["message"]


# ------------------------------------------------------------------------------------ /events


def test_event_defaults_generate_id_and_server_time() -> None:
    before = datetime.now(UTC)
    a = EventIn.model_validate({"user_id": 1, "item_id": 2, "event_type": "click"})
    b = EventIn.model_validate({"user_id": 1, "item_id": 2, "event_type": "click"})
    assert a.event_id != b.event_id and len(a.event_id) == 32
    assert before <= a.timestamp <= datetime.now(UTC)
    assert a.session_id is None and a.device is None and a.watch_fraction is None


def test_event_full_body() -> None:
    ev = EventIn.model_validate(
        {
            "event_id": "e-1",
            "user_id": 1,
            "item_id": 2,
            "event_type": "complete",
            "timestamp": "2026-11-27T12:04:00Z",
            "session_id": "s",
            "device": "mobile",
            "watch_fraction": 1,
        },
        context={"now": NOW},
    )
    assert ev.event_id == "e-1" and ev.watch_fraction == 1.0
    assert ev.timestamp == datetime(2026, 11, 27, 12, 4, tzinfo=UTC)


def test_event_timestamp_in_the_future_is_rejected() -> None:
    base = {"user_id": 1, "item_id": 2, "event_type": "view"}
    ok = (NOW + timedelta(minutes=4, seconds=59)).isoformat()
    assert EventIn.model_validate({**base, "timestamp": ok}, context={"now": NOW})
    late = (NOW + timedelta(minutes=5, seconds=1)).isoformat()
    ps = problems(EventIn, {**base, "timestamp": late}, context={"now": NOW})
    assert fields(ps) == ["timestamp"]
    assert "301s in the future" in ps[0]["message"] and "check the client clock" in ps[0]["message"]
    # without a pinned clock, server time is used
    ps = problems(EventIn, {**base, "timestamp": "2999-01-01T00:00:00Z"})
    assert "in the future" in ps[0]["message"]
    # the past is fine
    assert EventIn.model_validate({**base, "timestamp": "2001-01-01T00:00:00Z"}).timestamp.year == 2001


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00"])
def test_timestamps_that_overflow_utc_are_value_errors(ts: str) -> None:
    # OverflowError from astimezone() escaped pydantic (a 500); it must be a validation error.
    event = {"user_id": 1, "item_id": 2, "event_type": "view", "timestamp": ts}
    for model, body, field in (
        (RecommendRequest, {"user_id": 1, "context": {"timestamp": ts}}, "context.timestamp"),
        (EventIn, event, "timestamp"),
    ):
        ps = problems(model, json.dumps(body), context={"now": NOW})
        assert fields(ps) == [field] and "outside years 1..9999" in ps[0]["message"], ps


def test_event_timestamp_before_the_epoch_is_rejected_like_the_data_contract() -> None:
    base = {"user_id": 1, "item_id": 2, "event_type": "view"}
    # The contract quarantines timestamps before 1970-01-01 UTC: acknowledging them loses them.
    for ts in ("1969-12-31T23:59:59Z", "1970-01-01T00:30:00+01:00", -1, "1900-01-01"):
        ps = problems(EventIn, {**base, "timestamp": ts}, context={"now": NOW})
        assert fields(ps) == ["timestamp"] and "before 1970-01-01" in ps[0]["message"], ts
    for ts in ("1970-01-01T00:00:00Z", 0, "1970-01-01T01:00:00+01:00"):
        ev = EventIn.model_validate({**base, "timestamp": ts}, context={"now": NOW})
        assert ev.timestamp == datetime(1970, 1, 1, tzinfo=UTC), ts


def test_event_timestamp_accepts_epoch_seconds() -> None:
    ev = EventIn.model_validate(
        {"user_id": 1, "item_id": 2, "event_type": "view", "timestamp": 1_700_000_000},
        context={"now": NOW},
    )
    assert ev.timestamp == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ({"event_type": "rating"}, "event_type", "'view', 'click', 'complete' or 'skip'"),
        ({"event_type": "impression"}, "event_type", "'view'"),
        ({"watch_fraction": 1.5}, "watch_fraction", "less than or equal to 1"),
        ({"watch_fraction": -0.1}, "watch_fraction", "greater than or equal to 0"),
        ({"device": "fridge"}, "device", "'mobile'"),
        ({"item_id": "7"}, "item_id", "valid integer"),
        ({"event_id": ""}, "event_id", "at least 1 character"),
        ({"referrer": "x"}, "referrer", "unknown field"),
    ],
)
def test_bad_events_fail_with_clear_messages(patch: dict[str, Any], field: str, message: str) -> None:
    body = {"user_id": 1, "item_id": 2, "event_type": "view", **patch}
    ps = problems(EventIn, body)
    assert fields(ps) == [field]
    assert message in ps[0]["message"], ps


def test_events_request_bounds() -> None:
    one = {"user_id": 1, "item_id": 2, "event_type": "skip"}
    assert len(EventsRequest.model_validate({"events": [one] * 1000}).events) == 1000
    assert "at least 1 item" in problems(EventsRequest, {"events": []})[0]["message"]
    assert "at most 1000" in problems(EventsRequest, {"events": [one] * 1001})[0]["message"]
    ps = problems(EventsRequest, {"events": [one, {**one, "event_type": "like"}]})
    assert fields(ps) == ["events.1.event_type"]


def test_events_response_and_error_body() -> None:
    assert EventsResponse(accepted=3, stored=2, duplicates=1).model_dump() == {
        "accepted": 3,
        "stored": 2,
        "duplicates": 1,
        "push_failed": 0,
    }
    with pytest.raises(ValidationError):
        EventsResponse(accepted=-1, stored=0, duplicates=0)
    body = ErrorBody(error="unauthorized", detail="missing API key")
    assert body.model_dump() == {"error": "unauthorized", "detail": "missing API key", "request_id": None}


def test_error_from_validation_lists_every_problem() -> None:
    with pytest.raises(ValidationError) as ei:
        RecommendRequest.model_validate({"user_id": -1, "k": 0, "extra": 1})
    body = error_from_validation(ei.value, request_id="r-9")
    assert body.error == "invalid_request" and body.request_id == "r-9"
    assert sorted(fields(body.detail)) == ["extra", "k", "user_id"]
    json.dumps(body.model_dump())  # serialisable as a response body
