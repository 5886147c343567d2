"""``streamrec train`` / ``streamrec retrain``: the outer loop from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from streamrec.paths import resolve_data_dir

app = typer.Typer()

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Training YAML (default: built-in defaults = configs/training/default.yaml)."
    ),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec).")
]


def _log(as_json: bool):  # type: ignore[no-untyped-def]
    return (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else (lambda m: print(m, flush=True))


def _config(config: Path | None, local: bool):  # type: ignore[no-untyped-def]
    from streamrec.pipeline.config import load_training_config

    cfg = load_training_config(config)
    if local:
        cfg.scaling.use_ray = False
    return cfg


@app.command()
def train(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    local: Annotated[
        bool, typer.Option("--local", help="Train in this process instead of Ray Train jobs.")
    ] = False,
    register: Annotated[
        bool, typer.Option(help="Register the bundle in MLflow and try to promote it.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the evaluation as one JSON object on stdout.")
    ] = False,
    rolling_folds: Annotated[
        int | None,
        typer.Option(
            "--rolling-folds",
            min=0,
            help="Also evaluate at N cutoffs ending at the test cutoff, each fold retrained on the "
            "events before it; reported per fold and pooled under `rolling` "
            "(evaluation.rolling.folds; 0 = off).",
        ),
    ] = None,
) -> None:
    """Train on what is ingested: features, models, evaluation vs baselines, registry, fallback."""
    from streamrec.pipeline.report import format_report
    from streamrec.pipeline.train import run_pipeline

    cfg = _config(config, local)
    if rolling_folds is not None:
        cfg.evaluation.rolling.folds = rolling_folds
    report = run_pipeline(resolve_data_dir(data_dir), cfg, register=register, log=_log(as_json))
    if as_json:
        typer.echo(json.dumps(report, default=str))
    else:
        typer.echo(format_report(report))


@app.command()
def retrain(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    local: Annotated[
        bool, typer.Option("--local", help="Train in this process instead of Ray Train jobs.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Retrain even if today's run already saw this data.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON on stdout.")] = False,
) -> None:
    """Daily retraining (idempotent per day): what a cron job or scheduled Ray job calls."""
    from streamrec.pipeline.retrain import retrain as run_retrain

    record = run_retrain(resolve_data_dir(data_dir), _config(config, local), force=force, log=_log(as_json))
    typer.echo(json.dumps(record, default=str) if as_json else json.dumps(record, indent=2, default=str))
