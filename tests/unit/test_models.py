"""Unit tests of streamrec.models: shapes, losses, learning, I/O, OOV handling, determinism."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.errors import ConfigError, CorruptCheckpointError, ModelError, TrainingDataError
from streamrec.models import (
    DCNv2,
    RankerConfig,
    RankerData,
    RankerScorer,
    ShardedBatchSampler,
    TwoTowerConfig,
    TwoTowerData,
    TwoTowerModel,
    estimate_log_q,
    in_batch_softmax_loss,
    load_model,
    pick_device,
    read_model_metadata,
    roc_auc,
    save_model,
    seed_everything,
    train_ranker,
    train_two_tower,
)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]

N_USERS, N_ITEMS, N_CAT, U_DENSE, I_DENSE = 300, 120, 6, 6, 3


# --------------------------------------------------------------------------- fixtures
def small_tt_config(**over: object) -> TwoTowerConfig:
    base: dict[str, object] = dict(
        embedding_dim=32,
        id_embedding_dim=16,
        category_embedding_dim=8,
        hidden_dims=[64],
        n_oov_buckets=16,
        epochs=3,
        batch_size=256,
        lr=3e-3,
    )
    base.update(over)
    return TwoTowerConfig.model_validate(base)


def build_tt(cfg: TwoTowerConfig | None = None) -> TwoTowerModel:
    cfg = cfg or small_tt_config()
    return cfg.build_model(
        n_users=N_USERS, n_items=N_ITEMS, n_categories=N_CAT, user_dense_dim=U_DENSE, item_dense_dim=I_DENSE
    )


class TTWorld:
    """Users prefer one category; their positives and history come from it (planted signal)."""

    def __init__(self, n: int = 6000, hist_len: int = 5, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.item_cat = np.arange(N_ITEMS) % N_CAT
        self.cats = np.eye(N_CAT, dtype=np.float32)[self.item_cat]
        self.idense = rng.normal(size=(N_ITEMS, I_DENSE)).astype(np.float32)
        self.pref = rng.integers(0, N_CAT, N_USERS)
        noise = 0.1 * rng.normal(size=(N_USERS, U_DENSE))
        self.udense = (np.eye(N_CAT)[self.pref] + noise).astype(np.float32)
        pools = [np.flatnonzero(self.item_cat == c) for c in range(N_CAT)]
        uidx = rng.integers(0, N_USERS, n)
        iidx = np.array([rng.choice(pools[self.pref[u]]) for u in uidx], dtype=np.int64)
        hist = np.array([rng.choice(pools[self.pref[u]], hist_len) for u in uidx], dtype=np.int64)
        hist[:, -2:] = -1  # padding
        self.data = TwoTowerData(uidx, self.udense[uidx], hist, iidx, self.cats, self.idense)


@pytest.fixture(scope="module")
def tt_world() -> TTWorld:
    return TTWorld()


def ranker_problem(n: int = 6000, seed: int = 0) -> RankerData:
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, 4)).astype(np.float32) * np.array([1, 1, 10, 0.1], dtype=np.float32)
    sparse = np.stack([rng.integers(0, 10, n), rng.integers(0, 20, n)], axis=1).astype(np.int64)
    logit = 2.0 * dense[:, 0] - 1.5 * dense[:, 1] + np.where(sparse[:, 0] < 5, 2.0, -2.0)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return RankerData(dense, sparse, labels)


def small_ranker_config(**over: object) -> RankerConfig:
    base: dict[str, object] = dict(
        embedding_dim=4, n_cross_layers=2, deep_hidden=[32], dropout=0.0, epochs=3, batch_size=256, lr=3e-3
    )
    base.update(over)
    return RankerConfig.model_validate(base)


def build_ranker(cfg: RankerConfig | None = None) -> DCNv2:
    return (cfg or small_ranker_config()).build_model(n_dense=4, sparse_cardinalities=[10, 20])


# --------------------------------------------------------------------------- two-tower model
def test_two_tower_shapes_and_normalisation(tt_world: TTWorld) -> None:
    model = build_tt()
    d = tt_world.data
    u = model.encode_users(d.user_idx[:50], d.user_dense[:50], d.history[:50], batch_size=16)
    v = model.encode_items(tt_world.cats, tt_world.idense, batch_size=50)
    assert u.shape == (50, 32) and v.shape == (N_ITEMS, 32)
    assert u.dtype == np.float32 and v.dtype == np.float32
    assert u.flags.c_contiguous and v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert model.training  # encode_* restores the mode

    uu, vv = model(
        torch.from_numpy(d.user_idx[:8]),
        torch.from_numpy(d.user_dense[:8]),
        torch.from_numpy(d.history[:8]),
        torch.from_numpy(d.item_idx[:8]),
        torch.from_numpy(tt_world.cats[d.item_idx[:8]]),
        torch.from_numpy(tt_world.idense[d.item_idx[:8]]),
    )
    assert uu.shape == vv.shape == (8, 32)


def test_two_tower_default_dim_and_unnormalised() -> None:
    model = TwoTowerModel(n_users=5, n_items=7, n_categories=0, user_dense_dim=0, item_dense_dim=0)
    assert model.embedding_dim == 128
    v = model.encode_items(None, None, item_idx=np.arange(7))
    assert v.shape == (7, 128)
    raw = TwoTowerModel(5, 7, 3, 2, 2, embedding_dim=16, normalize=False)
    u = raw.encode_users(np.arange(5), np.ones((5, 2), np.float32), np.full((5, 3), -1))
    assert u.shape == (5, 16)
    assert not np.allclose(np.linalg.norm(u, axis=1), 1.0)


def test_unknown_user_goes_to_oov_bucket(tt_world: TTWorld) -> None:
    model = build_tt().eval()
    n_oov = model.n_oov_buckets
    idx = torch.tensor([0, N_USERS - 1, N_USERS, N_USERS + 5, -1, 10**12])
    rows = model.user_rows(idx)
    assert rows[:2].tolist() == [0, N_USERS - 1]
    assert ((rows[2:] >= N_USERS) & (rows[2:] < N_USERS + n_oov)).all()

    dense = np.repeat(tt_world.udense[:1], 3, axis=0)
    hist = np.repeat(tt_world.data.history[:1], 3, axis=0)
    # two unknown ids hashing to the same bucket, and a known user with the same features
    emb = model.encode_users(np.array([N_USERS + 3, N_USERS + 3 + n_oov, 0]), dense, hist)
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)
    assert not np.allclose(emb[0], emb[2])


def test_history_padding_and_unknown_items_are_masked(tt_world: TTWorld) -> None:
    model = build_tt()
    dense = tt_world.udense[:1]
    h_pad = np.array([[3, 7, -1, -1]])
    h_new = np.array([[3, 7, N_ITEMS + 50, -1]])  # an item newer than the model
    h_short = np.array([[3, 7]])
    a, b, c = (model.encode_users(np.array([1]), dense, h) for h in (h_pad, h_new, h_short))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    # unknown items are embedded from their features
    v = model.encode_items(tt_world.cats[:2], tt_world.idense[:2], item_idx=np.array([N_ITEMS + 1, -1]))
    assert np.isfinite(v).all()


# --------------------------------------------------------------------------- loss
def _toy_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    return u, v


def test_logq_matches_reference_and_constant_shift_is_noop() -> None:
    u, v = _toy_embeddings()
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05]))
    t = 0.1
    ref = torch.nn.functional.cross_entropy(u @ v.T / t - log_q[None, :], torch.arange(6))
    got = in_batch_softmax_loss(u, v, log_q=log_q, temperature=t)
    torch.testing.assert_close(got, ref)
    plain = in_batch_softmax_loss(u, v, temperature=t)
    assert not torch.isclose(got, plain)
    shifted = in_batch_softmax_loss(u, v, log_q=torch.full((6,), -3.0), temperature=t)
    torch.testing.assert_close(shifted, plain)


def test_logq_penalises_popular_items_less_as_negatives() -> None:
    # Item 0 is popular and similar to users 1..3; with the correction its logit drops, so those
    # users' losses fall, while user 0 (whose positive is item 0) loses more.
    u = torch.eye(4)
    v = torch.eye(4)
    v[0] = torch.nn.functional.normalize(torch.tensor([1.0, 0.5, 0.5, 0.5]), dim=0)
    log_q = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    plain = in_batch_softmax_loss(u, v, temperature=0.2, reduction="none")
    corrected = in_batch_softmax_loss(u, v, log_q=log_q, temperature=0.2, reduction="none")
    assert corrected[0] > plain[0]
    assert (corrected[1:] < plain[1:]).all()


def test_accidental_hits_are_masked() -> None:
    u, v = _toy_embeddings()
    v[3] = v[1]  # item 1 appears twice in the batch
    items = torch.tensor([10, 11, 12, 11, 14, 15])
    masked = in_batch_softmax_loss(u, v, temperature=0.1, item_idx=items, reduction="none")
    logits = u @ v.T / 0.1
    logits[1, 3] = logits[3, 1] = float("-inf")
    ref = torch.nn.functional.cross_entropy(logits, torch.arange(6), reduction="none")
    torch.testing.assert_close(masked, ref)


def test_estimate_log_q() -> None:
    lq = estimate_log_q(np.array([0, 0, 0, 1]), n_items=3, smoothing=1.0)
    assert lq.shape == (3,) and lq.dtype == np.float32
    np.testing.assert_allclose(np.exp(lq), [4 / 7, 2 / 7, 1 / 7], rtol=1e-6)


# --------------------------------------------------------------------------- two-tower training
def test_two_tower_learns_planted_signal(tt_world: TTWorld) -> None:
    cfg = small_tt_config()
    model = build_tt(cfg)
    seen: list[dict[str, float]] = []
    hist = train_two_tower(model, tt_world.data, cfg, "cpu", callback=seen.append)
    assert seen == hist and [m["epoch"] for m in hist] == [0.0, 1.0, 2.0]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.3
    users = np.arange(N_USERS)
    u = model.encode_users(users, tt_world.udense, None)
    v = model.encode_items(tt_world.cats, tt_world.idense)
    top = np.argsort(-(u @ v.T), axis=1)[:, :10]
    precision = (tt_world.item_cat[top] == tt_world.pref[:, None]).mean()
    assert precision > 0.8  # chance is 1/6


def test_two_tower_callback_can_stop_and_val_loss(tt_world: TTWorld) -> None:
    cfg = small_tt_config(epochs=5)
    d = tt_world.data
    val, sub = d.subset(slice(0, 500)), d.subset(slice(500, 1500))
    hist = train_two_tower(build_tt(cfg), sub, cfg, callback=lambda m: m["epoch"] >= 1, val_data=val)
    assert len(hist) == 2
    assert all(math.isfinite(m["val_loss"]) for m in hist)


def test_two_tower_is_deterministic(tt_world: TTWorld) -> None:
    cfg = small_tt_config(epochs=1, dropout=0.1)
    d = tt_world.data
    sub = d.subset(np.arange(2000))
    runs = []
    for _ in range(2):
        model = build_tt(cfg)
        hist = train_two_tower(model, sub, cfg)
        runs.append((hist[0]["train_loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, t in runs[0][1].items():
        assert torch.equal(t, runs[1][1][k]), k


def test_two_tower_rejects_bad_data(tt_world: TTWorld) -> None:
    bad = dataclasses.replace(tt_world.data, item_idx=tt_world.data.item_idx + N_ITEMS)
    with pytest.raises(TrainingDataError, match="item_idx"):
        train_two_tower(build_tt(), bad, small_tt_config())


# --------------------------------------------------------------------------- DCN-V2
@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("rank", [None, 3])
def test_dcn_shapes(structure: str, rank: int | None) -> None:
    cfg = small_ranker_config(structure=structure, cross_rank=rank)
    model = build_ranker(cfg)
    layer = model.cross[0]
    assert (layer.full is None) == (rank is not None)
    dense = torch.randn(7, 4)
    sparse = torch.tensor([[0, 0], [9, 19], [-1, 5], [10, 20], [3, 10**9], [1, 1], [2, 2]])
    logits = model(dense, sparse)
    assert logits.shape == (7,) and torch.isfinite(logits).all()
    p = model.eval().predict_proba(dense, sparse)
    assert ((p > 0) & (p < 1)).all()
    # OOV values of a field share one row
    rows = model.sparse_rows(sparse)
    assert rows[2, 0] == rows[3, 0] and rows[3, 1] == rows[4, 1]


def test_dcn_dense_only_and_sparse_only() -> None:
    assert DCNv2(3, [])(torch.randn(2, 3), torch.empty(2, 0, dtype=torch.int64)).shape == (2,)
    assert DCNv2(0, [4, 5])(torch.empty(2, 0), torch.zeros(2, 2, dtype=torch.int64)).shape == (2,)
    with pytest.raises(ValueError):
        DCNv2(0, [])


def test_ranker_reads_only_the_inputs_it_is_configured_for(tmp_path: Path) -> None:
    """``ranker.dense_inputs`` / ``sparse_inputs``: same input layout, the other columns ignored."""
    names = {"dense_names": ["a", "b", "c", "d"], "sparse_names": ["item", "device"]}
    cfg = small_ranker_config(dense_inputs=["a", "b"], sparse_inputs=[])
    model = cfg.build_model(n_dense=4, sparse_cardinalities=[10, 20], **names)
    assert model.input_dim == 2 and model.hparams["dense_columns"] == [0, 1]
    data = ranker_problem(3000)
    hist = train_ranker(model, data, cfg)
    assert hist[-1]["val_auc"] > 0.7  # the planted dense signal (a, b) is learnt without the fields
    rd = ranker_problem(64, seed=1)
    dense, sparse = torch.from_numpy(rd.dense), torch.from_numpy(rd.sparse)
    p = model.eval().predict_proba(dense, sparse)
    other = dense.clone()
    other[:, 2:] = torch.randn(64, 2) * 100.0
    changed_fields = torch.randint(0, 10, (64, 2))
    assert torch.equal(p, model.predict_proba(other, changed_fields))  # c, d and the fields are ignored
    moved = dense.clone()
    moved[:, 0] += 1.0
    assert not torch.equal(p, model.predict_proba(moved, sparse))
    save_model(model, tmp_path / "rk")
    again = load_model(tmp_path / "rk", expected=DCNv2)
    assert again.hparams == model.hparams and torch.equal(again.predict_proba(dense, sparse), p)
    # every column named: the same model as no selection
    full = small_ranker_config(dense_inputs=["a", "b", "c", "d"], sparse_inputs=["item", "device"])
    assert full.build_model(n_dense=4, sparse_cardinalities=[10, 20], **names).input_dim == 4 + 2 * 4
    assert "dense_columns" not in build_ranker().hparams  # loadable by code from before the option


def test_ranker_inputs_must_name_layout_columns() -> None:
    with pytest.raises(ConfigError, match="lacks"):
        small_ranker_config(dense_inputs=["zz"]).build_model(
            n_dense=2, sparse_cardinalities=[3], dense_names=["a", "b"], sparse_names=["item"]
        )
    with pytest.raises(ConfigError, match="column names"):
        small_ranker_config(sparse_inputs=[]).build_model(n_dense=2, sparse_cardinalities=[3])
    with pytest.raises(ValueError, match="at least one"):
        DCNv2(2, [3], dense_columns=[], sparse_columns=[])
    with pytest.raises(ValueError, match="distinct positions"):
        DCNv2(2, [3], dense_columns=[0, 0])


def test_ranker_learns_separable_problem() -> None:
    data = ranker_problem()
    cfg = small_ranker_config()
    model = build_ranker(cfg)
    hist = train_ranker(model, data, cfg)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_auc"] > 0.8
    assert hist[-1]["val_logloss"] < math.log(2)
    # dense statistics were fitted on the training data (feature 2 has std ~10)
    assert 0.05 < float(model.dense_norm.inv_std[2]) < 0.2


def test_ranker_is_deterministic() -> None:
    data = ranker_problem(2000)
    cfg = small_ranker_config(epochs=1, dropout=0.2)
    a, b = build_ranker(cfg), build_ranker(cfg)
    ha, hb = train_ranker(a, data, cfg), train_ranker(b, data, cfg)
    assert ha[0]["train_loss"] == hb[0]["train_loss"] and ha[0]["val_auc"] == hb[0]["val_auc"]
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k


def test_ranker_rejects_single_class() -> None:
    data = ranker_problem(500)
    data.labels[:] = 0
    with pytest.raises(TrainingDataError, match="only negatives"):
        train_ranker(build_ranker(), data, small_ranker_config())


def test_roc_auc() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert roc_auc(np.array([0, 1, 0, 1]), np.zeros(4)) == 0.5
    assert math.isnan(roc_auc(np.ones(3), np.arange(3)))
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 20, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(y, s) == pytest.approx(brute)


def test_sharded_sampler_partitions_each_epoch() -> None:
    shards = [ShardedBatchSampler(103, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    idx = [torch.cat(list(s)) for s in shards]
    assert len(idx[0]) == len(idx[1]) == 51 and len(shards[0]) == len(shards[1]) == 6
    assert not set(idx[0].tolist()) & set(idx[1].tolist())
    shards[0].set_epoch(1)
    assert not torch.equal(torch.cat(list(shards[0])), idx[0])


# --------------------------------------------------------------------------- I/O
def test_save_load_round_trip(tmp_path: Path, tt_world: TTWorld) -> None:
    tt = build_tt()
    tt.user_dense_norm.fit(tt_world.udense)  # buffers travel too
    ranker = build_ranker(small_ranker_config(cross_rank=2, structure="stacked"))
    ranker.dense_norm.fit(ranker_problem(200).dense)
    save_model(tt, tmp_path / "tt", metadata={"features": ["a", "b"]})
    save_model(ranker, tmp_path / "rk")

    tt2 = load_model(tmp_path / "tt", expected=TwoTowerModel)
    d = tt_world.data
    a = tt.encode_users(d.user_idx[:20], d.user_dense[:20], d.history[:20])
    b = tt2.encode_users(d.user_idx[:20], d.user_dense[:20], d.history[:20])
    np.testing.assert_array_equal(a, b)
    items = (tt_world.cats, tt_world.idense)
    np.testing.assert_array_equal(tt.encode_items(*items), tt2.encode_items(*items))
    assert read_model_metadata(tmp_path / "tt")["metadata"] == {"features": ["a", "b"]}

    rk2 = load_model(tmp_path / "rk" / "model.json", expected=DCNv2)
    assert not rk2.training and rk2.hparams == ranker.hparams
    rd = ranker_problem(64)
    dense, sparse = torch.from_numpy(rd.dense), torch.from_numpy(rd.sparse)
    assert torch.equal(ranker.eval().predict_proba(dense, sparse), rk2.predict_proba(dense, sparse))
    with pytest.raises(ModelError, match="expected a TwoTowerModel"):
        load_model(tmp_path / "rk", expected=TwoTowerModel)


@pytest.fixture()
def saved_ranker(tmp_path: Path) -> Path:
    return save_model(build_ranker(), tmp_path / "ranker")


def test_missing_checkpoint(tmp_path: Path, saved_ranker: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match="model.json is missing; retrain"):
        load_model(tmp_path / "nowhere")
    (saved_ranker / "weights.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"weights.pt is missing; retrain .* another version"):
        load_model(saved_ranker)


def test_truncated_weights(saved_ranker: Path) -> None:
    w = saved_ranker / "weights.pt"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=r"weights.pt is truncated or corrupt"):
        load_model(saved_ranker)


def test_corrupt_weights_without_checksum(saved_ranker: Path) -> None:
    # A file torch.load cannot parse is reported even when no checksum catches it.
    meta_path = saved_ranker / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["weights_sha256"]
    meta_path.write_text(json.dumps(meta))
    (saved_ranker / "weights.pt").write_bytes(b"not a zip file at all" * 10)
    with pytest.raises(CorruptCheckpointError, match="cannot be read"):
        load_model(saved_ranker)


def test_corrupt_or_mismatched_json(saved_ranker: Path) -> None:
    meta_path = saved_ranker / "model.json"
    good = meta_path.read_text()
    meta_path.write_text(good[:40])
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_model(saved_ranker)
    meta = json.loads(good)
    meta["kwargs"]["embedding_dim"] = 8  # weights no longer fit the architecture
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="does not match the architecture"):
        load_model(saved_ranker)


def test_save_rejects_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")


# --------------------------------------------------------------------------- scoring
def test_ranker_scorer_matches_model(tmp_path: Path) -> None:
    model = build_ranker()
    save_model(model, tmp_path / "rk")
    scorer = RankerScorer.from_path(tmp_path / "rk")
    rd = ranker_problem(500)
    got = scorer.score(rd.dense, rd.sparse)
    ref = model.eval().predict_proba(torch.from_numpy(rd.dense), torch.from_numpy(rd.sparse)).numpy()
    assert got.shape == (500,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    # non-contiguous float64 / int32 / read-only inputs are converted, not rejected
    dense64 = np.asfortranarray(rd.dense.astype(np.float64))
    sparse32 = rd.sparse.astype(np.int32)
    sparse32.flags.writeable = False
    np.testing.assert_allclose(scorer.score(dense64, sparse32), got, rtol=1e-6, atol=1e-7)
    assert scorer.score(rd.dense[:0], rd.sparse[:0]).shape == (0,)
    with pytest.raises(ModelError, match="dense features"):
        scorer.score(rd.dense[:, :3], rd.sparse)
    with pytest.raises(ModelError, match="sparse features"):
        scorer.score(rd.dense, rd.sparse[:10])


# --------------------------------------------------------------------------- helpers and config
def test_pick_device_and_seed(caplog: pytest.LogCaptureFixture) -> None:
    assert pick_device(False).type == "cpu"
    with caplog.at_level(logging.INFO, logger="streamrec.models.train_loop"):
        dev = pick_device(True)
    if not torch.cuda.is_available():
        assert dev.type == "cpu" and "GPU requested but" in caplog.text
    seed_everything(7)
    a = torch.rand(3), np.random.rand(3)
    seed_everything(7)
    b = torch.rand(3), np.random.rand(3)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_configs_are_strict() -> None:
    from streamrec.config import parse_config

    assert TwoTowerConfig().embedding_dim == 128
    assert RankerConfig().structure == "parallel"
    with pytest.raises(ConfigError, match="unknown key 'embeding_dim'"):
        parse_config({"embeding_dim": 64}, TwoTowerConfig)
    with pytest.raises(ConfigError):
        parse_config({"structure": "diagonal"}, RankerConfig)


def test_model_modules_import_without_pydantic() -> None:
    # The GPU check script runs with only torch + numpy installed.
    code = (
        "import sys; import streamrec.models.dcn, streamrec.models.two_tower, streamrec.models.io, "
        "streamrec.models.scoring, streamrec.models.train_loop; "
        "bad = [m for m in ('pydantic', 'yaml', 'ray', 'feast') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=60)
