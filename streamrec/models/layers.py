"""Small building blocks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class DenseNormalizer(nn.Module):
    """Standardises dense features with a mean and std stored as buffers.

    The statistics are part of the model's ``state_dict``, so the transform fitted on the
    training data is applied unchanged at serving time (no train/serve skew). Until
    :meth:`fit` is called it is the identity.

    Args:
        dim: Number of features (may be 0).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mean: torch.Tensor
        self.inv_std: torch.Tensor
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: np.ndarray | torch.Tensor, eps: float = 1e-6) -> None:
        """Fit mean and std on ``x`` of shape ``(n, dim)``; constant columns get std 1.

        Args:
            x: Training values; non-finite values are ignored.
            eps: Standard deviations below this are treated as constant columns.
        """
        if self.dim == 0:
            return
        arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim or arr.shape[0] == 0:
            raise ValueError(f"expected a non-empty (n, {self.dim}) array to fit, got shape {arr.shape}")
        arr = np.where(np.isfinite(arr), arr, np.nan)
        mean = np.nan_to_num(np.nanmean(arr, axis=0), nan=0.0)
        std = np.nan_to_num(np.nanstd(arr, axis=0), nan=1.0)
        std = np.where(std < eps, 1.0, std)
        self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.inv_std.copy_(torch.from_numpy((1.0 / std).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(x - mean) / std``."""
        return (x - self.mean) * self.inv_std


def mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Linear + ReLU (+ dropout) layers; returns the stack and its output width."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers.append(nn.Linear(d, h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    return nn.Sequential(*layers), d
