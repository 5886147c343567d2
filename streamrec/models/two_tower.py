"""Two-tower retrieval model with an in-batch sampled-softmax loss (logQ-corrected).

Conventions (all indices are contiguous model indices made by the feature pipeline, int64):

* ``user_idx`` ``(B,)``: ``0 .. n_users-1`` are known users. Any other value (a new user's raw
  id, ``-1``, ...) is hashed into one of ``n_oov_buckets`` out-of-vocabulary rows, so unknown
  users still get an embedding from their dense features and history.
* ``history`` ``(B, L)``: the user's recent item indices, padded with ``-1``. Entries outside
  ``0 .. n_items-1`` (padding, items newer than the model) are masked out of the mean pool.
* ``item_idx`` ``(B,)``: ``0 .. n_items-1``; anything else uses one shared "unknown item" row,
  so a new item is embedded from its categories and dense features alone.
* Dense features are float32 ``(B, dim)``; pass ``None`` when the width is 0.
* Category features are a float32 multi-hot ``(B, n_categories)``.

Item-id embeddings are shared by the item tower and the user's history pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamrec.models.layers import DenseNormalizer, mlp

ArrayLike = np.ndarray | torch.Tensor

#: Value used to pad history sequences.
HISTORY_PAD = -1


class TwoTowerModel(nn.Module):
    """User and item towers producing (by default L2-normalised) embeddings of one width.

    Args:
        n_users: Number of known users.
        n_items: Number of known items.
        n_categories: Width of the item category multi-hot (may be 0).
        user_dense_dim: Width of the dense user features (may be 0).
        item_dense_dim: Width of the dense item features (may be 0).
        embedding_dim: Width of the output embeddings.
        id_embedding_dim: Width of user-id and item-id embeddings.
        category_embedding_dim: Width of the pooled category embedding.
        hidden_dims: Hidden widths of each tower's MLP.
        dropout: Dropout after each hidden layer.
        n_oov_buckets: Hash buckets for unknown user indices.
        user_id_dropout: In training, share of rows whose user id is replaced by its OOV bucket.
        normalize: L2-normalise outputs.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        n_categories: int,
        user_dense_dim: int,
        item_dense_dim: int,
        embedding_dim: int = 128,
        id_embedding_dim: int = 64,
        category_embedding_dim: int = 32,
        hidden_dims: Sequence[int] = (256,),
        dropout: float = 0.0,
        n_oov_buckets: int = 1024,
        user_id_dropout: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if n_users < 0 or n_items < 1 or n_oov_buckets < 1:
            raise ValueError("need n_users >= 0, n_items >= 1 and n_oov_buckets >= 1")
        if min(n_categories, user_dense_dim, item_dense_dim) < 0:
            raise ValueError("feature widths must be >= 0")
        self.hparams: dict[str, Any] = {
            "n_users": n_users,
            "n_items": n_items,
            "n_categories": n_categories,
            "user_dense_dim": user_dense_dim,
            "item_dense_dim": item_dense_dim,
            "embedding_dim": embedding_dim,
            "id_embedding_dim": id_embedding_dim,
            "category_embedding_dim": category_embedding_dim,
            "hidden_dims": list(hidden_dims),
            "dropout": dropout,
            "n_oov_buckets": n_oov_buckets,
            "user_id_dropout": user_id_dropout,
            "normalize": normalize,
        }
        self.n_users = n_users
        self.n_items = n_items
        self.n_categories = n_categories
        self.user_dense_dim = user_dense_dim
        self.item_dense_dim = item_dense_dim
        self.embedding_dim = embedding_dim
        self.n_oov_buckets = n_oov_buckets
        self.user_id_dropout = user_id_dropout
        self.normalize = normalize

        # Users: known rows then OOV buckets. Items: known rows then one "unknown item" row.
        self.user_embedding = nn.Embedding(n_users + n_oov_buckets, id_embedding_dim)
        self.item_embedding = nn.Embedding(n_items + 1, id_embedding_dim)
        self.category_proj = (
            nn.Linear(n_categories, category_embedding_dim, bias=False) if n_categories > 0 else None
        )
        self.user_dense_norm = DenseNormalizer(user_dense_dim)
        self.item_dense_norm = DenseNormalizer(item_dense_dim)

        user_in = id_embedding_dim + user_dense_dim + id_embedding_dim
        item_in = id_embedding_dim + (category_embedding_dim if n_categories > 0 else 0) + item_dense_dim
        self.user_mlp, du = mlp(user_in, hidden_dims, dropout)
        self.item_mlp, di = mlp(item_in, hidden_dims, dropout)
        self.user_out = nn.Linear(du, embedding_dim)
        self.item_out = nn.Linear(di, embedding_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=0.05)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        with torch.no_grad():
            # Unknown users/items start at zero: they are described by their other features.
            self.user_embedding.weight[self.n_users :].zero_()
            self.item_embedding.weight[self.n_items :].zero_()

    # ------------------------------------------------------------------ index mapping
    def user_rows(self, user_idx: torch.Tensor) -> torch.Tensor:
        """Embedding rows for user indices: known users keep theirs, others go to an OOV bucket."""
        known = (user_idx >= 0) & (user_idx < self.n_users)
        return torch.where(known, user_idx, self.oov_rows(user_idx))

    def oov_rows(self, user_idx: torch.Tensor) -> torch.Tensor:
        """The OOV bucket row of each user index (a stable hash: index mod ``n_oov_buckets``)."""
        return self.n_users + torch.remainder(user_idx, self.n_oov_buckets)

    def item_rows(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Embedding rows for item indices; unknown items share the last row."""
        known = (item_idx >= 0) & (item_idx < self.n_items)
        return torch.where(known, item_idx, torch.full_like(item_idx, self.n_items))

    # ------------------------------------------------------------------ towers
    def user_forward(
        self,
        user_idx: torch.Tensor,
        user_dense: torch.Tensor | None,
        history: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embed users.

        Args:
            user_idx: ``(B,)`` int64 user indices (unknown ones use an OOV bucket).
            user_dense: ``(B, user_dense_dim)`` float32, or ``None`` when the width is 0.
            history: ``(B, L)`` int64 item indices padded with ``-1``, or ``None`` (no history).

        Returns:
            ``(B, embedding_dim)`` float32 embeddings.
        """
        rows = self.user_rows(user_idx)
        if self.training and self.user_id_dropout > 0:
            drop = torch.rand(rows.shape, device=rows.device) < self.user_id_dropout
            rows = torch.where(drop, self.oov_rows(user_idx), rows)
        parts = [self.user_embedding(rows)]
        if self.user_dense_dim > 0:
            if user_dense is None:
                raise ValueError(f"user_dense of width {self.user_dense_dim} is required")
            parts.append(self.user_dense_norm(user_dense))
        parts.append(self._pool_history(history, user_idx.shape[0]))
        h = self.user_mlp(torch.cat(parts, dim=1))
        return self._finish(self.user_out(h))

    def item_forward(
        self,
        item_idx: torch.Tensor,
        item_categories: torch.Tensor | None,
        item_dense: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embed items.

        Args:
            item_idx: ``(B,)`` int64 item indices (unknown ones use the shared unknown-item row).
            item_categories: ``(B, n_categories)`` float32 multi-hot, or ``None`` when 0 wide.
            item_dense: ``(B, item_dense_dim)`` float32, or ``None`` when the width is 0.

        Returns:
            ``(B, embedding_dim)`` float32 embeddings.
        """
        parts = [self.item_embedding(self.item_rows(item_idx))]
        if self.category_proj is not None:
            if item_categories is None:
                raise ValueError(f"item_categories of width {self.n_categories} is required")
            count = item_categories.sum(dim=1, keepdim=True).clamp_min(1.0)
            parts.append(self.category_proj(item_categories) / count)
        if self.item_dense_dim > 0:
            if item_dense is None:
                raise ValueError(f"item_dense of width {self.item_dense_dim} is required")
            parts.append(self.item_dense_norm(item_dense))
        h = self.item_mlp(torch.cat(parts, dim=1))
        return self._finish(self.item_out(h))

    def forward(
        self,
        user_idx: torch.Tensor,
        user_dense: torch.Tensor | None,
        history: torch.Tensor | None,
        item_idx: torch.Tensor,
        item_categories: torch.Tensor | None,
        item_dense: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of (user, positive item) pairs; see :meth:`user_forward`/:meth:`item_forward`.

        Going through ``forward`` (rather than the two tower methods) keeps the model usable
        under ``DistributedDataParallel``.

        Returns:
            ``(user_emb, item_emb)``, each ``(B, embedding_dim)``.
        """
        return (
            self.user_forward(user_idx, user_dense, history),
            self.item_forward(item_idx, item_categories, item_dense),
        )

    def _pool_history(self, history: torch.Tensor | None, batch: int) -> torch.Tensor:
        dim = self.item_embedding.embedding_dim
        if history is None or history.numel() == 0:
            return self.item_embedding.weight.new_zeros(batch, dim)
        mask = (history >= 0) & (history < self.n_items)
        emb = self.item_embedding(torch.where(mask, history, torch.zeros_like(history)))
        maskf = mask.unsqueeze(-1).to(emb.dtype)
        return (emb * maskf).sum(dim=1) / maskf.sum(dim=1).clamp_min(1.0)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    # ------------------------------------------------------------------ batch encoding
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def encode_users(
        self,
        user_idx: ArrayLike,
        user_dense: ArrayLike | None = None,
        history: ArrayLike | None = None,
        batch_size: int = 8192,
    ) -> np.ndarray:
        """Embed many users in batches (eval mode), for queries against a FAISS index.

        Args:
            user_idx: ``(N,)`` user indices.
            user_dense: ``(N, user_dense_dim)`` dense features (``None`` when 0 wide).
            history: ``(N, L)`` item indices padded with ``-1`` (``None`` for no history).
            batch_size: Rows per forward pass.

        Returns:
            ``(N, embedding_dim)`` C-contiguous float32 array.
        """
        uidx = _as_tensor(user_idx, torch.int64)
        dense = None if user_dense is None else _as_tensor(user_dense, torch.float32)
        hist = None if history is None else _as_tensor(history, torch.int64)
        n = uidx.shape[0]
        dev = self._device()

        def run(s: slice) -> torch.Tensor:
            return self.user_forward(
                uidx[s].to(dev),
                None if dense is None else dense[s].to(dev),
                None if hist is None else hist[s].to(dev),
            )

        return self._encode(n, batch_size, run)

    @torch.inference_mode()
    def encode_items(
        self,
        item_categories: ArrayLike | None,
        item_dense: ArrayLike | None,
        item_idx: ArrayLike | None = None,
        batch_size: int = 8192,
    ) -> np.ndarray:
        """Embed many items in batches (eval mode), e.g. the whole catalog for a FAISS index.

        Args:
            item_categories: ``(N, n_categories)`` multi-hot (``None`` when 0 wide).
            item_dense: ``(N, item_dense_dim)`` dense features (``None`` when 0 wide).
            item_idx: ``(N,)`` item indices; default ``arange(N)`` (row ``i`` is item ``i``).
            batch_size: Rows per forward pass.

        Returns:
            ``(N, embedding_dim)`` C-contiguous float32 array.
        """
        cats = None if item_categories is None else _as_tensor(item_categories, torch.float32)
        dense = None if item_dense is None else _as_tensor(item_dense, torch.float32)
        if item_idx is not None:
            iidx = _as_tensor(item_idx, torch.int64)
        else:
            n_rows = cats.shape[0] if cats is not None else dense.shape[0] if dense is not None else None
            if n_rows is None:
                raise ValueError("pass item_idx when the model has no category or dense item features")
            iidx = torch.arange(n_rows, dtype=torch.int64)
        n = iidx.shape[0]
        dev = self._device()

        def run(s: slice) -> torch.Tensor:
            return self.item_forward(
                iidx[s].to(dev),
                None if cats is None else cats[s].to(dev),
                None if dense is None else dense[s].to(dev),
            )

        return self._encode(n, batch_size, run)

    def _encode(self, n: int, batch_size: int, run: Any) -> np.ndarray:
        out = np.empty((n, self.embedding_dim), dtype=np.float32)
        was_training = self.training
        if was_training:  # serving models are already in eval mode: skip the module-tree walk
            self.eval()
        try:
            for start in range(0, n, batch_size):
                s = slice(start, min(start + batch_size, n))
                out[s] = run(s).float().cpu().numpy()
        finally:
            if was_training:
                self.train()
        return out


def in_batch_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    *,
    log_q: torch.Tensor | None = None,
    temperature: float = 0.05,
    item_idx: torch.Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """In-batch sampled softmax: row ``i``'s positive is item ``i``, the other items are negatives.

    The logit of user ``i`` and item ``j`` is ``<u_i, v_j> / temperature - log_q[j]`` (logQ
    correction, Yi et al. 2019): in-batch negatives are sampled in proportion to popularity, and
    subtracting their log sampling probability removes that bias from the learned scores.

    Args:
        user_emb: ``(B, D)`` user embeddings.
        item_emb: ``(B, D)`` embeddings of each row's positive item.
        log_q: ``(B,)`` log sampling probability of each batch item, or ``None`` for no
            correction. Only differences between items matter (a constant shift is a no-op).
        temperature: Divides the dot products.
        item_idx: ``(B,)`` item indices; when given, a negative that is the row's own positive
            item (the same item twice in the batch) is masked out ("accidental hit").
        reduction: ``"mean"`` for the mean over rows, ``"none"`` for the ``(B,)`` row losses.

    Returns:
        The mean cross-entropy (a scalar), or the per-row losses.
    """
    logits = (user_emb @ item_emb.T) / temperature
    if log_q is not None:
        logits = logits - log_q.to(logits.dtype).unsqueeze(0)
    if item_idx is not None:
        hits = item_idx.unsqueeze(0) == item_idx.unsqueeze(1)
        hits.fill_diagonal_(False)
        logits = logits.masked_fill(hits, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def estimate_log_q(item_idx: ArrayLike, n_items: int, smoothing: float = 1.0) -> np.ndarray:
    """Log sampling probability of each item, from its frequency among training positives.

    With in-batch negatives an item is sampled as often as it is a positive, so its frequency is
    the sampling probability (up to a constant, which the softmax ignores).

    Args:
        item_idx: ``(N,)`` positive item index of every training row.
        n_items: Number of items (length of the result).
        smoothing: Add-``smoothing`` count so unseen items get a finite value.

    Returns:
        ``(n_items,)`` float32 array of ``log q``.
    """
    idx = item_idx.cpu().numpy() if isinstance(item_idx, torch.Tensor) else np.asarray(item_idx)
    counts = np.bincount(idx.astype(np.int64).ravel(), minlength=n_items)[:n_items].astype(np.float64)
    q = (counts + smoothing) / (counts.sum() + smoothing * n_items)
    return np.log(q).astype(np.float32)


def _as_tensor(x: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    arr = np.ascontiguousarray(x)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory
        arr = arr.copy()
    return torch.from_numpy(arr).to(dtype)
