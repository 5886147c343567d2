"""Request and response models of the HTTP API (pydantic v2).

The gateway validates every body against these models before any stage runs; unknown keys are
rejected (a typo is a 422, not a silently ignored field). Ids and ``k`` are *strict* integers:
``"5"``, ``5.5`` and ``true`` are refused rather than coerced; ``watch_fraction`` is a strict number
(``"0.5"`` and ``true`` are refused). Datetimes are ISO 8601 strings or
Unix time (seconds; pydantic reads numbers above 2e10 as milliseconds); without an offset they are
taken as UTC, and all are normalised to UTC (one that cannot be expressed in UTC is a 422).

Endpoints (implemented by the gateway):

* ``POST /v1/recommend``: :class:`RecommendRequest` -> :class:`RecommendResponse`
* ``POST /v1/events``: :class:`EventsRequest` -> :class:`EventsResponse`
* any error: :class:`ErrorBody` (use :func:`error_from_validation` for 422 bodies)

Event timestamps are bounded as the data contract bounds them (:mod:`streamrec.data.contract`), so
an acknowledged event is never quarantined at export: not before :data:`MIN_EVENT_TIME` and not more
than :data:`MAX_CLOCK_SKEW` in the future. Tests (and replay) can pin "now" through the validation
context: ``EventIn.model_validate(data, context={"now": t})``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from streamrec.data.contract import DEFAULT_FUTURE_SKEW
from streamrec.data.schema import DEVICES, EVENT_TYPES
from streamrec.resilience import DegradationLevel
from streamrec.timeutil import utc

#: A device named in a request context (the values of :data:`streamrec.data.schema.DEVICES`).
Device = Literal["mobile", "web", "tv", "tablet", "unknown"]
#: Event types the API accepts (a subset of :data:`streamrec.data.schema.EVENT_TYPES`;
#: impressions are logged by the server itself and ratings come only from batch sources).
ApiEventType = Literal["view", "click", "complete", "skip"]

if set(get_args(Device)) != set(DEVICES):  # pragma: no cover - guards drift from the schema
    raise RuntimeError(f"api_models.Device {get_args(Device)} is out of sync with schema.DEVICES {DEVICES}")
if not set(get_args(ApiEventType)) <= set(EVENT_TYPES):  # pragma: no cover
    raise RuntimeError(f"api_models.ApiEventType {get_args(ApiEventType)} is not within {EVENT_TYPES}")

#: How far in the future an event timestamp may be (client clock skew).
MAX_CLOCK_SKEW = timedelta(minutes=5)
#: Earliest event timestamp: the data contract quarantines earlier ones (``timestamp_before_epoch``).
MIN_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)

if MAX_CLOCK_SKEW > DEFAULT_FUTURE_SKEW:  # pragma: no cover - an accepted event must pass the contract
    raise RuntimeError(
        f"api_models.MAX_CLOCK_SKEW {MAX_CLOCK_SKEW} exceeds the contract's {DEFAULT_FUTURE_SKEW}"
    )

#: Most items a request may ask for.
MAX_K = 100
#: Most ids in a request's ``exclude`` list.
MAX_EXCLUDE = 1000
#: Most events in one ``POST /events`` body.
MAX_EVENTS = 1000

Id = Annotated[StrictInt, Field(ge=0, description="A non-negative integer id.")]
ShortStr = Annotated[str, Field(min_length=1, max_length=128)]
#: A point in time as the API reads it. The published schema says what is accepted (pydantic's
#: default, a ``date-time`` string, would call valid Unix times and date-only strings invalid).
Timestamp = Annotated[
    datetime,
    WithJsonSchema(
        {
            "anyOf": [{"type": "string"}, {"type": "number"}],
            "description": (
                "ISO 8601 (2026-11-27T10:00:00Z, 2026-11-27T11:00:00+01:00, 2026-11-27; without an "
                "offset: UTC) or Unix time as a number or numeric string (seconds, fractions allowed; "
                "above 2e10: milliseconds). Converted to UTC."
            ),
        }
    ),
]


class ApiModel(BaseModel):
    """Base of every API body: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


def _as_utc(value: datetime | None) -> datetime | None:
    # utc() raises ValueError out of range, which pydantic answers with a 422 (not a 500).
    return None if value is None else utc(value)


def _now(info: ValidationInfo) -> datetime:
    ctx = info.context if isinstance(info.context, dict) else {}
    now = ctx.get("now")
    if isinstance(now, datetime):
        return _as_utc(now) or datetime.now(UTC)
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------- /recommend


class RequestContext(ApiModel):
    """Where and when the request is made.

    Attributes:
        device: One of :data:`streamrec.data.schema.DEVICES`.
        timestamp: Client time of the request (UTC); the server's time when omitted.
    """

    device: Device = "unknown"
    timestamp: Timestamp | None = None

    @field_validator("timestamp")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)


class RecommendRequest(ApiModel):
    """Body of ``POST /recommend``.

    Attributes:
        user_id: The user (non-negative integer; unknown users get cold-start recommendations).
        k: How many items to return, 1..100.
        context: Device and time of the request.
        exclude: Item ids never to return (at most 1000); ids unknown to the catalog are counted
            in the response's ``metadata.unknown_exclude_ids``.
    """

    user_id: Id
    k: Annotated[StrictInt, Field(ge=1, le=MAX_K)] = 20
    context: RequestContext = Field(default_factory=RequestContext)
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE)


class RecommendedItem(ApiModel):
    """One recommended item.

    Attributes:
        item_id: The item.
        score: Final score after re-ranking (higher is better; comparable within a response).
        sources: Retrieval sources that produced the item (e.g. ``two_tower``, ``trending``).
        title: Display title when known.
        reasons: Re-ranking adjustments applied (e.g. ``promoted_boost``, ``freshness_quota``).
    """

    item_id: int
    score: float
    sources: list[str]
    title: str | None = None
    reasons: list[str] | None = None


class ResponseMetadata(ApiModel):
    """How a response was produced.

    Attributes:
        model_version: Ranker model version that served (or the fallback's name).
        degradation_level: Which level of the fallback chain served the request.
        degradation_reason: Why the request was not served at ``full`` (each failed dependency
            or level and what was served instead); None at ``full``.
        experiment_variant: A/B or canary variant, when the user is in an experiment.
        timings_ms: Milliseconds per stage (e.g. ``features``, ``retrieval``, ``ranking``, ``total``).
        unknown_exclude_ids: How many ``exclude`` ids are not in the catalog.
        request_id: Id to quote when reporting a problem; also in the logs.
    """

    model_version: str
    degradation_level: DegradationLevel
    degradation_reason: str | None = None
    experiment_variant: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    unknown_exclude_ids: int = Field(default=0, ge=0)
    request_id: str


class RecommendResponse(ApiModel):
    """Body returned by ``POST /recommend``.

    Attributes:
        user_id: The user the items are for.
        items: Ranked items, best first.
        metadata: Model version, degradation level, experiment variant, timings, request id.
    """

    user_id: int
    items: list[RecommendedItem]
    metadata: ResponseMetadata


# ------------------------------------------------------------------------------------ /events


class EventIn(ApiModel):
    """One interaction reported by a client.

    Attributes:
        event_id: Idempotency key; a random UUID is generated when omitted (then a retried
            request cannot be deduplicated — clients should send one).
        user_id: The user.
        item_id: The item.
        event_type: ``view``, ``click``, ``complete`` or ``skip``.
        timestamp: When it happened (UTC); the server's time when omitted. Rejected if before
            1970-01-01T00:00:00Z or more than five minutes in the future (the data contract's
            bounds, so that an accepted event is never quarantined at export).
        session_id: Client session, if any.
        device: One of :data:`streamrec.data.schema.DEVICES`, if known.
        watch_fraction: Share of the item watched, 0..1, if known (a JSON number: ``"0.5"`` and
            ``true`` are refused, not coerced).
        experiment_variant: The ``metadata.experiment_variant`` of the recommendation the event
            answers, if any; when omitted the server looks the user's variant up (assignment is
            deterministic), so the log keeps it either way.
    """

    event_id: ShortStr = Field(default_factory=lambda: uuid.uuid4().hex)
    user_id: Id
    item_id: Id
    event_type: ApiEventType
    timestamp: Timestamp = Field(default_factory=lambda: datetime.now(UTC))
    session_id: ShortStr | None = None
    device: Device | None = None
    watch_fraction: Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    experiment_variant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None

    @field_validator("timestamp")
    @classmethod
    def _timestamp_within_contract(cls, value: datetime, info: ValidationInfo) -> datetime:
        now = _now(info)
        ts = utc(value)
        if ts < MIN_EVENT_TIME:
            raise ValueError(
                f"timestamp {ts.isoformat()} is before {MIN_EVENT_TIME.isoformat()}; "
                "the event store holds nothing before the Unix epoch"
            )
        if ts - now > MAX_CLOCK_SKEW:
            raise ValueError(
                f"timestamp {ts.isoformat()} is {(ts - now).total_seconds():.0f}s in the future "
                f"(more than {int(MAX_CLOCK_SKEW.total_seconds())}s ahead of server time "
                f"{now.isoformat()}); check the client clock"
            )
        return ts


class EventsRequest(ApiModel):
    """Body of ``POST /events``: 1 to 1000 events.

    Attributes:
        events: The events; each is validated, and one bad event rejects the whole body.
    """

    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(ApiModel):
    """Body returned by ``POST /v1/events``.

    Attributes:
        accepted: Events that passed validation.
        stored: Events newly written (accepted minus duplicates).
        duplicates: Events whose ``event_id`` had been seen before (not written again).
        push_failed: Stored events the streaming-features push did not take (the sink failed or
            its circuit breaker is open). They are durable in the log and reach training at the
            next export; the online features miss them.
    """

    accepted: int = Field(ge=0)
    stored: int = Field(ge=0)
    duplicates: int = Field(ge=0)
    push_failed: int = Field(default=0, ge=0)


# ------------------------------------------------------------------------------ /admin/items

#: Most items in one ``POST /v1/admin/items`` body.
MAX_CATALOGUE_ITEMS = 10_000


class CatalogueItem(ApiModel):
    """One item upsert: the fields given replace the item's; the others keep their value.

    Attributes:
        item_id: The item.
        title: Display title.
        categories: Category names (replace the item's categories).
        creator: Creator name.
        published_at: Publication time (UTC).
        promoted: Whether the promotion rule boosts it.
        flagged: Content-policy flag: a flagged item is never served once the upsert is answered.
    """

    item_id: Id
    title: Annotated[str, Field(max_length=1000)] | None = None
    categories: Annotated[list[ShortStr], Field(max_length=64)] | None = None
    creator: ShortStr | None = None
    published_at: Timestamp | None = None
    promoted: StrictBool | None = None
    flagged: StrictBool | None = None

    @field_validator("published_at")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)


class ItemsUpsertRequest(ApiModel):
    """Body of ``POST /v1/admin/items``: 1 to 10,000 item upserts."""

    items: Annotated[list[CatalogueItem], Field(min_length=1, max_length=MAX_CATALOGUE_ITEMS)]


class ItemsUpsertResponse(ApiModel):
    """Body returned by ``POST /v1/admin/items``.

    Attributes:
        accepted: Upserts written to the catalogue log (durable when this is answered).
        catalogue_lines: Lines in the catalogue log after them.
        flagged: Item ids this request flagged: no replica serves them from now on.
    """

    accepted: int = Field(ge=0)
    catalogue_lines: int = Field(ge=0)
    flagged: list[int]


# ------------------------------------------------------------------------------------- errors


class ErrorBody(ApiModel):
    """Body of every error response.

    Attributes:
        error: Short machine-readable code, e.g. ``invalid_request``, ``unauthorized``,
            ``rate_limited``, ``internal``.
        detail: Human-readable explanation, or a list of per-field problems (see
            :func:`error_from_validation`).
        request_id: Request id, when one was assigned.
    """

    error: str
    detail: Any = None
    request_id: str | None = None


def error_from_validation(err: ValidationError, request_id: str | None = None) -> ErrorBody:
    """Turn a pydantic :class:`~pydantic.ValidationError` into a 422 :class:`ErrorBody`.

    Each problem becomes ``{"field": "context.device", "message": "...", "type": "..."}``;
    unknown keys read ``unknown field 'x'``.

    Args:
        err: The validation error.
        request_id: The request's id, if assigned.
    """
    problems = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "<body>"
        msg = f"unknown field '{loc}'" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append({"field": loc, "message": msg, "type": e["type"]})
    return ErrorBody(error="invalid_request", detail=problems, request_id=request_id)
