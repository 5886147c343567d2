"""Hyper-parameters of the torch models, as strict pydantic configs.

Sizes that come from the data (number of users, items, categories, dense feature widths, sparse
field cardinalities) are *not* part of these configs: they are passed to ``build_model`` by the
training job, which reads them from the feature store. Everything else (architecture and
optimisation settings) lives here, so a YAML training config maps one-to-one onto a model.

The training loop in :mod:`streamrec.models.train_loop` reads these configs only through
attribute access (see its ``*TrainSettings`` protocols), so it does not import pydantic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from streamrec.config import StrictModel
from streamrec.errors import ConfigError
from streamrec.models.dcn import DCNv2
from streamrec.models.two_tower import TwoTowerModel


class TwoTowerConfig(StrictModel):
    """Architecture and training settings of the two-tower retrieval model.

    Attributes:
        embedding_dim: Width of the output (retrieval) embeddings, i.e. the FAISS dimension.
        id_embedding_dim: Width of the user-id and item-id embeddings.
        category_embedding_dim: Width of the (mean-pooled) category embedding of an item.
        hidden_dims: Hidden layer widths of each tower's MLP.
        dropout: Dropout after each hidden layer.
        n_oov_buckets: Hash buckets for user ids the model has not seen.
        user_id_dropout: Share of training rows whose user id is routed to its OOV bucket, so the
            buckets learn an "unknown user" embedding instead of staying at their zero init.
        normalize: L2-normalise the output embeddings (dot product = cosine).
        temperature: Softmax temperature of the in-batch loss.
        logq_correction: Subtract log(item sampling probability) from in-batch logits.
        remove_accidental_hits: Mask in-batch negatives that are the row's own positive item.
        standardize_dense: Fit mean/std of dense features on the training data and store them in
            the model (so serving applies the same transform).
        epochs: Passes over the training data.
        batch_size: Rows per step (also the number of in-batch negatives + 1).
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay.
        grad_clip_norm: Clip the global gradient norm to this value; ``None`` disables clipping.
        sparse_embeddings: Train the user-id and item-id tables with sparse gradients and a
            row-wise AdamW (only the rows a batch looks up are read and written), instead of a
            dense AdamW over every row each step. Same saved weights either way; measured in
            ``docs/benchmarks.md`` (two-tower training cost at catalogue scale).
        seed: Seed of weight init (when building through this config), shuffling and dropout.
    """

    embedding_dim: int = Field(128, ge=1)
    id_embedding_dim: int = Field(64, ge=1)
    category_embedding_dim: int = Field(32, ge=1)
    hidden_dims: list[int] = Field(default_factory=lambda: [256])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    n_oov_buckets: int = Field(1024, ge=1)
    user_id_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    normalize: bool = True
    temperature: float = Field(0.05, gt=0.0)
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    standardize_dense: bool = True
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(1024, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    sparse_embeddings: bool = True
    seed: int = 42

    def build_model(
        self,
        *,
        n_users: int,
        n_items: int,
        n_categories: int,
        user_dense_dim: int,
        item_dense_dim: int,
    ) -> TwoTowerModel:
        """Build an untrained :class:`TwoTowerModel` with these settings.

        Weights are initialised from ``seed`` so two builds with one config are identical.

        Args:
            n_users: Number of known users (user indices ``0 .. n_users-1``).
            n_items: Number of known items (item indices ``0 .. n_items-1``).
            n_categories: Width of the item category multi-hot vector.
            user_dense_dim: Width of the dense user feature vector (may be 0).
            item_dense_dim: Width of the dense item feature vector (may be 0).

        Returns:
            The model, in training mode, on CPU.
        """
        import torch

        torch.manual_seed(self.seed)
        return TwoTowerModel(
            n_users=n_users,
            n_items=n_items,
            n_categories=n_categories,
            user_dense_dim=user_dense_dim,
            item_dense_dim=item_dense_dim,
            embedding_dim=self.embedding_dim,
            id_embedding_dim=self.id_embedding_dim,
            category_embedding_dim=self.category_embedding_dim,
            hidden_dims=list(self.hidden_dims),
            dropout=self.dropout,
            n_oov_buckets=self.n_oov_buckets,
            user_id_dropout=self.user_id_dropout,
            normalize=self.normalize,
        )


class RankerConfig(StrictModel):
    """Architecture and training settings of the DCN-V2 ranker.

    Attributes:
        embedding_dim: Width of each sparse field's embedding.
        n_cross_layers: Number of cross layers.
        cross_rank: Rank of the low-rank cross layers (``W = U V^T``); ``None`` for full rank.
        structure: ``"stacked"`` (cross network then deep MLP) or ``"parallel"`` (both on the
            input, outputs concatenated).
        deep_hidden: Hidden layer widths of the deep MLP.
        dropout: Dropout after each deep hidden layer.
        standardize_dense: Fit mean/std of dense features on the training data and store them in
            the model (so serving applies the same transform).
        epochs: Passes over the training data.
        batch_size: Rows per step.
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay.
        grad_clip_norm: Clip the global gradient norm to this value; ``None`` disables clipping.
        val_fraction: Share of rows held out for validation metrics when no validation set is
            given (0 disables validation).
        sparse_embeddings: Train the sparse fields' embedding table with sparse gradients and a
            row-wise AdamW (see ``TwoTowerConfig.sparse_embeddings``).
        seed: Seed of weight init (when building through this config), split, shuffling, dropout.
        dense_inputs: Names of the dense columns of the feature layout
            (:class:`~streamrec.ranking.features.RankerFeatures`) the model reads; ``None`` reads
            them all. The layout, the logged inputs and the skew checks stay the full ones.
        sparse_inputs: Names of the sparse fields the model embeds (``item``, ``primary_category``,
            ``creator``, ``device``); ``None`` embeds them all, ``[]`` none.
    """

    embedding_dim: int = Field(16, ge=1)
    n_cross_layers: int = Field(3, ge=0)
    cross_rank: int | None = Field(None, ge=1)
    structure: Literal["stacked", "parallel"] = "parallel"
    deep_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    standardize_dense: bool = True
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(2048, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    sparse_embeddings: bool = True
    seed: int = 42
    dense_inputs: list[str] | None = None
    sparse_inputs: list[str] | None = None

    def build_model(
        self,
        *,
        n_dense: int,
        sparse_cardinalities: list[int],
        dense_names: Sequence[str] | None = None,
        sparse_names: Sequence[str] | None = None,
    ) -> DCNv2:
        """Build an untrained :class:`DCNv2` with these settings.

        Weights are initialised from ``seed`` so two builds with one config are identical.

        Args:
            n_dense: Width of the dense feature vector (may be 0).
            sparse_cardinalities: Number of distinct values of each sparse field; values outside
                ``0 .. cardinality-1`` go to the field's out-of-vocabulary row.
            dense_names: Names of the dense columns, in order (needed with ``dense_inputs``).
            sparse_names: Names of the sparse fields, in order (needed with ``sparse_inputs``).

        Returns:
            The model, in training mode, on CPU.

        Raises:
            ConfigError: ``dense_inputs`` or ``sparse_inputs`` names a column the layout lacks
                (or the layout's names are not given).
        """
        import torch

        dense_columns = _positions("dense_inputs", self.dense_inputs, dense_names, n_dense)
        sparse_columns = _positions(
            "sparse_inputs", self.sparse_inputs, sparse_names, len(sparse_cardinalities)
        )
        torch.manual_seed(self.seed)
        return DCNv2(
            n_dense=n_dense,
            sparse_cardinalities=list(sparse_cardinalities),
            embedding_dim=self.embedding_dim,
            n_cross_layers=self.n_cross_layers,
            cross_rank=self.cross_rank,
            structure=self.structure,
            deep_hidden=list(self.deep_hidden),
            dropout=self.dropout,
            dense_columns=dense_columns,
            sparse_columns=sparse_columns,
        )


def _positions(
    option: str, wanted: Sequence[str] | None, names: Sequence[str] | None, width: int
) -> list[int] | None:
    """Positions of the ``wanted`` names among ``names`` (``None`` when every column is wanted)."""
    if wanted is None:
        return None
    if names is None or len(names) != width:
        raise ConfigError(f"ranker.{option} needs the feature layout's {width} column names to select from")
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ConfigError(
            f"ranker.{option} names {missing}, which the ranker's feature layout lacks: {list(names)}"
        )
    return [list(names).index(n) for n in wanted]
