"""Named JSON states kept with the registered model (e.g. a rollout), read with the aliases."""

from __future__ import annotations

import json
import logging
from typing import Any

from streamrec.errors import RegistryError
from streamrec.registry.model import RegisteredModel
from streamrec.registry.versions import TAG

log = logging.getLogger(__name__)

_STATE_TAG = TAG + "state."


class ServingState:
    """The aliases and named states serving follows, as registered-model tags.

    Args:
        model: The registered model.
    """

    def __init__(self, model: RegisteredModel) -> None:
        self._model = model

    def read(self) -> tuple[dict[str, int], dict[str, Any]]:
        """Every alias and every named state, from one read of the registry."""
        rm = self._model.fetch()
        if rm is None:
            return {}, {}
        aliases = {a: int(v) for a, v in (rm.aliases or {}).items()}
        states: dict[str, Any] = {}
        for key, value in (rm.tags or {}).items():
            if key.startswith(_STATE_TAG):
                try:
                    states[key[len(_STATE_TAG) :]] = json.loads(value)
                except ValueError:
                    log.warning("unreadable registry state %s: %r", key, value[:200])
        return aliases, states

    def write(self, name: str, value: dict[str, Any] | None) -> None:
        """Set (or with None remove) the named state ``name``.

        Raises:
            RegistryError: the registry could not be written.
        """
        key = _STATE_TAG + name
        client, model_name = self._model.client, self._model.name
        try:
            if value is None:
                if key in self._model.tags():
                    client.delete_registered_model_tag(model_name, key)
            else:
                client.set_registered_model_tag(model_name, key, json.dumps(value, default=str))
        except Exception as err:
            raise RegistryError(f"could not write registry state '{name}': {err}") from None
