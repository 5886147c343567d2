"""Model bundles and the MLflow model registry with promotion gates.

A *bundle* is one directory of serving files plus ``manifest.json`` (:mod:`.manifest`);
:class:`ModelRegistry` (:mod:`.store`) keeps bundles as MLflow model versions and moves the
``champion`` alias only through the promotion gates (:mod:`.gates`). See
``docs/adr/ADR-003-model-registry.md``.
"""

from streamrec.registry.aliases import ALIASES, CHALLENGER, CHAMPION, SHADOW
from streamrec.registry.events import RegistryEvent
from streamrec.registry.gates import (
    LOWER_IS_BETTER,
    GateResult,
    MetricComparison,
    PromotionDecision,
    PromotionGateError,
    compare_metrics,
    schema_compatible,
)
from streamrec.registry.manifest import (
    BUNDLE_FORMAT,
    MANIFEST_FILE,
    OTHER_CATEGORY,
    PICKLE_SUFFIXES,
    BundleFile,
    BundleManifest,
    FeatureHistogram,
    FeatureStats,
    FitRecord,
    FitWindow,
    describe_files,
    eval_set_fingerprint,
    read_manifest,
    sha256_file,
    verify_bundle,
    write_manifest,
)
from streamrec.registry.store import ModelRegistry
from streamrec.registry.tracking import ENV_TRACKING_URI
from streamrec.registry.versions import ARTIFACT_PATH, ModelVersionInfo

__all__ = [
    "ALIASES",
    "ARTIFACT_PATH",
    "BUNDLE_FORMAT",
    "CHALLENGER",
    "CHAMPION",
    "ENV_TRACKING_URI",
    "LOWER_IS_BETTER",
    "MANIFEST_FILE",
    "OTHER_CATEGORY",
    "PICKLE_SUFFIXES",
    "SHADOW",
    "BundleFile",
    "BundleManifest",
    "FeatureHistogram",
    "FeatureStats",
    "FitRecord",
    "FitWindow",
    "GateResult",
    "MetricComparison",
    "ModelRegistry",
    "ModelVersionInfo",
    "PromotionDecision",
    "PromotionGateError",
    "RegistryEvent",
    "compare_metrics",
    "describe_files",
    "eval_set_fingerprint",
    "read_manifest",
    "schema_compatible",
    "sha256_file",
    "verify_bundle",
    "write_manifest",
]
