"""Fault-suite fixtures: a trained world served by the fused composition, with real dependencies.

One trained model (a small synthetic world, trained as an operator would, in its own process)
is served by ``configs/serve/local.yaml`` as several one-replica applications on one Serve
instance: over the SQLite online store (``/sqlite``), over a durable private Redis (``/redis``),
and with each fault-injection switch on (``/ranker-error``, ``/ranker-slow``). Faults are real:
another process holds SQLite's exclusive lock, Redis is ``SIGSTOP``ped or ``SIGKILL``ed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import READ_KEY, auth_args, metrics_port, ray_session  # noqa: F401 - fixtures
from tests.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]

APPS: dict[str, dict[str, Any]] = {
    "sqlite": {},
    "redis": {},  # env: the durable Redis
    "ranker-error": {"faults": {"ranker_error": True}},
    "ranker-slow": {"faults": {"ranker_delay_ms": 400}},
    "source-slow": {"faults": {"source_delay_ms": {"trending": 400}}},  # one retrieval source hung
}


def _streamrec(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "streamrec", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@dataclass
class FaultWorld:
    """The trained data directory and the durable Redis holding a copy of its online store."""

    data_dir: Path
    redis: RedisServer

    @property
    def redis_env(self) -> dict[str, str]:
        """What a process needs to read the Redis online store."""
        return {"STREAMREC_ONLINE_STORE": "redis", "STREAMREC_REDIS_URL": f"{self.redis.url}/0"}


@pytest.fixture(scope="session")
def fault_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultWorld]:
    """A small synthetic world, trained; online features in SQLite and in a durable Redis."""
    root = tmp_path_factory.mktemp("faults")
    d = root / "data"
    _streamrec("data", "synth", "--users", "300", "--items", "400", "--days", "14", "--seed", "5",
               "--data-dir", str(d))  # fmt: skip
    cfg = root / "train.yaml"
    cfg.write_text(
        "two_tower: {epochs: 2, embedding_dim: 32}\nranker: {epochs: 2}\nsplit: {min_train_events: 50}\n"
    )
    report = json.loads(_streamrec("train", "--data-dir", str(d), "--config", str(cfg), "--local", "--json"))
    assert report["registered_version"] == 1, report
    try:
        redis = RedisServer(root, durable=True)
    except FileNotFoundError as err:
        if os.environ.get("CI"):  # .ci/run installs it: a missing one is a broken CI, not a skip
            pytest.fail(str(err))
        pytest.skip(str(err))
    redis.start()
    try:
        world = FaultWorld(d, redis)
        _streamrec("features", "apply", "--data-dir", str(d), env=world.redis_env)
        _streamrec("features", "materialize", "--data-dir", str(d), env=world.redis_env)
        yield world
    finally:
        redis.stop()


@dataclass
class FaultApps:
    """The applications of :data:`APPS`, served on one port."""

    base_url: str
    world: FaultWorld
    headers: dict[str, str] = field(default_factory=lambda: {"X-API-Key": READ_KEY})
    #: The deployed Serve config (every application): :func:`deploy_extra` adds to it.
    config: dict[str, Any] = field(default_factory=dict)
    port: int = 0

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30.0)


@pytest.fixture(scope="session")
def fault_apps(ray_session: None, fault_world: FaultWorld) -> FaultApps:  # noqa: F811 - the fixture
    from deployments import config

    port = free_port()
    cfgs = []
    for name, extra in APPS.items():
        cfg = config.override(
            config.load(REPO / "configs/serve/local.yaml"),
            name=name,
            route_prefix=f"/{name}",
            data_dir=fault_world.data_dir,
            host="127.0.0.1",
            port=port,
            args={"auth": auth_args(), "watch_champion_s": 1.0, **extra},
            env_vars=fault_world.redis_env if name == "redis" else None,
            deployments={"Gateway": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}}},
        )
        cfgs.append(cfg)
    merged = config.merge(*cfgs)
    merged["proxy_location"] = "HeadOnly"
    config.deploy(merged, timeout_s=300)
    return FaultApps(f"http://127.0.0.1:{port}", fault_world, config=merged, port=port)


@contextmanager
def deploy_extra(apps: FaultApps, *cfgs: dict[str, Any], timeout_s: float = 300) -> Iterator[None]:
    """Serve ``cfgs``' applications beside :data:`APPS` for a block, then remove them again.

    Deploying is declarative (the config names every application), so the fault apps are
    deployed unchanged alongside and the original config is deployed again afterwards.
    """
    from deployments import config

    merged = config.merge(apps.config, *cfgs)
    merged["proxy_location"] = apps.config.get("proxy_location", "HeadOnly")
    try:
        config.deploy(merged, timeout_s=timeout_s)
        yield
    finally:
        config.deploy(apps.config, timeout_s=timeout_s)


# ----------------------------------------------------------------------------- load and checks


@dataclass
class Outcome:
    """One request of an open-loop run."""

    status: int
    latency_ms: float
    level: str = ""
    items: int = 0
    reason: str = ""
    #: When it was sent, in ms from the start of the run (what was in flight at a given moment).
    sent_ms: float = 0.0
    retry_after: str | None = None


async def _open_loop(base_url: str, path: str, headers: dict[str, str], rps: float, seconds: float,
                     users: range, at: tuple[float, Callable[[float], None]] | None = None) -> list[Outcome]:  # fmt: skip
    """``rps`` requests a second for ``seconds``, fired on schedule whatever the answers (open loop).

    ``at``: ``(t_s, action)``: ``action(elapsed_ms)`` is called ``t_s`` into the run (a fault
    injected at a known moment, on the clock of :attr:`Outcome.sent_ms`).
    """
    out: list[Outcome] = []
    n = int(rps * seconds)

    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:

        async def one(i: int) -> None:
            body = {"user_id": users[i % len(users)], "k": 10}
            t0 = time.perf_counter()
            sent = (t0 - start) * 1e3
            try:
                r = await client.post(path, json=body, headers=headers)
            except httpx.HTTPError:
                out.append(Outcome(0, (time.perf_counter() - t0) * 1e3, sent_ms=sent))
                return
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                out.append(Outcome(r.status_code, ms, sent_ms=sent, retry_after=r.headers.get("retry-after")))
                return
            meta = r.json()["metadata"]
            out.append(Outcome(200, ms, meta["degradation_level"], len(r.json()["items"]),
                               meta.get("degradation_reason") or "", sent))  # fmt: skip

        start = time.perf_counter()
        tasks = []
        if at is not None:
            t_s, action = at

            async def inject() -> None:
                await asyncio.sleep(max(0.0, start + t_s - time.perf_counter()))
                action((time.perf_counter() - start) * 1e3)

            tasks.append(asyncio.create_task(inject()))
        for i in range(n):
            delay = start + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return out


def open_loop(apps: FaultApps, app: str, rps: float, seconds: float, users: range,
              at: tuple[float, Callable[[float], None]] | None = None) -> list[Outcome]:  # fmt: skip
    """Run :func:`_open_loop` against ``/<app>/v1/recommend``."""
    return asyncio.run(
        _open_loop(apps.base_url, f"/{app}/v1/recommend", apps.headers, rps, seconds, users, at)
    )


def pct(outcomes: list[Outcome], q: int) -> float:
    """The ``q``-th percentile latency in ms."""
    lat = sorted(o.latency_ms for o in outcomes)
    return statistics.quantiles(lat, n=100)[q - 1] if len(lat) > 1 else lat[0]


def p99(outcomes: list[Outcome]) -> float:
    """The 99th percentile latency in ms."""
    return pct(outcomes, 99)


def level_share(outcomes: list[Outcome], level: str) -> float:
    """The fraction of answers served at ``level``."""
    return sum(o.level == level for o in outcomes) / max(1, len(outcomes))


def summary(outcomes: list[Outcome]) -> str:
    """Counts by status and level, p50/p99: what a failing assertion prints."""
    levels: dict[str, int] = {}
    for o in outcomes:
        key = o.level or f"http {o.status}"
        levels[key] = levels.get(key, 0) + 1
    lat = sorted(o.latency_ms for o in outcomes)
    reasons = sorted({o.reason for o in outcomes if o.reason})[:3]
    slowest = sorted(range(len(outcomes)), key=lambda i: -outcomes[i].latency_ms)[:5]
    worst = ", ".join(f"#{i}: {outcomes[i].latency_ms:.0f}ms" for i in sorted(slowest))  # #i: i-th sent
    return (
        f"n={len(outcomes)} levels={levels} p50={lat[len(lat) // 2]:.1f}ms p95={pct(outcomes, 95):.1f}ms "
        f"p99={p99(outcomes):.1f}ms slowest=[{worst}] reasons={reasons}"
    )


def wait_full(apps: FaultApps, app: str, timeout_s: float, first_user: int = 1000) -> float:
    """Seconds until ``/<app>`` answers at ``full`` again (new users each poll); fails after ``timeout_s``."""
    t0 = time.monotonic()
    user = first_user
    with apps.client() as c:
        while time.monotonic() - t0 < timeout_s:
            r = c.post(f"/{app}/v1/recommend", json={"user_id": user, "k": 10}, headers=apps.headers)
            if r.status_code == 200 and r.json()["metadata"]["degradation_level"] == "full":
                return time.monotonic() - t0
            user += 1
            time.sleep(0.5)
    raise AssertionError(f"/{app} not back to 'full' within {timeout_s:.0f}s")
