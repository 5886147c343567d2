"""Framework-agnostic training loops for the two-tower model and the DCN-V2 ranker.

The functions take plain numpy arrays and a config object, and run anywhere: a plain process,
a test, or a Ray Train worker. They never import Ray. Per-epoch metrics go to an optional
``callback(metrics)``; a Ray Train worker passes one that calls ``ray.train.report`` (and may
save a checkpoint from the model it passed in). A callback returning ``True`` stops training.

For data-parallel training, pass ``rank``/``world_size``: every worker then draws the same
seeded permutation each epoch and takes its own equal-sized shard of it, so all workers run
the same number of steps (as ``DistributedDataParallel`` requires). A DDP-wrapped model works:
the loops only call ``model(...)``, and unwrap ``model.module`` for the dense statistics.

Embedding tables (``nn.Embedding``: the two-tower's user and item ids, the ranker's sparse
fields) train with sparse gradients by default (``sparse_embeddings`` in the configs), updated
by :class:`~streamrec.models.optim.SparseAwareAdamW` only in the rows a step's batch looked up.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, TensorDataset

from streamrec.errors import TrainingDataError
from streamrec.models.dcn import DCNv2
from streamrec.models.optim import SparseAwareAdamW, sparse_embedding_grads
from streamrec.models.two_tower import TwoTowerModel, estimate_log_q, in_batch_softmax_loss

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

#: Called once per epoch with that epoch's metrics; returning ``True`` stops training.
EpochCallback = Callable[[dict[str, float]], bool | None]


# --------------------------------------------------------------------------- settings protocols
class _CommonTrainSettings(Protocol):
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    grad_clip_norm: float | None
    standardize_dense: bool
    sparse_embeddings: bool
    seed: int


class TwoTowerTrainSettings(_CommonTrainSettings, Protocol):
    """What :func:`train_two_tower` reads from its config (e.g. a ``TwoTowerConfig``)."""

    temperature: float
    logq_correction: bool
    remove_accidental_hits: bool


class RankerTrainSettings(_CommonTrainSettings, Protocol):
    """What :func:`train_ranker` reads from its config (e.g. a ``RankerConfig``)."""

    val_fraction: float


# --------------------------------------------------------------------------- data containers
@dataclass
class TwoTowerData:
    """Training rows of the two-tower model: one (user, positive item) interaction per row.

    User-side features are per row (point-in-time); item features are catalog tables indexed by
    item index, so they are stored once and gathered per batch.

    Attributes:
        user_idx: ``(N,)`` int64 user indices.
        user_dense: ``(N, user_dense_dim)`` float32 (``(N, 0)`` when there are none).
        history: ``(N, L)`` int64 item indices the user interacted with before, padded with -1.
        item_idx: ``(N,)`` int64 index of the positive item.
        item_categories: ``(n_items, n_categories)`` float32 multi-hot catalog table.
        item_dense: ``(n_items, item_dense_dim)`` float32 catalog table.
        item_log_q: ``(n_items,)`` log sampling probability of each item; ``None`` estimates it
            from the frequency of ``item_idx`` (:func:`estimate_log_q`).
    """

    user_idx: np.ndarray
    user_dense: np.ndarray
    history: np.ndarray
    item_idx: np.ndarray
    item_categories: np.ndarray
    item_dense: np.ndarray
    item_log_q: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.user_idx.shape[0])

    def validate(self) -> None:
        """Check shapes and index ranges.

        Raises:
            TrainingDataError: the data is empty or inconsistent.
        """
        n = len(self)
        if n < 2:
            raise TrainingDataError(f"two-tower training needs at least 2 interactions, got {n}")
        for name in ("user_dense", "history", "item_idx"):
            if getattr(self, name).shape[0] != n:
                raise TrainingDataError(f"{name} has {getattr(self, name).shape[0]} rows, user_idx has {n}")
        if self.user_dense.ndim != 2 or self.history.ndim != 2:
            raise TrainingDataError("user_dense and history must be 2-D (use shape (N, 0) for none)")
        n_items = self.item_categories.shape[0]
        if self.item_dense.shape[0] != n_items:
            raise TrainingDataError(
                f"item_dense has {self.item_dense.shape[0]} rows, item_categories has {n_items}"
            )
        if self.item_idx.min() < 0 or self.item_idx.max() >= n_items:
            raise TrainingDataError(f"item_idx must lie in [0, {n_items}) (rows of the item tables)")
        if self.item_log_q is not None and self.item_log_q.shape != (n_items,):
            raise TrainingDataError(f"item_log_q must have shape ({n_items},), got {self.item_log_q.shape}")

    def subset(self, rows: np.ndarray | slice) -> TwoTowerData:
        """Interactions ``rows`` as a new :class:`TwoTowerData` sharing the item tables."""
        return TwoTowerData(
            self.user_idx[rows],
            self.user_dense[rows],
            self.history[rows],
            self.item_idx[rows],
            self.item_categories,
            self.item_dense,
            self.item_log_q,
        )


@dataclass
class RankerData:
    """Training rows of the ranker: one (user, item, context) impression per row.

    Attributes:
        dense: ``(N, n_dense)`` float32 (``(N, 0)`` when there are none).
        sparse: ``(N, n_fields)`` int64 (``(N, 0)`` when there are none).
        labels: ``(N,)`` 0/1 labels (e.g. clicked).
    """

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def validate(self, what: str = "training") -> None:
        """Check shapes.

        Raises:
            TrainingDataError: the data is empty or inconsistent.
        """
        n = len(self)
        if n == 0:
            raise TrainingDataError(f"the ranker's {what} set is empty")
        if self.dense.ndim != 2 or self.sparse.ndim != 2 or self.labels.ndim != 1:
            raise TrainingDataError("dense and sparse must be 2-D (use shape (N, 0) for none), labels 1-D")
        if self.dense.shape[0] != n or self.sparse.shape[0] != n:
            raise TrainingDataError(
                f"row counts differ: dense {self.dense.shape[0]}, sparse {self.sparse.shape[0]}, labels {n}"
            )

    def subset(self, rows: np.ndarray | slice) -> RankerData:
        """Rows ``rows`` as a new :class:`RankerData`."""
        return RankerData(self.dense[rows], self.sparse[rows], self.labels[rows])


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (CPU and all GPUs).

    Args:
        seed: The seed.
        deterministic: Also ask torch for deterministic kernels (slower on GPU; warns where
            none exists). CPU training with a fixed thread count is deterministic without it.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def pick_device(use_gpu: bool) -> torch.device:
    """``cuda`` when asked for and available, else ``cpu``; logs which and why.

    Args:
        use_gpu: Whether the caller wants a GPU.

    Returns:
        The device to train or score on.
    """
    if not use_gpu:
        logger.info("using CPU: GPU not requested")
        return torch.device("cpu")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        logger.info("using GPU %s", torch.cuda.get_device_name(dev))
        return dev
    reason = (
        "this torch build has no CUDA support"
        if torch.version.cuda is None
        else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)"
    )
    logger.warning("GPU requested but %s; using CPU", reason)
    return torch.device("cpu")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); ``nan`` when only one class is present.

    Args:
        labels: ``(N,)`` 0/1 labels (anything > 0.5 is positive).
        scores: ``(N,)`` scores, higher meaning more likely positive.
    """
    y = np.asarray(labels).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = avg_rank[inverse.ravel()]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class ShardedBatchSampler(Sampler[torch.Tensor]):
    """Yields index tensors of whole batches (so ``TensorDataset`` gathers each batch at once).

    Each epoch draws a permutation from ``seed + epoch`` (the same on every worker); worker
    ``rank`` takes every ``world_size``-th index of it, truncated to an equal share.

    Args:
        n: Number of rows.
        batch_size: Rows per batch.
        shuffle: Permute each epoch (else keep order).
        seed: Base seed of the permutations.
        rank: This worker's rank.
        world_size: Number of workers.
        drop_last: Drop the final partial batch (unless it would be the only one).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.shard = n // world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last and self.shard >= self.batch_size:
            return self.shard // self.batch_size
        return math.ceil(self.shard / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[self.rank : self.shard * self.world_size : self.world_size]
        for b in range(len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def _loader(tensors: list[torch.Tensor], sampler: ShardedBatchSampler, device: torch.device) -> DataLoader:
    # batch_size=None: the sampler yields whole batches of indices, which TensorDataset gathers
    # with one fancy-index per tensor instead of one __getitem__ per row.
    return DataLoader(
        TensorDataset(*tensors), sampler=sampler, batch_size=None, pin_memory=device.type == "cuda"
    )


def _unwrap(model: nn.Module, cls: type[M]) -> M:
    core = model.module if isinstance(model, DistributedDataParallel) else model
    if not isinstance(core, cls):
        raise TypeError(f"expected a {cls.__name__} (optionally DDP-wrapped), got {type(core).__name__}")
    return core


def _t(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    arr = np.ascontiguousarray(x)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).to(dtype)


@contextmanager
def _optimizer(
    model: nn.Module, cfg: _CommonTrainSettings, sparse: list[torch.Tensor]
) -> Iterator[SparseAwareAdamW]:
    ids = {id(p) for p in sparse}
    dense: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = SparseAwareAdamW(dense, sparse, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.hook(model)
    try:
        yield opt
    finally:
        opt.unhook()


def _step(opt: SparseAwareAdamW, loss: torch.Tensor, clip: float | None) -> None:
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        opt.clip_grad_norm_(clip)
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- two-tower
def train_two_tower(
    model: nn.Module,
    data: TwoTowerData,
    cfg: TwoTowerTrainSettings,
    device: torch.device | str = "cpu",
    callback: EpochCallback | None = None,
    val_data: TwoTowerData | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, float]]:
    """Train a :class:`~streamrec.models.two_tower.TwoTowerModel` with in-batch softmax.

    Each step takes ``cfg.batch_size`` interactions; the other rows' positive items are the
    negatives, with logQ correction (``cfg.logq_correction``) and accidental hits masked
    (``cfg.remove_accidental_hits``).

    Args:
        model: The model (optionally DDP-wrapped); moved to ``device`` and left in train mode.
        data: Training interactions and item tables.
        cfg: Settings (a ``TwoTowerConfig`` or anything with the same attributes).
        device: Where to train.
        callback: Called after every epoch with its metrics; ``True`` stops training.
        val_data: Optional held-out interactions; adds ``val_loss`` (in-batch loss, no dropout).
        rank: This worker's rank (data-parallel training).
        world_size: Number of workers.

    Returns:
        One metrics dict per epoch: ``epoch``, ``train_loss``, ``seconds``, ``rows_per_s`` and,
        with ``val_data``, ``val_loss``.

    Raises:
        TrainingDataError: the data is empty or inconsistent.
    """
    data.validate()
    if val_data is not None:
        val_data.validate()
    device = torch.device(device)
    seed_everything(cfg.seed)
    core = _unwrap(model, TwoTowerModel)
    if cfg.standardize_dense:
        if data.user_dense.shape[1] > 0:
            core.user_dense_norm.fit(data.user_dense)
        if data.item_dense.shape[1] > 0:
            core.item_dense_norm.fit(data.item_dense)
    model.to(device)

    n_items = data.item_categories.shape[0]
    cats = _t(data.item_categories, torch.float32).to(device)
    idense = _t(data.item_dense, torch.float32).to(device)
    log_q_np = data.item_log_q if data.item_log_q is not None else estimate_log_q(data.item_idx, n_items)
    log_q = _t(log_q_np, torch.float32).to(device) if cfg.logq_correction else None

    def tensors(d: TwoTowerData) -> list[torch.Tensor]:
        return [
            _t(d.user_idx, torch.int64),
            _t(d.user_dense, torch.float32),
            _t(d.history, torch.int64),
            _t(d.item_idx, torch.int64),
        ]

    sampler = ShardedBatchSampler(
        len(data), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size, drop_last=True
    )
    loader = _loader(tensors(data), sampler, device)
    with (
        sparse_embedding_grads(model, cfg.sparse_embeddings) as tables,
        _optimizer(model, cfg, tables) as opt,
    ):

        def batch_loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
            uidx, udense, hist, iidx = (t.to(device, non_blocking=True) for t in batch)
            u, v = model(uidx, udense, hist, iidx, cats[iidx], idense[iidx])
            loss = in_batch_softmax_loss(
                u,
                v,
                log_q=None if log_q is None else log_q[iidx],
                temperature=cfg.temperature,
                item_idx=iidx if cfg.remove_accidental_hits else None,
            )
            return loss, int(uidx.shape[0])

        history: list[dict[str, float]] = []
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            sampler.set_epoch(epoch)
            total, rows = torch.zeros((), device=device), 0  # summed on device: no sync per step
            for batch in loader:
                loss, b = batch_loss(batch)
                _step(opt, loss, cfg.grad_clip_norm)
                total += loss.detach() * b
                rows += b
            opt.flush()  # the tables' rows up to date before metrics, validation, checkpoint
            _sync(device)
            seconds = time.perf_counter() - t0
            metrics = {
                "epoch": float(epoch),
                "train_loss": float(total) / max(rows, 1),
                "seconds": seconds,
                "rows_per_s": rows / seconds if seconds > 0 else float("nan"),
            }
            if val_data is not None:
                model.eval()
                vs = ShardedBatchSampler(len(val_data), cfg.batch_size, shuffle=False, drop_last=True)
                vtotal, vrows = 0.0, 0
                with torch.no_grad():
                    for batch in _loader(tensors(val_data), vs, device):
                        loss, b = batch_loss(batch)
                        vtotal += float(loss) * b
                        vrows += b
                metrics["val_loss"] = vtotal / max(vrows, 1)
                model.train()
            logger.info("two-tower epoch %d: %s", epoch, _fmt(metrics))
            history.append(metrics)
            if callback is not None and callback(metrics):
                logger.info("callback stopped training after epoch %d", epoch)
                break
    return history


# --------------------------------------------------------------------------- ranker
def train_ranker(
    model: nn.Module,
    data: RankerData,
    cfg: RankerTrainSettings,
    device: torch.device | str = "cpu",
    callback: EpochCallback | None = None,
    val_data: RankerData | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, float]]:
    """Train a :class:`~streamrec.models.dcn.DCNv2` with binary cross-entropy.

    Without ``val_data``, a seeded ``cfg.val_fraction`` of ``data`` is held out for validation.

    Args:
        model: The model (optionally DDP-wrapped); moved to ``device`` and left in train mode.
        data: Training rows.
        cfg: Settings (a ``RankerConfig`` or anything with the same attributes).
        device: Where to train.
        callback: Called after every epoch with its metrics; ``True`` stops training.
        val_data: Optional validation rows (else split off ``data``).
        rank: This worker's rank (data-parallel training).
        world_size: Number of workers.

    Returns:
        One metrics dict per epoch: ``epoch``, ``train_loss``, ``seconds``, ``rows_per_s`` and,
        with a validation set, ``val_logloss`` and ``val_auc`` (``nan`` if it has one class).

    Raises:
        TrainingDataError: the data is empty, inconsistent or has a single class.
    """
    data.validate()
    seed_everything(cfg.seed)
    if val_data is None and cfg.val_fraction > 0:
        perm = np.random.default_rng(cfg.seed).permutation(len(data))
        n_val = int(round(len(data) * cfg.val_fraction))
        if 0 < n_val < len(data):
            val_data, data = data.subset(perm[:n_val]), data.subset(perm[n_val:])
    if val_data is not None:
        val_data.validate("validation")
    labels = np.asarray(data.labels, dtype=np.float32)
    n_pos = int((labels > 0.5).sum())
    if n_pos == 0 or n_pos == len(labels):
        raise TrainingDataError(
            f"the ranker's training set has only {'negatives' if n_pos == 0 else 'positives'} "
            f"({len(labels)} rows); widen the training window"
        )
    device = torch.device(device)
    core = _unwrap(model, DCNv2)
    if cfg.standardize_dense and data.dense.shape[1] > 0:
        core.dense_norm.fit(data.dense)
    model.to(device)

    sampler = ShardedBatchSampler(len(data), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
    tensors = [_t(data.dense, torch.float32), _t(data.sparse, torch.int64), torch.from_numpy(labels)]
    loader = _loader(tensors, sampler, device)
    with (
        sparse_embedding_grads(model, cfg.sparse_embeddings) as tables,
        _optimizer(model, cfg, tables) as opt,
    ):
        history: list[dict[str, float]] = []
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            sampler.set_epoch(epoch)
            total, rows = torch.zeros((), device=device), 0  # summed on device: no sync per step
            for batch in loader:
                dense, sparse, y = (t.to(device, non_blocking=True) for t in batch)
                loss = F.binary_cross_entropy_with_logits(model(dense, sparse), y)
                _step(opt, loss, cfg.grad_clip_norm)
                total += loss.detach() * y.shape[0]
                rows += int(y.shape[0])
            opt.flush()
            _sync(device)
            seconds = time.perf_counter() - t0
            metrics = {
                "epoch": float(epoch),
                "train_loss": float(total) / max(rows, 1),
                "seconds": seconds,
                "rows_per_s": rows / seconds if seconds > 0 else float("nan"),
            }
            if val_data is not None:
                metrics.update(evaluate_ranker(model, val_data, device, batch_size=max(cfg.batch_size, 8192)))
                model.train()
            logger.info("ranker epoch %d: %s", epoch, _fmt(metrics))
            history.append(metrics)
            if callback is not None and callback(metrics):
                logger.info("callback stopped training after epoch %d", epoch)
                break
    return history


def evaluate_ranker(
    model: nn.Module, data: RankerData, device: torch.device | str = "cpu", batch_size: int = 8192
) -> dict[str, float]:
    """Log loss and AUC of ``model`` on ``data`` (eval mode; the model is left in eval mode).

    Returns:
        ``{"val_logloss": ..., "val_auc": ...}``.
    """
    device = torch.device(device)
    model.eval()
    dense = _t(data.dense, torch.float32)
    sparse = _t(data.sparse, torch.int64)
    logits = np.empty(len(data), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            s = slice(start, start + batch_size)
            logits[s] = model(dense[s].to(device), sparse[s].to(device)).float().cpu().numpy()
    y = np.asarray(data.labels, dtype=np.float32)
    logloss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y)))
    return {"val_logloss": logloss, "val_auc": roc_auc(y, logits)}


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
