"""The monitoring report: one self-contained HTML page, missing data explained, deterministic."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from streamrec.errors import DataNotFoundError, StreamRecError
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, ServedRecord
from streamrec.monitoring.report import choose_bucket, write_report
from streamrec.paths import DataLayout
from streamrec.registry import MANIFEST_FILE, BundleFile, BundleManifest, FeatureHistogram, FeatureStats

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC).timestamp()
LEVEL_CYCLE = ["full"] * 6 + ["stale_features", "simple_ranking", "batch", "popularity"]
HEADINGS = (
    "Overview",
    "Latency",
    "Degradation levels",
    "Top degradation reasons",
    "Training-serving skew",
    "Feature and prediction drift by day",
    "Quality by day and model version",
)
IMG = '<img src="data:image/png;base64,'


def log_requests(data_dir: Path, n: int, *, step_s: float = 30.0, items: bool = False) -> None:
    """``n`` requests, one every ``step_s`` seconds from T0, at mixed levels, two model versions."""
    log = RequestLog(data_dir, RequestLogConfig(sample_rate=1.0), start=False)
    rng = np.random.default_rng(3)
    for i in range(n):
        level = LEVEL_CYCLE[i % len(LEVEL_CYCLE)]
        log.record(
            ServedRecord(
                request_id=f"req-{i}",
                ts=T0 + i * step_s,
                user_id=i % 40,
                variant="treatment" if i % 2 else "control",
                model_version="v1" if i < n // 2 else "v2",
                level=level,
                reason=None if level == "full" else f"{level}: deadline <exceeded>",
                latency_ms=float(rng.gamma(2.0, 25.0)) + (100.0 if level != "full" else 0.0),
                k=3,
                items=[(100 + j, 1.0 - j / 10, ("popular",)) for j in range(3)] if items else [],
            )
        )
    log.flush()


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, flags=re.S))


def test_report_of_hours_of_mixed_levels(tmp_path: Path) -> None:
    log_requests(tmp_path, 720)  # 6 hours, one every 30 s
    out = write_report(tmp_path, tmp_path / "out" / "report.html")

    assert out == tmp_path / "out" / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert (
        page.startswith("<!DOCTYPE html>") and page.count("<html") == 1 and page.rstrip().endswith("</html>")
    )
    assert "<script" not in page and "http://" not in page and "https://" not in page  # offline
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    found = sections(page)
    assert "<td>Requests logged</td><td>720</td>" in found["overview"]
    assert "<td>Model versions seen</td><td>v1, v2</td>" in found["overview"]
    assert "2026-11-20 09:00:00 UTC to 2026-11-20 14:59:30 UTC (5 h 59 min)" in found["overview"]
    assert IMG in found["latency"] and IMG in found["levels"]
    assert page.count(IMG) == 2
    # 6 hours of data: 5-minute buckets
    assert "<td>Time bucket of the plots</td><td>5 minutes</td>" in found["overview"]
    # the reasons table: one row per reason, the most frequent first, text escaped
    reasons = found["reasons"]
    assert "<script" not in reasons and "deadline &lt;exceeded&gt;" in reasons
    assert "288 of 720 logged requests (40.0%)" in reasons
    # the latency table has a row for every level, in the degradation order
    latency = found["latency"]
    order = [
        latency.index(f"<td>{lv}</td>") for lv in ("all", "full", "stale_features", "batch", "popularity")
    ]
    assert order == sorted(order)


def test_report_without_a_request_log_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"request_log\.sample_rate") as err:
        write_report(tmp_path, tmp_path / "report.html")
    assert isinstance(err.value, StreamRecError) and "send traffic" in str(err.value)
    assert not (tmp_path / "report.html").exists()


def test_requests_without_impressions_explain_the_missing_sections(tmp_path: Path) -> None:
    log_requests(tmp_path, 50)
    page = write_report(tmp_path, tmp_path / "report.html").read_text(encoding="utf-8")

    found = sections(page)
    for anchor in ("skew", "drift", "quality"):
        assert '<p class="missing">' in found[anchor], anchor
        assert "no impressions" in found[anchor]
        assert IMG not in found[anchor] and "<table" not in found[anchor]
    assert "<td>Impressions logged</td><td>0</td>" in found["overview"]
    assert IMG in found["latency"]


def test_all_full_means_no_degradation_reasons(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, RequestLogConfig(sample_rate=1.0), start=False)
    for i in range(5):
        log.record(ServedRecord(f"r{i}", T0 + i, 1, None, "v1", "full", None, 12.0, 3, []))
    log.flush()
    page = write_report(tmp_path, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "no degraded requests" in sections(page)["reasons"]
    assert "<td>Experiment variants seen</td><td>(none)</td>" in page


def test_the_report_is_deterministic(tmp_path: Path) -> None:
    log_requests(tmp_path, 300, step_s=120.0)
    first = write_report(tmp_path, tmp_path / "a.html").read_text(encoding="utf-8")
    second = write_report(tmp_path, tmp_path / "b.html").read_text(encoding="utf-8")

    def without_stamp(page: str) -> str:
        stamped = re.findall(r"generated at [^<]*", page)
        assert len(stamped) == 1
        return page.replace(stamped[0], "")

    assert without_stamp(first) == without_stamp(second)
    at = datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)
    fixed = write_report(tmp_path, tmp_path / "c.html", generated_at=at).read_text(encoding="utf-8")
    assert "generated at 2027-01-02 03:04:05 UTC" in fixed


@pytest.mark.parametrize(
    ("hours", "label"),
    [
        (0, "5 minutes"),
        (6, "5 minutes"),
        (12, "15 minutes"),
        (72, "1 hour"),
        (24 * 14, "6 hours"),
        (24 * 60, "1 day"),
    ],
)
def test_bucket_follows_the_span(hours: int, label: str) -> None:
    import pandas as pd

    first = pd.Timestamp("2026-11-01", tz="UTC")
    assert choose_bucket(first, first + pd.Timedelta(hours=hours))[1] == label


def write_bundle(data_dir: Path, name: str, stats: dict[str, FeatureStats]) -> None:
    """A bundle directory whose manifest holds ``stats`` (what the skew check reads)."""
    bundle = DataLayout.at(data_dir).models / "bundles" / name
    bundle.mkdir(parents=True)
    manifest = BundleManifest(
        name=name,
        created_at=datetime(2026, 11, 19, tzinfo=UTC),
        data_cutoff=datetime(2026, 11, 18, tzinfo=UTC),
        git_sha="0" * 40,
        feature_schema_version="1.0",
        feature_names=list(stats),
        files={"ranker": BundleFile(path="ranker.safetensors", sha256="0" * 64, size=1)},
        metrics={"ndcg@10": 0.1},
        eval_set_id="test",
        feature_stats=stats,
    )
    (bundle / MANIFEST_FILE).write_text(manifest.model_dump_json())


def log_scored(data_dir: Path, version: str, n: int, means: dict[str, float]) -> None:
    """``n`` full-level requests of 3 ranker-scored items each, feature values ~ N(mean, 1)."""
    log = RequestLog(data_dir, RequestLogConfig(sample_rate=1.0), start=False)
    rng = np.random.default_rng(11)
    names = tuple(means)
    for i in range(n):
        items: list[tuple[int, float, Sequence[str]]] = [
            (100 + j, 1.0 - j / 10, ("two_tower",)) for j in range(3)
        ]
        feats = {item: rng.normal(list(means.values()), 1.0) for item, _, _ in items}
        log.record(
            ServedRecord(
                f"s{i}",
                T0 + i * 60,
                i % 30,
                None,
                version,
                "full",
                None,
                40.0,
                3,
                items,
                names,
                feats,
                np.stack(list(feats.values())),  # the ranker-input sample the skew check reads
            )
        )
    log.flush()


def test_report_shows_a_skew_alert(tmp_path: Path) -> None:
    normal = FeatureStats(
        count=10_000,
        mean=0.0,
        std=1.0,
        null_fraction=0.0,
        histogram=FeatureHistogram(edges=[-3, -1, 0, 1, 3], counts=[1600, 3400, 3400, 1600]),
    )
    write_bundle(tmp_path, "bundle-a", {"age_days": normal, "ctr_7d": normal})
    log_scored(tmp_path, "bundle-a", 300, {"age_days": 0.0, "ctr_7d": 4.0})  # ctr_7d 4 sd off

    page = write_report(tmp_path, tmp_path / "report.html").read_text(encoding="utf-8")
    skew = sections(page)["skew"]
    alerts = re.findall(r'<p class="alert">(.*?)</p>', skew)
    assert alerts and all("ctr_7d" in a for a in alerts)
    assert any("mean" in a for a in alerts)
    assert '<td>age_days</td><td class="num">900</td><td>ok</td>' in skew
    assert '<td>ctr_7d</td><td class="num">900</td><td>alert</td>' in skew
    assert "bundle-a" in skew and '<p class="missing">' not in skew
    # the same log drives the daily drift table (ctr_7d far from its training histogram) ...
    drift = sections(page)["drift"]
    assert IMG in drift and '<p class="alert">' in drift
    assert re.search(r"<td>bundle-a</td><td>ctr_7d</td><td>feature</td>.*?<td>alert</td>", drift)
    # ... and the quality tables, which say that no click followed an impression
    quality = sections(page)["quality"]
    assert IMG in quality and "<h3>By model version</h3>" in quality
    assert "no click or completion" in quality


def test_the_cli_writes_the_report_and_prints_its_path(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streamrec.cli import app

    log_requests(tmp_path, 60)
    out = tmp_path / "reports" / "monitoring.html"
    result = CliRunner().invoke(app, ["monitor", "report", "--data-dir", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out) and out.is_file()
    assert "<td>Requests logged</td><td>60</td>" in out.read_text(encoding="utf-8")
    # no request log: a non-zero exit that says how to get one, and no file
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "streamrec", "monitor", "report", "--data-dir", str(empty), "--out", str(empty / "r.html")]
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # the installed entry point
    assert missing.returncode != 0 and "request_log.sample_rate" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr and not (empty / "r.html").exists()
