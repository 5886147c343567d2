"""``streamrec features``: build, register, materialize and check the feature store."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Feature store (Feast): build batch features, apply definitions, materialize, check consistency.",
    no_args_is_help=True,
)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
OnlineOpt = Annotated[
    str | None,
    typer.Option(
        "--online-store",
        help="Online store: sqlite or redis (default: $STREAMREC_ONLINE_STORE, else redis when a Redis URL "
        "is set, else sqlite).",
    ),
]
RedisOpt = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL redis://host:port/db (default: $STREAMREC_REDIS_URL)."),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress on stderr (default: when stderr is a terminal)."),
]


def _client(data_dir: Path | None, online: str | None, redis_url: str | None) -> Any:
    from streamrec.features.client import FeatureClient

    return FeatureClient(data_dir, online=online, redis_url=redis_url)


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _emit(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(payload, default=str))
        return
    width = max(len(k) for k in payload)
    for k, v in payload.items():
        if isinstance(v, dict | list):
            v = json.dumps(v, default=str)
        typer.echo(f"{k:<{width}}  {v}")


@app.command()
def build(
    as_of: Annotated[
        str,
        typer.Option(
            "--as-of", help="Cutoff: ISO time (UTC), 'now', or 'latest' (just after the last stored event)."
        ),
    ] = "latest",
    snapshots: Annotated[
        int,
        typer.Option(help="Number of daily cutoffs ending at --as-of (more = finer point-in-time).", min=1),
    ] = 1,
    every_hours: Annotated[float, typer.Option(help="Hours between cutoffs.", min=0.001)] = 24.0,
    data_dir: DataDirOpt = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compute batch features from the validated data as of a cutoff into the offline store."""
    from streamrec.features.client import FeatureClient

    report = FeatureClient(data_dir).build(
        as_of, snapshots=snapshots, every=timedelta(hours=every_hours), progress=_progress(progress)
    )
    _emit(report.to_dict(), as_json)


@app.command()
def apply(
    data_dir: DataDirOpt = None,
    online_store: OnlineOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register the feature definitions (feature_repo/) in the data directory's Feast registry."""
    _emit(_client(data_dir, online_store, redis_url).apply(), as_json)


@app.command()
def materialize(
    end: Annotated[
        str | None,
        typer.Option("--end", help="Materialize rows up to this time (ISO, inclusive; default now)."),
    ] = None,
    data_dir: DataDirOpt = None,
    online_store: OnlineOpt = None,
    redis_url: RedisOpt = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load new offline feature rows into the online store (incremental per view)."""
    report = _client(data_dir, online_store, redis_url).materialize(end, progress=_progress(progress))
    _emit(report.to_dict(), as_json)


@app.command()
def check(
    sample: Annotated[int, typer.Option(help="Entities sampled per feature view.", min=1)] = 100,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    data_dir: DataDirOpt = None,
    online_store: OnlineOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare online values with the offline store; exit 1 on a mismatch, a schema problem or none compared.

    Nothing compared while offline rows exist means the store was never materialized.
    """
    report = _client(data_dir, online_store, redis_url).check(sample=sample, seed=seed)
    payload = report.to_dict()
    if as_json:
        _emit(payload, True)
    else:
        typer.echo(f"online store   {report.online_store}")
        typer.echo(f"checked        {report.checked} entity rows")
        typer.echo(f"mismatches     {report.mismatches} rows ({report.mismatched_values} values)")
        for view, counts in report.per_view.items():
            typer.echo(f"  {view:<26} checked {counts['checked']:>5}  mismatches {counts['mismatches']}")
        for d in report.details:
            typer.echo(
                f"  MISMATCH {d['view']} {d['entity']} {d['feature']}: "
                f"online={d['online']} offline={d['offline']}"
            )
        problems = {k: v for k, v in report.schema.items() if v}
        typer.echo(f"schema         {'ok' if not problems else json.dumps(problems)}")
        if report.unverified:
            typer.echo(f"unverified     {report.unverified}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def catalogue(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the feature catalogue (markdown tables generated from streamrec/features/spec.py)."""
    from streamrec.features.spec import catalogue_markdown

    text = catalogue_markdown()
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
