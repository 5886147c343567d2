"""Integration fixtures: a real redis-server on an ephemeral loopback port, small worlds.

``redis_server`` starts one ``redis-server`` per test session (no persistence) and yields its
URL; ``redis_url_factory`` hands out a fresh logical database per data directory, so feature
stores of different tests never share keys. Tests that need Redis skip (with the reason) when
the binary is not installed; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL ``redis://127.0.0.1:<port>`` of a private redis-server, stopped after the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install redis-server; .ci/run does it)")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--databases", "64"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start: {(workdir / 'redis.log').read_text()[-500:]}"
                )
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def redis_url_factory(redis_server: str) -> Callable[[], str]:
    """Returns a new ``redis://.../<db>`` URL (a distinct logical database) on every call."""
    counter = itertools.count(1)

    def make() -> str:
        db = next(counter)
        if db >= 64:
            raise RuntimeError("out of Redis databases for this session")
        return f"{redis_server}/{db}"

    return make


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world (300 users, 200 items, 8 days) in a session-wide data dir.

    Tests copy it (fixture ``copy_world``) before writing features into it.
    """
    from streamrec.data.synth import SynthConfig, synthesize

    d = tmp_path_factory.mktemp("synth-world")
    synthesize(SynthConfig(users=300, items=200, days=8, seed=11), d, progress=False)
    return d


def _copy_world(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("features"))
    return dst


@pytest.fixture(scope="session")
def copy_world() -> Callable[[Path, Path], Path]:
    """``copy_world(src, dst)`` copies a data directory's validated data (not its features)."""
    return _copy_world


@pytest.fixture(scope="session")
def closed_port() -> Callable[[], int]:
    """``closed_port()`` returns a loopback port nothing listens on (an online store that is down)."""
    return free_port
