"""``streamrec serve`` as the demo and the checks use it: blocking, prints the key, stops on SIGINT.

The service is started the way ``scripts/demo.sh`` starts it: in the background of a
non-interactive shell, where SIGINT is ignored unless the program re-enables it.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KEY = "cli-demo-key-0123456789abcdef"


def gateway_replicas() -> int:
    """``num_replicas`` of the Gateway in configs/serve/local.yaml."""
    from deployments import config

    app = config.load(REPO / "configs/serve/local.yaml")["applications"][0]
    return int(next(d for d in app["deployments"] if d["name"] == "Gateway")["num_replicas"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("direct_ingress", [False, True], ids=["proxy", "direct-ingress"])
def test_streamrec_serve_blocks_prints_the_key_and_stops_on_sigint(
    serve_data: Path, tmp_path: Path, direct_ingress: bool
) -> None:
    port = free_port()
    extra = ["--direct-ingress"] if direct_ingress else []
    log = tmp_path / "serve.log"
    env = {**os.environ, "STREAMREC_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamrec", "serve", "--config", "configs/serve/local.yaml",
             "--data-dir", str(serve_data), "--port", str(port), *extra],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # like `cmd &` in a script
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(1)
        assert ready, log.read_text()[-3000:]
        # /readyz answers as soon as the replica is up; the CLI prints once `deploy` returns.
        wanted = (f"API key (read+write): {KEY}", f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not all(w in log.read_text() for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert all(w in text for w in wanted), text[-3000:]
        r = httpx.post(
            f"{base}/v1/recommend", json={"user_id": 1, "k": 3}, headers={"X-API-Key": KEY}, timeout=30
        )
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert httpx.post(f"{base}/v1/recommend", json={"user_id": 1}, timeout=30).status_code == 401
        if direct_ingress:  # HAProxy answers on --port; Ray's proxy still serves, 100 above
            assert "Ray's proxy serves the same application at" in text
            # HAProxy spreads requests over every gateway replica (its stats listener: --port + 101).
            for u in range(2, 22):
                ok = httpx.post(
                    f"{base}/v1/recommend",
                    json={"user_id": u, "k": 3},
                    headers={"X-API-Key": KEY},
                    timeout=30,
                )
                assert ok.status_code == 200, ok.text
            stats = httpx.get(f"http://127.0.0.1:{port + 101}/stats;csv", timeout=10).text.lstrip("# ")
            served = {
                row["svname"]: int(row["stot"])
                for row in csv.DictReader(io.StringIO(stats))
                if row["svname"].startswith("SERVE_REPLICA")
            }
            assert len(served) == gateway_replicas() >= 2 and min(served.values()) > 0, served
            proxied = httpx.post(
                f"http://127.0.0.1:{port + 100}/v1/recommend",
                json={"user_id": 1, "k": 3},
                headers={"X-API-Key": KEY},
                timeout=30,
            )
            assert proxied.status_code == 200
            assert [i["item_id"] for i in proxied.json()["items"]] == [
                i["item_id"] for i in r.json()["items"]
            ]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_streamrec_serve_refuses_an_empty_data_dir(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "streamrec", "serve", "--data-dir", str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode != 0
    assert p.stderr.strip().startswith("error: no data in") and "Traceback" not in p.stderr
