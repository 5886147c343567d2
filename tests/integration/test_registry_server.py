"""Model registry through a real ``mlflow server`` on loopback, and an unreachable server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from streamrec.errors import PromotionRefusedError, RegistryError
from streamrec.registry import BundleManifest, ModelRegistry, describe_files, verify_bundle, write_manifest

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 90.0  # generous: the 2 cores are shared; unloaded, the server is up in ~8 s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_bundle(root: Path, name: str, ndcg: float, seed: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    torch.save({"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))}, d / "ranker.pt")
    np.save(d / "item_embeddings.npy", np.random.default_rng(seed).normal(size=(10, 8)).astype("f4"))
    cutoff = datetime(2026, 11, 20, tzinfo=UTC)
    write_manifest(
        d,
        BundleManifest(
            name=name,
            created_at=cutoff + timedelta(hours=1),
            data_cutoff=cutoff,
            git_sha="feedface",
            feature_schema_version="1.0",
            feature_names=["a", "b"],
            files=describe_files(d, {"ranker": "ranker.pt", "item_embeddings": "item_embeddings.npy"}),
            metrics={"ndcg@10": ndcg},
            eval_set_id="sha256:eval",
        ),
    )
    return d


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on a free port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
            ],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        # the server opens (and migrates) its store on the first API call: do it here, not in a test
        httpx.get(
            f"{uri}/api/2.0/mlflow/registered-models/search", timeout=START_TIMEOUT_S
        ).raise_for_status()
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_register_and_promote_through_server(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the env var selects the server
    reg = ModelRegistry(data_dir=tmp_path / "data")
    assert reg.tracking_uri == mlflow_server

    v1 = reg.register(make_bundle(tmp_path, "b1", 0.11, 1))
    assert v1.source.startswith("mlflow-artifacts:")
    assert reg.promote(v1.version).accepted
    v2 = reg.register(make_bundle(tmp_path, "b2", 0.09, 2))
    with pytest.raises(
        PromotionRefusedError, match=r"ndcg@10 0\.0900 < champion 0\.1100 - 1% tolerance \(-18\.2%\)"
    ):
        reg.promote(v2.version)
    v3 = reg.register(make_bundle(tmp_path, "b3", 0.12, 3))
    assert reg.promote(
        v3.version, smoke_test=lambda p: torch.load(p / "ranker.pt", weights_only=True)
    ).accepted

    # a second client sees the same state; downloads verify
    other = ModelRegistry(mlflow_server, data_dir=tmp_path / "other")
    assert other.get("champion").version == v3.version  # type: ignore[union-attr]
    assert verify_bundle(other.download("champion")).name == "b3"
    assert other.rollback().version == v1.version
    assert reg.get("champion").version == v1.version  # type: ignore[union-attr]


def test_unreachable_server_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=rf"{uri}.*unreachable.*MLFLOW_TRACKING_URI"):
        ModelRegistry(data_dir=tmp_path / "data")
    assert time.monotonic() - t0 < 5.0
    assert not (tmp_path / "data" / "mlflow.db").exists()  # did not silently fall back to SQLite
