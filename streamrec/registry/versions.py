"""A registered model version as StreamRec describes it, read from the version's MLflow tags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from streamrec.timeutil import utc

if TYPE_CHECKING:  # mlflow is imported lazily: building a manifest must stay cheap.
    from mlflow.entities.model_registry import ModelVersion

#: Prefix of every tag StreamRec sets on MLflow registered models and versions.
TAG = "streamrec."
#: Where a run keeps its bundle among its artifacts.
ARTIFACT_PATH = "bundle"


def _parse_dt(v: str | None) -> datetime | None:
    if not v:
        return None
    try:
        return utc(v)
    except ValueError:
        return None


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
            metrics = {str(k): float(v) for k, v in json.loads(tags.get(TAG + "metrics", "{}")).items()}
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
            created_at=_parse_dt(tags.get(TAG + "created_at")),
            data_cutoff=_parse_dt(tags.get(TAG + "data_cutoff")),
            git_sha=tags.get(TAG + "git_sha"),
            feature_schema_version=tags.get(TAG + "feature_schema_version"),
            eval_set_id=tags.get(TAG + "eval_set_id"),
            bundle_digest=tags.get(TAG + "bundle_digest"),
            metrics=metrics,
            tags=tags,
        )

    @property
    def artifact_path(self) -> str:
        """Path of the bundle inside the run's artifacts."""
        return self.tags.get(TAG + "artifact_path", ARTIFACT_PATH)
