"""The HTTP user simulator against the real gateway in-process (httpx.ASGITransport, no Ray).

The gateway is ``build_gateway`` over real FunnelServices on PopularityStages of a small synthetic
world; the experiment routing in front of it assigns users with ``assign`` as the replicas do.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from streamrec.api_models import EventIn, RecommendRequest, RecommendResponse
from streamrec.auth import hash_key
from streamrec.data.event_log import EventLog
from streamrec.data.simulator import UserSimulator
from streamrec.data.store import DataStore
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.errors import DataError, ServingError
from streamrec.experiments.analysis import DECISIONS
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig, assign
from streamrec.experiments.simulate import simulate
from streamrec.funnel.noop import NoopStages
from streamrec.funnel.popularity import PopularityStages
from streamrec.resilience import ResilienceConfig
from streamrec.service.args import ServeArgs
from streamrec.service.http import build_gateway
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary

KEY = "sim-key-0123456789abcdef"
SALT = "sim-test"
Recommend = Callable[[RecommendRequest], Awaitable[RecommendResponse]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("simworld") / "data"
    synthesize(SynthConfig(users=60, items=50, days=2, seed=1), d, progress=False)
    return d


def service(stages: Any) -> FunnelService:
    return FunnelService(
        local_primary(lambda: stages, StageRunner(ResilienceConfig(), 10.0, 1)), None, ResilienceConfig(), 0.5
    )


def routed(control: Recommend, treatment: Recommend, share: float = 0.5) -> Recommend:
    async def recommend(request: RecommendRequest) -> RecommendResponse:
        variant = assign(request.user_id, SALT, share)
        resp = await (treatment if variant == TREATMENT else control)(request)
        resp.metadata.experiment_variant = variant
        return resp

    return recommend


def gateway(world: Path, recommend: Recommend, **limits: Any) -> tuple[FastAPI, EventLog]:
    args = ServeArgs.parse(
        {
            "data_dir": str(world),
            "event_log_fsync": False,
            "auth": {
                "use_env_key": False,
                "keys": [{"name": "sim", "key": hash_key(KEY), "scopes": ["read", "write"]}],
            },
            "limits": limits
            or {
                "rate_limit": {"rate_per_s": 1e6, "burst": 1_000_000},
                "unauthenticated_rate_limit": {"rate_per_s": 1e6, "burst": 1_000_000},
            },
        }
    )
    app, events = build_gateway(args, recommend, environ={})
    assert events is not None
    return app, events


@pytest.fixture
def popular(world: Path) -> Iterator[tuple[FastAPI, EventLog]]:
    stages = PopularityStages.from_data_dir(world)
    app, events = gateway(world, routed(service(stages), service(stages)))
    yield app, events
    events.close()


def run(app: FastAPI, world: Path, **kw: Any) -> Any:
    opts: dict[str, Any] = {"users": 30, "requests": 90, "k": 10, "concurrency": 4, "seed": 3}
    opts.update(kw)
    return simulate(
        "http://testserver",
        KEY,
        world,
        config=ExperimentConfig(name="sim", salt=SALT, treatment_share=0.5),
        transport=httpx.ASGITransport(app=app),
        **opts,
    )


def test_simulation_sends_real_requests_and_posts_what_the_users_did(
    world: Path, popular: tuple[FastAPI, EventLog]
) -> None:
    app, log = popular
    result = run(app, world)
    assert set(result.summaries) == {CONTROL, TREATMENT}
    c, t = result.summaries[CONTROL], result.summaries[TREATMENT]
    assert c.requests + t.requests == 90 and c.users + t.users == 30  # each user in one variant only
    assert c.impressions + t.impressions == 900 and not result.failures
    expected_t = sum(assign(u, SALT, 0.5) == TREATMENT for u in range(1, 61))
    assert 0 < t.users < 30 and 0 < expected_t < 60
    assert c.clicks + t.clicks > 0  # the ground-truth users do click

    stored = log.read()
    assert len(stored) == result.events_posted > 0
    assert stored["event_id"].str.startswith("sim-").all() and stored["event_id"].is_unique
    kinds = stored["event_type"].value_counts()
    assert kinds.get("click", 0) == c.clicks + t.clicks
    assert kinds.get("complete", 0) == c.completions + t.completions
    assert set(stored["event_type"]) <= {"click", "complete", "skip"}
    # each user's events carry the device their recorded sessions mostly used (serving sees it too)
    sim = UserSimulator(world)
    by_user = stored.groupby("user_id")["device"].agg(set).to_dict()
    assert by_user and all(devs == {sim.preferred_devices([u])[0]} for u, devs in by_user.items())
    if "experiment_variant" in EventIn.model_fields:  # the API takes the field (issue 16)
        raw = [json.loads(line) for seg in log.segments() for line in seg.read_text().splitlines()]
        variants = {r["user_id"]: r.get("experiment_variant") for r in raw}
        assert all(v == assign(u, SALT, 0.5) for u, v in variants.items())

    assert result.analysis is not None and result.decision in DECISIONS
    assert result.decision == "continue"  # 90 requests are far below the minimum sample size
    payload = result.to_dict()
    json.dumps(payload, allow_nan=False)
    rows = {r["variant"]: r for r in payload["variants"]}
    assert rows[CONTROL]["ctr_low"] <= rows[CONTROL]["ctr"] <= rows[CONTROL]["ctr_high"]
    assert rows[TREATMENT]["latency_p99_ms"] >= rows[TREATMENT]["latency_p50_ms"] > 0
    assert payload["decision"] == "continue" and payload["reasons"]
    assert {m["metric"] for m in payload["comparison"]} == {"ctr", "completion_rate", "coverage"}
    # the simulator's summaries carry the per-user sums the user-clustered comparison needs
    for s in (c, t):
        assert s.impressions_sq is not None and s.impressions_sq * s.users >= s.impressions**2
        assert s.clicks_x_impressions is not None and s.clicks_x_impressions >= s.clicks
    ctr = result.analysis.metric("ctr")
    assert ctr.comparable and f"{c.users:,} control and {t.users:,} treatment users" in ctr.note
    assert result.analysis.sample_size.unit == "users" and result.analysis.sample_size.control == c.users


def test_the_same_seed_gives_the_same_users_and_reactions(
    world: Path, popular: tuple[FastAPI, EventLog]
) -> None:
    app, _ = popular

    def counts(result: Any) -> dict[str, tuple[int, ...]]:
        return {
            v: (s.users, s.requests, s.impressions, s.clicks, s.completions, s.distinct_items)
            for v, s in result.summaries.items()
        }

    a = run(app, world, users=10, requests=20, concurrency=3)
    b = run(app, world, users=10, requests=20, concurrency=1)  # other interleaving, same draws
    assert counts(a) == counts(b)
    assert counts(run(app, world, users=10, requests=20, seed=4)) != counts(a)


def test_rate_limited_requests_are_retried_after_retry_after(world: Path) -> None:
    stages = PopularityStages.from_data_dir(world)
    app, log = gateway(
        world,
        routed(service(stages), service(stages)),
        rate_limit={"rate_per_s": 40.0, "burst": 4},
    )
    try:
        result = run(app, world, users=8, requests=16, concurrency=4)
    finally:
        log.close()
    assert result.retries > 0 and not result.failures
    assert sum(s.requests for s in result.summaries.values()) == 16
    assert sum(s.errors for s in result.summaries.values()) == 16  # popularity is a fallback level


def test_failed_treatment_requests_are_counted_in_the_treatment(world: Path) -> None:
    stages = PopularityStages.from_data_dir(world)
    calls: dict[int, int] = {}
    healthy = service(stages)

    async def flaky(request: RecommendRequest) -> RecommendResponse:
        calls[request.user_id] = calls.get(request.user_id, 0) + 1
        if calls[request.user_id] % 2 == 0:  # every second request of a user fails
            raise ServingError("treatment ranker unavailable")
        return await healthy(request)

    app, log = gateway(world, routed(service(stages), flaky))
    try:
        result = run(app, world, users=20, requests=60, max_retries=0)
    finally:
        log.close()
    c, t = result.summaries[CONTROL], result.summaries[TREATMENT]
    assert c.requests + t.requests == 60 and t.requests == 3 * t.users  # three requests per user
    assert result.failures == {"HTTP 503": t.users}  # the second request of each treatment user
    assert "none" not in result.summaries  # a failure is counted in the variant the user is known in
    # Popularity is a fallback level: no variant's model answered; the failed requests count as well.
    assert (c.errors, t.errors) == (c.requests, t.requests)
    assert result.analysis is not None and result.analysis.variants[TREATMENT].errors == t.requests


def test_a_server_of_another_world_is_a_clear_error(world: Path) -> None:
    noop = service(NoopStages())  # serves placeholder items 0..k-1: item 0 is not in the world
    app, log = gateway(world, routed(noop, noop))
    try:
        with pytest.raises(DataError, match="point --data-dir at the world"):
            run(app, world, users=2, requests=2)
    finally:
        log.close()


def test_a_key_without_access_stops_the_run(world: Path, popular: tuple[FastAPI, EventLog]) -> None:
    app, _ = popular
    with pytest.raises(ServingError, match="STREAMREC_API_KEY"):
        simulate(
            "http://testserver",
            "wrong-key-0123456789abcdef",
            world,
            users=2,
            requests=2,
            transport=httpx.ASGITransport(app=app),
        )


def test_the_events_go_to_the_stores_event_log(world: Path, popular: tuple[FastAPI, EventLog]) -> None:
    _, log = popular
    assert log.root == DataStore(world).layout.event_log
