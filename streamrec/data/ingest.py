"""Ingest: load -> validate (data contract) -> quarantine -> store, idempotently.

The report of every run (counts per rule, paths) is written under ``reports/`` with the
resolved configuration; quarantined rows go to ``quarantine/<run>.parquet``. When the share of
invalid event rows exceeds ``max_invalid_fraction`` nothing is stored and
:class:`~streamrec.errors.DataContractError` is raised (the quarantine and report are still
written, so the bad rows can be inspected).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from streamrec.config import StrictModel, record_config, utc_stamp
from streamrec.data.contract import validate_dimension, validate_events
from streamrec.data.movielens import LOADERS, LoadedData
from streamrec.data.store import DataStore, file_digest
from streamrec.errors import DataContractError

IngestFormat = Literal["ml-100k", "movielens-csv"]


class IngestConfig(StrictModel):
    """Resolved settings of one ingest run."""

    format: IngestFormat
    path: str
    data_dir: str
    max_invalid_fraction: float = Field(default=0.01, ge=0.0, le=1.0)


@dataclass
class IngestReport:
    """What one ingest run did. ``valid + quarantined == input_rows`` (event rows).

    ``dropped_index_columns`` names, per source file, the leading unnamed index columns (as
    pandas' ``to_csv`` writes) that were recognised and not ingested; empty when there were none.
    """

    source: str
    format: str
    input_rows: int = 0
    valid: int = 0
    quarantined: int = 0
    added: int = 0
    already_present: int = 0
    users: int = 0
    items: int = 0
    users_quarantined: int = 0
    items_quarantined: int = 0
    invalid_fraction: float = 0.0
    skipped_same_file: bool = False
    rules: dict[str, int] = field(default_factory=dict)
    dropped_index_columns: dict[str, list[str]] = field(default_factory=dict)
    quarantine_path: str | None = None
    report_path: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON output."""
        return asdict(self)


def _user_range_rules(users: pd.DataFrame) -> pd.DataFrame:
    users = users.copy()
    age = pd.to_numeric(users["age"], errors="coerce")
    users["_reason"] = np.where(age.notna() & ((age < 0) | (age > 120)), "age_out_of_range", "")
    return users


def ingest_loaded(
    loaded: LoadedData,
    store: DataStore,
    *,
    source: str,
    fmt: str,
    max_invalid_fraction: float = 0.01,
    now: datetime | None = None,
) -> IngestReport:
    """Validate and store already-loaded frames. See the module docstring for semantics."""
    run = f"ingest-{utc_stamp()}-{os.getpid()}"
    report = IngestReport(source=source, format=fmt, dropped_index_columns=dict(loaded.dropped_index_columns))

    users_v = validate_dimension(
        _user_range_rules(loaded.users), "user_id", "users", ["user_id", "signup_at"], source=source
    )
    items_v = validate_dimension(
        loaded.items, "item_id", "items", ["item_id", "published_at", "categories"], source=source
    )
    known_users = np.union1d(store.users()["user_id"].to_numpy(), users_v.valid["user_id"].to_numpy())
    known_items = np.union1d(store.items()["item_id"].to_numpy(), items_v.valid["item_id"].to_numpy())
    ev = validate_events(
        loaded.events,
        known_users,
        known_items,
        source=source,
        now=now,
        line_column="_line",
        raw_column="_raw",
    )

    quarantine = pd.concat(
        [loaded.parse_quarantine, users_v.quarantined, items_v.quarantined, ev.quarantined], ignore_index=True
    )
    is_event = quarantine["table"] == "events"
    report.input_rows = loaded.input_event_rows
    report.valid = len(ev.valid)
    report.quarantined = int(is_event.sum())
    report.users_quarantined = int((quarantine["table"] == "users").sum())
    report.items_quarantined = int((quarantine["table"] == "items").sum())
    rules: dict[str, int] = {}
    for (table, reason), n in quarantine.groupby(["table", "reason"]).size().items():
        rules[f"{table}.{reason}"] = int(n)
    report.rules = rules
    report.invalid_fraction = report.quarantined / report.input_rows if report.input_rows else 0.0
    assert report.valid + report.quarantined == report.input_rows

    layout = store.layout.ensure()
    if len(quarantine):
        layout.quarantine.mkdir(parents=True, exist_ok=True)
        qpath = layout.quarantine / f"{run}.parquet"
        quarantine.astype({"line": "Int64"}).to_parquet(qpath, index=False)
        report.quarantine_path = str(qpath)

    exceeded = report.invalid_fraction > max_invalid_fraction
    if not exceeded:
        store.upsert_users(users_v.valid)
        store.upsert_items(items_v.valid)
        res = store.append_events(ev.valid)
        report.added, report.already_present = res.added, res.already_present
    report.users = len(store.users())
    report.items = len(store.items())
    layout.reports.mkdir(parents=True, exist_ok=True)
    rpath = layout.reports / f"{run}.report.json"
    report.report_path = str(rpath)
    rpath.write_text(json.dumps(report.to_dict(), indent=2))
    if exceeded:
        raise DataContractError(
            f"{report.quarantined} of {report.input_rows} event rows ({report.invalid_fraction:.1%}) "
            f"failed the data contract, above --max-invalid-fraction {max_invalid_fraction:.1%}; "
            f"nothing was stored. Top reasons: {_top(rules)}. Inspect {report.quarantine_path} "
            "(possible schema drift or wrong --format)."
        )
    return report


def _top(rules: dict[str, int], n: int = 3) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(rules.items(), key=lambda kv: -kv[1])[:n]) or "none"


def ingest(cfg: IngestConfig, now: datetime | None = None) -> IngestReport:
    """Ingest a MovieLens directory into the data directory.

    A source whose files are byte-identical to one already ingested is skipped whole
    (``skipped_same_file``); overlapping files add only the events not yet stored.

    Raises:
        DataNotFoundError: the path or a required file is missing.
        DataError: the files are empty or not in the declared format.
        DataContractError: too many rows failed the contract (nothing stored).
    """
    store = DataStore(cfg.data_dir)
    loaded = LOADERS[cfg.format](cfg.path)
    digest = file_digest(loaded.source_files)
    if digest in store.manifest():
        report = IngestReport(
            source=cfg.path,
            format=cfg.format,
            skipped_same_file=True,
            dropped_index_columns=dict(loaded.dropped_index_columns),
        )
        report.input_rows = loaded.input_event_rows
        report.users, report.items = len(store.users()), len(store.items())
        report.already_present = report.input_rows
        counts = store.manifest()[digest].get("counts")
        report.valid = int(counts.get("valid", 0)) if isinstance(counts, dict) else 0
        report.quarantined = report.input_rows - report.valid
        return report
    report = ingest_loaded(
        loaded, store, source=cfg.path, fmt=cfg.format, max_invalid_fraction=cfg.max_invalid_fraction, now=now
    )
    record_config(
        store.layout.reports, Path(report.report_path or "ingest").name.replace(".report.json", ""), cfg
    )
    store.record_ingested(digest, cfg.path, {"valid": report.valid, "quarantined": report.quarantined})
    return report
