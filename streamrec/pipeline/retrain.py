"""Daily retraining: what a cron job, a Kubernetes CronJob or a scheduled Ray job calls.

It first exports the events the API logged (``POST /v1/events``) into the events store and
prunes old exported log segments (:func:`streamrec.data.event_export.export_event_log`), so that
served traffic becomes training data. Idempotent per day: a run records
``models/retrain/<date>.json`` with a fingerprint of the data it saw; a second run on the same
day with unchanged data returns that record instead of training again (``--force`` retrains
anyway). Incremental where it is cheap: ingest appends new days, the feature build rewrites
only the snapshots of the window, materialization is incremental, and the registry refuses to
promote a model that regresses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamrec.data.event_export import export_event_log
from streamrec.data.store import DataStore
from streamrec.paths import DataLayout
from streamrec.pipeline.config import TrainingConfig
from streamrec.pipeline.train import run_pipeline


def data_fingerprint(data_dir: str | Path) -> str:
    """A hash of what training would read: event partitions (names and sizes) and dimensions."""
    store = DataStore(data_dir)
    h = hashlib.sha256()
    root = store.layout.events
    if root.is_dir():
        for f in sorted(root.rglob("*.parquet")):
            h.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
    for p in (store.layout.users, store.layout.items):
        if p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def retrain(
    data_dir: str | Path,
    cfg: TrainingConfig,
    *,
    force: bool = False,
    today: datetime | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Retrain once per day on the data in ``data_dir``; see the module docstring."""
    layout = DataLayout.at(data_dir)
    day = (today or datetime.now(UTC)).date().isoformat()
    marker = layout.models / "retrain" / f"{day}.json"
    # The events the API logged since the last run become training data first (and change the
    # fingerprint when there are new ones).
    event_log = export_event_log(data_dir)
    if event_log is not None:
        ex = event_log["export"]
        log(
            f"event log: {ex['added']} new event(s) exported to the events store "
            f"({ex['already_present']} already there, {ex['quarantined'] + ex['corrupt_lines']} quarantined, "
            f"{ex['new_users']} new user(s) added to the users table, "
            f"{ex.get('new_items', 0)} item(s) upserted while serving added to the items table)"
        )
    fp = data_fingerprint(data_dir)
    if marker.is_file() and not force:
        rec: dict[str, Any] = json.loads(marker.read_text())
        if rec.get("data_fingerprint") == fp:
            log(f"already retrained on {day} with the same data ({marker}); pass --force to retrain")
            return {**rec, "skipped": True, "event_log": event_log}
    report = run_pipeline(data_dir, cfg, log=log)
    record = {
        "date": day,
        "data_fingerprint": fp,
        "bundle": report.get("bundle"),
        "registered_version": report.get("registered_version"),
        "promotion": report.get("promotion"),
        "summary": report.get("summary"),
        "fit": report.get("fit"),
        "event_log": event_log,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    try:
        from streamrec.registry.store import ModelRegistry

        age = ModelRegistry(data_dir=data_dir).model_age()
        record["champion_model_age_hours"] = round(age.total_seconds() / 3600, 2)
    except Exception as err:  # model age is informative; never fail a finished retrain on it
        record["champion_model_age_hours"] = None
        log(f"model age unavailable: {err}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2, default=str))
    return {**record, "skipped": False}
