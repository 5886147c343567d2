"""Feast configuration for a data directory, and the repository's definitions.

The repository (``feature_repo/``) is data-dir independent: its ``feature_store.yaml``
templates name ``${STREAMREC_FEATURES_DIR}`` (and ``${STREAMREC_REDIS_CONNECTION}``). For a
given data directory this module renders the template into ``<data dir>/features/
feature_store.yaml`` and builds the :class:`feast.RepoConfig` from the same text, so the Feast
CLI and StreamRec read one configuration.

Online store selection, first match wins: the ``online`` / ``redis_url`` arguments (CLI flags
``--online-store`` / ``--redis-url``), then ``$STREAMREC_ONLINE_STORE`` / ``$STREAMREC_REDIS_URL``,
then SQLite.

A Redis password never leaves memory in clear: :meth:`OnlineStoreSettings.describe`, ``repr``
and error messages show the URL through :func:`~streamrec.redact.redact_url`, and the rendered
``feature_store.yaml`` names the password as ``${STREAMREC_REDIS_PASSWORD}`` (Feast's
``load_repo_config`` expands environment variables, so the Feast CLI reads it from the
environment), while StreamRec builds its :class:`feast.RepoConfig` with the real password.
"""

from __future__ import annotations

import importlib.util
import os
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import yaml

from streamrec.errors import ConfigError
from streamrec.features.spec import ENV_FEATURES_DIR
from streamrec.redact import redact_url

ENV_ONLINE_STORE = "STREAMREC_ONLINE_STORE"
ENV_REDIS_URL = "STREAMREC_REDIS_URL"
ENV_FEATURE_REPO = "STREAMREC_FEATURE_REPO"
ENV_REDIS_CONNECTION = "STREAMREC_REDIS_CONNECTION"
#: Named in the rendered ``feature_store.yaml`` in place of the Redis password (for the Feast CLI).
ENV_REDIS_PASSWORD = "STREAMREC_REDIS_PASSWORD"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

OnlineKind = Literal["sqlite", "redis"]


def feature_repo_path() -> Path:
    """The Feast repository folder: ``$STREAMREC_FEATURE_REPO`` or ``feature_repo/`` of the checkout."""
    env = os.environ.get(ENV_FEATURE_REPO)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "feature_repo"
    if not (path / "definitions.py").is_file():
        raise ConfigError(
            f"Feast repository not found at {path}: set {ENV_FEATURE_REPO} to the feature_repo folder"
        )
    return path


def redis_connection_string(url: str, timeout_s: float, *, password_ref: str | None = None) -> str:
    """Turn ``redis://[:password@]host:port[/db]`` into Feast's Redis connection string.

    Args:
        url: The Redis URL.
        timeout_s: Socket and connect timeout.
        password_ref: Write ``password=${<password_ref>}`` (an environment reference that
            Feast's CLI expands) instead of the password itself, e.g. for a file on disk.

    Raises:
        ConfigError: not a redis:// or rediss:// URL (the message shows the URL redacted).
    """
    shown = redact_url(url)
    try:
        u = urlparse(url)
        port = u.port
    except ValueError:  # a port that is not a number, a broken IPv6 address (the text may hold a secret)
        raise ConfigError(
            f"invalid Redis URL '{shown}': the port is not a number or the host is malformed; "
            "expected redis://[:password@]host:port/db"
        ) from None
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        raise ConfigError(f"invalid Redis URL '{shown}': expected redis://host:port/db")
    parts = [f"{u.hostname}:{port or 6379}"]
    db = u.path.lstrip("/")
    if db:
        if not db.isdigit():
            raise ConfigError(f"invalid Redis URL '{shown}': the database must be a number")
        parts.append(f"db={int(db)}")
    if u.password:
        parts.append(f"password=${{{password_ref}}}" if password_ref else f"password={unquote(u.password)}")
    if u.username:
        parts.append(f"username={unquote(u.username)}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    parts += [f"socket_timeout={timeout_s:g}", f"socket_connect_timeout={timeout_s:g}"]
    return ",".join(parts)


@dataclass(frozen=True)
class OnlineStoreSettings:
    """Which online store a client uses.

    Attributes:
        kind: ``sqlite`` (embedded file under ``features/``) or ``redis``.
        redis_url: ``redis://[:password@]host:port/db`` when ``kind == "redis"``; may hold a
            password, so show it only through :meth:`describe` (``repr`` redacts it too).
        timeout_s: Socket timeout of Redis calls (a dead server fails fast, for the fallback).
    """

    kind: OnlineKind = "sqlite"
    redis_url: str | None = field(default=None, repr=False)
    timeout_s: float = 0.5

    def __repr__(self) -> str:
        return (
            f"OnlineStoreSettings(kind={self.kind!r}, redis_url={redact_url(self.redis_url)!r}, "
            f"timeout_s={self.timeout_s!r})"
        )

    @classmethod
    def resolve(
        cls, online: str | None = None, redis_url: str | None = None, timeout_s: float = 0.5
    ) -> OnlineStoreSettings:
        """Flags first, then ``$STREAMREC_ONLINE_STORE`` / ``$STREAMREC_REDIS_URL``, then SQLite.

        A Redis URL alone (flag or environment) selects Redis.

        Raises:
            ConfigError: unknown store kind or malformed URL.
        """
        url = redis_url or os.environ.get(ENV_REDIS_URL) or None
        kind = (online or os.environ.get(ENV_ONLINE_STORE) or ("redis" if url else "sqlite")).lower()
        if kind not in ("sqlite", "redis"):
            raise ConfigError(f"unknown online store '{kind}': use sqlite or redis")
        if kind == "redis":
            url = url or DEFAULT_REDIS_URL
            redis_connection_string(url, timeout_s)  # validate early
            return cls("redis", url, timeout_s)
        return cls("sqlite", None, timeout_s)

    def describe(self) -> str:
        """Human-readable summary, safe to log and show: ``redis redis://:***@127.0.0.1:6379/0``."""
        return f"redis {redact_url(self.redis_url)}" if self.kind == "redis" else "sqlite"


def render_config(features_dir: Path, settings: OnlineStoreSettings, *, for_file: bool = False) -> str:
    """The ``feature_store.yaml`` text for a data directory (template with variables filled).

    Args:
        features_dir: ``<data dir>/features``.
        settings: Online store selection.
        for_file: Name a Redis password as ``${STREAMREC_REDIS_PASSWORD}`` instead of writing it
            (the text for disk; Feast's CLI expands the reference from its environment).
    """
    name = "feature_store.redis.yaml" if settings.kind == "redis" else "feature_store.yaml"
    template = (feature_repo_path() / name).read_text()
    values = {ENV_FEATURES_DIR: str(features_dir)}
    if settings.kind == "redis":
        values[ENV_REDIS_CONNECTION] = redis_connection_string(
            settings.redis_url or DEFAULT_REDIS_URL,
            settings.timeout_s,
            password_ref=ENV_REDIS_PASSWORD if for_file else None,
        )
    try:
        return string.Template(template).substitute(values)
    except KeyError as err:
        raise ConfigError(f"{name} names an unknown variable {err}") from None


def repo_config(features_dir: Path, settings: OnlineStoreSettings, *, write: bool = True) -> Any:
    """A :class:`feast.RepoConfig` for ``features_dir``; also writes the rendered yaml there.

    The file never holds a Redis password: it names ``${STREAMREC_REDIS_PASSWORD}`` instead
    (export it before running the Feast CLI on that file); the returned config has the real one.

    Args:
        features_dir: ``<data dir>/features`` (created if missing).
        settings: Online store selection.
        write: Write ``features_dir/feature_store.yaml`` (for inspection and the Feast CLI).
    """
    from feast.repo_config import RepoConfig

    text = render_config(features_dir, settings)
    features_dir.mkdir(parents=True, exist_ok=True)
    if write:
        target = features_dir / "feature_store.yaml"
        on_disk = render_config(features_dir, settings, for_file=True)
        if not target.is_file() or target.read_text() != on_disk:
            tmp = target.with_name(f".feature_store.yaml.{os.getpid()}")
            tmp.write_text(on_disk)
            os.replace(tmp, target)
    raw = yaml.safe_load(text)
    config = RepoConfig(**raw)
    config.repo_path = features_dir
    return config


_DEF_LOCK = threading.Lock()


def load_definitions(features_dir: Path) -> ModuleType:
    """Import ``feature_repo/definitions.py`` with its sources pointing at ``features_dir``.

    A fresh module object per call (not cached in ``sys.modules``), so one process can serve
    several data directories.
    """
    path = feature_repo_path() / "definitions.py"
    with _DEF_LOCK:
        old = os.environ.get(ENV_FEATURES_DIR)
        os.environ[ENV_FEATURES_DIR] = str(features_dir)
        try:
            spec = importlib.util.spec_from_file_location("streamrec_feature_repo_definitions", path)
            if spec is None or spec.loader is None:  # pragma: no cover - file checked above
                raise ConfigError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            if old is None:
                os.environ.pop(ENV_FEATURES_DIR, None)
            else:
                os.environ[ENV_FEATURES_DIR] = old
    return module
