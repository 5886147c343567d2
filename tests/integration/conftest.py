"""Integration fixtures: a real redis-server on an ephemeral loopback port, small worlds.

``redis_server`` starts one ``redis-server`` per test session (no persistence) and yields its
URL; ``redis_url_factory`` hands out a fresh logical database per data directory, so feature
stores of different tests never share keys. Tests that need Redis skip (with the reason) when
the binary is not installed; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL ``redis://127.0.0.1:<port>`` of a private redis-server, stopped after the session."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except FileNotFoundError as err:
        pytest.skip(str(err))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


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
