"""A blocking dependency called off the event loop, under a time budget and a circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from streamrec.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    DeadlineExceededError,
)

T = TypeVar("T")


class DependencyTimeoutError(DeadlineExceededError):
    """A dependency gave no answer within its budget (its worker thread is left behind)."""


class DependencySaturatedError(DeadlineExceededError):
    """A dependency has its cap of abandoned calls still holding threads (it is hung)."""


class Dependency:
    """Runs a blocking callable (online-store read, ranker forward) in a bounded thread pool.

    The caller awaits the result for at most the budget; a call still running then is left
    behind (its thread finishes in the background, the result is dropped) and counts as a
    failure of the breaker. Once the breaker opens, calls are refused at once without touching
    the pool, so a hung dependency costs a request nothing until the breaker's next trial call.
    The pool is bounded: when every worker is stuck in a hung call, new calls queue and time
    out (a queued call that times out never starts).

    Args:
        name: Name in errors, logs and status (``online_store``, ``ranker``...).
        budget_s: Default budget of one call, seconds.
        breaker: Breaker settings.
        workers: Threads of the dependency's own pool.
        pool: A pool shared with other dependencies instead of an own one (not shut down by
            :meth:`close`).
        ignore: Exceptions that say nothing of the dependency's health (they pass through
            without counting as failures, e.g. a request built by another model version).
        max_abandoned: Calls left behind past their budget that may still hold a thread; once
            reached, calls are refused at once until one returns (None: only the pool bounds
            them). On a shared pool this keeps one hung dependency from taking every thread.
        timeouts_trip: Whether a call past its budget (or refused as saturated) counts as a
            failure of the breaker. False for work that only the replica's own CPU can slow
            down: a short CPU stall must not hold the breaker open for its reset time; a hung
            call is then bounded by ``max_abandoned`` instead.
    """

    def __init__(
        self,
        name: str,
        budget_s: float,
        breaker: CircuitBreakerConfig,
        workers: int = 2,
        pool: ThreadPoolExecutor | None = None,
        ignore: tuple[type[BaseException], ...] = (),
        max_abandoned: int | None = None,
        timeouts_trip: bool = True,
    ) -> None:
        self.name = name
        self._timeouts_trip = timeouts_trip
        self.budget_s = budget_s
        self.breaker = CircuitBreaker.from_config(name, breaker)
        self._ignore = ignore
        self._max_abandoned = max_abandoned
        self._abandoned = 0
        self._lock = threading.Lock()
        self._owns_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(workers, thread_name_prefix=f"dep-{name}")
        self.counts = {"calls": 0, "ok": 0, "errors": 0, "timeouts": 0, "refused": 0, "skipped": 0}

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The pool this dependency's calls run in."""
        return self._pool

    def ready(self) -> bool:
        """Whether a call would be admitted now (breaker closed, not saturated); claims nothing."""
        saturated = self._max_abandoned is not None and self._abandoned >= self._max_abandoned
        return not saturated and self.breaker.state is BreakerState.CLOSED

    def admit(self) -> None:
        """Count one call and ask the breaker for it (:meth:`call`'s first step).

        A caller admitted must settle it exactly once: :meth:`succeeded`, :meth:`failed`,
        :meth:`_timed_out` or ``breaker.release()``.

        Raises:
            CircuitOpenError: the breaker is open.
            DependencySaturatedError: the cap of abandoned calls is reached.
        """
        self.counts["calls"] += 1
        if not self.breaker.allow():
            self.counts["refused"] += 1
            raise CircuitOpenError(self.name, self.breaker.retry_after())
        if self._max_abandoned is not None and self._abandoned >= self._max_abandoned:
            self._timed_out()
            raise DependencySaturatedError(
                f"{self.name} still has {self._abandoned} call(s) past their budget"
            )

    def succeeded(self) -> None:
        """Settle an admitted call that returned."""
        self.breaker.record_success()
        self.counts["ok"] += 1

    def failed(self, err: BaseException) -> None:
        """Settle an admitted call that raised ``err`` (an error of ``ignore`` counts nothing)."""
        if isinstance(err, self._ignore):
            self.breaker.release()
            return
        self.breaker.record_failure()
        self.counts["errors"] += 1

    def skipped(self) -> None:
        """Settle an admitted call that never ran because another call in its batch took the budget."""
        self.breaker.release()
        self.counts["skipped"] += 1

    def abandon(self) -> None:
        """A call left behind past its budget still holds a thread (:meth:`returned` when it ends)."""
        with self._lock:
            self._abandoned += 1

    def returned(self, _: Any = None) -> None:
        """An abandoned call's thread is free again."""
        with self._lock:
            self._abandoned -= 1

    async def call(self, fn: Callable[..., T], *args: Any, budget_s: float | None = None) -> T:
        """``fn(*args)`` in the pool, awaited for at most ``budget_s`` (default: the dependency's).

        Raises:
            CircuitOpenError: the breaker is open (``fn`` was not called).
            DependencyTimeoutError: no result within the budget.
            Exception: whatever ``fn`` raised.
        """
        budget = self.budget_s if budget_s is None else budget_s
        self.admit()
        loop = asyncio.get_running_loop()
        cfut = self._pool.submit(fn, *args)
        fut = asyncio.wrap_future(cfut, loop=loop)
        try:
            result = await asyncio.wait_for(fut, max(budget, 0.0))
        except TimeoutError:
            self._timed_out()
            if not cfut.done():  # still running in its thread: it holds that thread until it returns
                self.abandon()
                cfut.add_done_callback(self.returned)
            raise DependencyTimeoutError(f"{self.name} gave no answer within {budget * 1e3:.0f} ms") from None
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except Exception as err:
            self.failed(err)
            raise
        self.succeeded()
        return result

    def _timed_out(self) -> None:
        self.counts["timeouts"] += 1
        if self._timeouts_trip:
            self.breaker.record_failure()
        else:
            self.breaker.release()

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state and the call counters (for ``/readyz`` and the admin status)."""
        out = {**self.breaker.snapshot(), "budget_ms": round(self.budget_s * 1e3, 3), **self.counts}
        out["abandoned"] = self._abandoned
        return out

    def close(self) -> None:
        """Stop the own pool (threads stuck in a hung call end when it returns)."""
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)


class DependencySkippedError(DependencyTimeoutError):
    """A call in a batch never ran: an earlier call of the batch failed or used up the budget."""


_PENDING, _RUNNING, _DONE, _SKIPPED, _MOVED = range(5)


@dataclass(eq=False)
class Step:
    """One dependency's call inside :func:`call_batch`.

    Attributes:
        dep: The dependency (its breaker, counters and abandoned-call cap apply to this call).
        fn: The blocking callable.
        args: Its arguments.
        budget_s: This call's budget from the moment it starts (None: the dependency's); the
            first step's counts from the batch's submission, so its queueing counts too.
        chained: Pass the previous step's result as the last argument.
    """

    dep: Dependency
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    budget_s: float | None = None
    chained: bool = False
    state: int = _PENDING
    result: Any = None
    error: BaseException | None = None
    started: float = 0.0
    ended: float = 0.0
    abandoned: bool = False
    verdict: str = ""
    moved_to: Step | None = None

    @property
    def budget(self) -> float:
        """The call's budget in seconds."""
        return self.dep.budget_s if self.budget_s is None else self.budget_s

    def final(self) -> Step:
        """Where this call ended up (a call moved to another worker call: that one)."""
        step = self
        while step.moved_to is not None:
            step = step.moved_to
        return step


class _Batch:
    """The state one worker thread and the event loop share while a batch runs."""

    def __init__(self, steps: list[Step], stop_on_error: bool, pool: ThreadPoolExecutor) -> None:
        self.steps = steps
        self.stop_on_error = stop_on_error
        self.lock = threading.Lock()
        self.given_up = False
        self.submitted = time.monotonic()
        self.future: Future[None] = pool.submit(self.run)

    def run(self) -> None:
        """In the worker thread: the steps in order, each unless the loop gave up on it or moved it."""
        prev: Any = None
        stop = False
        for step in self.steps:
            with self.lock:
                if step.state == _MOVED:
                    continue
                if self.given_up or stop:
                    step.state = _SKIPPED
                    continue
                step.state = _RUNNING
                step.started = time.monotonic()
            args = (*step.args, prev) if step.chained else step.args
            try:
                prev = step.fn(*args)
                err: BaseException | None = None
            except BaseException as e:  # handed to the loop, which settles the breaker
                err = e
            with self.lock:
                step.state = _DONE
                step.ended = time.monotonic()
                step.result, step.error = (None, err) if err is not None else (prev, None)
                if step.abandoned:  # the loop left it behind: its thread is free again
                    step.dep.returned()
            if err is not None and self.stop_on_error:
                stop = True

    def finished(self) -> bool:
        with self.lock:
            return self.given_up or all(s.state in (_DONE, _SKIPPED, _MOVED) for s in self.steps)

    def deadline(self, limit: float | None) -> float | None:
        """When the loop gives up on the step running or next (None: every step has ended)."""
        with self.lock:
            start = self.submitted
            for step in self.steps:
                if step.state == _DONE:
                    start = step.ended
                    continue
                if step.state in (_SKIPPED, _MOVED):
                    continue
                at = (step.started if step.state == _RUNNING else start) + step.budget
                return at if limit is None else min(at, limit)
        return None

    def stalled_at(self, after: float) -> float | None:
        """When the running step will have run ``after`` seconds with steps still waiting behind it."""
        with self.lock:
            running = [s for s in self.steps if s.state == _RUNNING]
            if not running or not any(s.state == _PENDING for s in self.steps):
                return None
            return running[0].started + after

    def move_pending(self) -> list[Step]:
        """Take the steps not started yet out of this batch (they go to another worker call)."""
        moved = []
        with self.lock:
            for step in self.steps:
                if step.state == _PENDING:
                    step.state = _MOVED
                    step.moved_to = Step(step.dep, step.fn, step.args, step.budget_s)
                    moved.append(step.moved_to)
        return moved

    def give_up(self, hold: bool = True) -> None:
        """Stop the batch where it is (the loop's side): the step running is past its budget.

        ``hold``: count that step's thread as held by an abandoned call until it returns. The
        steps not started are skipped, or timed out when none had started (all queued).
        """
        self.future.cancel()  # still queued: it never starts
        with self.lock:
            if self.given_up:
                return
            self.given_up = True
            started = any(step.state not in (_PENDING, _MOVED) for step in self.steps)
            for step in self.steps:
                if step.state == _RUNNING:
                    step.verdict = "timeout"
                    if hold:
                        step.abandoned = True
                        step.dep.abandon()
                elif step.state == _PENDING:
                    step.verdict = "skipped" if started else "timeout"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _until_any(futures: list[Future[Any]], timeout: float) -> None:
    """Wait on the loop until one of ``futures`` (worker threads') is done, at most ``timeout`` s."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def done(_: Any) -> None:  # in the worker thread
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_wake, waiter)

    for f in futures:
        f.add_done_callback(done)
    handle = loop.call_later(max(timeout, 0.0), _wake, waiter)
    try:
        await waiter
    finally:
        handle.cancel()


async def call_batch(
    steps: list[Step],
    pool: ThreadPoolExecutor,
    *,
    limit_s: float | None = None,
    stop_on_error: bool = False,
    split_after_s: float | None = None,
) -> list[Any]:
    """Several dependencies' calls in ONE worker-thread call, each under its own budget and breaker.

    A request's cheap calls (in-memory retrieval sources; the online-store read and then the
    context built from it) each cost a thread hop when made one by one: a pool submission, a
    wake-up of the event loop and two GIL hand-offs. Made in one worker call they cost one.
    Each step is still one call of its :class:`Dependency`: admitted by its breaker (a step
    refused is never run), its outcome recorded there, and cut at its budget: the loop waits for
    the batch until the running step's budget (or ``limit_s`` from submission) runs out, then
    leaves it behind in its thread (a timeout of that dependency, which now holds one thread
    until it returns, under its ``max_abandoned`` cap) and skips the steps not yet started
    (:class:`DependencySkippedError`, not counted against their breakers).

    With ``split_after_s`` (independent steps only), a step still running after that long
    loses the steps queued behind it: they move to a new worker call of the same pool, so a
    hung step costs the others one extra hop and never their answers.

    Args:
        steps: The calls, run in this order.
        pool: Where the batch runs (one thread; two after a split).
        limit_s: Bound on the whole batch from submission (None: only the steps' budgets).
        stop_on_error: Skip the steps after one that failed (a chain whose steps need the
            previous result).
        split_after_s: Move the steps waiting behind a step running this long (None: never).

    Returns:
        Per step, its result or the exception that stands for it: ``CircuitOpenError`` or
        ``DependencySaturatedError`` (refused), what ``fn`` raised, ``DependencyTimeoutError``
        (past its budget) or ``DependencySkippedError``.
    """
    out: list[Any] = [None] * len(steps)
    admitted: list[tuple[int, Step]] = []
    for i, step in enumerate(steps):
        try:
            step.dep.admit()
        except (CircuitOpenError, DeadlineExceededError) as err:
            out[i] = err
            if stop_on_error:
                for rest in range(i + 1, len(steps)):
                    out[rest] = DependencySkippedError(
                        f"{steps[rest].dep.name} not called: {step.dep.name} refused"
                    )
                break
        else:
            admitted.append((i, step))
    if not admitted:
        return out
    first = _Batch([s for _, s in admitted], stop_on_error, pool)
    batches = [first]
    limit = None if limit_s is None else first.submitted + limit_s
    split = None if stop_on_error else split_after_s
    try:
        while True:
            now = time.monotonic()
            live = [b for b in batches if not b.future.done() and not b.finished()]
            if not live:
                break
            wake = None
            for b in live:
                at = b.deadline(limit)
                if at is not None and at <= now:
                    b.give_up()
                    continue
                if split is not None:
                    stall = b.stalled_at(split)
                    if stall is not None and stall <= now:
                        moved = b.move_pending()
                        if moved:
                            batches.append(_Batch(moved, False, pool))
                            wake = now
                    elif stall is not None:
                        at = stall if at is None else min(at, stall)
                if at is not None:
                    wake = at if wake is None else min(wake, at)
            if wake is None:  # every live batch was just given up (or has ended): settle them
                continue
            if wake > now:
                await _until_any([b.future for b in live], wake - now)
    except asyncio.CancelledError:  # no verdict on calls cut by the caller, as in Dependency.call
        for b in batches:
            b.give_up(hold=False)
        for _, step in admitted:
            f = step.final()
            if f.state == _DONE and not f.verdict and f.error is None:
                step.dep.succeeded()
            else:
                step.dep.breaker.release()
        raise
    for i, step in admitted:
        f = step.final()
        name = step.dep.name
        if f.verdict == "timeout":  # past its budget, or queued past it
            step.dep._timed_out()
            out[i] = DependencyTimeoutError(f"{name} gave no answer within {f.budget * 1e3:.0f} ms")
        elif f.verdict == "skipped" or f.state != _DONE:  # an earlier step failed or took the budget
            step.dep.skipped()
            out[i] = DependencySkippedError(f"{name} not started: an earlier call in its batch ended it")
        elif f.error is None:
            step.dep.succeeded()
            out[i] = f.result
        else:
            step.dep.failed(f.error)
            out[i] = f.error
    return out
