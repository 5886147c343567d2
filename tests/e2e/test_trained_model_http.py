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


def test_catalogue_upserts_reach_the_trained_model_without_a_reload(served: Served, trained: tuple[str, Path]) -> None:
    """A promotion reaches the trained re-ranker within seconds; a flagged item is gone at once."""
    from streamrec.data.store import DataStore

    prefix, d = trained
    items = DataStore(d).items().set_index("item_id")
    admin = {"X-API-Key": served.admin_key}
    with served.client() as c:
        before = [i["item_id"] for i in _recommend(c, prefix, served.read_key, 4)["items"]]
        flag, promote = before[0], before[-1]
        original = [
            {"item_id": i, "flagged": bool(items.loc[i, "flagged"]), "promoted": bool(items.loc[i, "promoted"])}
            for i in (flag, promote)
        ]
        upserts = [{"item_id": flag, "flagged": True}, {"item_id": promote, "promoted": True}]
        t0 = time.monotonic()
        assert c.post(f"{prefix}/v1/admin/items", json={"items": upserts}, headers=admin).status_code == 200
        try:
            boosted: list[str] = []
            while time.monotonic() - t0 < 30:
                body = _recommend(c, prefix, served.read_key, 4)
                assert flag not in [i["item_id"] for i in body["items"]] and len(body["items"]) == 10
                boosted = [r for i in body["items"] if i["item_id"] == promote for r in (i.get("reasons") or [])]
                if "promoted_boost" in boosted:
                    break
                time.sleep(0.2)
            took = time.monotonic() - t0
            assert "promoted_boost" in boosted, f"item {promote} not boosted {took:.1f} s after its promotion"
            print(f"promotion of item {promote} served {took:.2f} s after the upsert was sent")
        finally:
            assert c.post(f"{prefix}/v1/admin/items", json={"items": original}, headers=admin).status_code == 200


def test_a_new_item_is_served_within_seconds_of_its_upsert(served: Served, trained: tuple[str, Path]) -> None:
    """An item the bundle never saw, upserted over HTTP, is served without a reload: retrieved for
    its category's fans (affinity, and the two-tower index through the item tower), kept past the
    ranker's cut and placed by the freshness quota. Flagged, it is gone again."""
    from collections import Counter
    from datetime import UTC, datetime

    from streamrec.data.store import DataStore

    prefix, d = trained
    items = DataStore(d).items().set_index("item_id")
    users = range(1, 41)
    admin = {"X-API-Key": served.admin_key}

    def served_ids(c: httpx.Client, user: int) -> list[int]:
        return [int(i["item_id"]) for i in _recommend(c, prefix, served.read_key, user)["items"]]

    with served.client() as c:
        shown = Counter(cat for u in users[:10] for i in served_ids(c, u) for cat in items.loc[i, "categories"])
        category = shown.most_common(1)[0][0]
        new_id = int(items.index.max()) + 10_000
        body = {"items": [{"item_id": new_id, "title": "Brand new", "categories": [category],
                           "published_at": datetime.now(UTC).isoformat()}]}  # fmt: skip
        assert c.post(f"{prefix}/v1/admin/items", json=body, headers=admin).status_code == 200
        acked = time.monotonic()
        took = None
        try:
            while took is None and time.monotonic() - acked < 60:
                hits = [u for u in users if new_id in served_ids(c, u)]
                if hits:
                    took = time.monotonic() - acked
            print(f"new item {new_id} ({category}) served after {took} s to {len(hits)} of {len(users)} users")
            assert took is not None
            answer = _recommend(c, prefix, served.read_key, hits[0])
            hit = next(i for i in answer["items"] if i["item_id"] == new_id)
            assert hit["title"] == "Brand new" and answer["metadata"]["degradation_level"] == "full"
        finally:
            flag = {"items": [{"item_id": new_id, "flagged": True}]}
            assert c.post(f"{prefix}/v1/admin/items", json=flag, headers=admin).status_code == 200
        assert not [u for u in users if new_id in served_ids(c, u)]


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


def test_an_experiment_routes_users_stamps_events_shadows_and_simulates(
    served: Served, trained: tuple[str, Path]
) -> None:
    """A second gateway on the same registry with an experiment: challenger v2 for half the
    users, their events stamped with the variant, then v2 as a shadow, then the HTTP simulator."""
    import json
    import os
    import subprocess
    import sys

    from ray import serve

    from deployments.app import Gateway
    from streamrec.auth import hash_key
    from streamrec.data.event_log import EventLog
    from streamrec.experiments.config import ShadowGates, assign
    from streamrec.experiments.shadow import shadow_report
    from streamrec.registry import ModelRegistry
    from tests.e2e.conftest import auth_args

    _, d = trained
    reg = ModelRegistry(data_dir=d)
    assert reg.aliases().get("champion") == 1
    sim_key = "sim-key-0123456789abcdef"
    auth = auth_args()
    auth["keys"] = [*auth["keys"], {"name": "sim", "key": hash_key(sim_key), "scopes": ["read", "write"]}]  # type: ignore[misc]
    args = {
        "data_dir": str(d), "composition": "fused", "stages": "recommender", "watch_champion_s": 0, "auth": auth,
        "request_log": {"sample_rate": 1.0, "flush_interval_s": 1.0},
        "experiment": {"name": "e2e", "treatment_share": 0.5, "poll_s": 1.0, "shadow": {"sample_rate": 1.0}},
    }  # fmt: skip
    prefix = "/experiment"
    # (0.04 CPU: the session's other apps reserve 1.95 of the 2 CPUs)
    serve.run(Gateway.options(ray_actor_options={"num_cpus": 0.04}).bind(args), name="experiment",
              route_prefix=prefix, blocking=False)  # fmt: skip
    try:
        with served.client() as c:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                try:
                    if c.get(f"{prefix}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            assert _recommend(c, prefix, sim_key, 1)["metadata"]["experiment_variant"] is None  # no challenger
            reg.set_alias("challenger", 2)
            deadline = time.monotonic() + 120
            while _recommend(c, prefix, sim_key, 1)["metadata"]["experiment_variant"] is None:
                assert time.monotonic() < deadline, "the challenger never reached the gateway"
                time.sleep(0.5)
            for u in range(1, 21):
                md = _recommend(c, prefix, sim_key, u)["metadata"]
                want = assign(u, "e2e", 0.5)
                assert md["experiment_variant"] == want, u
                assert md["model_version"] == ("v2" if want == "treatment" else "v1"), md
            treated = next(u for u in range(1, 50) if assign(u, "e2e", 0.5) == "treatment")
            ev = {"events": [{"event_id": "exp-e2e-1", "user_id": treated, "item_id": 1, "event_type": "click"}]}
            assert c.post(f"{prefix}/v1/events", json=ev, headers={"X-API-Key": sim_key}).status_code == 200
            logged = EventLog.open(d).read().set_index("event_id")["experiment_variant"]
            assert logged["exp-e2e-1"] == "treatment"
            status = c.get(f"{prefix}/v1/admin/status", headers={"X-API-Key": served.admin_key}).json()
            held = status["stages"]["experiment"]["challenger"]
            assert held["version"] == "v2" and held["load_seconds"] > 0 and held["memory_mb"] >= 0

            # the HTTP user simulator against the running service: both variants, each with its CTR
            env = {**os.environ, "STREAMREC_API_KEY": sim_key}
            p = subprocess.run(
                [sys.executable, "-m", "streamrec", "experiments", "simulate", "--users", "40", "--requests", "120",
                 "--url", served.base_url, "--prefix", prefix, "--data-dir", str(d), "--k", "10", "--json"],
                capture_output=True, text=True, timeout=600, env=env,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr[-3000:]
            result = json.loads(p.stdout)
            rows = {r["variant"]: r for r in result["variants"]}
            assert set(rows) == {"control", "treatment"} and result["decision"] is not None
            assert all(r["impressions"] > 0 and 0 <= r["ctr_low"] <= r["ctr"] <= r["ctr_high"] for r in rows.values())
            assert result["events_posted"] > 0 and not result["failures"]

            # v2 as the shadow instead: answers come from the champion alone, v2 scores them aside
            reg.clear_alias("challenger")
            reg.set_alias("shadow", 2)
            deadline = time.monotonic() + 120
            while True:
                for u in range(1, 11):
                    md = _recommend(c, prefix, sim_key, u)["metadata"]
                    assert md["model_version"] == "v1" or md["experiment_variant"] is not None
                try:
                    report = shadow_report(d, ShadowGates(min_requests=5), version="v2")
                    if report.requests >= 5:
                        break
                except Exception:  # not logged yet (the log flushes every second)
                    pass
                assert time.monotonic() < deadline, "no shadow runs were logged"
                time.sleep(1)
            assert report.error_rate == 0 and report.p50_latency_ms > 0
            assert report.prediction_correlation == report.prediction_correlation  # not NaN: paired scores exist
    finally:
        reg.clear_alias("shadow")
        reg.clear_alias("challenger")
        serve.delete("experiment")
