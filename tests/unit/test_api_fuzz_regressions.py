"""Regression examples found by the schema-driven API fuzz (tests/e2e/test_api_fuzz.py), kept as
plain unit tests so they run without training a model."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from streamrec.api_models import EventIn, EventsRequest, RecommendRequest

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _validator(model: Any) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(model.model_json_schema())


# The fuzz sent {"context": {"timestamp": 0}}: the API answered 200 (Unix time is documented),
# but the published schema said `string` (format date-time) or null, so the schema called a
# request the API serves invalid. The schema now says what the API reads.
@pytest.mark.parametrize(
    "ts",
    [0, 1.5, 1_795_000_000, "1795000000", "2026-11-27", "2026-11-27T10:00:00Z", "2026-11-27T11:00:00+01:00"],
)
def test_the_published_timestamp_schema_admits_every_form_the_api_accepts(ts: object) -> None:
    body = {"user_id": 1, "context": {"timestamp": ts}}
    assert RecommendRequest.model_validate(body).context.timestamp is not None
    _validator(RecommendRequest).validate(body)
    event = {"user_id": 1, "item_id": 2, "event_type": "view", "timestamp": ts}
    assert EventIn.model_validate(event, context={"now": NOW}).timestamp.tzinfo is not None
    _validator(EventsRequest).validate({"events": [event]})


@pytest.mark.parametrize("ts", [True, [], {}, {"seconds": 1}])
def test_timestamps_of_other_types_are_invalid_in_both_the_schema_and_the_api(ts: object) -> None:
    body = {"user_id": 1, "context": {"timestamp": ts}}
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate(body)
    with pytest.raises(jsonschema.ValidationError):
        _validator(RecommendRequest).validate(body)


def _events_body(watch_fraction: str) -> str:
    event = '{"user_id": 1, "item_id": 2, "event_type": "complete", "watch_fraction": ' + watch_fraction + "}"
    return '{"events": [' + event + "]}"


# The fuzz sent {"watch_fraction": true} (a boolean where the schema says number) and it was
# stored as 1.0: pydantic's lax float coerced booleans and numeric strings. Ids were strict
# already; watch_fraction is now too.
@pytest.mark.parametrize("raw", ["true", "false", '"0.5"', '"1"'])
def test_watch_fraction_is_a_strict_number(raw: str) -> None:
    body = _events_body(raw)
    with pytest.raises(ValidationError, match="watch_fraction"):
        EventsRequest.model_validate_json(body)


@pytest.mark.parametrize(("raw", "value"), [("0", 0.0), ("1", 1.0), ("0.25", 0.25), ("null", None)])
def test_watch_fraction_numbers_are_accepted(raw: str, value: float | None) -> None:
    body = _events_body(raw)
    assert EventsRequest.model_validate_json(body).events[0].watch_fraction == value
