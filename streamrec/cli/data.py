"""``streamrec data``: build, ingest and inspect datasets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from streamrec.paths import resolve_data_dir

app = typer.Typer(
    help="Build the synthetic world, ingest MovieLens, inspect stored data.", no_args_is_help=True
)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _emit(payload: dict[str, object], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(payload, default=str))
    else:
        width = max(len(k) for k in payload)
        for k, v in payload.items():
            typer.echo(f"{k:<{width}}  {v}")


@app.command()
def ingest(
    path: Annotated[Path, typer.Option("--path", help="Directory holding the dataset files.")],
    fmt: Annotated[
        str, typer.Option("--format", help="Dataset format: ml-100k (u.data/u.item/u.user) or movielens-csv.")
    ] = "ml-100k",
    data_dir: DataDirOpt = None,
    max_invalid_fraction: Annotated[
        float, typer.Option(help="Fail (nothing stored) when more than this share of event rows is invalid.")
    ] = 0.01,
    as_json: JsonOpt = False,
) -> None:
    """Validate a MovieLens dataset against the data contract and store it (idempotent)."""
    from streamrec.config import parse_config
    from streamrec.data.ingest import IngestConfig
    from streamrec.data.ingest import ingest as run_ingest

    cfg = parse_config(
        {
            "format": fmt,
            "path": str(path),
            "data_dir": str(resolve_data_dir(data_dir)),
            "max_invalid_fraction": max_invalid_fraction,
        },
        IngestConfig,
        "command-line flags",
    )
    report = run_ingest(cfg)
    _emit(report.to_dict(), as_json)


@app.command()
def synth(
    users: Annotated[int, typer.Option(help="Number of users.", min=1)] = 2000,
    items: Annotated[int, typer.Option(help="Number of items.", min=1)] = 1000,
    days: Annotated[int, typer.Option(help="Simulated days of impressions.", min=1)] = 14,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same world).")] = 7,
    end: Annotated[
        str | None, typer.Option(help="End of the simulated window (ISO date/time, or 'now'; default fixed).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace synthetic data already in --data-dir.")] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate the deterministic synthetic world (users, items, impression logs, ground truth)."""
    from streamrec.config import parse_config
    from streamrec.data.synth import SynthConfig, synthesize

    raw: dict[str, object] = {"users": users, "items": items, "days": days, "seed": seed}
    if end is not None:
        when = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) if end == "now" else end
        raw["end"] = when
    cfg = parse_config(raw, SynthConfig, "command-line flags")
    counts = synthesize(cfg, resolve_data_dir(data_dir), progress=not as_json, overwrite=overwrite)
    _emit(dict(counts), as_json)


@app.command()
def stats(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Counts and time range of the stored data."""
    from streamrec.data.store import DataStore

    store = DataStore(data_dir)
    dates = store.event_dates()
    _emit(
        {
            "data_dir": str(store.layout.root),
            "users": len(store.users()),
            "items": len(store.items()),
            "events": store.count_events(),
            "first_day": dates[0].isoformat() if dates else None,
            "last_day": dates[-1].isoformat() if dates else None,
            "days": len(dates),
        },
        as_json,
    )


@app.command("export-events")
def export_events(
    data_dir: DataDirOpt = None,
    retain_days: Annotated[
        float | None,
        typer.Option(
            help="Then delete log segments exported and untouched for this many days "
            "(at least 1; default 7).",
            show_default=False,
        ),
    ] = None,
    prune: Annotated[bool, typer.Option(help="Delete old exported segments after the export.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Move the events the API logged (POST /v1/events) into the events store for training.

    Incremental and safe to re-run, also while the service keeps logging; `streamrec retrain`
    runs it first. Rows the data contract refuses go to the quarantine.
    """
    from streamrec.data.event_export import DEFAULT_RETAIN_DAYS, export_event_log

    root = resolve_data_dir(data_dir)
    days = DEFAULT_RETAIN_DAYS if retain_days is None else retain_days
    out = export_event_log(root, days if prune else None)
    if out is None:
        _emit({"data_dir": str(root), "event_log": "none: the API has logged no events here"}, as_json)
        return
    flat: dict[str, object] = {"data_dir": str(root)}
    flat.update({f"export.{k}": v for k, v in out["export"].items()})
    if out["prune"] is not None:
        flat.update({f"prune.{k}": v for k, v in out["prune"].items()})
    _emit(flat, as_json)
