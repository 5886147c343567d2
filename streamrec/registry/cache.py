"""Verified local copies of registered bundles, cached under the data directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from streamrec.errors import CorruptCheckpointError, RegistryError
from streamrec.registry.manifest import MANIFEST_FILE, BundleManifest, read_manifest, verify_bundle
from streamrec.registry.versions import ModelVersionInfo

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def _is_bundle(path: Path, digest: str | None) -> bool:
    """Whether ``path`` holds a bundle that verifies (and has ``digest``, when one is known)."""
    try:
        return path.is_dir() and (not digest or verify_bundle(path, strict=True).digest() == digest)
    except CorruptCheckpointError:
        return False


class BundleCache:
    """Downloads registered bundles and checks them against what was registered.

    Args:
        client: The MLflow client.
        cache_dir: Where downloads are kept by default, one ``v<N>-<digest>`` directory each.
    """

    def __init__(self, client: MlflowClient, cache_dir: Path) -> None:
        self._client = client
        self.cache_dir = cache_dir

    def download(self, info: ModelVersionInfo, dst: str | os.PathLike[str] | None = None) -> Path:
        """A verified local copy of the bundle of ``info`` (see :meth:`ModelRegistry.download`)."""
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

    def manifest(self, info: ModelVersionInfo) -> BundleManifest:
        """The registered manifest of ``info``, fetched alone (not the whole bundle)."""
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
