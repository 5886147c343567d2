"""The stage runner's grouped dispatch (ADR-016): fewer worker-thread hops, the same guards.

Several dependency calls share one worker call (the online read and the context built from it;
the in-memory retrieval sources), each still under its own budget and breaker. These tests hang
real threads on real events, as tests/unit/test_service.py does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from streamrec.api_models import RecommendRequest
from streamrec.funnel.stages import Candidates, UserContext, missed_sources, run_funnel
from streamrec.resilience import CircuitBreakerConfig, DeadlineExceededError
from streamrec.service import guard
from streamrec.service.guard import (
    Dependency,
    DependencySaturatedError,
    DependencySkippedError,
    DependencyTimeoutError,
    Step,
    _Waker,
    call_batch,
)
from streamrec.service.runner import StageRunner
from tests.unit.test_service import Blocking, _res
from tests.unit.test_service import world as world  # noqa: F401  (the module-scoped fixture)

BREAKER = CircuitBreakerConfig(failure_threshold=2, reset_timeout_s=60.0)


class Sources(Blocking):
    """Blocking stages with named sources (each answers popularity's candidates); ``hung`` hangs.

    Records which thread ran each call.
    """

    def __init__(self, world: Path, names: tuple[str, ...], solo: tuple[str, ...] = ()) -> None:
        super().__init__(world)
        self.source_names = names
        self.solo_sources = solo
        self.threads: dict[str, int] = {}
        self.a_started = threading.Event()
        self.overlapped = False

    def read_features(self, user_id: int) -> dict[str, Any]:
        self.threads["read"] = threading.get_ident()
        return super().read_features(user_id)

    def user_context(self, request: Any, features: dict[str, Any] | None = None) -> UserContext:
        self.threads["context"] = threading.get_ident()
        if getattr(self, "context_fault", "") == "hang":
            self.release.wait(10)
        return super().user_context(request, features)

    def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        self.threads[source] = threading.get_ident()
        if source == "hung":
            self.release.wait(10)
        if source == "a":
            self.a_started.set()
        if source == "tt":  # overlaps "a" only when it runs in a worker call of its own
            self.overlapped = self.a_started.wait(2)
        return self._inner.retrieve("popularity", ctx)

    def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        return self._inner.merge(ctx, {"popularity": next(iter(parts.values()))} if parts else {})


def test_grouped_dispatch_reads_and_builds_the_context_in_one_worker_call(world: Path) -> None:
    stages = Sources(world, ("a", "b", "tt"), solo=("tt",))
    runner = StageRunner(_res(), 1.0)
    req = RecommendRequest(user_id=3, k=5)
    try:
        _, parts, _, _, out, timings = asyncio.run(
            run_funnel(runner.call_for(stages), req, stages.source_names, 1.0)
        )
    finally:
        runner.close()
    assert sorted(parts) == ["a", "b", "tt"] and len(out.items) == 5 and not missed_sources(timings)
    t = stages.threads
    assert t["read"] == t["context"]  # one hop for both
    assert t["a"] == t["b"]  # in-memory sources together
    assert t["tt"] != t["a"] and stages.overlapped  # the solo one apart, in another thread
    snap = runner.snapshot()
    for dep in ("online_store", "context", "source:a", "source:b", "source:tt"):
        assert snap[dep]["ok"] == 1 and snap[dep]["calls"] == 1, dep


def test_hops_and_grouped_dispatch_give_the_same_answer(world: Path) -> None:
    req = RecommendRequest(user_id=3, k=5)
    outs = []
    for dispatch in ("hops", "grouped"):
        stages = Sources(world, ("a", "b"))
        runner = StageRunner(_res(), 1.0, dispatch=dispatch)
        try:
            *_, out, _ = asyncio.run(run_funnel(runner.call_for(stages), req, stages.source_names, 1.0))
        finally:
            runner.close()
        outs.append([(i.item_id, i.score) for i in out.items])
        assert (stages.threads["read"] == stages.threads["context"]) == (dispatch == "grouped")
    assert outs[0] == outs[1]


def test_a_hung_source_in_a_batched_call_costs_only_its_budget_and_the_others_answer(world: Path) -> None:
    stages = Sources(world, ("hung", "a", "b"))  # "a" and "b" wait behind "hung" in its worker call
    runner = StageRunner(_res(), 0.2)
    req = RecommendRequest(user_id=3, k=5)
    try:
        took, outs = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            outs.append(asyncio.run(run_funnel(runner.call_for(stages), req, stages.source_names, 0.2)))
            took.append(time.perf_counter() - t0)
        snap = runner.snapshot()["source:hung"]
    finally:
        stages.release.set()
        runner.close()
    for _, parts, _, _, out, _ in outs:
        assert sorted(parts) == ["a", "b"] and len(out.items) == 5  # moved to another thread in time
    # Never the 10 s hang; the hung call holds one of the two retrieval threads, so the next
    # requests refuse it at once and the other sources keep the second thread.
    assert all(t < 2.0 for t in took), took
    assert [missed_sources(o[-1]) for o in outs] == [{"hung": "timeout"}] * 2 + [{"hung": "circuit_open"}]
    assert snap["abandoned"] == 1 and snap["timeouts"] == 2 and snap["state"] == "open"  # threshold 2
    assert stages.threads["a"] != stages.threads["hung"]


def test_a_hung_read_in_the_grouped_call_is_cut_at_its_budget_then_the_context_builds(world: Path) -> None:
    stages = Sources(world, ("a",))
    stages.store = "hang"
    runner = StageRunner(_res(), 1.0)  # online budget 30 ms
    try:
        t0 = time.perf_counter()
        ctx = asyncio.run(runner.user_context(stages, RecommendRequest(user_id=3, k=5)))
        took = time.perf_counter() - t0
        snap = runner.snapshot()
    finally:
        stages.release.set()
        runner.close()
    assert took < 2.0 and ctx.degraded == ["stale_features"]  # never the 10 s hang
    assert ctx.reasons[0] == "online_store: timeout; served default features (the user is in no snapshot)"
    assert snap["online_store"]["timeouts"] == 1 and snap["online_store"]["abandoned"] == 1
    # the context step of the grouped call never ran (skipped, no verdict), then built on its own
    assert snap["context"]["skipped"] == 1 and snap["context"]["ok"] == 1
    assert snap["context"]["state"] == "closed"


def test_a_hung_context_in_the_grouped_call_costs_its_budget_then_is_refused_at_once(world: Path) -> None:
    stages = Sources(world, ("a",))
    stages.context_fault = "hang"  # type: ignore[attr-defined]
    runner = StageRunner(_res(context_ms=50), 1.0)
    req = RecommendRequest(user_id=3, k=5)

    async def twice() -> list[type[BaseException]]:
        out: list[type[BaseException]] = []
        for _ in range(2):
            with pytest.raises(DeadlineExceededError) as err:
                await runner.user_context(stages, req)
            out.append(type(err.value))
        return out

    try:
        t0 = time.perf_counter()
        first, second = asyncio.run(twice())
        took = time.perf_counter() - t0
        snap = runner.snapshot()["context"]
    finally:
        stages.release.set()
        runner.close()
    assert first is DependencyTimeoutError and took < 2.0  # never the 10 s hang
    assert second is DependencySaturatedError  # its thread is held: refused, never started
    assert snap["abandoned"] == 1 and snap["running"] == 1  # one hung build, one thread
    assert snap["state"] == "closed"  # stalls never open it


def test_a_batch_queued_behind_another_s_threads_is_skipped_and_never_runs() -> None:
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    ran: list[str] = []
    pool.submit(release.wait, 10)  # the only thread of the shared pool is busy with other work
    deps = [Dependency(n, 0.05, BREAKER, pool=pool) for n in ("x", "y")]
    steps = [Step(d, ran.append, (d.name,)) for d in deps]
    try:
        t0 = time.perf_counter()
        out = asyncio.run(call_batch(steps, pool, limit_s=0.05))
        took = time.perf_counter() - t0
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert took < 2.0 and all(type(e) is DependencySkippedError for e in out)
    assert ran == []  # cancelled while queued
    # not their fault: nothing charged on their breakers
    assert [(d.snapshot()["timeouts"], d.snapshot()["skipped"]) for d in deps] == [(0, 1), (0, 1)]


def test_a_chained_call_queued_behind_its_own_hung_calls_times_out_the_read_and_skips_the_build() -> None:
    online = Dependency("online", 0.05, BREAKER, workers=1)
    context = Dependency("context", 0.05, BREAKER, workers=1)
    release = threading.Event()
    ran: list[str] = []
    online.pool.submit(release.wait, 10)  # the online store's own thread is stuck
    steps = [Step(online, ran.append, ("read",)), Step(context, lambda x: ran.append("build"), chained=True)]
    try:
        out = asyncio.run(call_batch(steps, online.pool, stop_on_error=True))
    finally:
        release.set()
        online.close()
        context.close()
    assert type(out[0]) is DependencyTimeoutError and type(out[1]) is DependencySkippedError
    assert ran == []
    assert online.snapshot()["timeouts"] == 1
    c = context.snapshot()
    assert c["timeouts"] == 0 and c["skipped"] == 1 and c["state"] == "closed"  # never ran: skipped


def test_a_failing_step_stops_a_chained_batch_and_counts_only_on_its_own_breaker() -> None:
    pool = ThreadPoolExecutor(1)
    first = Dependency("first", 1.0, BREAKER, pool=pool)
    second = Dependency("second", 1.0, BREAKER, pool=pool)

    def boom() -> None:
        raise OSError("down")

    try:
        out = asyncio.run(
            call_batch([Step(first, boom), Step(second, lambda x: x, chained=True)], pool, stop_on_error=True)
        )
    finally:
        pool.shutdown(wait=True)
    assert isinstance(out[0], OSError) and isinstance(out[1], DependencySkippedError)
    assert first.snapshot()["errors"] == 1
    s = second.snapshot()
    assert s["errors"] == 0 and s["skipped"] == 1 and s["state"] == "closed"


@pytest.mark.parametrize("dispatch", ["grouped", "hops"])
def test_overlapping_requests_never_give_a_hung_source_every_retrieval_thread(
    world: Path, dispatch: str
) -> None:
    stages = Sources(world, ("hung", "a", "b"))
    runner = StageRunner(_res(), 0.2, dispatch=dispatch)  # type: ignore[arg-type]
    req = RecommendRequest(user_id=3, k=5)

    async def one(delay: float) -> Any:
        await asyncio.sleep(delay)
        return await run_funnel(runner.call_for(stages), req, stages.source_names, 0.2)

    async def go() -> list[Any]:
        # two requests overlap (the second while the first's hung call is inside its budget)
        first = await asyncio.gather(one(0.0), one(0.0), one(0.03))
        return [*first, *[await one(0.0) for _ in range(3)]]

    try:
        t0 = time.perf_counter()
        outs = asyncio.run(go())
        took = time.perf_counter() - t0
        snap = runner.snapshot()
    finally:
        stages.release.set()
        runner.close()
    assert took < 5.0  # never waits for the 10 s hang
    for _, parts, _, _, out, timings in outs:  # the healthy sources answer every request
        assert (
            sorted(parts) == ["a", "b"] and len(out.items) == 5 and set(missed_sources(timings)) == {"hung"}
        )
    for name in ("source:a", "source:b"):
        s = snap[name]
        assert s["state"] == "closed" and s["timeouts"] == 0 and s["ok"] == len(outs), (name, s)
    hung = snap["source:hung"]
    assert hung["running"] == 1 and hung["abandoned"] == 1  # one thread held, whatever overlapped
    assert hung["state"] == "open"


def test_overlapping_requests_never_give_a_hung_context_both_online_store_threads(world: Path) -> None:
    stages = Sources(world, ("a",))
    stages.context_fault = "hang"  # type: ignore[attr-defined]
    runner = StageRunner(_res(context_ms=50), 1.0)
    req = RecommendRequest(user_id=3, k=5)

    async def go() -> tuple[list[BaseException | UserContext], dict[str, Any]]:
        outs = await asyncio.gather(
            *(runner.user_context(stages, req) for _ in range(3)), return_exceptions=True
        )
        features = await runner.online.call(stages.read_features, 3)  # a thread is still free
        return outs, features

    try:
        outs, features = asyncio.run(go())
        snap = runner.snapshot()
    finally:
        stages.release.set()
        runner.close()
    assert all(isinstance(o, DeadlineExceededError) for o in outs) and isinstance(features, dict)
    assert snap["context"]["running"] == 1 and snap["context"]["abandoned"] == 1
    o = snap["online_store"]
    assert o["state"] == "closed" and o["timeouts"] == 0 and o["ok"] == 4


@pytest.mark.parametrize("dispatch", ["grouped", "hops"])
def test_a_source_cut_by_the_level_timeout_within_its_budget_is_left_behind_uncharged(
    world: Path, dispatch: str
) -> None:
    stages = Sources(world, ("hung", "a", "b"))
    runner = StageRunner(_res(), 0.5, dispatch=dispatch)  # type: ignore[arg-type]
    req = RecommendRequest(user_id=3, k=5)

    async def go() -> Any:
        with pytest.raises(TimeoutError):  # the funnel's level timeout, inside the source budget
            await asyncio.wait_for(run_funnel(runner.call_for(stages), req, stages.source_names, 0.5), 0.1)
        cut = runner.snapshot()["source:hung"]
        return cut, await run_funnel(runner.call_for(stages), req, stages.source_names, 0.5)

    try:
        cut, (_, parts, *_, timings) = asyncio.run(go())
        snap = runner.snapshot()
    finally:
        stages.release.set()
        runner.close()
    # Cut at 0.1 s of its 0.5 s budget: no timeout of its breaker, its thread counted as held.
    assert cut["timeouts"] == 0 and cut["abandoned"] == 1 and cut["skipped"] >= 1
    assert sorted(parts) == ["a", "b"] and missed_sources(timings) == {"hung": "timeout"}  # refused
    hung = snap["source:hung"]  # the refusal (its held call still within its budget): no verdict
    assert hung["state"] == "closed" and hung["timeouts"] == 0 and hung["abandoned"] == 1, hung
    assert snap["source:a"]["state"] == snap["source:b"]["state"] == "closed"


def test_a_call_cancelled_within_its_budget_is_left_behind_but_not_charged() -> None:
    release = threading.Event()
    dep = Dependency("store", 5.0, BREAKER, workers=1, max_abandoned=1)

    async def go() -> BaseException | None:
        with pytest.raises(TimeoutError):  # the caller's level timeout, long before the 5 s budget
            await asyncio.wait_for(dep.call(release.wait, 10), 0.05)
        try:  # refused at once (the cap holds the cut call), not charged either
            await dep.call(lambda: "never")
        except DeadlineExceededError as err:
            return err
        return None

    try:
        refused = asyncio.run(go())
        snap = dep.snapshot()
        ready = dep.ready()
    finally:
        release.set()
        dep.close()
    assert isinstance(refused, DependencySaturatedError)
    assert snap["timeouts"] == 0 and snap["errors"] == 0 and snap["skipped"] == 2, snap
    assert snap["abandoned"] == 1 and snap["state"] == "closed" and not ready  # the cap stays honest


def test_a_call_cancelled_past_its_budget_is_a_timeout() -> None:
    release = threading.Event()
    entered = threading.Event()
    dep = Dependency("store", 0.05, BREAKER, workers=1, max_abandoned=1)

    def hung() -> None:
        entered.set()
        release.wait(10)

    async def go() -> BaseException | None:
        task = asyncio.create_task(dep.call(hung))
        await asyncio.sleep(0)  # the call is submitted; the loop now waits on it
        assert entered.wait(5)
        time.sleep(0.2)  # the loop is held (a stall): the cancel comes after the 50 ms budget
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        try:  # refused at once, charged: the call holding the cap is past its budget
            await dep.call(lambda: "never")
        except DeadlineExceededError as err:
            return err
        return None

    try:
        refused = asyncio.run(go())
        snap = dep.snapshot()
    finally:
        release.set()
        dep.close()
    assert isinstance(refused, DependencySaturatedError)
    assert snap["timeouts"] == 2 and snap["abandoned"] == 1 and snap["state"] == "open", snap


def test_a_step_over_its_running_cap_waits_on_the_loop_then_runs() -> None:
    pool = ThreadPoolExecutor(2)
    dep = Dependency("x", 5.0, BREAKER, pool=pool, max_running=1)
    release = threading.Event()
    entered = threading.Event()

    def first() -> str:
        entered.set()
        release.wait(10)
        return "first"

    async def go() -> list[Any]:
        a = asyncio.create_task(call_batch([Step(dep, first)], pool))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 5)
        b = asyncio.create_task(call_batch([Step(dep, lambda: "second")], pool))
        await asyncio.sleep(0.05)
        assert not b.done()  # sent back to the loop: no second thread taken
        release.set()
        return [*(await a), *(await b)]

    try:
        out = asyncio.run(go())
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert out == ["first", "second"]
    assert dep.snapshot()["ok"] == 2 and dep.snapshot()["skipped"] == 0


def test_the_loop_s_waker_adds_one_callback_per_future_however_often_it_waits_on_it() -> None:
    class Counting(_Waker):
        pokes = 0

        def poke(self, _: Any = None) -> None:
            self.pokes += 1

    async def go() -> int:
        waker = Counting(asyncio.get_running_loop())
        fut: Future[None] = Future()
        for _ in range(5):  # one loop iteration each
            waker.watch(fut)
            await waker.wait(0.0)
        fut.set_result(None)
        return waker.pokes

    assert asyncio.run(go()) == 1


def test_a_step_sent_back_just_as_the_loop_scans_still_waits_for_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker sends the step back and returns between the loop's scan and its exit check."""
    scanned, ran = threading.Event(), threading.Event()
    first_scan, first_run = [True], [True]
    take_busy, run = guard._Batch.take_busy, guard._Batch.run

    def late_run(self: Any) -> None:
        if first_run[0]:
            first_run[0] = False
            scanned.wait(5)  # starts only once the loop has scanned
            run(self)
            ran.set()
            return
        run(self)

    def slow_scan(self: Any) -> list[list[Step]]:
        out = take_busy(self)
        if first_scan[0]:
            first_scan[0] = False
            scanned.set()
            ran.wait(5)  # the worker sent its step back and returned meanwhile
        return out

    monkeypatch.setattr(guard._Batch, "run", late_run)
    monkeypatch.setattr(guard._Batch, "take_busy", slow_scan)
    pool = ThreadPoolExecutor(2)
    dep = Dependency("x", 5.0, BREAKER, pool=pool, max_running=1)
    assert dep.start()  # another request's call holds the one slot

    async def go() -> list[Any]:
        task = asyncio.create_task(call_batch([Step(dep, lambda: "ran")], pool))
        await asyncio.get_running_loop().run_in_executor(None, ran.wait, 5)
        dep.stop()  # that call returns: the slot is free
        return await task

    try:
        out = asyncio.run(go())
    finally:
        pool.shutdown(wait=True)
    assert ran.is_set() and out == ["ran"]
    snap = dep.snapshot()
    assert snap["ok"] == 1 and snap["skipped"] == 0 and snap["running"] == 0


def test_a_step_that_waited_for_a_slot_keeps_the_budget_it_had_when_sent_back() -> None:
    release = threading.Event()
    pool = ThreadPoolExecutor(1)
    dep = Dependency("x", 9.5, BREAKER, pool=pool, max_running=1)
    # Sent back to the loop 9 s ago (its 9.5 s budget began then): half a second is left to it
    # once it starts, never a fresh 9.5 s.
    step = Step(dep, release.wait, (10,), origin=time.monotonic() - 9.0)

    async def go() -> list[Any]:
        return await call_batch([step], pool)

    try:
        t0 = time.perf_counter()
        out = asyncio.run(go())
        took = time.perf_counter() - t0
        snap = dep.snapshot()
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert took < 2.0  # never the fresh 9.5 s budget (nor the 10 s hang)
    assert isinstance(out[0], DependencyTimeoutError) and snap["abandoned"] == 1


def test_a_hung_ranker_the_level_timeout_cuts_first_still_opens_its_breaker(world: Path) -> None:  # noqa: F811
    # A slow pre-rank can start the ranker too late for its own deadline: every call is then cut
    # by the level timeout within its budget (uncharged). Its cap refuses the next calls at once
    # (simple ranking, no wait) and charges them once the cut call is past its budget.
    stages = Blocking(world)
    stages.ranker = "hang"
    runner = StageRunner(_res(), source_timeout_s=1.0)
    ctx = stages.user_context(RecommendRequest(user_id=1, k=5))
    merged = stages.merge(ctx, {s: stages.retrieve(s, ctx) for s in stages.source_names})

    async def go() -> list[str]:
        with pytest.raises(TimeoutError):  # the level timeout, inside the ranker's 30 ms budget
            await asyncio.wait_for(runner.rank(stages, ctx, merged), 0.01)
        await asyncio.sleep(0.1)  # the cut call is now past its budget
        out = []
        for _ in range(3):  # each again under a level timeout shorter than the ranker's budget
            ranked = await asyncio.wait_for(runner.rank(stages, ctx, merged), 0.02)
            out.append(ranked.reasons[-1])
        return out

    try:
        reasons = asyncio.run(go())
        snap = runner.snapshot()["ranker"]
    finally:
        stages.release.set()
        runner.close()
    assert all(r.startswith("ranker: ") for r in reasons), reasons  # simple ranking, at once
    assert snap["abandoned"] == 1 and snap["state"] == "open", snap
