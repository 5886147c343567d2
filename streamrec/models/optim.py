"""Sparse-aware AdamW: embedding tables updated only in the rows a step's batch looked up.

:func:`sparse_embedding_grads` gives a model's ``nn.Embedding`` tables sparse gradients;
:class:`SparseAwareAdamW` then reads and writes only the rows a step's batch looked up, each
first catching up in closed form on the AdamW steps it missed, where a dense AdamW touched every
row of a 200,000-item table per step. A DDP-wrapped model keeps dense gradients (NCCL has no
sparse all-reduce).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


#: Missed steps whose momentum a row catches up on when next touched (the rest is below
#: ``(beta1 / sqrt(beta2)) ** CATCH_UP_STEPS``, about 4e-5 of the total with the defaults).
CATCH_UP_STEPS = 96


class SparseAwareAdamW:
    """AdamW whose embedding tables are updated row-wise, only where a step's batch looked up.

    Dense parameters use :class:`torch.optim.AdamW` unchanged. A table with sparse gradients
    (``nn.Embedding(sparse=True)``) keeps AdamW's moments per row plus the step at which each row
    was last brought up to date. A step reads and writes only the rows in its batch. Each row is
    first caught up on the steps it missed, before the forward pass looks it up (a pre-hook,
    :meth:`hook`), in closed form: with no gradient, dense AdamW moves a row by its decaying
    momentum and decays its weight and moments; that motion is summed over the missed steps,
    with the bias correction of each. Then :meth:`step` applies the step's gradient. The
    result is dense AdamW's, up to ``eps`` in the missed steps and the truncation at
    :data:`CATCH_UP_STEPS` (tested), at a cost that follows the batch, not the table: dense
    AdamW read and wrote the weights, gradient and both moments of every row (200,000 items x
    64 floats, four times) each step. Call :meth:`flush` before reading the weights (the
    training loops do at the end of every epoch).

    Args:
        dense: Parameters with dense gradients.
        sparse: Parameters with sparse (row) gradients.
        lr: Learning rate of both.
        weight_decay: Decoupled weight decay of both.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's ``eps``.
    """

    def __init__(
        self,
        dense: list[torch.Tensor],
        sparse: list[torch.Tensor],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.dense_params, self.sparse_params = dense, sparse
        self.dense = (
            torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
            if dense
            else None
        )
        self.step_count = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        #: Per sparse table: ``exp_avg``, ``exp_avg_sq`` (like the table) and ``last`` (int64 per row).
        self.state: list[dict[str, torch.Tensor]] = [
            {
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
                "last": torch.zeros(p.shape[0], dtype=torch.int64, device=p.device),
            }
            for p in sparse
        ]

    def hook(self, model: nn.Module) -> None:
        """Bring the rows a forward pass looks up up to date first (a pre-hook per table).

        A row's weight in a step's forward pass must already include the steps it missed, as
        with dense AdamW; the hook catches up exactly the rows the lookup asks for. Undo with
        :meth:`unhook`.
        """
        ids = {id(p): i for i, p in enumerate(self.sparse_params)}
        for m in model.modules():
            if isinstance(m, nn.Embedding) and id(m.weight) in ids:
                k = ids[id(m.weight)]
                self._hooks.append(
                    m.register_forward_pre_hook(lambda _m, args, k=k: self._before_lookup(k, args[0]))
                )

    def unhook(self) -> None:
        """Remove the hooks :meth:`hook` added."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def _before_lookup(self, k: int, idx: torch.Tensor) -> None:
        p, st = self.sparse_params[k], self.state[k]
        rows = torch.unique(idx.reshape(-1))
        rows = rows[st["last"].index_select(0, rows) < self.step_count]
        if rows.numel():
            self._write(p, st, rows, *self._caught_up(p, st, rows, self.step_count), self.step_count)

    @staticmethod
    def _write(
        p: torch.Tensor,
        st: dict[str, torch.Tensor],
        rows: torch.Tensor,
        w: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        step: int,
    ) -> None:
        p.index_copy_(0, rows, w)
        st["exp_avg"].index_copy_(0, rows, m)
        st["exp_avg_sq"].index_copy_(0, rows, v)
        st["last"][rows] = step

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none``)."""
        for p in (*self.dense_params, *self.sparse_params):
            p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so that their global L2 norm is at most ``max_norm``.

        Same result as :func:`torch.nn.utils.clip_grad_norm_`, which rejects sparse gradients.

        Returns:
            The global norm before clipping.
        """
        if not self.sparse_params:
            return torch.nn.utils.clip_grad_norm_(self.dense_params, max_norm)
        grads = []
        for p in self.sparse_params:
            if p.grad is not None:
                p.grad = p.grad.coalesce()
                grads.append(p.grad.values())
        grads += [p.grad for p in self.dense_params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in (*self.sparse_params, *self.dense_params):
            if p.grad is not None:
                p.grad.mul_(scale)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step: dense parameters, and the rows of each table its gradient names."""
        if self.dense is not None:
            self.dense.step()
        if not self.sparse_params:
            return
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        for p, st in zip(self.sparse_params, self.state, strict=True):
            if p.grad is None:
                continue
            if not p.grad.is_sparse:
                raise TypeError("a parameter on the sparse path got a dense gradient")
            g = p.grad.coalesce()
            rows, gv = g.indices()[0], g.values()
            w, m, v = self._caught_up(p, st, rows, t - 1)  # a no-op where the hook ran
            m.mul_(b1).add_(gv, alpha=1 - b1)
            v.mul_(b2).addcmul_(gv, gv, value=1 - b2)
            w.mul_(1 - self.lr * self.weight_decay)
            denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
            w.addcdiv_(m, denom, value=-self.lr / (1 - b1**t))
            self._write(p, st, rows, w, m, v, t)

    @torch.no_grad()
    def flush(self, chunk: int = 65536) -> None:
        """Bring every row of every table up to date (as if dense AdamW had run every step)."""
        for p, st in zip(self.sparse_params, self.state, strict=True):
            behind = torch.nonzero(st["last"] < self.step_count).ravel()
            for start in range(0, behind.numel(), chunk):
                rows = behind[start : start + chunk]
                self._write(p, st, rows, *self._caught_up(p, st, rows, self.step_count), self.step_count)

    def _caught_up(
        self, p: torch.Tensor, st: dict[str, torch.Tensor], rows: torch.Tensor, upto: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights and moments of ``rows`` after the zero-gradient AdamW steps up to ``upto``."""
        b1, b2 = self.betas
        w, m, v = (
            p.index_select(0, rows),
            st["exp_avg"].index_select(0, rows),
            st["exp_avg_sq"].index_select(0, rows),
        )
        last = st["last"].index_select(0, rows)
        missed = (upto - last).clamp_min(0)  # (R,)
        if not bool((missed > 0).any()):
            return w, m, v
        dtype = torch.float64
        j = torch.arange(1, CATCH_UP_STEPS + 1, device=p.device, dtype=dtype)  # (J,)
        tau = last.to(dtype).unsqueeze(1) + j  # (R, J): the missed steps' numbers
        live = j.unsqueeze(0) <= missed.to(dtype).unsqueeze(1)
        keep = 1.0 - self.lr * self.weight_decay
        # Step tau moves the row by lr / bc1(tau) * b1^j m / (sqrt(b2^j v / bc2(tau)) + eps)
        #   = lr * [b1^j / b2^(j/2) * sqrt(bc2(tau)) / bc1(tau)] * m / (sqrt(v) + eps_j),
        # eps_j = eps * sqrt(bc2(tau)) / b2^(j/2); eps_j is taken at the first missed step (one
        # per row; the moves shrink by b1 per step), so the bracket sums to a scalar per row.
        coef = (b1**j / b2 ** (j / 2)) * torch.sqrt(1 - b2**tau) / (1 - b1**tau)
        coef = coef * keep ** (missed.to(dtype).unsqueeze(1) - j)  # later decay of each move
        total = torch.where(live, coef, torch.zeros((), dtype=dtype, device=p.device)).sum(dim=1)
        k = missed.to(w.dtype).unsqueeze(1)
        eps = (self.eps * torch.sqrt(1 - b2 ** tau[:, :1]) / math.sqrt(b2)).to(w.dtype)
        w = w * keep**k - self.lr * total.to(w.dtype).unsqueeze(1) * m / (v.sqrt() + eps)
        return w, m * b1**k, v * b2**k


@contextmanager
def sparse_embedding_grads(model: nn.Module, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Switch the model's ``nn.Embedding`` tables to sparse gradients for the duration.

    The flag only changes how ``backward`` writes the table's gradient (the forward pass, the
    weights and the ``state_dict`` are unchanged, so saved models load either way); it is
    restored on exit, so a later caller with its own optimiser still gets dense gradients.

    Args:
        model: The model (a DDP-wrapped model is left dense: DDP fixed its gradient layout when
            it was built, and NCCL has no sparse all-reduce).
        enabled: ``False`` yields an empty list and changes nothing.

    Yields:
        The embedding weights that now get sparse gradients.
    """
    if not enabled or isinstance(model, DistributedDataParallel):
        if enabled:
            logger.info("sparse embedding gradients are off under DistributedDataParallel")
        yield []
        return
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    before = [m.sparse for m in tables]
    for m in tables:
        m.sparse = True
    try:
        yield [m.weight for m in tables]
    finally:
        for m, flag in zip(tables, before, strict=True):
            m.sparse = flag
