"""The CLI as a user runs it: JSON on stdout, one-line errors, no tracebacks for user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamrec", *args], capture_output=True, text=True, timeout=120
    )


def test_ingest_json(ml100k: Path, tmp_path: Path) -> None:
    p = run(
        "data", "ingest", "--format", "ml-100k", "--path", str(ml100k), "--data-dir", str(tmp_path), "--json"
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["valid"], out["quarantined"], out["users"], out["items"]) == (100000, 0, 943, 1682)


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    for args in (
        ("data", "ingest", "--path", str(tmp_path / "missing"), "--data-dir", str(tmp_path)),
        ("data", "ingest", "--format", "parquet", "--path", str(tmp_path), "--data-dir", str(tmp_path)),
        (
            "data",
            "ingest",
            "--path",
            str(tmp_path),
            "--max-invalid-fraction",
            "3",
            "--data-dir",
            str(tmp_path),
        ),
    ):
        p = run(*args)
        assert p.returncode != 0
        assert "Traceback" not in p.stderr
        assert p.stderr.strip().startswith("error:"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_help_everywhere() -> None:
    for args in ((), ("data",), ("data", "ingest"), ("data", "synth"), ("data", "stats")):
        p = run(*args, "--help")
        assert p.returncode == 0 and "Usage" in p.stdout
