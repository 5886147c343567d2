"""Training-serving skew against a real registry, real manifests and parquet logs written by RequestLog."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.errors import DataNotFoundError
from streamrec.models.train_loop import RankerData
from streamrec.monitoring.logs import RequestLog, RequestLogConfig, ServedRecord
from streamrec.monitoring.skew import SkewConfig, bucket_counts, check_skew, psi
from streamrec.pipeline.train import _feature_stats
from streamrec.registry import BundleManifest, ModelRegistry, describe_files, write_manifest

#: Ranker dense inputs of the test world (a user feature, a user rate, a cross score, context).
FEATURES = ("age", "engagement_rate_30d", "x_two_tower", "ctx_hour_sin")
CUTOFF = datetime(2026, 11, 20, tzinfo=UTC)

Draw = Callable[[int, np.random.Generator], np.ndarray]


def population(n: int, rng: np.random.Generator) -> np.ndarray:
    """The feature distribution training saw (and that a healthy serving path reproduces)."""
    return np.stack(
        [
            rng.normal(34, 9, n).clip(16, 80),
            rng.beta(2, 6, n),
            rng.normal(0.2, 0.15, n),
            np.sin(rng.uniform(0, 2 * np.pi, n)),
        ],
        axis=1,
    ).astype(np.float32)


def make_bundle(root: Path, name: str = "bundle-a", n_train: int = 5000, seed: int = 0) -> Path:
    """A bundle whose manifest holds the statistics training computes (``_feature_stats``)."""
    d = root / name
    d.mkdir(parents=True)
    np.save(d / "weights.npy", np.zeros(4, np.float32))
    dense = population(n_train, np.random.default_rng(seed))
    stats = _feature_stats(
        RankerData(dense=dense, sparse=np.zeros((n_train, 0), np.int64), labels=np.zeros(n_train)), FEATURES
    )
    manifest = BundleManifest(
        name=name,
        created_at=CUTOFF + timedelta(hours=1),
        data_cutoff=CUTOFF,
        git_sha="0123456789abcdef",
        feature_schema_version="1.0",
        feature_names=list(FEATURES),
        files=describe_files(d, {"ranker": "weights.npy"}),
        metrics={"ndcg@10": 0.1},
        eval_set_id="sha256:eval",
        feature_stats=stats,
    )
    write_manifest(d, manifest)
    return d


def write_log(
    data_dir: Path,
    rows: np.ndarray,
    *,
    version: str = "v1",
    start: datetime | None = None,
    k: int = 10,
    scores: np.ndarray | None = None,
    fallback_requests: int = 0,
    user_of: Callable[[int], int] = lambda r: r % 97,
) -> None:
    """Serve ``rows`` (one per item, ``k`` items a request) through the request log, flushed once.

    ``fallback_requests`` more requests are logged at the popularity level (no ranker features).
    """
    log = RequestLog(data_dir, RequestLogConfig(sample_rate=1.0), start=False)
    t0 = (start or datetime.now(UTC) - timedelta(minutes=30)).timestamp()
    sc = scores if scores is not None else np.linspace(0.9, 0.1, len(rows))
    for r, lo in enumerate(range(0, len(rows), k)):
        items = list(range(1000 + lo, 1000 + min(lo + k, len(rows))))
        log.record(
            ServedRecord(
                request_id=uuid.uuid4().hex,
                ts=t0 + r,
                user_id=user_of(r),
                variant=None,
                model_version=version,
                level="full",
                reason=None,
                latency_ms=20.0,
                k=k,
                items=[(i, float(sc[i - 1000]), ("two_tower",)) for i in items],
                feature_names=FEATURES,
                features={i: rows[i - 1000] for i in items},
                scored=np.stack([rows[i - 1000] for i in items]),  # the sample the skew check reads
            )
        )
    for r in range(fallback_requests):
        log.record(
            ServedRecord(
                request_id=uuid.uuid4().hex,
                ts=t0 + r + 0.5,
                user_id=r,
                variant=None,
                model_version="popularity-7d@2026-11-20T00:00",
                level="popularity",
                reason="funnel_timeout",
                latency_ms=150.0,
                k=k,
                items=[(5000 + j, 0.0, ("popularity",)) for j in range(k)],
            )
        )
    assert log.flush() == len(range(0, len(rows), k)) + fallback_requests


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir whose registry holds the bundle as v1, the champion (MLflow set-up is slow: once)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("skew-template")
    reg = ModelRegistry(data_dir=root / "data")
    info = reg.register(make_bundle(root / "bundles"))
    reg.promote(info.version)
    yield root / "data"
    mp.undo()


@pytest.fixture
def data(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tmp_path / "data"
    shutil.copytree(template, d)
    return d


def skewed(column: int, value: float, share: float) -> Draw:
    """The population, with ``column`` set to ``value`` for ``share`` of the rows (a serving default)."""

    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        x = population(n, rng)
        x[rng.random(n) < share, column] = value
        return x

    return draw


runner = CliRunner()


# ---- statistics ------------------------------------------------------------------------------


def test_buckets_are_open_ended_and_match_numpy_inside() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    assert bucket_counts([-5, 0, 0.5, 1, 2.999, 3, 99, np.nan], edges).tolist() == [3, 1, 3]
    x = np.random.default_rng(1).normal(size=1000)
    counts, e = np.histogram(x, bins=10)
    assert bucket_counts(x, e.tolist()).tolist() == counts.tolist()


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift() -> None:
    rng = np.random.default_rng(2)
    train = rng.normal(size=20_000)
    counts, edges = np.histogram(train, bins=10)
    assert psi(counts, counts) == pytest.approx(0.0)
    values = [psi(counts, bucket_counts(rng.normal(shift, 1, 5000), edges.tolist())) for shift in (0, 0.5, 1)]
    assert values[0] < 0.02 < 0.1 < values[1] < values[2]
    # An empty serving bin is floored at epsilon, not infinite.
    assert np.isfinite(psi([10, 10, 10], [30, 0, 0]))
    assert np.isnan(psi([1, 2], [0, 0]))


# ---- the check -------------------------------------------------------------------------------


def test_clean_serving_log_raises_nothing(data: Path) -> None:
    write_log(data, population(1000, np.random.default_rng(11)), fallback_requests=20)
    report = check_skew(data)
    assert report.alerts == []
    assert (report.model_version, report.version_source) == ("v1", "champion")
    assert report.features == len(FEATURES) and report.impressions == 1000  # fallback rows left out
    assert {r.status for r in report.rows} == {"ok"}
    age = next(r for r in report.rows if r.feature == "age")
    assert abs(age.mean_shift or 1) < 0.1 and 0.9 < (age.std_ratio or 0) < 1.1 and (age.psi or 1) < 0.05
    latest = json.loads((data / "monitoring" / "skew" / "latest.json").read_text())
    assert (latest["alerts"], latest["model_version"], latest["features"]) == (0, "v1", 4)
    assert latest["checked_at"] == report.checked_at.isoformat()


@pytest.mark.parametrize(
    ("column", "value", "share"),
    [
        (1, 0.0, 0.8),  # the stream features missing online: engagement rate defaulted to 0 for most users
        (0, -1.0, 0.7),  # a user feature's default changed from the population mean to -1
    ],
    ids=["rate-defaults-to-0", "age-default-minus-1"],
)
def test_changed_serving_default_is_detected_and_named(
    data: Path, column: int, value: float, share: float
) -> None:
    write_log(data, skewed(column, value, share)(1000, np.random.default_rng(12)))
    report = check_skew(data)
    name = FEATURES[column]
    assert {a.feature for a in report.alerts} == {name}
    assert {"mean_shift", "psi"} <= {a.metric for a in report.alerts}
    assert all(name in a.message for a in report.alerts)
    assert report.status_of(name) == "alert"
    assert all(report.status_of(f) == "ok" for f in FEATURES if f != name)
    psi_alert = next(a for a in report.alerts if a.metric == "psi")
    assert psi_alert.value is not None and psi_alert.value > psi_alert.threshold == 0.2
    assert json.loads((data / "monitoring" / "skew" / "latest.json").read_text())["alerts"] == len(
        report.alerts
    )


def test_too_few_rows_is_insufficient_not_an_alert(data: Path) -> None:
    write_log(data, skewed(1, 0.0, 0.9)(50, np.random.default_rng(13)))
    report = check_skew(data)
    assert report.alerts == []
    assert {r.status for r in report.rows} == {"insufficient"} and report.features == 4
    assert report.to_dict()["insufficient"] == list(FEATURES)
    # The same rows are judged once the threshold is below them (and at 50 rows the PSI of a clean
    # feature is noise of the order of the threshold, which is why min_rows exists).
    assert FEATURES[1] in {a.feature for a in check_skew(data, config=SkewConfig(min_rows=40)).alerts}


def test_null_rate_difference_alerts_only_the_null_rate(data: Path) -> None:
    x = population(1000, np.random.default_rng(14))
    x[np.random.default_rng(15).random(1000) < 0.2, 2] = np.nan
    write_log(data, x)
    report = check_skew(data)
    assert [(a.feature, a.metric) for a in report.alerts] == [("x_two_tower", "null_diff")]
    row = next(r for r in report.rows if r.feature == "x_two_tower")
    assert row.serve_null == pytest.approx(0.2, abs=0.04) and row.train_null == 0.0


def test_version_choice(data: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    write_log(data, population(400, rng), version="v1")
    write_log(data, population(900, rng), version="v7")  # served more, but not the champion
    assert check_skew(data).model_version == "v1"
    assert check_skew(data, model_version="1").version_source == "given"
    # A bundle directory instead of the registry: the most served version is checked against it.
    bundle = make_bundle(tmp_path / "other", "bundle-b", seed=3)
    r = check_skew(data, bundle_dir=bundle)
    assert (r.model_version, r.version_source, r.training["bundle"]) == ("v7", "bundle", "bundle-b")
    assert r.alerts == []
    with pytest.raises(DataNotFoundError, match=r"v3 .*versions seen: \['v1', 'v7'\]"):
        check_skew(data, model_version="v3")
    # Outside the window: nothing to check, said so.
    with pytest.raises(DataNotFoundError, match="no impression in the log window was scored"):
        check_skew(data, since=datetime.now(UTC) + timedelta(hours=1))


def test_no_request_log_says_how_to_enable_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"request_log\.sample_rate"):
        check_skew(tmp_path / "empty")
    assert not (tmp_path / "empty" / "mlflow.db").exists()  # no registry created as a side effect
    result = runner.invoke(app, ["monitor", "skew", "--data-dir", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "request_log.sample_rate" in result.output  # not checked != skewed
    result = runner.invoke(app, ["monitor", "skew", "--data-dir", str(tmp_path / "empty"), "--json"])
    out = json.loads(result.stdout.splitlines()[0])
    assert result.exit_code == 2 and out["checked"] is False and out["error_type"] == "DataNotFoundError"


# ---- the command -----------------------------------------------------------------------------


def test_cli_exit_codes_and_json_shape(data: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)
    write_log(clean, population(600, np.random.default_rng(17)))
    ok = runner.invoke(app, ["monitor", "skew", "--data-dir", str(clean), "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["features"] == 4 and out["alerts"] == [] and out["model_version"] == "v1"

    write_log(data, skewed(1, 0.0, 0.8)(600, np.random.default_rng(18)))
    bad = runner.invoke(app, ["monitor", "skew", "--data-dir", str(data), "--json"])
    assert bad.exit_code == 1
    out = json.loads(bad.stdout)
    assert out["features"] == 4 and {a["feature"] for a in out["alerts"]} == {"engagement_rate_30d"}
    assert set(out["alerts"][0]) == {"feature", "metric", "value", "threshold", "message"}

    table = runner.invoke(app, ["monitor", "skew", "--data-dir", str(data), "--model-version", "v1"])
    assert table.exit_code == 1
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["feature", "rows", "train_mean"]
    assert any(line.startswith("engagement_rate_30d") and line.endswith("alert") for line in lines)
    assert any(line.startswith("age") and line.endswith("ok") for line in lines)
    assert "ALERT feature 'engagement_rate_30d'" in table.stdout

    # Thresholds from a config file: a PSI limit no drift reaches silences the PSI alert only.
    cfg = tmp_path / "skew.yaml"
    cfg.write_text("max_psi: 100\nmin_rows: 100\n")
    loose = runner.invoke(app, ["monitor", "skew", "--data-dir", str(data), "--config", str(cfg), "--json"])
    assert "psi" not in {a["metric"] for a in json.loads(loose.stdout)["alerts"]}
    cfg.write_text("max_psi: 0.2\nmax_spi: 1\n")
    typo = runner.invoke(app, ["monitor", "skew", "--data-dir", str(data), "--config", str(cfg)])
    assert typo.exit_code == 2 and "max_spi" in typo.output


def test_skew_config_rejects_inverted_ratio_bounds() -> None:
    with pytest.raises(ValueError, match="min_std_ratio"):
        SkewConfig(min_std_ratio=2, max_std_ratio=1)


def test_log_written_now_is_in_the_default_window(data: Path) -> None:
    old = datetime.now(UTC) - timedelta(days=3)
    write_log(data, population(500, np.random.default_rng(19)), start=old, version="v1")
    with pytest.raises(DataNotFoundError, match="window"):
        check_skew(data)  # last 24 h by default: the 3-day-old traffic is out
    assert check_skew(data, config=SkewConfig(window_hours=None)).impressions == 500
    assert check_skew(data, since=old - timedelta(hours=1)).since == old - timedelta(hours=1)


def test_categorical_inputs_compare_category_shares() -> None:
    """The ranker's category/device ids: training counts from the real stats builder, shares compared."""
    from streamrec.models.train_loop import RankerData
    from streamrec.monitoring.skew import compare_feature
    from streamrec.pipeline.train import _categorical_stats
    from streamrec.ranking.features import Layout

    rng = np.random.default_rng(5)
    n = 5000
    cats = rng.choice(8, n, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])
    devices = rng.choice(3, n)
    data = RankerData(
        dense=np.zeros((n, 0), np.float32),
        sparse=np.stack([np.arange(n), cats, np.zeros(n, np.int64), devices], axis=1),
        labels=np.zeros(n, np.int64),
    )
    layout = Layout(dense=(), sparse=("item", "primary_category", "creator", "device"), cardinalities=(n, 8, 1, 3))
    stats = _categorical_stats(data, layout, top=6)
    assert set(stats) == {"primary_category", "device"}
    assert stats["primary_category"].categories is not None and "__other__" in stats["primary_category"].categories
    cfg = SkewConfig()
    same = rng.choice(8, 2000, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]).astype(float)
    row, alerts = compare_feature("primary_category", same, stats["primary_category"], cfg)
    assert row.status == "ok" and not alerts and row.serve_mean is None  # no moments for ids
    # Serving puts most requests in a category training never kept (e.g. a broken category map).
    shifted = np.where(rng.random(2000) < 0.6, 99, same)
    row, alerts = compare_feature("primary_category", shifted, stats["primary_category"], cfg)
    assert row.status == "alert" and [a.metric for a in alerts] == ["psi"]
    assert "'primary_category'" in alerts[0].message and "category shares" in alerts[0].message
    # Every request reported on one device (a serving default for a missing context field).
    row, alerts = compare_feature("device", np.zeros(2000), stats["device"], cfg)
    assert row.status == "alert" and alerts[0].feature == "device"
