"""The registry's event history: each change (what, when, why, the numbers) as a version tag."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streamrec.errors import ConfigError
from streamrec.registry.model import RegisteredModel
from streamrec.registry.versions import TAG

log = logging.getLogger(__name__)

_EVENT_TAG = TAG + "event."
_EVENT_NAME = re.compile(r"[a-z0-9_-]+")
_EVENT_MAX_CHARS = 20_000


@dataclass(frozen=True)
class RegistryEvent:
    """One recorded change of the registry (``streamrec registry history``).

    Attributes:
        at: When (UTC).
        version: The version it concerns.
        event: ``promoted``, ``refused``, ``rolled_back``, ``set``, ``forced``, ``cleared`` or
            another step name a caller records (e.g. a rollout step).
        alias: The alias it concerns.
        detail: Why, and the numbers (JSON-safe).
    """

    at: datetime
    version: int
    event: str
    alias: str
    detail: dict[str, Any] = field(default_factory=dict)


class EventLog:
    """Records a registered model's changes and reads them back.

    Args:
        model: The registered model.
    """

    def __init__(self, model: RegisteredModel) -> None:
        self._model = model

    def record(self, version: int, event: str, alias: str, **detail: Any) -> None:
        """Record one change (what, when, why, the numbers) as a tag of ``version``.

        Tags of the version that a change concerns, one per event: the record survives as long
        as the version does, and a registry server keeps it with no extra store.
        """
        if not _EVENT_NAME.fullmatch(event):
            raise ConfigError(
                f"event name {event!r} must match {_EVENT_NAME.pattern} (put free text in detail)"
            )
        at = datetime.now(UTC)
        key = f"{_EVENT_TAG}{at.strftime('%Y%m%dT%H%M%S.%f')}Z.{event}.{alias}.{uuid.uuid4().hex[:8]}"
        body = {"event": event, "alias": alias, **detail}
        value = json.dumps(body, default=str, sort_keys=True)
        if len(value) > _EVENT_MAX_CHARS:  # shorten the fields, never cut the JSON (it must parse)
            body = {
                k: (v[:1000] + "...") if isinstance(v, str) and len(v) > 1000 else v for k, v in body.items()
            }
            body.pop("metrics", None)
            value = json.dumps({**body, "truncated": True}, default=str, sort_keys=True)[:_EVENT_MAX_CHARS]
        try:
            self._model.client.set_model_version_tag(self._model.name, str(version), key, value)
        except Exception as err:  # the change itself happened; only its record is missing
            log.warning("could not record %s of version %d: %s", event, version, err)

    def history(self, limit: int | None = 50) -> list[RegistryEvent]:
        """Recorded changes, newest first (at most ``limit``)."""
        events: list[RegistryEvent] = []
        for info in self._model.versions():
            for key, value in info.tags.items():
                if not key.startswith(_EVENT_TAG):
                    continue
                try:
                    body = json.loads(value)
                    at = datetime.strptime(key[len(_EVENT_TAG) :].split("Z", 1)[0], "%Y%m%dT%H%M%S.%f")
                except (ValueError, TypeError):
                    log.warning("unreadable registry event %s on version %d", key, info.version)
                    continue
                event, alias = str(body.pop("event", "?")), str(body.pop("alias", "?"))
                events.append(RegistryEvent(at.replace(tzinfo=UTC), info.version, event, alias, body))
        events.sort(key=lambda e: e.at, reverse=True)
        return events if limit is None else events[:limit]
