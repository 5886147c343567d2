"""The cluster composition across a real 2-node Ray cluster on this machine, deployed with ``serve deploy``.

``ray start --head`` (1 CPU) and ``ray start --address ...`` (1 CPU, custom resource
``worker_node``) each with a private ``--temp-dir``; ``configs/serve/cluster.yaml`` deployed with
``serve deploy`` through the head's dashboard, with the Ranker pinned to the second node through
``ray_actor_options.resources``; queried over HTTP.

Teardown (always, also on failure) stops exactly this cluster's processes: every process whose
command line names the cluster's private temp dir, plus their descendants (the workers). Not
``ray stop``: it kills *every* Ray process of the user on the machine, including other sessions'
clusters and the e2e session's Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY = "two-node-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:3])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def cluster_pids(marker: str) -> set[int]:
    """Processes whose command line contains ``marker``, plus all their descendants."""
    # -ww: never truncate command lines (ps cuts them to $COLUMNS otherwise, hiding the marker).
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            procs.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    roots = {pid for pid, _, args in procs if marker in args and pid != os.getpid()}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid, _ in procs if ppid in frontier and pid not in found}
        found |= frontier
    return found


def stop_cluster(marker: str, grace_s: float = 8.0) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after ``grace_s``."""
    pids = cluster_pids(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.5)
    for pid in pids | cluster_pids(marker):
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def two_nodes() -> Iterator[dict[str, object]]:
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed next to this interpreter")
    tmp = Path(tempfile.mkdtemp(prefix="sr2n-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    try:
        run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--num-cpus", "1", "--temp-dir", str(tmp / "head"), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--object-store-memory", "150000000", "--disable-usage-stats"],
            env,
        )  # fmt: skip
        run(
            [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1", "--resources", json.dumps({"worker_node": 1}),
             "--temp-dir", str(tmp / "worker"), "--object-store-memory", "150000000",
             "--disable-usage-stats"],
            env,
        )  # fmt: skip
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "tmp": tmp}
    finally:
        stop_cluster(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def make_data(root: Path, env: dict[str, str]) -> Path:
    ml = Path(os.environ.get("STREAMREC_ML100K", str(REPO.parent / "shared" / "data" / "ml-100k")))
    cli = [sys.executable, "-m", "streamrec", "data"]
    if (ml / "u.data").is_file():
        run([*cli, "ingest", "--format", "ml-100k", "--path", str(ml), "--data-dir", str(root)], env)
    else:
        run([*cli, "synth", "--users", "300", "--items", "200", "--days", "5", "--data-dir", str(root)], env)
    return root


PLACEMENT = """
import json, sys
from ray.util.state import list_actors, list_nodes
addr = sys.argv[1]
nodes = {n.node_id: ("worker_node" in (n.resources_total or {})) for n in list_nodes(address=addr)}
actors = [a for a in list_actors(address=addr, filters=[("state", "=", "ALIVE")])]
replicas = [a for a in actors if a.class_name.startswith("ServeReplica")]
print(json.dumps({a.class_name: nodes.get(a.node_id) for a in replicas}))
"""


def test_cluster_composition_across_two_nodes(two_nodes: dict[str, object]) -> None:
    from deployments import config
    from streamrec.auth import hash_key

    env: dict[str, str] = two_nodes["env"]  # type: ignore[assignment]
    tmp: Path = two_nodes["tmp"]  # type: ignore[assignment]
    dashboard = str(two_nodes["dashboard"])
    data = make_data(tmp / "data", env)
    port = free_port()
    cfg = config.override(
        config.load(REPO / "configs/serve/cluster.yaml"),
        data_dir=data,
        host="127.0.0.1",
        port=port,
        args={
            "auth": {
                "use_env_key": False,
                "keys": [{"name": "ops", "key": hash_key(KEY), "scopes": ["admin"]}],
            }
        },
        deployments={"Ranker": {"ray_actor_options": {"resources": {"worker_node": 0.01}}}},
    )
    cfg_path = tmp / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run([str(BIN / "serve"), "deploy", str(cfg_path), "-a", dashboard], env)

    deadline = time.monotonic() + 240
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        out = subprocess.run(
            [str(BIN / "serve"), "status", "-a", dashboard], env=env, capture_output=True, text=True
        )
        status = (
            (yaml.safe_load(out.stdout) or {}).get("applications", {}).get("streamrec", {})
            if out.stdout
            else {}
        )
        if status.get("status") in ("RUNNING", "DEPLOY_FAILED"):
            break
        time.sleep(2)
    assert status.get("status") == "RUNNING", status

    placed = json.loads(
        run([sys.executable, "-c", PLACEMENT, dashboard], env).stdout.strip().splitlines()[-1]
    )
    assert placed["ServeReplica:streamrec:Ranker"] is True, placed  # pinned to the second node
    assert set(placed) == {
        f"ServeReplica:streamrec:{d}" for d in ("Gateway", "Features", "Retriever", "Ranker", "Reranker")
    }

    h = {"X-API-Key": KEY}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        assert c.get("/readyz").json()["composition"] == "cluster"
        for user in (1, 2, 10**9):
            r = c.post("/v1/recommend", json={"user_id": user, "k": 10}, headers=h)
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 10 and r.json()["metadata"]["degradation_level"] == "popularity"
        assert c.post("/v1/recommend", json={"user_id": 1, "k": 0}, headers=h).status_code == 422
        assert c.post("/v1/recommend", json={"user_id": 1}).status_code == 401
        ev = {"events": [{"event_id": "two-node-1", "user_id": 1, "item_id": 1, "event_type": "click"}]}
        known = c.post("/v1/events", json=ev, headers=h)
        assert known.status_code in (200, 422), known.text  # 422 only if the synthetic world lacks id 1
        status_body = c.get("/v1/admin/status", headers=h).json()
        assert status_body["stages"]["composition"] == "cluster"
        assert set(status_body["stages"]["stages"]) == {"features", "retriever", "ranker", "reranker"}
        versions = status_body["stages"]["stage_versions"]  # every replica of each stage, one version
        assert set(versions) == {"features", "retriever", "ranker", "reranker"}
        assert all(len(v) == 1 for v in versions.values()) and len({v[0] for v in versions.values()}) == 1
