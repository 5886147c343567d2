"""``streamrec experiments simulate|analyse|report`` through typer's runner and the console entry point."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from streamrec.cli import app, main
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig, preregister
from tests.unit.test_experiment_analysis import logged  # noqa: F401  (fixture)
from tests.unit.test_experiment_simulate import KEY, gateway, routed, service, world  # noqa: F401

runner = CliRunner()


def test_analyse_prints_the_table_and_exits_1_on_rollback(logged: Path) -> None:  # noqa: F811
    r = runner.invoke(app, ["experiments", "analyse", "--data-dir", str(logged), "--expected-share", "0.5"])
    assert r.exit_code == 0 and "decision: continue" in r.stdout, r.output  # guardrails wait for 50 requests
    assert "no experiment registered" in r.stderr  # the defaults were used, and it says so
    preregister(logged, ExperimentConfig(name="tiny", guardrails={"min_requests": 1, "latency_p99_ms": 25.0}))
    r = runner.invoke(
        app, ["experiments", "analyse", "--data-dir", str(logged), "--experiment", "tiny", "--expected-share", "0.5"]
    )
    assert r.exit_code == 1, r.output
    assert "control" in r.stdout and "treatment" in r.stdout and "ctr" in r.stdout
    assert "decision: rollback" in r.stdout and "latency_p99_ms" in r.stdout


def test_analyse_json_and_a_registered_experiment(logged: Path) -> None:  # noqa: F811
    cfg = ExperimentConfig(name="lenient", guardrails={"error_rate_increase": 1.0})
    preregister(logged, cfg)
    r = runner.invoke(
        app,
        ["experiments", "analyse", "--data-dir", str(logged), "--experiment", "lenient"]
        + ["--expected-share", "0.5", "--json"],
    )
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["experiment"] == "lenient" and payload["decision"] == "continue"
    assert set(payload["variants"]) == {CONTROL, TREATMENT}
    assert payload["config"]["guardrails"]["error_rate_increase"] == 1.0
    # users are the clusters: per-user sums in the variants, the minimum sample size in users
    assert payload["variants"][CONTROL]["impressions_sq"] == 3**2 + 2**2  # users 1 and 2 saw 3 and 2 items
    size = payload["sample_size"]
    assert size["unit"] == "users" and (size["control"], size["treatment"]) == (2, 2)
    assert size["control_impressions_required"] == pytest.approx(2.5 * size["control_required"])
    ctr = next(m for m in payload["metrics"] if m["metric"] == "ctr")
    assert ctr["comparable"] and "users as clusters" in ctr["note"] and ctr["design_effect"] > 0
    reason = payload["reasons"][0]
    assert "control 2 of" in reason and " users, treatment 2 of " in reason
    assert "impressions at control's 2.5 per user" in reason
    missing = runner.invoke(
        app, ["experiments", "analyse", "--data-dir", str(logged), "--experiment", "nope"]
    )
    assert missing.exit_code == 2 and "no pre-registered experiment 'nope'" in missing.stderr


def test_analyse_takes_the_share_in_force_when_none_is_given(logged: Path) -> None:  # noqa: F811
    # no registry, so no challenger: the share in force is 0 and treatment traffic is a mismatch
    r = runner.invoke(app, ["experiments", "analyse", "--data-dir", str(logged), "--json"])
    assert r.exit_code == 1, r.output
    payload = json.loads(r.stdout)
    assert payload["expected_share"] == 0.0 and payload["decision"] == "invalid"


def test_analyse_without_a_log_is_not_checked(tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["experiments", "analyse", "--data-dir", str(tmp_path), "--json", "--expected-share", "0.5"]
    )
    assert r.exit_code == 2
    assert json.loads(r.stdout)["checked"] is False and "request_log.sample_rate" in r.stderr


def test_report_writes_the_page_and_prints_its_path(logged: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "exp.html"
    r = runner.invoke(
        app,
        ["experiments", "report", "--data-dir", str(logged), "--out", str(out), "--expected-share", "0.5"]
        + ["--since", "2000-01-01T00:00"],
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out) and 'id="guardrails"' in out.read_text()


def test_the_console_entry_point_keeps_the_exit_code(logged: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    preregister(logged, ExperimentConfig(name="tiny", guardrails={"min_requests": 1, "latency_p99_ms": 25.0}))
    argv = ["streamrec", "experiments", "analyse", "--data-dir", str(logged), "--expected-share", "0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as ex:
        main()
    assert ex.value.code == 1


def test_simulate_needs_the_api_key(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.delenv("STREAMREC_API_KEY", raising=False)
    r = runner.invoke(
        app, ["experiments", "simulate", "--users", "2", "--requests", "2", "--data-dir", str(world)]
    )
    assert r.exit_code == 2 and "STREAMREC_API_KEY is not set" in r.stderr


@pytest.fixture
def server(world: Path) -> Iterator[str]:  # noqa: F811
    """The gateway served over real HTTP by uvicorn on a free local port."""
    from streamrec.funnel.popularity import PopularityStages

    stages = PopularityStages.from_data_dir(world)
    api, log = gateway(world, routed(service(stages), service(stages)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        log.close()


def test_simulate_over_http_prints_ctr_per_variant_and_the_decision(
    world: Path,  # noqa: F811
    server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMREC_API_KEY", KEY)
    args = ["experiments", "simulate", "--users", "20", "--requests", "40", "--k", "10", "--url", server]
    args += ["--data-dir", str(world), "--expected-share", "0.5", "--seed", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "40 requests to" in r.stdout and "decision: continue" in r.stdout
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith((CONTROL, TREATMENT))}
    assert set(lines) == {CONTROL, TREATMENT} and "[" in lines[CONTROL]  # the CTR with its interval
    j = runner.invoke(app, [*args, "--json"])
    assert j.exit_code == 0, j.output
    payload = json.loads(j.stdout)
    assert payload["decision"] == "continue" and payload["requests"] == 40
    assert {v["variant"] for v in payload["variants"]} == {CONTROL, TREATMENT}
    assert payload["experiment"] == "default"  # nothing registered in the world: the defaults
