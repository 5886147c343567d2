"""Deadline, CircuitBreaker and FallbackChain, with fault injection (no servers, no sleeps > 50 ms)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from streamrec.config import parse_config
from streamrec.errors import ConfigError, ServingError, StreamRecError
from streamrec.resilience import (
    LEVELS,
    AllLevelsFailedError,
    BreakerState,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    Deadline,
    DeadlineExceededError,
    FallbackChain,
    FallbackStep,
    ResilienceConfig,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Boom(RuntimeError):
    pass


def boom(*_: object, **__: object) -> str:
    raise Boom("dependency down")


# ---------------------------------------------------------------------------------- Deadline


def test_deadline_counts_down_and_caps_timeouts() -> None:
    clock = FakeClock()
    d = Deadline(0.2, clock)
    assert d.remaining() == pytest.approx(0.2)
    assert d.timeout(0.05) == pytest.approx(0.05)
    assert d.timeout(1.0) == pytest.approx(0.2)
    assert d.timeout() == pytest.approx(0.2)
    clock.advance(0.15)
    assert d.remaining_ms() == pytest.approx(50.0)
    assert d.elapsed() == pytest.approx(0.15)
    assert d.child(1.0).remaining() == pytest.approx(0.05)
    assert not d.expired
    d.check("ranking")
    clock.advance(0.1)
    assert d.expired and d.remaining() == 0.0 and d.timeout(0.05) == 0.0
    with pytest.raises(DeadlineExceededError, match=r"ranking: deadline exceeded by 50\.0 ms"):
        d.check("ranking")


def test_deadline_after_ms_and_negative_budget() -> None:
    clock = FakeClock()
    assert Deadline.after_ms(200, clock).remaining() == pytest.approx(0.2)
    assert Deadline(-1, clock).expired


def test_errors_belong_to_the_one_hierarchy() -> None:
    for cls in (DeadlineExceededError, CircuitOpenError, AllLevelsFailedError):
        assert issubclass(cls, ServingError) and issubclass(cls, StreamRecError)


# ---------------------------------------------------------------------------- CircuitBreaker


def test_breaker_opens_after_threshold_and_half_opens_after_reset_timeout() -> None:
    clock = FakeClock()
    br = CircuitBreaker("feast", failure_threshold=3, reset_timeout_s=10.0, clock=clock)
    for _ in range(2):
        with pytest.raises(Boom):
            br.call(boom)
    assert br.state is BreakerState.CLOSED
    with pytest.raises(Boom):
        br.call(boom)
    assert br.state is BreakerState.OPEN

    calls = []
    with pytest.raises(CircuitOpenError, match="circuit 'feast' is open") as ei:
        br.call(lambda: calls.append(1))
    assert calls == []  # refused without calling
    assert ei.value.retry_after_s == pytest.approx(10.0)

    clock.advance(9.9)
    assert br.state is BreakerState.OPEN
    clock.advance(0.1)
    assert br.state is BreakerState.HALF_OPEN
    assert br.call(lambda: "ok") == "ok"
    assert br.state is BreakerState.CLOSED
    assert br.snapshot()["times_opened"] == 1


def test_breaker_half_open_failure_reopens_and_restarts_timeout() -> None:
    clock = FakeClock()
    br = CircuitBreaker("x", failure_threshold=1, reset_timeout_s=5.0, clock=clock)
    with pytest.raises(Boom):
        br.call(boom)
    clock.advance(5.0)
    assert br.state is BreakerState.HALF_OPEN
    with pytest.raises(Boom):
        br.call(boom)
    assert br.state is BreakerState.OPEN
    clock.advance(4.0)
    assert br.state is BreakerState.OPEN
    clock.advance(1.0)
    assert br.state is BreakerState.HALF_OPEN


def test_breaker_half_open_limits_trial_calls_and_success_threshold() -> None:
    clock = FakeClock()
    br = CircuitBreaker("x", 1, 1.0, half_open_max_calls=1, success_threshold=2, clock=clock)
    br.record_failure()
    clock.advance(1.0)
    assert br.allow()  # the one trial slot
    assert not br.allow()  # a second concurrent trial is refused
    br.record_success()
    assert br.state is BreakerState.HALF_OPEN  # needs 2 successes
    assert br.allow()
    br.record_success()
    assert br.state is BreakerState.CLOSED


def test_success_resets_consecutive_failure_count() -> None:
    br = CircuitBreaker("x", failure_threshold=3, clock=FakeClock())
    for _ in range(5):
        br.record_failure()
        br.record_failure()
        br.record_success()
    assert br.state is BreakerState.CLOSED


def test_ignored_exceptions_do_not_count() -> None:
    br = CircuitBreaker("x", failure_threshold=1, ignore=(ValueError,), clock=FakeClock())

    def bad_input() -> None:
        raise ValueError("client error")

    for _ in range(3):
        with pytest.raises(ValueError):
            br.call(bad_input)
    assert br.state is BreakerState.CLOSED


def test_breaker_async_context_and_timeout_counts_as_failure() -> None:
    br = CircuitBreaker("remote", failure_threshold=2, reset_timeout_s=60, clock=FakeClock())

    async def hang() -> str:
        await asyncio.sleep(10)
        return "never"

    async def fine() -> str:
        return "ok"

    async def main() -> None:
        assert await br.acall(fine) == "ok"
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await br.acall(hang, timeout_s=0.01)
        assert br.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            async with br:
                pass

    asyncio.run(main())


def test_cancellation_does_not_count_as_failure() -> None:
    clock = FakeClock()
    br = CircuitBreaker("x", failure_threshold=1, reset_timeout_s=1.0, clock=clock)

    async def main() -> None:
        async def slow() -> None:
            await asyncio.sleep(10)

        task = asyncio.create_task(br.acall(slow))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert br.state is BreakerState.CLOSED


def test_breaker_is_thread_safe() -> None:
    br = CircuitBreaker("x", failure_threshold=10_000, clock=FakeClock())
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(1000):
            br.record_failure()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert br.snapshot()["consecutive_failures"] == 8000
    br.record_failure()  # not yet 10_000
    assert br.state is BreakerState.CLOSED


def test_breaker_config_is_strict_and_builds_breaker() -> None:
    cfg = parse_config({"failure_threshold": 2, "reset_timeout_s": 3}, CircuitBreakerConfig)
    br = CircuitBreaker.from_config("y", cfg)
    assert (br.failure_threshold, br.reset_timeout_s) == (2, 3.0)
    with pytest.raises(ConfigError, match="unknown key 'treshold'"):
        parse_config({"treshold": 2}, CircuitBreakerConfig)
    with pytest.raises(ValueError):
        CircuitBreaker("z", failure_threshold=0)


def test_resilience_config_levels_are_checked() -> None:
    cfg = ResilienceConfig()
    assert cfg.level_timeout_s("full") == pytest.approx(0.15)
    with pytest.raises(ConfigError, match="level_timeouts_ms"):
        parse_config({"level_timeouts_ms": {"fancy": 10}}, ResilienceConfig)
    with pytest.raises(ConfigError):
        parse_config({"level_timeouts_ms": {"full": 0}}, ResilienceConfig)


# ----------------------------------------------------------------------------- FallbackChain


def test_levels_are_exactly_the_design_levels() -> None:
    assert LEVELS == ("full", "stale_features", "simple_ranking", "batch", "popularity", "cached")


def test_chain_validates_levels() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FallbackChain([])
    with pytest.raises(ValueError, match="canonical order"):
        FallbackChain([FallbackStep("cached", lambda: 1), FallbackStep("full", lambda: 1)])
    with pytest.raises(ValueError, match="duplicate"):
        FallbackChain([FallbackStep("full", lambda: 1), FallbackStep("full", lambda: 1)])
    with pytest.raises(ValueError, match="unknown"):
        FallbackChain([FallbackStep("fancy", lambda: 1)])  # type: ignore[arg-type]


def test_sync_chain_serves_full_when_healthy_and_passes_arguments() -> None:
    chain: FallbackChain[str] = FallbackChain(
        [FallbackStep("full", lambda u, k: f"full:{u}:{k}"), FallbackStep("cached", lambda u, k: "cached")]
    )
    res = chain.run(7, k=3)
    assert (res.value, res.level, res.failures, res.degraded) == ("full:7:3", "full", (), False)
    assert set(res.timings_ms) == {"full"}


def test_sync_chain_records_why_earlier_levels_failed() -> None:
    clock = FakeClock()
    br = CircuitBreaker("ranker", failure_threshold=1, clock=clock)
    br.record_failure()  # already open
    chain: FallbackChain[str] = FallbackChain(
        [
            FallbackStep("full", boom),
            FallbackStep("simple_ranking", lambda: "never", breaker=br),
            FallbackStep("popularity", lambda: "popular"),
        ]
    )
    res = chain.run()
    assert res.level == "popularity" and res.value == "popular" and res.degraded
    got = [(f.level, f.reason) for f in res.failures]
    assert got == [("full", "error"), ("simple_ranking", "circuit_open")]
    assert res.failures[0].error == "Boom: dependency down"
    assert "ranker" in res.failures[1].error


def test_sync_chain_all_fail_raises_with_every_reason() -> None:
    chain: FallbackChain[str] = FallbackChain([FallbackStep("full", boom), FallbackStep("cached", boom)])
    with pytest.raises(AllLevelsFailedError, match="full: error") as ei:
        chain.run()
    assert [f.level for f in ei.value.failures] == ["full", "cached"]


def test_sync_chain_skips_levels_past_deadline_except_last_resort() -> None:
    clock = FakeClock()
    deadline = Deadline(0.1, clock)
    called: list[str] = []

    def slow_full() -> str:
        called.append("full")
        clock.advance(0.2)  # overruns the whole budget
        raise Boom("slow then failed")

    chain: FallbackChain[str] = FallbackChain(
        [
            FallbackStep("full", slow_full),
            FallbackStep("batch", lambda: called.append("batch") or "batch"),  # type: ignore[func-returns-value]
            FallbackStep("cached", lambda: "cached", run_past_deadline=True),
        ],
        clock=clock,
    )
    res = chain.run(deadline=deadline)
    assert res.level == "cached" and called == ["full"]
    assert [(f.level, f.reason) for f in res.failures] == [("full", "error"), ("batch", "deadline_exceeded")]
    assert res.timings_ms["full"] == pytest.approx(200.0)


def test_sync_chain_rejects_async_steps() -> None:
    async def step() -> str:
        return "x"

    chain: FallbackChain[str] = FallbackChain([FallbackStep("full", step)])
    with pytest.raises(TypeError, match="arun"):
        chain.run()


def test_breaker_in_chain_opens_after_n_failures_then_half_opens() -> None:
    clock = FakeClock()
    br = CircuitBreaker("feature-store", failure_threshold=3, reset_timeout_s=30.0, clock=clock)
    healthy = {"ok": False}
    attempts: list[int] = []

    def full() -> str:
        attempts.append(1)
        if not healthy["ok"]:
            raise Boom("feature store timeout")
        return "full"

    chain: FallbackChain[str] = FallbackChain(
        [FallbackStep("full", full, breaker=br), FallbackStep("stale_features", lambda: "stale")]
    )
    reasons = [chain.run().failures[0].reason for _ in range(5)]
    assert reasons == ["error", "error", "error", "circuit_open", "circuit_open"]
    assert len(attempts) == 3  # the open breaker spared the failing dependency
    healthy["ok"] = True
    assert chain.run().level == "stale_features"  # still open
    clock.advance(30.0)
    assert br.state is BreakerState.HALF_OPEN
    assert chain.run().level == "full"  # the trial call succeeds and closes it
    assert br.state is BreakerState.CLOSED


# ----------------------------------------------------------------------------- async chain


def test_async_chain_times_out_a_hanging_step_and_falls_back() -> None:
    started = {"n": 0}

    async def hang(user: int) -> str:
        started["n"] += 1
        await asyncio.sleep(5)
        return "never"

    async def stale(user: int) -> str:
        return f"stale:{user}"

    chain: FallbackChain[str] = FallbackChain(
        [FallbackStep("full", hang, timeout_s=0.02), FallbackStep("stale_features", stale, timeout_s=0.5)]
    )
    res = asyncio.run(chain.arun(42))
    assert res.value == "stale:42" and res.level == "stale_features"
    (failure,) = res.failures
    assert failure.level == "full" and failure.reason == "timeout"
    assert "no result within 20.0 ms" in failure.error
    assert 15.0 <= failure.elapsed_ms < 1000.0
    assert started["n"] == 1


def test_async_chain_deadline_caps_step_timeouts() -> None:
    async def hang() -> str:
        await asyncio.sleep(5)
        return "never"

    def popularity() -> str:  # sync steps are fine in arun
        return "popular"

    chain: FallbackChain[str] = FallbackChain(
        [
            FallbackStep("full", hang, timeout_s=10.0),
            FallbackStep("simple_ranking", hang, timeout_s=10.0),
            FallbackStep("popularity", popularity, run_past_deadline=True),
        ]
    )

    async def main() -> tuple[str, list[tuple[str, str]]]:
        res = await chain.arun(deadline=Deadline(0.03))
        return res.level, [(f.level, f.reason) for f in res.failures]

    level, failures = asyncio.run(main())
    assert level == "popularity"
    assert failures[0] == ("full", "timeout")  # bounded by the 30 ms deadline, not 10 s
    assert failures[1][0] == "simple_ranking"
    assert failures[1][1] in {"timeout", "deadline_exceeded"}


def test_async_chain_raising_step_and_breaker() -> None:
    clock = FakeClock()
    br = CircuitBreaker("ann", failure_threshold=2, reset_timeout_s=5.0, clock=clock)

    async def failing() -> str:
        raise Boom("faiss index missing")

    async def batch() -> str:
        return "batch"

    chain: FallbackChain[str] = FallbackChain(
        [FallbackStep("full", failing, breaker=br, timeout_s=1.0), FallbackStep("batch", batch)]
    )

    async def main() -> list[str]:
        out: list[str] = []
        for _ in range(3):
            res = await chain.arun()
            assert res.level == "batch"
            out.append(res.failures[0].reason)
        return out

    assert asyncio.run(main()) == ["error", "error", "circuit_open"]
    clock.advance(5.0)
    assert br.state is BreakerState.HALF_OPEN


def test_async_timeout_counts_against_breaker() -> None:
    br = CircuitBreaker("slow", failure_threshold=1, clock=FakeClock())

    async def hang() -> str:
        await asyncio.sleep(5)
        return "never"

    chain: FallbackChain[str] = FallbackChain(
        [FallbackStep("full", hang, breaker=br, timeout_s=0.01), FallbackStep("cached", lambda: "c")]
    )
    assert asyncio.run(chain.arun()).level == "cached"
    assert br.state is BreakerState.OPEN


def test_async_all_levels_failed() -> None:
    async def failing() -> str:
        raise Boom("x")

    chain: FallbackChain[str] = FallbackChain([FallbackStep("popularity", failing)])
    with pytest.raises(AllLevelsFailedError):
        asyncio.run(chain.arun())


def test_lost_half_open_trial_does_not_wedge_the_breaker() -> None:
    clock = FakeClock()
    br = CircuitBreaker("x", failure_threshold=1, reset_timeout_s=2.0, clock=clock)
    br.record_failure()
    clock.advance(2.0)
    assert br.allow()  # a trial that never reports back
    assert not br.allow()
    clock.advance(2.0)
    assert br.allow()  # presumed lost after another reset timeout
    br.record_success()
    assert br.state is BreakerState.CLOSED


def test_keyboard_interrupt_in_a_step_releases_the_trial_slot() -> None:
    clock = FakeClock()
    br = CircuitBreaker("x", failure_threshold=1, reset_timeout_s=1.0, clock=clock)
    br.record_failure()
    clock.advance(1.0)

    def interrupted() -> str:
        raise KeyboardInterrupt

    chain: FallbackChain[str] = FallbackChain([FallbackStep("full", interrupted, breaker=br)])
    with pytest.raises(KeyboardInterrupt):
        chain.run()
    assert br.state is BreakerState.HALF_OPEN and br.allow()  # the slot was given back


def test_last_resort_is_not_cut_short_by_an_almost_spent_deadline() -> None:
    async def cached() -> str:
        await asyncio.sleep(0.02)
        return "cached"

    chain: FallbackChain[str] = FallbackChain(
        [FallbackStep("cached", cached, timeout_s=1.0, run_past_deadline=True)]
    )
    res = asyncio.run(chain.arun(deadline=Deadline(0.001)))
    assert res.level == "cached"
