"""In-memory item features for the serving hot path.

Feast's Python online path costs milliseconds per hundred entities, too slow for ~500
candidates per request. The ranker and re-ranker therefore read item features from an
:class:`ItemFeatureTable`: contiguous numpy arrays indexed by a dense item index, loaded from the
item feature views' offline files exactly as the online store holds them (newest row per item
up to each view's materialization end, plus streaming / training rows), with the defaults of
:func:`~streamrec.features.defaults.apply_defaults`. A test asserts it equals what Feast serves.

Lookups are vectorised and O(1) per id: ``table.index_of(ids)`` maps ids to rows through a
dense lookup array (or a hash map when ids are sparse); then ``table.dense[rows]`` etc.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from streamrec.features.spec import RATE_PRIOR_STRENGTH
from streamrec.features.transforms import trending_update

#: Item features stored in the float32 ``dense`` matrix, in this column order.
DENSE_FEATURES: tuple[str, ...] = (
    "item_events_7d",
    "item_positives_7d",
    "item_ctr_7d",
    "item_users_7d",
    "item_positives_30d",
    "popularity",
    "popularity_pct",
    "trending_score",
)
_LUT_MAX = 50_000_000  # dense id -> row array up to this id (int32: 200 MB worst case)


@dataclass
class ItemFeatureTable:
    """Item features as arrays indexed by a dense item index ``0..n-1``.

    Attributes:
        item_ids: int64 ``(n,)``, sorted ascending; row ``i`` describes ``item_ids[i]``.
        dense: float32 ``(n, len(dense_names))``, C-contiguous.
        dense_names: Names of the ``dense`` columns (:data:`DENSE_FEATURES`).
        category_id: int32 ``(n,)``, index of ``primary_category`` in ``category_vocab`` (-1 unknown).
        categories_indptr / categories_indices: CSR of all categories of each item
            (``categories_indices[indptr[i]:indptr[i+1]]`` are vocab indices).
        creator_id: int32 ``(n,)``, index into ``creator_vocab`` (-1 unknown).
        published_at: int64 ``(n,)``, Unix seconds (0 unknown).
        promoted / flagged: bool ``(n,)``.
        trending_updated_at: int64 ``(n,)``, Unix seconds at which ``trending_score`` is valid.
        embedding: float32 ``(n, d)`` two-tower item embeddings (``d == 0`` before training).
        embedding_version: Model version per row ('none' before training).
        category_vocab: Category names; shared with the users' ``category_prefs`` vectors.
        creator_vocab: Creator names.
        materialized_until: ``view -> materialization end`` the table reflects.
        loaded_at: Unix time the table was built.
        load_seconds: How long the load took.
    """

    item_ids: np.ndarray
    dense: np.ndarray
    dense_names: tuple[str, ...]
    category_id: np.ndarray
    categories_indptr: np.ndarray
    categories_indices: np.ndarray
    creator_id: np.ndarray
    published_at: np.ndarray
    promoted: np.ndarray
    flagged: np.ndarray
    trending_updated_at: np.ndarray
    embedding: np.ndarray
    embedding_version: np.ndarray
    category_vocab: list[str]
    creator_vocab: list[str]
    materialized_until: dict[str, str | None] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    _lut: np.ndarray | None = field(default=None, repr=False)
    _map: dict[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if n and int(self.item_ids.min()) >= 0 and int(self.item_ids.max()) < _LUT_MAX:
            lut = np.full(int(self.item_ids.max()) + 1, -1, dtype=np.int32)
            lut[self.item_ids] = np.arange(n, dtype=np.int32)
            self._lut = lut
        else:
            self._map = {int(k): i for i, k in enumerate(self.item_ids.tolist())}
        self._col = {name: i for i, name in enumerate(self.dense_names)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Rows of ``ids`` (int64 array); -1 for ids not in the table. O(1) per id, vectorised."""
        arr = np.asarray(ids, dtype=np.int64)
        if self._lut is not None:
            out = np.full(arr.shape, -1, dtype=np.int64)
            ok = (arr >= 0) & (arr < len(self._lut))
            out[ok] = self._lut[arr[ok]]
            return out
        m = self._map or {}
        return np.fromiter((m.get(int(i), -1) for i in arr.ravel()), dtype=np.int64, count=arr.size).reshape(
            arr.shape
        )

    def index(self, item_id: int) -> int:
        """Row of one item id, -1 when unknown."""
        return int(self.index_of(np.asarray([item_id]))[0])

    def column(self, name: str) -> np.ndarray:
        """A dense feature column by name (a view into ``dense``)."""
        return self.dense[:, self._col[name]]

    def row(self, item_id: int) -> dict[str, Any] | None:
        """All features of one item in the shape the online store returns them (None if unknown).

        For tests and debugging: compare with Feast's ``get_online_features`` after
        :func:`~streamrec.features.defaults.apply_defaults`.
        """
        i = self.index(item_id)
        if i < 0:
            return None
        out: dict[str, Any] = {name: float(self.dense[i, j]) for j, name in enumerate(self.dense_names)}
        for name in ("item_events_7d", "item_positives_7d", "item_users_7d", "item_positives_30d"):
            out[name] = int(round(out[name]))
        cats = self.categories_indices[self.categories_indptr[i] : self.categories_indptr[i + 1]]
        out["categories"] = [self.category_vocab[c] for c in cats]
        cid = int(self.category_id[i])
        out["primary_category"] = self.category_vocab[cid] if cid >= 0 else "unknown"
        kid = int(self.creator_id[i])
        out["creator"] = self.creator_vocab[kid] if kid >= 0 else "unknown"
        out["published_at"] = int(self.published_at[i])
        out["promoted"] = bool(self.promoted[i])
        out["flagged"] = bool(self.flagged[i])
        out["trending_updated_at"] = int(self.trending_updated_at[i])
        out["item_embedding"] = (
            self.embedding[i].copy() if self.embedding.shape[1] else np.zeros(0, np.float32)
        )
        out["item_embedding_version"] = str(self.embedding_version[i])
        return out

    def category_lists(self) -> list[list[int]]:
        """Per row, its category indices (into ``category_vocab``) as a plain list."""
        ind, ptr = self.categories_indices, self.categories_indptr
        return [ind[ptr[i] : ptr[i + 1]].tolist() for i in range(len(self.item_ids))]

    def category_matrix(self) -> Any:
        """Binary ``(n_items, len(category_vocab))`` scipy CSR matrix of the items' categories."""
        import scipy.sparse as sp

        data = np.ones(len(self.categories_indices), dtype=np.float32)
        return sp.csr_matrix(
            (data, self.categories_indices, self.categories_indptr),
            shape=(len(self.item_ids), len(self.category_vocab)),
        )

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (bytes)."""
        arrays = (
            self.item_ids, self.dense, self.category_id, self.categories_indptr, self.categories_indices,
            self.creator_id, self.published_at, self.promoted, self.flagged, self.trending_updated_at,
            self.embedding,
        )  # fmt: skip
        return int(sum(a.nbytes for a in arrays)) + (self._lut.nbytes if self._lut is not None else 0)

    def with_items(
        self,
        item_ids: Sequence[int],
        categories: Sequence[Sequence[str]],
        published_at: Sequence[int],
        dense_defaults: Mapping[str, float],
    ) -> ItemFeatureTable:
        """A copy with new items appended as rows ``len(self) ..`` in the order given.

        The rows of the items already held keep their index (what makes a swap safe for requests
        in flight), so ``item_ids`` stop being sorted once items are appended. Category names the
        table's vocabulary does not hold are left out of the rows (the models know only the
        vocabulary they were trained with); creators are unknown (-1).

        Args:
            item_ids: New item ids (none of them in the table).
            categories: Category names of each new item.
            published_at: Publication time of each, Unix seconds (0 unknown).
            dense_defaults: Value of each :data:`DENSE_FEATURES` column for a new item.

        Raises:
            ValueError: an id is already in the table, or the arguments differ in length.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        if not (len(ids) == len(categories) == len(published_at)):
            raise ValueError("item_ids, categories and published_at must have one entry per new item")
        if bool((self.index_of(ids) >= 0).any()) or len(np.unique(ids)) != len(ids):
            raise ValueError("with_items appends new items only; an id is already in the table or repeated")
        k = len(ids)
        index = {c: i for i, c in enumerate(self.category_vocab)}
        codes = [[index[c] for c in dict.fromkeys(map(str, cs)) if c in index] for cs in categories]
        lengths = np.fromiter((len(c) for c in codes), dtype=np.int64, count=k)
        indptr = np.concatenate([self.categories_indptr, self.categories_indptr[-1] + np.cumsum(lengths)])
        indices = np.concatenate(
            [
                self.categories_indices,
                np.fromiter((c for cs in codes for c in cs), np.int32, int(lengths.sum())),
            ]
        )
        row = np.asarray([dense_defaults.get(name, 0.0) for name in self.dense_names], dtype=np.float32)
        return ItemFeatureTable(
            item_ids=np.concatenate([self.item_ids, ids]),
            dense=np.ascontiguousarray(np.vstack([self.dense, np.tile(row, (k, 1))]), dtype=np.float32),
            dense_names=self.dense_names,
            category_id=np.concatenate(
                [self.category_id, np.asarray([c[0] if c else -1 for c in codes], np.int32)]
            ),
            categories_indptr=indptr.astype(np.int64),
            categories_indices=indices.astype(np.int32),
            creator_id=np.concatenate([self.creator_id, np.full(k, -1, np.int32)]),
            published_at=np.concatenate([self.published_at, np.asarray(published_at, np.int64)]),
            promoted=np.concatenate([self.promoted, np.zeros(k, bool)]),
            flagged=np.concatenate([self.flagged, np.zeros(k, bool)]),
            trending_updated_at=np.concatenate([self.trending_updated_at, np.zeros(k, np.int64)]),
            embedding=np.vstack([self.embedding, np.zeros((k, self.embedding.shape[1]), np.float32)]),
            embedding_version=np.concatenate(
                [self.embedding_version.astype(object), np.full(k, "none", dtype=object)]
            ),
            category_vocab=self.category_vocab,
            creator_vocab=self.creator_vocab,
            materialized_until=dict(self.materialized_until),
        )

    def with_rows_from(self, other: ItemFeatureTable, src: np.ndarray, dst: np.ndarray) -> ItemFeatureTable:
        """A copy whose rows ``dst`` take ``other``'s dense features and trending time at rows ``src``.

        For items renumbered into a new table (their streamed engagement carried over).
        """
        out = copy.copy(self)
        out.dense = self.dense.copy()
        out.dense[dst] = other.dense[src]
        out.trending_updated_at = self.trending_updated_at.copy()
        out.trending_updated_at[dst] = other.trending_updated_at[src]
        return out

    def with_engagement(
        self, rows: np.ndarray, timestamps: np.ndarray, labels: np.ndarray
    ) -> ItemFeatureTable:
        """A copy with streamed events counted into the engagement columns (this one unchanged).

        ``trending_score`` / ``trending_updated_at`` follow each positive event exactly as the
        online store's push does (:func:`~streamrec.features.transforms.trending_update`);
        ``item_events_7d``, ``item_positives_7d`` and ``item_positives_30d`` count the events,
        ``item_ctr_7d`` is recomputed with the item's own prior and ``popularity`` follows the
        30-day positives. The windows' expiry and ``item_users_7d`` / ``popularity_pct`` wait
        for the next feature build.

        Args:
            rows: Table row of each event (rows outside the table are ignored).
            timestamps: Event times, Unix seconds.
            labels: 1 for a positive (engaged) event, else 0.
        """
        rows = np.asarray(rows, dtype=np.int64).ravel()
        ts = np.asarray(timestamps, dtype=np.float64).ravel()
        pos = np.asarray(labels, dtype=np.int64).ravel() == 1
        ok = (rows >= 0) & (rows < len(self))
        rows, ts, pos = rows[ok], ts[ok], pos[ok]
        out = copy.copy(self)
        if rows.size == 0:
            return out
        dense = self.dense.copy()
        col = self._col
        touched = np.unique(rows)
        n_old = dense[touched, col["item_events_7d"]].astype(np.float64)
        p_old = dense[touched, col["item_positives_7d"]].astype(np.float64)
        ctr = dense[touched, col["item_ctr_7d"]].astype(np.float64)
        prior = (ctr * (n_old + RATE_PRIOR_STRENGTH) - p_old) / RATE_PRIOR_STRENGTH
        n_new = n_old + np.bincount(rows, minlength=len(self))[touched]
        p_add = np.bincount(rows[pos], minlength=len(self))[touched]
        p_new = p_old + p_add
        dense[touched, col["item_events_7d"]] = n_new
        dense[touched, col["item_positives_7d"]] = p_new
        dense[touched, col["item_ctr_7d"]] = (p_new + RATE_PRIOR_STRENGTH * prior) / (
            n_new + RATE_PRIOR_STRENGTH
        )
        p30 = dense[touched, col["item_positives_30d"]] + p_add
        dense[touched, col["item_positives_30d"]] = p30
        dense[touched, col["popularity"]] = np.log1p(p30)
        updated = self.trending_updated_at.copy()
        score_col = col["trending_score"]
        state: dict[int, tuple[float, float]] = {}  # exact times within the batch, as the push keeps them
        for r, t in sorted(zip(rows[pos].tolist(), ts[pos].tolist(), strict=True), key=lambda x: x[1]):
            score, at = state.get(r, (float(dense[r, score_col]), float(updated[r])))
            state[r] = trending_update(score, at, t)
        for r, (score, at) in state.items():
            dense[r, score_col], updated[r] = score, int(math.floor(at))
        out.dense, out.trending_updated_at = dense, updated
        return out

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        category_vocab: list[str],
        *,
        materialized_until: dict[str, str | None] | None = None,
        started: float | None = None,
    ) -> ItemFeatureTable:
        """Build the arrays from one row per item (defaults already applied).

        Args:
            frame: ``item_id`` plus every item feature (see :mod:`streamrec.features.spec`).
            category_vocab: Vocabulary of the build; categories not in it are appended.
            materialized_until: Provenance, recorded on the table.
            started: ``time.perf_counter()`` at the start of the load (for ``load_seconds``).
        """
        frame = frame.sort_values("item_id", kind="stable").reset_index(drop=True)
        n = len(frame)
        item_ids = frame["item_id"].to_numpy(dtype=np.int64)
        dense = np.ascontiguousarray(
            np.column_stack([frame[c].to_numpy(dtype=np.float32) for c in DENSE_FEATURES])
            if n
            else np.zeros((0, len(DENSE_FEATURES)), np.float32),
            dtype=np.float32,
        )
        vocab = list(category_vocab)
        index = {c: i for i, c in enumerate(vocab)}

        def cat_id(name: str) -> int:
            if name not in index:
                index[name] = len(vocab)
                vocab.append(name)
            return index[name]

        cats = frame["categories"].tolist()
        lengths = np.fromiter((len(c) for c in cats), dtype=np.int64, count=n)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.fromiter(
            (cat_id(str(c)) for cs in cats for c in cs), dtype=np.int32, count=int(indptr[-1])
        )
        primary = frame["primary_category"].astype(str).to_numpy()
        uniq, inv = np.unique(primary, return_inverse=True)
        uniq_ids = np.array([index.get(str(u), -1) for u in uniq], dtype=np.int32)
        category_id = uniq_ids[inv].astype(np.int32) if n else np.zeros(0, np.int32)
        creators = frame["creator"].astype(str).to_numpy()
        creator_vocab, creator_id = np.unique(creators, return_inverse=True)
        emb_list = frame["item_embedding"].tolist()
        width = max((len(e) for e in emb_list), default=0)
        embedding = np.zeros((n, width), dtype=np.float32)
        for i, e in enumerate(emb_list):
            if len(e) == width and width:
                embedding[i] = e
        return cls(
            item_ids=item_ids,
            dense=dense,
            dense_names=DENSE_FEATURES,
            category_id=category_id,
            categories_indptr=indptr,
            categories_indices=indices,
            creator_id=creator_id.astype(np.int32),
            published_at=frame["published_at"].to_numpy(dtype=np.int64),
            promoted=frame["promoted"].to_numpy(dtype=bool),
            flagged=frame["flagged"].to_numpy(dtype=bool),
            trending_updated_at=frame["trending_updated_at"].to_numpy(dtype=np.int64),
            embedding=embedding,
            embedding_version=frame["item_embedding_version"].astype(str).to_numpy(),
            category_vocab=vocab,
            creator_vocab=[str(c) for c in creator_vocab],
            materialized_until=dict(materialized_until or {}),
            load_seconds=(time.perf_counter() - started) if started is not None else 0.0,
        )
