"""``streamrec monitor``: training-serving skew, daily drift and quality, the monitoring report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from streamrec.errors import StreamRecError
from streamrec.jsonsafe import json_safe
from streamrec.paths import resolve_data_dir

app = typer.Typer(
    help="Check the sampled request log: skew against training, drift by day, the HTML report.",
    no_args_is_help=True,
)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
VersionOpt = Annotated[
    str | None,
    typer.Option(
        "--model-version",
        help="Model version as serving logs it (v3). Default: the champion's if it served, else the most served.",
    ),
]
BundleOpt = Annotated[
    Path | None,
    typer.Option(
        "--bundle", help="Take the training statistics from this bundle directory, not the registry."
    ),
]


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


#: Exit code of a check that could not run (0: clean, 1: alerts).
NOT_CHECKED = 2


def not_checked(err: StreamRecError, as_json: bool) -> NoReturn:
    """Report a check that could not run and exit :data:`NOT_CHECKED`."""
    if as_json:
        typer.echo(json.dumps({"checked": False, "error": str(err), "error_type": type(err).__name__}))
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(NOT_CHECKED)


@app.command()
def skew(
    data_dir: DataDirOpt = None,
    model_version: VersionOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML of SkewConfig thresholds (unknown keys are errors).")
    ] = None,
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare the logged ranker inputs with the training statistics.

    Exit 0: no alert; 1: an alert fired; 2: nothing was checked (no request log, no bundle,
    bad thresholds: the error says which), so a scheduler tells "skewed" from "not checked".
    """
    from streamrec.config import load_config
    from streamrec.monitoring.skew import SkewConfig, check_skew

    try:
        cfg = load_config(config, SkewConfig) if config is not None else SkewConfig()
        report = check_skew(
            resolve_data_dir(data_dir), model_version=model_version, config=cfg, bundle_dir=bundle
        )
    except StreamRecError as err:
        not_checked(err, as_json)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), default=str))
    else:
        window = f"since {report.since:%Y-%m-%d %H:%M} UTC" if report.since else "whole log"
        typer.echo(
            f"model {report.model_version} ({report.version_source}), {report.impressions} ranker-scored "
            f"impressions, {window}; training bundle {report.training.get('bundle')}"
        )
        header = ["feature", "rows", "train_mean", "train_std", "serve_mean", "serve_std"]
        header += ["mean_shift", "std_ratio", "null_diff", "psi", "status"]
        rows = [
            [
                r.feature,
                str(r.rows),
                _num(r.train_mean),
                _num(r.train_std),
                _num(r.serve_mean),
                _num(r.serve_std),
                _num(r.mean_shift, "+.2f"),
                _num(r.std_ratio, ".2f"),
                _num(r.null_diff, "+.3f"),
                _num(r.psi, ".3f"),
                r.status,
            ]
            for r in report.rows
        ]
        typer.echo(_table(header, rows))
        for a in report.alerts:
            typer.echo(f"ALERT {a.message}")
        typer.echo(f"{len(report.alerts)} alert(s) over {report.features} feature(s)")
    if report.alerts:
        raise typer.Exit(1)


@app.command()
def drift(
    data_dir: DataDirOpt = None,
    model_version: VersionOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML of DriftConfig settings (unknown keys are errors).")
    ] = None,
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Feature and prediction drift per day (PSI vs training and vs the first day), quality per day."""
    from streamrec.config import load_config
    from streamrec.monitoring.drift import DriftConfig, feature_drift_by_day, quality_by_day

    try:
        cfg = load_config(config, DriftConfig) if config is not None else DriftConfig()
        root = resolve_data_dir(data_dir)
        by_day = feature_drift_by_day(root, model_version=model_version, config=cfg, bundle_dir=bundle)
        quality = quality_by_day(root, config=cfg)
    except StreamRecError as err:
        not_checked(err, as_json)
    alerts = by_day[by_day["status"] == "alert"]
    if as_json:
        payload = {
            "model_version": by_day["model_version"].iloc[0] if len(by_day) else model_version,
            "alerts": alerts.to_dict(orient="records"),
            "feature_drift": by_day.to_dict(orient="records"),
            "quality": quality.to_dict(orient="records"),
        }
        typer.echo(json.dumps(json_safe(payload), default=str))
        return
    version = by_day["model_version"].iloc[0] if len(by_day) else "?"
    typer.echo(
        f"drift of model {version} (max PSI {cfg.max_psi}; days with < {cfg.min_rows} rows not judged)"
    )
    rows = []
    for day, g in by_day.groupby("day", sort=True):
        feats = g[g["kind"] == "feature"]
        score = g[g["kind"] == "prediction"]

        def worst(col: str, frame: Any = feats) -> str:
            vals = frame.dropna(subset=[col])
            if vals.empty:
                return "-"
            top = vals.loc[vals[col].idxmax()]
            return f"{top[col]:.3f} ({top['feature']})"

        rows.append(
            [
                str(day),
                str(int(score["rows"].sum()) if len(score) else 0),
                worst("psi_train"),
                worst("psi_first_day"),
                _num(float(score["psi_first_day"].iloc[0]) if len(score) else None, ".3f"),
                str(int((g["status"] == "alert").sum())),
            ]
        )
    typer.echo(_table(["day", "rows", "max_psi_train", "max_psi_first_day", "score_psi", "alerts"], rows))
    if not quality.empty:
        typer.echo(
            f"\nquality (label window {cfg.label_window_hours:g} h, {cfg.confidence:.0%} Wilson interval)"
        )
        q_rows = [
            [
                str(r["day"]),
                str(r["model_version"]),
                str(r["impressions"]),
                f"{_num(r['ctr'], '.3f')} [{_num(r['ctr_low'], '.3f')}, {_num(r['ctr_high'], '.3f')}]",
                f"{_num(r['completion_rate'], '.3f')} "
                f"[{_num(r['completion_low'], '.3f')}, {_num(r['completion_high'], '.3f')}]",
                "yes" if r["labels_complete"] else "no",
            ]
            for r in quality.to_dict(orient="records")
        ]
        typer.echo(_table(["day", "model", "impressions", "ctr", "completion", "labels_complete"], q_rows))
    for a in alerts.to_dict(orient="records"):
        typer.echo(
            f"ALERT {a['day']}: '{a['feature']}' drifted (PSI vs training {_num(a['psi_train'], '.3f')}, "
            f"vs first day {_num(a['psi_first_day'], '.3f')})"
        )


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Write the monitoring report (one HTML page) and print its path."""
    from streamrec.monitoring.report import write_report

    typer.echo(str(write_report(resolve_data_dir(data_dir), out)))
