"""``streamrec registry``: list, gated promote, rollback, aliases and the recorded history.

A real MLflow SQLite registry (copied from the migrated template of ``test_registry.py``) and
real bundles with manifests; the CLI runs through typer's runner as a user would call it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.errors import ConfigError, RegistryError
from streamrec.registry import ModelRegistry
from tests.unit.test_registry import make_bundle, migrated_db, reg, smoke_ok  # noqa: F401 - fixtures

runner = CliRunner()


def _cli(reg: ModelRegistry, *args: str) -> tuple[int, str]:  # noqa: F811 - the fixture's type
    result = runner.invoke(app, ["registry", *args, "--data-dir", str(reg.layout.root)])
    return result.exit_code, result.stdout


def test_promotions_rollbacks_and_alias_moves_are_recorded_with_their_numbers(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.110, "recall@50": 0.30}))
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.120, "recall@50": 0.31}))
    v3 = reg.register(make_bundle(tmp_path, "b3", seed=3, metrics={"ndcg@10": 0.090, "recall@50": 0.29}))
    reg.promote(v1.version, smoke_test=smoke_ok)
    reg.promote(v2.version, smoke_test=smoke_ok)
    assert not reg.promote(v3.version, smoke_test=smoke_ok, raise_on_refusal=False).accepted
    reg.set_alias("shadow", v3.version)
    reg.rollback(reason="p99 over budget after the promotion")
    events = reg.history()
    assert [(e.event, e.alias, e.version) for e in events] == [
        ("rolled_back", "champion", 1),
        ("set", "shadow", 3),
        ("refused", "champion", 3),
        ("promoted", "champion", 2),
        ("promoted", "champion", 1),
    ]
    rolled, _, refused, promoted, _ = events
    assert rolled.detail == {"rolled_back_from": 2, "reason": "p99 over budget after the promotion"}
    assert refused.detail["gate"] == "no_regression" and "ndcg@10" in refused.detail["message"]
    assert promoted.detail["previous"] == 1
    assert promoted.detail["metrics"]["ndcg@10"] == {"candidate": 0.12, "champion": 0.11}

    code, out = _cli(reg, "history", "--json")
    assert code == 0 and [e["event"] for e in json.loads(out)["events"]][:2] == ["rolled_back", "set"]
    code, out = _cli(reg, "history")
    assert code == 0 and "rolled_back champion   v1 (was v2)  p99 over budget" in out
    code, out = _cli(reg, "list", "--json")
    versions = {v["version"]: v for v in json.loads(out)["versions"]}
    assert code == 0 and versions[1]["aliases"] == ["champion"] and versions[3]["aliases"] == ["shadow"]
    assert versions[2]["metrics"]["ndcg@10"] == 0.12


def test_cli_promote_runs_the_real_gates_and_a_refusal_exits_1(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    v1 = reg.register(make_bundle(tmp_path, "b1"))
    # The CLI's smoke test loads the bundle as serving would: this test bundle holds no real
    # models, so gate 1 refuses it and nothing moves.
    code, out = _cli(reg, "promote", str(v1.version), "--json")
    decision = json.loads(out)
    assert code == 1 and not decision["accepted"] and decision["gates"][0]["passed"] is False
    assert reg.get("champion") is None and reg.history()[0].event == "refused"
    result = runner.invoke(app, ["registry", "set-alias", "champion", str(v1.version), "--data-dir", str(reg.layout.root)])
    assert isinstance(result.exception, ConfigError) and reg.get("champion") is None  # only through the gates...
    code, out = _cli(reg, "set-alias", "champion", str(v1.version), "--force")
    assert code == 0 and reg.get("champion").version == v1.version  # type: ignore[union-attr]
    assert reg.history()[0].event == "forced"  # ...or an audited force
    result = runner.invoke(app, ["registry", "rollback", "--data-dir", str(reg.layout.root)])
    assert isinstance(result.exception, RegistryError)  # nothing to roll back to: an error, not a no-op


def test_the_console_entry_point_keeps_the_exit_codes(
    reg: ModelRegistry,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`streamrec ...` as installed (``main``, click outside standalone mode): a refusal is 1, an
    error a one-line message with its code; typer's test runner alone would not show this."""
    from streamrec.cli import main

    v1 = reg.register(make_bundle(tmp_path, "b1"))
    root = str(reg.layout.root)
    cases = [
        (["registry", "promote", str(v1.version), "--data-dir", root], 1),  # refused at gate 1
        (["registry", "rollback", "--data-dir", root], RegistryError.exit_code),
        (["registry", "set-alias", "champion", str(v1.version), "--data-dir", root], ConfigError.exit_code),
        (["monitor", "skew", "--data-dir", str(tmp_path / "no-log")], 2),  # nothing checked
        (["registry", "list", "--data-dir", root], 0),
    ]
    for argv, code in cases:
        monkeypatch.setattr("sys.argv", ["streamrec", *argv])
        try:
            main()
            got = 0
        except SystemExit as ex:
            got = int(ex.code or 0)
        assert got == code, (argv, got, capsys.readouterr())
    assert "error:" in capsys.readouterr().err


def test_an_event_too_long_for_a_tag_is_shortened_not_lost(reg: ModelRegistry, tmp_path: Path) -> None:  # noqa: F811
    v1 = reg.register(make_bundle(tmp_path, "b1"))
    reg.record_event(v1.version, "refused", "champion", message="x" * 30_000, metrics={"ndcg@10": 0.1})
    (event,) = reg.history()
    assert event.event == "refused" and event.detail["truncated"] is True and len(event.detail["message"]) < 1100
    with pytest.raises(ConfigError):
        reg.record_event(v1.version, "rollout 5%", "champion")  # free text belongs in detail
