"""No-op stages: the benchmark floor of a composition (same topology, stages that do nothing).

Every stage returns immediately; ``rerank`` returns a constant response of ``k`` placeholder items
(so the response size matches a real one). Serving these through a composition measures what
the composition itself costs: HTTP, the gateway, the actor hops and serialisation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.funnel.stages import Candidates, UserContext

_EMPTY_I = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float32)


class NoopStages:
    """Stages that do nothing (see the module docstring).

    Args:
        source_names: Retrieval sources to pretend to have (match the real stages' topology).
    """

    model_version = "noop"
    blocking = False

    def __init__(self, source_names: tuple[str, ...] = ("popularity",)) -> None:
        self.source_names = tuple(source_names)
        self._responses: dict[int, dict[str, Any]] = {}

    def describe(self) -> dict[str, Any]:
        """Facts for health endpoints."""
        return {"stages": "NoopStages", "source_names": list(self.source_names)}

    def read_features(self, user_id: int) -> dict[str, Any]:
        """No online features: these stages use none."""
        return {}

    def user_context(self, request: RecommendRequest, features: dict[str, Any] | None = None) -> UserContext:
        """A context with nothing looked up."""
        return UserContext(
            user_id=request.user_id, user_idx=-1, k=request.k, now=time.time(), device=request.context.device
        )

    def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """No candidates."""
        return Candidates(_EMPTY_I, _EMPTY_F, [])

    def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """No candidates."""
        return Candidates(_EMPTY_I, _EMPTY_F, [])

    def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """The input, unchanged."""
        return candidates

    def rank_batch(self, ctxs: list[UserContext], candidates: list[Candidates]) -> list[Candidates]:
        """:meth:`rank` per request."""
        return [self.rank(c, m) for c, m in zip(ctxs, candidates, strict=True)]

    def simple_rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """:meth:`rank` (already a ranking by retrieval score)."""
        return self.rank(ctx, candidates)

    def rerank(self, ctx: UserContext, ranked: Candidates) -> RecommendResponse:
        """A constant response of ``k`` placeholder items."""
        body = self._responses.get(ctx.k)
        if body is None:
            body = {
                "user_id": 0,
                "items": [
                    {"item_id": i, "score": 1.0 / (i + 1), "sources": [self.source_names[0]], "title": None}
                    for i in range(ctx.k)
                ],
                "metadata": {"model_version": "noop", "degradation_level": "full", "request_id": ""},
            }
            self._responses[ctx.k] = body
        resp = RecommendResponse.model_validate(body)
        resp.user_id = ctx.user_id
        return resp
