"""Training-serving skew: the ranker inputs serving logged against the bundle's training statistics.

For one model version, every ``f_<feature>`` column of the sampled ranker inputs (the
``scored`` table of :mod:`streamrec.monitoring.logs`: rows drawn uniformly from every candidate
the ranker scored, as its training rows are retrieval candidates) is compared with the training
statistics in that bundle's ``manifest.json`` (:attr:`streamrec.registry.BundleManifest.feature_stats`):

* **mean shift**: ``(serving mean - training mean) / training std``;
* **std ratio**: ``serving std / training std``;
* **null diff**: ``serving null rate - training null rate``;
* **PSI** (population stability index) of the serving values bucketed on the training
  histogram's edges, the outer bins open-ended, empty bins floored at a small epsilon.

Thresholds live in :class:`SkewConfig`. A feature with fewer than ``min_rows`` logged rows is
reported as ``insufficient``, never alerted. :func:`check_skew` writes a summary of its last
result (``alerts`` there is the count) to ``<data_dir>/monitoring/skew/latest.json``, which the
serving health loop reads (:func:`streamrec.monitoring.health.read_skew`).

Categorical inputs (the ranker's primary-category and device ids, logged as ids next to the
dense inputs) have category counts in the manifest instead of moments: their check is the PSI
of the value shares (:func:`category_counts`; values training did not keep count as "other")
and the null rate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field, model_validator

from streamrec.config import StrictModel
from streamrec.errors import DataNotFoundError, RegistryError
from streamrec.monitoring.logs import FEATURE_PREFIX, feature_columns, log_dir, read_impressions, read_scored
from streamrec.paths import DataLayout, resolve_data_dir
from streamrec.registry.manifest import OTHER_CATEGORY, BundleManifest, FeatureStats, read_manifest
from streamrec.registry.tracking import ENV_TRACKING_URI

log = logging.getLogger(__name__)

Status = Literal["ok", "alert", "insufficient", "no_training_stats"]
VersionSource = Literal["given", "bundle", "champion", "most_served"]

_VERSION_RE = re.compile(r"^v?(\d+)$")

#: Where :func:`check_skew` keeps its last result, under the data directory.
LATEST = Path("monitoring") / "skew" / "latest.json"


class SkewConfig(StrictModel):
    """Thresholds of the skew check (``streamrec monitor skew --config``).

    Attributes:
        max_mean_shift_sd: Alert when ``|serving mean - training mean|`` exceeds this many
            training standard deviations.
        min_std_ratio: Alert when ``serving std / training std`` is below this.
        max_std_ratio: Alert when ``serving std / training std`` is above this.
        max_null_diff: Alert when the serving null rate differs from training's by more than this.
        max_psi: Alert when the PSI over the training histogram exceeds this.
        min_rows: Fewer logged rows of a feature than this: ``insufficient``, not alerted.
        window_hours: Look at impressions of the last this many hours (when no ``since`` is
            given); ``null`` for the whole log.
        psi_epsilon: Floor of a bin's share in the PSI (an empty bin would be infinite).
    """

    max_mean_shift_sd: float = Field(default=0.5, gt=0)
    min_std_ratio: float = Field(default=0.5, gt=0)
    max_std_ratio: float = Field(default=2.0, gt=0)
    max_null_diff: float = Field(default=0.05, ge=0, le=1)
    max_psi: float = Field(default=0.2, gt=0)
    min_rows: int = Field(default=200, ge=1)
    window_hours: float | None = Field(default=24.0, gt=0)
    psi_epsilon: float = Field(default=1e-4, gt=0, lt=0.1)

    @model_validator(mode="after")
    def _ratio_order(self) -> SkewConfig:
        if self.min_std_ratio >= self.max_std_ratio:
            raise ValueError(
                f"min_std_ratio ({self.min_std_ratio}) must be below max_std_ratio ({self.max_std_ratio})"
            )
        return self


@dataclass(frozen=True)
class SkewAlert:
    """One threshold crossed by one feature.

    Attributes:
        feature: Feature name (without the log's ``f_`` prefix).
        metric: ``mean_shift``, ``std_ratio``, ``null_diff`` or ``psi``.
        value: The measured value (``None`` when infinite: a constant training feature that varies).
        threshold: The threshold it crossed (for ``std_ratio``, the bound it fell outside).
        message: What happened, naming the feature and what to check.
    """

    feature: str
    metric: str
    value: float | None
    threshold: float
    message: str


@dataclass(frozen=True)
class FeatureSkew:
    """Training and serving statistics of one feature and its verdict.

    Attributes:
        feature: Feature name.
        rows: Logged rows a ranker scored (the denominator of the null rate).
        status: ``ok``, ``alert``, ``insufficient`` (fewer than ``min_rows``) or
            ``no_training_stats`` (logged, but the manifest has no statistics for it).
        train_mean: Training mean.
        train_std: Training standard deviation.
        train_null: Training null fraction.
        serve_mean: Serving mean (finite values).
        serve_std: Serving standard deviation (finite values, population form as in training).
        serve_null: Serving null fraction.
        mean_shift: Mean shift in training standard deviations.
        std_ratio: Serving std over training std.
        null_diff: Serving null fraction minus training's.
        psi: PSI over the training histogram's edges.
    """

    feature: str
    rows: int
    status: Status
    train_mean: float | None = None
    train_std: float | None = None
    train_null: float | None = None
    serve_mean: float | None = None
    serve_std: float | None = None
    serve_null: float | None = None
    mean_shift: float | None = None
    std_ratio: float | None = None
    null_diff: float | None = None
    psi: float | None = None


@dataclass
class SkewReport:
    """Result of :func:`check_skew`.

    Attributes:
        model_version: The version whose impressions and training statistics were compared.
        version_source: How it was chosen: ``given``, ``bundle``, ``champion`` or ``most_served``.
        training: The bundle's name and data cutoff.
        since: Start of the log window.
        until: End of the log window (the check's time).
        impressions: Logged impressions of this version a ranker scored, in the window.
        rows: Per-feature statistics, in log column order.
        alerts: Every threshold crossed.
        checked_at: When the check ran.
    """

    model_version: str
    version_source: VersionSource
    training: dict[str, Any]
    since: datetime | None
    until: datetime
    impressions: int
    rows: list[FeatureSkew] = field(default_factory=list)
    alerts: list[SkewAlert] = field(default_factory=list)
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def features(self) -> int:
        """Features compared with training statistics (``insufficient`` ones included)."""
        return sum(1 for r in self.rows if r.status != "no_training_stats")

    def status_of(self, feature: str) -> Status:
        """The verdict of one feature.

        Raises:
            KeyError: the feature was not in the log.
        """
        for r in self.rows:
            if r.feature == feature:
                return r.status
        raise KeyError(feature)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"features": N, "alerts": [...], "alert_count": ..., ...}``."""
        return {
            "features": self.features,
            "alerts": [_finite(asdict(a)) for a in self.alerts],
            "alert_count": len(self.alerts),
            "checked_at": self.checked_at.isoformat(),
            "model_version": self.model_version,
            "version_source": self.version_source,
            "training": self.training,
            "window": {
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat(),
            },
            "impressions": self.impressions,
            "insufficient": [r.feature for r in self.rows if r.status == "insufficient"],
            "rows": [_finite(asdict(r)) for r in self.rows],
        }

    def summary(self) -> dict[str, Any]:
        """What ``monitoring/skew/latest.json`` keeps: ``alerts`` is the count here (the health gauge)."""
        return {
            "checked_at": self.checked_at.isoformat(),
            "checked_at_epoch": self.checked_at.timestamp(),
            "model_version": self.model_version,
            "version_source": self.version_source,
            "features": self.features,
            "alerts": len(self.alerts),
            "alerted_features": sorted({a.feature for a in self.alerts}),
            "alert_messages": [a.message for a in self.alerts],
            "insufficient": [r.feature for r in self.rows if r.status == "insufficient"],
            "impressions": self.impressions,
            "training": self.training,
            "window": {
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat(),
            },
        }


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def bucket_counts(values: npt.ArrayLike, edges: Sequence[float]) -> npt.NDArray[np.int64]:
    """Counts of ``values`` in the bins of ``edges``, the first and last bins open-ended.

    Bins are ``(-inf, e1), [e1, e2), ..., [e_{n-1}, +inf)``: the same assignment as
    ``np.histogram`` inside the edges, and values outside them land in the outer bins.
    Non-finite values are ignored.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    inner = np.asarray(edges, dtype=np.float64)[1:-1]
    idx = np.searchsorted(inner, x, side="right")
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.int64)


def category_counts(
    training: dict[str, int], values: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Training and serving counts over the training categories (ids as strings).

    Serving values training did not keep individually count under :data:`OTHER_CATEGORY`
    (a bin of its own even when training had none there: a new category is a shift).
    """
    keys = [k for k in training if k != OTHER_CATEGORY] + [OTHER_CATEGORY]
    at = {k: i for i, k in enumerate(keys)}
    serve = np.zeros(len(keys), np.int64)
    ids, counts = np.unique(np.asarray(values, np.float64).astype(np.int64), return_counts=True)
    for v, c in zip(ids, counts, strict=True):
        serve[at.get(str(int(v)), at[OTHER_CATEGORY])] += int(c)
    train = np.asarray([training.get(k, 0) for k in keys], np.float64)
    return train, serve


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, epsilon: float = 1e-4) -> float:
    """Population stability index of two count (or share) vectors over the same bins.

    ``sum((a - e) * ln(a / e))`` over the bins' shares, each share floored at ``epsilon``.

    Returns:
        The PSI (0 for identical shares); NaN when either side is empty.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"psi needs counts over the same bins, got {e.shape} and {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        return math.nan
    p = np.maximum(e / e.sum(), epsilon)
    q = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


def _ratio(num: float, den: float, same: float) -> float:
    """``num / den`` where ``den`` may be 0: ``same`` when both are 0, else infinite."""
    if den > 0:
        return num / den
    return same if num == 0 else math.copysign(math.inf, num)


def compare_feature(
    name: str, values: npt.ArrayLike, stats: FeatureStats | None, config: SkewConfig
) -> tuple[FeatureSkew, list[SkewAlert]]:
    """Serving values of one feature (NaN = null) against its training statistics.

    Returns:
        The feature's row and the alerts it raised.
    """
    x = np.asarray(values, dtype=np.float64)
    rows = int(x.size)
    finite = x[np.isfinite(x)]
    serve_null = float(1 - finite.size / rows) if rows else None
    serve_mean = float(finite.mean()) if finite.size else None
    serve_std = float(finite.std()) if finite.size else None
    base: dict[str, Any] = {"feature": name, "rows": rows, "serve_mean": serve_mean, "serve_std": serve_std}
    if stats is None:
        return FeatureSkew(status="no_training_stats", serve_null=serve_null, **base), []
    train_null = stats.null_fraction if stats.null_fraction is not None else 0.0
    out: dict[str, Any] = {
        **base,
        "train_mean": stats.mean,
        "train_std": stats.std,
        "train_null": stats.null_fraction,
        "serve_null": serve_null,
        "null_diff": None if serve_null is None else serve_null - train_null,
    }
    if stats.categories is not None:  # a categorical input: shares of its values, no moments
        out["serve_mean"] = out["serve_std"] = None
        if finite.size:
            train_counts, serve_counts = category_counts(stats.categories, finite)
            out["psi"] = psi(train_counts, serve_counts, config.psi_epsilon)
    # Distribution metrics need enough finite values; the null rate needs only enough rows.
    elif finite.size and stats.mean is not None and stats.std is not None and serve_mean is not None:
        assert serve_std is not None
        out["mean_shift"] = _ratio(serve_mean - stats.mean, stats.std, 0.0)
        out["std_ratio"] = _ratio(serve_std, stats.std, 1.0)
    if finite.size and stats.histogram is not None:
        train_counts = np.asarray(stats.histogram.counts, dtype=np.float64)
        out["psi"] = psi(train_counts, bucket_counts(finite, stats.histogram.edges), config.psi_epsilon)
    if rows < config.min_rows:
        return FeatureSkew(status="insufficient", **out), []

    alerts: list[SkewAlert] = []

    def add(metric: str, value: float, threshold: float, what: str) -> None:
        alerts.append(
            SkewAlert(
                feature=name,
                metric=metric,
                value=value if math.isfinite(value) else None,
                threshold=threshold,
                message=f"feature '{name}': {what}; check how serving computes '{name}' "
                "(its default for missing values, its source and units) against training",
            )
        )

    nd = out["null_diff"]
    if nd is not None and abs(nd) > config.max_null_diff:
        add(
            "null_diff",
            nd,
            config.max_null_diff,
            f"null rate {serve_null:.3f} in serving vs {train_null:.3f} in training "
            f"(difference {nd:+.3f}, threshold {config.max_null_diff})",
        )
    if finite.size >= config.min_rows:
        ms, sr, p = out.get("mean_shift"), out.get("std_ratio"), out.get("psi")
        if ms is not None and abs(ms) > config.max_mean_shift_sd:
            add(
                "mean_shift",
                ms,
                config.max_mean_shift_sd,
                f"serving mean {serve_mean:.4g} vs training mean {stats.mean:.4g} is "
                + (f"{ms:+.2f} training sd" if math.isfinite(ms) else "off a constant training value")
                + f" (threshold {config.max_mean_shift_sd} sd)",
            )
        if sr is not None and not config.min_std_ratio <= sr <= config.max_std_ratio:
            bound = config.min_std_ratio if sr < config.min_std_ratio else config.max_std_ratio
            add(
                "std_ratio",
                sr,
                bound,
                f"serving std {serve_std:.4g} vs training std {stats.std:.4g} "
                f"(ratio {sr:.2f}, allowed [{config.min_std_ratio}, {config.max_std_ratio}])",
            )
        if p is not None and math.isfinite(p) and p > config.max_psi:
            over = "category shares" if stats.categories is not None else "the training histogram"
            add("psi", p, config.max_psi, f"PSI {p:.3f} over {over} (threshold {config.max_psi})")
    return FeatureSkew(status="alert" if alerts else "ok", **out), alerts


# --------------------------------------------------------------------------------------------
# Inputs: the log window, the model version, its training statistics
# --------------------------------------------------------------------------------------------


def require_request_log(data_dir: str | os.PathLike[str] | None) -> None:
    """Raise unless serving has written a request log into ``data_dir``.

    Raises:
        DataNotFoundError: with how to turn the log on.
    """
    if not any(any(log_dir(data_dir, t).glob("date=*/*.parquet")) for t in ("requests", "impressions")):
        raise DataNotFoundError(
            f"no request log under {log_dir(data_dir, 'requests').parent}: enable it with "
            "args.request_log.sample_rate > 0 in the Serve config and send traffic, then run this again"
        )


def load_scored_impressions(data_dir: str | os.PathLike[str] | None, since: datetime | None) -> pd.DataFrame:
    """Logged impressions since ``since`` that a ranker scored (its feature columns present).

    Raises:
        DataNotFoundError: nothing was logged in ``data_dir`` at all.
    """
    require_request_log(data_dir)
    imps = read_impressions(data_dir, since)
    cols = [FEATURE_PREFIX + f for f in feature_columns(imps)]
    if not cols:
        return imps.iloc[0:0]
    return imps[imps[cols].notna().any(axis=1)].reset_index(drop=True)


def load_ranker_inputs(data_dir: str | os.PathLike[str] | None, since: datetime | None) -> pd.DataFrame:
    """The logged sample of ranker input rows (over every candidate scored) since ``since``.

    This, not the served items, is what the training statistics describe: the ranker trains on
    retrieval candidates, and the served items are the top of its own ranking (a biased sample).

    Raises:
        DataNotFoundError: nothing was logged in ``data_dir`` at all.
    """
    require_request_log(data_dir)
    return read_scored(data_dir, since)


def select_version(scored: pd.DataFrame, label: str, since: datetime | None) -> pd.DataFrame:
    """The rows of ``scored`` served by ``label``.

    Raises:
        DataNotFoundError: none, naming the versions that did serve.
    """
    mine = scored[scored["model_version"] == label]
    if mine.empty:
        seen = sorted(scored["model_version"].unique().tolist())
        raise DataNotFoundError(
            f"no ranker-scored impression of model version {label} in the log window "
            f"(since {since.isoformat() if since else 'the start'}; versions seen: {seen or 'none'}); "
            "pass one of those versions or widen the window"
        )
    return mine


def normalise_version(label: str) -> str:
    """``"3"`` and ``"v3"`` both name registered version 3 as the logs do (``"v3"``)."""
    m = _VERSION_RE.match(label.strip())
    return f"v{m.group(1)}" if m else label.strip()


def _registry_exists(data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether a registry is configured, without creating an empty local one."""
    return bool(os.environ.get(ENV_TRACKING_URI)) or DataLayout.at(data_dir).mlflow_db.is_file()


def champion_label(data_dir: str | os.PathLike[str] | None) -> str | None:
    """The champion's label as serving logs it (``"v<N>"``), or None without a registry or champion."""
    if not _registry_exists(data_dir):
        return None
    from streamrec.registry.store import ModelRegistry

    try:
        info = ModelRegistry(data_dir=data_dir).get("champion")
    except RegistryError as err:
        log.warning("skew: cannot read the champion (%s); using the most served version", err)
        return None
    return None if info is None else f"v{info.version}"


def resolve_version(
    data_dir: str | os.PathLike[str] | None,
    scored: pd.DataFrame,
    model_version: str | None,
    *,
    champion: bool = True,
) -> tuple[str, VersionSource]:
    """The version to check: as given, else the champion's when it served, else the most served.

    Args:
        data_dir: Data directory (its registry names the champion).
        scored: Ranker-scored impressions of the window (:func:`load_scored_impressions`).
        model_version: The version asked for, if any.
        champion: Prefer the champion (False: the most served version, no registry read).

    Raises:
        DataNotFoundError: no version given and no ranker-scored impression in the window.
    """
    if model_version is not None:
        return normalise_version(model_version), "given"
    served = scored["model_version"].value_counts()
    if served.empty:
        raise DataNotFoundError(
            "no impression in the log window was scored by a ranker (only fallback levels served, "
            "or no traffic): send traffic to the full level, widen the window, or pass the model version"
        )
    champ = champion_label(data_dir) if champion else None
    if champ is not None and champ in served.index:
        return champ, "champion"
    return str(served.index[0]), "most_served"


def training_manifest(data_dir: str | os.PathLike[str] | None, label: str) -> BundleManifest:
    """The manifest of the bundle serving logs as ``label``.

    ``v<N>`` is registered version N (downloaded through the registry's cache); any other label
    is a bundle served from a directory, looked up under ``<data_dir>/models/bundles/<label>``.

    Raises:
        DataNotFoundError: no registry or bundle holds that version.
        RegistryError: the registry cannot be read or has no such version.
        CorruptCheckpointError: the bundle does not verify.
    """
    m = _VERSION_RE.match(label)
    if m:
        if not _registry_exists(data_dir):
            raise DataNotFoundError(
                f"model version {label}: no model registry in {resolve_data_dir(data_dir)} "
                f"(no mlflow.db, no ${ENV_TRACKING_URI}); point the check at the bundle directory instead"
            )
        from streamrec.registry.store import ModelRegistry

        return read_manifest(ModelRegistry(data_dir=data_dir).download(int(m.group(1))))
    bundle = DataLayout.at(data_dir).models / "bundles" / label
    if not bundle.is_dir():
        raise DataNotFoundError(
            f"model version '{label}' is neither a registered version (v<N>) nor a bundle under "
            f"{bundle.parent}; point the check at the bundle directory it was served from"
        )
    return read_manifest(bundle)


def _window(since: datetime | None, window_hours: float | None, now: datetime) -> datetime | None:
    if since is not None:
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    return None if window_hours is None else now - timedelta(hours=window_hours)


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def check_skew(
    data_dir: str | os.PathLike[str] | None,
    *,
    model_version: str | None = None,
    config: SkewConfig | None = None,
    since: datetime | None = None,
    bundle_dir: str | os.PathLike[str] | None = None,
    record: bool = True,
) -> SkewReport:
    """Compare the logged ranker inputs of one model version with its training statistics.

    Writes the result to ``<data_dir>/monitoring/skew/latest.json`` as well (what the serving
    replicas alert on), unless ``record`` is False (a report that only displays the check).

    Args:
        data_dir: StreamRec data directory (holds the request log and the registry).
        model_version: Version as serving logs it (``"v3"``; ``"3"`` is accepted). Default: the
            champion's when it served in the window, else the version most served.
        config: Thresholds and window (defaults: :class:`SkewConfig`).
        since: Start of the log window (default: ``config.window_hours`` before now).
        bundle_dir: Take the training statistics from this bundle directory instead of the
            registry (e.g. a bundle served with ``bundle=``); ``model_version`` then defaults
            to the version most served.
        record: Write the summary to ``latest.json`` (what the serving replicas alert on).

    Returns:
        The report; ``report.alerts`` is empty when no threshold was crossed.

    Raises:
        DataNotFoundError: no request log, nothing scored by a ranker in the window, or no
            bundle for the version.
        RegistryError: the registry cannot be read.
        CorruptCheckpointError: the bundle's manifest is unreadable.
    """
    cfg = config or SkewConfig()
    now = datetime.now(UTC)
    start = _window(since, cfg.window_hours, now)
    scored = load_ranker_inputs(data_dir, start)
    label, source = resolve_version(data_dir, scored, model_version, champion=bundle_dir is None)
    mine = select_version(scored, label, start)
    if bundle_dir is not None:
        manifest = read_manifest(bundle_dir)
        source = "given" if model_version is not None else "bundle"
    else:
        manifest = training_manifest(data_dir, label)
    report = SkewReport(
        model_version=label,
        version_source=source,
        training={
            "bundle": manifest.name,
            "data_cutoff": manifest.data_cutoff.isoformat(),
            "features_with_stats": len(manifest.feature_stats),
        },
        since=start,
        until=now,
        impressions=len(mine),
        checked_at=now,
    )
    mine = mine.dropna(axis=1, how="all")  # columns of other versions' layouts (never logged here)
    for name in feature_columns(mine):
        row, alerts = compare_feature(
            name, mine[FEATURE_PREFIX + name].to_numpy(np.float64), manifest.feature_stats.get(name), cfg
        )
        report.rows.append(row)
        report.alerts.extend(alerts)
    if record:
        write_latest(data_dir, report)
    return report


def write_latest(data_dir: str | os.PathLike[str] | None, report: SkewReport) -> Path:
    """Write ``report.summary()`` to ``<data_dir>/monitoring/skew/latest.json`` atomically."""
    target = DataLayout.at(data_dir).root / LATEST
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.summary(), indent=2) + "\n")
    os.replace(tmp, target)
    return target
