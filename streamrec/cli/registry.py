"""``streamrec registry``: what operators do to the model registry by hand, each step recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from streamrec.paths import resolve_data_dir

app = typer.Typer(help="The model registry: versions, aliases, gated promotion, rollback, history.")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
AliasOpt = Annotated[str, typer.Option("--alias", help="champion, challenger or shadow.")]


def _registry(data_dir: Path | None) -> Any:
    from streamrec.registry.store import ModelRegistry

    return ModelRegistry(data_dir=resolve_data_dir(data_dir))


def _version_dict(info: Any, aliases: dict[str, int]) -> dict[str, Any]:
    return {
        "version": info.version,
        "aliases": sorted(a for a, v in aliases.items() if v == info.version),
        "registered_at": info.registered_at.isoformat(),
        "data_cutoff": info.data_cutoff.isoformat() if info.data_cutoff else None,
        "metrics": info.metrics,
    }


@app.command("list")
def list_versions(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every registered version with its aliases and offline metrics."""
    reg = _registry(data_dir)
    aliases = reg.aliases()  # (MLflow's version search does not fill them in)
    versions = [_version_dict(v, aliases) for v in reg.list_versions()]
    if as_json:
        typer.echo(json.dumps({"versions": versions}))
        return
    if not versions:
        typer.echo("no version registered: run `streamrec train`")
    for v in versions:
        ndcg = v["metrics"].get("ndcg@10")
        metric = f"  ndcg@10 {ndcg:.4f}" if ndcg is not None else ""
        aliases = ",".join(v["aliases"]) or "-"
        typer.echo(f"v{v['version']:<4} {aliases:<22} registered {v['registered_at'][:19]}{metric}")


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    to: Annotated[str, typer.Option("--to", "--alias", help="champion, challenger or shadow.")] = "champion",
    tolerance: Annotated[float, typer.Option(help="Allowed relative regression per metric.")] = 0.01,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Promote through the gates (bundle loads and scores, schema, no metric regression).

    The gates' tolerance and metric are this command's options (``ndcg@10``, 1%); a training
    config with other ``gates`` values is not read here.

    A refusal leaves every alias unchanged, names the gate and exits 1. The serving replicas'
    champion watcher reloads within its poll interval.
    """
    from streamrec.pipeline.train import smoke_test

    decision = _registry(data_dir).promote(
        version, to=to, tolerance=tolerance, smoke_test=smoke_test, raise_on_refusal=False
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "accepted": decision.accepted,
                    "version": decision.version,
                    "alias": decision.alias,
                    "previous_version": decision.previous_version,
                    "gates": [
                        {"gate": g.gate, "name": g.name, "passed": g.passed, "detail": g.detail}
                        for g in decision.gates
                    ],
                    "message": decision.message,
                }
            )
        )
    else:
        typer.echo(decision.message)
    if not decision.accepted:
        raise typer.Exit(1)


@app.command()
def rollback(
    alias: AliasOpt = "champion",
    reason: Annotated[str, typer.Option(help="Why (recorded in the history).")] = "rolled back by hand",
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the alias back to the version it held before its last move."""
    info = _registry(data_dir).rollback(alias, reason=reason)
    if as_json:
        typer.echo(json.dumps({"alias": alias, "version": info.version}))
    else:
        typer.echo(f"'{alias}' is v{info.version} again")


@app.command("set-alias")
def set_alias(
    alias: Annotated[str, typer.Argument(help="challenger or shadow (champion only with --force).")],
    version: Annotated[int, typer.Argument(help="The version.")],
    force: Annotated[bool, typer.Option(help="Move the champion without the gates (audited).")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Point an alias at a version without the gates (the champion: only with --force)."""
    info = _registry(data_dir).set_alias(alias, version, force=force)
    typer.echo(f"'{alias}' -> v{info.version}")


@app.command("clear-alias")
def clear_alias(
    alias: Annotated[str, typer.Argument(help="challenger or shadow.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Remove the challenger or shadow alias (an experiment ended)."""
    _registry(data_dir).clear_alias(alias)
    typer.echo(f"'{alias}' cleared")


@app.command()
def history(
    limit: Annotated[int, typer.Option(min=1, help="Most recent events shown.")] = 50,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What changed in the registry, newest first: what, when, why, the numbers."""
    events = _registry(data_dir).history(limit)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "events": [
                        {"at": e.at.isoformat(), "version": e.version, "event": e.event, "alias": e.alias, "detail": e.detail}
                        for e in events
                    ]
                },
                default=str,
            )
        )
        return
    if not events:
        typer.echo("no recorded change yet")
    for e in events:
        why = e.detail.get("message") or e.detail.get("reason") or ""
        if e.event.startswith("rollout_"):  # a rollout step: the share, the decision and its first reason
            share = e.detail.get("share")
            parts = [f"at {share:.0%}" if isinstance(share, int | float) else ""]
            parts += [str(e.detail["decision"])] if e.detail.get("decision") else []
            reasons = e.detail.get("reasons") or []
            why = " ".join(p for p in parts if p) + (f": {reasons[0]}" if reasons else "") + (f" {why}" if why else "")
        prev = e.detail.get("previous", e.detail.get("rolled_back_from"))
        typer.echo(
            f"{e.at:%Y-%m-%d %H:%M:%S}Z {e.event:<11} {e.alias:<10} v{e.version}"
            + (f" (was v{prev})" if prev is not None else "")
            + (f"  {why}" if why else "")
        )
