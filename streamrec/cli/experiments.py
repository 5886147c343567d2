"""``streamrec experiments``: simulate users against the API, analyse an experiment, write its report."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from streamrec.cli.monitor import DataDirOpt, JsonOpt, _num, _table, not_checked
from streamrec.errors import ConfigError, StreamRecError
from streamrec.paths import resolve_data_dir
from streamrec.timeutil import utc

if TYPE_CHECKING:
    from streamrec.experiments.analysis import ExperimentAnalysis

app = typer.Typer(
    help="Experiments: simulated users over HTTP, the analysis of treatment vs control, the HTML report.",
    no_args_is_help=True,
)

ExperimentOpt = Annotated[
    str | None,
    typer.Option("--experiment", help="Experiment name (default: the newest registered in the data dir)."),
]
ShareOpt = Annotated[
    float | None,
    typer.Option(
        "--expected-share",
        min=0.0,
        max=1.0,
        help="Treatment share the SRM check expects (default: the share in force from the registry).",
    ),
]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="First request time analysed, ISO 8601 (UTC when no zone).")
]
#: Decisions that exit 1.
FAILING = frozenset({"rollback", "invalid"})


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return utc(value)
    except ValueError as err:
        raise ConfigError(f"--since {value!r} is not an ISO 8601 time (e.g. 2026-11-20T12:00)") from err


def _definition(data_dir: Path, name: str | None) -> Any:
    from streamrec.experiments.report import resolve_definition

    config, registered = resolve_definition(data_dir, name)
    if not registered:
        typer.echo(
            f"no experiment registered in {data_dir}: using the default definition (name '{config.name}')",
            err=True,
        )
    return config


def _window(
    root: Path, config: Any, since: str | None, expected_share: float | None
) -> tuple[datetime | None, datetime | None, float | None]:
    """``(since, until, share)`` to judge: as given, else the rollout step :func:`advance` judges.

    Without ``--since`` and ``--expected-share``, the current rollout step of the experiment (or
    its last one, once the rollout ended): a window over several steps mixes shares and fails
    the sample-ratio check by construction.
    """
    from streamrec.experiments.rollout import step_window

    if since is None and expected_share is None:
        try:
            window = step_window(root, config)
        except StreamRecError:  # no registry: the whole log, at the share in force
            window = None
        if window is not None:
            start, until, share = window
            typer.echo(
                f"judging rollout step at {share:.0%} from {start.isoformat()}"
                + (f" to {until.isoformat()}" if until else "")
                + " (--since / --expected-share choose another window)",
                err=True,
            )
            return start, until, share
    return _since(since), None, expected_share


def _comparison_lines(analysis: ExperimentAnalysis) -> list[str]:
    rows = []
    for m in analysis.metrics:
        rows.append(
            [
                m.metric,
                f"{_num(m.control[0], '.4f')} [{_num(m.control[1], '.4f')}, {_num(m.control[2], '.4f')}]",
                f"{_num(m.treatment[0], '.4f')} [{_num(m.treatment[1], '.4f')}, {_num(m.treatment[2], '.4f')}]",
                f"{_num(m.lift[0], '+.1%')} [{_num(m.lift[1], '+.1%')}, {_num(m.lift[2], '+.1%')}]",
                _num(m.p_value, ".3g"),
                "" if m.comparable else m.note,
            ]
        )
    return [_table(["metric", "control", "treatment", "lift", "p", "note"], rows)]


def _decision_lines(analysis: ExperimentAnalysis) -> list[str]:
    lines = [f"decision: {analysis.decision}"]
    lines += [f"  - {r}" for r in analysis.reasons]
    return lines


@app.command()
def simulate(
    users: Annotated[int, typer.Option("--users", min=1, help="Distinct simulated users.")],
    requests: Annotated[int, typer.Option("--requests", min=1, help="Recommend requests to send.")],
    url: Annotated[str, typer.Option("--url", help="Base URL of the API.")] = "http://127.0.0.1:8000",
    prefix: Annotated[str, typer.Option("--prefix", help="Route prefix of the API (e.g. /streamrec).")] = "",
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="Items per request.")] = 20,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the users and of their reactions.")] = 0,
    data_dir: DataDirOpt = None,
    experiment: ExperimentOpt = None,
    expected_share: ShareOpt = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulated users of the synthetic world call the API; print CTR per variant and the decision.

    The API key comes from STREAMREC_API_KEY (read and write scopes). Exit 0 when the run
    finished (whatever the decision), 2 when it could not run.
    """
    from streamrec.experiments.report import expected_share_of
    from streamrec.experiments.simulate import simulate as run_simulation

    key = os.environ.get("STREAMREC_API_KEY", "")
    try:
        if not key:
            raise ConfigError(
                "STREAMREC_API_KEY is not set: export the API key of the server (a key with the read and "
                "write scopes) before simulating"
            )
        root = resolve_data_dir(data_dir)
        config = _definition(root, experiment)
        share = expected_share if expected_share is not None else expected_share_of(root, config)
        result = run_simulation(
            url,
            key,
            root,
            users=users,
            requests=requests,
            k=k,
            concurrency=concurrency,
            seed=seed,
            prefix=prefix,
            config=config,
            expected_share=share,
            progress=progress,
        )
    except StreamRecError as err:
        not_checked(err, as_json)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    typer.echo(
        f"{result.requests} requests to {result.url} in {result.wall_s:.1f} s, {result.events_posted} events "
        f"posted, {result.retries} retries; experiment '{config.name}', expected treatment share {share:.2%}"
    )
    rows = [
        [
            r["variant"],
            str(r["users"]),
            str(r["requests"]),
            str(r["impressions"]),
            f"{_num(r['ctr'], '.4f')} [{_num(r['ctr_low'], '.4f')}, {_num(r['ctr_high'], '.4f')}]",
            _num(r["completion_rate"], ".4f"),
            _num(r["latency_p50_ms"], ".1f"),
            _num(r["latency_p99_ms"], ".1f"),
            str(r["errors"]),
        ]
        for r in result.variant_rows()
    ]
    header = [
        "variant",
        "users",
        "requests",
        "impressions",
        "ctr",
        "completion",
        "p50_ms",
        "p99_ms",
        "errors",
    ]
    typer.echo(_table(header, rows))
    if result.failures:
        typer.echo("failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(result.failures.items())))
    if result.analysis is None:
        typer.echo("decision: none (control and treatment were not both served: is an experiment running?)")
        return
    typer.echo("\n".join(_comparison_lines(result.analysis) + _decision_lines(result.analysis)))


@app.command()
def analyse(
    data_dir: DataDirOpt = None,
    experiment: ExperimentOpt = None,
    since: SinceOpt = None,
    expected_share: ShareOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Analyse the logged experiment: treatment vs control, guardrails, decision.

    Exit 0: continue, ship or no_difference; 1: rollback or invalid; 2: nothing could be
    analysed (no request log, no treatment traffic: the error says which).
    """
    from streamrec.experiments.logged import analyse_experiment
    from streamrec.experiments.report import expected_share_of

    try:
        root = resolve_data_dir(data_dir)
        config = _definition(root, experiment)
        start, until, chosen = _window(root, config, since, expected_share)
        share = chosen if chosen is not None else expected_share_of(root, config)
        analysis = analyse_experiment(root, config, since=start, until=until, expected_share=share)
    except StreamRecError as err:
        not_checked(err, as_json)
    if as_json:
        typer.echo(json.dumps(analysis.to_dict()))
    else:
        typer.echo(f"experiment '{analysis.experiment}', expected treatment share {share:.2%}")
        rows = [
            [
                s.variant,
                str(s.users),
                str(s.requests),
                str(s.impressions),
                str(s.clicks),
                str(s.completions),
                _num(s.error_rate, ".2%"),
                _num(s.latency_p99_ms, ".1f"),
            ]
            for s in analysis.variants.values()
        ]
        header = ["variant", "users", "requests", "impressions", "clicks", "completions", "errors", "p99_ms"]
        typer.echo(_table(header, rows))
        typer.echo("\n".join(_comparison_lines(analysis) + _decision_lines(analysis)))
    if analysis.decision in FAILING:
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")],
    data_dir: DataDirOpt = None,
    experiment: ExperimentOpt = None,
    since: SinceOpt = None,
    expected_share: ShareOpt = None,
) -> None:
    """Write the experiment's report (one HTML page) and print its path."""
    from streamrec.experiments.report import resolve_definition, write_experiment_report

    root = resolve_data_dir(data_dir)
    start, _, share = _window(root, resolve_definition(root, experiment)[0], since, expected_share)
    path = write_experiment_report(root, out, name=experiment, since=start, expected_share=share)
    typer.echo(str(path))


@app.command("shadow-report")
def shadow_report_cmd(
    data_dir: DataDirOpt = None,
    experiment: ExperimentOpt = None,
    since: SinceOpt = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Shadow model version (default: the latest shadowed, e.g. v3)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The shadow's report: requests, correlation with production, latency, errors, score shift.

    ``is_ready_for_canary`` applies the experiment's shadow gates and names each blocking one.
    Exit 0: ready for canary; 1: a gate blocks; 2: no shadow run is logged.
    """
    from streamrec.experiments.shadow import shadow_report

    try:
        root = resolve_data_dir(data_dir)
        config = _definition(root, experiment)
        rep = shadow_report(root, config.shadow.gates, since=_since(since), version=version)
    except StreamRecError as err:
        not_checked(err, as_json)
    if as_json:
        typer.echo(json.dumps({"checked": True, **rep.to_dict()}))
    else:
        rows = [
            ["shadow version", rep.shadow_version],
            ["requests", str(rep.requests)],
            ["prediction correlation (median Spearman)", _num(rep.prediction_correlation, ".3f")],
            ["p50 latency ms", _num(rep.p50_latency_ms, ".1f")],
            ["p99 latency ms", _num(rep.p99_latency_ms, ".1f")],
            ["error rate", _num(rep.error_rate, ".2%")],
            ["score PSI vs production", _num(rep.score_psi, ".3f")],
        ]
        typer.echo(_table(["", "value"], rows))
        typer.echo(f"is_ready_for_canary: {rep.ready_for_canary}")
        for gate in rep.blocking:
            typer.echo(f"  - blocked by {gate}")
    if not rep.ready_for_canary:
        raise typer.Exit(1)


rollout_app = typer.Typer(
    help="Gradual rollout of the registry's challenger: 1% -> 5% -> 25% -> 50% -> 100%, judged step by step.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")


def _print_decision(decision: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(decision.to_dict(), default=str))
        return
    typer.echo(f"{decision.action}: v{decision.version}, treatment share now {decision.share:.0%}")
    for r in decision.reasons:
        typer.echo(f"  - {r}")


@rollout_app.command("start")
def rollout_start(
    version: Annotated[int, typer.Option("--version", help="Registry version to roll out (the challenger).")],
    data_dir: DataDirOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """Make VERSION the challenger at the first rollout step of the experiment's definition."""
    from streamrec.experiments import rollout

    root = resolve_data_dir(data_dir)
    config = _definition(root, experiment)
    state = rollout.start(root, config, version)
    typer.echo(
        f"v{state.version} is the challenger of '{config.name}' at {state.share:.0%} of users; "
        f"steps {', '.join(f'{s:.0%}' for s in config.rollout_steps)}. Judge each step with "
        "`streamrec experiments rollout advance` (cron, or --every)."
    )


@rollout_app.command("advance")
def rollout_advance(
    data_dir: DataDirOpt = None,
    experiment: ExperimentOpt = None,
    every: Annotated[
        float,
        typer.Option(
            "--every", min=0.0, help="Judge again every N seconds until the rollout ends (0: once)."
        ),
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Judge the current step: advance, hold, promote at 100%, or roll back on a guardrail breach.

    Exit 0 after an advance, hold or promotion; 1 after a rollback or a stop (the challenger is off).
    """
    import time

    from streamrec.experiments import rollout
    from streamrec.pipeline.train import smoke_test

    root = resolve_data_dir(data_dir)
    config = _definition(root, experiment)
    while True:
        decision = rollout.advance(root, config, smoke_test=smoke_test)
        _print_decision(decision, as_json)
        if decision.action in ("rolled_back", "stopped"):
            raise typer.Exit(1)
        if every <= 0 or decision.action == "promoted":
            return
        time.sleep(every)


@rollout_app.command("status")
def rollout_status(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """The rollout in progress (version, step, share, since when), if any."""
    from streamrec.experiments.rollout import read_rollout
    from streamrec.registry.store import ModelRegistry

    aliases, states = ModelRegistry(data_dir=resolve_data_dir(data_dir)).serving_state()
    state = read_rollout(states)
    body = {"aliases": aliases, "rollout": None if state is None else state.to_json()}
    if as_json:
        typer.echo(json.dumps(body))
    elif state is None:
        typer.echo(f"no rollout in progress (aliases: {aliases or 'none'})")
    else:
        typer.echo(
            f"experiment '{state.experiment}': v{state.version} at {state.share:.0%} of users "
            f"(step {state.step + 1}) since {state.since.isoformat()}"
        )
