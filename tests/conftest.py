"""Shared fixtures: dataset paths, temporary data directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def ml100k_path() -> Path | None:
    """ML-100K directory from $STREAMREC_ML100K or ../shared/data/ml-100k; None if absent."""
    p = Path(os.environ.get("STREAMREC_ML100K", str(DEFAULT_ML100K)))
    return p if (p / "u.data").is_file() else None


@pytest.fixture(scope="session")
def ml100k() -> Path:
    p = ml100k_path()
    if p is None:
        pytest.skip("MovieLens 100K not found: set STREAMREC_ML100K or place it at ../shared/data/ml-100k")
    return p


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
