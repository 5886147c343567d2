"""FAISS vector index over item embeddings, chosen by corpus size, and the ANN source.

Index choice (:func:`build_index`, ``kind="auto"``), from measurements on the shared 2-core
development machine (``bench/bench_retrieval.py`` -> ``bench/results/retrieval.json``; queries
single-threaded, k=10, recall against exact search):

* **Fewer than ``exact_threshold`` (20,000) items: exact ``IndexFlat``.** Brute force over 30k
  x 32-d vectors takes ~0.2 ms per query; approximate search would buy nothing and cost recall.
* **From 20,000 items: IVF-Flat** (``nlist = 4 sqrt(n)``). On 200k *learned-like* vectors (ALS
  factors resampled with noise, d=32) IVF reached recall 0.96 at ``nprobe=8`` (0.04 ms) and 0.99
  at ``nprobe=32`` (0.14 ms), where HNSW (M=32, efConstruction=80) reached only 0.83 at
  ``efSearch=128`` (0.26 ms) and took twice as long to build - and daily retraining rebuilds the
  index on 2 cores. Exact search over the same 200k took 0.87 ms. For inner product the vectors
  go through the MIPS-to-L2 reduction of Bachrach et al. (2014): items get an extra coordinate
  ``sqrt(M^2 - |x|^2)`` and queries a 0, so L2 k-means and L2 probing work on norm-varying
  embeddings (plain inner-product IVF reached 0.71 at ``nprobe=16`` on 100k such vectors, the
  reduced index 0.98).
* ``kind="hnsw"`` stays available for isotropic data without cluster structure, where IVF is
  useless: on 200k random Gaussian d=64 vectors IVF needed ``nprobe=1024`` of 1788 for 0.99
  (4.7 ms, slower than exact search at 2.7 ms) while HNSW gave 0.93 at ``efSearch=256`` (0.9 ms).
  Learned embeddings are not like that, but if a model's are, choose ``hnsw`` or ``flat``.

Unless ``nprobe`` / ``ef_search`` is given, it is *calibrated* after the build: the smallest power
of two whose recall@k against exact search on sample queries reaches ``target_recall`` (pass real
user vectors as ``calibration_queries`` when available). That makes recall a checked property of
the index whatever the data looks like; the price of hard data shows up as latency instead.

An index is saved as a directory with ``index.faiss`` (``faiss.write_index``) and ``index.json``
(kind, metric, norm constant, search parameters), plus ``ids.npy`` when it indexes a subset of
the items; :func:`load_index` raises
:class:`~streamrec.errors.CorruptCheckpointError` when either is missing or unreadable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from streamrec.config import StrictModel
from streamrec.errors import CorruptCheckpointError, ModelError
from streamrec.retrieval.base import (
    Candidates,
    FloatArray,
    IntArray,
    RetrievalSource,
    UserContext,
    empty_candidates,
)

Metric = Literal["ip", "l2"]
IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
IDS_FILE = "ids.npy"  # only for an index over a subset of the items


class IndexConfig(StrictModel):
    """How :func:`build_index` builds and tunes an index.

    Attributes:
        kind: ``auto`` (exact below ``exact_threshold`` items, IVF above), or a fixed kind.
        exact_threshold: Corpus size from which ``auto`` uses approximate search.
        nlist: IVF cells; default ``4 * sqrt(n)`` capped so each cell has >= 39 training points.
        nprobe: IVF cells visited per query; ``None`` = calibrate to ``target_recall``.
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width; ``None`` = calibrate to ``target_recall``.
        target_recall: Recall@``calibration_k`` against exact search that calibration aims for.
        calibration_k: The k of the calibration recall.
        calibration_queries: Queries sampled (from the item vectors unless given) for calibration.
        seed: Seed for k-means and query sampling.
    """

    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_threshold: int = 20_000
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 100
    ef_search: int | None = None
    target_recall: float = 0.95
    calibration_k: int = 10
    calibration_queries: int = 200
    seed: int = 0


def _f32(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a.reshape(1, -1) if a.ndim == 1 else a


@dataclass
class VectorIndex:
    """A FAISS index plus what is needed to query it with the original vectors' semantics.

    Attributes:
        index: The FAISS index. For ``kind="ivf"`` with ``metric="ip"`` it holds the
            norm-augmented vectors; query it through :meth:`search`, not directly.
        kind: ``flat``, ``ivf`` or ``hnsw``.
        metric: ``ip`` (higher score = better) or ``l2`` (scores are negated squared distances).
        dim: Dimension of the original vectors.
        max_norm: Norm constant ``M`` of the MIPS-to-L2 reduction (0 when not used).
        ids: Item index of each indexed row when the index holds a subset of the items
            (e.g. only the items a CF model has factors for); ``None`` = row ``i`` is item ``i``.
    """

    index: Any
    kind: IndexKind
    metric: Metric
    dim: int
    max_norm: float = 0.0
    ids: IntArray | None = None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def reduced(self) -> bool:
        """Whether queries go through the MIPS-to-L2 reduction."""
        return self.max_norm > 0.0

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[IntArray, FloatArray]:
        """Top-``k`` items per query.

        Args:
            queries: ``(n, dim)`` or ``(dim,)`` query vectors.
            k: Neighbours per query.

        Returns:
            ``(ids, scores)``, each ``(n, k)``; ids are item indices (``-1`` = fewer than ``k``
            found), scores are inner products (``ip``) or negated squared L2 distances (``l2``).
        """
        q = _f32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, index has {self.dim}")
        k = max(1, min(k, len(self)))
        if self.reduced:
            qa = np.hstack([q, np.zeros((q.shape[0], 1), np.float32)])
            dist, ids = self.index.search(qa, k)
            # |q' - x'|^2 = |q|^2 + M^2 - 2 q.x  =>  q.x = (|q|^2 + M^2 - dist) / 2
            scores = 0.5 * ((q * q).sum(axis=1, keepdims=True) + self.max_norm**2 - dist)
        else:
            dist, ids = self.index.search(q, k)
            scores = dist if self.metric == "ip" else -dist
        scores = np.where(ids >= 0, scores, -np.inf)
        ids = ids.astype(np.int64)
        if self.ids is not None:
            ids = np.where(ids >= 0, self.ids[np.maximum(ids, 0)], -1)
        return ids, scores.astype(np.float32)

    def with_added(self, vectors: npt.ArrayLike, ids: npt.ArrayLike) -> VectorIndex:
        """A copy of the index with ``vectors`` added as items ``ids`` (this index is unchanged).

        Copy-on-write, so searches running on this index in other threads are never torn. An
        IVF index assigns the new vectors to its trained lists; an inner-product IVF index adds
        them through the same norm augmentation, so a vector longer than the build's largest
        scores a little under its true inner product (it is still found).

        Args:
            vectors: ``(n, dim)`` item vectors.
            ids: Item index of each vector.

        Raises:
            ModelError: the vectors have the wrong width or are not finite.
        """
        x = _f32(vectors)
        new_ids = np.asarray(ids, dtype=np.int64).ravel()
        if x.shape[1] != self.dim or x.shape[0] != new_ids.size:
            raise ModelError(f"expected ({new_ids.size}, {self.dim}) vectors to add, got {x.shape}")
        if not np.isfinite(x).all():
            raise ModelError("item vectors to add contain NaN or infinite values")
        n = len(self)
        index = faiss.clone_index(self.index)
        if self.reduced:
            norms2 = (x.astype(np.float64) ** 2).sum(axis=1)
            extra = np.sqrt(np.maximum(self.max_norm**2 - norms2, 0.0)).astype(np.float32)
            x = np.hstack([x, extra[:, None]])
        index.add(np.ascontiguousarray(x))
        row_ids = self.ids
        if row_ids is None and not np.array_equal(new_ids, np.arange(n, n + new_ids.size)):
            row_ids = np.arange(n, dtype=np.int64)  # rows stop being the item indices
        if row_ids is not None:
            row_ids = np.concatenate([row_ids, new_ids])
        out = VectorIndex(index, self.kind, self.metric, self.dim, self.max_norm, row_ids)
        params = self.search_params
        out.set_search_params(nprobe=params.get("nprobe"), ef_search=params.get("ef_search"))
        return out

    @property
    def search_params(self) -> dict[str, int]:
        """Current query-time parameters (``nprobe`` or ``ef_search``; empty for flat)."""
        if self.kind == "ivf":
            return {"nprobe": int(faiss.extract_index_ivf(self.index).nprobe)}
        if self.kind == "hnsw":
            return {"ef_search": int(self.index.hnsw.efSearch)}
        return {}

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the query-time accuracy/latency knob of the index kind (others are ignored)."""
        if self.kind == "ivf" and nprobe is not None:
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = int(min(max(nprobe, 1), ivf.nlist))
        if self.kind == "hnsw" and ef_search is not None:
            self.index.hnsw.efSearch = int(max(ef_search, 1))


def choose_kind(n_items: int, config: IndexConfig) -> IndexKind:
    """The index kind :func:`build_index` uses for ``n_items`` vectors under ``config``."""
    if config.kind != "auto":
        return config.kind
    return "flat" if n_items < config.exact_threshold else "ivf"


def _faiss_metric(metric: Metric) -> int:
    return int(faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)


def build_index(
    item_vectors: npt.ArrayLike,
    metric: Metric = "ip",
    config: IndexConfig | None = None,
    calibration_queries: npt.ArrayLike | None = None,
    ids: npt.ArrayLike | None = None,
) -> VectorIndex:
    """Build an index over item vectors (row ``i`` = item index ``i``), kind chosen by size.

    Uses FAISS's global thread count for the build (set it with ``faiss.omp_set_num_threads``).

    Args:
        item_vectors: ``(n_items, dim)`` float vectors.
        metric: ``ip`` (inner product, for dot-product models) or ``l2``.
        config: Build settings (see :class:`IndexConfig` and the module docstring).
        calibration_queries: Queries to calibrate ``nprobe``/``ef_search`` on (best: real user
            vectors); default is a sample of the item vectors.
        ids: Item index of each row of ``item_vectors`` when they are a subset of the items
            (searches then return these ids); default: row ``i`` is item ``i``.

    Returns:
        The :class:`VectorIndex`.

    Raises:
        ModelError: the vectors are empty, not 2-D, or not finite; or ``metric`` is unknown.
    """
    cfg = config or IndexConfig()
    x = _f32(item_vectors)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ModelError(f"item vectors must be a non-empty (n_items, dim) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ModelError("item vectors contain NaN or infinite values; retrain or repair the embeddings")
    if metric not in ("ip", "l2"):
        raise ModelError(f"unknown metric {metric!r}; use 'ip' or 'l2'")
    n, d = x.shape
    row_ids = None if ids is None else np.asarray(ids, dtype=np.int64).ravel()
    if row_ids is not None and row_ids.shape[0] != n:
        raise ModelError(f"ids has {row_ids.shape[0]} entries for {n} item vectors; pass one id per row")
    kind = choose_kind(n, cfg)
    if kind == "flat":
        flat = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        flat.add(x)
        return VectorIndex(flat, "flat", metric, d, ids=row_ids)
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, _faiss_metric(metric))
        hnsw.hnsw.efConstruction = cfg.ef_construction
        hnsw.add(x)
        vi = VectorIndex(hnsw, "hnsw", metric, d)
    else:
        vi = _build_ivf(x, metric, cfg)
    knob = cfg.nprobe if kind == "ivf" else cfg.ef_search
    if knob is not None:
        vi.set_search_params(nprobe=knob, ef_search=knob)
    else:
        q = _calibration_queries(x, calibration_queries, cfg)
        calibrate(vi, x, q, cfg.calibration_k, cfg.target_recall)  # on rows, before the id map
    vi.ids = row_ids
    return vi


def _build_ivf(x: npt.NDArray[np.float32], metric: Metric, cfg: IndexConfig) -> VectorIndex:
    n, d = x.shape
    nlist = cfg.nlist or int(4 * math.sqrt(n))
    nlist = int(max(1, min(nlist, n // 39 if n >= 39 else 1)))
    max_norm = 0.0
    data = x
    if metric == "ip":
        norms2 = (x.astype(np.float64) ** 2).sum(axis=1)
        max_norm = float(math.sqrt(norms2.max())) or 1.0
        extra = np.sqrt(np.maximum(max_norm**2 - norms2, 0.0)).astype(np.float32)
        data = np.hstack([x, extra[:, None]])
    quantizer = faiss.IndexFlatL2(data.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, data.shape[1], nlist, faiss.METRIC_L2)
    ivf.cp.seed = cfg.seed
    ivf.train(data)
    ivf.add(data)
    return VectorIndex(ivf, "ivf", metric, d, max_norm)


def _calibration_queries(
    x: npt.NDArray[np.float32], queries: npt.ArrayLike | None, cfg: IndexConfig
) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(cfg.seed)
    q = x if queries is None else _f32(queries)
    if q.shape[0] > cfg.calibration_queries:
        q = q[rng.choice(q.shape[0], cfg.calibration_queries, replace=False)]
    return q


def calibrate(
    index: VectorIndex, item_vectors: npt.ArrayLike, queries: npt.ArrayLike, k: int, target_recall: float
) -> float:
    """Set the smallest ``nprobe``/``ef_search`` (powers of two) that reaches ``target_recall``.

    Args:
        index: An IVF or HNSW index (flat indexes are exact; nothing to do).
        item_vectors: The indexed vectors, for the exact reference.
        queries: Sample queries.
        k: Recall cut-off.
        target_recall: Recall@k to reach; the largest setting is kept if none reaches it.

    Returns:
        The recall@k reached with the chosen setting.
    """
    if index.kind == "flat":
        return 1.0
    exact = exact_search(item_vectors, queries, k, index.metric)
    if index.kind == "ivf":
        nlist = int(faiss.extract_index_ivf(index.index).nlist)
        values = [v for v in (2**i for i in range(0, 20)) if v < nlist] + [nlist]
    else:
        values = [2**i for i in range(4, 12)]
    recall = 0.0
    for v in values:
        index.set_search_params(nprobe=v, ef_search=v)
        recall = _recall(index.search(queries, k)[0], exact)
        if recall >= target_recall:
            break
    return recall


def exact_search(
    item_vectors: npt.ArrayLike, queries: npt.ArrayLike, k: int, metric: Metric = "ip"
) -> IntArray:
    """Exact top-``k`` item indices per query (brute force), the reference for recall."""
    x = _f32(item_vectors)
    flat = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    _, ids = flat.search(_f32(queries), min(k, x.shape[0]))
    return ids.astype(np.int64)


def _recall(ann: IntArray, exact: IntArray) -> float:
    """Mean share of each row's exact neighbours found in the same row of ``ann``."""
    k = exact.shape[1]
    stride = int(max(ann.max(initial=0), exact.max(initial=0))) + 2
    offset = np.arange(exact.shape[0], dtype=np.int64)[:, None] * stride
    found = np.isin(exact + offset, ann[:, :k] + offset) & (exact >= 0)
    denom = np.maximum((exact >= 0).sum(axis=1), 1)
    return float(np.mean(found.sum(axis=1) / denom))


def measure_recall(index: VectorIndex, item_vectors: npt.ArrayLike, queries: npt.ArrayLike, k: int) -> float:
    """Recall@k of the index against exact search over the same vectors.

    Args:
        index: The index to assess (its current search parameters are used).
        item_vectors: The vectors it indexes, row ``i`` = item ``i``.
        queries: ``(n, dim)`` query vectors.
        k: Cut-off.

    Returns:
        Mean over queries of ``|ANN top-k ∩ exact top-k| / k``.
    """
    exact = exact_search(item_vectors, queries, k, index.metric)
    return _recall(index.search(queries, k)[0], exact)


def save_index(index: VectorIndex, path: str | os.PathLike[str]) -> Path:
    """Write an index as a directory (``index.faiss`` + ``index.json``), atomically.

    An existing directory at ``path`` is replaced only after the new one is fully written.

    Args:
        index: The index.
        path: Target directory.

    Returns:
        The directory written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        faiss.write_index(index.index, str(tmp / INDEX_FILE))
        if index.ids is not None:
            np.save(tmp / IDS_FILE, index.ids)
        meta = {
            "kind": index.kind,
            "metric": index.metric,
            "dim": index.dim,
            "max_norm": index.max_norm,
            "ntotal": len(index),
            "search_params": index.search_params,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_index(path: str | os.PathLike[str]) -> VectorIndex:
    """Read an index written by :func:`save_index`.

    Raises:
        CorruptCheckpointError: the directory or a file is missing, unreadable, or inconsistent.
    """
    p = Path(path)
    try:
        meta = json.loads((p / META_FILE).read_text())
        raw = faiss.read_index(str(p / INDEX_FILE))
        vi = VectorIndex(raw, meta["kind"], meta["metric"], int(meta["dim"]), float(meta["max_norm"]))
        if (p / IDS_FILE).exists():
            vi.ids = np.asarray(np.load(p / IDS_FILE), dtype=np.int64)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(
            f"cannot load the FAISS index at {p}: {err}; rebuild it from the item embeddings"
        ) from None
    if (
        vi.kind not in ("flat", "ivf", "hnsw")
        or vi.metric not in ("ip", "l2")
        or len(vi) != meta.get("ntotal")
        or (vi.ids is not None and vi.ids.shape != (len(vi),))
    ):
        raise CorruptCheckpointError(f"index metadata at {p} does not match the index file; rebuild it")
    return vi


QueryProvider = Callable[[UserContext], "npt.NDArray[np.float32] | None"]


class AnnSource(RetrievalSource):
    """Retrieval by nearest neighbours of a user's query vector in an item index.

    Args:
        index: Item index (item index ``i`` = row ``i`` of the indexed vectors).
        queries: Either a ``(n_users, dim)`` matrix of user vectors (row = user index) or a
            callable returning the query vector for a context (``None`` if it has none).
            ``UserContext.query_vector`` always takes precedence.
        name: Source name for provenance.
        seen: Items to exclude per known user (see :class:`RetrievalSource`).
    """

    def __init__(
        self,
        index: VectorIndex,
        queries: npt.ArrayLike | QueryProvider,
        name: str = "ann",
        seen: sp.spmatrix | sp.sparray | None = None,
    ) -> None:
        super().__init__(name, seen)
        self.index = index
        self._provider: QueryProvider | None = queries if callable(queries) else None
        self._matrix = None if callable(queries) else _f32(queries)

    def query_vector(self, ctx: UserContext) -> npt.NDArray[np.float32] | None:
        """The query vector for a context, or ``None`` when there is none (unknown user)."""
        if ctx.query_vector is not None:
            return _f32(ctx.query_vector)[0]
        if self._provider is not None:
            v = self._provider(ctx)
            return None if v is None else _f32(v)[0]
        if self._matrix is not None and 0 <= ctx.user_index < self._matrix.shape[0]:
            return self._matrix[ctx.user_index]
        return None

    def _retrieve(self, ctx: UserContext, n: int) -> Candidates:
        q = self.query_vector(ctx)
        if q is None or not np.isfinite(q).all():
            return empty_candidates()
        ids, scores = self.index.search(q, n)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]
