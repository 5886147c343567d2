"""Stage calls off the event loop, each blocking dependency under its budget and breaker.

A :class:`StageRunner` is what a replica holding stages runs them through: the fused gateway for
every stage, and each cluster stage deployment for its own. It implements the inner levels of
the degradation chain where the failing dependency lives:

* ``stale_features``: the online-store read failed, timed out or its breaker is open -> the
  user's last known features in this replica, else the batch feature snapshot loaded with the
  model, else defaults (the cold-start path);
* ``simple_ranking``: the ranker failed, timed out or its breaker is open -> the merged
  candidates ordered by their retrieval score;
* a retrieval source that fails or times out is left out of the union (its breaker opens when
  it keeps failing, so a dead source costs nothing).

Stages whose methods are cheap in-memory work (``blocking = False``: popularity, no-op) run
inline; the trained recommender's (torch, FAISS, the online store) run in worker threads, so
the event loop keeps answering other requests and ``/healthz`` whatever a dependency does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from cachetools import LRUCache

from streamrec.errors import InjectedFaultError, StageVersionMismatchError
from streamrec.funnel.stages import Candidates, Stages, UserContext
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.resilience import CircuitOpenError, ResilienceConfig
from streamrec.service.args import FaultInjection
from streamrec.service.guard import (
    Dependency,
    DependencyBusyError,
    DependencySkippedError,
    DependencyTimeoutError,
    Step,
    call_batch,
)

log = logging.getLogger(__name__)

#: ``call(stage_name, *args)``: how :func:`~streamrec.funnel.stages.run_funnel` reaches a stage.
Call = Callable[..., Awaitable[Any]]

#: How blocking stage calls reach worker threads (ADR-016): ``grouped`` (one worker call for the
#: online read and the context built from it, one for the in-memory sources, one per solo source,
#: one for the ranker) or ``hops`` (one worker call per dependency call).
Dispatch = Literal["grouped", "hops"]


#: A source running this share of its budget hands the sources waiting behind it in its worker
#: call to another thread (:func:`~streamrec.service.guard.call_batch`'s ``split_after_s``).
_SPLIT_AFTER = 0.25


def _why(err: BaseException) -> str:
    """A short, stable description (no varying numbers: reasons are counted and grouped)."""
    if isinstance(err, CircuitOpenError):
        return "circuit open"
    if isinstance(err, DependencyTimeoutError):
        return "timeout"
    return f"error ({type(err).__name__})"


def _outcome(err: BaseException) -> str:
    """The ``outcome`` tag of a failed dependency call."""
    if isinstance(err, CircuitOpenError):
        return "circuit_open"
    return "timeout" if isinstance(err, DependencyTimeoutError) else "error"


class StageRunner:
    """Runs one replica's stage calls with the inner degradation levels (module docstring).

    Args:
        resilience: Stage budgets and breaker settings.
        source_timeout_s: Budget of each retrieval source.
        source_threads: Worker threads for retrieval (at least 2; each source runs in at most
            all but one of them at once, so a hung source never holds them all; context building
            has its own thread).
        faults: Fault injection (off by default).
        known_users: Users whose last good features are kept for ``stale_features``.
        metrics: Where online-store reads are timed (None: off).
        dispatch: ``grouped`` (default) or ``hops`` (:data:`Dispatch`); every dependency keeps
            its own budget and breaker either way.
    """

    def __init__(
        self,
        resilience: ResilienceConfig,
        source_timeout_s: float,
        source_threads: int = 1,
        faults: FaultInjection | None = None,
        known_users: int = 50_000,
        metrics: ServingMetrics | None = None,
        dispatch: Dispatch = "grouped",
    ) -> None:
        self.metrics = metrics or ServingMetrics(None)
        self._grouped = dispatch == "grouped"
        self._resilience = resilience
        self._source_timeout_s = source_timeout_s
        self._faults = faults or FaultInjection()
        # Context building (the user tower) and retrieval in separate pools: a hung source holds
        # retrieval threads (never all of them), never the thread every request needs for its context.
        self._retrieval_threads = max(2, source_threads)
        self._retrieval = ThreadPoolExecutor(self._retrieval_threads, thread_name_prefix="retrieval")
        # More threads than the two every runner has: the operator wants a request's sources to
        # overlap (args.source_threads), so each gets a worker call of its own.
        self._group_sources = self._grouped and source_threads <= 2
        mismatch = (StageVersionMismatchError,)  # a reload in progress, not a sick dependency
        # Context building is the replica's own CPU work: a stall must not open its breaker (only
        # errors do); a hung call holds one thread, and the next calls are refused at once. One
        # build runs at a time (its own pool has one thread), also when grouped dispatch runs it
        # on the online store's pool of 2: a hung build never holds both of those threads.
        self.context = Dependency(
            "context",
            resilience.context_ms / 1e3,
            resilience.breaker_for("context"),
            1,
            ignore=mismatch,
            max_abandoned=1,
            timeouts_trip=False,
            max_running=1,
        )
        self.online = Dependency(
            "online_store",
            resilience.online_store_ms / 1e3,
            resilience.breaker_for("online_store"),
            workers=2,
        )
        # One abandoned call: a hung ranker holds its one thread, the next calls are refused at once
        # (simple_ranking), and charged once that call is past its budget, also when the level
        # timeout cut it first (a slow pre-rank can start the ranker too late for its own deadline).
        self.ranker = Dependency(
            "ranker",
            resilience.ranker_ms / 1e3,
            resilience.breaker_for("ranker"),
            1,
            ignore=mismatch,
            max_abandoned=1,
        )
        self._sources: dict[str, Dependency] = {}
        self._last: LRUCache[int, dict[str, Any]] = LRUCache(maxsize=max(1, known_users))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    async def _compute_call(self, stages: Stages, fn: Callable[..., Any], *args: Any) -> Any:
        if not getattr(stages, "blocking", False):
            return fn(*args)
        return await self.context.call(fn, *args)

    def _source(self, name: str) -> Dependency:
        dep = self._sources.get(name)
        if dep is None:
            cfg = self._resilience.breaker_for(f"source:{name}")
            dep = Dependency(
                f"source:{name}",
                self._source_timeout_s,
                cfg,
                pool=self._retrieval,
                ignore=(StageVersionMismatchError,),
                max_abandoned=1,  # one call left behind: the next are refused at once
                # At most all but one retrieval thread, however many requests overlap: a hung
                # source never holds them all (the calls over it wait on the loop, or are skipped).
                max_running=self._retrieval_threads - 1,
            )
            dep = self._sources.setdefault(name, dep)
        return dep

    # ------------------------------------------------------------------ stages
    async def user_context(self, stages: Stages, request: Any) -> UserContext:
        """Online features (guarded; stale on failure), then the context built off the loop.

        Grouped dispatch reads the features and builds the context in one worker call while both
        dependencies are healthy (each step still under its own budget and breaker); otherwise,
        and after a failed read, one call each.
        """
        features: dict[str, Any] | None = None
        reason = ""
        user_id = int(request.user_id)
        if getattr(stages, "blocking", False):
            if self._grouped and self.online.ready() and self.context.ready():
                t0 = time.monotonic()
                read = Step(self.online, stages.read_features, (user_id,))
                build = Step(self.context, stages.user_context, (request,), chained=True)
                got, built = await call_batch([read, build], self.online.pool, stop_on_error=True)
                if isinstance(got, BaseException):
                    if isinstance(got, StageVersionMismatchError):
                        raise got
                    features, reason = self._stale(stages, user_id, got, (time.monotonic() - t0) * 1e3)
                else:
                    features = got
                    self.metrics.online_read((read.ended - t0) * 1e3, "ok")
                    with self._lock:
                        self._last[user_id] = features
                    # A build skipped only because the read's call ended: build it on its own. A
                    # build refused, past its budget or left without a thread: the funnel degrades.
                    if not isinstance(built, DependencySkippedError) or isinstance(
                        built, DependencyBusyError
                    ):
                        if isinstance(built, BaseException):
                            raise built
                        done: UserContext = built
                        return done
            else:
                t0 = time.monotonic()
                try:
                    features = await self.online.call(stages.read_features, user_id)
                except StageVersionMismatchError:
                    raise
                except Exception as err:
                    features, reason = self._stale(stages, user_id, err, (time.monotonic() - t0) * 1e3)
                else:
                    self.metrics.online_read((time.monotonic() - t0) * 1e3, "ok")
                    with self._lock:
                        self._last[user_id] = features
        ctx: UserContext = await self._compute_call(stages, stages.user_context, request, features)
        if reason:
            ctx.degraded.append("stale_features")
            ctx.reasons.append(reason)
        return ctx

    def _stale(
        self, stages: Stages, user_id: int, err: BaseException, ms: float
    ) -> tuple[dict[str, Any], str]:
        """The ``stale_features`` of ``user_id`` after a failed online read, and why."""
        self.metrics.online_read(ms, _outcome(err))
        with self._lock:
            known = self._last.get(user_id)
        served = "the user's last known features"
        if known is None:
            snapshot = getattr(stages, "snapshot_features", None)
            known = snapshot(user_id) if snapshot is not None else None
            served = "the user's batch feature snapshot"
        if known is None:
            served = "default features (the user is in no snapshot)"
        reason = f"online_store: {_why(err)}; served {served}"
        log.debug("stale features for user %s: %s (%s)", user_id, reason, err)
        return (dict(known) if known is not None else {}), reason

    async def retrieve(self, stages: Stages, source: str, ctx: UserContext) -> Candidates:
        """One source's candidates (raises when it fails or misses its budget)."""
        if not getattr(stages, "blocking", False):
            return stages.retrieve(source, ctx)
        result: Candidates = await self._source(source).call(self._source_fn(stages, source), source, ctx)
        return result

    async def retrieve_all(
        self, stages: Stages, names: tuple[str, ...], ctx: UserContext
    ) -> dict[str, Candidates | BaseException]:
        """Every source's candidates, or the exception that stands for a source that missed.

        Grouped dispatch (with at most the 2 default source threads): the sources named in
        ``stages.solo_sources`` (long GIL-free work, an ANN search) each in a worker call of its
        own; the others together in one worker call, one after the other, each under its own
        breaker and cut at the source budget. A source still running after a quarter of its
        budget hands the sources behind it to another worker call, so a hung source costs the
        request its budget and the others still answer; it never runs in every retrieval thread
        at once, however many requests overlap (its ``max_running``). Otherwise
        (``hops``, or more source threads configured to overlap them): one worker call per
        source.
        """
        if not getattr(stages, "blocking", False) or not self._group_sources:
            results = await asyncio.gather(
                *(self.retrieve(stages, n, ctx) for n in names), return_exceptions=True
            )
            return dict(zip(names, results, strict=True))
        solo = set(getattr(stages, "solo_sources", ()))
        batches = [[n] for n in names if n in solo]
        rest = [n for n in names if n not in solo]
        if rest:
            batches.append(rest)
        budget = self._source_timeout_s

        def one(batch: list[str]) -> Awaitable[list[Any]]:
            steps = [Step(self._source(n), self._source_fn(stages, n), (n, ctx), budget) for n in batch]
            return call_batch(steps, self._retrieval, limit_s=budget, split_after_s=budget * _SPLIT_AFTER)

        if len(batches) == 1:
            outs = [await one(batches[0])]
        else:
            outs = await asyncio.gather(*(one(b) for b in batches))
        return {
            n: r for batch, out in zip(batches, outs, strict=True) for n, r in zip(batch, out, strict=True)
        }

    def _source_fn(self, stages: Stages, source: str) -> Callable[[str, UserContext], Candidates]:
        delay_ms = self._faults.source_delay_ms.get(source, 0.0)
        if delay_ms <= 0:
            return stages.retrieve

        def slow(name: str, ctx: UserContext) -> Candidates:
            time.sleep(delay_ms / 1e3)
            return stages.retrieve(name, ctx)

        return slow

    def merge(self, stages: Stages, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """The merge stage (cheap numpy: runs inline)."""
        return stages.merge(ctx, parts)

    async def rank(self, stages: Stages, ctx: UserContext, merged: Candidates) -> Candidates:
        """The ranker (guarded); the merged retrieval order when it fails."""
        return (await self.rank_batch(stages, [ctx], [merged]))[0]

    async def rank_batch(
        self, stages: Stages, ctxs: list[UserContext], merged: list[Candidates]
    ) -> list[Candidates]:
        """:meth:`rank` for several requests with one ranker call (the cluster's ``@serve.batch``)."""
        if not getattr(stages, "blocking", False):
            return [stages.rank(c, m) for c, m in zip(ctxs, merged, strict=True)]
        try:
            ranked: list[Candidates] = await self.ranker.call(self._ranker_fn(stages), ctxs, merged)
            return ranked
        except StageVersionMismatchError:
            raise
        except (CircuitOpenError, DependencyTimeoutError) as err:  # the ranker is down or slow
            return self._simple(stages, ctxs, merged, err)
        except Exception as err:
            if len(ctxs) == 1:
                return self._simple(stages, ctxs, merged, err)
            # One request's inputs may have failed the batch: each on its own, so only it degrades.
            out: list[Candidates] = []
            for c, m in zip(ctxs, merged, strict=True):
                try:
                    out += await self.ranker.call(self._ranker_fn(stages), [c], [m])
                except StageVersionMismatchError:
                    raise
                except Exception as one:
                    out += self._simple(stages, [c], [m], one)
            return out

    @staticmethod
    def _simple(
        stages: Stages, ctxs: list[UserContext], merged: list[Candidates], err: BaseException
    ) -> list[Candidates]:
        """The ``simple_ranking`` order of each request, saying why."""
        reason = f"ranker: {_why(err)}; ordered by merged retrieval score"
        log.debug("simple ranking: %s (%s)", reason, err)
        out = []
        for c, m in zip(ctxs, merged, strict=True):
            simple = stages.simple_rank(c, m)
            simple.reasons.append(reason)
            out.append(simple)
        return out

    def _ranker_fn(self, stages: Stages) -> Callable[[list[UserContext], list[Candidates]], list[Candidates]]:
        faults = self._faults
        if not faults.active:
            return stages.rank_batch

        def faulty(ctxs: list[UserContext], merged: list[Candidates]) -> list[Candidates]:
            if faults.ranker_delay_ms > 0:
                time.sleep(faults.ranker_delay_ms / 1e3)
            if faults.ranker_error:
                raise InjectedFaultError("injected ranker fault (faults.ranker_error in the Serve config)")
            return stages.rank_batch(ctxs, merged)

        return faulty

    def rerank(self, stages: Stages, ctx: UserContext, ranked: Candidates) -> Any:
        """Business rules and the response (pure numpy/Python on at most a few hundred items)."""
        return stages.rerank(ctx, ranked)

    def call_for(self, stages: Stages) -> Call:
        """A ``call`` for :func:`~streamrec.funnel.stages.run_funnel` over in-process ``stages``."""
        return _LocalCall(self, stages)

    def snapshot(self) -> dict[str, Any]:
        """Every breaker this runner holds, by dependency name."""
        deps = [self.online, self.context, self.ranker, *self._sources.values()]
        out = {d.name: d.snapshot() for d in deps}
        if self._faults.active:
            out["faults"] = self._faults.model_dump()
        return out

    def close(self) -> None:
        """Stop the worker pools."""
        self._retrieval.shutdown(wait=False, cancel_futures=True)
        for d in (self.online, self.context, self.ranker, *self._sources.values()):
            d.close()


class _LocalCall:
    """``call(stage_name, *args)`` over in-process stages, with ``retrieve_all`` for grouped retrieval."""

    def __init__(self, runner: StageRunner, stages: Stages) -> None:
        self._runner = runner
        self._stages = stages
        #: Read by :func:`~streamrec.funnel.stages.run_funnel`: every source in one call.
        self.retrieve_all = (
            self._all if runner._group_sources and getattr(stages, "blocking", False) else None
        )

    async def _all(self, names: tuple[str, ...], ctx: UserContext) -> dict[str, Candidates | BaseException]:
        return await self._runner.retrieve_all(self._stages, names, ctx)

    async def __call__(self, name: str, *args: Any) -> Any:
        runner, stages = self._runner, self._stages
        if name == "user_context":
            return await runner.user_context(stages, *args)
        if name == "retrieve":
            return await runner.retrieve(stages, *args)
        if name == "merge":
            return runner.merge(stages, *args)
        if name == "rank":
            return await runner.rank(stages, *args)
        if name == "rerank":
            return runner.rerank(stages, *args)
        raise KeyError(f"unknown stage call '{name}'")


def local_primary(
    holder: Callable[[], Stages], runner: StageRunner
) -> Callable[[], Awaitable[tuple[Call, tuple[str, ...]]]]:
    """A ``primary`` for :class:`~streamrec.service.policy.FunnelService` over in-process stages.

    ``holder()`` is read once per request, so swapping what it returns is an atomic reload.
    """

    async def primary() -> tuple[Call, tuple[str, ...]]:
        stages = holder()
        return runner.call_for(stages), tuple(stages.source_names)

    return primary
