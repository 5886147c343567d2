"""The library side of the serving wrappers, with fake targets and handles (no Ray).

* :class:`~streamrec.service.reload.ReloadCoordinator`: the two-phase reload broadcast (commit on
  all when every replica prepared, abort on all when one did not, outcomes recorded, one reload
  at a time).
* :class:`~streamrec.service.status.GatewayStatus`: readiness warnings and status assembly.
* :func:`~streamrec.service.replica.merge_rank_batch`: the ranker's batch error handling.
* :class:`~streamrec.service.dispatch.ClusterStages`: source names cached until a reload, every
  replica's facts.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from streamrec.errors import CorruptCheckpointError, ServingError
from streamrec.funnel.stages import Candidates
from streamrec.service.dispatch import ClusterStages
from streamrec.service.reload import Broadcast, ReloadCoordinator, ReloadHistory
from streamrec.service.replica import merge_rank_batch, unwrap
from streamrec.service.status import GatewayStatus, stage_facts


class FakeTarget:
    """One deployment of ``replicas`` replicas; ``fail`` raises from its prepare."""

    def __init__(self, name: str, replicas: int = 1, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.name, self.replicas, self.fail, self.delay = name, replicas, fail, delay
        self.calls: list[tuple[str, str, Any]] = []
        self.active = 0
        self.max_active = 0

    async def prepare(self, token: str, version: int | None) -> list[Any]:
        self.calls.append(("prepare", token, version))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
        finally:
            self.active -= 1
        return [{"target": self.name, "replica": i, "model_version": version} for i in range(self.replicas)]

    async def commit(self, token: str) -> list[Any]:
        self.calls.append(("commit", token, None))
        return [{"target": self.name}] * self.replicas

    async def abort(self, token: str) -> None:
        self.calls.append(("abort", token, None))

    def phases(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeMetrics:
    def __init__(self) -> None:
        self.reloads: list[str] = []

    def reload(self, outcome: str) -> None:
        self.reloads.append(outcome)


def coordinator(targets: list[FakeTarget], **kw: Any) -> ReloadCoordinator:
    tokens = iter(f"token{i}" for i in range(100))
    return ReloadCoordinator(lambda: targets, new_token=lambda: next(tokens), **kw)


def test_every_target_commits_when_every_replica_prepared() -> None:
    gw, features = FakeTarget("gateway", 2), FakeTarget("features", 3)
    metrics = FakeMetrics()
    c = coordinator([gw, features], metrics=metrics)  # type: ignore[arg-type]
    result = asyncio.run(c.reload(7))
    assert gw.phases() == features.phases() == ["prepare", "commit"]
    assert {t for _, t, _ in gw.calls + features.calls} == {"token0"}  # one token for all
    assert features.calls[0] == ("prepare", "token0", 7)
    assert result["token"] == "token0" and result["replicas"] == 5 and result["seconds"] >= 0
    assert result["stages"] == {"target": "gateway", "replica": 0, "model_version": 7}
    assert metrics.reloads == ["committed"]
    assert [o["outcome"] for o in c.history.outcomes] == ["committed"]


def test_the_answer_describes_the_stage_deployment_in_the_cluster() -> None:
    gw, features = FakeTarget("gateway"), FakeTarget("features")
    assert asyncio.run(coordinator([gw, features], summary_from=1).reload(3))["stages"]["target"] == "features"
    # (a stage deployment answering no replica: the gateway's)
    empty = FakeTarget("features", replicas=0)
    assert asyncio.run(coordinator([gw, empty], summary_from=1).reload(3))["stages"]["target"] == "gateway"


def test_one_failed_prepare_aborts_every_target_and_nothing_commits() -> None:
    ok, bad, ok2 = FakeTarget("gateway"), FakeTarget("ranker", fail=ServingError("busy")), FakeTarget("reranker")
    c = coordinator([ok, bad, ok2])
    with pytest.raises(ServingError, match="busy"):
        asyncio.run(c.reload(4))
    for t in (ok, bad, ok2):
        assert t.phases() == ["prepare", "abort"]
    assert c.history.outcomes[-1]["outcome"] == "failed"
    assert c.history.refused_now is None


def test_a_bundle_that_will_not_load_is_recorded_as_refused() -> None:
    bad = FakeTarget("gateway", fail=CorruptCheckpointError("checksum mismatch"))
    metrics, noted = FakeMetrics(), []

    async def note(version: int | None, outcome: str, detail: str) -> None:
        noted.append((version, outcome, detail))

    c = coordinator([bad], metrics=metrics, note=note)  # type: ignore[arg-type]
    with pytest.raises(CorruptCheckpointError):
        asyncio.run(c.reload(9))
    assert metrics.reloads == ["refused"]
    assert noted == [(9, "refused", "CorruptCheckpointError: checksum mismatch")]
    # note() reaches every gateway replica, each keeping its own history (here: nothing locally)
    assert c.history.outcomes == []


def test_refusal_lands_in_last_refused_when_the_broadcast_fails() -> None:
    async def note(version: int | None, outcome: str, detail: str) -> None:
        raise RuntimeError("gateway replica unreachable")

    history = ReloadHistory()
    c = coordinator([FakeTarget("gateway", fail=CorruptCheckpointError("bad"))], note=note, history=history)
    with pytest.raises(CorruptCheckpointError):
        asyncio.run(c.reload(2))
    snap = history.snapshot()
    assert snap["last_refused"]["version"] == 2 and snap["last_refused"]["detail"] == "CorruptCheckpointError: bad"
    assert history.refused_now is not None


def test_the_version_is_resolved_once_per_reload() -> None:
    seen: list[int] = []

    async def champion() -> int:
        seen.append(1)
        return 5

    gw = FakeTarget("gateway")
    c = coordinator([gw], resolve_version=champion)
    assert asyncio.run(c.reload())["stages"]["model_version"] == 5
    assert asyncio.run(c.reload(8))["stages"]["model_version"] == 8  # an explicit version wins
    assert len(seen) == 1
    assert asyncio.run(coordinator([FakeTarget("g")]).reload())["stages"]["model_version"] is None


def test_concurrent_reloads_are_serialised() -> None:
    gw = FakeTarget("gateway", delay=0.02)
    c = coordinator([gw])

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(c.reload(1), c.reload(2)))

    results = asyncio.run(both())
    assert gw.max_active == 1  # the second prepared only after the first committed
    assert gw.phases() == ["prepare", "commit", "prepare", "commit"]
    assert [r["token"] for r in results] == ["token0", "token1"]


def test_a_cancelled_reload_aborts_what_was_prepared() -> None:
    slow, fast = FakeTarget("gateway", delay=10.0), FakeTarget("features")
    c = coordinator([slow, fast])

    async def cancel() -> None:
        task = asyncio.create_task(c.reload(3))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    assert fast.phases() == ["prepare", "abort"] and "commit" not in slow.phases()
    assert c.history.outcomes == []  # a cancelled reload is not an outcome


class FakeBroadcastHandle:
    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def broadcast(self, method: str, *args: Any) -> Any:
        self.sent.append((method, args))
        answers = self.answers.get(method, [])

        async def results() -> list[Any]:
            return answers

        return SimpleNamespace(results_async=results)


def test_broadcast_sends_each_phase_to_every_replica() -> None:
    h = FakeBroadcastHandle({"prepare_reload": [{"a": 1}, {"a": 2}], "commit_reload": [{}, {}]})
    result = asyncio.run(ReloadCoordinator(lambda: [Broadcast(h)], new_token=lambda: "t").reload(4))
    assert h.sent == [("prepare_reload", ("t", 4)), ("commit_reload", ("t",))]
    assert result["replicas"] == 2 and result["stages"] == {"a": 1}


# ---------------------------------------------------------------------------- ranker batch
class FakeStages:
    def merge(self, ctx: Any, parts: Any) -> Candidates:
        if parts == "bad":
            raise ValueError("bad parts")
        return Candidates(items=np.array([ctx]), scores=np.array([1.0], dtype=np.float32), sources=[["merged"]])


class FakeRunner:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[list[Any]] = []

    async def rank_batch(self, stages: Any, ctxs: list[Any], cands: list[Candidates]) -> list[Any]:
        self.batches.append(list(ctxs))
        if self.fail:
            raise RuntimeError("version mismatch")
        return [("ranked", c) for c in ctxs]


def test_a_bad_merge_fails_only_its_request() -> None:
    runner = FakeRunner()
    out = asyncio.run(merge_rank_batch(runner, FakeStages(), [1, 2, 3], ["ok", "bad", "ok"]))  # type: ignore[arg-type]
    assert out[0] == ("ranked", 1) and out[2] == ("ranked", 3)
    assert isinstance(out[1], ValueError)
    assert runner.batches == [[1, 3]]  # one ranking pass for the merged ones
    with pytest.raises(ValueError, match="bad parts"):
        unwrap(out[1])
    assert unwrap(out[0]) == ("ranked", 1)


def test_a_batch_ranking_error_fails_every_merged_request() -> None:
    out = asyncio.run(merge_rank_batch(FakeRunner(fail=True), FakeStages(), [1, 2], ["ok", "bad"]))  # type: ignore[arg-type]
    assert isinstance(out[0], RuntimeError) and isinstance(out[1], ValueError)
    runner = FakeRunner()
    out = asyncio.run(merge_rank_batch(runner, FakeStages(), [1], ["bad"]))  # type: ignore[arg-type]
    assert isinstance(out[0], ValueError) and runner.batches == []  # nothing merged: no ranking pass


# ---------------------------------------------------------------------------- cluster dispatch
class FakeMethod:
    def __init__(self, answer: Any) -> None:
        self.answer, self.calls = answer, 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1

        async def answer() -> Any:
            return self.answer

        return answer()


def test_cluster_source_names_are_read_once_until_a_reload() -> None:
    features = SimpleNamespace(source_names=FakeMethod(["two_tower", "popularity"]))
    cluster = ClusterStages(features, object(), object(), object())

    async def run() -> None:
        assert await cluster.source_names() == ("two_tower", "popularity")
        await cluster.source_names()
        assert features.source_names.calls == 1
        cluster.forget_source_names()
        await cluster.source_names()
        assert features.source_names.calls == 2

    asyncio.run(run())
    assert [type(t) for t in cluster.reload_targets()] == [Broadcast] * 4


def test_stage_facts_show_replicas_out_of_step() -> None:
    handles = [
        FakeBroadcastHandle({"describe": [{"model_version": "v1", "breakers": {"a": 1}}, {"model_version": "v2"}]}),
        *(FakeBroadcastHandle({"describe": [{"model_version": "v1"}]}) for _ in range(3)),
    ]
    every = asyncio.run(ClusterStages(*handles).describe_all())
    facts = stage_facts(every)
    assert list(facts) == ["stages", "stage_versions", "stage_breakers"]
    assert facts["stage_versions"] == {
        "features": ["v1", "v2"], "retriever": ["v1"], "ranker": ["v1"], "reranker": ["v1"]
    }  # fmt: skip
    assert facts["stages"]["features"] == {"model_version": "v1", "breakers": {"a": 1}}
    assert facts["stage_breakers"]["features"] == [{"a": 1}, {}]


# ---------------------------------------------------------------------------- status
class Snap:
    def __init__(self, state: str) -> None:
        self.state = state

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state}


def gateway_status(
    *, primary: Any, local: Any = None, events: Any = None, variants: Any = None, history: ReloadHistory | None = None
) -> GatewayStatus:
    stages = SimpleNamespace(primary=primary, local=local, events=events, cluster=None, fallback=None)
    service = SimpleNamespace(breaker=Snap("closed"), snapshot=lambda: {"served": 1})
    runner = SimpleNamespace(snapshot=lambda: {"two_tower": {"state": "open"}, "faults": {"x": 1}})
    return GatewayStatus(
        "fused",
        stages=stages,  # type: ignore[arg-type]
        service=service,  # type: ignore[arg-type]
        runner=runner,  # type: ignore[arg-type]
        history=history or ReloadHistory(),
        health=SimpleNamespace(warnings=["model is stale"]),  # type: ignore[arg-type]
        catalogue=SimpleNamespace(snapshot=lambda: {"lines": 0}),  # type: ignore[arg-type]
        variants=variants,
    )


async def _sources() -> tuple[Any, tuple[str, ...]]:
    return None, ("two_tower", "popularity")


def test_ready_lists_every_reason_for_degradation_and_stays_ready() -> None:
    history = ReloadHistory()
    history.record(4, "refused", "CorruptCheckpointError: bad")
    events = SimpleNamespace(sink=object(), sink_breaker=Snap("half_open"))
    variants = SimpleNamespace(refused={"challenger v3": "ModelError: x"})
    local = SimpleNamespace(describe=lambda: {"model_version": "v2"})
    ok, body = asyncio.run(
        gateway_status(primary=_sources, local=local, events=events, variants=variants, history=history).ready()
    )
    assert ok
    assert body["composition"] == "fused" and body["source_names"] == ["two_tower", "popularity"]
    assert body["breakers"] == {"funnel": "closed", "two_tower": "open", "event_sink": "half_open"}
    assert body["warnings"] == [
        "circuit 'two_tower' is open",
        "circuit 'event_sink' is half_open",
        "reload to v4 was refused: CorruptCheckpointError: bad",
        "model is stale",
        "challenger v3 is not served: ModelError: x",
    ]


def test_not_ready_when_the_stages_cannot_be_reached() -> None:
    async def unreachable() -> Any:
        raise ConnectionError("features down")

    ok, body = asyncio.run(gateway_status(primary=unreachable).ready())
    assert not ok and body == {"reason": "stages not reachable: ConnectionError: features down"}


def test_info_keeps_the_status_keys() -> None:
    local = SimpleNamespace(describe=lambda: {"model_version": "v2"})
    info = asyncio.run(gateway_status(primary=_sources, local=local).info())
    assert list(info) == [
        "composition", "funnel", "breakers", "reloads", "health_alerts", "request_log", "catalogue", "stages",
        "fallback", "experiment",
    ]  # fmt: skip
    assert info["stages"] == {"model_version": "v2"} and info["reloads"]["last_refused"] is None
    assert "faults" not in info["breakers"]
