"""`streamrec features` without servers: help, build on a tiny store, bad input, catalogue."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.data.store import DataStore
from streamrec.errors import InvalidPayloadError

T = pd.Timestamp("2026-03-10T00:00:00Z")


@pytest.fixture
def tiny(data_dir):
    store = DataStore(data_dir)
    store.upsert_users(pd.DataFrame({"user_id": [1, 2], "signup_at": [T - pd.Timedelta(days=3)] * 2}))
    store.upsert_items(
        pd.DataFrame(
            {
                "item_id": [10, 11],
                "categories": [["news"], ["sport"]],
                "creator": ["a", None],
                "published_at": [T - pd.Timedelta(days=9)] * 2,
                "promoted": [False, True],
                "flagged": [False, False],
            }
        )
    )
    ev = pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3"],
            "user_id": [1, 1, 2],
            "item_id": [10, 11, 10],
            "event_type": ["click", "impression", "complete"],
            "label": pd.array([1, 0, 1], dtype="int8"),
            "timestamp": [T - pd.Timedelta(hours=h) for h in (5, 4, 3)],
        }
    )
    store.append_events(ev)
    return data_dir


def test_help_lists_commands():
    out = CliRunner().invoke(app, ["features", "--help"])
    assert out.exit_code == 0
    for cmd in ("build", "apply", "materialize", "check"):
        assert cmd in out.output
    for cmd in ("build", "apply", "materialize", "check"):
        res = CliRunner().invoke(app, ["features", cmd, "--help"])
        assert res.exit_code == 0 and "--data-dir" in res.output


def test_build_json(tiny):
    res = CliRunner().invoke(
        app, ["features", "build", "--data-dir", str(tiny), "--snapshots", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["as_of"] == "2026-03-09T21:00:01+00:00"  # 'latest': one second after the last event
    assert len(report["snapshots"]) == 2 and report["rows"]["user_tenure"] == 4
    assert report["rows"]["user_profile"] == 2  # versioned: the second cutoff changed nothing
    files = sorted(p.name for p in (tiny / "features" / "offline" / "item_trending").iterdir())
    assert len(files) == 2 and all(f.startswith("snapshot-") for f in files)
    meta = json.loads((tiny / "features" / "meta.json").read_text())
    assert meta["category_vocab"] == ["news", "sport"] and "engagement_rate_prior" in meta["defaults"]
    # rebuilding the same cutoff replaces its files
    res = CliRunner().invoke(
        app, ["features", "build", "--data-dir", str(tiny), "--as-of", "2026-03-09T21:00:01Z"]
    )
    assert res.exit_code == 0
    assert len(list((tiny / "features" / "offline" / "item_trending").iterdir())) == 2


def test_build_without_data_fails_cleanly(tmp_path):
    import sys

    from streamrec.cli import main

    argv = sys.argv
    sys.argv = ["streamrec", "features", "build", "--data-dir", str(tmp_path / "empty")]
    try:
        with pytest.raises(SystemExit) as ex:
            main()
    finally:
        sys.argv = argv
    assert ex.value.code == 1


def test_bad_as_of(tiny):
    res = CliRunner().invoke(app, ["features", "build", "--data-dir", str(tiny), "--as-of", "yesterday-ish"])
    assert res.exit_code != 0 and "invalid --as-of" in str(res.exception)


def test_malformed_push_writes_nothing(tiny):
    from streamrec.features.client import FeatureClient

    fc = FeatureClient(tiny)
    bad = [
        {"user_id": 1, "item_id": 2, "event_type": "click"},
        {"user_id": "1", "item_id": 2, "event_type": "click"},
    ]
    with pytest.raises(InvalidPayloadError, match="event 1: 'user_id'"):
        fc.push_interactions(bad)
    for payload, msg in (
        ({"user_id": 1, "item_id": -2, "event_type": "click"}, "item_id"),
        ({"user_id": 1, "item_id": 2, "event_type": "like"}, "event_type"),
        ({"user_id": 1, "item_id": 2, "event_type": "click", "label": 3}, "label"),
        ({"user_id": 1, "item_id": 2, "event_type": "click", "timestamp": "not a time"}, "timestamp"),
        ([1, 2], "expected an object"),
    ):
        with pytest.raises(InvalidPayloadError, match=msg):
            fc.push_interaction(payload)  # type: ignore[arg-type]
    assert not (tiny / "features").exists()  # nothing written, Feast never touched


def test_catalogue_command(tmp_path):
    out = tmp_path / "cat.md"
    res = CliRunner().invoke(app, ["features", "catalogue", "-o", str(out)])
    assert res.exit_code == 0 and "`trending_score`" in out.read_text()
