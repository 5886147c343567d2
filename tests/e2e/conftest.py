"""Ray Serve end-to-end fixtures: Ray started ONCE per test session, both compositions deployed once.

The session deploys ``configs/serve/local.yaml`` (fused, at ``/fused``) and
``configs/serve/cluster.yaml`` (cluster, at ``/cluster``) together as one Serve config, with only
these overrides: data directory, application names and prefixes, a free loopback port, and a
test API key per scope. Data: MovieLens 100K when present (``$STREAMREC_ML100K`` or
``../shared/data/ml-100k``), else a small deterministic world written through the DataStore.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from streamrec.auth import hash_key
from streamrec.data.store import DataStore

REPO = Path(__file__).resolve().parents[2]
READ_KEY = "e2e-read-key-0123456789"
WRITE_KEY = "e2e-write-key-0123456789"
ADMIN_KEY = "e2e-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def small_world(root: Path, users: int = 300, items: int = 200, days: int = 5, seed: int = 7) -> Path:
    """A deterministic small world (power-law popularity, clicks/completions/views/skips)."""
    rng = np.random.default_rng(seed)
    end = datetime(2026, 11, 1, tzinfo=UTC)
    store = DataStore(root)
    store.upsert_users(
        pd.DataFrame({"user_id": np.arange(1, users + 1), "signup_at": [end - timedelta(days=60)] * users})
    )
    ids = np.arange(1000, 1000 + items)
    store.upsert_items(
        pd.DataFrame(
            {
                "item_id": ids,
                "title": [f"Title {i}" for i in ids],
                "categories": [[f"c{i % 7}"] for i in ids],
                "published_at": [end - timedelta(days=int(d)) for d in rng.integers(1, 90, items)],
                "promoted": [False] * items,
                "flagged": [i % 97 == 0 for i in ids],
            }
        )
    )
    n = users * days * 6
    w = 1.0 / np.arange(1, items + 1) ** 1.1
    kinds = rng.choice(["impression", "view", "click", "complete", "skip"], n, p=[0.5, 0.15, 0.2, 0.1, 0.05])
    frame = pd.DataFrame(
        {
            "event_id": [f"w{i}" for i in range(n)],
            "user_id": rng.integers(1, users + 1, n),
            "item_id": rng.choice(ids, n, p=w / w.sum()),
            "event_type": kinds,
            "label": np.isin(kinds, ["click", "complete"]).astype("int8"),
            "timestamp": [end - timedelta(seconds=int(s)) for s in rng.integers(0, days * 86400, n)],
        }
    )
    store.append_events(frame)
    return root


def ml100k_dir() -> Path | None:
    p = Path(os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared" / "data" / "ml-100k")))
    return p if (p / "u.data").is_file() else None


def make_data_dir(root: Path) -> Path:
    src = ml100k_dir()
    if src is None:
        return small_world(root)
    from streamrec.config import parse_config
    from streamrec.data.ingest import IngestConfig, ingest

    ingest(parse_config({"format": "ml-100k", "path": str(src), "data_dir": str(root)}, IngestConfig))
    return root


def auth_args() -> dict[str, object]:
    return {
        "enabled": True,
        "use_env_key": False,
        "keys": [
            {"name": "reader", "key": hash_key(READ_KEY), "scopes": ["read"]},
            {"name": "writer", "key": hash_key(WRITE_KEY), "scopes": ["write"]},
            {"name": "ops", "key": hash_key(ADMIN_KEY), "scopes": ["admin"]},
        ],
    }


@dataclass
class Served:
    """Both compositions running on one Serve instance."""

    base_url: str
    data_dir: Path
    prefixes: dict[str, str]
    read_key: str = READ_KEY
    write_key: str = WRITE_KEY
    admin_key: str = ADMIN_KEY

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60.0, **kw)  # type: ignore[arg-type]


#: Port of Ray's Prometheus endpoint in the test session (the metrics agent exports app metrics there).
METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Ray started once per test session (2 CPUs), shut down at the end."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from streamrec.cli.serve import install_proxy_resend

        install_proxy_resend(os.environ)  # as `streamrec serve` starts Ray: the proxy resends
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace="serve",
            log_to_driver=False,
            _metrics_export_port=METRICS_PORT,
        )
    try:
        yield
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def metrics_port(ray_session: None) -> int:
    """The session Ray's metrics export port (a fixture: importing this module again gives another)."""
    return METRICS_PORT


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data directory every e2e test serves (MovieLens 100K or the small world)."""
    return make_data_dir(tmp_path_factory.mktemp("serve") / "data")


@pytest.fixture(scope="session")
def served(ray_session: None, serve_data: Path) -> Served:
    """configs/serve/local.yaml at /fused and configs/serve/cluster.yaml at /cluster."""
    from deployments import config

    data = serve_data
    port = free_port()
    args = {"auth": auth_args(), "request_log": {"sample_rate": 1.0, "flush_interval_s": 1.0}}
    common = {"data_dir": data, "port": port, "host": "127.0.0.1", "args": args}
    fused = config.override(
        config.load(REPO / "configs/serve/local.yaml"), name="fused", route_prefix="/fused", **common
    )
    cluster = config.override(
        config.load(REPO / "configs/serve/cluster.yaml"), name="cluster", route_prefix="/cluster", **common
    )
    merged = config.merge(fused, cluster)
    merged["proxy_location"] = "HeadOnly"
    config.deploy(merged, timeout_s=240)
    return Served(f"http://127.0.0.1:{port}", data, {"fused": "/fused", "cluster": "/cluster"})
