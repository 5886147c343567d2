"""ML-100K ingest: counts, idempotency, and corrupted input going to quarantine with reasons."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from streamrec.data.ingest import IngestConfig, ingest
from streamrec.data.store import DataStore
from streamrec.errors import DataContractError, DataError, DataNotFoundError


def _cfg(path: Path, data_dir: Path, **kw: object) -> IngestConfig:
    return IngestConfig(format="ml-100k", path=str(path), data_dir=str(data_dir), **kw)


def test_ml100k_counts_and_idempotency(ml100k: Path, data_dir: Path) -> None:
    r = ingest(_cfg(ml100k, data_dir))
    assert (r.valid, r.quarantined, r.users, r.items) == (100_000, 0, 943, 1682)
    assert r.added == 100_000
    store = DataStore(data_dir)
    assert store.count_events() == 100_000
    ev = store.events()
    assert ev["event_id"].is_unique
    assert set(ev["label"].unique()) == {0, 1}
    items = store.items()
    assert items["categories"].map(len).min() >= 1
    assert items["published_at"].notna().all()
    # Same files again: nothing added.
    r2 = ingest(_cfg(ml100k, data_dir))
    assert r2.skipped_same_file and r2.added == 0
    assert store.count_events() == 100_000


def _copy(ml100k: Path, tmp: Path) -> Path:
    dst = tmp / "ml"
    dst.mkdir()
    for name in ("u.data", "u.item", "u.user"):
        shutil.copy(ml100k / name, dst / name)
    return dst


def test_corrupted_lines_are_quarantined_with_reasons(ml100k: Path, tmp_path: Path) -> None:
    src = _copy(ml100k, tmp_path)
    lines = (src / "u.data").read_text().splitlines()
    future = int(datetime(2999, 1, 1, tzinfo=UTC).timestamp())
    bad = {
        10: ("truncated", "196\t242"),
        20: ("delimiter", "196,242,3,881250949"),
        30: ("nonnumeric", "abc\t242\t3\t881250949"),
        40: ("rating", "196\t242\t9\t881250949"),
        50: ("future", f"196\t242\t3\t{future}"),
        60: ("unknown_item", "196\t99999\t3\t881250949"),
        70: ("before_epoch", "196\t242\t3\t-5"),
    }
    for idx, (_, text) in bad.items():
        lines[idx] = text
    lines.append(lines[100])  # exact duplicate of a valid line -> duplicate event id
    (src / "u.data").write_text("\n".join(lines) + "\n")

    r = ingest(_cfg(src, tmp_path / "d"))
    assert r.input_rows == len(lines)
    assert r.valid + r.quarantined == len(lines)
    assert r.quarantined == len(bad) + 1
    q = pd.read_parquet(r.quarantine_path)
    q = q[q["table"] == "events"].set_index("line")
    expected = {
        11: "malformed_line",
        21: "malformed_line",
        31: "non_numeric_user",
        41: "rating_out_of_range",
        51: "timestamp_in_future",
        61: "unknown_item",
        71: "timestamp_before_epoch",
        len(lines): "duplicate_event_id",
    }
    assert q["reason"].to_dict() == expected
    assert q.loc[21, "record"] == "196,242,3,881250949"
    assert DataStore(tmp_path / "d").count_events() == r.valid


def test_threshold_exceeded_stores_nothing(ml100k: Path, tmp_path: Path) -> None:
    src = _copy(ml100k, tmp_path)
    lines = (src / "u.data").read_text().splitlines()
    for i in range(0, 5000):
        lines[i] = lines[i].replace("\t", ";")
    (src / "u.data").write_text("\n".join(lines))
    with pytest.raises(DataContractError, match="max-invalid-fraction"):
        ingest(_cfg(src, tmp_path / "d", max_invalid_fraction=0.01))
    assert DataStore(tmp_path / "d").count_events() == 0
    assert list((tmp_path / "d" / "quarantine").glob("*.parquet"))


def test_not_movielens_and_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError):
        ingest(_cfg(tmp_path / "nope", tmp_path / "d"))
    junk = tmp_path / "junk"
    junk.mkdir()
    with pytest.raises(DataNotFoundError, match="ML-100K"):
        ingest(_cfg(junk, tmp_path / "d"))
    for name in ("u.data", "u.item", "u.user"):
        (junk / name).write_text("")
    with pytest.raises(DataError, match="empty"):
        ingest(_cfg(junk, tmp_path / "d"))
    (junk / "u.data").write_text("<html>not a dataset</html>\n" * 50)
    (junk / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||url" + "|0" * 18 + "|1\n")
    (junk / "u.user").write_text("1|24|M|technician|85711\n")
    with pytest.raises(DataContractError):
        ingest(_cfg(junk, tmp_path / "d"))


def test_incremental_overlap_adds_only_new(ml100k: Path, tmp_path: Path) -> None:
    src = _copy(ml100k, tmp_path)
    lines = (src / "u.data").read_text().splitlines()
    (src / "u.data").write_text("\n".join(lines[:60_000]) + "\n")
    r1 = ingest(_cfg(src, tmp_path / "d"))
    assert r1.added == 60_000
    (src / "u.data").write_text("\n".join(lines[40_000:]) + "\n")
    r2 = ingest(_cfg(src, tmp_path / "d"))
    assert (r2.added, r2.already_present) == (40_000, 20_000)
    assert DataStore(tmp_path / "d").count_events() == 100_000
