"""Which MLflow tracking store the registry uses, and connecting to it with a clear error."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from streamrec.errors import RegistryError
from streamrec.paths import DataLayout, exclusive_file_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class TrackingStore:
    """An MLflow tracking/registry URI and how to reach it.

    Attributes:
        uri: The tracking URI.
        layout: The StreamRec data directory (the local default store lives there).
        local_default: Whether ``uri`` is the default SQLite store (no URI given nor in the env).
        probe_timeout_s: Timeout of the reachability probe of an HTTP tracking server.
    """

    uri: str
    layout: DataLayout
    local_default: bool
    probe_timeout_s: float

    @classmethod
    def resolve(cls, tracking_uri: str | None, layout: DataLayout, probe_timeout_s: float) -> TrackingStore:
        """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite under the data directory."""
        env_uri = os.environ.get(ENV_TRACKING_URI)
        return cls(
            uri=tracking_uri or env_uri or f"sqlite:///{layout.mlflow_db}",
            layout=layout,
            local_default=tracking_uri is None and not env_uri,
            probe_timeout_s=probe_timeout_s,
        )

    def connect(self) -> MlflowClient:
        """A client that has read the store once.

        Raises:
            RegistryError: the tracking server or database cannot be reached, naming the URI.
        """
        self._probe()
        from mlflow import MlflowClient

        try:
            # MLflow creates and migrates an empty SQLite database on first use; two processes doing
            # it at once (replicas reloading together) collide on alembic's temporary tables.
            with self._init_lock():
                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                client.search_registered_models(max_results=1)
                client.search_experiments(max_results=1)
        except Exception as err:
            raise self._unreachable(err) from None
        return client

    def _unreachable(self, err: BaseException | str) -> RegistryError:
        if self.local_default:
            advice = f"check that {self.layout.root} is writable"
        else:
            advice = (
                "start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000 "
                "--backend-store-uri sqlite:///mlflow.db --serve-artifacts`), fix the URI, or unset "
                f"{ENV_TRACKING_URI} to use the local SQLite registry under the data directory"
            )
        return RegistryError(f"MLflow tracking URI {self.uri} is unreachable ({err}); {advice}")

    def _probe(self) -> None:
        parsed = urlparse(self.uri)
        if parsed.scheme in ("http", "https"):
            import httpx

            url = self.uri.rstrip("/") + "/health"
            try:
                resp = httpx.get(url, timeout=self.probe_timeout_s)
            except httpx.TimeoutException:
                raise self._unreachable(f"no answer within {self.probe_timeout_s:g}s") from None
            except httpx.HTTPError as err:
                raise self._unreachable(f"{type(err).__name__}: {err}") from None
            if resp.status_code >= 500:
                raise self._unreachable(f"GET /health answered HTTP {resp.status_code}")
        elif (db := self._sqlite_path()) is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise self._unreachable(err) from None

    def _init_lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialise first use of a local SQLite database across processes (no-op for servers)."""
        db = self._sqlite_path()
        if db is None:
            return contextlib.nullcontext()
        return exclusive_file_lock(f"{db}.init.lock")

    def _sqlite_path(self) -> Path | None:
        if urlparse(self.uri).scheme != "sqlite":
            return None
        db = self.uri[len("sqlite:///") :]
        return Path(db) if db and db != ":memory:" else None
