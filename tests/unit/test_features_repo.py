"""Online store selection, Redis URLs, rendering the repo's feature_store.yaml."""

from __future__ import annotations

import pytest
import yaml

from streamrec.errors import ConfigError
from streamrec.features.repo import OnlineStoreSettings, redis_connection_string, render_config


def test_default_is_sqlite(monkeypatch):
    monkeypatch.delenv("STREAMREC_ONLINE_STORE", raising=False)
    monkeypatch.delenv("STREAMREC_REDIS_URL", raising=False)
    assert OnlineStoreSettings.resolve().kind == "sqlite"


def test_env_and_flags(monkeypatch):
    monkeypatch.setenv("STREAMREC_REDIS_URL", "redis://10.0.0.1:7000/2")
    s = OnlineStoreSettings.resolve()
    assert s.kind == "redis" and s.redis_url == "redis://10.0.0.1:7000/2"  # a URL alone selects Redis
    assert OnlineStoreSettings.resolve("sqlite").kind == "sqlite"  # the flag wins
    monkeypatch.setenv("STREAMREC_ONLINE_STORE", "sqlite")
    assert OnlineStoreSettings.resolve().kind == "sqlite"
    assert OnlineStoreSettings.resolve(redis_url="redis://h:1/0", online="redis").redis_url == "redis://h:1/0"
    with pytest.raises(ConfigError, match="unknown online store"):
        OnlineStoreSettings.resolve("cassandra")


def test_redis_connection_string():
    assert redis_connection_string("redis://127.0.0.1:6390/3", 0.2) == (
        "127.0.0.1:6390,db=3,socket_timeout=0.2,socket_connect_timeout=0.2"
    )
    s = redis_connection_string("rediss://:s3cret@cache:6380", 1)
    assert s.startswith("cache:6380,password=s3cret,ssl=true")
    for bad in ("http://x:1", "redis://", "redis://h:1/abc"):
        with pytest.raises(ConfigError):
            redis_connection_string(bad, 1)


def test_render_config_for_a_data_dir(tmp_path):
    text = render_config(tmp_path / "features", OnlineStoreSettings())
    cfg = yaml.safe_load(text)
    assert "${" not in text
    assert cfg["online_store"] == {"type": "sqlite", "path": f"{tmp_path}/features/online_store.db"}
    assert cfg["registry"]["path"] == f"{tmp_path}/features/registry.db"
    assert cfg["offline_store"]["type"] == "duckdb" and cfg["project"] == "streamrec"
    red = yaml.safe_load(render_config(tmp_path, OnlineStoreSettings("redis", "redis://127.0.0.1:6400/1")))
    assert red["online_store"]["type"] == "redis"
    assert red["online_store"]["connection_string"].startswith("127.0.0.1:6400,db=1")
