"""Sparse embedding updates (issue 17, item 7): row-wise AdamW on the id tables, dense AdamW elsewhere."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.models import (
    DCNv2,
    RankerConfig,
    RankerData,
    TwoTowerConfig,
    TwoTowerData,
    TwoTowerModel,
    in_batch_softmax_loss,
    load_model,
    save_model,
    train_ranker,
    train_two_tower,
)
from streamrec.models.optim import SparseAwareAdamW, sparse_embedding_grads

torch.set_num_threads(1)

N_USERS, N_ITEMS, N_CAT = 40, 30, 3


def tiny_model(seed: int = 0) -> TwoTowerModel:
    torch.manual_seed(seed)
    return TwoTowerModel(
        N_USERS, N_ITEMS, N_CAT, 2, 0, embedding_dim=8, id_embedding_dim=4, hidden_dims=[8], n_oov_buckets=4
    )


def batch() -> tuple[torch.Tensor, ...]:
    uidx = torch.tensor([0, 1, 2, 3])
    iidx = torch.tensor([5, 6, 7, 8])
    hist = torch.tensor([[9, -1], [10, 11], [-1, -1], [9, 12]])
    udense = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    cats = torch.eye(N_CAT)[iidx % N_CAT]
    return uidx, udense, hist, iidx, cats


def one_step(model: TwoTowerModel, sparse: bool, wd: float = 0.1, lr: float = 0.01) -> SparseAwareAdamW:
    uidx, udense, hist, iidx, cats = batch()
    with sparse_embedding_grads(model, sparse) as tables:
        ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in ids]
        opt = SparseAwareAdamW(dense, tables, lr=lr, weight_decay=wd)
        opt.hook(model)
        u, v = model(uidx, udense, hist, iidx, cats, None)
        in_batch_softmax_loss(u, v, temperature=0.1).backward()
        if sparse:
            assert model.item_embedding.weight.grad is not None and model.item_embedding.weight.grad.is_sparse
        opt.step()
    return opt


ITEM_ROWS_TOUCHED = {5, 6, 7, 8, 9, 10, 11, 12, 0}  # positives, history, and row 0 for masked padding
USER_ROWS_TOUCHED = {0, 1, 2, 3}


def test_sparse_step_reads_and_writes_only_looked_up_rows() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    opt = one_step(model, sparse=True)
    for k, (name, table, touched) in enumerate(
        (
            ("user_embedding.weight", model.user_embedding, USER_ROWS_TOUCHED),
            ("item_embedding.weight", model.item_embedding, ITEM_ROWS_TOUCHED),
        )
    ):
        assert opt.sparse_params[k] is table.weight
        moved = {int(r) for r in torch.nonzero((table.weight != before[name]).any(dim=1)).ravel()}
        assert moved and moved <= touched, name
        state = opt.state[k]
        assert {int(r) for r in torch.nonzero(state["exp_avg_sq"].any(dim=1)).ravel()} <= touched
        assert {int(r) for r in torch.nonzero(state["last"]).ravel()} == touched
    # The dense-AdamW path decays (and so writes) every row of the table, touched or not.
    dense_model = tiny_model()
    one_step(dense_model, sparse=False)
    untouched = sorted(set(range(N_ITEMS)) - ITEM_ROWS_TOUCHED)
    assert not torch.equal(
        dense_model.item_embedding.weight[untouched], before["item_embedding.weight"][untouched]
    )


def random_batches(n_steps: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n_steps):
        uidx = torch.randint(0, N_USERS, (4,), generator=gen)
        iidx = torch.randint(0, N_ITEMS, (4,), generator=gen)
        hist = torch.randint(-1, N_ITEMS, (4, 2), generator=gen)
        out.append((uidx, torch.randn(4, 2, generator=gen), hist, iidx, torch.eye(N_CAT)[iidx % N_CAT]))
    return out


def run_steps(model: TwoTowerModel, sparse: bool, n_steps: int, wd: float = 0.1) -> None:
    """``n_steps`` AdamW steps on batches that each look up a few random rows, then a flush."""
    with sparse_embedding_grads(model, sparse) as tables:
        ids = {id(p) for p in tables}
        opt = SparseAwareAdamW(
            [p for p in model.parameters() if id(p) not in ids], tables, lr=0.01, weight_decay=wd
        )
        opt.hook(model)  # rows catch up before each lookup, as dense AdamW had moved them
        for uidx, udense, hist, iidx, cats in random_batches(n_steps):
            u, v = model(uidx, udense, hist, iidx, cats, None)
            opt.zero_grad()
            in_batch_softmax_loss(u, v, temperature=0.1).backward()
            opt.step()
        opt.flush()
        opt.unhook()


@pytest.mark.parametrize("n_steps", [1, 40])
def test_row_wise_updates_equal_dense_adamw_after_flush(n_steps: int) -> None:
    # Rows skip many steps between lookups (4 of 40 users per step), so the closed-form catch-up
    # of momentum, weight decay and bias correction is what makes the two agree.
    sparse_model, dense_model = tiny_model(), tiny_model()
    run_steps(sparse_model, True, n_steps)
    run_steps(dense_model, False, n_steps)
    s, d = sparse_model.state_dict(), dense_model.state_dict()
    assert s.keys() == d.keys()
    for k in s:
        torch.testing.assert_close(s[k], d[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lazy_adam_without_catch_up_ends_elsewhere() -> None:
    # The equality above is not vacuous: SparseAdam ("lazy Adam": a row's moments and weight
    # stand still between its lookups) on the same batches ends far from dense AdamW.
    lazy_model, dense_model = tiny_model(), tiny_model()
    run_steps(dense_model, False, 40, wd=0.0)
    with sparse_embedding_grads(lazy_model, True) as tables:
        ids = {id(p) for p in tables}
        rest = torch.optim.AdamW(
            [p for p in lazy_model.parameters() if id(p) not in ids], lr=0.01, weight_decay=0.0
        )
        lazy = torch.optim.SparseAdam(tables, lr=0.01)
        for uidx, udense, hist, iidx, cats in random_batches(40):
            u, v = lazy_model(uidx, udense, hist, iidx, cats, None)
            rest.zero_grad()
            lazy.zero_grad()
            in_batch_softmax_loss(u, v, temperature=0.1).backward()
            rest.step()
            lazy.step()
    gap = (lazy_model.user_embedding.weight - dense_model.user_embedding.weight).abs().max()
    assert gap > 1e-2


def test_clip_grad_norm_equals_torch_on_dense_grads() -> None:
    sparse_model, dense_model = tiny_model(), tiny_model()
    norms = []
    for model, sparse in ((sparse_model, True), (dense_model, False)):
        uidx, udense, hist, iidx, cats = batch()
        with sparse_embedding_grads(model, sparse) as tables:
            ids = {id(p) for p in tables}
            opt = SparseAwareAdamW([p for p in model.parameters() if id(p) not in ids], tables, 0.01, 0.0)
            u, v = model(uidx, udense, hist, iidx, cats, None)
            in_batch_softmax_loss(u, v, temperature=0.1).backward()
            norms.append(float(opt.clip_grad_norm_(0.05)))
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[0] > 0.05
    for (name, ps), pd_ in zip(sparse_model.named_parameters(), dense_model.parameters(), strict=True):
        assert ps.grad is not None and pd_.grad is not None
        g = ps.grad.to_dense() if ps.grad.is_sparse else ps.grad
        torch.testing.assert_close(g, pd_.grad, msg=name)


def planted(n: int = 3000, seed: int = 0) -> tuple[TwoTowerData, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_users, n_items, n_cat = 200, 90, 3
    item_cat = np.arange(n_items) % n_cat
    cats = np.eye(n_cat, dtype=np.float32)[item_cat]
    pref = rng.integers(0, n_cat, n_users)
    pools = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    uidx = rng.integers(0, n_users, n)
    iidx = np.array([rng.choice(pools[pref[u]]) for u in uidx], dtype=np.int64)
    hist = np.array([rng.choice(pools[pref[u]], 4) for u in uidx], dtype=np.int64)
    hist[:, -1] = -1
    data = TwoTowerData(
        uidx, np.zeros((n, 0), np.float32), hist, iidx, cats, np.zeros((n_items, 0), np.float32)
    )
    return data, item_cat, pref


def tt_config(sparse: bool, **over: object) -> TwoTowerConfig:
    base: dict[str, object] = dict(
        embedding_dim=16,
        id_embedding_dim=16,
        category_embedding_dim=4,
        hidden_dims=[32],
        n_oov_buckets=8,
        epochs=4,
        batch_size=128,
        lr=5e-3,
        sparse_embeddings=sparse,
    )
    base.update(over)
    return TwoTowerConfig.model_validate(base)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_sparse_training_learns_like_dense(clip: float | None) -> None:
    data, item_cat, pref = planted()
    losses, precisions = {}, {}
    for sparse in (False, True):
        cfg = tt_config(sparse, grad_clip_norm=clip)
        model = cfg.build_model(n_users=200, n_items=90, n_categories=3, user_dense_dim=0, item_dense_dim=0)
        hist = train_two_tower(model, data, cfg)
        # the flag is switched back: the returned model has dense-gradient tables again
        assert not model.user_embedding.sparse and not model.item_embedding.sparse
        losses[sparse] = [h["train_loss"] for h in hist]
        users = np.arange(200)
        u = model.encode_users(users, None, None)
        v = model.encode_items(data.item_categories, None, np.arange(90))
        top = np.argsort(-(u @ v.T), axis=1)[:, :10]
        precisions[sparse] = float((item_cat[top] == pref[:, None]).mean())
    for sparse in (False, True):  # both trajectories fall, by a similar amount
        assert losses[sparse][-1] < losses[sparse][0] - 0.2, (sparse, losses)
    assert abs(losses[True][-1] - losses[False][-1]) < 0.15, losses
    assert precisions[True] > 0.75 and precisions[False] > 0.75, precisions  # chance is 1/3
    assert abs(precisions[True] - precisions[False]) < 0.1, precisions


def test_sparse_and_dense_models_share_state_dict_and_load(tmp_path: Path) -> None:
    data, _, _ = planted(600)
    cfg = tt_config(True, epochs=1)
    model = cfg.build_model(n_users=200, n_items=90, n_categories=3, user_dense_dim=0, item_dense_dim=0)
    fresh_keys = list(model.state_dict())
    train_two_tower(model, data, cfg)
    assert list(model.state_dict()) == fresh_keys
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m", expected=TwoTowerModel)
    for k, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[k]), k
    # a model saved before this change (no new hyper-parameter) trains further on either path
    train_two_tower(back, data, tt_config(False, epochs=1))


def test_sparse_training_is_deterministic() -> None:
    data, _, _ = planted(1000)
    cfg = tt_config(True, epochs=1, dropout=0.1)
    runs = []
    for _ in range(2):
        model = cfg.build_model(n_users=200, n_items=90, n_categories=3, user_dense_dim=0, item_dense_dim=0)
        runs.append((train_two_tower(model, data, cfg)[0]["train_loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, t in runs[0][1].items():
        assert torch.equal(t, runs[1][1][k]), k


def test_ranker_sparse_path_learns_and_restores_flag() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    dense = rng.normal(size=(n, 2)).astype(np.float32)
    sparse = np.stack([rng.integers(0, 50, n), rng.integers(0, 5, n)], axis=1).astype(np.int64)
    logit = dense[:, 0] + np.where(sparse[:, 0] < 25, 2.0, -2.0)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    cfg = RankerConfig(
        embedding_dim=4,
        n_cross_layers=1,
        deep_hidden=[16],
        epochs=3,
        batch_size=128,
        lr=5e-3,
        sparse_embeddings=True,
    )
    model: DCNv2 = cfg.build_model(n_dense=2, sparse_cardinalities=[50, 5])
    before = model.embedding.weight.detach().clone()
    hist = train_ranker(model, RankerData(dense, sparse, labels), cfg)
    assert hist[-1]["val_auc"] > 0.8
    assert not model.embedding.sparse
    # the OOV rows (50 and 5 + 51) never appear in the data: only weight decay moved them
    oov = [50, 51 + 5]
    torch.testing.assert_close(model.embedding.weight[oov], before[oov], rtol=1e-3, atol=0.0)
    assert not torch.equal(model.embedding.weight[oov], before[oov])


def test_disabled_changes_nothing() -> None:
    model = tiny_model()
    with sparse_embedding_grads(model, False) as tables:
        assert tables == [] and not model.item_embedding.sparse
