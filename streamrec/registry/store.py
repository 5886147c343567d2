"""Model bundles and the MLflow model registry with promotion gates.

A *bundle* is one directory holding everything a trained StreamRec model needs at serving time
(query-tower weights, item embeddings, the FAISS index, ranker weights, ...) plus a
``manifest.json`` (:class:`BundleManifest`) that lists every file with its SHA-256, the feature
schema, the training-set feature statistics, the offline metrics and the id of the evaluation
set they were measured on. Bundles hold only tensors (``torch.save`` of a ``state_dict``, read
with ``torch.load(..., weights_only=True)``), numpy arrays (read with ``allow_pickle=False``),
FAISS indexes and JSON: pickle-style files are rejected, and this module never unpickles
anything itself — it only hashes and copies bytes.

:class:`ModelRegistry` stores each bundle as one MLflow run (params, metrics, tags, the bundle
as artifacts) and one registered model version whose source is that artifact directory.
Aliases ``champion``, ``challenger`` and ``shadow`` name the versions serving uses; the champion
moves only through :meth:`ModelRegistry.promote`, which applies three gates in order:

1. the bundle downloads, verifies and passes the caller's smoke test (load + score a batch);
2. its feature schema is compatible with the champion's (:func:`schema_compatible`);
3. no metric shared with the champion regresses by more than a relative tolerance, compared
   only when both were measured on the same evaluation set.

A refusal raises :class:`~streamrec.errors.PromotionRefusedError` naming the gate and the gap;
the champion is untouched. See ``docs/adr/ADR-003-model-registry.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator

from streamrec.config import StrictModel, format_validation_error
from streamrec.errors import (
    ConfigError,
    CorruptCheckpointError,
    PromotionRefusedError,
    RegistryError,
)
from streamrec.paths import DataLayout, exclusive_file_lock

if TYPE_CHECKING:  # mlflow is imported lazily: building a manifest must stay cheap.
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "streamrec.bundle"
ARTIFACT_PATH = "bundle"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

CHAMPION = "champion"
CHALLENGER = "challenger"
SHADOW = "shadow"
#: The aliases the registry manages.
ALIASES: tuple[str, ...] = (CHAMPION, CHALLENGER, SHADOW)

#: File suffixes that would need unpickling to read; never allowed in a bundle.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".dill", ".cloudpickle"})

#: Metric base names (before any ``@k``) where lower is better; all others: higher is better.
LOWER_IS_BETTER = frozenset({"loss", "logloss", "log_loss", "bce", "mse", "rmse", "mae", "latency_ms"})

_TAG = "streamrec."
_HISTORY_TAG = _TAG + "alias_history."
_STATE_TAG = _TAG + "state."
_EVENT_TAG = _TAG + "event."
_EVENT_NAME = re.compile(r"[a-z0-9_-]+")
_EVENT_MAX_CHARS = 20_000
_HISTORY_KEEP = 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Bundle manifest
# --------------------------------------------------------------------------------------------


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


class BundleManifest(StrictModel):
    """What a bundle contains and how it was made (``manifest.json``).

    Attributes:
        format: Always ``streamrec.bundle``.
        format_version: Version of this manifest layout.
        name: Human-readable bundle name, e.g. ``streamrec-20261127``.
        created_at: When the bundle was written (UTC; naive datetimes are taken as UTC).
        data_cutoff: The latest event time the training data may contain (the temporal split).
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

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of this manifest (it covers every file's hash)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
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
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
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


# --------------------------------------------------------------------------------------------
# Gate logic (pure functions, usable without MLflow)
# --------------------------------------------------------------------------------------------


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def schema_compatible(candidate: BundleManifest, champion: BundleManifest) -> tuple[bool, str]:
    """Whether ``candidate`` can replace ``champion`` without changing what serving provides.

    The rule: equal ``feature_schema_version`` with the same set of feature names is
    compatible; a different version is compatible only when the MAJOR part (before the first
    dot) is the same and every candidate feature is one the champion already consumes (so the
    online feature store, which serves the champion, serves the candidate too). Anything else
    needs the feature pipeline rolled out first and an explicit ``allow_schema_change``.

    Returns:
        ``(compatible, explanation)``.
    """
    cv, pv = candidate.feature_schema_version, champion.feature_schema_version
    cand, champ = set(candidate.feature_names), set(champion.feature_names)
    missing = sorted(cand - champ)
    if cv == pv:
        if cand == champ:
            return True, f"same feature schema version {cv}"
        return False, (
            f"same feature schema version {cv} but different features (new: {missing[:10]}, "
            f"dropped: {sorted(champ - cand)[:10]}): bump feature_schema_version when features change"
        )
    if _major(cv) != _major(pv):
        return False, f"feature schema {cv} is a major change from champion's {pv}"
    if missing:
        return False, (
            f"feature schema {cv} needs features the champion's {pv} does not serve: {missing[:10]}"
        )
    return True, f"feature schema {cv} only uses features of champion's {pv} (same major version)"


def _higher_is_better(metric: str) -> bool:
    base = metric.split("@", 1)[0].lower()
    return base not in LOWER_IS_BETTER and not base.endswith("loss")


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


@dataclass(frozen=True)
class MetricComparison:
    """One metric of the candidate against the champion in gate 3.

    Attributes:
        metric: Metric name, e.g. ``ndcg@10``.
        candidate: Candidate value.
        champion: Champion value.
        relative_change: ``(candidate - champion) / |champion|`` (0 when both are 0).
        higher_is_better: Direction of the metric.
        passed: Within tolerance.
    """

    metric: str
    candidate: float
    champion: float
    relative_change: float
    higher_is_better: bool
    passed: bool

    def describe(self, tolerance: float) -> str:
        """E.g. ``ndcg@10 0.1012 < champion 0.1100 - 1% tolerance (-8.0%)``."""
        if self.higher_is_better:
            op, sign = ("<", "-") if not self.passed else (">=", "-")
        else:
            op, sign = (">", "+") if not self.passed else ("<=", "+")
        return (
            f"{self.metric} {self.candidate:.4f} {op} champion {self.champion:.4f} {sign} "
            f"{_pct(tolerance)} tolerance ({self.relative_change:+.1%})"
        )


def compare_metrics(
    candidate: Mapping[str, float], champion: Mapping[str, float], tolerance: float
) -> list[MetricComparison]:
    """Compare every metric the two share; a metric fails if it regresses by more than ``tolerance``.

    Args:
        candidate: Candidate metrics.
        champion: Champion metrics.
        tolerance: Allowed relative regression, e.g. ``0.01`` for 1%.

    Returns:
        One comparison per shared metric, sorted by name.
    """
    out = []
    for name in sorted(set(candidate) & set(champion)):
        c, p = float(candidate[name]), float(champion[name])
        hib = _higher_is_better(name)
        rel = (c - p) / abs(p) if p != 0 else (0.0 if c == p else math.copysign(math.inf, c - p))
        ok = c >= p - tolerance * abs(p) if hib else c <= p + tolerance * abs(p)
        out.append(MetricComparison(name, c, p, rel, hib, ok))
    return out


# --------------------------------------------------------------------------------------------
# Registry value objects
# --------------------------------------------------------------------------------------------


def _parse_dt(v: str | None) -> datetime | None:
    if not v:
        return None
    try:
        d = datetime.fromisoformat(v)
    except ValueError:
        return None
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered bundle, as the registry describes it (read from the version's tags).

    Attributes:
        name: Registered model name.
        version: Version number.
        run_id: The MLflow run holding the bundle artifacts.
        source: Model version source URI (the run's ``bundle`` artifact directory).
        status: MLflow status (``READY`` once usable).
        aliases: Aliases pointing at this version.
        registered_at: When the version was created in the registry.
        created_at: Bundle creation time (manifest).
        data_cutoff: Training data cutoff (manifest).
        git_sha: Training code commit.
        feature_schema_version: Feature schema version.
        eval_set_id: Evaluation set fingerprint.
        bundle_digest: :meth:`BundleManifest.digest` of the registered manifest.
        metrics: Offline metrics with their canonical names (``ndcg@10``).
        tags: All version tags.
    """

    name: str
    version: int
    run_id: str | None
    source: str
    status: str
    aliases: tuple[str, ...]
    registered_at: datetime
    created_at: datetime | None
    data_cutoff: datetime | None
    git_sha: str | None
    feature_schema_version: str | None
    eval_set_id: str | None
    bundle_digest: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_mlflow(cls, mv: ModelVersion) -> ModelVersionInfo:
        """Build from an MLflow ``ModelVersion``."""
        tags = dict(mv.tags or {})
        try:
            metrics = {str(k): float(v) for k, v in json.loads(tags.get(_TAG + "metrics", "{}")).items()}
        except (ValueError, TypeError, AttributeError):
            metrics = {}
        return cls(
            name=mv.name,
            version=int(mv.version),
            run_id=mv.run_id,
            source=mv.source or "",
            status=str(mv.status),
            aliases=tuple(mv.aliases or ()),
            registered_at=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC),
            created_at=_parse_dt(tags.get(_TAG + "created_at")),
            data_cutoff=_parse_dt(tags.get(_TAG + "data_cutoff")),
            git_sha=tags.get(_TAG + "git_sha"),
            feature_schema_version=tags.get(_TAG + "feature_schema_version"),
            eval_set_id=tags.get(_TAG + "eval_set_id"),
            bundle_digest=tags.get(_TAG + "bundle_digest"),
            metrics=metrics,
            tags=tags,
        )

    @property
    def artifact_path(self) -> str:
        """Path of the bundle inside the run's artifacts."""
        return self.tags.get(_TAG + "artifact_path", ARTIFACT_PATH)


@dataclass(frozen=True)
class GateResult:
    """Outcome of one promotion gate.

    Attributes:
        gate: 1, 2 or 3.
        name: ``bundle``, ``feature_schema`` or ``no_regression``.
        passed: True, False, or None when skipped because an earlier gate failed.
        detail: What was checked and, on failure, by how much it missed.
    """

    gate: int
    name: str
    passed: bool | None
    detail: str


@dataclass(frozen=True)
class PromotionDecision:
    """What :meth:`ModelRegistry.promote` decided.

    Attributes:
        accepted: Whether the alias now points at ``version``.
        version: The candidate version.
        alias: The alias it was promoted to.
        previous_version: The version the alias pointed at before (None if unset).
        champion_version: The champion the candidate was compared with (None if none).
        gates: The three gates in order.
        comparisons: Gate-3 metric comparisons (empty if gate 3 did not compare).
        message: One-line summary; the refusal message names the failed gate and the gap.
    """

    accepted: bool
    version: int
    alias: str
    previous_version: int | None
    champion_version: int | None
    gates: tuple[GateResult, ...]
    comparisons: tuple[MetricComparison, ...]
    message: str

    @property
    def failed_gate(self) -> GateResult | None:
        """The first gate that failed, if any."""
        return next((g for g in self.gates if g.passed is False), None)


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


class PromotionGateError(PromotionRefusedError):
    """A promotion gate refused the candidate; :attr:`decision` holds the details."""

    def __init__(self, decision: PromotionDecision) -> None:
        super().__init__(decision.message)
        self.decision = decision


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def _mlflow_name(metric: str) -> str:
    r"""MLflow metric/param names allow ``[/\\w.\\- :]`` only: ``ndcg@10`` -> ``ndcg_at_10``."""
    return re.sub(r"[^/\w.\- ]", "_", metric.replace("@", "_at_"))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[_mlflow_name(key)] = json.dumps(v, default=str) if not isinstance(v, str) else v
    return out


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _is_bundle(path: Path, digest: str | None) -> bool:
    """Whether ``path`` holds a bundle that verifies (and has ``digest``, when one is known)."""
    try:
        return path.is_dir() and (not digest or verify_bundle(path, strict=True).digest() == digest)
    except CorruptCheckpointError:
        return False


class ModelRegistry:
    """StreamRec's model registry on MLflow: bundles, aliases, gated promotion, rollback.

    Args:
        tracking_uri: MLflow tracking/registry URI. Default: ``$MLFLOW_TRACKING_URI`` if set
            (e.g. ``http://mlflow:5000``), else ``sqlite:///<data_dir>/mlflow.db`` with
            artifacts under ``<data_dir>/mlartifacts``.
        data_dir: StreamRec data directory (see :mod:`streamrec.paths`); also holds the
            download cache ``<data_dir>/models/registry/<model_name>/``.
        model_name: Registered model name (also the experiment name of the bundle runs).
        probe_timeout_s: Timeout of the reachability probe of an HTTP tracking server.

    Raises:
        RegistryError: the tracking server or database cannot be reached, naming the URI.

    Note:
        Once the probe passed, MLflow's own HTTP client retries failed requests with backoff
        (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``); a server that
        dies mid-operation can take minutes to surface, and is then reported as a
        :class:`RegistryError` with the registration rolled back.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        model_name: str = "streamrec",
        *,
        probe_timeout_s: float = 3.0,
    ) -> None:
        self.layout = DataLayout.at(data_dir)
        self.model_name = model_name
        self.probe_timeout_s = probe_timeout_s
        env_uri = os.environ.get(ENV_TRACKING_URI)
        self._local_default = tracking_uri is None and not env_uri
        self.tracking_uri: str = tracking_uri or env_uri or f"sqlite:///{self.layout.mlflow_db}"
        self.artifact_root = self.layout.root / "mlartifacts"
        self.cache_dir = self.layout.models / "registry" / model_name
        self._probe()
        from mlflow import MlflowClient

        try:
            # MLflow creates and migrates an empty SQLite database on first use; two processes doing
            # it at once (replicas reloading together) collide on alembic's temporary tables.
            with self._init_lock():
                self._client: MlflowClient = MlflowClient(
                    tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
                )
                self._client.search_registered_models(max_results=1)
                self._client.search_experiments(max_results=1)
        except Exception as err:
            raise self._unreachable(err) from None
        self._experiment_id: str | None = None

    # ---- connectivity ---------------------------------------------------------------------

    def _unreachable(self, err: BaseException | str) -> RegistryError:
        if self._local_default:
            advice = f"check that {self.layout.root} is writable"
        else:
            advice = (
                "start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000 "
                "--backend-store-uri sqlite:///mlflow.db --serve-artifacts`), fix the URI, or unset "
                f"{ENV_TRACKING_URI} to use the local SQLite registry under the data directory"
            )
        return RegistryError(f"MLflow tracking URI {self.tracking_uri} is unreachable ({err}); {advice}")

    def _probe(self) -> None:
        parsed = urlparse(self.tracking_uri)
        if parsed.scheme in ("http", "https"):
            import httpx

            url = self.tracking_uri.rstrip("/") + "/health"
            try:
                resp = httpx.get(url, timeout=self.probe_timeout_s)
            except httpx.TimeoutException:
                raise self._unreachable(f"no answer within {self.probe_timeout_s:g}s") from None
            except httpx.HTTPError as err:
                raise self._unreachable(f"{type(err).__name__}: {err}") from None
            if resp.status_code >= 500:
                raise self._unreachable(f"GET /health answered HTTP {resp.status_code}")
        elif (db := self._sqlite_path()) is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise self._unreachable(err) from None

    def _init_lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialise first use of a local SQLite database across processes (no-op for servers)."""
        db = self._sqlite_path()
        if db is None:
            return contextlib.nullcontext()
        return exclusive_file_lock(f"{db}.init.lock")

    def _sqlite_path(self) -> Path | None:
        if urlparse(self.tracking_uri).scheme != "sqlite":
            return None
        db = self.tracking_uri[len("sqlite:///") :]
        return Path(db) if db and db != ":memory:" else None

    # ---- internals ------------------------------------------------------------------------

    def _experiment(self) -> str:
        if self._experiment_id is None:
            exp = self._client.get_experiment_by_name(self.model_name)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                location = None
                if urlparse(self.tracking_uri).scheme == "sqlite":
                    location = (self.artifact_root / self.model_name).resolve().as_uri()
                self._experiment_id = self._client.create_experiment(
                    self.model_name, artifact_location=location
                )
        return self._experiment_id

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(self.model_name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._client.create_registered_model(
                self.model_name, description="StreamRec bundles (see docs/adr/ADR-003-model-registry.md)"
            )

    def _registered_model(self) -> Any | None:
        """The MLflow registered model, or None before the first registration."""
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_registered_model(self.model_name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"cannot read registered model '{self.model_name}': {err}") from None

    def _alias_map(self) -> dict[str, int]:
        rm = self._registered_model()
        return {} if rm is None else {a: int(v) for a, v in (rm.aliases or {}).items()}

    def _model_tags(self) -> dict[str, str]:
        rm = self._registered_model()
        return {} if rm is None else dict(rm.tags or {})

    def _history(self, alias: str) -> list[int]:
        raw = self._model_tags().get(_HISTORY_TAG + alias, "[]")
        try:
            return [int(v) for v in json.loads(raw)]
        except (ValueError, TypeError):
            log.warning("unreadable alias history for %s: %r; starting afresh", alias, raw)
            return []

    def _set_history(self, alias: str, history: list[int]) -> None:
        self._client.set_registered_model_tag(
            self.model_name, _HISTORY_TAG + alias, json.dumps(history[-_HISTORY_KEEP:])
        )

    @staticmethod
    def _check_alias(alias: str) -> None:
        if alias not in ALIASES:
            raise ConfigError(f"unknown alias '{alias}': use one of {', '.join(ALIASES)}")

    def _resolve(self, version_or_alias: int | str) -> ModelVersionInfo:
        if isinstance(version_or_alias, int) or str(version_or_alias).isdigit():
            return self.get_version(int(version_or_alias))
        alias = str(version_or_alias)
        self._check_alias(alias)
        info = self.get(alias)
        if info is None:
            raise RegistryError(f"alias '{alias}' of model '{self.model_name}' is not set")
        return info

    def _find_by_digest(self, digest: str) -> ModelVersionInfo | None:
        return next((v for v in self.list_versions() if v.bundle_digest == digest), None)

    def _fetch_manifest(self, info: ModelVersionInfo) -> BundleManifest:
        if info.run_id is None:
            raise RegistryError(f"version {info.version} has no run; it was not registered by StreamRec")
        with tempfile.TemporaryDirectory(prefix="streamrec-manifest-") as tmp:
            try:
                local = self._client.download_artifacts(
                    info.run_id, f"{info.artifact_path}/{MANIFEST_FILE}", tmp
                )
            except Exception as err:
                raise RegistryError(f"cannot fetch the manifest of version {info.version}: {err}") from None
            return read_manifest(Path(local).parent)

    # ---- registration ---------------------------------------------------------------------

    def register(
        self, bundle_dir: str | os.PathLike[str], *, run_name: str | None = None
    ) -> ModelVersionInfo:
        """Register a bundle as a new model version, all or nothing.

        Verifies the bundle, then in one MLflow run logs the config as params, the metrics,
        tags (git sha, data cutoff, feature schema version, eval set, bundle digest) and the
        bundle (``manifest.json`` and every file it lists; unlisted files stay behind) as
        artifacts under ``bundle/``, checks the upload, and creates a model
        version whose source is that artifact directory. If any step fails, the version (if
        created) is deleted and the run is marked ``FAILED``: nothing is half-registered and no
        alias moves. Registering the same bundle again (same manifest digest) returns the
        existing version.

        Args:
            bundle_dir: The bundle directory (with ``manifest.json``).
            run_name: MLflow run name; defaults to the manifest's name.

        Returns:
            The new (or existing identical) version.

        Raises:
            CorruptCheckpointError: the bundle does not verify; nothing was logged.
            RegistryError: MLflow failed midway; the registration was rolled back.
        """
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.time import get_current_time_millis

        bundle = Path(bundle_dir)
        manifest = verify_bundle(bundle)
        digest = manifest.digest()
        existing = self._find_by_digest(digest)
        if existing is not None:
            log.info("bundle %s already registered as version %d", bundle, existing.version)
            return existing

        tags = {
            _TAG + "bundle_name": manifest.name,
            _TAG + "git_sha": manifest.git_sha,
            _TAG + "data_cutoff": manifest.data_cutoff.isoformat(),
            _TAG + "created_at": manifest.created_at.isoformat(),
            _TAG + "feature_schema_version": manifest.feature_schema_version,
            _TAG + "eval_set_id": manifest.eval_set_id,
            _TAG + "bundle_digest": digest,
        }
        version_tags = {
            **tags,
            _TAG + "metrics": json.dumps(manifest.metrics, sort_keys=True),
            _TAG + "artifact_path": ARTIFACT_PATH,
        }
        step = "creating the registered model"
        run_id: str | None = None
        version: str | None = None
        try:
            self._ensure_registered_model()
            step = "creating the run"
            run = self._client.create_run(
                self._experiment(),
                run_name=run_name or manifest.name,
                tags={**tags, "mlflow.source.git.commit": manifest.git_sha},
            )
            run_id = run.info.run_id
            step = "logging params and metrics"
            now = get_current_time_millis()
            params = {
                "bundle_name": manifest.name,
                "feature_schema_version": manifest.feature_schema_version,
                "n_features": str(len(manifest.feature_names)),
                **_flatten(manifest.config, "config."),
            }
            param_list = [Param(k, v[:6000]) for k, v in params.items()]
            metric_list = [Metric(_mlflow_name(k), float(v), now, 0) for k, v in manifest.metrics.items()]
            for chunk in _chunks(param_list, 100):
                self._client.log_batch(run_id, params=chunk)
            self._client.log_batch(
                run_id, metrics=metric_list, tags=[RunTag(_TAG + "files", str(len(manifest.files)))]
            )
            step = "uploading the bundle artifacts"
            for rel in sorted(f.path for f in manifest.files.values()):
                parent = PurePosixPath(ARTIFACT_PATH, rel).parent.as_posix()
                self._client.log_artifact(run_id, str(bundle / rel), parent)
            self._client.log_artifact(run_id, str(bundle / MANIFEST_FILE), ARTIFACT_PATH)
            step = "checking the uploaded artifacts"
            self._check_upload(run_id, manifest)
            step = "creating the model version"
            mv = self._client.create_model_version(
                self.model_name,
                source=f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}",
                run_id=run_id,
                tags=version_tags,
                description=f"{manifest.name}: data cutoff {manifest.data_cutoff.isoformat()}, "
                f"git {manifest.git_sha[:12]}",
            )
            version = str(mv.version)
            if str(mv.status) != "READY":
                raise RegistryError(f"model version {version} is {mv.status}, not READY")
            step = "finishing the run"
            self._client.set_terminated(run_id, "FINISHED")
            info = self.get_version(int(version))
        except BaseException as err:
            undone = self._undo_register(run_id, version)
            if not isinstance(err, Exception):
                raise
            msg = f"registering bundle {bundle} failed while {step}: {err}; {undone}"
            cls = CorruptCheckpointError if isinstance(err, CorruptCheckpointError) else RegistryError
            raise cls(msg) from err
        log.info("registered %s as %s version %d (run %s)", bundle, self.model_name, info.version, run_id)
        return info

    def _check_upload(self, run_id: str, manifest: BundleManifest) -> None:
        """Every manifest file is in the run's artifacts with the recorded size."""
        found: dict[str, int | None] = {}
        stack = [ARTIFACT_PATH]
        while stack:
            for fi in self._client.list_artifacts(run_id, stack.pop()):
                if fi.is_dir:
                    stack.append(fi.path)
                else:
                    found[fi.path[len(ARTIFACT_PATH) + 1 :]] = fi.file_size
        expected = {f.path: f.size for f in manifest.files.values()}
        for path, size in expected.items():
            if path not in found:
                raise RegistryError(f"uploaded bundle lacks '{path}'")
            if found[path] is not None and found[path] != size:
                raise RegistryError(f"uploaded '{path}' has {found[path]} bytes, expected {size}")
        if MANIFEST_FILE not in found:
            raise RegistryError(f"uploaded bundle lacks '{MANIFEST_FILE}'")

    def _undo_register(self, run_id: str | None, version: str | None) -> str:
        """Best-effort rollback of a failed registration; returns what was done, for the message."""
        notes = []
        if version is not None:
            try:
                self._client.delete_model_version(self.model_name, version)
                notes.append(f"model version {version} deleted")
            except Exception as err:  # pragma: no cover - the store died mid-way
                notes.append(
                    f"COULD NOT delete model version {version} ({err}): delete it by hand "
                    f"(MlflowClient().delete_model_version('{self.model_name}', '{version}'))"
                )
        if run_id is not None:
            try:
                self._client.set_terminated(run_id, "FAILED")
                notes.append(f"run {run_id} marked FAILED")
            except Exception as err:  # pragma: no cover
                notes.append(f"could not mark run {run_id} FAILED ({err})")
        if version is None:
            notes.insert(0, "no model version was created")
        return "; ".join(notes) + "; aliases unchanged"

    # ---- reading --------------------------------------------------------------------------

    def get_version(self, version: int) -> ModelVersionInfo:
        """The registered version ``version``.

        Raises:
            RegistryError: no such version.
        """
        from mlflow.exceptions import MlflowException

        try:
            mv = self._client.get_model_version(self.model_name, str(version))
        except MlflowException as err:
            raise RegistryError(
                f"model '{self.model_name}' has no version {version} ({err.error_code})"
            ) from None
        return ModelVersionInfo.from_mlflow(mv)

    def get(self, alias: str) -> ModelVersionInfo | None:
        """The version an alias points at, or None when the alias is not set."""
        self._check_alias(alias)
        v = self._alias_map().get(alias)
        return None if v is None else self.get_version(v)

    def aliases(self) -> dict[str, int]:
        """Every alias that is set, and the version it points at."""
        return self._alias_map()

    def list_versions(self) -> list[ModelVersionInfo]:
        """All versions of the model, oldest first."""
        try:
            mvs = self._client.search_model_versions(f"name = '{self.model_name}'")
        except Exception as err:
            raise RegistryError(f"cannot list versions of '{self.model_name}': {err}") from None
        return sorted((ModelVersionInfo.from_mlflow(mv) for mv in mvs), key=lambda i: i.version)

    def download(self, version_or_alias: int | str, dst: str | os.PathLike[str] | None = None) -> Path:
        """A verified local copy of a registered bundle.

        Args:
            version_or_alias: A version number or an alias.
            dst: Target directory (must not exist, be empty, or already hold this exact bundle).
                Default: the cache ``<data_dir>/models/registry/<model>/v<N>-<digest>``, reused
                when it still verifies.

        Returns:
            The bundle directory.

        Raises:
            CorruptCheckpointError: the stored bundle does not verify (naming the file) or is
                not the bundle that was registered.
            RegistryError: the version or alias does not exist, or ``dst`` holds something else.
        """
        info = self._resolve(version_or_alias)
        if info.run_id is None:
            raise RegistryError(f"version {info.version} has no run; it was not registered by StreamRec")
        cached = dst is None
        target = (
            Path(dst)
            if dst is not None
            else self.cache_dir / f"v{info.version}-{(info.bundle_digest or '')[:12]}"
        )
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            try:
                if verify_bundle(target, strict=True).digest() == info.bundle_digest:
                    return target
                problem = "holds a different bundle"
            except CorruptCheckpointError as err:
                problem = f"does not verify ({err})"
            if not cached:
                raise RegistryError(
                    f"download target {target} is not empty and {problem}; pick an empty directory"
                )
            log.warning("cached bundle %s %s; downloading again", target, problem)
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            try:
                local = Path(self._client.download_artifacts(info.run_id, info.artifact_path, str(tmp)))
            except Exception as err:
                raise RegistryError(
                    f"cannot download version {info.version} ({info.source}): {err}"
                ) from None
            manifest = verify_bundle(local, strict=True)
            if info.bundle_digest and manifest.digest() != info.bundle_digest:
                raise CorruptCheckpointError(
                    f"version {info.version}: the stored {MANIFEST_FILE} is not the one that was registered "
                    f"(digest {manifest.digest()[:12]}... != {info.bundle_digest[:12]}...)"
                )
            try:
                if target.exists():
                    target.rmdir()  # an empty directory (a target the caller created)
                os.replace(local, target)
            except OSError:
                # Another process (a second replica preparing the same reload) got there first:
                # use its copy when it is this version's bundle.
                if not (cached and _is_bundle(target, info.bundle_digest)):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def model_age(
        self,
        alias: str = CHAMPION,
        *,
        reference: Literal["data_cutoff", "created_at"] = "data_cutoff",
        now: datetime | None = None,
    ) -> timedelta:
        """How old the model behind ``alias`` is.

        Args:
            alias: Which alias.
            reference: ``data_cutoff`` (age of the newest data it learned from; the default,
                what freshness alerts want) or ``created_at`` (time since training).
            now: The current time (UTC); injectable for tests.

        Raises:
            RegistryError: the alias is not set or the version lacks the timestamp.
        """
        info = self._resolve(alias)
        ts = info.data_cutoff if reference == "data_cutoff" else info.created_at
        if ts is None:
            raise RegistryError(
                f"version {info.version} has no {reference} tag; it was not registered by StreamRec"
            )
        return (now or datetime.now(UTC)) - ts

    # ---- aliases --------------------------------------------------------------------------

    def set_alias(self, alias: str, version: int, *, force: bool = False) -> ModelVersionInfo:
        """Point ``challenger`` or ``shadow`` at a version, without gates.

        The champion moves only through :meth:`promote` (gated) and :meth:`rollback`;
        ``force=True`` is the audited break-glass (recorded in the alias history).

        Raises:
            ConfigError: unknown alias, or ``champion`` without ``force``.
            RegistryError: no such version.
        """
        self._check_alias(alias)
        if alias == CHAMPION and not force:
            raise ConfigError(
                "the champion moves only through promote() (gated) or rollback(); force=True overrides"
            )
        info = self.get_version(version)
        reason = "forced" if alias == CHAMPION else "set"
        previous = self._move_alias(alias, info.version, reason=reason)
        self.record_event(info.version, reason, alias, previous=previous)
        return self.get_version(info.version)

    def clear_alias(self, alias: str) -> None:
        """Remove ``challenger`` or ``shadow`` (e.g. when an experiment ends); not the champion."""
        self._check_alias(alias)
        if alias == CHAMPION:
            raise ConfigError("the champion cannot be cleared; promote another version or roll back")
        current = self._alias_map().get(alias)
        if current is not None:
            self._client.delete_registered_model_alias(self.model_name, alias)
            self.record_event(current, "cleared", alias)

    def _move_alias(self, alias: str, version: int, *, reason: str) -> int | None:
        """Push the current holder on the alias history, then move the alias (undoing on failure)."""
        previous = self._alias_map().get(alias)
        if previous == version:
            return previous
        history = self._history(alias)
        if previous is not None:
            self._set_history(alias, [*history, previous])
        try:
            self._client.set_registered_model_alias(self.model_name, alias, str(version))
        except Exception as err:
            if previous is not None:
                self._set_history(alias, history)
            raise RegistryError(
                f"could not move alias '{alias}' to version {version}: {err}; unchanged"
            ) from None
        try:
            now = datetime.now(UTC).isoformat()
            self._client.set_model_version_tag(
                self.model_name, str(version), f"{_TAG}{alias}.{reason}_at", now
            )
            self._client.set_model_version_tag(
                self.model_name, str(version), f"{_TAG}{alias}.previous", str(previous)
            )
        except Exception as err:  # pragma: no cover - audit tag only
            log.warning("could not tag version %d: %s", version, err)
        return previous

    # ---- serving state ----------------------------------------------------------------------

    def serving_state(self) -> tuple[dict[str, int], dict[str, Any]]:
        """Every alias and every named state (e.g. the rollout), from one read of the registry."""
        rm = self._registered_model()
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

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        """Set (or with None remove) a named JSON state kept with the registered model.

        Raises:
            RegistryError: the registry could not be written.
        """
        key = _STATE_TAG + name
        try:
            if value is None:
                if key in self._model_tags():
                    self._client.delete_registered_model_tag(self.model_name, key)
            else:
                self._client.set_registered_model_tag(self.model_name, key, json.dumps(value, default=str))
        except Exception as err:
            raise RegistryError(f"could not write registry state '{name}': {err}") from None

    # ---- history --------------------------------------------------------------------------

    def record_event(self, version: int, event: str, alias: str, **detail: Any) -> None:
        """Record one change (what, when, why, the numbers) as a tag of ``version``.

        Tags of the version that a change concerns, one per event: the record survives as long
        as the version does, and a registry server keeps it with no extra store.
        """
        if not _EVENT_NAME.fullmatch(event):
            raise ConfigError(f"event name {event!r} must match {_EVENT_NAME.pattern} (put free text in detail)")
        at = datetime.now(UTC)
        key = f"{_EVENT_TAG}{at.strftime('%Y%m%dT%H%M%S.%f')}Z.{event}.{alias}.{uuid.uuid4().hex[:8]}"
        body = {"event": event, "alias": alias, **detail}
        value = json.dumps(body, default=str, sort_keys=True)
        if len(value) > _EVENT_MAX_CHARS:  # shorten the fields, never cut the JSON (it must parse)
            body = {k: (v[:1000] + "...") if isinstance(v, str) and len(v) > 1000 else v for k, v in body.items()}
            body.pop("metrics", None)
            value = json.dumps({**body, "truncated": True}, default=str, sort_keys=True)[:_EVENT_MAX_CHARS]
        try:
            self._client.set_model_version_tag(self.model_name, str(version), key, value)
        except Exception as err:  # the change itself happened; only its record is missing
            log.warning("could not record %s of version %d: %s", event, version, err)

    def history(self, limit: int | None = 50) -> list[RegistryEvent]:
        """Recorded changes, newest first (at most ``limit``)."""
        events: list[RegistryEvent] = []
        for info in self.list_versions():
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

    def rollback(self, alias: str = CHAMPION, reason: str = "") -> ModelVersionInfo:
        """Move ``alias`` back to the version it pointed at before the last promotion.

        Args:
            alias: The alias to move back.
            reason: Why (recorded in the history).

        Returns:
            The version the alias now points at.

        Raises:
            RegistryError: there is no previous version to go back to.
        """
        self._check_alias(alias)
        history = self._history(alias)
        current = self._alias_map().get(alias)
        if not history:
            raise RegistryError(f"alias '{alias}' has no previous version to roll back to (now {current})")
        target = history[-1]
        self.get_version(target)  # exists?
        try:
            self._client.set_registered_model_alias(self.model_name, alias, str(target))
        except Exception as err:
            raise RegistryError(
                f"rollback of '{alias}' to version {target} failed: {err}; unchanged"
            ) from None
        self._set_history(alias, history[:-1])
        if current is not None:
            self._client.set_model_version_tag(
                self.model_name, str(current), f"{_TAG}{alias}.rolled_back_at", datetime.now(UTC).isoformat()
            )
        log.warning("rolled back '%s' from version %s to %d", alias, current, target)
        self.record_event(target, "rolled_back", alias, rolled_back_from=current, reason=reason)
        return self.get_version(target)

    # ---- promotion ------------------------------------------------------------------------

    def promote(
        self,
        version: int,
        *,
        to: str = CHAMPION,
        tolerance: float = 0.01,
        primary_metric: str = "ndcg@10",
        smoke_test: Callable[[Path], None] | None = None,
        allow_schema_change: bool = False,
        raise_on_refusal: bool = True,
    ) -> PromotionDecision:
        """Move ``to`` to ``version`` if it passes the gates, else leave every alias as it is.

        Gates, in order (the first failure stops; later gates are reported as skipped):

        1. *bundle*: the version downloads, verifies (files and digest) and ``smoke_test(path)``
           returns without raising (the caller loads the models and scores a smoke batch).
        2. *feature_schema*: :func:`schema_compatible` with the champion's manifest, unless
           ``allow_schema_change`` (after the feature pipeline was rolled out).
        3. *no_regression*: the candidate and champion share the evaluation set id and the
           primary metric, and no shared metric regresses by more than ``tolerance``
           (relative; lower-is-better metrics such as losses the other way).

        With no champion yet, gates 2 and 3 pass. On success the previous holder of ``to`` is
        recorded in the alias history so :meth:`rollback` can restore it.

        Args:
            version: Candidate version.
            to: Target alias.
            tolerance: Allowed relative regression per metric, in ``[0, 1)``.
            primary_metric: Metric that must be present on both sides (reported first).
            smoke_test: Callable given the local, verified bundle directory.
            allow_schema_change: Skip the schema gate's refusal (recorded in the decision).
            raise_on_refusal: Raise :class:`PromotionGateError` on refusal instead of returning.

        Returns:
            The decision.

        Raises:
            PromotionGateError: (a :class:`~streamrec.errors.PromotionRefusedError`) a gate
                refused and ``raise_on_refusal``; the champion is unchanged.
            RegistryError: the registry could not be read or the alias not moved.
            ConfigError: bad alias or tolerance.
        """
        self._check_alias(to)
        if not 0 <= tolerance < 1:
            raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
        cand = self.get_version(version)
        aliases = self._alias_map()
        previous = aliases.get(to)
        champ_v = aliases.get(CHAMPION)
        champion = None if champ_v is None or champ_v == cand.version else self.get_version(champ_v)
        gates: list[GateResult] = []
        comparisons: list[MetricComparison] = []

        # Gate 1: loads, verifies, smoke test.
        cand_manifest: BundleManifest | None = None
        try:
            path = self.download(cand.version)
            cand_manifest = read_manifest(path)
            if smoke_test is not None:
                smoke_test(path)
            gates.append(
                GateResult(
                    1,
                    "bundle",
                    True,
                    "verified" + (" + smoke test" if smoke_test else " (no smoke test supplied)"),
                )
            )
        except Exception as err:
            what = "smoke test" if cand_manifest is not None else "bundle verification"
            gates.append(GateResult(1, "bundle", False, f"{what} failed: {type(err).__name__}: {err}"))

        # Gate 2: feature schema.
        champ_manifest = self._fetch_manifest(champion) if champion is not None and cand_manifest else None
        if cand_manifest is None:
            gates.append(GateResult(2, "feature_schema", None, "skipped"))
        elif champ_manifest is None:
            gates.append(GateResult(2, "feature_schema", True, "no champion to compare with"))
        else:
            ok, why = schema_compatible(cand_manifest, champ_manifest)
            if not ok and allow_schema_change:
                ok, why = True, f"{why} (allowed by allow_schema_change)"
            elif not ok:
                why += "; roll out the feature pipeline first, then promote with allow_schema_change=True"
            gates.append(GateResult(2, "feature_schema", ok, why))

        # Gate 3: no regression on the same evaluation set.
        if any(g.passed is not True for g in gates) or cand_manifest is None:
            gates.append(GateResult(3, "no_regression", None, "skipped"))
        elif champ_manifest is None:
            gates.append(GateResult(3, "no_regression", True, "first champion: nothing to compare with"))
        else:
            gates.append(
                self._gate_metrics(cand_manifest, champ_manifest, tolerance, primary_metric, comparisons)
            )

        accepted = all(g.passed is True for g in gates)
        champ_txt = f"champion v{champion.version}" if champion else "no champion"
        if accepted:
            prev = self._move_alias(to, cand.version, reason="promoted")
            primary = next((c for c in comparisons if c.metric == primary_metric), None)
            gain = f", {primary_metric} {primary.relative_change:+.1%} vs {champ_txt}" if primary else ""
            was = "already there" if prev == cand.version else f"was {prev}"
            message = f"promoted {self.model_name} v{cand.version} to '{to}' ({was}){gain}"
            log.info(message)
            self.record_event(
                cand.version,
                "promoted",
                to,
                previous=prev,
                metrics={c.metric: {"candidate": c.candidate, "champion": c.champion} for c in comparisons},
                message=message,
            )
        else:
            failed = next(g for g in gates if g.passed is False)
            message = (
                f"promotion of {self.model_name} v{cand.version} to '{to}' refused at gate {failed.gate} "
                f"({failed.name}): {failed.detail}; '{to}' unchanged ({previous})"
            )
            log.warning(message)
            try:
                self._client.set_model_version_tag(
                    self.model_name, str(cand.version), f"{_TAG}{to}.refused", message[:5000]
                )
            except Exception as err:  # pragma: no cover - audit tag only
                log.warning("could not tag the refusal: %s", err)
            self.record_event(cand.version, "refused", to, gate=failed.name, message=message)
        decision = PromotionDecision(
            accepted=accepted,
            version=cand.version,
            alias=to,
            previous_version=previous,
            champion_version=champion.version if champion else None,
            gates=tuple(gates),
            comparisons=tuple(comparisons),
            message=message,
        )
        if not accepted and raise_on_refusal:
            raise PromotionGateError(decision)
        return decision

    @staticmethod
    def _gate_metrics(
        cand: BundleManifest,
        champ: BundleManifest,
        tolerance: float,
        primary_metric: str,
        comparisons: list[MetricComparison],
    ) -> GateResult:
        if cand.eval_set_id != champ.eval_set_id:
            return GateResult(
                3,
                "no_regression",
                False,
                f"candidate was evaluated on eval set {cand.eval_set_id} but the champion on "
                f"{champ.eval_set_id}: metrics are not comparable; re-evaluate the candidate on "
                f"{champ.eval_set_id} (or both on a common set) and register it again",
            )
        for side, m in (("candidate", cand.metrics), ("champion", champ.metrics)):
            if primary_metric not in m:
                return GateResult(
                    3,
                    "no_regression",
                    False,
                    f"the {side} has no primary metric '{primary_metric}' (has {sorted(m)})",
                )
        comparisons.extend(compare_metrics(cand.metrics, champ.metrics, tolerance))
        comparisons.sort(key=lambda c: (c.metric != primary_metric, c.metric))
        failed = [c for c in comparisons if not c.passed]
        if failed:
            return GateResult(3, "no_regression", False, "; ".join(c.describe(tolerance) for c in failed))
        return GateResult(
            3,
            "no_regression",
            True,
            f"{len(comparisons)} shared metrics within {_pct(tolerance)} on eval set {cand.eval_set_id}",
        )
