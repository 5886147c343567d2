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
    The pool is bounded: when every worker of the dependency's own pool is stuck in a hung call,
    new calls queue and time out (a queued call that times out never starts). On a pool shared
    with others, ``max_running`` keeps a hung dependency from holding every thread.

    Args:
        name: Name in errors, logs and status (``online_store``, ``ranker``...).
        budget_s: Default budget of one call, seconds.
        breaker: Breaker settings.
        workers: Threads of the dependency's own pool.
        pool: A pool shared with other dependencies instead of an own one (not shut down by
            :meth:`close`).
        ignore: Exceptions that say nothing of the dependency's health (they pass through
            without counting as failures, e.g. a request built by another model version).
        max_abandoned: Calls left behind (past their budget, or cut by the caller) that may
            still hold a thread; once reached, calls are refused at once
            (:class:`DependencySaturatedError`) until one returns (None: no such refusal). A
            refusal is a timeout of the breaker only when one of those calls is past its own
            budget: a healthy call cut early by its caller opens no breaker.
        max_running: Calls that may run at once in worker threads, hung or not, within their
            budget or past it (None: only the pools bound them). A call about to start past it
            does not start: it goes back to the event loop, waits there (holding no thread) for
            one of them to return, and then starts; if none returns within its budget it is
            skipped (:class:`DependencyBusyError`, no failure of its breaker), or refused as
            saturated when the calls holding the threads are abandoned ones. Below the size of
            every pool its calls share, it keeps a hung dependency from ever holding every thread,
            however many requests overlap.
        timeouts_trip: Whether a call past its budget (or refused as saturated) counts as a
            failure of the breaker. False for work that only the replica's own CPU can slow
            down: a short CPU stall must not hold the breaker open for its reset time; a hung
            call is then bounded by ``max_abandoned`` and ``max_running`` instead.
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
        max_running: int | None = None,
    ) -> None:
        self.name = name
        self._timeouts_trip = timeouts_trip
        self.budget_s = budget_s
        self.breaker = CircuitBreaker.from_config(name, breaker)
        self._ignore = ignore
        self._max_abandoned = max_abandoned
        self._max_running = max_running
        self._abandoned: list[float] = []  # per call left behind: when its budget ends
        self._running = 0
        self._freed: Future[None] | None = None
        self._lock = threading.Lock()
        self._owns_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(workers, thread_name_prefix=f"dep-{name}")
        self.counts = {"calls": 0, "ok": 0, "errors": 0, "timeouts": 0, "refused": 0, "skipped": 0}

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The pool this dependency's calls run in."""
        return self._pool

    def owns(self, pool: ThreadPoolExecutor) -> bool:
        """Whether ``pool`` is this dependency's own (its queued calls wait only on itself)."""
        return self._owns_pool and pool is self._pool

    def saturated(self) -> bool:
        """Whether the cap of abandoned calls is reached (calls are refused at once)."""
        return self._max_abandoned is not None and len(self._abandoned) >= self._max_abandoned

    def overdue(self) -> bool:
        """Whether a call left behind is past its own budget (a refusal it causes is charged)."""
        now = time.monotonic()
        with self._lock:
            return any(due <= now for due in self._abandoned)

    def ready(self) -> bool:
        """Whether a call would be admitted now (breaker closed, not saturated); claims nothing."""
        return not self.saturated() and self.breaker.state is BreakerState.CLOSED

    def admit(self) -> None:
        """Count one call and ask the breaker for it (:meth:`call`'s first step).

        A caller admitted must settle it exactly once: :meth:`succeeded`, :meth:`failed`,
        :meth:`_timed_out`, :meth:`skipped` or ``breaker.release()``.

        Raises:
            CircuitOpenError: the breaker is open.
            DependencySaturatedError: the cap of abandoned calls is reached.
        """
        self.counts["calls"] += 1
        if not self.breaker.allow():
            self.counts["refused"] += 1
            raise CircuitOpenError(self.name, self.breaker.retry_after())
        if self.saturated():
            held = len(self._abandoned)
            if self.overdue():
                self._timed_out()
            else:  # only calls cut by their caller within their budget: no verdict
                self.skipped()
            raise DependencySaturatedError(f"{self.name} still has {held} call(s) left behind")

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
        """Settle an admitted call that never ran (its batch ended first, or no thread was left to it)."""
        self.breaker.release()
        self.counts["skipped"] += 1

    def abandon(self, due: float) -> None:
        """A call left behind still holds a thread (:meth:`returned` when it ends).

        Args:
            due: When its budget ends (``time.monotonic()``; past already unless its caller cut it).
        """
        with self._lock:
            self._abandoned.append(due)

    def returned(self, due: float) -> None:
        """An abandoned call's thread is free again (``due`` as given to :meth:`abandon`)."""
        with self._lock:
            self._abandoned.remove(due)

    def has_slot(self) -> bool:
        """Whether a call could start now under ``max_running`` (claims nothing)."""
        return self._max_running is None or self._running < self._max_running

    def start(self) -> bool:
        """In a worker thread: claim a running slot for a call about to start (False: none free)."""
        with self._lock:
            if self._max_running is not None and self._running >= self._max_running:
                return False
            self._running += 1
            return True

    def stop(self) -> None:
        """In a worker thread: a call that :meth:`start` let run has returned."""
        with self._lock:
            self._running -= 1
            freed, self._freed = self._freed, None
        if freed is not None and not freed.done():
            freed.set_result(None)

    def freed(self) -> Future[None]:
        """A future done when the next running call returns (a waiting call may start then)."""
        with self._lock:
            if self._freed is None:
                self._freed = Future()
            return self._freed

    async def call(self, fn: Callable[..., T], *args: Any, budget_s: float | None = None) -> T:
        """``fn(*args)`` in the pool, awaited for at most ``budget_s`` (default: the dependency's).

        One step of :func:`call_batch`: the same admission, caps, verdicts and cancellation.

        Raises:
            CircuitOpenError: the breaker is open (``fn`` was not called).
            DependencySaturatedError: the cap of abandoned calls is reached (``fn`` not called).
            DependencyTimeoutError: no result within the budget (:class:`DependencyBusyError`:
                ``fn`` never started, every slot of ``max_running`` was held).
            Exception: whatever ``fn`` raised.
        """
        out = (await call_batch([Step(self, fn, args, budget_s)], self._pool))[0]
        if isinstance(out, BaseException):
            raise out
        result: T = out
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
        out["abandoned"] = len(self._abandoned)
        out["running"] = self._running
        return out

    def close(self) -> None:
        """Stop the own pool (threads stuck in a hung call end when it returns)."""
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)


class DependencySkippedError(DependencyTimeoutError):
    """A call in a batch never ran: an earlier call of the batch failed or used up the budget."""


class DependencyBusyError(DependencySkippedError):
    """A call never ran: every slot of its dependency's ``max_running`` stayed held past its budget."""


_PENDING, _RUNNING, _DONE, _SKIPPED, _MOVED, _BUSY = range(6)


@dataclass(eq=False)
class Step:
    """One dependency's call inside :func:`call_batch`.

    Attributes:
        dep: The dependency (its breaker, counters and caps apply to this call).
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
    #: When its budget ends, set when the loop gives up on it (a step left behind: its cap entry).
    due: float = 0.0
    verdict: str = ""
    moved_to: Step | None = None
    #: When the budget of a call sent back to the loop (``max_running``) began: it keeps it.
    origin: float | None = None

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


class _Waker:
    """Wakes the event loop when a worker-thread future is done (one callback per future)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.flag = False
        self.waiter: asyncio.Future[None] | None = None
        self.watched: dict[int, Future[Any]] = {}  # kept alive: an id is never reused meanwhile

    def _set(self) -> None:  # on the loop
        self.flag = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def poke(self, _: Any = None) -> None:
        """From any thread: wake the loop."""
        if not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                self.loop.call_soon_threadsafe(self._set)

    def watch(self, fut: Future[Any]) -> None:
        if id(fut) not in self.watched:
            self.watched[id(fut)] = fut
            fut.add_done_callback(self.poke)

    async def wait(self, timeout: float) -> None:
        """Until a watched future is done or :meth:`poke` is called (since the last wait), or ``timeout`` s."""
        if not self.flag:
            self.waiter = self.loop.create_future()
            handle = self.loop.call_later(max(timeout, 0.0), self._set)
            try:
                await self.waiter
            finally:
                handle.cancel()
                self.waiter = None
        self.flag = False


class _Batch:
    """The state one worker thread and the event loop share while a batch runs."""

    def __init__(
        self,
        steps: list[Step],
        stop_on_error: bool,
        pool: ThreadPoolExecutor,
        waker: _Waker,
        since: float | None = None,
    ) -> None:
        self.steps = steps
        self.stop_on_error = stop_on_error
        self.pool = pool
        self.waker = waker
        self.lock = threading.Lock()
        self.given_up = False
        self.submitted = time.monotonic() if since is None else since
        self.future: Future[None] = pool.submit(self.run)
        waker.watch(self.future)

    def run(self) -> None:
        """In the worker thread: the steps in order, each unless the loop gave up on it or moved it.

        A step whose dependency has every ``max_running`` slot held goes back to the loop
        (``_BUSY``); in a chain, the steps after it go with it.
        """
        prev: Any = None
        stop = False
        for step in self.steps:
            with self.lock:
                if step.state == _MOVED:
                    continue
                if self.given_up or stop:
                    step.state = _SKIPPED
                    continue
                if not step.dep.start():
                    step.state = _BUSY
                    step.result = prev  # a chained step's argument, for its new worker call
                    if step.origin is None:
                        step.origin = time.monotonic()
                    bounced = True
                else:
                    step.state = _RUNNING
                    step.started = time.monotonic()
                    bounced = False
            if bounced:
                self.waker.poke()
                if self.stop_on_error:
                    return  # the rest of the chain waits on its result
                continue
            args = (*step.args, prev) if step.chained else step.args
            try:
                prev = step.fn(*args)
                err: BaseException | None = None
            except BaseException as e:  # handed to the loop, which settles the breaker
                err = e
            step.dep.stop()
            with self.lock:
                step.state = _DONE
                step.ended = time.monotonic()
                step.result, step.error = (None, err) if err is not None else (prev, None)
                if step.abandoned:  # the loop left it behind: its thread is free again
                    step.dep.returned(step.due)
            if err is not None and self.stop_on_error:
                stop = True

    def finished(self) -> bool:
        with self.lock:
            return self.given_up or all(s.state in (_DONE, _SKIPPED, _MOVED, _BUSY) for s in self.steps)

    @staticmethod
    def _due(step: Step, start: float) -> float:
        """When ``step``'s budget ends: from its start, or from ``start`` (its turn) while pending.

        A step that waited on the loop for a ``max_running`` slot keeps the budget that began
        when it was sent back (``origin``): the wait is not given to it again once it starts.
        """
        if step.state == _RUNNING:
            begun = step.started if step.origin is None else min(step.started, step.origin)
        else:
            begun = start if step.origin is None else step.origin
        return begun + step.budget

    def deadline(self, limit: float | None) -> float | None:
        """When the loop gives up on the step running or next (None: every step has ended)."""
        with self.lock:
            start = self.submitted
            for step in self.steps:
                if step.state == _DONE:
                    start = step.ended
                    continue
                if step.state in (_SKIPPED, _MOVED, _BUSY):
                    continue
                at = self._due(step, start)
                return at if limit is None else min(at, limit)
        return None

    def stalled_at(self, after: float) -> float | None:
        """When the running step will have run ``after`` seconds with steps still waiting behind it."""
        with self.lock:
            running = [s for s in self.steps if s.state == _RUNNING]
            if not running or not any(s.state == _PENDING for s in self.steps):
                return None
            return running[0].started + after

    def _move(self, step: Step, **kw: Any) -> Step:
        step.state = _MOVED
        step.moved_to = Step(step.dep, step.fn, step.args, step.budget_s, **kw)
        return step.moved_to

    def move_pending(self) -> list[Step]:
        """Take the steps not started yet out of this batch (they go to another worker call)."""
        with self.lock:
            return [self._move(s, origin=s.origin) for s in self.steps if s.state == _PENDING]

    def take_busy(self) -> list[list[Step]]:
        """The steps sent back for want of a ``max_running`` slot, as new steps (a chain: with its rest)."""
        groups: list[list[Step]] = []
        with self.lock:
            for i, step in enumerate(self.steps):
                if step.state != _BUSY:
                    continue
                first = self._move(step, origin=step.origin)
                if step.chained:  # the previous step's result is now a plain argument
                    first.args = (*step.args, step.result)
                group = [first]
                if self.stop_on_error:
                    group += [
                        self._move(s, chained=s.chained) for s in self.steps[i + 1 :] if s.state == _PENDING
                    ]
                groups.append(group)
        return groups

    def give_up(self, cancelled: bool = False) -> None:
        """Stop the batch where it is (the loop's side): the step running is past its budget.

        That step's thread counts as held by an abandoned call until it returns; the steps not
        started are skipped, except the first when none had started and the pool is its
        dependency's own (it queued behind that dependency's own calls: a timeout).

        Args:
            cancelled: The caller was cancelled (a level timeout), whenever that came: a step
                still within its own budget then is no timeout (``cut``: left behind, its thread
                still counted until it returns, no verdict on its breaker).
        """
        self.future.cancel()  # still queued: it never starts
        now = time.monotonic()
        with self.lock:
            if self.given_up:
                return
            self.given_up = True
            started = any(step.state not in (_PENDING, _MOVED) for step in self.steps)
            start = self.submitted
            for step in self.steps:
                if step.state == _DONE:
                    start = step.ended
                elif step.state == _RUNNING:
                    step.due = self._due(step, start)
                    step.verdict = "cut" if cancelled and now < step.due else "timeout"
                    if step.verdict == "timeout":  # also when cut by ``limit_s``: past its budget now
                        step.due = min(step.due, now)
                    step.abandoned = True
                    step.dep.abandon(step.due)
                elif step.state == _PENDING:
                    own = not started and step.origin is None and step.dep.owns(self.pool)
                    if own and cancelled and now < self._due(step, start):
                        own = False  # cut while queued, within its budget
                    step.verdict = "timeout" if own else "skipped"
                    started = True  # the steps behind it are skipped


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
    leaves it behind in its thread (a timeout of that dependency, which now holds that thread
    until it returns) and skips the steps not yet started (:class:`DependencySkippedError`, not
    counted against their breakers).

    A step whose dependency has every ``max_running`` slot held when its turn comes does not
    start: it goes back to the loop, which starts it in a worker call of its own once a slot
    frees, or skips it at the end of its budget (:class:`DependencyBusyError`; refused as
    saturated if the slots are held by abandoned calls). So overlapping requests never put more
    than ``max_running`` threads into one hung dependency.

    With ``split_after_s`` (independent steps only), a step still running after that long
    loses the steps queued behind it: they move to a new worker call of the same pool, so a
    hung step costs the others one extra hop and never their answers.

    If the caller is cancelled (a level timeout of the funnel), a step still running is left
    behind (its thread counted against ``max_abandoned`` until it returns) and is a timeout of
    its dependency only if it is past its own budget by then (else no verdict: a healthy call
    cut early opens no breaker); the others are skipped.

    Args:
        steps: The calls, run in this order.
        pool: Where the batch runs (one thread; more after a split or a step sent back).
        limit_s: Bound on the whole batch from submission (None: only the steps' budgets).
        stop_on_error: Skip the steps after one that failed (a chain whose steps need the
            previous result).
        split_after_s: Move the steps waiting behind a step running this long (None: never).

    Returns:
        Per step, its result or the exception that stands for it: ``CircuitOpenError`` or
        ``DependencySaturatedError`` (refused), what ``fn`` raised, ``DependencyTimeoutError``
        (past its budget) or ``DependencySkippedError`` (never ran).
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
    waker = _Waker(asyncio.get_running_loop())
    first = _Batch([s for _, s in admitted], stop_on_error, pool, waker)
    batches = [first]
    waiting: list[list[Step]] = []  # sent back for want of a max_running slot
    limit = None if limit_s is None else first.submitted + limit_s
    split = None if stop_on_error else split_after_s
    try:
        while True:
            now = time.monotonic()
            # Which batches still run BEFORE taking the steps sent back: a step a worker sends back
            # after the scan below keeps its batch in ``live`` (the loop waits for it), never lost.
            live = [b for b in batches if not b.future.done() and not b.finished()]
            for b in batches:
                waiting += b.take_busy()
            wake = None
            for group in list(waiting):
                head = group[0]
                assert head.origin is not None
                at = head.origin + head.budget
                at = at if limit is None else min(at, limit)
                freed = head.dep.freed()  # before the check: a slot freed after it wakes us
                if head.dep.has_slot() and at > now:
                    waiting.remove(group)
                    batches.append(_Batch(group, stop_on_error, pool, waker, since=head.origin))
                    live.append(batches[-1])
                elif at <= now:
                    waiting.remove(group)
                    if head.dep.saturated():  # charged only when a call holding it is overdue
                        head.verdict = "saturated" if head.dep.overdue() else "held"
                    else:
                        head.verdict = "busy"
                    for s in group:
                        s.state = _SKIPPED
                        s.verdict = s.verdict or "skipped"
                else:
                    waker.watch(freed)
                    wake = at if wake is None else min(wake, at)
            if not live and not waiting:
                break
            for b in live:
                due = b.deadline(limit)
                if due is not None and due <= now:
                    b.give_up()
                    wake = now
                    continue
                if split is not None:
                    stall = b.stalled_at(split)
                    if stall is not None and stall <= now:
                        moved = b.move_pending()
                        if moved:
                            batches.append(_Batch(moved, False, pool, waker))
                            wake = now
                    elif stall is not None:
                        due = stall if due is None else min(due, stall)
                if due is not None:
                    wake = due if wake is None else min(wake, due)
            if wake is None:  # every live batch has ended meanwhile: settle them
                continue
            if wake > now:
                await waker.wait(wake - now)
    except asyncio.CancelledError:  # a level timeout: a step running is left behind
        for b in batches:
            b.give_up(cancelled=True)
        for _, step in admitted:
            f = step.final()
            if f.verdict == "timeout":  # past its own budget when cut
                step.dep._timed_out()
            elif f.state == _DONE and not f.verdict:
                if f.error is None:
                    step.dep.succeeded()
                else:
                    step.dep.failed(f.error)
            else:
                step.dep.skipped()
        raise
    for i, step in admitted:
        f = step.final()
        name = step.dep.name
        if f.verdict == "timeout":  # past its budget, or queued past it behind its own calls
            step.dep._timed_out()
            out[i] = DependencyTimeoutError(f"{name} gave no answer within {f.budget * 1e3:.0f} ms")
        elif f.verdict in ("saturated", "held"):  # its slots stayed held by calls left behind
            if f.verdict == "saturated":  # one of them past its budget
                step.dep._timed_out()
            else:  # all cut by their callers within their budgets: no verdict
                step.dep.skipped()
            out[i] = DependencySaturatedError(f"{name} still has call(s) left behind")
        elif f.verdict == "busy":
            step.dep.skipped()
            out[i] = DependencyBusyError(f"{name} not started: its running calls held every slot")
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
