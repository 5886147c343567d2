"""The cluster gateway's funnel ``call`` over the stage deployments' handles.

:func:`cluster_call` maps each stage call of :func:`~streamrec.funnel.stages.run_funnel` to its
deployment (``merge`` is deferred and sent with ``rank``: one hop), each resent once when its
replica is lost (:func:`~streamrec.service.cluster.call_with_retry`). :class:`ClusterStages`
holds the four handles for the gateway. The handles are duck-typed (Serve's
``DeploymentHandle``: ``handle.<method>.remote(*args)`` and
``handle.broadcast(method, *args).results_async()``), so nothing here imports Ray Serve.
"""

from __future__ import annotations

import asyncio
from typing import Any

from streamrec.funnel.stages import Candidates
from streamrec.service.cluster import call_with_retry
from streamrec.service.reload import Broadcast

#: The stage deployments, in funnel order (the keys of the status' ``stage_versions``).
STAGE_NAMES = ("features", "retriever", "ranker", "reranker")


class Deferred:
    """The merge step of the cluster ``call``: sent to the ranker together with rank (one hop)."""

    __slots__ = ("parts",)

    def __init__(self, parts: dict[str, Candidates]) -> None:
        self.parts = parts


async def cluster_call(features: Any, retriever: Any, ranker: Any, reranker: Any, name: str, *args: Any) -> Any:
    """One stage call through its deployment handle, resent once if its replica is lost.

    Every stage call is a read, so a call whose replica died mid-request is sent again (Serve
    routes it to a live replica or the replacement, within the funnel's timeout).

    Raises:
        KeyError: an unknown stage call.
        ReplicaLostError: the replica was lost on every attempt.
    """
    assert features and retriever and ranker and reranker
    if name == "user_context":
        return await call_with_retry(name, lambda: features.user_context.remote(*args))
    if name == "retrieve":
        return await call_with_retry(name, lambda: retriever.retrieve.remote(*args))
    if name == "merge":
        return Deferred(args[1])
    if name == "rank":
        ctx, merged = args
        if isinstance(merged, Deferred):
            parts = merged.parts
            return await call_with_retry(name, lambda: ranker.merge_rank.remote(ctx, parts))
        return await call_with_retry(name, lambda: ranker.rank.remote(ctx, merged))
    if name == "rerank":
        return await call_with_retry(name, lambda: reranker.rerank.remote(*args))
    raise KeyError(f"unknown stage call '{name}'")


class ClusterStages:
    """The stage deployments of the cluster composition, as the gateway's funnel ``call``.

    Args:
        features, retriever, ranker, reranker: The deployments' handles.
    """

    def __init__(self, features: Any, retriever: Any, ranker: Any, reranker: Any) -> None:
        self.handles: dict[str, Any] = dict(zip(STAGE_NAMES, (features, retriever, ranker, reranker), strict=True))
        self._source_names: tuple[str, ...] | None = None

    async def __call__(self, name: str, *args: Any) -> Any:
        """:func:`cluster_call` (the ``call`` of :func:`~streamrec.funnel.stages.run_funnel`)."""
        h = self.handles
        return await cluster_call(h["features"], h["retriever"], h["ranker"], h["reranker"], name, *args)

    async def source_names(self) -> tuple[str, ...]:
        """The retrieval sources (asked of ``Features`` once, until :meth:`forget_source_names`)."""
        if self._source_names is None:
            self._source_names = tuple(await self.handles["features"].source_names.remote())
        return self._source_names

    def forget_source_names(self) -> None:
        """Re-read the sources on the next request (after a reload)."""
        self._source_names = None

    async def describe_one(self) -> dict[str, Any]:
        """One ``Features`` replica's stages facts."""
        result: dict[str, Any] = await self.handles["features"].describe.remote()
        return result

    async def describe_all(self) -> dict[str, list[dict[str, Any]]]:
        """Every replica's ``describe()`` of every stage deployment, by deployment name."""
        every = await asyncio.gather(*(h.broadcast("describe").results_async() for h in self.handles.values()))
        return {n: list(ds) for n, ds in zip(self.handles, every, strict=True)}

    def reload_targets(self) -> list[Broadcast]:
        """The stage deployments as reload targets (every replica of each)."""
        return [Broadcast(h) for h in self.handles.values()]
