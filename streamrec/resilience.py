"""Deadlines, circuit breakers and the degradation fallback chain.

Serving follows one rule (DESIGN.md, principle 3): *degrade, never fail*. Every remote call runs
under a :class:`Deadline` and behind a :class:`CircuitBreaker`; every request is answered by a
:class:`FallbackChain` that tries the degradation levels in a fixed order and records which level
served and why the earlier ones did not:

``full`` -> ``stale_features`` -> ``simple_ranking`` -> ``batch`` -> ``popularity`` -> ``cached``

The circuit breaker is hand-written rather than taken from ``purgatory`` (which the design lists
as resolving here): ours is ~230 lines with docstrings, needs no extra dependency, serves sync and
asyncio callers from the same object (state changes are short critical sections under a
:class:`threading.Lock` and never span an ``await``) and takes an injectable clock, so the reset
timeout is tested without sleeping. ``purgatory`` has separate sync and async factories and no
clock injection point in its documented API; its Redis-shared state is the reason to revisit.
See ``docs/adr/ADR-005-degradation.md``.

Nothing in this module imports Ray, Feast or torch; it is plain Python usable in-process.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import Field

from streamrec.config import StrictModel
from streamrec.errors import ServingError

T = TypeVar("T")

#: A monotonic clock returning seconds; injectable for tests.
Clock = Callable[[], float]

#: The degradation levels, best first. Every response names the one that served it.
DegradationLevel = Literal["full", "stale_features", "simple_ranking", "batch", "popularity", "cached"]
LEVELS: tuple[DegradationLevel, ...] = get_args(DegradationLevel)

#: Why a level did not serve (values of :attr:`LevelFailure.reason`).
FailureReason = Literal["error", "timeout", "circuit_open", "deadline_exceeded"]


# --------------------------------------------------------------------------------------------
# Errors (all derive from streamrec.errors.ServingError, so the one hierarchy is kept)
# --------------------------------------------------------------------------------------------


class DeadlineExceededError(ServingError):
    """The request's time budget ran out before the work finished."""


class CircuitOpenError(ServingError):
    """A call was refused because its circuit breaker is open (the dependency is failing).

    Attributes:
        breaker: Name of the breaker that refused the call.
        retry_after_s: Seconds until the breaker lets a trial call through.
    """

    def __init__(self, breaker: str, retry_after_s: float) -> None:
        super().__init__(
            f"circuit '{breaker}' is open; calls are refused for another {retry_after_s:.3f}s "
            "(the dependency failed repeatedly — check its health)"
        )
        self.breaker = breaker
        self.retry_after_s = retry_after_s


class AllLevelsFailedError(ServingError):
    """Every level of a :class:`FallbackChain` failed; ``failures`` says why each one did.

    Attributes:
        failures: One :class:`LevelFailure` per level tried, in order.
    """

    def __init__(self, failures: Sequence[LevelFailure]) -> None:
        why = "; ".join(f"{f.level}: {f.reason} ({f.error})" for f in failures)
        super().__init__(
            f"every degradation level failed — {why}. Configure a last-resort level "
            "('popularity' or 'cached') that cannot fail."
        )
        self.failures = tuple(failures)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class CircuitBreakerConfig(StrictModel):
    """Settings of one :class:`CircuitBreaker`.

    Attributes:
        failure_threshold: Consecutive failures that open the circuit.
        reset_timeout_s: Seconds the circuit stays open before letting a trial call through.
        half_open_max_calls: Trial calls allowed at once while half-open.
        success_threshold: Successful trial calls needed to close the circuit again.
    """

    failure_threshold: int = Field(default=5, ge=1)
    reset_timeout_s: float = Field(default=30.0, gt=0)
    half_open_max_calls: int = Field(default=1, ge=1)
    success_threshold: int = Field(default=1, ge=1)


_DEFAULT_TIMEOUTS_MS: dict[DegradationLevel, float] = {
    "full": 150.0,
    "stale_features": 120.0,
    "simple_ranking": 60.0,
    "batch": 20.0,
    "popularity": 10.0,
    "cached": 10.0,
}


class ResilienceConfig(StrictModel):
    """Request budget, stage budgets, per-level timeouts and breakers of the serving chain.

    Attributes:
        request_budget_ms: Total time budget of one request (the p95 target is 200 ms).
        level_timeouts_ms: Per-level timeout; a level missing here is bounded only by the budget.
            The serving policy awaits only ``full`` with a timeout: its later levels are
            in-memory lookups that run even past the deadline (a request always gets an answer).
        online_store_ms: Budget of the user-feature read; past it the request goes on with the
            user's last known features (``stale_features``).
        ranker_ms: Budget of the ranker's forward pass; past it the request is ordered by the
            merged retrieval score (``simple_ranking``).
        context_ms: Budget of building the request context (history, the user tower's forward
            pass); past it the funnel fails for this request and a later level answers.
        breaker: Default settings of the request path's breakers (open after 5 consecutive
            failures, a trial call after 10 s: a dependency back up is used again within seconds).
        breakers: Per-dependency overrides of ``breaker``, by dependency name (``online_store``,
            ``ranker``, ``context``, ``source:<name>``, ``funnel``).
        cached_users: Users whose last good response is kept for the ``cached`` level (LRU).
    """

    request_budget_ms: float = Field(default=200.0, gt=0)
    level_timeouts_ms: dict[DegradationLevel, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: dict(_DEFAULT_TIMEOUTS_MS)
    )
    online_store_ms: float = Field(default=40.0, gt=0)
    ranker_ms: float = Field(default=60.0, gt=0)
    context_ms: float = Field(default=100.0, gt=0)
    breaker: CircuitBreakerConfig = Field(default_factory=lambda: CircuitBreakerConfig(reset_timeout_s=10.0))
    breakers: dict[str, CircuitBreakerConfig] = Field(default_factory=dict)
    cached_users: int = Field(default=10_000, ge=0)

    def level_timeout_s(self, level: DegradationLevel) -> float | None:
        """The timeout of ``level`` in seconds, or None when only the budget bounds it."""
        ms = self.level_timeouts_ms.get(level)
        return None if ms is None else ms / 1000.0

    def breaker_for(self, name: str) -> CircuitBreakerConfig:
        """The breaker settings of dependency ``name`` (its override, else the default)."""
        return self.breakers.get(name, self.breaker)


# --------------------------------------------------------------------------------------------
# Deadline
# --------------------------------------------------------------------------------------------


class Deadline:
    """A point in time by which work must finish, measured on a monotonic clock.

    Example:
        >>> d = Deadline(0.2)            # 200 ms from now
        >>> d.timeout(0.05)              # per-call timeout, never beyond the deadline
        0.05

    Args:
        budget_s: Seconds from now until the deadline (clamped at 0).
        clock: Monotonic clock in seconds (``time.monotonic``; injectable for tests).
    """

    __slots__ = ("_clock", "_start", "_expires_at")

    def __init__(self, budget_s: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._expires_at = self._start + max(0.0, budget_s)

    @classmethod
    def after_ms(cls, budget_ms: float, clock: Clock = time.monotonic) -> Deadline:
        """A deadline ``budget_ms`` milliseconds from now."""
        return cls(budget_ms / 1000.0, clock)

    @property
    def expires_at(self) -> float:
        """The deadline on the clock's timeline (seconds)."""
        return self._expires_at

    def remaining(self) -> float:
        """Seconds left (0 once expired)."""
        return max(0.0, self._expires_at - self._clock())

    def remaining_ms(self) -> float:
        """Milliseconds left (0 once expired)."""
        return self.remaining() * 1000.0

    def elapsed(self) -> float:
        """Seconds since the deadline was created."""
        return self._clock() - self._start

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self._clock() >= self._expires_at

    def timeout(self, per_call_s: float | None = None) -> float:
        """The timeout for one call: ``per_call_s`` but never past the deadline.

        Args:
            per_call_s: The call's own limit in seconds, or None for "whatever is left".
        """
        left = self.remaining()
        return left if per_call_s is None else min(left, max(0.0, per_call_s))

    def child(self, budget_s: float) -> Deadline:
        """A sub-deadline of at most ``budget_s`` that never outlives this one."""
        return Deadline(self.timeout(budget_s), self._clock)

    def check(self, what: str = "operation") -> None:
        """Raise if the deadline has passed.

        Raises:
            DeadlineExceededError: naming ``what`` and how far past the deadline it is.
        """
        now = self._clock()
        if now >= self._expires_at:
            over_ms = (now - self._expires_at) * 1000.0
            raise DeadlineExceededError(
                f"{what}: deadline exceeded by {over_ms:.1f} ms "
                f"(budget {(self._expires_at - self._start) * 1000.0:.1f} ms)"
            )

    def __repr__(self) -> str:
        return f"Deadline(remaining_ms={self.remaining_ms():.1f})"


# --------------------------------------------------------------------------------------------
# Circuit breaker
# --------------------------------------------------------------------------------------------


class BreakerState(StrEnum):
    """States of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """A closed / open / half-open circuit breaker, safe for threads and asyncio.

    * **closed**: calls pass; ``failure_threshold`` *consecutive* failures open the circuit.
    * **open**: calls are refused with :class:`CircuitOpenError` until ``reset_timeout_s`` passes.
    * **half-open**: up to ``half_open_max_calls`` trial calls pass at once; ``success_threshold``
      successes close the circuit, any failure reopens it (and restarts the reset timeout).

    Use it as a (sync or async) context manager, or through :meth:`call` / :meth:`acall`::

        with breaker:                      # raises CircuitOpenError when open
            features = store.get(user_id)
        result = await breaker.acall(client.fetch, user_id)

    Exceptions listed in ``ignore`` (e.g. a client's own bad input) pass through without counting
    as failures. ``asyncio.CancelledError`` never counts. State changes happen under a
    :class:`threading.Lock` that is never held across an ``await``, so one breaker can be shared
    by threads and coroutines.

    Args:
        name: Name used in errors and metrics.
        failure_threshold: Consecutive failures that open the circuit.
        reset_timeout_s: Seconds to stay open before allowing trial calls.
        half_open_max_calls: Concurrent trial calls while half-open.
        success_threshold: Trial successes needed to close again.
        ignore: Exception types that do not count as failures.
        clock: Monotonic clock (seconds), injectable for tests.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        *,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        ignore: tuple[type[BaseException], ...] = (),
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_max_calls < 1 or success_threshold < 1:
            raise ValueError("failure_threshold, half_open_max_calls and success_threshold must be >= 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold
        self.ignore = ignore
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._in_flight_trials = 0
        self._last_trial_at = 0.0
        self._times_opened = 0

    @classmethod
    def from_config(
        cls, name: str, config: CircuitBreakerConfig, clock: Clock = time.monotonic
    ) -> CircuitBreaker:
        """Build a breaker from a :class:`CircuitBreakerConfig`."""
        return cls(
            name,
            config.failure_threshold,
            config.reset_timeout_s,
            half_open_max_calls=config.half_open_max_calls,
            success_threshold=config.success_threshold,
            clock=clock,
        )

    # -- state ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Move open -> half-open once the reset timeout has passed (lock held)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._state = BreakerState.HALF_OPEN
            self._successes = 0
            self._in_flight_trials = 0

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._successes = 0
        self._in_flight_trials = 0
        self._times_opened += 1

    @property
    def state(self) -> BreakerState:
        """The current state (an open circuit reads half-open once its timeout has passed)."""
        with self._lock:
            self._refresh()
            return self._state

    def retry_after(self) -> float:
        """Seconds until an open circuit lets a trial call through (0 unless open)."""
        with self._lock:
            self._refresh()
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Ask to make one call. True means go ahead *and* report back.

        A caller that gets True must later call exactly one of :meth:`record_success`,
        :meth:`record_failure` or :meth:`release` (the context managers do this).
        """
        with self._lock:
            self._refresh()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN:
                now = self._clock()
                if self._in_flight_trials >= self.half_open_max_calls and (
                    now - self._last_trial_at >= self.reset_timeout_s
                ):
                    # A trial that never reported back (a caller bug or a lost task) must not
                    # wedge the circuit half-open forever: presume it lost after a reset timeout.
                    self._in_flight_trials = 0
                if self._in_flight_trials < self.half_open_max_calls:
                    self._in_flight_trials += 1
                    self._last_trial_at = now
                    return True
            return False

    def record_success(self) -> None:
        """Report that an allowed call succeeded."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._in_flight_trials = max(0, self._in_flight_trials - 1)
                self._successes += 1
                if self._successes >= self.success_threshold:
                    self._state = BreakerState.CLOSED
                    self._failures = 0
            elif self._state is BreakerState.CLOSED:
                self._failures = 0

    def record_failure(self) -> None:
        """Report that an allowed call failed."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._open()
            elif self._state is BreakerState.CLOSED:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._open()

    def release(self) -> None:
        """Report that an allowed call ended without a verdict (ignored error, cancellation)."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._in_flight_trials = max(0, self._in_flight_trials - 1)

    def reset(self) -> None:
        """Force the circuit closed and forget past failures (operator action, tests)."""
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._successes = 0
            self._in_flight_trials = 0

    def snapshot(self) -> dict[str, Any]:
        """State for metrics and health endpoints."""
        with self._lock:
            self._refresh()
            return {
                "name": self.name,
                "state": self._state.value,
                "consecutive_failures": self._failures,
                "times_opened": self._times_opened,
            }

    # -- usage ---------------------------------------------------------------------------

    def _enter(self) -> None:
        if not self.allow():
            raise CircuitOpenError(self.name, self.retry_after())

    def _exit(self, exc: BaseException | None) -> None:
        if exc is None:
            self.record_success()
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit) or (
            self.ignore and isinstance(exc, self.ignore)
        ):
            self.release()
        else:
            self.record_failure()

    def __enter__(self) -> CircuitBreaker:
        self._enter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._exit(exc)

    async def __aenter__(self) -> CircuitBreaker:
        self._enter()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self._exit(exc)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` through the breaker.

        Raises:
            CircuitOpenError: the circuit is open; ``fn`` was not called.
        """
        with self:
            return fn(*args, **kwargs)

    async def acall(
        self, fn: Callable[..., Awaitable[T]], *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker, optionally with a timeout.

        A timeout counts as a failure of the dependency.

        Raises:
            CircuitOpenError: the circuit is open; ``fn`` was not called.
            TimeoutError: the call took longer than ``timeout_s``.
        """
        async with self:
            if timeout_s is None:
                return await fn(*args, **kwargs)
            return await asyncio.wait_for(fn(*args, **kwargs), timeout_s)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state.value})"


# --------------------------------------------------------------------------------------------
# Fallback chain
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FallbackStep(Generic[T]):
    """One level of a :class:`FallbackChain`.

    Attributes:
        level: Which degradation level this step implements.
        fn: Called with the chain's arguments; may be sync or ``async`` (an awaitable result is
            awaited by :meth:`FallbackChain.arun`; :meth:`FallbackChain.run` needs sync steps).
        timeout_s: This step's own time limit (async only), further capped by the deadline.
        breaker: Optional breaker guarding the step; an open breaker skips it at no cost.
        run_past_deadline: Try this step even when the request deadline has passed. Set it on the
            cheap in-memory last resorts (``popularity``, ``cached``) so a request always gets an
            answer. Such a step is bounded only by its own ``timeout_s``, never by the deadline.
    """

    level: DegradationLevel
    fn: Callable[..., T] | Callable[..., Awaitable[T]]
    timeout_s: float | None = None
    breaker: CircuitBreaker | None = None
    run_past_deadline: bool = False


@dataclass(frozen=True)
class LevelFailure:
    """Why one level did not serve.

    Attributes:
        level: The level.
        reason: ``error`` (it raised), ``timeout`` (it exceeded its timeout or the deadline while
            running), ``circuit_open`` (its breaker refused) or ``deadline_exceeded`` (skipped,
            the request's deadline had passed).
        error: ``"ExceptionType: message"`` (empty when skipped).
        elapsed_ms: Time spent on the level.
    """

    level: DegradationLevel
    reason: FailureReason
    error: str
    elapsed_ms: float


@dataclass(frozen=True)
class FallbackResult(Generic[T]):
    """What a :class:`FallbackChain` produced.

    Attributes:
        value: The serving level's return value.
        level: The level that served.
        failures: Why each earlier level did not serve, in order.
        elapsed_ms: Total time of the chain.
        timings_ms: Time per level tried, keyed by level.
    """

    value: T
    level: DegradationLevel
    failures: tuple[LevelFailure, ...] = ()
    elapsed_ms: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        """Whether a level other than ``full`` served."""
        return self.level != "full"


def _describe(exc: BaseException) -> str:
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class FallbackChain(Generic[T]):
    """Try degradation levels in order until one returns; record which served and why.

    Levels must be a non-empty, duplicate-free subset of :data:`LEVELS` in that canonical order
    (``full`` first, ``cached`` last). Each step is called with the arguments given to
    :meth:`run` / :meth:`arun`.

    Timeouts: :meth:`arun` bounds each step with ``asyncio.wait_for`` at
    ``min(step.timeout_s, deadline remaining)`` (only ``step.timeout_s`` for ``run_past_deadline``
    steps), so a hanging dependency costs at most its slot.
    :meth:`run` (sync) cannot interrupt a running function; it checks the deadline *between*
    steps, and a step that overruns is still used (its work is already paid for). The serving
    path uses :meth:`arun`.

    Args:
        steps: The levels, best first.
        clock: Monotonic clock (seconds) for timings, injectable for tests.

    Raises:
        ValueError: the levels are empty, unknown, duplicated or out of order.
    """

    def __init__(self, steps: Sequence[FallbackStep[T]], clock: Clock = time.monotonic) -> None:
        if not steps:
            raise ValueError("a FallbackChain needs at least one step")
        levels = [s.level for s in steps]
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown:
            raise ValueError(f"unknown degradation level(s) {unknown}; expected a subset of {list(LEVELS)}")
        if len(set(levels)) != len(levels):
            raise ValueError(f"duplicate degradation levels in {levels}")
        if levels != sorted(levels, key=LEVELS.index):
            raise ValueError(f"levels must follow the canonical order {list(LEVELS)}; got {levels}")
        self.steps: tuple[FallbackStep[T], ...] = tuple(steps)
        self._clock = clock

    @property
    def levels(self) -> tuple[DegradationLevel, ...]:
        """The levels of this chain, in order."""
        return tuple(s.level for s in self.steps)

    @contextmanager
    def _timed(self, timings: dict[str, float], level: str) -> Iterator[Callable[[], float]]:
        t0 = self._clock()

        def elapsed_ms() -> float:
            return (self._clock() - t0) * 1000.0

        try:
            yield elapsed_ms
        finally:
            timings[level] = elapsed_ms()

    def run(self, *args: Any, deadline: Deadline | None = None, **kwargs: Any) -> FallbackResult[T]:
        """Run the chain synchronously (steps must be plain functions).

        Args:
            *args: Passed to every step.
            deadline: The request deadline; once passed, only ``run_past_deadline`` steps run.
            **kwargs: Passed to every step.

        Returns:
            The first successful level's value, the level, and the earlier failures.

        Raises:
            AllLevelsFailedError: no level succeeded.
            TypeError: a step returned an awaitable (use :meth:`arun`).
        """
        start = self._clock()
        failures: list[LevelFailure] = []
        timings: dict[str, float] = {}
        for step in self.steps:
            if deadline is not None and deadline.expired and not step.run_past_deadline:
                failures.append(LevelFailure(step.level, "deadline_exceeded", "", 0.0))
                continue
            if step.breaker is not None and not step.breaker.allow():
                failures.append(
                    LevelFailure(step.level, "circuit_open", f"circuit '{step.breaker.name}' is open", 0.0)
                )
                continue
            with self._timed(timings, step.level) as elapsed_ms:
                try:
                    value = step.fn(*args, **kwargs)
                except Exception as exc:
                    failure = self._fail(step, exc, elapsed_ms())
                except BaseException:  # KeyboardInterrupt, SystemExit: no verdict on the dependency
                    if step.breaker is not None:
                        step.breaker.release()
                    raise
                else:
                    if inspect.isawaitable(value):
                        if inspect.iscoroutine(value):
                            value.close()
                        if step.breaker is not None:
                            step.breaker.release()
                        raise TypeError(f"step '{step.level}' is async; use FallbackChain.arun")
                    if step.breaker is not None:
                        step.breaker.record_success()
                    return FallbackResult(value, step.level, tuple(failures), self._ms_since(start), timings)
            failures.append(failure)
        raise AllLevelsFailedError(failures)

    async def arun(self, *args: Any, deadline: Deadline | None = None, **kwargs: Any) -> FallbackResult[T]:
        """Run the chain on the event loop, each async step bounded by its timeout.

        Args:
            *args: Passed to every step.
            deadline: The request deadline; caps every step's timeout, and once passed only
                ``run_past_deadline`` steps run.
            **kwargs: Passed to every step.

        Returns:
            The first successful level's value, the level, and the earlier failures.

        Raises:
            AllLevelsFailedError: no level succeeded.
        """
        start = self._clock()
        failures: list[LevelFailure] = []
        timings: dict[str, float] = {}
        for step in self.steps:
            expired = deadline is not None and deadline.expired
            if expired and not step.run_past_deadline:
                failures.append(LevelFailure(step.level, "deadline_exceeded", "", 0.0))
                continue
            if step.breaker is not None and not step.breaker.allow():
                failures.append(
                    LevelFailure(step.level, "circuit_open", f"circuit '{step.breaker.name}' is open", 0.0)
                )
                continue
            timeout = step.timeout_s
            if deadline is not None and not step.run_past_deadline:
                timeout = deadline.timeout(timeout)
            with self._timed(timings, step.level) as elapsed_ms:
                try:
                    value = step.fn(*args, **kwargs)
                    if inspect.isawaitable(value):
                        value = await (value if timeout is None else asyncio.wait_for(value, timeout))
                except TimeoutError as exc:
                    failure = self._fail(step, exc, elapsed_ms(), reason="timeout", timeout=timeout)
                except Exception as exc:
                    failure = self._fail(step, exc, elapsed_ms())
                except BaseException:  # cancellation, KeyboardInterrupt: no verdict on the dependency
                    if step.breaker is not None:
                        step.breaker.release()
                    raise
                else:
                    if step.breaker is not None:
                        step.breaker.record_success()
                    return FallbackResult(value, step.level, tuple(failures), self._ms_since(start), timings)
            failures.append(failure)
        raise AllLevelsFailedError(failures)

    def _fail(
        self,
        step: FallbackStep[T],
        exc: BaseException,
        elapsed_ms: float,
        reason: FailureReason = "error",
        timeout: float | None = None,
    ) -> LevelFailure:
        if step.breaker is not None:
            if step.breaker.ignore and isinstance(exc, step.breaker.ignore):
                step.breaker.release()
            else:
                step.breaker.record_failure()
        if isinstance(exc, DeadlineExceededError):
            reason = "timeout"
        error = _describe(exc)
        if reason == "timeout" and timeout is not None:
            error = f"no result within {timeout * 1000.0:.1f} ms"
        return LevelFailure(step.level, reason, error, elapsed_ms)

    def _ms_since(self, start: float) -> float:
        return (self._clock() - start) * 1000.0
