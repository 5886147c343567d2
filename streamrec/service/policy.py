"""The request's degradation policy: one chain for both compositions.

``full`` -> ``stale_features`` -> ``simple_ranking`` -> ``batch`` -> ``popularity`` -> ``cached``.

The first three are the funnel (:func:`~streamrec.funnel.stages.run_funnel`); the runner that
calls the failing dependency picks ``stale_features`` or ``simple_ranking``
(:mod:`streamrec.service.runner`). :class:`FunnelService` bounds the funnel by its level timeout
and the request budget, guards it with a breaker, and falls through the in-memory levels when it
fails, times out or finds nothing: the batch job's top-50 of the serving model version, the
in-process popularity stages, the user's last good response. A response short of ``k`` items is
filled from the later levels. ``metadata.degradation_reason`` says what failed and what served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from streamrec.api_models import RecommendedItem, RecommendRequest, RecommendResponse
from streamrec.errors import ServingError, StageVersionMismatchError
from streamrec.funnel.fallback import BatchTopN, Item, ResponseCache
from streamrec.funnel.stages import Candidates, Stages, missed_sources, run_funnel
from streamrec.monitoring.logs import REQUEST_ID, RequestLog, ServedRecord
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.resilience import (
    AllLevelsFailedError,
    CircuitBreaker,
    Deadline,
    DegradationLevel,
    FallbackChain,
    FallbackStep,
    LevelFailure,
    ResilienceConfig,
)
from streamrec.service.cluster import ReplicaLostError
from streamrec.service.guard import DependencySaturatedError, DependencyTimeoutError
from streamrec.service.runner import Call, StageRunner

log = logging.getLogger(__name__)

#: Levels whose answers are kept for the ``cached`` level.
_GOOD: frozenset[str] = frozenset({"full", "stale_features", "simple_ranking"})


class EmptyFunnelError(ServingError):
    """The funnel answered with no items (every source missed or found nothing)."""


@dataclass
class _Attempt:
    """What one request's funnel run left behind for the log (and an empty answer, if any)."""

    empty: list[RecommendResponse] = field(default_factory=list)
    ranked: Candidates | None = None


def as_response(out: Any) -> RecommendResponse:
    """The rerank stage's output as a :class:`RecommendResponse` (a dict is validated)."""
    if isinstance(out, RecommendResponse):
        return out
    return RecommendResponse.model_validate(out)


def _failure_text(f: LevelFailure) -> str:
    """``level: reason (ExceptionType)``: stable text (reasons are counted; details go to the log).

    A level that had nothing for this user (``LookupError``: no precomputed list, nothing unseen,
    nothing cached) is a miss, not a fault: ``level: nothing for this user``.
    """
    kind = f.error.split(":", 1)[0] if f.reason == "error" and f.error else ""
    if kind == "LookupError":
        return f"{f.level}: nothing for this user"
    return f"{f.level}: {f.reason}" + (f" ({kind})" if kind else "")


class FunnelService:
    """Serve one request through the whole degradation chain (module docstring).

    Args:
        primary: ``async () -> (call, source_names)`` for the current stages, looked up per
            request (a reload swaps it atomically: in-flight requests keep the call they have).
        fallback: In-process popularity stages, or None (then the funnel runs without a
            deadline: with no popularity level, slow beats failed).
        resilience: Budgets, level timeouts and breaker settings.
        source_timeout_s: Per-retrieval-source deadline.
        batch: ``() -> BatchTopN`` of the serving model version (None: no batch level).
        metrics: Where latency, levels, reasons and per-source counts are recorded (None: off).
        request_log: The sampled request / impression log (None: off).
        flagged: ``async () -> item ids never to serve`` (the catalogue's content-policy flags),
            read before each answer leaves: such items are removed at every level and the
            answer is filled up to ``k`` from the later levels.
    """

    def __init__(
        self,
        primary: Callable[[], Awaitable[tuple[Call, tuple[str, ...]]]],
        fallback: Stages | None,
        resilience: ResilienceConfig,
        source_timeout_s: float,
        batch: Callable[[], BatchTopN | None] | None = None,
        metrics: ServingMetrics | None = None,
        request_log: RequestLog | None = None,
        flagged: Callable[[], Awaitable[frozenset[int]]] | None = None,
    ) -> None:
        self._primary = primary
        self._flagged = flagged
        self._blocked: frozenset[int] = frozenset()
        self.metrics = metrics or ServingMetrics(None)
        self.request_log = request_log
        self._fallback = fallback
        self._resilience = resilience
        self._source_timeout_s = source_timeout_s
        self._batch = batch or (lambda: None)
        self._inline = StageRunner(resilience, source_timeout_s)  # popularity: non-blocking, inline
        cfg = resilience.breaker_for("funnel")
        self.breaker = CircuitBreaker(
            "funnel",
            cfg.failure_threshold,
            cfg.reset_timeout_s,
            half_open_max_calls=cfg.half_open_max_calls,
            success_threshold=cfg.success_threshold,
            # A user with no candidates, or a request met by two versions mid-reload, says nothing
            # of the funnel's health; nor does a funnel late on a starved CPU (each such request
            # costs only its level timeout, and a hung dependency has its own breaker inside):
            # only errors open this breaker, so a short CPU stall is not 10 s of batch answers.
            # Nor does a stage replica lost twice in a row (cluster): Serve is replacing it. A
            # dependency past its budget (the context build) is such a timeout too.
            ignore=(
                EmptyFunnelError,
                StageVersionMismatchError,
                TimeoutError,
                DependencyTimeoutError,
                DependencySaturatedError,
                ReplicaLostError,
            ),
        )
        #: Called with (request, response, ranked candidates) after each answer is complete
        #: (the shadow scorer); it must not block, and its failures never reach the answer.
        self.after: Callable[[RecommendRequest, RecommendResponse, Candidates | None], None] | None = None
        self.cache = ResponseCache(resilience.cached_users)
        self.served: dict[str, int] = {}
        self.fallbacks = 0
        self.backfilled = 0
        self.observe_errors = 0
        bounded = fallback is not None
        steps: list[FallbackStep[RecommendResponse]] = [
            FallbackStep(
                "full",
                self._run_primary,
                timeout_s=resilience.level_timeout_s("full") if bounded else None,
                breaker=self.breaker if bounded else None,
            ),
            FallbackStep("batch", self._run_batch, run_past_deadline=True),
        ]
        if fallback is not None:
            steps.append(FallbackStep("popularity", self._run_fallback, run_past_deadline=True))
        steps.append(FallbackStep("cached", self._run_cached, run_past_deadline=True))
        self._chain: FallbackChain[RecommendResponse] = FallbackChain(steps)
        self._fill: dict[DegradationLevel, Callable[[RecommendRequest], Awaitable[list[Item]]]] = {
            "batch": self._batch_items,
            "popularity": self._popularity_items,
            "cached": self._cached_items,
        }

    def set_fallback(self, fallback: Stages | None) -> None:
        """Replace the in-process fallback stages (after a reload)."""
        if (fallback is None) != (self._fallback is None):
            raise ValueError("a FunnelService cannot gain or lose its fallback level")
        self._fallback = fallback

    # ------------------------------------------------------------------ levels
    async def _run_primary(self, request: RecommendRequest, attempt: _Attempt) -> RecommendResponse:
        call, sources = await self._primary()
        _, parts, _, ranked, out, timings = await run_funnel(call, request, sources, self._source_timeout_s)
        misses = missed_sources(timings)
        self.metrics.sources({n: len(c) for n, c in parts.items()}, misses)
        attempt.ranked = ranked
        resp = as_response(out)
        if not resp.items:  # the later levels may have items; if none has, this is the answer
            attempt.empty.append(resp)
            raise EmptyFunnelError(
                "the funnel found no candidates" + (f" (sources missing: {', '.join(misses)})" if misses else "")
            )
        resp.metadata.timings_ms = {k: round(v, 3) for k, v in timings.items()}
        return resp

    def _drop(self, request: RecommendRequest) -> set[int]:
        return {int(i) for i in request.exclude if isinstance(i, int)} | self._blocked

    async def _batch_items(self, request: RecommendRequest) -> list[Item]:
        batch = self._batch()
        return [] if batch is None else batch.items(request.user_id, request.k, self._drop(request))

    async def _run_batch(self, request: RecommendRequest, _: Any = None) -> RecommendResponse:
        items = await self._batch_items(request)
        if not items:
            raise LookupError("no precomputed list for this user")
        batch = self._batch()
        return self._response(request, items, "batch", batch.version if batch else "batch")

    async def _run_fallback(self, request: RecommendRequest, _: Any = None) -> RecommendResponse:
        stages = self._fallback
        if stages is None:  # pragma: no cover - the step exists only with a fallback
            raise ServingError("no fallback stages configured")
        *_, out, timings = await run_funnel(
            self._inline.call_for(stages), request, stages.source_names, self._source_timeout_s
        )
        resp = as_response(out)
        if not resp.items:
            raise LookupError("popularity has nothing this user has not seen")
        resp.metadata.timings_ms = {k: round(v, 3) for k, v in timings.items()}
        return resp

    async def _popularity_items(self, request: RecommendRequest) -> list[Item]:
        if self._fallback is None:
            return []
        try:
            resp = await self._run_fallback(request)
        except LookupError:
            return []
        return [it.model_dump(exclude_none=True) for it in resp.items]

    async def _cached_items(self, request: RecommendRequest) -> list[Item]:
        return self.cache.items(request.user_id, request.k, self._drop(request))

    async def _run_cached(self, request: RecommendRequest, _: Any = None) -> RecommendResponse:
        items = await self._cached_items(request)
        if not items:
            raise LookupError("no earlier answer for this user is cached")
        return self._response(request, items, "cached", "cached")

    @staticmethod
    def _response(request: RecommendRequest, items: list[Item], level: str, version: str) -> RecommendResponse:
        return RecommendResponse.model_validate(
            {
                "user_id": request.user_id,
                "items": items,
                "metadata": {"model_version": version, "degradation_level": level, "request_id": ""},
            }
        )

    # ------------------------------------------------------------------ the request
    async def __call__(self, request: RecommendRequest, variant: str | None = None) -> RecommendResponse:
        """The response for ``request``: ``k`` items whenever any level can supply them.

        ``variant`` is the experiment variant the request was routed to (named in the metadata,
        the metrics and the request log).

        Raises:
            ServingError: every level failed (no model, no batch list, no popularity, nothing
                cached for this user).
        """
        t0 = time.perf_counter()
        deadline = (
            Deadline.after_ms(self._resilience.request_budget_ms) if self._fallback is not None else None
        )
        attempt = _Attempt()
        try:
            result = await self._chain.arun(request, attempt, deadline=deadline)
        except AllLevelsFailedError as err:
            if attempt.empty:  # the funnel worked and nothing anywhere has items for this user
                self.served["full"] = self.served.get("full", 0) + 1
                attempt.empty[0].metadata.experiment_variant = variant
                self._observe(request, attempt.empty[0], attempt, t0)
                return attempt.empty[0]
            raise ServingError(str(err)) from err
        resp = result.value
        reasons = [_failure_text(f) for f in result.failures]
        if resp.metadata.degradation_reason:
            reasons.insert(0, resp.metadata.degradation_reason)
        removed = 0
        if self._flagged is not None:  # read as late as possible: a flag acknowledged by now holds
            self._blocked = await self._flagged()
            if self._blocked:
                kept = [it for it in resp.items if it.item_id not in self._blocked]
                removed = len(resp.items) - len(kept)
                if removed:
                    reasons.append(f"{removed} flagged item(s) removed")
                    resp.items = kept
        if result.failures:
            self.fallbacks += 1
            f = result.failures[0]
            log.warning("primary funnel did not serve (%s: %s); served %s", f.reason, f.error, result.level)
            resp.metadata.timings_ms[f"failed:{f.level}"] = round(f.elapsed_ms, 3)
        if len(resp.items) < request.k:
            reasons += await self._backfill(request, resp, result.level, refill=removed)
        level = resp.metadata.degradation_level
        if reasons:
            resp.metadata.degradation_reason = "; ".join(reasons)
        if level in _GOOD:
            self.cache.put(request.user_id, [it.model_dump(exclude_none=True) for it in resp.items])
        self.served[level] = self.served.get(level, 0) + 1
        resp.metadata.experiment_variant = variant
        self._observe(request, resp, attempt, t0)
        return resp

    def _observe(self, request: RecommendRequest, resp: RecommendResponse, attempt: _Attempt, t0: float) -> None:
        """:meth:`_record` and :attr:`after`, never failing the answer they describe."""
        try:
            self._record(request, resp, attempt, t0)
            if self.after is not None:
                self.after(request, resp, attempt.ranked)
        except Exception as err:
            self.observe_errors += 1
            if self.observe_errors == 1 or self.observe_errors % 1000 == 0:
                log.warning("metrics/request log failed %d time(s): %s: %s", self.observe_errors, type(err).__name__, err)

    def _record(self, request: RecommendRequest, resp: RecommendResponse, attempt: _Attempt, t0: float) -> None:
        """Record the response's metrics and, when sampled, queue it for the request log."""
        latency_ms = (time.perf_counter() - t0) * 1e3
        md = resp.metadata
        self.metrics.request(
            md.degradation_level, md.degradation_reason, latency_ms, md.timings_ms, md.experiment_variant
        )
        log_ = self.request_log
        if log_ is None or not log_.sampled():
            return
        ranked = attempt.ranked if md.degradation_level in _GOOD else None
        features: dict[int, Any] = {}
        names: tuple[str, ...] = ()
        if ranked is not None and ranked.ranker_inputs is not None and ranked.ids is not None and ranked.feature_names:
            served = {it.item_id for it in resp.items}
            names = ranked.feature_names
            features = {int(i): row for i, row in zip(ranked.ids, ranked.ranker_inputs, strict=True) if int(i) in served}
        log_.record(
            ServedRecord(
                request_id=REQUEST_ID.get(),
                ts=time.time(),
                user_id=request.user_id,
                variant=md.experiment_variant,
                model_version=md.model_version,
                level=md.degradation_level,
                reason=md.degradation_reason,
                latency_ms=latency_ms,
                k=request.k,
                items=[(it.item_id, it.score, it.sources) for it in resp.items],
                feature_names=names,
                features=features,
                scored=ranked.scored_sample if ranked is not None and names else None,
            )
        )

    async def _backfill(
        self, request: RecommendRequest, resp: RecommendResponse, served: DegradationLevel, refill: int = 0
    ) -> list[str]:
        """Fill ``resp`` up to ``k`` items from the levels after ``served``; what was added.

        ``refill``: items were removed from the answer after ``served`` produced it (flagged
        since): ``served`` itself may then refill, asked for that many more.
        """
        have = {it.item_id for it in resp.items} | self._drop(request)
        notes: list[str] = []
        ask = request if not refill else request.model_copy(update={"k": request.k + refill})
        for level, fetch in self._fill.items():
            if len(resp.items) >= request.k:
                break
            levels = self._chain.levels
            if level not in levels or levels.index(level) < levels.index(served):
                continue
            if level == served and not refill:
                continue
            try:
                extra = await fetch(ask)
            except Exception as err:  # a filler level failing only leaves the answer short
                log.debug("backfill from %s failed: %s", level, err)
                continue
            added = 0
            for it in extra:
                if len(resp.items) >= request.k:
                    break
                if it["item_id"] in have:
                    continue
                have.add(it["item_id"])
                resp.items.append(RecommendedItem.model_validate(it))
                added += 1
            if added:
                self.backfilled += 1
                notes.append(f"{added} item(s) backfilled from {level}")
        return notes

    def snapshot(self) -> dict[str, Any]:
        """Responses per level, fallbacks, backfills, the funnel breaker and the cache size."""
        return {
            "served_by_level": dict(self.served),
            "fallbacks": self.fallbacks,
            "backfilled": self.backfilled,
            "breaker": self.breaker.snapshot(),
            "cached_users": len(self.cache),
        }
