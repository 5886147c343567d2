"""The serving funnel's stage interface.

A request flows through five stage calls. Each is a plain method on :class:`Stages`; the
*composition* decides where each runs:

* fused (``configs/serve/local.yaml``): one deployment holds a :class:`Stages` object and calls
  the methods in-process (no actor hops);
* cluster (``configs/serve/cluster.yaml``): one deployment per stage; the gateway calls the same
  methods through Ray Serve handles.

:func:`run_funnel` is the one orchestration used by both, so both return identical items for
identical requests (given the same bundle and features).

Stage calls, in order::

    ctx     = stages.user_context(request)                  # features (online store) + history
    parts   = gather(stages.retrieve(source, ctx) for source in stages.source_names)
    merged  = stages.merge(ctx, parts)                      # dedupe, agreement bonus, provenance
    ranked  = stages.rank(ctx, merged)                      # DCN-V2 over ~500 -> top 50
    final   = stages.rerank(ctx, ranked)                    # rules -> top k
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streamrec.errors import StageVersionMismatchError
from streamrec.resilience import CircuitOpenError, DeadlineExceededError

#: Extra wait past a source's deadline before the orchestration itself gives up on the call.
_OUTER_GRACE_S = 0.02

#: Why a source was left out, as the value of its ``timings['missing:<source>']`` entry.
MISS_CAUSES: dict[float, str] = {1.0: "timeout", 2.0: "error", 3.0: "circuit_open"}
_MISS_CODES = {cause: code for code, cause in MISS_CAUSES.items()}


def miss_cause(err: BaseException) -> str:
    """``timeout``, ``circuit_open`` or ``error``: why a retrieval call failed."""
    if isinstance(err, CircuitOpenError):
        return "circuit_open"
    if isinstance(err, (TimeoutError, DeadlineExceededError)):
        return "timeout"
    return "error"


def missed_sources(timings: dict[str, float]) -> dict[str, str]:
    """``source -> cause`` of the sources :func:`run_funnel` left out."""
    return {
        k.split(":", 1)[1]: MISS_CAUSES.get(v, "error")
        for k, v in timings.items()
        if k.startswith("missing:")
    }


@dataclass
class UserContext:
    """Everything the stages know about the requesting user.

    Attributes:
        user_id: Raw user id from the request.
        user_idx: Dense model index, or -1 for a user unknown to the model (cold start).
        k: Items to return.
        now: Request time, epoch seconds (UTC).
        device: Request device.
        features: Online user features (defaults applied where missing).
        history: Recent item indices, most recent first (int64, may be empty).
        exclude: Item indices never to return (request ``exclude`` + seen items).
        unknown_exclude_ids: ``exclude`` ids not in the catalogue (ignored, counted).
        degraded: Degradation levels that applied to the context (e.g. ``stale_features``).
        reasons: Why each of them applied (``metadata.degradation_reason``).
        state: Stage-private state computed once by ``user_context`` and carried to the later
            stages (e.g. the trained recommender's query vectors); opaque to compositions.
        model_version: The model version that built ``state`` (its item rows and vectors mean
            nothing to another version's stages); empty when the stages have no model.
    """

    user_id: int
    user_idx: int
    k: int
    now: float
    device: str
    features: dict[str, Any] = field(default_factory=dict)
    history: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    exclude: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    unknown_exclude_ids: int = 0
    degraded: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    state: Any = None
    model_version: str = ""


@dataclass
class Candidates:
    """Candidate items with scores and provenance (parallel arrays).

    Attributes:
        items: Item indices (int64).
        scores: Scores, higher is better (float32).
        sources: Per item, the retrieval sources that produced it.
        features: Optional per-item features a later stage needs (the merge's per-source
            normalised scores for the ranker), rows aligned with ``items``.
        ranker_inputs: The ranker's dense inputs of these items (set by the ranker: what the
            request log records), columns ``feature_names``.
        feature_names: Names of the ``ranker_inputs`` and ``scored_sample`` columns.
        ids: Raw item ids of ``items`` (set by the ranker, for the request log).
        scored_sample: A uniform sample of the ranker's input rows over *every* candidate it
            scored (columns ``feature_names``): what the skew check compares with training,
            whose rows are retrieval candidates too (the served items are a biased sample).
        degraded: Degradation levels the stage that produced these candidates fell back to
            (e.g. ``simple_ranking``). Carried with the result, not written into the context:
            in the cluster composition each stage holds its own copy of the context.
        reasons: Why each of them applied (``metadata.degradation_reason``).
    """

    items: np.ndarray
    scores: np.ndarray
    sources: list[list[str]]
    features: np.ndarray | None = None
    degraded: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    ranker_inputs: np.ndarray | None = None
    feature_names: tuple[str, ...] = ()
    ids: np.ndarray | None = None
    scored_sample: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.items.shape[0])

#: The trained recommender's retrieval sources, always served.
SOURCE_NAMES: tuple[str, ...] = ("two_tower", "cf", "affinity", "trending")
#: The co-visitation source, served when the bundle has one (bundles trained before it do not).
COVISIT = "covisit"
#: The new-arrivals source, served when the bundle was trained with it.
NEW_ARRIVALS = "new_arrivals"
#: Every retrieval source name a trained recommender can serve.
TRAINED_SOURCES: tuple[str, ...] = (*SOURCE_NAMES, COVISIT, NEW_ARRIVALS)
#: The popularity stages' single source (the fallback level, and the model-free service).
POPULARITY = "popularity"
#: Every retrieval source name any stages serve.
ALL_SOURCES: tuple[str, ...] = (*TRAINED_SOURCES, POPULARITY)


class Stages(Protocol):
    """What a composition needs from the funnel's stages (the trained recommender, popularity, no-op).

    ``blocking`` says whether the methods do blocking work (torch, FAISS, the online store):
    :class:`~streamrec.service.runner.StageRunner` then runs them in worker threads under their
    budgets; cheap in-memory stages run inline.
    """

    source_names: tuple[str, ...]
    blocking: bool

    def read_features(self, user_id: int) -> dict[str, Any]:
        """The user's online features (blocking I/O; raises when the store is unavailable)."""
        ...

    def user_context(self, request: Any, features: dict[str, Any] | None = None) -> UserContext:
        """Resolve the user, history and ``exclude`` from ``features`` (read them when None)."""
        ...

    def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """Candidates from one retrieval source."""
        ...

    def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """Union of the sources' candidates with agreement bonus and provenance."""
        ...

    def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """Score candidates with the ranker; keep the best ones (raises when the ranker fails)."""
        ...

    def rank_batch(self, ctxs: list[UserContext], candidates: list[Candidates]) -> list[Candidates]:
        """:meth:`rank` for several requests at once."""
        ...

    def simple_rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """The best candidates by merged retrieval score (the ``simple_ranking`` level)."""
        ...

    def rerank(self, ctx: UserContext, ranked: Candidates) -> Any:
        """Apply the business rules and assemble the response."""
        ...


def check_context_version(serving: str, ctx: UserContext) -> None:
    """Refuse a context built by stages of another model version.

    Item rows, vectors and user indices belong to one model version (and the popularity stages'
    own catalogue, whose contexts carry ``""``). In the cluster composition each stage is its
    own replica, so a request can meet two versions during a reload's commit or when a replica
    started on another version; reading one version's rows as another's would return wrong
    items with a 200.

    Raises:
        StageVersionMismatchError: ``ctx`` was built by another version than ``serving``.
    """
    if ctx.model_version != serving:
        raise StageVersionMismatchError(
            f"this stage serves model {serving or '(popularity)'} but the request's context was built "
            f"by model {ctx.model_version or '(popularity)'}: replicas on different versions (a reload "
            "in progress, or a replica started on another version)"
        )


async def run_funnel(
    call: Callable[..., Awaitable[Any]],
    request: Any,
    source_names: tuple[str, ...],
    source_timeout_s: float,
    *,
    rerank: bool = True,
) -> tuple[UserContext, dict[str, Candidates], Candidates, Candidates, Any, dict[str, float]]:
    """Run the funnel once through ``call(stage_name, *args)``.

    ``call`` hides where a stage runs (in-process or behind a handle). Retrieval sources run
    concurrently, each with ``source_timeout_s``; a source that times out or fails is left out
    of the union (its name recorded under ``timings['missing:<source>']``, the value coding the
    cause in :data:`MISS_CAUSES`; :func:`missed_sources` reads them back). When ``call`` has a
    ``retrieve_all(source_names, ctx)`` (the in-process runner's grouped dispatch, ADR-016),
    that one call fetches every source, each under its own deadline, and returns per source its
    candidates or the exception that stands for its miss.

    ``rerank=False`` stops after ranking (the batch precompute); the rerank output is then None.

    Returns:
        (context, per-source candidates, merged, ranked, rerank output, timings in ms).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ctx: UserContext = await call("user_context", request)
    t1 = time.perf_counter()
    timings["features"] = (t1 - t0) * 1e3

    causes: dict[str, str] = {}

    async def one(name: str) -> Candidates | None:
        try:
            # The call's own deadline (the stage runner's, which counts a miss on the source's
            # breaker) fires first; this one bounds calls that have none (a remote handle).
            result: Candidates = await asyncio.wait_for(
                call("retrieve", name, ctx), source_timeout_s + _OUTER_GRACE_S
            )
            return result
        except StageVersionMismatchError:  # not a missing source: this request cannot be served
            raise
        except Exception as err:  # a failing source degrades recall, never the request
            causes[name] = miss_cause(err)
            return None

    many = getattr(call, "retrieve_all", None)
    if many is not None:  # the caller batches the sources itself, each under its own deadline
        got: dict[str, Any] = await many(source_names, ctx)
        results = []
        for n in source_names:
            r = got[n]
            if isinstance(r, StageVersionMismatchError):
                raise r
            if isinstance(r, BaseException):
                causes[n] = miss_cause(r)
                r = None
            results.append(r)
    else:
        results = await asyncio.gather(*(one(n) for n in source_names))
    parts = {n: r for n, r in zip(source_names, results, strict=True) if r is not None}
    for n, r in zip(source_names, results, strict=True):
        if r is None:
            timings[f"missing:{n}"] = _MISS_CODES[causes.get(n, "error")]
    t2 = time.perf_counter()
    timings["retrieval"] = (t2 - t1) * 1e3
    merged: Candidates = await call("merge", ctx, parts)
    ranked: Candidates = await call("rank", ctx, merged)
    t3 = time.perf_counter()
    timings["ranking"] = (t3 - t2) * 1e3
    if not rerank:
        timings["total"] = (t3 - t0) * 1e3
        return ctx, parts, merged, ranked, None, timings
    out = await call("rerank", ctx, ranked)
    t4 = time.perf_counter()
    timings["reranking"] = (t4 - t3) * 1e3
    timings["total"] = (t4 - t0) * 1e3
    return ctx, parts, merged, ranked, out, timings
