"""Batched DCN-V2 scoring for the serving hot path (numpy in, numpy out)."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from streamrec.errors import ModelError
from streamrec.models.dcn import DCNv2


class RankerScorer:
    """A DCN-V2 in eval mode on one device, scoring candidate batches from numpy arrays.

    On CPU the inputs are wrapped without copying (``torch.from_numpy``) when they are already
    C-contiguous float32 / int64, and the output tensor is returned as a numpy view: the only
    allocations per call are the model's own activations. On CUDA the inputs are staged through
    pinned host buffers into device buffers that are reused across calls (grown on demand), and
    a lock serialises calls; the result is copied out. The CPU path is thread-safe.

    Args:
        model: The ranker. It is switched to eval mode, moved to ``device`` and frozen.
        device: Where to score.
        num_threads: When given, calls ``torch.set_num_threads`` (process-wide). One thread
            per replica usually wins under concurrency on small CPUs.
        capacity: Initial row capacity of the CUDA buffers.
    """

    def __init__(
        self,
        model: DCNv2,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        capacity: int = 1024,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.n_dense = model.n_dense
        self.n_fields = model.n_fields
        self._cuda = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._capacity = 0
        if self._cuda:
            self._grow(capacity)

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu", num_threads: int | None = None
    ) -> RankerScorer:
        """Load a ranker saved with :func:`streamrec.models.io.save_model` and wrap it.

        Raises:
            CorruptCheckpointError: the saved files are missing or corrupt.
            ModelError: the directory holds another kind of model.
        """
        from streamrec.models.io import load_model

        return cls(load_model(path, device, expected=DCNv2), device, num_threads=num_threads)

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * self._capacity)
        self._dense_host = torch.empty((cap, self.n_dense), dtype=torch.float32).pin_memory()
        self._sparse_host = torch.empty((cap, self.n_fields), dtype=torch.int64).pin_memory()
        self._out_host = torch.empty((cap,), dtype=torch.float32).pin_memory()
        self._dense_dev = torch.empty((cap, self.n_dense), dtype=torch.float32, device=self.device)
        self._sparse_dev = torch.empty((cap, self.n_fields), dtype=torch.int64, device=self.device)
        self._capacity = cap

    def _check(self, dense: np.ndarray, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if dense.ndim != 2 or dense.shape[1] != self.n_dense:
            raise ModelError(f"dense features must have shape (n, {self.n_dense}), got {dense.shape}")
        if sparse.ndim != 2 or sparse.shape != (dense.shape[0], self.n_fields):
            raise ModelError(
                f"sparse features must have shape ({dense.shape[0]}, {self.n_fields}), got {sparse.shape}"
            )
        if dense.dtype != np.float32 or not dense.flags.c_contiguous or not dense.flags.writeable:
            dense = np.array(dense, dtype=np.float32, order="C")
        if sparse.dtype != np.int64 or not sparse.flags.c_contiguous or not sparse.flags.writeable:
            sparse = np.array(sparse, dtype=np.int64, order="C")
        return dense, sparse

    def score(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """Click probabilities of ``n`` candidates.

        Args:
            dense: ``(n, n_dense)`` features, ideally C-contiguous float32 (otherwise converted).
            sparse: ``(n, n_fields)`` field values, ideally C-contiguous int64.

        Returns:
            ``(n,)`` float32 probabilities (a fresh array owned by the caller).

        Raises:
            ModelError: the arrays have the wrong shape.
        """
        dense, sparse = self._check(dense, sparse)
        n = dense.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.float32)
        if not self._cuda:
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(dense), torch.from_numpy(sparse))
                return torch.sigmoid_(logits).numpy()
        with self._lock, torch.inference_mode():
            if n > self._capacity:
                self._grow(n)
            self._dense_host[:n].numpy()[...] = dense
            self._sparse_host[:n].numpy()[...] = sparse
            d = self._dense_dev[:n]
            s = self._sparse_dev[:n]
            d.copy_(self._dense_host[:n], non_blocking=True)
            s.copy_(self._sparse_host[:n], non_blocking=True)
            probs = torch.sigmoid_(self.model(d, s))
            out = self._out_host[:n]
            out.copy_(probs, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return out.numpy().copy()
