"""The outer loop end to end on a small synthetic world: features -> Ray Train -> evaluation ->
MLflow registry (gates) -> Ray Data fallback -> serving stages from the champion; plus the
pipeline's bad inputs (empty window, unreachable registry, corrupt bundle)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.api_models import RecommendRequest
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.errors import CorruptCheckpointError, RegistryError, TrainingDataError
from streamrec.pipeline.config import TrainingConfig
from streamrec.pipeline.train import run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def small_config(use_ray: bool = True) -> TrainingConfig:
    cfg = TrainingConfig()
    cfg.scaling.use_ray = use_ray
    cfg.scaling.cpus_per_worker = 0.5
    cfg.two_tower.epochs = 2
    cfg.two_tower.embedding_dim = 32
    cfg.ranker.epochs = 2
    cfg.retrieval.per_source = 60
    cfg.retrieval.merged = 150
    cfg.evaluation.candidate_counts = [50, 100]
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("world")
    synthesize(SynthConfig(users=400, items=300, days=8, seed=3), d, progress=False)
    report = run_pipeline(d, small_config(), log=lambda m: None)
    return d, report


def test_pipeline_report_and_registry(trained: tuple[Path, dict[str, Any]]) -> None:
    d, report = trained
    methods = {m["method"]: m for m in report["methods"]}
    assert {"most_popular", "item_knn", "als", "bpr", "streamrec_ranked", "streamrec_full"} <= set(methods)
    for m in methods.values():
        assert 0.0 <= m["ndcg@10"] <= 1.0 and m["n_users"] == report["summary"]["n_users"]
    funnel = report["funnel"]
    assert [r["candidates"] for r in funnel] == [50, 100]
    assert all(0.0 <= r["recall_merged"] <= 1.0 for r in funnel)
    assert report["registered_version"] == 1
    assert report["promotion"]["promoted"] is True
    bundle = Path(report["bundle"])
    assert json.loads((bundle / "manifest.json").read_text())["metrics"]["ndcg@10"] == pytest.approx(
        methods["streamrec_full"]["ndcg@10"]
    )
    # The Ray Data batch fallback holds top-N for the model's users.
    import pandas as pd

    fb = pd.read_parquet(report["fallback"])
    assert len(fb) > 0 and fb["item_ids"].map(len).max() <= 50


def test_serving_stages_from_champion(trained: tuple[Path, dict[str, Any]]) -> None:
    import asyncio

    from streamrec.funnel.recommender import build_stages
    from streamrec.funnel.stages import run_funnel

    d, _ = trained
    stages = build_stages(d)
    assert stages.model_version == "v1"

    async def call(name: str, *args: Any) -> Any:
        return getattr(stages, name)(*args)

    async def one(req: RecommendRequest) -> Any:
        return (await run_funnel(call, req, stages.source_names, 1.0))[4]

    known = int(stages.funnel.models.users.raw_ids[0])
    out = asyncio.run(one(RecommendRequest(user_id=known, k=10, exclude=[10**12])))
    assert len(out.items) == 10 and out.metadata.degradation_level == "full"
    assert out.metadata.unknown_exclude_ids == 1
    assert len({i.item_id for i in out.items}) == 10
    assert all(i.sources for i in out.items)
    cold = asyncio.run(one(RecommendRequest(user_id=10**9, k=5)))
    assert len(cold.items) == 5  # cold start: affinity prior + trending


def test_corrupt_bundle_is_refused(trained: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    import shutil

    from streamrec.bundle import LoadedBundle

    src = Path(trained[1]["bundle"])
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    (dst / "ranker" / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError):
        LoadedBundle(dst)


def test_empty_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no events"):
        run_pipeline(tmp_path, small_config(use_ray=False), register=False, log=lambda m: None)
    p = subprocess.run(
        [sys.executable, "-m", "streamrec", "train", "--data-dir", str(tmp_path), "--local", "--no-register"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode != 0 and "Traceback" not in p.stderr and "no events" in p.stderr


def test_too_small_window(tmp_path: Path) -> None:
    synthesize(SynthConfig(users=20, items=30, days=2, seed=1), tmp_path, progress=False)
    cfg = small_config(use_ray=False)
    cfg.split.min_train_events = 10**6
    with pytest.raises(TrainingDataError, match="min_train_events"):
        run_pipeline(tmp_path, cfg, register=False, log=lambda m: None)


def test_unreachable_tracking_server_registers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synthesize(SynthConfig(users=50, items=40, days=3, seed=1), tmp_path, progress=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(RegistryError):
        run_pipeline(tmp_path, small_config(use_ray=False), log=lambda m: None)
    assert not (tmp_path / "models" / "bundles").exists()  # failed before any work


def test_ranker_features_identical_single_and_batch(trained: tuple[Path, dict[str, Any]]) -> None:
    from streamrec.funnel.recommender import build_stages

    stages = build_stages(trained[0])
    f = stages.funnel
    ctx = f.context(int(f.models.users.raw_ids[1]), {}, now=1.8e9)
    items = np.arange(min(20, len(f.table)), dtype=np.int64)
    src = np.zeros((items.size, len(f.source_names)), np.float32)
    dense, sparse = f.ranker_inputs(ctx, items, src)
    for j in (0, 7, items.size - 1):
        d1, s1 = f.ranker_inputs(ctx, items[j : j + 1], src[j : j + 1])
        # float32 dot products over a batch of 20 vs 1 may round differently (BLAS kernels)
        np.testing.assert_allclose(d1[0], dense[j], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(s1[0], sparse[j])


def _funnel(stages: Any, req: RecommendRequest, *, across_processes: bool) -> Any:
    """The response of one request through the serving policy and stage runner (as a replica
    runs it); ``across_processes`` pickles every stage call's arguments and result, as the
    cluster composition's deployment handles do (each stage holds its own copies)."""
    import asyncio
    import pickle

    from streamrec.resilience import ResilienceConfig
    from streamrec.service.policy import FunnelService
    from streamrec.service.runner import StageRunner

    res = ResilienceConfig(request_budget_ms=60_000, online_store_ms=30_000, ranker_ms=30_000, context_ms=30_000,
                           level_timeouts_ms={"full": 60_000})  # fmt: skip
    local = StageRunner(res, 30.0).call_for(stages)

    async def call(name: str, *args: Any) -> Any:
        if across_processes:
            args = pickle.loads(pickle.dumps(args))
            return pickle.loads(pickle.dumps(await local(name, *args)))
        return await local(name, *args)

    async def primary() -> Any:
        return call, stages.source_names

    service = FunnelService(primary, None, res, 30.0, batch=lambda: stages.batch)
    return asyncio.run(service(req))


def test_offline_evaluation_serves_what_a_replica_serves(trained: tuple[Path, dict[str, Any]]) -> None:
    """The evaluation and the batch precompute (``recommend_offline``) run the serving stages through
    the same orchestration: given the same features and time they answer what a replica answers."""
    from datetime import UTC, datetime

    from streamrec.funnel.offline import recommend_offline
    from streamrec.funnel.recommender import build_stages

    stages = build_stages(trained[0])
    users = [int(u) for u in stages.funnel.models.users.raw_ids[:8]] + [10**9]  # and a cold start
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    offline = recommend_offline(stages, users, stages.read_features, k=10, now=now.timestamp())
    top = recommend_offline(stages, users, stages.read_features, k=10, now=now.timestamp(), rerank=False)
    for user, answer, unranked in zip(users, offline, top, strict=True):
        req = RecommendRequest(user_id=user, k=10, context={"timestamp": now})
        served = _funnel(stages, req, across_processes=False)
        assert served.metadata.degradation_level == "full"
        ids = stages.funnel.table.item_ids
        assert list(ids[answer.served]) == [i.item_id for i in served.items]
        assert unranked.served is None and len(unranked.unranked_top(10)) == 10
        assert not set(ids[unranked.unranked_top(10).items]) & set(ids[answer.context.history])


@pytest.mark.parametrize("across_processes", [False, True], ids=["in_process", "across_processes"])
def test_in_stage_degradation_levels(
    trained: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, across_processes: bool
) -> None:
    """Each in-stage fallback answers, and its level reaches the response in both compositions."""
    from streamrec.errors import OnlineStoreUnavailableError
    from streamrec.funnel.recommender import build_stages

    stages = build_stages(trained[0])
    users = stages.funnel.models.users.raw_ids
    seen, unseen = int(users[0]), int(users[1])

    def run(user: int) -> Any:
        return _funnel(stages, RecommendRequest(user_id=user, k=10), across_processes=across_processes)

    assert run(seen).metadata.degradation_level == "full"

    with monkeypatch.context() as m:  # the ranker fails: ordered by the merged retrieval score
        m.setattr(
            stages.funnel.ranker, "score", lambda *a: (_ for _ in ()).throw(RuntimeError("ranker down"))
        )
        out = run(seen)
        assert out.metadata.degradation_level == "simple_ranking" and len(out.items) == 10

    def store_down(user_id: int) -> Any:
        raise OnlineStoreUnavailableError("online store down (injected)")

    with monkeypatch.context() as m:  # the online store is down: last features seen, else defaults
        m.setattr(stages.features, "online_user_features", store_down)
        for user in (seen, unseen):
            out = run(user)
            assert out.metadata.degradation_level == "stale_features" and len(out.items) == 10

    with monkeypatch.context() as m:  # retrieval found nothing: the batch-precomputed top-N
        m.setattr(stages.funnel, "retrieve", lambda *a, **k: (np.empty(0, np.int64), np.empty(0, np.float32)))
        out = run(seen)
        assert out.metadata.degradation_level == "batch" and 0 < len(out.items) <= 10
        assert all(i.sources == ["batch"] for i in out.items)
    assert run(seen).metadata.degradation_level == "full"  # nothing sticks once the fault is gone


def test_rank_batch_scores_several_requests_in_one_pass(
    trained: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster Ranker's batched call: one forward pass, the same answer as one request at a
    time; a request whose inputs fail degrades alone."""
    from streamrec.funnel.recommender import build_stages

    stages = build_stages(trained[0])
    reqs = [RecommendRequest(user_id=int(u), k=10) for u in stages.funnel.models.users.raw_ids[:5]]
    reqs.append(RecommendRequest(user_id=10**9, k=10))  # cold start rides along
    ctxs = [stages.user_context(r) for r in reqs]
    merged = [stages.merge(c, {s: stages.retrieve(s, c) for s in stages.source_names}) for c in ctxs]
    alone = [stages.rank(c, m) for c, m in zip(ctxs, merged, strict=True)]

    calls: list[int] = []
    score = stages.funnel.ranker.score
    monkeypatch.setattr(stages.funnel.ranker, "score", lambda d, s: calls.append(len(d)) or score(d, s))
    together = stages.rank_batch(ctxs, merged)
    assert calls == [sum(len(m) for m in merged)]  # one forward pass for the six requests
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
        assert a.sources == b.sources and b.degraded == []

    calls.clear()
    broken = [*ctxs[:2], ctxs[2].__class__(**{**ctxs[2].__dict__, "state": None}), *ctxs[3:]]
    with pytest.raises(Exception):  # noqa: B017 - the stages raise; the runner degrades
        stages.rank_batch(broken, merged)
    import asyncio

    from streamrec.resilience import ResilienceConfig
    from streamrec.service.runner import StageRunner

    runner = StageRunner(ResilienceConfig(ranker_ms=30_000), 30.0)
    calls.clear()
    out = asyncio.run(runner.rank_batch(stages, broken, merged))
    assert calls == [len(m) for i, m in enumerate(merged) if i != 2]  # the others, one by one
    assert out[2].degraded == ["simple_ranking"]
    np.testing.assert_array_equal(
        out[2].items, merged[2].items[np.argsort(-merged[2].scores, kind="stable")][: len(out[2])]
    )
    for i in (0, 1, 3, 4, 5):
        np.testing.assert_array_equal(out[i].items, alone[i].items)
        assert out[i].degraded == []


def test_ranked_candidates_carry_the_rankers_own_inputs_for_the_request_log(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    """What the request log records is exactly what the ranker scored: the kept items' input rows,
    their ids, and a sample of rows over every scored candidate (what the skew check reads)."""
    from streamrec.funnel.recommender import SCORED_SAMPLE, build_stages

    stages = build_stages(trained[0])
    f = stages.funnel
    ctx = stages.user_context(RecommendRequest(user_id=int(f.models.users.raw_ids[0]), k=10))
    merged = stages.merge(ctx, {s: stages.retrieve(s, ctx) for s in stages.source_names})
    ranked = stages.rank(ctx, merged)
    assert ranked.feature_names == (*f.features.layout.dense, "primary_category", "device")
    assert ranked.ranker_inputs is not None
    assert ranked.ranker_inputs.shape == (len(ranked), len(ranked.feature_names))
    np.testing.assert_array_equal(ranked.ids, f.table.item_ids[ranked.items])
    pos = {int(i): j for j, i in enumerate(merged.items)}
    rows = np.asarray([pos[int(i)] for i in ranked.items])
    dense, sparse = f.ranker_inputs(ctx.state, merged.items[rows], merged.features[rows])
    expected = np.concatenate([dense, sparse[:, [1, 3]].astype(np.float32)], axis=1)  # + category, device
    np.testing.assert_allclose(ranked.ranker_inputs, expected, rtol=1e-5, atol=1e-6)  # float32 sums
    assert ranked.scored_sample is not None
    assert ranked.scored_sample.shape == (min(SCORED_SAMPLE, len(merged)), len(ranked.feature_names))
    dense, sparse = f.ranker_inputs(ctx.state, merged.items, merged.features)
    every = np.concatenate([dense, sparse[:, [1, 3]].astype(np.float32)], axis=1)
    assert all(any(np.allclose(r, e) for e in every) for r in ranked.scored_sample)
    simple = stages.simple_rank(ctx, merged)
    assert simple.ranker_inputs is None and simple.scored_sample is None  # no ranker, no ranker inputs


def test_stages_of_another_model_version_refuse_the_context(trained: tuple[Path, dict[str, Any]]) -> None:
    """Cluster replicas on two versions (mid-reload, or a replica started on another version):
    a later stage refuses the other version's context (the gateway falls back) instead of
    reading its item rows as its own."""
    from streamrec.errors import ServingError
    from streamrec.funnel.recommender import build_stages

    old = build_stages(trained[0])
    new = build_stages(trained[0])
    new.model_version = "v2"  # as if the champion had moved and this replica reloaded
    ctx = old.user_context(RecommendRequest(user_id=int(old.funnel.models.users.raw_ids[0]), k=10))
    assert ctx.model_version == "v1"
    parts = {s: old.retrieve(s, ctx) for s in old.source_names}
    merged = old.merge(ctx, parts)
    for call in (
        lambda: new.retrieve("two_tower", ctx),
        lambda: new.merge(ctx, parts),
        lambda: new.rank(ctx, merged),
        lambda: new.rerank(ctx, old.rank(ctx, merged)),
    ):
        with pytest.raises(ServingError, match="different versions"):
            call()


def test_a_bundle_that_loads_but_cannot_answer_is_refused(
    trained: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading (at start and in every reload's prepare) serves a test request first."""
    from streamrec.errors import ModelError
    from streamrec.models.scoring import RankerScorer
    from streamrec.service.args import ServeArgs
    from streamrec.service.loading import load_stages

    d = str(trained[0])
    assert load_stages(ServeArgs.parse({"data_dir": d, "stages": "recommender"})).kind == "recommender"

    def broken(self: Any, dense: Any, sparse: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (injected)")

    monkeypatch.setattr(RankerScorer, "score", broken)
    with pytest.raises(ModelError, match="failed a test request.*injected"):
        load_stages(ServeArgs.parse({"data_dir": d, "stages": "recommender"}))
    auto = load_stages(ServeArgs.parse({"data_dir": d, "stages": "auto"}))
    assert auto.kind == "popularity" and "injected" in auto.note


def test_ids_beyond_int64_are_unknown_not_errors(trained: tuple[Path, dict[str, Any]]) -> None:
    """The API takes any non-negative integer id; one beyond int64 is an unknown user (cold start)
    or an unknown exclude id (ignored, counted), never a failure that sends the request to the
    popularity fallback."""
    from streamrec.funnel.recommender import build_stages

    stages = build_stages(trained[0])
    cold = _funnel(stages, RecommendRequest(user_id=2**70, k=10), across_processes=False)
    assert cold.metadata.degradation_level == "full" and len(cold.items) == 10
    # The same cold-start answer as any other unknown id: no CF (no history), no error.
    other = _funnel(stages, RecommendRequest(user_id=10**9, k=10), across_processes=False)
    assert [i.item_id for i in cold.items] == [i.item_id for i in other.items]
    assert "cf" not in {s for i in cold.items for s in i.sources}

    known = int(stages.funnel.models.users.raw_ids[0])
    first = _funnel(stages, RecommendRequest(user_id=known, k=10), across_processes=False)
    drop = first.items[0].item_id
    out = _funnel(
        stages, RecommendRequest(user_id=known, k=10, exclude=[2**64, 2**80, drop]), across_processes=False
    )
    assert out.metadata.degradation_level == "full" and out.metadata.unknown_exclude_ids == 2
    assert drop not in {i.item_id for i in out.items} and len(out.items) == 10


def test_rerank_rules_come_from_the_serve_args(trained: tuple[Path, dict[str, Any]]) -> None:
    """``args.rerank`` of the Serve config reaches the re-ranker; seen items are the seen rule's."""
    from streamrec.errors import ConfigError
    from streamrec.funnel.recommender import build_stages
    from streamrec.funnel.stages import Candidates

    d = trained[0]
    with pytest.raises(ConfigError, match="max_per_cat"):
        build_stages(d, rerank={"diversity": {"max_per_cat": 1}})
    strict = build_stages(d, rerank={"diversity": {"max_per_category": 1, "window": 10}})
    assert strict.describe()["rerank"]["diversity"]["max_per_category"] == 1
    off = {"enabled": False}
    lax = build_stages(
        d,
        rerank={"content_policy": False, "hide_unpublished": False, "suppress_seen": False}
        | {"promotion": off, "freshness": off}
        | {"diversity": off, "fairness": off},
    )

    f = strict.funnel
    user = int(f.models.users.raw_ids[2])
    rows = np.arange(min(60, len(f.table)), dtype=np.int64)
    ranked = Candidates(rows, np.linspace(1.0, 0.0, rows.size, dtype=np.float32), [["cf"]] * rows.size)
    seen_id = int(f.table.item_ids[rows[0]])  # the best-scored candidate is in the user's history
    ctx = f.context(user, {"recent_item_ids": [seen_id]}, now=1.8e9)

    res = f.rerank(ctx, ranked, 10)
    assert seen_id not in {it.item_id for it in res.items} and res.summary.removed_seen == 1
    if not res.summary.diversity_backfilled:  # the cap held: one item per category in the top 10
        cats = [c for it in res.items for c in f.reranker.metadata.categories[it.item_index] if c >= 0]
        assert len(cats) == len(set(cats))

    res_lax = lax.funnel.rerank(ctx, ranked, 10)
    assert res_lax.items[0].item_id == seen_id and res_lax.summary.removed_seen == 0
    assert [it.item_index for it in res_lax.items] == list(rows[:10])  # no rule moved anything


def test_retrain_is_idempotent_per_day(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from streamrec.api_models import EventIn
    from streamrec.data.event_log import EventLog
    from streamrec.data.store import DataStore
    from streamrec.pipeline.retrain import retrain

    synthesize(SynthConfig(users=300, items=150, days=7, seed=5), tmp_path, progress=False)
    store = DataStore(tmp_path)
    # Events the API logged while serving: the daily run exports them into training data first.
    last = store.events(columns=["timestamp"])["timestamp"].max().to_pydatetime()
    user, item = int(store.users()["user_id"].iloc[0]), int(store.items()["item_id"].iloc[0])
    served = [
        EventIn.model_validate(
            {
                "event_id": f"api-{i}",
                "user_id": user,
                "item_id": item,
                "event_type": "click",
                "timestamp": last,
            }
        )
        for i in range(3)
    ]
    before = store.count_events()
    assert EventLog.open(tmp_path).append(served).stored == 3
    cfg = small_config(use_ray=False)
    cfg.split.min_train_events = 50
    day = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    first = retrain(tmp_path, cfg, today=day, log=lambda m: None)
    assert first["skipped"] is False and first["registered_version"] == 1
    assert first["event_log"]["export"]["added"] == 3 and store.count_events() == before + 3
    assert first["champion_model_age_hours"] is not None and first["champion_model_age_hours"] > 0
    again = retrain(tmp_path, cfg, today=day, log=lambda m: None)
    assert again["skipped"] is True and again["registered_version"] == 1
    assert again["event_log"]["export"]["read"] == 0  # nothing new since the first run
    assert (tmp_path / "models" / "retrain" / "2026-11-27.json").is_file()


def test_catalogue_changes_reach_the_trained_reranker_and_survive_a_reload(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    """Promoted and flagged upserts change what the trained model serves; a (re)load reads them all."""
    import shutil

    from streamrec.data.catalogue import CatalogueLog, CatalogueView
    from streamrec.funnel.recommender import build_stages
    from streamrec.service.args import ServeArgs
    from streamrec.service.loading import load_stages

    d = trained[0]
    stages = build_stages(d)
    user = int(stages.funnel.models.users.raw_ids[3])
    before = [i.item_id for i in _funnel(stages, RecommendRequest(user_id=user, k=10), across_processes=False).items]
    first, promote = before[0], before[-1]
    from streamrec.data.catalogue import sync_from_store

    # After a feature build only the ingested flags are missing from the log (flags are the
    # log's alone); nothing else is out of step (no false positives).
    from streamrec.data.store import DataStore

    ingested = DataStore(d).items()
    flagged_ids = sorted(int(i) for i in ingested.loc[ingested["flagged"], "item_id"])
    dry = sync_from_store(d, dry_run=True)
    assert dry["changed"] == len(flagged_ids) and dry["flagged"] == flagged_ids
    try:
        CatalogueLog(d).append([{"item_id": first, "flagged": True}, {"item_id": promote, "promoted": True}])
        view = CatalogueView(d)
        assert stages.apply_catalogue(view.state) is True
        assert stages.apply_catalogue(view.state) is False  # the same published state: in force
        after = _funnel(stages, RecommendRequest(user_id=user, k=10), across_processes=False).items
        assert first not in [i.item_id for i in after] and len(after) == 10
        boosted = [i for i in after if i.item_id == promote]
        assert boosted and "promoted_boost" in (boosted[0].reasons or [])
        assert stages.describe()["catalogue_lines"] == "2"
        reloaded = load_stages(ServeArgs.parse({"data_dir": str(d), "stages": "recommender"}))
        assert reloaded.stages.catalogue_lines == 2  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(d / "catalogue", ignore_errors=True)  # the module's other tests serve the bundle as trained


def test_new_catalogue_items_are_retrieved_ranked_and_served_without_a_reload(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    """An upserted item the bundle never saw joins the item table, the two-tower index, the
    affinity and trending sources; it is served (freshness quota), numbered alike by every
    process, never served once flagged, and still there after a (re)load."""
    import shutil
    import time as _time
    from datetime import UTC, datetime

    from streamrec.data.catalogue import CatalogueLog, CatalogueView
    from streamrec.funnel.recommender import build_stages
    from streamrec.funnel.stages import Candidates
    from streamrec.service.args import ServeArgs
    from streamrec.service.loading import load_stages

    d = trained[0]
    stages = build_stages(d)
    f0 = stages.funnel
    n0 = len(f0.table)
    users = [int(u) for u in f0.models.users.raw_ids[:40]]
    # The category most of these users prefer: a new item there is a candidate for its fans.
    aff = f0.models.affinity
    prefs = {u: aff.preferences(stages.user_context(RecommendRequest(user_id=u, k=10)).state.retrieval) for u in users}
    cat = int(np.bincount([int(p.argmax()) for p in prefs.values()]).argmax())
    favourite = f0.table.category_vocab[cat]
    fans = [u for u in users if int(prefs[u].argmax()) == cat]
    new_a, new_b = int(f0.table.item_ids.max()) + 1000, int(f0.table.item_ids.max()) + 2000
    now = datetime.now(UTC).isoformat()
    log = CatalogueLog(d)
    try:
        log.append([{"item_id": new_a, "title": "Brand new", "categories": [favourite], "published_at": now}])
        took = _time.perf_counter()
        assert stages.apply_catalogue(CatalogueView(d).state) is True
        took = _time.perf_counter() - took
        f1 = stages.funnel
        assert len(f1.table) == n0 + 1 and f1.table.index(new_a) == n0 and len(f0.table) == n0
        assert list(f1.added) == [new_a]
        row = n0
        # Two-tower: its item-tower vector is in the ANN index.
        ids, _ = f1.models.tt_index.search(f1.models.item_vectors[row], 1)
        assert ids[0, 0] == row
        ctxs = {u: stages.user_context(RecommendRequest(user_id=u, k=10)) for u in fans}
        by_source = {
            s: sum(row in stages.retrieve(s, ctxs[u]).items.tolist() for u in fans) for s in ("affinity", "two_tower")
        }
        assert by_source["affinity"] >= len(fans) // 2, by_source  # joins its category near the top
        answers = [_funnel(stages, RecommendRequest(user_id=u, k=10), across_processes=True) for u in fans]
        served = [a for a in answers if new_a in [i.item_id for i in a.items]]
        assert len(served) >= len(fans) // 2, by_source  # fresh: kept past the ranker's cut, placed by the quota
        hit = next(i for i in served[0].items if i.item_id == new_a)
        assert hit.title == "Brand new" and "freshness_quota" in (hit.reasons or [])
        print(f"new item applied in {took * 1000:.0f} ms; retrieved {by_source}; served to {len(served)}/{len(fans)}")

        # Cluster stages apply the log each on its own second: a Retriever already holding the new
        # row hands it to a Ranker / Reranker that does not yet; they leave it out, not fail.
        behind = build_stages(d)  # loads the bundle and the log as it was
        behind.apply_catalogue(CatalogueView(d).state)
        behind.funnel = f0  # as a replica one sync behind
        fan = next(u for u in fans if row in stages.retrieve("affinity", ctxs[u]).items.tolist())
        parts = {s: stages.retrieve(s, ctxs[fan]) for s in stages.source_names}
        ranked = behind.rank(ctxs[fan], behind.merge(ctxs[fan], parts))
        assert row not in ranked.items.tolist() and len(ranked) > 0
        merged = stages.merge(ctxs[fan], parts)
        assert row in merged.items.tolist()
        answer = behind.rerank(ctxs[fan], stages.rank(ctxs[fan], merged))
        assert len(answer.items) == 10 and new_a not in [i.item_id for i in answer.items]
        # A user who just clicked the new item: their history holds its row (Features ahead).
        clicked = stages.user_context(RecommendRequest(user_id=fan, k=10), {"recent_item_ids": [new_a]})
        assert row in clicked.state.history.tolist()
        assert len(behind.rerank(clicked, behind.rank(clicked, behind.merge(clicked, parts))).items) == 10
        # A state read before the one in force (two applies raced) never takes rows back.
        stale = CatalogueView(d).state
        log.append([{"item_id": new_a, "promoted": True}])
        assert stages.apply_catalogue(CatalogueView(d).state) is True
        assert stages.apply_catalogue(stale) is False and stages.funnel.table.index(new_a) == row

        # A second new item extends the first funnel (rows unchanged); another process numbers alike.
        log.append([{"item_id": new_b, "categories": [favourite], "published_at": now}])
        assert stages.apply_catalogue(CatalogueView(d).state) is True
        assert stages.funnel.table.index_of([new_a, new_b]).tolist() == [n0, n0 + 1]
        reloaded = load_stages(ServeArgs.parse({"data_dir": str(d), "stages": "recommender"})).stages
        assert reloaded.funnel.table.index_of([new_a, new_b]).tolist() == [n0, n0 + 1]  # type: ignore[attr-defined]
        np.testing.assert_allclose(
            reloaded.funnel.models.item_vectors[n0:], stages.funnel.models.item_vectors[n0:], rtol=1e-5  # type: ignore[attr-defined]
        )
        # Streamed clicks on a new item survive its renumbering (its categories changed).
        hot = stages.funnel.models.trending._score[n0]
        stages.apply_engagement(np.array([new_a] * 5), np.full(5, _time.time()), np.ones(5, np.int64))
        assert stages.funnel.models.trending._score[n0] > hot
        warm = stages.funnel.models.trending._score[n0]
        log.append([{"item_id": new_a, "categories": [favourite, f0.table.category_vocab[(cat + 1) % len(f0.table.category_vocab)]]}])
        assert stages.apply_catalogue(CatalogueView(d).state) is True
        assert stages.funnel.table.index(new_a) == n0 and stages.funnel.models.trending._score[n0] == warm
        # Flagged: never served again (the re-ranker drops it; the rows stay where they are).
        log.append([{"item_id": new_a, "flagged": True}])
        assert stages.apply_catalogue(CatalogueView(d).state) is True
        assert stages.funnel.table.index(new_a) == n0
        again = [_funnel(stages, RecommendRequest(user_id=u, k=10), across_processes=False) for u in users]
        assert not [a for a in again if new_a in [i.item_id for i in a.items]]
        # A release scheduled for tomorrow: in the catalogue and retrieved, never served before its time.
        new_c = int(f0.table.item_ids.max()) + 3000
        tomorrow = datetime.fromtimestamp(_time.time() + 86400, UTC).isoformat()
        log.append([{"item_id": new_c, "categories": [favourite], "published_at": tomorrow}])
        assert stages.apply_catalogue(CatalogueView(d).state) is True
        f2 = stages.funnel
        row_c = f2.table.index(new_c)
        ctxs = {u: stages.user_context(RecommendRequest(user_id=u, k=10)) for u in fans}
        assert any(row_c in stages.retrieve("affinity", ctxs[u]).items.tolist() for u in fans)
        scheduled = [_funnel(stages, RecommendRequest(user_id=u, k=10), across_processes=False) for u in fans]
        assert not [a for a in scheduled if new_c in [i.item_id for i in a.items]]
        assert all(len(a.items) == 10 for a in scheduled)
        # Even ranked first it is removed (its catalogue time reached the re-ranker) until its day.
        rows = np.concatenate([[row_c], np.arange(30, dtype=np.int64)])
        top_c = Candidates(rows, np.linspace(1.0, 0.0, rows.size, dtype=np.float32), [["affinity"]] * rows.size)
        res = f2.rerank(f2.context(fans[0], {}, now=_time.time()), top_c, 10)
        assert new_c not in {it.item_id for it in res.items} and res.summary.removed_unpublished == 1
        on_the_day = f2.rerank(f2.context(fans[0], {}, now=_time.time() + 2 * 86400), top_c, 10)
        assert on_the_day.items[0].item_id == new_c and on_the_day.summary.removed_unpublished == 0
    finally:
        shutil.rmtree(d / "catalogue", ignore_errors=True)  # the module's other tests serve the bundle as trained


def test_ranker_negatives_from_impressions_are_shown_items(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``ranker_sampling.negatives_from: impressions`` trains on what users were shown and skipped."""
    d = tmp_path / "world"
    synthesize(SynthConfig(users=400, items=300, days=8, seed=3), d, progress=False)
    cfg = small_config(use_ray=False)
    cfg.ranker_sampling.negatives_from = "impressions"
    cfg.gates.promote = False
    report = run_pipeline(d, cfg, log=lambda m: None)
    from_candidates = trained[1]["training"]["ranker_negatives_shown_share"]
    from_impressions = report["training"]["ranker_negatives_shown_share"]
    assert from_impressions > 0.5 and from_impressions > 2 * from_candidates, (from_impressions, from_candidates)
    assert report["registered_version"] == 1 and report["summary"]["ndcg@10_vs_best_baseline"] >= 0.0


@pytest.fixture(scope="module")
def refit_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[bool, dict[str, Any]]]:
    """One world trained in-process twice, registry off: ``refit_on_all`` on (the default) and off."""
    from streamrec.data.store import DataStore

    d = tmp_path_factory.mktemp("refit-world")
    synthesize(SynthConfig(users=400, items=300, days=8, seed=3), d, progress=False)
    reports: dict[bool, dict[str, Any]] = {}
    for refit in (True, False):
        cfg = small_config(use_ray=False)
        cfg.refit_on_all = refit
        reports[refit] = run_pipeline(d, cfg, register=False, log=lambda m: None)
    return DataStore(d).events(columns=["user_id", "item_id", "timestamp", "label"]), reports


def _bundle(report: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    b = Path(report["bundle"])
    return b, json.loads((b / "manifest.json").read_text())


def test_served_bundle_is_refit_on_all_history(refit_pair: tuple[Any, dict[bool, dict[str, Any]]]) -> None:
    """The bundle that serves has seen the users, items and events after the test cutoff; the one
    with ``refit_on_all: false`` has not (today's behaviour)."""
    import pandas as pd
    import scipy.sparse as sp

    events, reports = refit_pair
    (on, m_on), (off, m_off) = _bundle(reports[True]), _bundle(reports[False])
    t_test = pd.Timestamp(m_on["fit"]["evaluated"]["cutoff"])
    pos = events[events["label"] > 0]
    first = pos.groupby("user_id")["timestamp"].min()
    late_users = first.index[first >= t_test].to_numpy()
    first_item = pos.groupby("item_id")["timestamp"].min()
    late_items = first_item.index[first_item >= t_test].to_numpy()
    assert late_users.size and late_items.size  # the world has newcomers after the cutoff

    users_on, users_off = np.load(on / "user_ids.npy"), np.load(off / "user_ids.npy")
    assert np.isin(late_users, users_on).all() and not np.isin(late_users, users_off).any()
    assert set(users_on) == set(pos["user_id"])  # every user with a positive, up to the last event
    # The served matrix (CF, affinity, seen items) and the two-tower's id table cover them too.
    engaged = {}
    for b, m in ((on, m_on), (off, m_off)):
        train = sp.load_npz(b / "train.npz").tocsc()
        cols = np.flatnonzero(np.isin(np.load(b / "item_ids.npy"), late_items))
        engaged[b] = np.diff(train.indptr)[cols] > 0
        seen = pos[pos["timestamp"] < pd.Timestamp(m["fit"]["served"]["cutoff"])]
        assert train.nnz == len(seen.drop_duplicates(["user_id", "item_id"]))
    assert engaged[on].all() and not engaged[off].any()
    tt_on = json.loads((on / "two_tower" / "model.json").read_text())
    tt_off = json.loads((off / "two_tower" / "model.json").read_text())
    n_users = lambda meta: (meta.get("kwargs") or meta.get("hparams"))["n_users"]  # noqa: E731
    assert n_users(tt_on) == users_on.size > n_users(tt_off) == users_off.size

    # The manifest holds both fits; the served one ends at the last event.
    fit = m_on["fit"]
    ev, sv = fit["evaluated"], fit["served"]
    assert fit["refit_on_all"] is True and fit["refit_skipped"] is None
    assert pd.Timestamp(sv["last_event"]) == events["timestamp"].max() == pd.Timestamp(fit["test_window_end"])
    assert pd.Timestamp(m_on["data_cutoff"]) == events["timestamp"].max()
    assert sv["positives"] == len(pos) and ev["positives"] == int((pos["timestamp"] < t_test).sum())
    assert sv["users"] == users_on.size and ev["users"] == users_off.size
    # The refit's ranker window is the last ranker_fraction (25%) of all events, ending at the last
    # one (it reaches back past T_test, the evaluated fit's window ends there).
    expected = events["timestamp"].quantile(1 - 0.25, interpolation="higher")
    assert pd.Timestamp(sv["ranker_window_start"]) == expected > pd.Timestamp(ev["ranker_window_start"])
    before_test = events["timestamp"][events["timestamp"] < t_test]
    assert pd.Timestamp(ev["ranker_window_start"]) == before_test.quantile(1 - 0.25, interpolation="higher")
    assert sv["ranker_rows"] > 0 and ev == m_off["fit"]["evaluated"]
    assert reports[True]["fit"] == fit and "refit_retrieval_b" in reports[True]["timings_s"]

    # Switch off: the bundle serves the evaluated fit, as before.
    assert m_off["fit"]["refit_on_all"] is False and m_off["fit"]["served"] == m_off["fit"]["evaluated"]
    assert pd.Timestamp(m_off["data_cutoff"]) == t_test
    assert "refit_retrieval_b" not in reports[False]["timings_s"]


def test_refit_keeps_the_held_out_numbers(refit_pair: tuple[Any, dict[bool, dict[str, Any]]]) -> None:
    """Metrics, funnel, summary, the manifest's metrics and eval set: the held-out fit's, refit or not."""
    _, reports = refit_pair
    on, off = reports[True], reports[False]
    assert {"methods", "funnel", "summary", "fit"} <= set(on)

    def numbers(report: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in m.items() if "@" in k or k in ("method", "ci", "n_users")}
            for m in report["methods"]
        ]

    assert numbers(on) == numbers(off)
    assert on["funnel"] == off["funnel"] and on["summary"] == off["summary"]
    assert on["training"] == off["training"]  # the evaluated fit's ranker rows and AUC
    (_, m_on), (_, m_off) = _bundle(on), _bundle(off)
    assert m_on["metrics"] == m_off["metrics"] and m_on["eval_set_id"] == m_off["eval_set_id"]
    full = next(m for m in on["methods"] if m["method"] == "streamrec_full")
    assert m_on["metrics"]["ndcg@10"] == pytest.approx(full["ndcg@10"])


def test_the_registered_champion_is_the_refit(trained: tuple[Path, dict[str, Any]]) -> None:
    """What the registry promoted (and serving loads) knows the users first seen after the cutoff."""
    import pandas as pd

    from streamrec.data.store import DataStore
    from streamrec.funnel.recommender import build_stages

    d, report = trained
    assert report["promotion"]["promoted"] is True and report["fit"]["refit_on_all"] is True
    t_test = pd.Timestamp(report["fit"]["evaluated"]["cutoff"])
    ev = DataStore(d).events(columns=["user_id", "timestamp", "label"])
    first = ev[ev["label"] > 0].groupby("user_id")["timestamp"].min()
    late = first.index[first >= t_test].to_numpy()
    assert late.size
    users = build_stages(d).funnel.models.users
    assert (users.to_index(late) >= 0).all()


def test_streamed_events_reach_the_serving_item_table_and_trending_within_a_sync(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    """Clicks acknowledged by the event log (any replica) reach a replica's trending source and
    item table at its next sync, with the trending score the online store's push computes."""
    import asyncio
    import shutil
    from datetime import UTC, datetime

    from streamrec.api_models import EventIn
    from streamrec.data.event_log import EventLog
    from streamrec.features.client import FeatureClient
    from streamrec.funnel.recommender import build_stages
    from streamrec.service.engagement import EngagementSync

    d = trained[0]
    stages = build_stages(d)
    sync = EngagementSync(d)  # a replica's tail: from the export's watermarks
    table = stages.funnel.table
    cold = RecommendRequest(user_id=10**9, k=10)
    before = stages.retrieve("trending", stages.user_context(cold)).items.tolist()
    item = int(table.item_ids[next(r for r in range(len(table)) if r not in before[:5])])
    fc = FeatureClient(d)
    log = EventLog.open(d, sink=fc.push_interactions)  # what POST /v1/events runs
    try:
        now = datetime.now(UTC)
        events = [EventIn(event_id=f"hot-{i}", user_id=1 + i, item_id=item, event_type="click", timestamp=now)
                  for i in range(30)]  # fmt: skip
        assert log.append(events).accepted
        log.close()
        async def sync_once() -> int:
            return await sync.apply([stages], await sync.read())

        assert asyncio.run(sync_once()) == 30
        row = stages.funnel.table.row(item)
        assert row is not None and row["item_positives_7d"] >= 30
        online = fc.online_features("item", [item]).iloc[0]
        assert row["trending_score"] == pytest.approx(float(online["trending_score"]), rel=1e-4)
        after = stages.retrieve("trending", stages.user_context(cold)).items.tolist()
        assert after[0] == stages.funnel.table.index(item)  # the hottest item now
        assert asyncio.run(sync_once()) == 0  # nothing new
        # A replica (re)loading now counts the log's unexported clicks in trending at load, and
        # its tail skips them: each event counts once.
        again = build_stages(d)
        assert again.engagement_since > 0
        assert again.retrieve("trending", again.user_context(cold)).items.tolist()[0] == again.funnel.table.index(item)
        fresh = EngagementSync(d)
        assert asyncio.run(fresh.apply([again], asyncio.run(fresh.read()))) == 0
    finally:  # last in the module: the pushes stay in this world's feature store
        shutil.rmtree(d / "event_log", ignore_errors=True)
