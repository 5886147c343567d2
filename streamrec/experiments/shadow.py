"""Shadow mode's measures and report: paired predictions, ``ShadowModeReport``, ``is_ready_for_canary``.

The serving side (:class:`streamrec.service.shadow.ShadowScorer`) writes one row per shadow run
to the request log's ``shadow`` table: latency, error, and the production and shadow ranker
scores of the candidates both ranked. :func:`shadow_report` reads them.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from streamrec.errors import DataNotFoundError
from streamrec.experiments.config import ShadowGates
from streamrec.funnel.stages import Candidates
from streamrec.monitoring.logs import read_shadow

#: Paired scores kept per shadow run (a uniform sample of the candidates both ranked).
PAIRS_KEPT = 32
#: Score histogram bins of the distribution-shift PSI.
PSI_BINS = 10


def paired_scores(production: Candidates | None, shadow: Candidates | None) -> tuple[np.ndarray, np.ndarray]:
    """The two rankers' scores of the items both ranked (by raw item id), aligned."""
    if production is None or shadow is None or production.ids is None or shadow.ids is None:
        return np.empty(0, np.float64), np.empty(0, np.float64)
    prod = pd.Series(np.asarray(production.scores, np.float64), index=np.asarray(production.ids, np.int64))
    shad = pd.Series(np.asarray(shadow.scores, np.float64), index=np.asarray(shadow.ids, np.int64))
    prod = prod[~prod.index.duplicated()]
    shad = shad[~shad.index.duplicated()]
    common = prod.index.intersection(shad.index)
    return prod.loc[common].to_numpy(), shad.loc[common].to_numpy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of paired scores (NaN with fewer than 3 pairs or a constant side)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------------------- the report


@dataclass
class ShadowModeReport:
    """How a shadow bundle did against production on the same requests.

    Attributes:
        shadow_version: The shadow's model version(s) in the window.
        requests: Shadow runs.
        prediction_correlation: Median over runs of the Spearman correlation of shadow and
            production scores on the candidates both ranked.
        p50_latency_ms: Median shadow funnel latency.
        p99_latency_ms: 99th percentile shadow funnel latency.
        error_rate: Share of runs that failed.
        score_psi: PSI of the shadow's scores against production's (paired samples): the
            distribution shift of the predictions.
        ready_for_canary: Whether every gate passes.
        blocking: The gates that fail, each with its number and threshold.
    """

    shadow_version: str
    requests: int
    prediction_correlation: float
    p50_latency_ms: float
    p99_latency_ms: float
    error_rate: float
    score_psi: float
    ready_for_canary: bool = False
    blocking: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN as None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def score_psi(production: np.ndarray, shadow: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI of ``shadow`` against ``production`` over production's quantile bins (NaN when empty)."""
    if len(production) < bins or len(shadow) < bins:
        return math.nan
    edges = np.unique(np.quantile(production, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, production, side="right"), minlength=len(edges) + 1) / len(production)
    q = np.bincount(np.searchsorted(edges, shadow, side="right"), minlength=len(edges) + 1) / len(shadow)
    p, q = np.clip(p, 1e-4, None), np.clip(q, 1e-4, None)
    return float(np.sum((q - p) * np.log(q / p)))


def is_ready_for_canary(report: ShadowModeReport, gates: ShadowGates) -> list[str]:
    """The gates ``report`` fails (empty: ready), each naming its number and threshold."""
    out: list[str] = []
    if report.requests < gates.min_requests:
        out.append(f"requests: {report.requests} < {gates.min_requests}")
    corr = report.prediction_correlation
    if math.isnan(corr) or corr < gates.min_correlation:
        out.append(f"prediction_correlation: {corr:.3f} < {gates.min_correlation}")
    if not report.p99_latency_ms <= gates.max_p99_latency_ms:
        out.append(f"p99_latency_ms: {report.p99_latency_ms:.1f} > {gates.max_p99_latency_ms}")
    if not report.error_rate <= gates.max_error_rate:
        out.append(f"error_rate: {report.error_rate:.4f} > {gates.max_error_rate}")
    if not (math.isnan(report.score_psi) or report.score_psi <= gates.max_score_psi):
        out.append(f"score_psi: {report.score_psi:.3f} > {gates.max_score_psi}")
    return out


def shadow_report(
    data_dir: str | os.PathLike[str] | None,
    gates: ShadowGates | None = None,
    *,
    since: datetime | None = None,
    version: str | None = None,
) -> ShadowModeReport:
    """The shadow report over the logged shadow runs (of ``version``, default the latest shadow).

    Raises:
        DataNotFoundError: no shadow run is logged in ``data_dir`` (since ``since``).
    """
    runs = read_shadow(data_dir, since)
    if version is None and not runs.empty:
        version = str(runs["shadow_version"].iloc[-1])
    if version is not None:
        runs = runs[runs["shadow_version"].astype(str) == version]
    if runs.empty:
        raise DataNotFoundError(
            "no shadow runs are logged: point the registry's 'shadow' alias at a version "
            "(`streamrec registry set-alias shadow N`) while serving with the request log on"
        )
    ok = runs[runs["error"].isna()]
    lat = runs["latency_ms"].to_numpy(np.float64)
    prod = np.concatenate([np.asarray(x, np.float64) for x in ok["production_scores"]] or [np.empty(0)])
    shad = np.concatenate([np.asarray(x, np.float64) for x in ok["shadow_scores"]] or [np.empty(0)])
    corr = ok["correlation"].astype(np.float64).dropna()
    report = ShadowModeReport(
        shadow_version=str(version),
        requests=len(runs),
        prediction_correlation=float(corr.median()) if len(corr) else math.nan,
        p50_latency_ms=float(np.percentile(lat, 50)),
        p99_latency_ms=float(np.percentile(lat, 99)),
        error_rate=float(runs["error"].notna().mean()),
        score_psi=score_psi(prod, shad),
    )
    report.blocking = is_ready_for_canary(report, gates or ShadowGates())
    report.ready_for_canary = not report.blocking
    return report
