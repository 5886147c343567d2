"""Experiments on the serving side: assignment, several bundles in one gateway, shadow runs, rollout.

The gateway runs in-process (ASGI) over real PopularityStages on the tiny world of
``test_gateway``; the registry is a real MLflow SQLite registry (``test_registry``'s fixtures).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from streamrec.api_models import RecommendRequest
from streamrec.auth import ApiKeyAuth
from streamrec.data.event_log import EventLog
from streamrec.data.store import DataStore
from streamrec.errors import ConfigError, DataNotFoundError, PromotionRefusedError, RegistryError
from streamrec.experiments import rollout
from streamrec.experiments.config import (
    CONTROL,
    TREATMENT,
    ExperimentConfig,
    ShadowGates,
    assign,
    bucket,
    load_definition,
    preregister,
)
from streamrec.experiments.shadow import correlation, paired_scores, score_psi, shadow_report
from streamrec.funnel.popularity import PopularityStages
from streamrec.funnel.stages import Candidates
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, read_requests, read_shadow
from streamrec.registry import ModelRegistry
from streamrec.resilience import ResilienceConfig
from streamrec.service.args import ServeArgs
from streamrec.service.loading import LoadedStages
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary
from streamrec.service.shadow import ShadowScorer
from streamrec.service.variants import ExperimentRouter, Variants
from streamrec.serving.gateway import create_app
from tests.unit.test_gateway import READ, WRITE, auth_config, make_world
from tests.unit.test_registry import make_bundle, migrated_db, reg, smoke_ok  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("world") / "data")


# ------------------------------------------------------------------------------------ assignment


def test_assignment_is_deterministic_sticky_under_a_growing_share_and_uniform() -> None:
    users = range(1, 20_001)
    at_5 = {u: assign(u, "exp-a", 0.05) for u in users}
    assert at_5 == {u: assign(u, "exp-a", 0.05) for u in users}  # the same on every call / replica
    at_25 = {u: assign(u, "exp-a", 0.25) for u in users}
    assert all(at_25[u] == TREATMENT for u in users if at_5[u] == TREATMENT)  # a rollout only adds users
    share = Counter(at_25.values())[TREATMENT] / len(at_25)
    assert 0.24 < share < 0.26
    # another salt reshuffles: the treated sets of two experiments are nearly independent
    other = {u for u in users if assign(u, "exp-b", 0.25) == TREATMENT}
    mine = {u for u in users if at_25[u] == TREATMENT}
    assert 0.04 < len(mine & other) / len(users) < 0.085
    assert all(0 <= bucket(u, "s") < 1 for u in range(100))
    assert assign(7, "x", 0.0) == CONTROL and assign(7, "x", 1.0) == TREATMENT


def test_the_definition_is_validated_and_preregistered_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="end at 1.0"):
        ExperimentConfig(rollout_steps=[0.1, 0.5])
    with pytest.raises(ValueError, match="increase"):
        ExperimentConfig(rollout_steps=[0.5, 0.1, 1.0])
    assert ExperimentConfig(primary_metric="completion_rate", metrics=["ctr"]).metrics[0] == "completion_rate"
    with pytest.raises(DataNotFoundError, match="experiment:"):
        load_definition(tmp_path)
    with pytest.raises(ValueError, match="below 1.0"):
        ExperimentConfig(rollout_steps=[1.0])
    with pytest.raises(ValueError, match="guardrails are judged"):
        ExperimentConfig(min_requests_per_step=10)
    first = ExperimentConfig(name="ranker-v2", expected_effect=0.1)
    preregister(tmp_path, first)
    with pytest.raises(
        ConfigError, match="other expected_effect, treatment_share"
    ):  # rules fixed once registered
        preregister(tmp_path, ExperimentConfig(name="ranker-v2", expected_effect=0.5, treatment_share=0.5))
    preregister(
        tmp_path, ExperimentConfig(name="ranker-v2", expected_effect=0.1, poll_s=2)
    )  # operational: fine
    assert load_definition(tmp_path, "ranker-v2").expected_effect == 0.1
    with pytest.raises(ConfigError, match="other offline_gate"):  # it decides the promotion
        preregister(tmp_path, ExperimentConfig(name="ranker-v2", expected_effect=0.1, offline_gate="refuse"))
    # a definition written before a field existed compares that field as its default
    path = preregister(tmp_path, ExperimentConfig(name="older"))
    old = json.loads(path.read_text())
    del old["offline_gate"]
    path.write_text(json.dumps(old))
    preregister(tmp_path, ExperimentConfig(name="older"))
    with pytest.raises(ConfigError):
        ServeArgs.parse({"experiment": {"name": "x", "unknown": 1}})


# ------------------------------------------------------------------------------------ routing


def _service(stages: Any, request_log: RequestLog | None = None) -> FunnelService:
    res = ResilienceConfig()
    return FunnelService(
        local_primary(lambda: stages, StageRunner(res, 10.0)), None, res, 10.0, request_log=request_log
    )


def _variants(
    world: Path, state: dict[str, Any], loads: list[int], **experiment: Any
) -> tuple[Variants, RequestLog]:
    args = ServeArgs.parse({"data_dir": str(world), "experiment": {"name": "routing", **experiment}})
    # (each test's experiment has its own name: a pre-registered definition cannot change)
    log = RequestLog(world, RequestLogConfig(sample_rate=1.0), start=False)

    def loader(version: int) -> LoadedStages:
        loads.append(version)
        if version == 99:
            raise ValueError("bundle checksum mismatch")
        return LoadedStages(PopularityStages.from_data_dir(world), "recommender")

    v = Variants(
        args,
        fallback=lambda: None,
        request_log=log,
        registry_state=lambda: (dict(state["aliases"]), dict(state["states"])),
        loader=loader,
    )
    return v, log


def test_the_router_sends_treated_users_to_the_challenger_and_names_the_variant(world: Path) -> None:
    state: dict[str, Any] = {"aliases": {"champion": 1}, "states": {}}
    loads: list[int] = []
    variants, log = _variants(world, state, loads, treatment_share=0.5)
    control = _service(PopularityStages.from_data_dir(world), log)
    router = ExperimentRouter(control, variants)

    async def serve_all() -> dict[int, str | None]:
        await variants.refresh()
        out = {}
        for u in range(1, 11):
            r = await router(RecommendRequest(user_id=u, k=3))
            out[u] = r.metadata.experiment_variant
        return out

    assert set(asyncio.run(serve_all()).values()) == {None}  # no challenger: nobody is in an experiment
    state["aliases"]["challenger"] = 2
    got = asyncio.run(serve_all())
    assert loads == [2]
    assert got == {u: assign(u, "routing", 0.5) for u in got}
    assert variants.treatment is not None
    n_treated = sum(v == TREATMENT for v in got.values())
    assert sum(variants.treatment.served.values()) == n_treated > 0
    assert sum(control.served.values()) == 10 + (10 - n_treated)
    # the rollout's share in the registry wins over the definition's default
    state["states"] = {
        "rollout": {
            "experiment": "routing",
            "version": 2,
            "step": 1,
            "share": 1.0,
            "since": "2026-12-01T00:00:00+00:00",
        }
    }
    assert set(asyncio.run(serve_all()).values()) == {TREATMENT}
    # a version that cannot load is not served (the champion answers everyone, out of the
    # experiment) and is not retried on every poll, only after a growing pause
    state["aliases"]["challenger"] = 99
    asyncio.run(variants.refresh())
    asyncio.run(variants.refresh())
    assert loads == [2, 99] and variants.challenger is None and variants.route(1) is None
    assert "challenger v99" in variants.refused
    variants._retry_at["challenger v99"] = 0.0  # the pause is over: tried again
    asyncio.run(variants.refresh())
    assert loads == [2, 99, 99]
    state["aliases"]["challenger"] = 2  # the registry moved on: the refusal is forgotten
    asyncio.run(variants.refresh())
    assert loads == [2, 99, 99, 2] and not variants.refused and variants.route(1) is not None
    # the challenger alias cleared: everyone is back on the champion, out of the experiment
    del state["aliases"]["challenger"]
    assert set(asyncio.run(serve_all()).values()) == {None} and variants.treatment is None
    log.flush()
    reqs = read_requests(world)
    assert set(reqs["variant"].dropna()) == {CONTROL, TREATMENT}
    assert variants.describe()["experiment"] == "routing"


def test_a_promoted_challenger_answers_everyone_until_the_champion_reload(world: Path) -> None:
    state: dict[str, Any] = {"aliases": {"champion": 1, "challenger": 2}, "states": {}}
    loads: list[int] = []
    serving = {"version": 1}

    async def serving_version() -> int | None:
        return serving["version"]

    variants, _ = _variants(world, state, loads, name="handover", treatment_share=0.1)
    variants._serving_version = serving_version
    asyncio.run(variants.refresh())
    assert variants.share == 0.1 and not variants.handing_over
    state["aliases"] = {"champion": 2}  # promoted: the challenger alias is cleared
    asyncio.run(variants.refresh())
    assert variants.handing_over and variants.share == 1.0 and loads == [2]  # held, not reloaded
    assert {variants.route(u) for u in range(1, 50)} == {TREATMENT}
    assert variants.describe()["handing_over"] == 1  # an int: summed over replicas in the status

    async def broken() -> int | None:
        raise TimeoutError("Features replica busy")

    variants._serving_version = broken  # unknown for a poll: the handover holds
    asyncio.run(variants.refresh())
    assert variants.handing_over and variants.share == 1.0
    variants._serving_version = serving_version
    since = variants._handover_since
    assert since is not None
    variants._handover_since = since - variants._handover_limit_s() - 1  # the reload never came
    asyncio.run(variants.refresh())
    assert not variants.handing_over and variants.challenger is None  # the champion path answers again
    serving["version"] = 2  # the champion watcher reloaded this replica
    asyncio.run(variants.refresh())
    assert not variants.handing_over and variants.challenger is None and variants.route(1) is None
    # without a serving version (tests, a path-served bundle) the promoted challenger is dropped
    plain, _ = _variants(
        world,
        {"aliases": {"champion": 1, "challenger": 2}, "states": {}},
        [],
        name="handover",
        treatment_share=0.1,
    )
    asyncio.run(plain.refresh())
    plain_state = {"aliases": {"champion": 2}, "states": {}}
    plain._state = lambda: (dict(plain_state["aliases"]), dict(plain_state["states"]))
    asyncio.run(plain.refresh())
    assert plain.challenger is None and not plain.handing_over


def test_the_bundle_cap_keeps_the_shadow_and_challenger_out(world: Path) -> None:
    state: dict[str, Any] = {"aliases": {"champion": 1, "challenger": 2, "shadow": 3}, "states": {}}
    loads: list[int] = []
    variants, _ = _variants(world, state, loads, name="cap", max_bundles=2)
    asyncio.run(variants.refresh())
    assert loads == [2] and variants.shadow_bundle is None
    variants1, _ = _variants(world, state, loads := [], name="cap", max_bundles=1)
    asyncio.run(variants1.refresh())
    assert loads == [] and variants1.route(5) is None
    held = variants.describe()["challenger"]
    assert held["version"] == "v2" and held["memory_mb"] >= 0 and held["load_seconds"] >= 0


def test_events_are_stamped_with_the_users_variant_unless_they_carry_one(world: Path, tmp_path: Path) -> None:
    store = DataStore(world)
    events = EventLog(
        tmp_path / "log", store.users()["user_id"].to_numpy(), store.items()["item_id"].to_numpy()
    )
    control = _service(PopularityStages.from_data_dir(world))
    app = create_app(
        control,
        events,
        ApiKeyAuth.from_config(auth_config(), environ={}),
        variant_of=lambda user: TREATMENT if user == 1 else CONTROL,
    )
    body = {
        "events": [
            {"event_id": "e1", "user_id": 1, "item_id": 100, "event_type": "click"},
            {"event_id": "e2", "user_id": 2, "item_id": 100, "event_type": "click"},
            {
                "event_id": "e3",
                "user_id": 2,
                "item_id": 101,
                "event_type": "click",
                "experiment_variant": TREATMENT,
            },
        ]
    }
    with TestClient(app) as c:
        assert c.post("/v1/events", json=body, headers={"X-API-Key": WRITE}).status_code == 200
        bad = {"events": [{"user_id": 1, "item_id": 100, "event_type": "click", "experiment_variant": "a b"}]}
        assert c.post("/v1/events", json=bad, headers={"X-API-Key": WRITE}).status_code == 422
        r = c.post("/v1/recommend", json={"user_id": 1, "k": 2}, headers={"X-API-Key": READ})
        assert r.json()["metadata"]["experiment_variant"] is None  # no router: not in an experiment
    logged = events.read().set_index("event_id")["experiment_variant"].to_dict()
    assert logged == {"e1": TREATMENT, "e2": CONTROL, "e3": TREATMENT}


# ------------------------------------------------------------------------------------ shadow


class _Broken(PopularityStages):
    def user_context(self, request: Any, features: dict[str, Any] | None = None) -> Any:
        raise RuntimeError("shadow bundle is broken")


def test_a_failing_shadow_never_reaches_the_answer_and_its_runs_are_logged(world: Path) -> None:
    log = RequestLog(world / "shadowed", RequestLogConfig(sample_rate=0.0), start=False)
    pop = PopularityStages.from_data_dir(world)
    control = _service(pop)
    scorer = ShadowScorer(ExperimentConfig().shadow, ResilienceConfig(), 10.0, log)
    control.after = scorer.observe
    broken = _Broken.from_data_dir(world)

    async def run() -> list[Any]:
        scorer.set_stages(broken, "v9")
        answers = [await control(RecommendRequest(user_id=u, k=3)) for u in (1, 2)]
        await asyncio.sleep(0.5)
        scorer.set_stages(pop, "v8")
        answers.append(await control(RecommendRequest(user_id=3, k=3)))
        await asyncio.sleep(0.5)
        return answers

    answers = asyncio.run(run())
    assert all(a.items and a.metadata.degradation_level == "popularity" for a in answers)
    assert scorer.errors + scorer.skipped >= 1 and scorer.runs >= 2
    log.flush()
    runs = read_shadow(world / "shadowed")
    assert set(runs["shadow_version"]) <= {"v8", "v9"} and len(runs) == scorer.runs
    assert (runs.loc[runs["shadow_version"] == "v9", "error"] == "RuntimeError").all()
    assert runs.loc[runs["shadow_version"] == "v8", "error"].isna().all()
    assert (runs["latency_ms"] > 0).all()


def _cands(ids: list[int], scores: list[float]) -> Candidates:
    n = len(ids)
    return Candidates(np.arange(n), np.asarray(scores, np.float32), [[]] * n, ids=np.asarray(ids, np.int64))


def test_paired_scores_correlation_and_psi() -> None:
    a, b = paired_scores(_cands([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]), _cands([9, 5, 4, 3, 2], [0, 1.5, 2, 3, 4]))
    assert list(a) == [4, 3, 2, 1] and list(b) == [4, 3, 2, 1.5]  # items 2..5, aligned by id
    assert correlation(a, b) == pytest.approx(1.0)
    assert math.isnan(correlation(a[:2], b[:2]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    assert score_psi(x, rng.normal(size=5000)) < 0.02
    assert score_psi(x, rng.normal(loc=1.0, size=5000)) > 0.25


def test_shadow_report_names_each_blocking_gate(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=0.0), start=False)
    with pytest.raises(DataNotFoundError, match="set-alias shadow"):
        shadow_report(tmp_path)
    rng = np.random.default_rng(1)
    for i in range(60):
        prod = rng.normal(size=32)
        log.record_shadow(
            {
                "request_id": f"r{i}",
                "ts": 1.7e9 + i,
                "user_id": i,
                "model_version": "v1",
                "shadow_version": "v2",
                "latency_ms": 300.0 if i < 2 else 20.0,
                "error": "TimeoutError" if i < 3 else None,
                "common": 32,
                "correlation": 0.9,
                "production_scores": prod.tolist(),
                "shadow_scores": (prod + 0.1 * rng.normal(size=32)).tolist(),
            }
        )
    log.flush()
    report = shadow_report(tmp_path, ShadowGates(min_requests=50))
    assert report.requests == 60 and report.prediction_correlation == pytest.approx(0.9)
    assert report.error_rate == pytest.approx(0.05) and report.score_psi < 0.05
    assert not report.ready_for_canary
    assert [b.split(":")[0] for b in report.blocking] == ["p99_latency_ms", "error_rate"]
    ok = shadow_report(tmp_path, ShadowGates(min_requests=50, max_p99_latency_ms=400, max_error_rate=0.1))
    assert ok.ready_for_canary and ok.blocking == []
    assert json.loads(json.dumps(ok.to_dict()))["shadow_version"] == "v2"


# ------------------------------------------------------------------------------------ rollout


@dataclass
class _Variant:
    requests: int


@dataclass
class _Judged:
    """An analysis outcome as :func:`rollout.advance` reads it (the statistics are tested apart)."""

    decision: str
    treatment_requests: int
    reasons: list[str] = field(default_factory=list)

    @property
    def variants(self) -> dict[str, _Variant]:
        return {TREATMENT: _Variant(self.treatment_requests), CONTROL: _Variant(10 * self.treatment_requests)}

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reasons": self.reasons}


def test_a_rollout_walks_its_steps_and_promotes_with_every_step_recorded(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    data = reg.layout.root
    cfg = ExperimentConfig(name="ranker-v2", rollout_steps=[0.05, 0.5, 1.0], min_requests_per_step=100)
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.110}))
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.120}))
    reg.promote(v1.version, smoke_test=smoke_ok)
    with pytest.raises(RegistryError, match="rollout start"):
        rollout.advance(data, cfg, analysis=_Judged("continue", 0))
    assert rollout.step_window(data, cfg) is None
    with pytest.raises(ConfigError, match="already the champion"):
        rollout.start(data, cfg, v1.version)
    assert rollout.current_share(data, cfg) == 0.0
    rollout.start(data, cfg, v2.version)
    assert rollout.current_share(data, cfg) == 0.05
    nothing = rollout.advance(data, cfg)  # no request logged at this step yet: held, not an error
    assert nothing.action == "held" and "not judged yet" in nothing.reasons[0]
    since, until, share = rollout.step_window(data, cfg)  # type: ignore[misc]
    assert until is None and share == 0.05
    held = rollout.advance(data, cfg, analysis=_Judged("continue", 40))
    assert held.action == "held" and "40 of 100" in held.reasons[0]
    step = rollout.advance(data, cfg, analysis=_Judged("continue", 150))  # the canary: guardrails held
    assert (step.action, step.share) == ("advanced", 0.5) and rollout.current_share(data, cfg) == 0.5
    assert (
        rollout.advance(data, cfg, analysis=_Judged("continue", 150)).action == "held"
    )  # the A/B needs a win
    done = rollout.advance(data, cfg, analysis=_Judged("ship", 900, ["ctr +12%"]), smoke_test=smoke_ok)
    assert (done.action, done.share) == ("promoted", 1.0)  # 100% is the promotion
    assert reg.aliases() == {"champion": v2.version}
    assert rollout.current_share(data, cfg) == 0.0
    since, until, share = rollout.step_window(data, cfg)  # type: ignore[misc]
    assert share == 0.5 and until is not None  # the last step, for analyse/report
    events = [(e.event, e.alias, e.version) for e in reg.history()]
    assert events[:6] == [
        ("rollout_promoted", "challenger", 2),
        ("cleared", "challenger", 2),
        ("promoted", "champion", 2),
        ("rollout_advanced", "challenger", 2),
        ("rollout_started", "challenger", 2),
        ("set", "challenger", 2),
    ]
    promoted = reg.history()[0]
    assert promoted.detail["decision"] == "ship" and promoted.detail["reasons"] == ["ctr +12%"]
    from typer.testing import CliRunner

    from streamrec.cli import app

    text = CliRunner().invoke(app, ["registry", "history", "--data-dir", str(data)]).stdout
    assert "rollout_promoted challenger v2  at 50% ship: ctr +12%" in text
    advanced = next(e for e in reg.history() if e.event == "rollout_advanced")
    assert (advanced.detail["share"], advanced.detail["from_share"]) == (0.5, 0.05)


def test_a_guardrail_breach_rolls_the_challenger_back(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    data = reg.layout.root
    cfg = ExperimentConfig(name="slow-ranker", min_requests_per_step=10, guardrails={"min_requests": 10})
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.110}))
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.120}))
    reg.promote(v1.version, smoke_test=smoke_ok)
    rollout.start(data, cfg, v2.version)
    breach = "guardrail latency_p99: treatment 412 ms > control 95 ms x 1.5"
    out = rollout.advance(data, cfg, analysis=_Judged("rollback", 5, [breach]))
    assert out.action == "rolled_back"  # a breach acts at once, whatever the sample size
    assert reg.aliases() == {"champion": v1.version} and rollout.current_share(data, cfg) == 0.0
    last = reg.history()[0]
    assert (last.event, last.version) == ("rollout_rolled_back", 2) and last.detail["reasons"] == [breach]
    # a stopped A/B (enough data, no win) keeps the champion and ends the rollout
    flat = ExperimentConfig(
        name="flat", rollout_steps=[0.5, 1.0], min_requests_per_step=10, guardrails={"min_requests": 10}
    )
    rollout.start(data, flat, v2.version)
    assert rollout.advance(data, flat, analysis=_Judged("no_difference", 500)).action == "stopped"
    assert reg.aliases() == {"champion": v1.version}


def test_a_refused_promotion_holds_and_is_recorded_once(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    data = reg.layout.root
    cfg = ExperimentConfig(
        name="worse-offline",
        rollout_steps=[0.5, 1.0],
        min_requests_per_step=10,
        guardrails={"min_requests": 10},
        offline_gate="refuse",  # the default lets the won A/B decide (next test)
    )
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.120}))
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.050}))  # fails the gate
    reg.promote(v1.version, smoke_test=smoke_ok)
    rollout.start(data, cfg, v2.version)
    first = rollout.advance(data, cfg, analysis=_Judged("ship", 900), smoke_test=smoke_ok)
    assert first.action == "held" and first.reasons[0].startswith("promotion refused: ")
    again = [rollout.advance(data, cfg, analysis=_Judged("ship", 900), smoke_test=smoke_ok) for _ in range(3)]
    assert all(d.action == "held" and "refused at this step" in d.reasons[0] for d in again)
    assert reg.aliases()["champion"] == v1.version
    events = [e.event for e in reg.history(limit=None)]
    assert events.count("rollout_blocked") == 1 and events.count("refused") == 1
    blocked = next(e for e in reg.history(limit=None) if e.event == "rollout_blocked")
    assert blocked.detail["gate"] != "bundle" and blocked.detail["champion"] == v1.version
    # a bundle-gate refusal (a smoke test failing: perhaps transient) is asked again at each tick
    v3 = reg.register(make_bundle(tmp_path, "b3", seed=3, metrics={"ndcg@10": 0.130}))
    cfg3 = ExperimentConfig(
        name="flaky-smoke",
        rollout_steps=[0.5, 1.0],
        min_requests_per_step=10,
        guardrails={"min_requests": 10},
    )
    rollout.advance(data, cfg, analysis=_Judged("rollback", 900, ["stop"]))  # end the first rollout
    rollout.start(data, cfg3, v3.version)
    first = rollout.advance(data, cfg3, analysis=_Judged("ship", 900), smoke_test=_smoke_fails)
    assert first.action == "held" and first.reasons[0].startswith("promotion refused: ")
    done = rollout.advance(data, cfg3, analysis=_Judged("ship", 900), smoke_test=smoke_ok)
    assert done.action == "promoted" and reg.aliases()["champion"] == v3.version


def test_a_won_ab_promotes_over_an_offline_regression_which_is_recorded(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    data = reg.layout.root
    cfg = ExperimentConfig(
        name="better-online",
        rollout_steps=[0.5, 1.0],
        min_requests_per_step=10,
        guardrails={"min_requests": 10},
    )
    assert cfg.offline_gate == "report"
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.120}))
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.050}))  # worse offline
    reg.promote(v1.version, smoke_test=smoke_ok)
    with pytest.raises(PromotionRefusedError):  # outside an experiment the offline gate refuses it
        reg.promote(v2.version, smoke_test=smoke_ok)
    rollout.start(data, cfg, v2.version)
    won = "ctr significantly better: lift +42.7% [+22.2%, +63.1%]"
    done = rollout.advance(data, cfg, analysis=_Judged("ship", 900, [won]), smoke_test=smoke_ok)
    assert done.action == "promoted" and reg.aliases()["champion"] == v2.version
    promoted = next(e for e in reg.history(limit=None) if e.event == "promoted" and e.version == v2.version)
    assert won in promoted.detail["online"] and "better-online" in promoted.detail["online"]
    assert "ndcg@10 0.0500 < champion 0.1200" in promoted.detail["no_regression"]  # reported, not refused
    assert "decided online (experiment 'better-online'" in promoted.detail["message"]
    assert "offline, reported only: ndcg@10 0.0500" in promoted.detail["message"]
    # the bundle gate still refuses whatever the experiment says
    v3 = reg.register(make_bundle(tmp_path, "b3", seed=3, metrics={"ndcg@10": 0.130}))
    rollout.start(data, cfg, v3.version)
    held = rollout.advance(data, cfg, analysis=_Judged("ship", 900, [won]), smoke_test=_smoke_fails)
    assert held.action == "held" and reg.aliases()["champion"] == v2.version


def test_the_offline_gate_still_decides_when_the_win_is_not_a_user_outcome_or_the_champion_moved(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    data = reg.layout.root
    steps: dict[str, Any] = {
        "rollout_steps": [0.5, 1.0],
        "min_requests_per_step": 10,
        "guardrails": {"min_requests": 10},
    }
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.120}))
    worse = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.050}))
    reg.promote(v1.version, smoke_test=smoke_ok)
    # a coverage win: a ranker that cannot rank wins it, so it does not stand in for the offline gate
    cov = ExperimentConfig(name="coverage-win", primary_metric="coverage", **steps)
    rollout.start(data, cov, worse.version)
    held = rollout.advance(data, cov, analysis=_Judged("ship", 900, ["coverage +80%"]), smoke_test=smoke_ok)
    assert held.action == "held" and "promotion refused" in held.reasons[0]
    assert reg.aliases()["champion"] == v1.version
    rollout.advance(data, cov, analysis=_Judged("rollback", 900, ["end"]))
    # the champion changed during the A/B (a retrain promoted v3): the A/B did not compare against it
    ctr = ExperimentConfig(name="champion-moved", **steps)
    rollout.start(data, ctr, worse.version)
    v3 = reg.register(make_bundle(tmp_path, "b3", seed=3, metrics={"ndcg@10": 0.200}))
    reg.promote(v3.version, smoke_test=smoke_ok)
    held = rollout.advance(data, ctr, analysis=_Judged("ship", 900, ["ctr +10%"]), smoke_test=smoke_ok)
    assert held.action == "held" and reg.aliases()["champion"] == v3.version


def _smoke_fails(path: Path) -> None:
    raise OSError("disk full")


# ------------------------------------------------------------------------------------ the CLI


def test_the_rollout_and_shadow_commands(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from streamrec.cli import app

    cli = CliRunner()
    data = str(reg.layout.root)
    preregister(data, ExperimentConfig(name="cli", shadow={"gates": {"min_requests": 2}}))
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.110}))
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.120}))
    reg.promote(v1.version, smoke_test=smoke_ok)
    r = cli.invoke(app, ["experiments", "rollout", "status", "--data-dir", data])
    assert r.exit_code == 0 and "no rollout in progress" in r.stdout
    r = cli.invoke(app, ["experiments", "rollout", "start", "--version", str(v2.version), "--data-dir", data])
    assert r.exit_code == 0 and "at 1% of users" in r.stdout, r.output
    r = cli.invoke(app, ["experiments", "rollout", "status", "--data-dir", data, "--json"])
    body = json.loads(r.stdout)
    assert body["rollout"]["share"] == 0.01 and body["aliases"]["challenger"] == v2.version
    r = cli.invoke(app, ["experiments", "rollout", "advance", "--data-dir", data])
    assert r.exit_code == 0 and "held" in r.stdout and "request log" in r.stdout  # no traffic yet: says so

    r = cli.invoke(app, ["experiments", "shadow-report", "--data-dir", data])
    assert r.exit_code == 2 and "set-alias shadow" in r.stderr
    log = RequestLog(data, RequestLogConfig(sample_rate=0.0), start=False)
    for i in range(3):
        scores = [float(x) for x in range(20)]
        log.record_shadow(
            {"request_id": f"r{i}", "ts": 1.7e9 + i, "user_id": i, "model_version": "v1", "shadow_version": "v2",
             "latency_ms": 12.0, "error": None, "common": 20, "correlation": 0.95,
             "production_scores": scores, "shadow_scores": scores}
        )  # fmt: skip
    log.flush()
    r = cli.invoke(app, ["experiments", "shadow-report", "--data-dir", data, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ready_for_canary"] is True
    preregister(data, ExperimentConfig(name="strict", shadow={"gates": {"min_requests": 10}}))
    r = cli.invoke(app, ["experiments", "shadow-report", "--data-dir", data, "--experiment", "strict"])
    assert r.exit_code == 1 and "blocked by requests: 3 < 10" in r.stdout
