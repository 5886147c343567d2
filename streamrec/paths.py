"""Where StreamRec keeps its files.

Everything a run produces lives under one *data directory*: ``--data-dir`` if given, else the
``STREAMREC_HOME`` environment variable, else ``./.streamrec``. The layout is fixed here so
every component (ingest, features, training, serving) agrees on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "STREAMREC_HOME"
DEFAULT_HOME = ".streamrec"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory: the argument, else ``$STREAMREC_HOME``, else ``./.streamrec``."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser().resolve() if env else Path(DEFAULT_HOME).resolve()


@dataclass(frozen=True)
class DataLayout:
    """The fixed directory layout under a data directory.

    Attributes:
        root: The data directory itself.
    """

    root: Path

    @classmethod
    def at(cls, data_dir: str | os.PathLike[str] | None = None) -> DataLayout:
        """Layout rooted at :func:`resolve_data_dir` of ``data_dir``."""
        return cls(resolve_data_dir(data_dir))

    @property
    def events(self) -> Path:
        """Validated events, hive-partitioned by ``event_date=YYYY-MM-DD``."""
        return self.root / "events"

    @property
    def users(self) -> Path:
        """Validated users (one parquet file, upserted by ``user_id``)."""
        return self.root / "users.parquet"

    @property
    def items(self) -> Path:
        """Validated items (one parquet file, upserted by ``item_id``)."""
        return self.root / "items.parquet"

    @property
    def quarantine(self) -> Path:
        """Rows that failed the data contract, with a ``reason`` column, one file per run."""
        return self.root / "quarantine"

    @property
    def reports(self) -> Path:
        """Validation reports and resolved run configurations (JSON)."""
        return self.root / "reports"

    @property
    def manifest(self) -> Path:
        """Ingest manifest: content hashes of files already ingested (idempotency)."""
        return self.root / "ingest_manifest.json"

    @property
    def truth(self) -> Path:
        """Ground truth of the synthetic world (never used for features)."""
        return self.root / "truth"

    @property
    def features(self) -> Path:
        """Feast offline store parquet files and the registry / online SQLite store."""
        return self.root / "features"

    @property
    def models(self) -> Path:
        """Model bundles, checkpoints and FAISS indexes."""
        return self.root / "models"

    @property
    def mlflow_db(self) -> Path:
        """Default MLflow tracking / registry database (SQLite)."""
        return self.root / "mlflow.db"

    @property
    def event_log(self) -> Path:
        """Durable log of events received by the serving API."""
        return self.root / "event_log"

    def ensure(self) -> DataLayout:
        """Create the root directory if missing and return self."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self


@contextlib.contextmanager
def exclusive_file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Serialises processes (and threads, each with its own open file) that share a data directory
    on one machine; the kernel releases it when the file closes, also if the holder dies.
    """
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
