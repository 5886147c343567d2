"""The synthetic world: determinism, chunk invariance, schema, realism, truth and simulator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from streamrec.config import parse_config
from streamrec.data.click_model import pair_terms
from streamrec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA
from streamrec.data.simulator import UserSimulator
from streamrec.data.store import DataStore
from streamrec.data.synth import (
    DEFAULT_END,
    RNG_BLOCK,
    SynthConfig,
    WorldGenerator,
    synthesize,
)
from streamrec.errors import ConfigError, DataError, DataNotFoundError

SMALL = {"users": 700, "items": 400, "days": 4, "seed": 7}


def _cfg(**kw: object) -> SynthConfig:
    return SynthConfig.model_validate({**SMALL, **kw})


def _frames(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    store = DataStore(data_dir)
    events = store.events().sort_values("event_id").reset_index(drop=True)
    return store.users(), store.items(), events


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, Path, dict[str, object]]:
    cfg = _cfg()
    d = tmp_path_factory.mktemp("world")
    counts = synthesize(cfg, d, progress=False)
    return cfg, d, counts


@pytest.fixture(scope="module")
def frames(world: tuple[SynthConfig, Path, dict[str, object]]) -> tuple[pd.DataFrame, ...]:
    return _frames(world[1])


# ------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_frames(world, frames, tmp_path):
    cfg, _, counts = world
    again = synthesize(cfg, tmp_path / "again", progress=False)
    again.pop("seconds")
    assert again == {k: v for k, v in counts.items() if k != "seconds"}
    for a, b in zip(frames, _frames(tmp_path / "again"), strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_different_seed_gives_different_world(frames, tmp_path):
    synthesize(_cfg(seed=8), tmp_path, progress=False)
    users, items, events = _frames(tmp_path)
    assert not users["age"].equals(frames[0]["age"])
    assert not events["item_id"].head(500).equals(frames[2]["item_id"].head(500))


def test_chunk_size_does_not_change_the_data(world, frames, tmp_path):
    cfg = _cfg(chunk_size=1)  # rounded up to one block: several chunks
    assert cfg.block_chunk_size == RNG_BLOCK and len(WorldGenerator(cfg).chunks()) > 1
    assert len(WorldGenerator(world[0]).chunks()) == 1
    synthesize(cfg, tmp_path, progress=False)
    for a, b in zip(frames, _frames(tmp_path), strict=True):
        pd.testing.assert_frame_equal(a, b)
    truth_a, truth_b = world[1] / "truth", tmp_path / "truth"
    for name in ("users_latent.npy", "users_affinity.npy", "users_activity.npy"):
        np.testing.assert_array_equal(np.load(truth_a / name), np.load(truth_b / name))


def test_default_end_is_fixed_and_naive_end_is_utc():
    assert SynthConfig().end == DEFAULT_END == datetime(2026, 11, 1, tzinfo=UTC)
    cfg = SynthConfig(end=datetime(2025, 1, 10))
    assert cfg.end.tzinfo is not None and cfg.start == datetime(2024, 12, 27, tzinfo=UTC)


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key 'userz'"):
        parse_config({"userz": 3}, SynthConfig)


# ---------------------------------------------------------------------- counts, schema
def test_counts_and_schema(world, frames):
    cfg, d, counts = world
    users, items, events = frames
    assert set(counts) == {"users", "items", "events", "positives", "days", "seconds"}
    assert counts["users"] == len(users) == cfg.users
    assert counts["items"] == len(items) == cfg.items
    assert counts["events"] == len(events) > 0
    assert counts["positives"] == int(events["label"].sum()) > 0
    assert len(DataStore(d).event_dates()) == cfg.days
    assert pq.read_schema(d / "users.parquet").equals(USER_SCHEMA)
    assert pq.read_schema(d / "items.parquet").equals(ITEM_SCHEMA)
    for f in (d / "events").rglob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(EVENT_SCHEMA)
    assert events["event_id"].is_unique
    assert users["user_id"].tolist() == list(range(1, cfg.users + 1))
    assert items["item_id"].tolist() == list(range(1, cfg.items + 1))


def test_event_representation(frames):
    cfg = _cfg()
    events = frames[2]
    assert set(events["event_type"]) == {"impression", "skip", "click", "complete"}
    clicked = events["event_type"].isin(["click", "complete"])
    assert (events["label"] == clicked.astype("int8")).all()
    assert events["watch_fraction"].notna().eq(clicked).all()
    complete = events["event_type"] == "complete"
    assert (events.loc[complete, "watch_fraction"] >= cfg.click.complete_threshold).all()
    partial = events["event_type"] == "click"
    assert (events.loc[partial, "watch_fraction"] < cfg.click.complete_threshold).all()
    assert events["rating"].isna().all() and events["session_id"].notna().all()
    assert events.groupby("session_id")["device"].nunique().max() == 1
    # slates: positions 0..k-1, no duplicate item within a slate
    slates = events.groupby(["user_id", "timestamp"])
    assert (slates["position"].max() + 1 == slates.size()).all()
    assert not events.duplicated(["user_id", "timestamp", "item_id"]).any()


def test_events_reference_known_users_and_items(frames):
    users, items, events = frames
    assert events["user_id"].isin(users["user_id"]).all()
    assert events["item_id"].isin(items["item_id"]).all()


def test_no_impression_before_publish_or_signup_or_outside_window(frames):
    users, items, events = frames
    cfg = _cfg()
    pub = events["item_id"].map(items.set_index("item_id")["published_at"])
    assert (events["timestamp"] >= pub).all()
    signup = events["user_id"].map(users.set_index("user_id")["signup_at"])
    assert (events["timestamp"] >= signup).all()
    assert events["timestamp"].min() >= cfg.start and events["timestamp"].max() < cfg.end


def test_ctr_in_a_sane_band(frames):
    events = frames[2]
    ctr = events["label"].mean()
    assert 0.01 < ctr < 0.10
    by_pos = events.groupby("position")["label"].mean()
    assert by_pos.loc[0] > by_pos.loc[5]  # position bias


def test_item_catalogue_shape():
    cfg = SynthConfig(items=20_000, days=14)
    gen = WorldGenerator(cfg)
    items = gen.items_frame()
    assert items["promoted"].mean() == pytest.approx(0.01, abs=1e-4)
    assert items["flagged"].mean() == pytest.approx(0.005, abs=1e-4)
    assert 0.005 < items["creator"].isna().mean() < 0.05
    n_cats = items["categories"].map(len)
    assert n_cats.between(1, 2).all() and 0.15 < (n_cats == 2).mean() < 0.35
    assert set(items["categories"].explode()) <= set(gen.categories)
    start = pd.Timestamp(cfg.start)
    back = items["published_at"] < start
    assert 0.55 < back.mean() < 0.65
    new_days = ((items.loc[~back, "published_at"] - start) // pd.Timedelta(days=1)).unique()
    assert sorted(new_days) == list(range(cfg.days))  # new content every day
    assert items["published_at"].is_monotonic_increasing  # ids follow publish order
    pop = np.sort(gen.items.popularity)[::-1]
    assert pop[: len(pop) // 100].sum() / pop.sum() > 0.3  # heavy head (Zipf)


def test_click_model_responds_to_affinity(world, frames):
    _, d, _ = world
    events = frames[2]
    sim = UserSimulator(d)
    it = sim.items
    dot, cat = pair_terms(
        np.asarray(sim.user_latent),
        np.asarray(sim.user_affinity),
        events["user_id"].to_numpy() - 1,
        it.latent,
        it.primary,
        it.secondary,
        events["item_id"].to_numpy() - 1,
    )
    y = events["label"].to_numpy()
    for signal in (cat, dot):
        lo, hi = np.quantile(signal, [0.2, 0.8])
        assert y[signal >= hi].mean() > 2 * y[signal <= lo].mean()


# ------------------------------------------------------------------ refusing, overwrite
def test_refuses_a_non_empty_data_dir(world):
    with pytest.raises(DataError, match="--data-dir"):
        synthesize(world[0], world[1], progress=False)


def test_overwrite_replaces_a_previous_world(tmp_path):
    synthesize(_cfg(users=200, days=2), tmp_path, progress=False)
    counts = synthesize(_cfg(users=300, days=1), tmp_path, progress=False, overwrite=True)
    store = DataStore(tmp_path)
    assert len(store.users()) == 300 and store.count_events() == counts["events"]
    assert len(store.event_dates()) == 1


def test_overwrite_refuses_non_synthetic_data(tmp_path):
    DataStore(tmp_path).upsert_users(
        pd.DataFrame({"user_id": [1], "signup_at": [pd.Timestamp("2026-01-01", tz="UTC")]})
    )
    with pytest.raises(DataError, match="not generated by the synthetic world"):
        synthesize(_cfg(), tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "users.parquet").exists()


# ------------------------------------------------------------------- truth, simulator
def test_truth_is_written_apart(world):
    _, d, counts = world
    truth = d / "truth"
    names = {p.name for p in truth.iterdir()}
    expected = {"params.json", "items.npz", "users_latent.npy", "users_affinity.npy", "users_activity.npy"}
    assert expected <= names
    assert not list((d / "events").rglob("*.np*"))
    assert set(pq.read_schema(d / "users.parquet").names) == set(USER_SCHEMA.names)
    sim = UserSimulator(d)
    assert sim.n_users == 700 and sim.n_items == 400 and sim.user_latent.shape == (700, 16)
    np.testing.assert_allclose(sim.user_affinity.sum(axis=1), 1.0, rtol=1e-5)


def test_simulator_reproduces_the_generators_probabilities(world):
    cfg, d, _ = world
    sim = UserSimulator(d)
    gen = WorldGenerator(cfg)
    batch = gen.events(gen.users(0, 2 * RNG_BLOCK), day=2)
    frame = batch.frame
    assert len(frame) > 100
    for (user, ts), slate in frame.groupby(["user_id", "timestamp"]):
        got = sim.click_probabilities(user, slate["item_id"], slate["position"], ts.to_pydatetime())
        np.testing.assert_allclose(got, batch.click_probability[slate.index], rtol=1e-12)
    # the stored events are exactly what the generator produced
    day = cfg.start + timedelta(days=2)
    stored = DataStore(d).events(day, day + timedelta(days=1))
    stored = stored[stored["user_id"] <= 2 * RNG_BLOCK].sort_values("event_id").reset_index(drop=True)
    absent = ["rating", "experiment_variant"]  # nullable columns a synthetic world leaves empty
    pd.testing.assert_frame_equal(
        stored.drop(columns=absent),
        frame.sort_values("event_id").reset_index(drop=True).astype(stored.dtypes.drop(absent).to_dict()),
    )


def test_simulate_session(world):
    sim = UserSimulator(world[1])
    slate = np.arange(1, 11)
    a = sim.simulate_session(5, slate, rng=3)
    b = sim.simulate_session(5, slate, rng=3)
    np.testing.assert_array_equal(a.clicked, b.clicked)
    assert a.event_types == b.event_types and len(a.event_types) == 10
    assert set(a.clicks) <= set(slate.tolist())
    # many sessions: empirical click rate tracks the model's probabilities
    rng = np.random.default_rng(0)
    clicks = np.mean([sim.simulate_session(5, slate, rng=rng).clicked for _ in range(3000)], axis=0)
    np.testing.assert_allclose(clicks, a.probabilities, atol=0.02)


def test_simulator_edge_cases(world, tmp_path):
    cfg, d, _ = world
    sim = UserSimulator(d)
    with pytest.raises(DataNotFoundError):
        sim.click_probabilities(cfg.users + 1, [1])
    with pytest.raises(DataNotFoundError):
        sim.click_probabilities(1, [0])
    last = sim.n_items  # published last, inside the window
    early = pd.Timestamp(sim.items.published_us[last - 1] - 1, unit="us", tz="UTC").to_pydatetime()
    assert sim.click_probabilities(1, [last], at=early)[0] == 0.0
    assert sim.click_probabilities(1, [last])[0] > 0.0
    with pytest.raises(DataNotFoundError, match="no synthetic ground truth"):
        UserSimulator(tmp_path)
