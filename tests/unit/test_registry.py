"""Model registry against a real MLflow SQLite tracking store (no mocks; failures are injected
by wrapping one client method)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamrec.errors import ConfigError, CorruptCheckpointError, PromotionRefusedError, RegistryError
from streamrec.registry import (
    BundleManifest,
    FeatureStats,
    ModelRegistry,
    compare_metrics,
    describe_files,
    eval_set_fingerprint,
    read_manifest,
    schema_compatible,
    verify_bundle,
    write_manifest,
)

FEATURES = ["user_age", "item_popularity", "category_affinity"]
CUTOFF = datetime(2026, 11, 20, tzinfo=UTC)


def make_bundle(
    root: Path,
    name: str = "b1",
    *,
    metrics: dict[str, float] | None = None,
    schema: str = "1.0",
    features: list[str] | None = None,
    eval_set: str = "sha256:eval-a",
    seed: int = 0,
    cutoff: datetime = CUTOFF,
) -> Path:
    """A small but real bundle: torch state_dict, numpy embeddings, JSON config."""
    d = root / name
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    torch.save({"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)}, d / "ranker.pt")
    (d / "index").mkdir()
    np.save(
        d / "index" / "item_embeddings.npy", np.random.default_rng(seed).normal(size=(10, 8)).astype("f4")
    )
    files = describe_files(d, {"ranker": "ranker.pt", "item_embeddings": "index/item_embeddings.npy"})
    manifest = BundleManifest(
        name=name,
        created_at=cutoff + timedelta(hours=2),
        data_cutoff=cutoff,
        git_sha="0123456789abcdef",
        feature_schema_version=schema,
        feature_names=features if features is not None else FEATURES,
        files=files,
        metrics=metrics if metrics is not None else {"ndcg@10": 0.11, "recall@50": 0.30},
        eval_set_id=eval_set,
        feature_stats={"user_age": FeatureStats(mean=31.5, std=9.0, min=18, max=80, null_fraction=0.01)},
        config={"two_tower": {"dim": 128, "lr": 0.001}, "seed": seed},
    )
    write_manifest(d, manifest)
    return d


def smoke_ok(path: Path) -> None:
    state = torch.load(path / "ranker.pt", weights_only=True)
    emb = np.load(path / "index" / "item_embeddings.npy", allow_pickle=False)
    assert (torch.from_numpy(emb[:, :4]) @ state["w"]).shape == (10, 3)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated MLflow SQLite file (schema creation takes seconds); each test copies it."""
    d = tmp_path_factory.mktemp("mlflow-template")
    ModelRegistry(data_dir=d)
    return d / "mlflow.db"


@pytest.fixture
def reg(tmp_path: Path, migrated_db: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(migrated_db, data / "mlflow.db")
    return ModelRegistry(data_dir=data)


# ---- bundle format ---------------------------------------------------------------------------


def test_manifest_round_trip_and_rules(tmp_path: Path) -> None:
    d = make_bundle(tmp_path)
    m = read_manifest(d)
    assert verify_bundle(d) == m
    assert m.created_at.tzinfo is not None and m.feature_stats["user_age"].null_fraction == 0.01
    raw = m.model_dump()
    with pytest.raises(ValueError, match="pickle"):
        BundleManifest.model_validate(
            {**raw, "files": {"x": {"path": "model.pkl", "sha256": "0" * 64, "size": 1}}}
        )
    with pytest.raises(ValueError, match="relative"):
        BundleManifest.model_validate(
            {**raw, "files": {"x": {"path": "../x.pt", "sha256": "0" * 64, "size": 1}}}
        )
    with pytest.raises(ValueError, match="after created_at"):
        BundleManifest.model_validate({**raw, "data_cutoff": m.created_at + timedelta(days=1)})
    with pytest.raises(ValueError, match="unknown|extra"):
        BundleManifest.model_validate({**raw, "surprise": 1})
    assert eval_set_fingerprint(np.arange(5), "x") == eval_set_fingerprint(np.arange(5), "x")
    assert eval_set_fingerprint(np.arange(5)) != eval_set_fingerprint(np.arange(6))


def test_verify_bundle_names_the_bad_file(tmp_path: Path) -> None:
    d = make_bundle(tmp_path)
    emb = d / "index" / "item_embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0xFF
    emb.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"index/item_embeddings\.npy.*sha256"):
        verify_bundle(d)
    d2 = make_bundle(tmp_path, "b2")
    (d2 / "ranker.pt").rename(d2 / "ranker.pt.bak")
    with pytest.raises(CorruptCheckpointError, match=r"ranker\.pt.*missing"):
        verify_bundle(d2)
    (d2 / "ranker.pt.bak").rename(d2 / "ranker.pt")
    (d2 / "stray.bin").write_bytes(b"x")
    verify_bundle(d2)  # tolerated locally (never registered) ...
    with pytest.raises(CorruptCheckpointError, match="stray.bin"):
        verify_bundle(d2, strict=True)  # ... but not in a downloaded bundle
    (d2 / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="manifest.json"):
        verify_bundle(d2)


def test_gate_rules_pure(tmp_path: Path) -> None:
    base = read_manifest(make_bundle(tmp_path, "a"))
    same = base.model_copy(update={"feature_names": FEATURES[:2], "feature_schema_version": "1.1"})
    assert schema_compatible(same, base)[0]  # same major, subset of served features
    more = base.model_copy(update={"feature_names": [*FEATURES, "new_f"], "feature_schema_version": "1.1"})
    ok, why = schema_compatible(more, base)
    assert not ok and "new_f" in why
    assert not schema_compatible(base.model_copy(update={"feature_schema_version": "2.0"}), base)[0]
    assert not schema_compatible(base.model_copy(update={"feature_names": FEATURES[:1]}), base)[0]
    cmp = {
        c.metric: c
        for c in compare_metrics({"ndcg@10": 0.1, "logloss": 0.5}, {"ndcg@10": 0.1, "logloss": 0.4}, 0.01)
    }
    assert cmp["ndcg@10"].passed and not cmp["logloss"].passed and not cmp["logloss"].higher_is_better


def test_an_online_verdict_turns_the_no_regression_refusal_into_a_report(tmp_path: Path) -> None:
    from streamrec.registry.gates import no_regression_gate

    champ = read_manifest(make_bundle(tmp_path, "champ", metrics={"ndcg@10": 0.12, "coverage@10": 0.3}))
    worse = read_manifest(make_bundle(tmp_path, "cand", metrics={"ndcg@10": 0.05, "coverage@10": 0.1}))
    args: dict[str, Any] = {"earlier_passed": True, "tolerance": 0.01, "primary_metric": "ndcg@10"}
    refused, cmps = no_regression_gate(worse, champ, **args)
    assert refused.passed is False and "coverage@10 0.1000 < champion 0.3000" in refused.detail
    won = "experiment 'x' at 50%: ctr +40%"
    reported, same = no_regression_gate(worse, champ, online=won, **args)
    assert reported.passed is True and won in reported.detail and refused.detail in reported.detail
    assert [c.metric for c in same] == [c.metric for c in cmps]  # still compared, recorded
    elsewhere = worse.model_copy(update={"eval_set_id": "sha256:eval-b"})
    assert no_regression_gate(elsewhere, champ, **args)[0].passed is False
    assert no_regression_gate(elsewhere, champ, online=won, **args)[0].passed is True
    assert no_regression_gate(worse, champ, online=won, **{**args, "earlier_passed": False})[0].passed is None


# ---- registry --------------------------------------------------------------------------------


def test_default_uri_is_sqlite_under_data_dir(reg: ModelRegistry) -> None:
    assert reg.tracking_uri == f"sqlite:///{reg.layout.mlflow_db}"
    assert reg.get("champion") is None and reg.list_versions() == []


def test_two_replicas_downloading_one_version_at_once_both_get_it(reg: ModelRegistry, tmp_path: Path) -> None:
    """Two replicas preparing the same reload fill the shared cache at the same time: the one
    that finishes second uses the first one's copy instead of failing the reload."""
    reg.register(make_bundle(tmp_path, "b1"))
    other = ModelRegistry(data_dir=tmp_path / "data")
    fetch = reg._client.download_artifacts
    got: dict[str, Path] = {}

    def slow_fetch(*args: Any, **kwargs: Any) -> Any:
        local = fetch(*args, **kwargs)
        got["other"] = other.download(1)  # the other replica completes in the meantime
        return local

    reg._client.download_artifacts = slow_fetch  # type: ignore[method-assign]
    mine = reg.download(1)
    assert mine == got["other"] and verify_bundle(mine).name == "b1"
    assert [p.name for p in reg.cache_dir.iterdir() if p.name.startswith(".download-")] == []


def test_register_versions_aliases_and_download(reg: ModelRegistry, tmp_path: Path) -> None:
    b1 = make_bundle(tmp_path, "b1")
    (b1 / "training.config.json").write_text("{}")  # unlisted: stays behind
    v1 = reg.register(b1)
    v2 = reg.register(make_bundle(tmp_path, "b2", seed=1), run_name="daily-2")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.metrics == {"ndcg@10": 0.11, "recall@50": 0.30}
    assert v1.git_sha == "0123456789abcdef" and v1.feature_schema_version == "1.0"
    assert v1.data_cutoff == CUTOFF and v1.eval_set_id == "sha256:eval-a"
    # the artifacts live under <data_dir>/mlartifacts; run metrics use MLflow-safe names
    assert str(reg.artifact_root) in reg.get_version(1).source.replace("file://", "")
    run = reg._client.get_run(v1.run_id or "")
    assert run.data.metrics["ndcg_at_10"] == pytest.approx(0.11) and run.info.status == "FINISHED"
    assert run.data.params["config.two_tower.dim"] == "128"
    # same bundle again: idempotent
    assert reg.register(tmp_path / "b1").version == 1
    assert [v.version for v in reg.list_versions()] == [1, 2]

    reg.set_alias("challenger", 2)
    reg.set_alias("shadow", 1)
    assert reg.get("challenger").version == 2  # type: ignore[union-attr]
    assert reg.get("shadow").aliases == ("shadow",)  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="promote"):
        reg.set_alias("champion", 1)
    with pytest.raises(ConfigError, match="unknown alias"):
        reg.set_alias("canary", 1)
    reg.clear_alias("shadow")
    assert reg.get("shadow") is None

    local = reg.download("challenger")
    assert verify_bundle(local).name == "b2" and local.is_relative_to(reg.cache_dir)
    assert reg.download(2) == local  # cache reused
    dst = reg.download(1, tmp_path / "copy")
    assert read_manifest(dst).name == "b1" and not (dst / "training.config.json").exists()
    with pytest.raises(RegistryError, match="not empty"):
        reg.download(2, dst)


def test_corrupt_bundles(reg: ModelRegistry, tmp_path: Path) -> None:
    bad = make_bundle(tmp_path, "bad")
    (bad / "ranker.pt").write_bytes(b"truncated")
    with pytest.raises(CorruptCheckpointError, match="ranker.pt"):
        reg.register(bad)
    assert reg.list_versions() == []  # nothing logged for a bundle that does not verify

    v = reg.register(make_bundle(tmp_path, "good"))
    stored = Path(v.source.removeprefix("file://")) / "ranker.pt"
    rotten = bytearray(stored.read_bytes())
    rotten[100] ^= 0xFF  # bit rot in the artifact store
    stored.write_bytes(bytes(rotten))
    with pytest.raises(CorruptCheckpointError, match="ranker.pt"):
        reg.download(v.version, tmp_path / "dl")
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())
    d = reg.promote(v.version, raise_on_refusal=False)
    assert not d.accepted and d.failed_gate is not None and d.failed_gate.gate == 1
    assert reg.get("champion") is None


def test_promotion_gates(reg: ModelRegistry, tmp_path: Path) -> None:
    v1 = reg.register(make_bundle(tmp_path, "b1", metrics={"ndcg@10": 0.1100, "recall@50": 0.300}))
    first = reg.promote(v1.version, smoke_test=smoke_ok)
    assert first.accepted and first.previous_version is None
    assert [g.passed for g in first.gates] == [True, True, True]
    assert reg.get("champion").version == 1  # type: ignore[union-attr]

    # regression beyond tolerance: refused with the numbers, champion untouched
    worse = reg.register(make_bundle(tmp_path, "b2", seed=2, metrics={"ndcg@10": 0.1012, "recall@50": 0.299}))
    with pytest.raises(PromotionRefusedError) as exc:
        reg.promote(worse.version, smoke_test=smoke_ok)
    msg = str(exc.value)
    assert "gate 3" in msg and "ndcg@10 0.1012 < champion 0.1100 - 1% tolerance (-8.0%)" in msg
    assert "recall@50" not in msg  # -0.3% is within tolerance
    assert reg.get("champion").version == 1  # type: ignore[union-attr]
    d = reg.promote(worse.version, tolerance=0.1, raise_on_refusal=False)
    assert d.accepted and d.previous_version == 1  # within a 10% tolerance it passes
    assert reg.rollback().version == 1

    # smoke test failure: gate 1
    def smoke_fail(path: Path) -> None:
        raise RuntimeError("scores contain NaN")

    better = reg.register(make_bundle(tmp_path, "b3", seed=3, metrics={"ndcg@10": 0.12, "recall@50": 0.31}))
    with pytest.raises(
        PromotionRefusedError, match=r"gate 1 \(bundle\): smoke test failed: RuntimeError: scores contain NaN"
    ):
        reg.promote(better.version, smoke_test=smoke_fail)
    assert reg.get("champion").version == 1  # type: ignore[union-attr]

    # schema mismatch: gate 2 (and allow_schema_change lets an operator through)
    new_schema = reg.register(
        make_bundle(
            tmp_path, "b4", seed=4, schema="2.0", features=[*FEATURES, "watch_time"], metrics={"ndcg@10": 0.2}
        )
    )
    with pytest.raises(PromotionRefusedError, match=r"gate 2 \(feature_schema\).*major change"):
        reg.promote(new_schema.version)
    # different evaluation set: refused, asks to re-evaluate
    other_eval = reg.register(
        make_bundle(tmp_path, "b5", seed=5, eval_set="sha256:eval-b", metrics={"ndcg@10": 0.5})
    )
    d = reg.promote(other_eval.version, raise_on_refusal=False)
    assert not d.accepted and "re-evaluate" in d.message and "sha256:eval-a" in d.message
    assert reg.get("champion").version == 1  # type: ignore[union-attr]
    assert reg.get_version(other_eval.version).tags["streamrec.champion.refused"] == d.message

    # better: passes all gates; the previous champion is recorded for rollback
    ok = reg.promote(better.version, smoke_test=smoke_ok)
    assert ok.accepted and ok.previous_version == 1 and ok.comparisons[0].metric == "ndcg@10"
    assert "+9.1%" in ok.message
    assert reg.get("champion").version == better.version  # type: ignore[union-attr]
    assert reg.promote(new_schema.version, allow_schema_change=True).accepted
    assert reg.rollback().version == better.version
    assert reg.rollback().version == 1
    with pytest.raises(RegistryError, match="no previous version"):
        reg.rollback()


def test_model_age(reg: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not set"):
        reg.model_age()
    v = reg.register(make_bundle(tmp_path, "b1"))
    reg.promote(v.version)
    now = CUTOFF + timedelta(days=3)
    assert reg.model_age(now=now) == timedelta(days=3)
    assert reg.model_age(reference="created_at", now=now) == timedelta(days=3, hours=-2)


class _Boom(OSError):
    pass


def test_failure_midway_registers_nothing(
    reg: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = reg.register(make_bundle(tmp_path, "b1"))
    reg.promote(v1.version)
    client = reg._client
    real_log_artifact = client.log_artifact
    uploaded: list[str] = []

    def half_copy(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        # the first file is copied for real, then the "disk" fails
        if uploaded:
            raise _Boom("No space left on device")
        real_log_artifact(run_id, local_path, artifact_path)
        uploaded.append(local_path)

    monkeypatch.setattr(client, "log_artifact", half_copy)
    with pytest.raises(
        RegistryError, match="uploading the bundle artifacts.*No space left.*no model version"
    ):
        reg.register(make_bundle(tmp_path, "b2", seed=2))
    monkeypatch.setattr(client, "log_artifact", real_log_artifact)
    assert len(uploaded) == 1

    # a failure *after* the version was created: the version is deleted again
    real_set_terminated = client.set_terminated

    def fail_on_finish(run_id: str, status: str | None = None, *args: Any, **kwargs: Any) -> None:
        if status == "FINISHED":
            raise _Boom("tracking store went away")
        real_set_terminated(run_id, status, *args, **kwargs)

    monkeypatch.setattr(client, "set_terminated", fail_on_finish)
    with pytest.raises(RegistryError, match=r"finishing the run.*version \d+ deleted"):
        reg.register(make_bundle(tmp_path, "b3", seed=3))

    assert [v.version for v in reg.list_versions()] == [1]
    assert reg.get("champion").version == 1  # type: ignore[union-attr]
    runs = client.search_runs([reg._experiment()])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]


def test_unusable_sqlite_location_is_a_registry_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryError, match=r"sqlite:///.*a-file.*unreachable.*writable"):
        ModelRegistry(data_dir=blocker / "data")


def _open_registry(data_dir: str) -> str:
    try:
        ModelRegistry(data_dir=data_dir).get("champion")
    except Exception as err:  # reported to the parent, which names it
        return f"{type(err).__name__}: {err}"
    return "ok"


def test_processes_opening_a_fresh_registry_together_all_succeed(tmp_path: Path) -> None:
    """Replicas reloading at once each open the registry; MLflow's first-use migration of the
    empty SQLite database must run once, not race (alembic's ``_alembic_tmp_*`` tables)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        outcomes = pool.map(_open_registry, [str(tmp_path)] * 4)
    assert outcomes == ["ok"] * 4, outcomes
