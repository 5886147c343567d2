"""The cluster gateway's stage calls: one resend when the replica is lost, never on a stage's own error.

The handles are fakes whose calls fail the way a Serve ``DeploymentResponse`` does when its
replica was ``SIGKILL``ed mid-request (Ray's ``ActorDiedError``) or cannot be reached
(``ActorUnavailableError``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from streamrec.api_models import RecommendRequest
from streamrec.funnel.popularity import PopularityStages
from streamrec.resilience import CircuitBreakerConfig, ResilienceConfig
from streamrec.service.cluster import ReplicaLostError, call_with_retry
from streamrec.service.policy import FunnelService
from tests.unit.test_service import world  # noqa: F401 - the fixture


class FakeMethod:
    """``handle.<method>``: ``.remote(*args)`` gives an awaitable that fails ``fail`` times first."""

    def __init__(self, fail: list[BaseException]) -> None:
        self.fail = list(fail)
        self.sent: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.sent.append(args)
        err = self.fail.pop(0) if self.fail else None

        async def answer() -> Any:
            await asyncio.sleep(0)
            if err is not None:
                raise err
            return ("answer", *args)

        return answer()


class FakeHandle:
    def __init__(self, **methods: FakeMethod) -> None:
        self.__dict__.update(methods)


def test_a_lost_replica_is_resent_once_and_answers() -> None:
    for lost in (ActorDiedError(), ActorUnavailableError("replica unreachable", None)):
        m = FakeMethod([lost])
        assert asyncio.run(call_with_retry("rank", lambda m=m: m.remote(1, 2))) == ("answer", 1, 2)
        assert m.sent == [(1, 2), (1, 2)]  # the same call, sent again


def test_lost_twice_raises_replica_lost_with_rays_error_chained() -> None:
    m = FakeMethod([ActorDiedError(), ActorDiedError()])
    with pytest.raises(ReplicaLostError, match="stage 'rank': replica lost on 2 attempt") as info:
        asyncio.run(call_with_retry("rank", lambda: m.remote()))
    assert isinstance(info.value.__cause__, ActorDiedError)
    assert len(m.sent) == 2  # one retry, not more


def test_an_error_from_a_live_replica_is_not_resent() -> None:
    task_error = RayTaskError("rank", "Traceback ...", RuntimeError("ranker exploded"))
    for err in (RuntimeError("ranker exploded"), task_error, TimeoutError()):
        m = FakeMethod([err])
        with pytest.raises(type(err)):
            asyncio.run(call_with_retry("rank", lambda m=m: m.remote()))
        assert len(m.sent) == 1


def test_cluster_gateway_resends_every_stage_call() -> None:
    from streamrec.service.dispatch import ClusterStages, Deferred

    died = ActorDiedError
    gw = SimpleNamespace(
        _features=FakeHandle(user_context=FakeMethod([died()])),
        _retriever=FakeHandle(retrieve=FakeMethod([died()])),
        _ranker=FakeHandle(merge_rank=FakeMethod([died()]), rank=FakeMethod([died()])),
        _reranker=FakeHandle(rerank=FakeMethod([died()])),
    )
    call = ClusterStages(gw._features, gw._retriever, gw._ranker, gw._reranker)

    async def run() -> list[Any]:
        return [
            await call("user_context", "req"),
            await call("retrieve", "two_tower", "ctx"),
            await call("rank", "ctx", Deferred({"two_tower": "c"})),
            await call("rank", "ctx", "merged"),
            await call("rerank", "ctx", "ranked"),
        ]

    assert asyncio.run(run()) == [
        ("answer", "req"),
        ("answer", "two_tower", "ctx"),
        ("answer", "ctx", {"two_tower": "c"}),
        ("answer", "ctx", "merged"),
        ("answer", "ctx", "ranked"),
    ]
    for m in (gw._features.user_context, gw._ranker.merge_rank, gw._reranker.rerank):
        assert len(m.sent) == 2


def test_lost_replicas_do_not_open_the_funnel_breaker(world: Path) -> None:  # noqa: F811 - the fixture
    """The cluster gateway's ``call`` raising ``ReplicaLostError`` (as ``cluster_call`` does, lost twice)."""
    res = ResilienceConfig(breaker=CircuitBreakerConfig(failure_threshold=2, reset_timeout_s=60.0))

    async def call(name: str, *args: Any) -> Any:
        raise ReplicaLostError(f"stage '{name}': replica lost on 2 attempt(s) (ActorDiedError)")

    async def primary() -> tuple[Any, tuple[str, ...]]:
        return call, ("popularity",)

    service = FunnelService(primary, PopularityStages.from_data_dir(world), res, 1.0)
    for user in range(1, 6):  # more than the breaker's failure threshold (2)
        resp = asyncio.run(service(RecommendRequest(user_id=user, k=5)))
        assert resp.metadata.degradation_level == "popularity" and len(resp.items) == 5
        assert "ReplicaLostError" in (resp.metadata.degradation_reason or "")
    assert service.breaker.snapshot()["state"] == "closed"
