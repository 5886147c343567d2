"""The command line on MovieLens 100K (SQLite and Redis), and plain `feast apply` in feature_repo/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamrec.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], env: dict[str, str] | None = None) -> dict:
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 0, (args, res.output, res.exception)
    return json.loads(res.stdout)


@pytest.mark.parametrize("backend", ["sqlite", "redis-from-env"])
def test_build_apply_materialize_check_on_ml100k(backend, ml100k, tmp_path, request):
    d = str(tmp_path / "data")
    env = {"STREAMREC_ONLINE_STORE": "", "STREAMREC_REDIS_URL": ""}
    if backend == "redis-from-env":
        env["STREAMREC_REDIS_URL"] = request.getfixturevalue("redis_url_factory")()
    run(["data", "ingest", "--format", "ml-100k", "--path", str(ml100k), "--data-dir", d, "--json"])
    built = run(["features", "build", "--data-dir", d, "--snapshots", "2", "--json"], env)
    assert built["users"] == 943 and built["items"] == 1682
    # versioned views: the catalogue and the profiles once (nothing changed between the two
    # cutoffs); the other views at each cutoff
    assert built["rows"]["item_metadata"] == 1682 and built["rows"]["user_profile"] == 943
    assert built["rows"]["user_tenure"] == 2 * 943 and built["rows"]["item_popularity"] == 2 * 1682
    applied = run(["features", "apply", "--data-dir", d, "--json"], env)
    assert applied["online_store"].startswith("redis" if backend != "sqlite" else "sqlite")
    mat = run(["features", "materialize", "--data-dir", d, "--json"], env)
    assert mat["views"]["item_metadata"]["rows"] == 1682 and mat["rows_per_second"] > 0
    again = run(["features", "materialize", "--data-dir", d, "--json"], env)
    assert again["rows"] == 0  # incremental: nothing new
    checked = run(["features", "check", "--data-dir", d, "--json", "--sample", "30"], env)
    assert checked["checked"] > 0 and checked["mismatches"] == 0
    yaml_text = (tmp_path / "data/features/feature_store.yaml").read_text()
    assert ("type: redis" in yaml_text) == (backend != "sqlite")


def test_check_exits_nonzero_before_apply(tmp_path):
    res = CliRunner().invoke(app, ["features", "check", "--data-dir", str(tmp_path / "nothing"), "--json"])
    assert res.exit_code != 0


def test_plain_feast_apply_works_in_feature_repo(tmp_path):
    features = tmp_path / "features"
    env = {**os.environ, "STREAMREC_FEATURES_DIR": str(features)}
    feast = Path(sys.executable).with_name("feast")
    res = subprocess.run(
        [str(feast), "-c", str(REPO / "feature_repo"), "apply"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (features / "registry.db").is_file()
    listed = subprocess.run(
        [str(feast), "-c", str(REPO / "feature_repo"), "feature-views", "list"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert listed.returncode == 0 and "item_trending" in listed.stdout
