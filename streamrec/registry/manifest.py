"""The bundle manifest (``manifest.json``): what a bundle holds, file digests, read, write, verify.

Bundles hold only tensors, numpy arrays, FAISS indexes and JSON; pickle-style files are
rejected, and this module never unpickles anything — it only hashes bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from streamrec.config import StrictModel, format_validation_error
from streamrec.errors import CorruptCheckpointError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "streamrec.bundle"

#: File suffixes that would need unpickling to read; never allowed in a bundle.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".dill", ".cloudpickle"})

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class FeatureHistogram(StrictModel):
    """A histogram of one training feature: ``len(edges) == len(counts) + 1``."""

    edges: list[float]
    counts: list[int]

    @model_validator(mode="after")
    def _shape(self) -> FeatureHistogram:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError(
                f"histogram needs len(edges) == len(counts) + 1, got {len(self.edges)} edges "
                f"and {len(self.counts)} counts"
            )
        return self


class FeatureStats(StrictModel):
    """Training-set statistics of one feature, kept for training/serving skew checks.

    A numeric feature has moments and a ``histogram``; a categorical one (the ranker's category
    and device ids) has ``categories``: the count of each value seen in training (the most
    frequent ones; the rest summed under :data:`OTHER_CATEGORY`).
    """

    count: int | None = Field(default=None, ge=0)
    mean: float | None = None
    std: float | None = Field(default=None, ge=0)
    min: float | None = None
    max: float | None = None
    null_fraction: float | None = Field(default=None, ge=0, le=1)
    histogram: FeatureHistogram | None = None
    categories: dict[str, int] | None = None


#: Key of :attr:`FeatureStats.categories` that sums the values not kept individually.
OTHER_CATEGORY = "__other__"


class BundleFile(StrictModel):
    """One file of a bundle: its path relative to the bundle directory, SHA-256 and size."""

    path: str
    sha256: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = PurePosixPath(v)
        if not v or p.is_absolute() or ".." in p.parts or "\\" in v or str(p) != v:
            raise ValueError(f"file path {v!r} must be a normalised relative POSIX path inside the bundle")
        if v == MANIFEST_FILE:
            raise ValueError(f"{MANIFEST_FILE} cannot list itself")
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{v!r} is a pickle file; bundles hold only tensors, arrays, indexes and JSON")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v


class FitWindow(StrictModel):
    """One fit of the models a bundle holds (retrieval models and ranker): what data it saw.

    Attributes:
        cutoff: The models saw the events strictly before this time.
        last_event: The newest event they saw.
        ranker_window_start: The ranker's labels come from ``[ranker_window_start, cutoff)``,
            candidates from retrieval models fit before ``ranker_window_start``.
        events: Events before ``cutoff``.
        positives: Positive events before ``cutoff`` (what the retrieval models learn from).
        users: Users the retrieval models know (with a positive before ``cutoff``).
        items_with_positives: Items with a positive before ``cutoff``.
        ranker_rows: The ranker's training rows.
        ranker_positive_rate: Their share of positives.
        ranker_val_auc: The ranker's AUC on its own validation rows (a training diagnostic,
            not a held-out measurement).
    """

    cutoff: datetime
    last_event: datetime
    ranker_window_start: datetime
    events: int = Field(ge=0)
    positives: int = Field(ge=0)
    users: int = Field(ge=0)
    items_with_positives: int = Field(ge=0)
    ranker_rows: int = Field(ge=0)
    ranker_positive_rate: float = Field(ge=0, le=1)
    ranker_val_auc: float | None = None

    @field_validator("cutoff", "last_event", "ranker_window_start")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


class FitRecord(StrictModel):
    """Which fit the metrics measure and which fit the bundle's files are (``manifest.fit``).

    The pipeline measures a fit made before the test cutoff on the test window (``evaluated``:
    the manifest's ``metrics`` and the registry's gates are its numbers), then by default
    refits the same models with the same hyper-parameters on all of history and bundles that
    (``served``; :mod:`streamrec.pipeline.refit`).

    Attributes:
        refit_on_all: ``served`` is a refit on all of history; ``False``: the bundle serves the
            evaluated fit itself (``served`` repeats ``evaluated``).
        evaluated: The fit whose test-window numbers are ``metrics``.
        test_window_end: The evaluated fit was measured on events in
            ``[evaluated.cutoff, test_window_end]``.
        served: The fit whose files this bundle holds.
        refit_skipped: Why a refit that was asked for did not happen (the bundle then serves
            the evaluated fit), or None.
    """

    refit_on_all: bool
    evaluated: FitWindow
    test_window_end: datetime
    served: FitWindow
    refit_skipped: str | None = None


class BundleManifest(StrictModel):
    """What a bundle contains and how it was made (``manifest.json``).

    Attributes:
        format: Always ``streamrec.bundle``.
        format_version: Version of this manifest layout.
        name: Human-readable bundle name, e.g. ``streamrec-20261127``.
        created_at: When the bundle was written (UTC; naive datetimes are taken as UTC).
        data_cutoff: The latest event time the served models' training data may contain: the
            test cutoff of the temporal split, or the last event when the bundle serves a refit
            on all of history (``fit``).
        git_sha: Commit of the code that trained the bundle.
        feature_schema_version: Version of the feature schema the models consume
            (``MAJOR.MINOR``; see :func:`schema_compatible`).
        feature_names: The features the models consume, in model order.
        files: Role (``query_tower``, ``item_embeddings``, ``faiss_index``, ``ranker``, ...) to file.
        metrics: Offline metrics, e.g. ``{"ndcg@10": 0.11, "recall@50": 0.3}``.
        eval_set_id: Fingerprint of the evaluation set the metrics were measured on
            (:func:`eval_set_fingerprint`); metrics are compared only between equal ids.
        feature_stats: Training-set statistics per feature (skew checks).
        config: The resolved training configuration.
        fit: The evaluated and the served fit (None in bundles trained before it was recorded).
    """

    format: Literal["streamrec.bundle"] = "streamrec.bundle"
    format_version: Literal[1] = 1
    name: str = Field(min_length=1)
    created_at: datetime
    data_cutoff: datetime
    git_sha: str = Field(min_length=1)
    feature_schema_version: str = Field(min_length=1)
    feature_names: list[str]
    files: dict[str, BundleFile] = Field(min_length=1)
    metrics: dict[str, float]
    eval_set_id: str = Field(min_length=1)
    feature_stats: dict[str, FeatureStats] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    fit: FitRecord | None = None

    @field_validator("created_at", "data_cutoff")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, x in v.items() if not math.isfinite(x))
        if bad:
            raise ValueError(f"metrics must be finite numbers: {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        dup = sorted({f for f in self.feature_names if self.feature_names.count(f) > 1})
        if dup:
            raise ValueError(f"duplicate feature names: {dup}")
        paths = [f.path for f in self.files.values()]
        if len(set(paths)) != len(paths):
            raise ValueError("two roles point at the same file")
        if self.data_cutoff > self.created_at:
            raise ValueError(f"data_cutoff {self.data_cutoff} is after created_at {self.created_at}")
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON form, as written to ``manifest.json`` and hashed by :meth:`digest`.

        Optional sections added after format version 1 are left out when unset, so that a
        manifest written before them keeps its bytes and its digest.
        """
        data = self.model_dump(mode="json")
        if data.get("fit") is None:
            data.pop("fit", None)
        return data

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of this manifest (it covers every file's hash)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(bundle_dir: str | os.PathLike[str], files: Mapping[str, str]) -> dict[str, BundleFile]:
    """Hash the files of a bundle being written, for :attr:`BundleManifest.files`.

    Args:
        bundle_dir: The bundle directory.
        files: Role to path relative to ``bundle_dir`` (POSIX separators).

    Returns:
        Role to :class:`BundleFile` with the current SHA-256 and size.

    Raises:
        CorruptCheckpointError: a file is missing.
    """
    root = Path(bundle_dir)
    out: dict[str, BundleFile] = {}
    for role, rel in files.items():
        p = root / rel
        if not p.is_file():
            raise CorruptCheckpointError(f"bundle file for role '{role}' not found: {p}")
        out[role] = BundleFile(path=rel, sha256=sha256_file(p), size=p.stat().st_size)
    return out


def eval_set_fingerprint(*parts: Any) -> str:
    """A stable id for an evaluation set, from the arrays or values that define it.

    Pass e.g. the test users, items and timestamps (numpy arrays are hashed by dtype, shape and
    bytes; anything else by its JSON form). Equal ids mean the metrics are comparable.

    Returns:
        ``"sha256:"`` followed by 16 hex digits.
    """
    h = hashlib.sha256()
    for part in parts:
        if hasattr(part, "tobytes") and hasattr(part, "dtype"):
            h.update(f"{part.dtype}|{getattr(part, 'shape', '')}|".encode())
            h.update(part.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return "sha256:" + h.hexdigest()[:16]


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: BundleManifest) -> Path:
    """Write ``manifest.json`` into ``bundle_dir`` atomically (temp file + rename).

    Write it last, after every file it lists: its presence marks the bundle complete.

    Returns:
        The path written.
    """
    root = Path(bundle_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / MANIFEST_FILE
    tmp = root / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def read_manifest(bundle_dir: str | os.PathLike[str]) -> BundleManifest:
    """Read and validate ``<bundle_dir>/manifest.json``.

    Raises:
        CorruptCheckpointError: the manifest is missing, not JSON, or does not validate.
    """
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} not found: not a StreamRec bundle (or written incompletely)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{path} is not readable JSON: {err}") from None
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as err:
        raise CorruptCheckpointError(format_validation_error(err, str(path))) from None


def verify_bundle(bundle_dir: str | os.PathLike[str], *, strict: bool = False) -> BundleManifest:
    """Check that a bundle holds what its manifest says.

    Every listed file must exist inside the directory (no symlink escapes) with the recorded
    size and SHA-256. Unlisted files (e.g. a run's ``*.config.json``) are tolerated in a local
    bundle but never registered (:meth:`ModelRegistry.register` uploads only listed files);
    with ``strict`` (used on downloads) they are an error.

    Args:
        bundle_dir: The bundle directory.
        strict: Also refuse files the manifest does not list.

    Returns:
        The validated manifest.

    Raises:
        CorruptCheckpointError: naming the first missing or altered file (or, with ``strict``,
            unlisted files).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise CorruptCheckpointError(f"bundle directory not found: {root}")
    manifest = read_manifest(root)
    real_root = root.resolve()
    for role, f in manifest.files.items():
        p = root / f.path
        if not p.is_file():
            raise CorruptCheckpointError(f"bundle {root}: file '{f.path}' (role '{role}') is missing")
        if real_root not in p.resolve().parents:
            raise CorruptCheckpointError(f"bundle {root}: file '{f.path}' points outside the bundle")
        size = p.stat().st_size
        if size != f.size:
            raise CorruptCheckpointError(
                f"bundle {root}: file '{f.path}' (role '{role}') has {size} bytes, manifest says {f.size} "
                "(truncated or replaced); re-download or retrain"
            )
        actual = sha256_file(p)
        if actual != f.sha256:
            raise CorruptCheckpointError(
                f"bundle {root}: file '{f.path}' (role '{role}') sha256 {actual[:12]}... does not match "
                f"manifest {f.sha256[:12]}... (corrupted); re-download or retrain"
            )
    listed = {f.path for f in manifest.files.values()} | {MANIFEST_FILE}
    extra = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if not p.is_dir() and p.relative_to(root).as_posix() not in listed
    )
    if extra and strict:
        raise CorruptCheckpointError(
            f"bundle {root}: files not listed in {MANIFEST_FILE}: {extra[:5]}; list them under 'files' "
            "or remove them"
        )
    if extra:
        log.debug("bundle %s: %d unlisted files are not part of the bundle: %s", root, len(extra), extra[:5])
    return manifest
