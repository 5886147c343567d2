"""The serving service's degradation machinery in-process: dependencies, the stage runner, the policy.

Blocking dependencies are real threads blocked on real events (a "hung" store is a read that
waits until released); only the stages are small stand-ins built on the real PopularityStages.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.api_models import RecommendRequest
from streamrec.errors import OnlineStoreUnavailableError
from streamrec.funnel.fallback import BatchTopN, ResponseCache
from streamrec.funnel.popularity import PopularityStages
from streamrec.funnel.stages import Candidates, UserContext, missed_sources
from streamrec.resilience import CircuitBreakerConfig, CircuitOpenError, ResilienceConfig
from streamrec.service.args import FaultInjection
from streamrec.service.guard import Dependency, DependencyTimeoutError
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary
from tests.unit.test_gateway import ITEMS, make_world

BREAKER = CircuitBreakerConfig(failure_threshold=2, reset_timeout_s=60.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("svc") / "data")


class Blocking:
    """PopularityStages run as a trained model's would (``blocking``), with switchable faults."""

    blocking = True

    def __init__(self, world: Path) -> None:
        self._inner = PopularityStages.from_data_dir(world)
        self.source_names = self._inner.source_names
        self.model_version = self._inner.model_version
        self.release = threading.Event()
        self.store = "ok"  # ok | hang | down
        self.ranker = "ok"  # ok | hang | raise
        self.reads = 0

    def read_features(self, user_id: int) -> dict[str, Any]:
        self.reads += 1
        if self.store == "hang":
            self.release.wait(10)
        if self.store == "down":
            raise OnlineStoreUnavailableError("online store (sqlite) unavailable during read: locked")
        return {"marker": user_id}

    def user_context(self, request: Any, features: dict[str, Any] | None = None) -> UserContext:
        ctx = self._inner.user_context(request)
        ctx.state = features
        return ctx

    def rank_batch(self, ctxs: list[UserContext], cands: list[Candidates]) -> list[Candidates]:
        if self.ranker == "hang":
            self.release.wait(10)
        if self.ranker == "raise":
            raise RuntimeError("ranker exploded")
        return [self._inner.rank(c, m) for c, m in zip(ctxs, cands, strict=True)]

    def simple_rank(self, ctx: UserContext, cands: Candidates) -> Candidates:
        out = self._inner.rank(ctx, cands)
        out.degraded.append("simple_ranking")
        return out

    def rerank(self, ctx: UserContext, ranked: Candidates) -> Any:
        out = self._inner.rerank(ctx, ranked)  # says "popularity": report what applied, as a model does
        levels = ("full", "stale_features", "simple_ranking")
        out.metadata.degradation_level = max(["full", *ctx.degraded, *ranked.degraded], key=levels.index)
        out.metadata.degradation_reason = "; ".join([*ctx.reasons, *ranked.reasons]) or None
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _res(**kw: Any) -> ResilienceConfig:
    return ResilienceConfig(online_store_ms=30, ranker_ms=30, breaker=BREAKER, **kw)


# ------------------------------------------------------------------------------------ Dependency


def test_a_hung_call_costs_its_budget_then_the_breaker_refuses_without_calling() -> None:
    release = threading.Event()
    calls: list[int] = []

    def hung(i: int) -> int:
        calls.append(i)
        release.wait(10)
        return i

    dep = Dependency("store", 0.03, BREAKER, workers=1)

    async def go() -> list[BaseException | int]:
        out: list[BaseException | int] = []
        for i in range(4):
            t0 = time.perf_counter()
            try:
                out.append(await dep.call(hung, i))
            except Exception as err:
                out.append(err)
            assert time.perf_counter() - t0 < 0.5  # never the 10 s of the hung call
        return out

    try:
        out = asyncio.run(go())
    finally:
        release.set()
    assert [type(e) for e in out] == [DependencyTimeoutError, DependencyTimeoutError, CircuitOpenError, CircuitOpenError]
    assert calls == [0]  # one worker, stuck: the second call queued, timed out and never started
    snap = dep.snapshot()
    assert snap["state"] == "open" and snap["timeouts"] == 2 and snap["refused"] == 2
    dep.close()


def test_the_event_loop_keeps_serving_while_a_dependency_hangs() -> None:
    release = threading.Event()
    dep = Dependency("store", 5.0, BREAKER, workers=1)

    async def go() -> int:
        slow = asyncio.create_task(dep.call(release.wait, 10))
        ticks = 0
        for _ in range(10):  # the loop is free: other coroutines (other requests, /healthz) run
            await asyncio.sleep(0.005)
            ticks += 1
        release.set()
        await slow
        return ticks

    assert asyncio.run(go()) == 10
    dep.close()


# ----------------------------------------------------------------------------------- StageRunner


def test_online_store_down_serves_last_known_features_then_defaults(world: Path) -> None:
    stages = Blocking(world)
    runner = StageRunner(_res(), 1.0)
    req = RecommendRequest(user_id=3, k=5)
    ok = asyncio.run(runner.user_context(stages, req))
    assert ok.state == {"marker": 3} and ok.degraded == []
    stages.store = "down"
    stale = asyncio.run(runner.user_context(stages, req))
    assert stale.degraded == ["stale_features"] and stale.state == {"marker": 3}
    assert stale.reasons[0] == "online_store: error (OnlineStoreUnavailableError); served the user's last known features"
    other = asyncio.run(runner.user_context(stages, RecommendRequest(user_id=4, k=5)))
    assert other.state == {} and "default features" in other.reasons[0]
    stages.snapshot_features = lambda u: {"marker": -u} if u == 5 else None  # type: ignore[attr-defined]
    snap = asyncio.run(runner.user_context(stages, RecommendRequest(user_id=5, k=5)))
    assert snap.state == {"marker": -5} and "batch feature snapshot" in snap.reasons[0]
    assert runner.snapshot()["online_store"]["state"] == "open"  # two failures: threshold 2


def test_a_hung_online_store_is_cut_at_its_budget(world: Path) -> None:
    stages = Blocking(world)
    stages.store = "hang"
    runner = StageRunner(_res(), 1.0)
    try:
        t0 = time.perf_counter()
        ctx = asyncio.run(runner.user_context(stages, RecommendRequest(user_id=3, k=5)))
        assert time.perf_counter() - t0 < 1.0
    finally:
        stages.release.set()
    assert ctx.degraded == ["stale_features"]
    assert ctx.reasons[0] == "online_store: timeout; served default features (the user is in no snapshot)"


def test_a_hung_source_opens_its_breaker_and_the_others_still_serve(world: Path) -> None:
    from streamrec.funnel.stages import run_funnel

    class TwoSources(Blocking):
        def retrieve(self, source: str, ctx: UserContext) -> Candidates:
            if source == "hung":
                self.release.wait(10)
            return self._inner.retrieve("popularity", ctx)

    stages = TwoSources(world)
    stages.source_names = ("hung", "popularity")
    runner = StageRunner(_res(), 0.05)
    req = RecommendRequest(user_id=3, k=5)
    try:
        outs = [asyncio.run(run_funnel(runner.call_for(stages), req, stages.source_names, 0.05)) for _ in range(4)]
    finally:
        stages.release.set()
    for _, parts, _, _, out, _ in outs:
        assert list(parts) == ["popularity"] and len(out.items) == 5
    # the first two miss their deadline, then the open breaker refuses the call
    assert [missed_sources(o[-1]) for o in outs] == [{"hung": "timeout"}] * 2 + [{"hung": "circuit_open"}] * 2
    snap = runner.snapshot()["source:hung"]
    assert snap["state"] == "open" and snap["timeouts"] == 2 and snap["refused"] == 2  # threshold 2
    assert runner.snapshot()["source:popularity"]["state"] == "closed"


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_or_hung_ranker_gives_simple_ranking(world: Path, fault: str) -> None:
    stages = Blocking(world)
    stages.ranker = fault
    runner = StageRunner(_res(), 1.0)
    req = RecommendRequest(user_id=3, k=5)
    try:
        ctx = asyncio.run(runner.user_context(stages, req))
        merged = stages.merge(ctx, {"popularity": stages.retrieve("popularity", ctx)})
        ranked = asyncio.run(runner.rank(stages, ctx, merged))
    finally:
        stages.release.set()
    assert "simple_ranking" in ranked.degraded and ranked.reasons[0].startswith("ranker: ")
    assert len(ranked) > 0


def test_fault_injection_switch_makes_the_ranker_fail(world: Path) -> None:
    stages = Blocking(world)
    runner = StageRunner(_res(), 1.0, faults=FaultInjection(ranker_error=True))
    req = RecommendRequest(user_id=3, k=5)
    ctx = asyncio.run(runner.user_context(stages, req))
    merged = stages.merge(ctx, {"popularity": stages.retrieve("popularity", ctx)})
    ranked = asyncio.run(runner.rank(stages, ctx, merged))
    assert ranked.reasons[0] == "ranker: error (InjectedFaultError); ordered by merged retrieval score"
    assert runner.snapshot()["faults"]["ranker_error"]
    assert FaultInjection().active is False


def test_fault_injection_switch_makes_one_source_miss_its_deadline(world: Path) -> None:
    stages = Blocking(world)
    runner = StageRunner(_res(), 0.05, faults=FaultInjection(source_delay_ms={"popularity": 400}))
    try:
        ctx = asyncio.run(runner.user_context(stages, RecommendRequest(user_id=3, k=5)))
        with pytest.raises(DependencyTimeoutError):  # cut at the 50 ms deadline, not after 400 ms
            asyncio.run(runner.retrieve(stages, "popularity", ctx))
        assert runner.snapshot()["faults"]["source_delay_ms"] == {"popularity": 400}
        assert FaultInjection(source_delay_ms={"popularity": 0}).active is False
    finally:
        runner.close()


# -------------------------------------------------------------------------------- FunnelService


def _service(world: Path, stages: Any, *, batch: BatchTopN | None = None, fallback: bool = True) -> FunnelService:
    res = _res()
    pop = PopularityStages.from_data_dir(world) if fallback else None
    return FunnelService(local_primary(lambda: stages, StageRunner(res, 1.0)), pop, res, 1.0, batch=lambda: batch)


def test_full_chain_names_the_level_and_why(world: Path) -> None:
    stages = Blocking(world)
    service = _service(world, stages)
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert resp.metadata.degradation_level == "full" and resp.metadata.degradation_reason is None
    stages.store = "down"
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert resp.metadata.degradation_level == "stale_features" and len(resp.items) == 5
    assert "online_store" in (resp.metadata.degradation_reason or "")
    stages.ranker = "raise"
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    assert resp.metadata.degradation_level == "simple_ranking"
    assert "ranker" in (resp.metadata.degradation_reason or "")


def test_funnel_failure_serves_the_batch_list_then_popularity_then_cached(world: Path) -> None:
    stages = Blocking(world)
    batch = BatchTopN("v9", {3: (np.asarray(ITEMS[10:25], np.int64), np.linspace(1, 0, 15, dtype=np.float32))})
    service = _service(world, stages, batch=batch)
    good = asyncio.run(service(RecommendRequest(user_id=5, k=5)))  # cached for user 5

    def broken(*_: Any) -> Any:
        raise RuntimeError("retrieval index corrupt")

    stages.user_context = broken  # type: ignore[method-assign]  # the funnel itself fails
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=5, exclude=[ITEMS[10]])))
    assert resp.metadata.degradation_level == "batch" and resp.metadata.model_version == "v9"
    assert [i.item_id for i in resp.items] == ITEMS[11:16]  # excluded id skipped
    assert "full: error (RuntimeError)" in (resp.metadata.degradation_reason or "")
    resp = asyncio.run(service(RecommendRequest(user_id=4, k=5)))  # no batch list for user 4
    assert resp.metadata.degradation_level == "popularity" and len(resp.items) == 5
    # A level with nothing for the user is a miss, not an error of that level.
    assert "batch: nothing for this user" in (resp.metadata.degradation_reason or "")
    # Without popularity, the user's last good answer is the last resort.
    service._fallback = None
    resp = asyncio.run(service._run_cached(RecommendRequest(user_id=5, k=5)))
    assert resp.metadata.degradation_level == "cached"
    assert [i.item_id for i in resp.items] == [i.item_id for i in good.items]


def test_a_hung_context_build_costs_one_budget_then_answers_come_from_batch_at_once(world: Path) -> None:
    stages = Blocking(world)
    batch = BatchTopN("v9", {3: (np.asarray(ITEMS[10:25], np.int64), np.linspace(1, 0, 15, dtype=np.float32))})
    res = _res(context_ms=30, level_timeouts_ms={"full": 500})
    runner = StageRunner(res, 1.0)
    pop = PopularityStages.from_data_dir(world)  # with a fallback the funnel has its breaker
    service = FunnelService(local_primary(lambda: stages, runner), pop, res, 1.0, batch=lambda: batch)
    inner = stages.user_context
    mode = {"fault": "hang"}

    def faulty(request: Any, features: Any = None) -> Any:
        if mode["fault"] == "hang":
            stages.release.wait(10)  # the user tower stuck (a wedged thread, a deadlock)
        if mode["fault"] == "raise":
            raise RuntimeError("user tower weights missing")
        return inner(request, features)

    stages.user_context = faulty  # type: ignore[method-assign]
    took, reasons = [], []
    try:
        for _ in range(6):
            t0 = time.perf_counter()
            resp = asyncio.run(service(RecommendRequest(user_id=3, k=5)))
            took.append(time.perf_counter() - t0)
            assert resp.metadata.degradation_level == "batch" and len(resp.items) == 5
            reasons.append(resp.metadata.degradation_reason or "")
    finally:
        stages.release.set()
    # the first waits the context budget (30 ms), never the level's 500 ms or the hang; while the
    # hung call holds the thread the next ones are refused at once
    assert max(took) < 0.4 and all(t < 0.1 for t in took[1:]), took
    assert reasons == ["full: timeout"] * 6
    snap = runner.snapshot()["context"]
    assert snap["state"] == "closed" and snap["timeouts"] == 6  # a CPU stall never opens it ...
    assert service.breaker.snapshot()["state"] == "closed"  # ... nor the funnel's (threshold 2)
    # errors do open it (threshold 2): then refused without calling
    time.sleep(0.05)  # the released call returns
    mode["fault"] = "raise"
    for _ in range(3):
        asyncio.run(service(RecommendRequest(user_id=3, k=5)))
    snap = runner.snapshot()["context"]
    assert snap["state"] == "open" and snap["errors"] == 2  # the third: the funnel breaker, open too
    assert service.breaker.snapshot()["state"] == "open"
    runner.close()


def test_a_short_answer_is_filled_to_k_from_later_levels(world: Path) -> None:
    stages = Blocking(world)
    batch = BatchTopN("v1", {3: (np.asarray(ITEMS[30:33], np.int64), np.ones(3, np.float32))})
    service = _service(world, stages, batch=batch)

    full_rerank = stages.rerank

    def one_item(ctx: UserContext, ranked: Candidates) -> Any:
        out = full_rerank(ctx, ranked)
        out.items = out.items[:1]
        return out

    stages.rerank = one_item  # type: ignore[method-assign]
    resp = asyncio.run(service(RecommendRequest(user_id=3, k=8)))
    assert len(resp.items) == 8 and len({i.item_id for i in resp.items}) == 8
    assert resp.metadata.degradation_level == "full"
    reason = resp.metadata.degradation_reason or ""
    assert "3 item(s) backfilled from batch" in reason and "backfilled from popularity" in reason
    assert [i.sources for i in resp.items[1:4]] == [["batch"]] * 3


def test_no_candidates_anywhere_is_an_empty_answer_not_an_error(world: Path) -> None:
    stages = Blocking(world)
    service = _service(world, stages, fallback=False)
    resp = asyncio.run(service(RecommendRequest(user_id=9, k=5)))  # user 9 has seen everything
    assert resp.items == [] and resp.metadata.degradation_level == "full"


def test_response_cache_is_bounded() -> None:
    cache = ResponseCache(2)
    for u in (1, 2, 3):
        cache.put(u, [{"item_id": u, "score": 1.0, "sources": ["two_tower"]}])
    assert len(cache) == 2 and cache.items(1, 5) == []
    assert cache.items(3, 5) == [{"item_id": 3, "score": 1.0, "sources": ["cached"]}]
    assert ResponseCache(0).items(3, 5) == []


def test_a_fault_switch_naming_no_retrieval_source_is_refused() -> None:
    from pydantic import ValidationError

    from streamrec.service.args import FaultInjection

    assert FaultInjection(source_delay_ms={"trending": 400, "covisit": 10}).active
    with pytest.raises(ValidationError, match="names no retrieval source: trendng"):
        FaultInjection(source_delay_ms={"trendng": 400})  # a typo would inject nothing
