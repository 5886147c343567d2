"""The trained recommender over real HTTP: a champion served by the fused composition, and hot
reload when the registry's champion alias moves (promotion and rollback) without dropping
requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Served  # importable: pythonpath = ["."]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _train(d: Path, config: Path) -> dict[str, Any]:
    """Train as an operator would: its own process (and Ray), not the serving cluster's."""
    import json
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "streamrec", "train", "--data-dir", str(d), "--config", str(config), "--local", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    report: dict[str, Any] = json.loads(p.stdout)
    return report


@pytest.fixture(scope="module")
def trained(served: Served, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from ray import serve

    from deployments.app import Gateway
    from streamrec.data.synth import SynthConfig, synthesize
    from tests.e2e.conftest import auth_args

    d = tmp_path_factory.mktemp("trained") / "data"
    synthesize(SynthConfig(users=300, items=200, days=7, seed=9), d, progress=False)
    cfg = d.parent / "train.yaml"
    cfg.write_text(
        "two_tower: {epochs: 2, embedding_dim: 32}\nranker: {epochs: 2}\nsplit: {min_train_events: 50}\n"
    )
    assert _train(d, cfg)["registered_version"] == 1
    nopromo = d.parent / "train-nopromote.yaml"
    nopromo.write_text(cfg.read_text() + "gates: {promote: false}\n")
    assert _train(d, nopromo)["registered_version"] == 2  # registered, not champion
    args = {"data_dir": str(d), "composition": "fused", "stages": "recommender", "watch_champion_s": 1.0,
            "auth": auth_args()}  # fmt: skip
    app = Gateway.options(ray_actor_options={"num_cpus": 0.1}).bind(args)
    serve.run(app, name="trained", route_prefix="/trained", blocking=False)
    deadline = time.monotonic() + 240
    with served.client() as c:
        while time.monotonic() < deadline:
            try:
                if c.get("/trained/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
    return "/trained", d


def _recommend(c: httpx.Client, prefix: str, key: str, user: int) -> dict[str, Any]:
    r = c.post(f"{prefix}/v1/recommend", json={"user_id": user, "k": 10}, headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_version(c: httpx.Client, prefix: str, key: str, want: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _recommend(c, prefix, key, 1)["metadata"]["model_version"] == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"model_version never became {want}")


def test_champion_serves_over_http(served: Served, trained: tuple[str, Path]) -> None:
    prefix, _ = trained
    with served.client() as c:
        body = _recommend(c, prefix, served.read_key, 1)
        assert body["metadata"]["model_version"] == "v1"
        assert body["metadata"]["degradation_level"] == "full"
        items = body["items"]
        assert len(items) == 10 and len({i["item_id"] for i in items}) == 10
        assert all(i["sources"] for i in items)
        cold = _recommend(c, prefix, served.read_key, 10**9)
        assert len(cold["items"]) == 10  # cold start path, not an error
        bad = c.post(
            f"{prefix}/v1/recommend", json={"user_id": 1, "k": 0}, headers={"X-API-Key": served.read_key}
        )
        assert bad.status_code == 422


def test_hot_reload_follows_the_champion_alias(served: Served, trained: tuple[str, Path]) -> None:
    from streamrec.registry import ModelRegistry

    prefix, d = trained
    reg = ModelRegistry(data_dir=d)
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:  # requests keep flowing during both reloads
        with served.client() as c:
            while not stop.is_set():
                r = c.post(f"{prefix}/v1/recommend", json={"user_id": 2, "k": 5},
                           headers={"X-API-Key": served.read_key})  # fmt: skip
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    t = threading.Thread(target=load)
    t.start()
    try:
        with served.client() as c:
            reg.set_alias("champion", 2, force=True)  # what a promotion does to the alias
            _wait_version(c, prefix, served.read_key, "v2")
            reg.rollback()
            _wait_version(c, prefix, served.read_key, "v1")
    finally:
        stop.set()
        t.join(timeout=30)
    assert not failures, failures[:3]
