"""Skew end to end: train a small synthetic world, serve requests in-process through the serving
policy with the request log on, check the logged ranker inputs against the champion's manifest.

Requests replay the ranker's training population: one per positive event of the ranker window,
with that event's time and device, so each user is weighted as in training and the context
features (hour, item age) are those of the training rows. The check reads the ``scored`` sample
(ranker inputs drawn over every candidate scored, as training rows are retrieval candidates), so
the item-side and cross features match too. What differs on a healthy run here is real, and the
check is right to see it: this 8-day world's 30-day user counters grow over time (training joins
them at the ranker window's start, serving reads today's), popularity percentiles move with the
catalogue's history, and the ranker was trained on retrieval model A's two-tower scores while
serving feeds it model B's (refit on more data): ``x_two_tower`` shifts by most of a standard
deviation. Those are left out of :data:`STABLE`; everything else must stay quiet.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamrec.api_models import RecommendRequest
from streamrec.data.store import DataStore
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, read_impressions
from streamrec.monitoring.skew import SkewReport, check_skew
from streamrec.pipeline.train import run_pipeline
from streamrec.registry import ModelRegistry, read_manifest
from tests.integration.test_training_pipeline import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Features whose serving values should follow training when serving is healthy (see the docstring).
STABLE = (
    "age",
    "tenure_days",
    "item_events_7d",
    "item_ctr_7d",
    "item_users_7d",
    "x_category_pref",
    "x_log_age_days",
    "x_src_cf",
    "x_src_affinity",
    "x_n_sources",
    "ctx_hour_sin",
    "ctx_hour_cos",
    "device",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("skew-world")
    synthesize(SynthConfig(users=400, items=300, days=8, seed=3), d, progress=False)
    run_pipeline(d, small_config(use_ray=False), log=lambda m: None)
    return d


def replay_requests(d: Path, n: int, seed: int = 0) -> list[RecommendRequest]:
    """``n`` requests drawn from the positive events of the champion's ranker window."""
    manifest = read_manifest(ModelRegistry(data_dir=d).download("champion"))
    assert manifest.fit is not None  # the served ranker's window (a refit's: up to the last event)
    ev = DataStore(d).events(columns=["user_id", "timestamp", "label", "device"])
    t_rank, cutoff = pd.Timestamp(manifest.fit.served.ranker_window_start), pd.Timestamp(manifest.fit.served.cutoff)
    pos = ev[(ev["timestamp"] >= t_rank) & (ev["timestamp"] < cutoff) & (ev["label"] > 0)]
    rows = pos.sample(n=min(n, len(pos)), random_state=seed)
    return [
        RecommendRequest.model_validate(
            {
                "user_id": int(r.user_id),
                "k": 10,
                "context": {"timestamp": r.timestamp, "device": r.device or "unknown"},
            }
        )
        for r in rows.itertuples()
    ]


def serve(d: Path, requests: list[RecommendRequest], read_features: Any = None) -> None:
    """Serve ``requests`` through FunnelService (the replica's policy) with every response logged."""
    from streamrec.funnel.recommender import build_stages
    from streamrec.resilience import ResilienceConfig
    from streamrec.service.policy import FunnelService
    from streamrec.service.runner import StageRunner, local_primary

    stages = build_stages(d)
    if read_features is not None:
        stages.read_features = read_features(stages.read_features)  # type: ignore[method-assign]
    res = ResilienceConfig(request_budget_ms=60_000, online_store_ms=30_000, ranker_ms=30_000, context_ms=30_000,
                           level_timeouts_ms={"full": 60_000})  # fmt: skip
    log = RequestLog(d, RequestLogConfig(sample_rate=1.0), start=False)
    service = FunnelService(
        local_primary(lambda: stages, StageRunner(res, 30.0)), None, res, 30.0, request_log=log
    )

    async def run() -> list[str]:
        return [(await service(r)).metadata.degradation_level for r in requests]

    levels = asyncio.run(run())
    assert levels.count("full") >= 0.9 * len(levels), pd.Series(levels).value_counts().to_dict()
    log.close()


def table(report: SkewReport) -> str:
    return "\n".join(
        f"{r.feature:24s} {r.status:12s} shift {r.mean_shift if r.mean_shift is not None else float('nan'):+.2f} "
        f"ratio {r.std_ratio if r.std_ratio is not None else float('nan'):.2f} "
        f"psi {r.psi if r.psi is not None else float('nan'):.3f}"
        for r in report.rows
    )


def test_clean_and_injected_serving_default(world: Path, tmp_path: Path) -> None:
    import shutil

    requests = replay_requests(world, 300)
    clean = tmp_path / "clean"
    shutil.copytree(world, clean)
    serve(clean, requests)
    imps = read_impressions(clean)
    assert imps["model_version"].eq("v1").all() and imps["f_age"].notna().mean() > 0.9
    report = check_skew(clean)
    print("\nclean serving:\n" + table(report))
    assert report.model_version == "v1" and report.version_source == "champion"
    for f in STABLE:
        assert report.status_of(f) == "ok", (f, table(report))

    # The online store lost `age` for most users and serving's default for it is 0.
    def age_defaults_to_zero(read: Any) -> Any:
        def patched(user_id: int) -> dict[str, Any]:
            feats = dict(read(user_id))
            if user_id % 5:
                feats["age"] = 0
            return feats

        return patched

    skewed = tmp_path / "skewed"
    shutil.copytree(world, skewed)
    serve(skewed, requests, read_features=age_defaults_to_zero)
    report = check_skew(skewed)
    print("\nage defaulted to 0:\n" + table(report))
    age_alerts = [a for a in report.alerts if a.feature == "age"]
    assert {"mean_shift", "psi"} <= {a.metric for a in age_alerts}
    assert all("'age'" in a.message for a in age_alerts)
    assert all(report.status_of(f) == "ok" for f in STABLE if f != "age")
    assert np.isclose((read_impressions(skewed)["f_age"] == 0).mean(), 0.8, atol=0.1)
