"""A blocking dependency called off the event loop, under a time budget and a circuit breaker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from streamrec.resilience import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, DeadlineExceededError

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
        self.counts = {"calls": 0, "ok": 0, "errors": 0, "timeouts": 0, "refused": 0}

    async def call(self, fn: Callable[..., T], *args: Any, budget_s: float | None = None) -> T:
        """``fn(*args)`` in the pool, awaited for at most ``budget_s`` (default: the dependency's).

        Raises:
            CircuitOpenError: the breaker is open (``fn`` was not called).
            DependencyTimeoutError: no result within the budget.
            Exception: whatever ``fn`` raised.
        """
        budget = self.budget_s if budget_s is None else budget_s
        self.counts["calls"] += 1
        if not self.breaker.allow():
            self.counts["refused"] += 1
            raise CircuitOpenError(self.name, self.breaker.retry_after())
        if self._max_abandoned is not None and self._abandoned >= self._max_abandoned:
            self._timed_out()
            raise DependencySaturatedError(f"{self.name} still has {self._abandoned} call(s) past their budget")
        loop = asyncio.get_running_loop()
        cfut = self._pool.submit(fn, *args)
        fut = asyncio.wrap_future(cfut, loop=loop)
        try:
            result = await asyncio.wait_for(fut, max(budget, 0.0))
        except TimeoutError:
            self._timed_out()
            if not cfut.done():  # still running in its thread: it holds that thread until it returns
                with self._lock:
                    self._abandoned += 1
                cfut.add_done_callback(self._returned)
            raise DependencyTimeoutError(f"{self.name} gave no answer within {budget * 1e3:.0f} ms") from None
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except self._ignore:
            self.breaker.release()
            raise
        except Exception:
            self.breaker.record_failure()
            self.counts["errors"] += 1
            raise
        self.breaker.record_success()
        self.counts["ok"] += 1
        return result

    def _timed_out(self) -> None:
        self.counts["timeouts"] += 1
        if self._timeouts_trip:
            self.breaker.record_failure()
        else:
            self.breaker.release()

    def _returned(self, _: Any) -> None:
        with self._lock:
            self._abandoned -= 1

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state and the call counters (for ``/readyz`` and the admin status)."""
        out = {**self.breaker.snapshot(), "budget_ms": round(self.budget_s * 1e3, 3), **self.counts}
        out["abandoned"] = self._abandoned
        return out

    def close(self) -> None:
        """Stop the own pool (threads stuck in a hung call end when it returns)."""
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
