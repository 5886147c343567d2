"""DCN-V2 ranker (Wang et al., 2021): explicit feature crosses plus a deep MLP.

Inputs are a float32 dense matrix ``(B, n_dense)`` and an int64 sparse matrix ``(B, n_fields)``
holding one categorical value per field. Each field's values ``0 .. cardinality-1`` have their
own embedding; any other value (``-1``, an id newer than the model) uses the field's
out-of-vocabulary row. The model outputs one logit per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from streamrec.models.layers import DenseNormalizer, mlp

Structure = Literal["stacked", "parallel"]


class CrossLayer(nn.Module):
    """One DCN-V2 cross layer: ``x_{l+1} = x_0 * (W x_l + b) + x_l``.

    With ``rank`` set, ``W`` is factorised as ``U V^T`` (``d x r`` each), which costs
    ``2 d r`` instead of ``d^2`` parameters and FLOPs.

    Args:
        dim: Width of ``x_0`` and ``x_l``.
        rank: Rank of the factorisation, or ``None`` for a full-rank ``W``.
    """

    def __init__(self, dim: int, rank: int | None = None) -> None:
        super().__init__()
        self.full: nn.Linear | None = None
        self.v: nn.Linear | None = None
        self.u: nn.Linear | None = None
        if rank is None or rank >= dim:
            self.full = nn.Linear(dim, dim)
            nn.init.xavier_uniform_(self.full.weight)
            nn.init.zeros_(self.full.bias)
        else:
            self.v = nn.Linear(dim, rank, bias=False)
            self.u = nn.Linear(rank, dim)
            nn.init.xavier_uniform_(self.v.weight)
            nn.init.xavier_uniform_(self.u.weight)
            nn.init.zeros_(self.u.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to the current ``x`` given the input ``x0``."""
        if self.full is not None:
            wx = self.full(x)
        else:
            assert self.u is not None and self.v is not None
            wx = self.u(self.v(x))
        return torch.addcmul(x, x0, wx)


class DCNv2(nn.Module):
    """DCN-V2 over dense features and embedded sparse fields.

    Args:
        n_dense: Width of the dense features (may be 0).
        sparse_cardinalities: Distinct values of each sparse field (may be empty).
        embedding_dim: Width of each field's embedding.
        n_cross_layers: Number of cross layers (0 gives a plain MLP).
        cross_rank: Low-rank factorisation of the cross weights; ``None`` for full rank.
        structure: ``"stacked"`` (cross then deep) or ``"parallel"`` (cross and deep side by side).
        deep_hidden: Hidden widths of the deep MLP (may be empty).
        dropout: Dropout after each deep hidden layer.
        dense_columns: Positions of the dense columns the model reads (``None``: all). The input
            stays ``(B, n_dense)``, so a model reading fewer columns scores the same feature
            layout; the others are ignored.
        sparse_columns: Positions of the sparse fields the model embeds (``None``: all).
    """

    def __init__(
        self,
        n_dense: int,
        sparse_cardinalities: Sequence[int],
        embedding_dim: int = 16,
        n_cross_layers: int = 3,
        cross_rank: int | None = None,
        structure: Structure = "parallel",
        deep_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        dense_columns: Sequence[int] | None = None,
        sparse_columns: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        cards = [int(c) for c in sparse_cardinalities]
        if n_dense < 0 or any(c < 1 for c in cards):
            raise ValueError("n_dense must be >= 0 and every cardinality >= 1")
        dense_cols = list(range(n_dense)) if dense_columns is None else [int(c) for c in dense_columns]
        sparse_cols = list(range(len(cards))) if sparse_columns is None else [int(c) for c in sparse_columns]
        for what, cols, width in (("dense", dense_cols, n_dense), ("sparse", sparse_cols, len(cards))):
            if len(set(cols)) != len(cols) or any(not 0 <= c < width for c in cols):
                raise ValueError(f"{what}_columns must be distinct positions in 0..{width - 1}, got {cols}")
        if not dense_cols and not sparse_cols:
            raise ValueError("the ranker needs at least one dense or sparse feature")
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel', got {structure!r}")
        self.hparams: dict[str, Any] = {
            "n_dense": n_dense,
            "sparse_cardinalities": cards,
            "embedding_dim": embedding_dim,
            "n_cross_layers": n_cross_layers,
            "cross_rank": cross_rank,
            "structure": structure,
            "deep_hidden": list(deep_hidden),
            "dropout": dropout,
        }
        # Only when set: a model that reads every input saves the kwargs older code can load.
        if dense_columns is not None:
            self.hparams["dense_columns"] = dense_cols
        if sparse_columns is not None:
            self.hparams["sparse_columns"] = sparse_cols
        self.n_dense = n_dense
        self.n_fields = len(cards)
        self.structure = structure
        # Column selections as buffers (saved with the weights); None when every column is read.
        self.dense_columns: torch.Tensor | None
        self.sparse_columns: torch.Tensor | None
        every_dense, every_field = dense_cols == list(range(n_dense)), sparse_cols == list(range(len(cards)))
        self.register_buffer(
            "dense_columns", None if every_dense else torch.tensor(dense_cols, dtype=torch.int64)
        )
        self.register_buffer(
            "sparse_columns", None if every_field else torch.tensor(sparse_cols, dtype=torch.int64)
        )

        # One table for all fields: field f's rows are offsets[f] .. offsets[f] + card_f, the
        # last of which is the field's OOV row. One lookup per batch instead of one per field.
        self.cardinalities: torch.Tensor
        self.offsets: torch.Tensor
        offsets = [0]
        for c in cards[:-1]:
            offsets.append(offsets[-1] + c + 1)
        self.register_buffer("cardinalities", torch.tensor(cards, dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(offsets if cards else [], dtype=torch.int64))
        self.embedding = nn.Embedding(sum(c + 1 for c in cards) or 1, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.dense_norm = DenseNormalizer(n_dense)

        self.input_dim = len(dense_cols) + len(sparse_cols) * embedding_dim
        self.cross = nn.ModuleList(CrossLayer(self.input_dim, cross_rank) for _ in range(n_cross_layers))
        if structure == "stacked":
            self.deep, out_dim = mlp(self.input_dim, deep_hidden, dropout)
        else:
            self.deep, deep_dim = mlp(self.input_dim, deep_hidden, dropout)
            out_dim = self.input_dim + deep_dim
        self.head = nn.Linear(out_dim, 1)

    def sparse_rows(self, sparse: torch.Tensor) -> torch.Tensor:
        """Rows of the shared embedding table for ``(B, n_fields)`` values (OOV mapped)."""
        known = (sparse >= 0) & (sparse < self.cardinalities)
        return torch.where(known, sparse, self.cardinalities) + self.offsets

    def embed(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """The input ``x_0``: standardised dense features and flattened field embeddings.

        Only the columns and fields the model reads (``dense_columns``, ``sparse_columns``).
        """
        parts = []
        if self.n_dense > 0:
            x = self.dense_norm(dense)
            parts.append(x if self.dense_columns is None else x.index_select(1, self.dense_columns))
        if self.n_fields > 0:
            rows = self.sparse_rows(sparse)
            if self.sparse_columns is not None:
                rows = rows.index_select(1, self.sparse_columns)
            emb = self.embedding(rows)
            parts.append(emb.reshape(emb.shape[0], -1))
        parts = [p for p in parts if p.shape[1] > 0]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            dense: ``(B, n_dense)`` float32 (a ``(B, 0)`` tensor when there are none).
            sparse: ``(B, n_fields)`` int64 (a ``(B, 0)`` tensor when there are none).

        Returns:
            ``(B,)`` logits.
        """
        x0 = self.embed(dense, sparse)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out = self.deep(x) if self.structure == "stacked" else torch.cat([x, self.deep(x0)], dim=1)
        return self.head(out).squeeze(-1)

    @torch.inference_mode()
    def predict_proba(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Click probabilities ``sigmoid(logit)``, ``(B,)``, without autograd.

        Call ``eval()`` first for deterministic output (dropout). For serving use
        :class:`streamrec.models.scoring.RankerScorer`, which takes numpy arrays.
        """
        return torch.sigmoid(self(dense, sparse))
