"""The serving funnel run in-process on offline features: offline evaluation and the batch precompute.

The same stage objects (:class:`~streamrec.funnel.recommender.RecommenderStages`) go through the
same orchestration (:func:`~streamrec.funnel.stages.run_funnel`) as in both Serve compositions;
only the user features differ: the offline store as of a cutoff instead of the online store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from streamrec.api_models import RecommendRequest, RequestContext
from streamrec.funnel.stages import Candidates, Stages, UserContext, run_funnel

#: In-process calls cannot be cut; the orchestration's per-source deadline never fires.
_NO_DEADLINE_S = 3600.0


@dataclass
class OfflineAnswer:
    """One user's pass through the funnel.

    Attributes:
        user_id: The user.
        context: The user's context as the stages built it.
        parts: Each retrieval source's candidates.
        ranked: The ranker's best candidates (at least ``k``), before the re-ranking rules.
        served: Item rows the re-ranker served, best first (``None`` when not re-ranked).
        served_scores: Their scores.
    """

    user_id: int
    context: UserContext
    parts: dict[str, Candidates]
    ranked: Candidates
    served: np.ndarray | None
    served_scores: np.ndarray | None

    def unranked_top(self, k: int) -> Candidates:
        """The ranker's order minus the user's excluded and seen items, cut to ``k`` (no rules)."""
        ctx, ranked = self.context, self.ranked
        keep = np.flatnonzero(~np.isin(ranked.items, np.concatenate([ctx.exclude, ctx.history])))[:k]
        return Candidates(ranked.items[keep], ranked.scores[keep], [ranked.sources[i] for i in keep])


def inline_call(stages: Stages, features_of: Callable[[int], dict[str, Any]]) -> Callable[..., Awaitable[Any]]:
    """A ``call`` for :func:`run_funnel` that runs each stage in-process, features from ``features_of``."""

    async def call(name: str, *args: Any) -> Any:
        if name == "user_context":
            (request,) = args
            return stages.user_context(request, features_of(request.user_id))
        return getattr(stages, name)(*args)

    return call


def recommend_offline(
    stages: Any,
    user_ids: Sequence[int] | np.ndarray,
    features_of: Callable[[int], dict[str, Any]],
    *,
    k: int,
    now: float,
    rerank: bool = True,
) -> list[OfflineAnswer]:
    """Run every user through the funnel as serving would, at time ``now`` (epoch seconds).

    Args:
        stages: The trained recommender's stages (item rows are theirs).
        user_ids: Raw user ids.
        features_of: The user's features as of the cutoff (defaults applied), ``{}`` when unknown.
        k: Items per user.
        now: Request time: recency, freshness and the hour context are computed from it.
        rerank: Apply the re-ranking rules (``served``); without, only the ranked candidates.
    """
    call = inline_call(stages, features_of)
    when = RequestContext(timestamp=datetime.fromtimestamp(now, UTC))
    names = tuple(stages.source_names)
    table = stages.funnel.table

    async def run_all() -> list[OfflineAnswer]:
        out: list[OfflineAnswer] = []
        for user_id in user_ids:
            request = RecommendRequest(user_id=int(user_id), k=k, context=when)
            ctx, parts, _, ranked, resp, _ = await run_funnel(call, request, names, _NO_DEADLINE_S, rerank=rerank)
            served = scores = None
            if resp is not None:
                served = table.index_of(np.asarray([it.item_id for it in resp.items], dtype=np.int64))
                scores = np.asarray([it.score for it in resp.items], dtype=np.float32)
            out.append(OfflineAnswer(int(user_id), ctx, parts, ranked, served, scores))
        return out

    return asyncio.run(run_all())
