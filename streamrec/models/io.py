"""Save and load model weights together with their constructor arguments.

A saved model is a directory holding two files:

* ``weights.pt`` — the ``state_dict`` (``torch.save``), loaded with ``weights_only=True`` so a
  checkpoint can never run code;
* ``model.json`` — the model class, its constructor kwargs, the SHA-256 of ``weights.pt``, the
  torch version and optional caller metadata (feature names, metrics, ...).

Both are written to temporary names and renamed into place, weights first, so a crash never
leaves a directory that looks complete. Any missing, truncated or corrupt file raises
:class:`~streamrec.errors.CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from torch import nn

from streamrec.errors import CorruptCheckpointError, ModelError
from streamrec.models.dcn import DCNv2
from streamrec.models.two_tower import TwoTowerModel

WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"
FORMAT = "streamrec.model"
FORMAT_VERSION = 1

#: Model classes :func:`load_model` can rebuild, by name.
MODEL_CLASSES: dict[str, type[nn.Module]] = {"TwoTowerModel": TwoTowerModel, "DCNv2": DCNv2}

M = TypeVar("M", bound=nn.Module)

_ADVICE = "retrain the model or pick another version"


def save_model(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` to the directory ``path`` (created if missing, files replaced).

    Args:
        model: A :class:`TwoTowerModel` or :class:`DCNv2` (a ``DistributedDataParallel``
            wrapper is unwrapped).
        path: Target directory.
        metadata: Extra JSON-serialisable information stored in ``model.json``.

    Returns:
        The directory written.

    Raises:
        ModelError: the model class is not one :func:`load_model` can rebuild.
    """
    model = getattr(model, "module", model)
    name = type(model).__name__
    if not isinstance(model, (TwoTowerModel, DCNv2)) or MODEL_CLASSES.get(name) is not type(model):
        raise ModelError(f"cannot save a {name}: only {sorted(MODEL_CLASSES)} can be saved and loaded")
    hparams = model.hparams
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp_w = out / f".{WEIGHTS_FILE}.tmp"
    torch.save(state, tmp_w)
    digest = _sha256(tmp_w)
    os.replace(tmp_w, weights)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": name,
        "kwargs": hparams,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
        "torch_version": torch.__version__,
        "saved_at": datetime.now(UTC).isoformat(),
        "metadata": metadata or {},
    }
    tmp_m = out / f".{META_FILE}.tmp"
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_m, out / META_FILE)
    return out


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``model.json`` of a saved model (class, kwargs, metadata, ...).

    Raises:
        CorruptCheckpointError: the file is missing or is not a StreamRec model description.
    """
    meta_path = _model_dir(path) / META_FILE
    if not meta_path.is_file():
        raise CorruptCheckpointError(
            f"no saved model at {meta_path.parent}: {meta_path} is missing; {_ADVICE}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(
            f"{meta_path} is unreadable or not valid JSON ({err}); {_ADVICE}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("kwargs"), dict):
        raise CorruptCheckpointError(f"{meta_path} is not a StreamRec model description; {_ADVICE}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{meta_path} has format version {meta.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; {_ADVICE}"
        )
    return meta


@overload
def load_model(
    path: str | os.PathLike[str], device: str | torch.device = ..., *, expected: None = ...
) -> nn.Module: ...


@overload
def load_model(path: str | os.PathLike[str], device: str | torch.device = ..., *, expected: type[M]) -> M: ...


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    expected: type[nn.Module] | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in eval mode, on ``device``.

    Args:
        path: The model directory (or either file in it).
        device: Where to put the weights.
        expected: When given, the class the model must have (e.g. ``DCNv2``); the return type
            follows it.

    Returns:
        The model, in eval mode.

    Raises:
        CorruptCheckpointError: a file is missing, truncated or corrupt (checksum mismatch,
            unreadable by ``torch.load``), or does not match the described architecture.
        ModelError: the model is of another class than ``expected``.
    """
    directory = _model_dir(path)
    meta = read_model_metadata(directory)
    meta_path = directory / META_FILE
    cls = MODEL_CLASSES.get(str(meta.get("class")))
    if cls is None:
        raise CorruptCheckpointError(
            f"{meta_path} names unknown model class {meta.get('class')!r}; {_ADVICE}"
        )
    if expected is not None and cls is not expected:
        raise ModelError(f"{directory} holds a {cls.__name__}, expected a {expected.__name__}")

    weights = directory / str(meta.get("weights_file", WEIGHTS_FILE))
    if not weights.is_file():
        raise CorruptCheckpointError(f"weights file {weights} is missing; {_ADVICE}")
    expected_digest = meta.get("weights_sha256")
    if expected_digest is not None and _sha256(weights) != expected_digest:
        raise CorruptCheckpointError(
            f"weights file {weights} is truncated or corrupt (SHA-256 differs from {meta_path}); {_ADVICE}"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle/zip errors, EOFError, ...
        raise CorruptCheckpointError(
            f"weights file {weights} cannot be read ({type(err).__name__}: {err}); {_ADVICE}"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"weights file {weights} does not hold a state_dict; {_ADVICE}")
    try:
        model = cls(**meta["kwargs"])
    except (TypeError, ValueError) as err:
        raise CorruptCheckpointError(
            f"{meta_path} has invalid constructor arguments ({err}); {_ADVICE}"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CorruptCheckpointError(
            f"weights file {weights} does not match the architecture in {meta_path} ({err}); {_ADVICE}"
        ) from None
    return model.to(device).eval()


def _model_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent if p.name in (WEIGHTS_FILE, META_FILE) and not p.is_dir() else p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise CorruptCheckpointError(f"weights file {path} cannot be read ({err}); {_ADVICE}") from None
    return h.hexdigest()
