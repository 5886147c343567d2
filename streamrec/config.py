"""Typed configuration.

Every configuration file StreamRec reads is parsed into a pydantic model derived from
:class:`StrictModel`, which rejects unknown keys (a typo is an error, not a silent default).
:func:`load_config` turns pydantic's errors into one :class:`~streamrec.errors.ConfigError`
that names the file and the offending keys. :func:`record_config` writes the resolved
configuration next to a run's outputs so every result can be traced to its settings.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from streamrec.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config models: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render a pydantic error as one readable line naming each bad key."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        else:
            parts.append(f"'{loc}': {e['msg']}")
    return f"invalid configuration in {source}: " + "; ".join(parts)


def parse_config(data: Any, model: type[M], source: str = "<config>") -> M:
    """Validate already-loaded data against ``model``.

    Raises:
        ConfigError: naming every unknown, missing or mistyped key.
    """
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | os.PathLike[str], model: type[M]) -> M:
    """Load a YAML (or JSON) file into ``model``.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or does not match the model.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file not found: {p} (check the path)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    return parse_config(data, model, str(p))


def record_config(out_dir: str | os.PathLike[str], name: str, config: BaseModel | dict[str, Any]) -> Path:
    """Write the resolved configuration of a run as ``<out_dir>/<name>.config.json``.

    Args:
        out_dir: Directory of the run's outputs (created if missing).
        name: Run name, e.g. ``ingest-20261127T001500Z``.
        config: The resolved configuration (a model or a plain dict).

    Returns:
        The path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    path = out / f"{name}.config.json"
    path.write_text(json.dumps({"recorded_at": utc_stamp(), "config": payload}, indent=2, default=str))
    return path


def utc_stamp() -> str:
    """A compact UTC timestamp for run names, e.g. ``20261127T001500Z``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
