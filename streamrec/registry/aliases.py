"""The aliases serving uses, and how they move: each keeps a history that rollback restores."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from streamrec.errors import ConfigError, RegistryError
from streamrec.registry.model import RegisteredModel
from streamrec.registry.versions import TAG

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
SHADOW = "shadow"
#: The aliases the registry manages.
ALIASES: tuple[str, ...] = (CHAMPION, CHALLENGER, SHADOW)

_HISTORY_TAG = TAG + "alias_history."
_HISTORY_KEEP = 20


def check_alias(alias: str) -> None:
    """Raise :class:`~streamrec.errors.ConfigError` unless ``alias`` is one the registry manages."""
    if alias not in ALIASES:
        raise ConfigError(f"unknown alias '{alias}': use one of {', '.join(ALIASES)}")


class AliasHistory:
    """Moves the aliases of a registered model, recording each one's previous holders.

    Args:
        model: The registered model.
    """

    def __init__(self, model: RegisteredModel) -> None:
        self._model = model

    def get(self, alias: str) -> list[int]:
        """The versions ``alias`` pointed at before, oldest first (at most the last 20)."""
        raw = self._model.tags().get(_HISTORY_TAG + alias, "[]")
        try:
            return [int(v) for v in json.loads(raw)]
        except (ValueError, TypeError):
            log.warning("unreadable alias history for %s: %r; starting afresh", alias, raw)
            return []

    def _set(self, alias: str, history: list[int]) -> None:
        self._model.client.set_registered_model_tag(
            self._model.name, _HISTORY_TAG + alias, json.dumps(history[-_HISTORY_KEEP:])
        )

    def move(self, alias: str, version: int, *, reason: str) -> int | None:
        """Push the current holder on the alias history, then move the alias (undoing on failure).

        Returns:
            The version the alias pointed at before (None if unset).
        """
        client, name = self._model.client, self._model.name
        previous = self._model.aliases().get(alias)
        if previous == version:
            return previous
        history = self.get(alias)
        if previous is not None:
            self._set(alias, [*history, previous])
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except Exception as err:
            if previous is not None:
                self._set(alias, history)
            raise RegistryError(
                f"could not move alias '{alias}' to version {version}: {err}; unchanged"
            ) from None
        try:
            now = datetime.now(UTC).isoformat()
            client.set_model_version_tag(name, str(version), f"{TAG}{alias}.{reason}_at", now)
            client.set_model_version_tag(name, str(version), f"{TAG}{alias}.previous", str(previous))
        except Exception as err:  # pragma: no cover - audit tag only
            log.warning("could not tag version %d: %s", version, err)
        return previous

    def roll_back(self, alias: str) -> tuple[int | None, int]:
        """Move ``alias`` back to the last version on its history, and pop it.

        Returns:
            ``(version it pointed at, version it points at now)``.

        Raises:
            RegistryError: there is no previous version to go back to, or it could not be moved.
        """
        client, name = self._model.client, self._model.name
        history = self.get(alias)
        current = self._model.aliases().get(alias)
        if not history:
            raise RegistryError(f"alias '{alias}' has no previous version to roll back to (now {current})")
        target = history[-1]
        self._model.version(target)  # exists?
        try:
            client.set_registered_model_alias(name, alias, str(target))
        except Exception as err:
            raise RegistryError(
                f"rollback of '{alias}' to version {target} failed: {err}; unchanged"
            ) from None
        self._set(alias, history[:-1])
        if current is not None:
            client.set_model_version_tag(
                name, str(current), f"{TAG}{alias}.rolled_back_at", datetime.now(UTC).isoformat()
            )
        log.warning("rolled back '%s' from version %s to %d", alias, current, target)
        return current, target

    def clear(self, alias: str) -> int | None:
        """Remove ``alias``; returns the version it pointed at (None if it was not set)."""
        current = self._model.aliases().get(alias)
        if current is not None:
            self._model.client.delete_registered_model_alias(self._model.name, alias)
        return current
