"""Registering a bundle: one MLflow run with its artifacts and one model version, all or nothing."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from streamrec.errors import CorruptCheckpointError, RegistryError
from streamrec.registry.manifest import MANIFEST_FILE, BundleManifest, verify_bundle
from streamrec.registry.model import RegisteredModel
from streamrec.registry.versions import ARTIFACT_PATH, TAG, ModelVersionInfo

log = logging.getLogger(__name__)


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


class BundleRegistrar:
    """Logs bundles as runs of the model's experiment and registers them as versions.

    Args:
        model: The registered model.
        tracking_uri: The tracking URI (a SQLite store keeps artifacts under ``artifact_root``).
        artifact_root: Artifact root of a local SQLite store.
    """

    def __init__(self, model: RegisteredModel, tracking_uri: str, artifact_root: Path) -> None:
        self._model = model
        self._client = model.client
        self._tracking_uri = tracking_uri
        self._artifact_root = artifact_root
        self._experiment_id: str | None = None

    def experiment(self) -> str:
        """The id of the experiment holding the bundle runs (named like the model), created on first use."""
        if self._experiment_id is None:
            exp = self._client.get_experiment_by_name(self._model.name)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                location = None
                if urlparse(self._tracking_uri).scheme == "sqlite":
                    location = (self._artifact_root / self._model.name).resolve().as_uri()
                self._experiment_id = self._client.create_experiment(
                    self._model.name, artifact_location=location
                )
        return self._experiment_id

    def register(
        self, bundle_dir: str | os.PathLike[str], *, run_name: str | None = None
    ) -> ModelVersionInfo:
        """Register a bundle as a new model version (see :meth:`ModelRegistry.register`)."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.time import get_current_time_millis

        bundle = Path(bundle_dir)
        manifest = verify_bundle(bundle)
        digest = manifest.digest()
        existing = next((v for v in self._model.versions() if v.bundle_digest == digest), None)
        if existing is not None:
            log.info("bundle %s already registered as version %d", bundle, existing.version)
            return existing

        tags = {
            TAG + "bundle_name": manifest.name,
            TAG + "git_sha": manifest.git_sha,
            TAG + "data_cutoff": manifest.data_cutoff.isoformat(),
            TAG + "created_at": manifest.created_at.isoformat(),
            TAG + "feature_schema_version": manifest.feature_schema_version,
            TAG + "eval_set_id": manifest.eval_set_id,
            TAG + "bundle_digest": digest,
        }
        version_tags = {
            **tags,
            TAG + "metrics": json.dumps(manifest.metrics, sort_keys=True),
            TAG + "artifact_path": ARTIFACT_PATH,
        }
        step = "creating the registered model"
        run_id: str | None = None
        version: str | None = None
        try:
            self._model.ensure()
            step = "creating the run"
            run = self._client.create_run(
                self.experiment(),
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
                run_id, metrics=metric_list, tags=[RunTag(TAG + "files", str(len(manifest.files)))]
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
                self._model.name,
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
            info = self._model.version(int(version))
        except BaseException as err:
            undone = self._undo_register(run_id, version)
            if not isinstance(err, Exception):
                raise
            msg = f"registering bundle {bundle} failed while {step}: {err}; {undone}"
            cls = CorruptCheckpointError if isinstance(err, CorruptCheckpointError) else RegistryError
            raise cls(msg) from err
        log.info("registered %s as %s version %d (run %s)", bundle, self._model.name, info.version, run_id)
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
                self._client.delete_model_version(self._model.name, version)
                notes.append(f"model version {version} deleted")
            except Exception as err:  # pragma: no cover - the store died mid-way
                notes.append(
                    f"COULD NOT delete model version {version} ({err}): delete it by hand "
                    f"(MlflowClient().delete_model_version('{self._model.name}', '{version}'))"
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
