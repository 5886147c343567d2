"""Per-item metadata arrays used by the re-ranker.

The re-ranker runs on every request, so item metadata is held as numpy arrays indexed by a
*catalog row* (the same row index the ranker's item-feature arrays use) and built once per
materialisation, not per request. Categories and creators are integer codes; names are kept
alongside for explanations and debugging.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from streamrec.errors import DataError
from streamrec.timeutil import epoch_s

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
#: Categories per row: one code each (``-1`` for none), or a list of codes each.
CategoryInput = npt.NDArray[np.integer[Any]] | Sequence[int] | Sequence[Sequence[int]]


def _codes(values: Iterable[Any], missing: Iterable[Any] = (None, "")) -> tuple[IntArray, tuple[str, ...]]:
    """Factorise values to int codes in first-seen order; missing values become -1."""
    table: dict[Any, int] = {}
    miss = set(missing)
    out = []
    for v in values:
        if v in miss or (isinstance(v, float) and v != v):  # NaN
            out.append(-1)
            continue
        code = table.get(v)
        if code is None:
            code = table[v] = len(table)
        out.append(code)
    return np.asarray(out, dtype=np.int64), tuple(str(v) for v in table)


class ItemMetadata:
    """Immutable per-item arrays for re-ranking, indexed by catalog row.

    Args:
        item_ids: Item id of each row (unique).
        categories: Category code(s) of each row: a 1-D int array (one category, ``-1`` for
            none), a 2-D int array padded with ``-1``, or a sequence of int sequences.
        creators: Creator code of each row (``-1`` unknown).
        published_at: Publication time, epoch seconds.
        promoted: Whether each item is promoted (default: none).
        flagged: Whether each item violates content policy (default: none).
        exposure: How often each item has been shown (default: 0).
        category_names: Names of category codes, optional.
        creator_names: Names of creator codes, optional.

    Raises:
        DataError: arrays of different lengths, or duplicate item ids.
    """

    def __init__(
        self,
        item_ids: npt.ArrayLike,
        categories: CategoryInput,
        creators: npt.ArrayLike,
        published_at: npt.ArrayLike,
        promoted: npt.ArrayLike | None = None,
        flagged: npt.ArrayLike | None = None,
        exposure: npt.ArrayLike | None = None,
        *,
        category_names: Sequence[str] = (),
        creator_names: Sequence[str] = (),
    ) -> None:
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        self.item_ids: IntArray = ids
        self.categories: IntArray = _category_matrix(categories)
        self.creators: IntArray = np.asarray(creators, dtype=np.int64).reshape(-1)
        self.published_at: FloatArray = np.asarray(published_at, dtype=np.float64).reshape(-1)
        self.promoted: BoolArray = (
            np.zeros(n, bool) if promoted is None else np.asarray(promoted, dtype=bool).reshape(-1)
        )
        self.flagged: BoolArray = (
            np.zeros(n, bool) if flagged is None else np.asarray(flagged, dtype=bool).reshape(-1)
        )
        self.exposure: FloatArray = (
            np.zeros(n) if exposure is None else np.asarray(exposure, dtype=np.float64).reshape(-1)
        )
        for name in ("categories", "creators", "published_at", "promoted", "flagged", "exposure"):
            if len(getattr(self, name)) != n:
                raise DataError(
                    f"item metadata '{name}' has {len(getattr(self, name))} rows but there are {n} item ids"
                )
        self.category_names = tuple(category_names)
        self.creator_names = tuple(creator_names)

        self._sort = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._sort]
        if n > 1 and bool(np.any(self._sorted_ids[1:] == self._sorted_ids[:-1])):
            raise DataError("item metadata has duplicate item ids")
        #: Total exposure of each row's creator (the item's own exposure when the creator is unknown).
        self.creator_exposure: FloatArray = self.exposure.copy()
        known = self.creators >= 0
        if bool(known.any()):
            totals = np.bincount(self.creators[known], weights=self.exposure[known])
            self.creator_exposure[known] = totals[self.creators[known]]
        # Python tuples of category codes per row: the greedy selection loop reads these.
        self.category_tuples: list[tuple[int, ...]] = [
            tuple(c for c in row if c >= 0) for row in self.categories.tolist()
        ]
        for arr in (self.item_ids, self.categories, self.creators, self.published_at):
            arr.setflags(write=False)
        for arr2 in (self.promoted, self.flagged, self.exposure, self.creator_exposure):
            arr2.setflags(write=False)

    def __len__(self) -> int:
        return len(self.item_ids)

    def category_tuple(self, row: int) -> tuple[int, ...]:
        """Category codes of ``row`` (empty when it has none)."""
        return self.category_tuples[row]

    def indices_of(self, item_ids: npt.ArrayLike) -> IntArray:
        """Catalog rows of ``item_ids`` (``-1`` for ids not in the catalog)."""
        q = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if len(self.item_ids) == 0:
            return np.full(len(q), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, q)
        pos_c = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos_c] == q
        return np.where(found, self._sort[pos_c], -1).astype(np.int64)

    def count_unknown(self, item_ids: npt.ArrayLike) -> int:
        """How many of ``item_ids`` are not in the catalog."""
        return int(np.count_nonzero(self.indices_of(item_ids) < 0))

    def with_exposure(self, exposure: npt.ArrayLike) -> ItemMetadata:
        """A copy with new exposure counts (e.g. after the daily impression aggregation)."""
        return ItemMetadata(
            self.item_ids,
            self.categories,
            self.creators,
            self.published_at,
            self.promoted,
            self.flagged,
            exposure,
            category_names=self.category_names,
            creator_names=self.creator_names,
        )

    def with_items(self, item_ids: npt.ArrayLike) -> ItemMetadata:
        """A copy with new items appended as rows ``len(self) ..``, in the order given.

        The new rows have no category, creator or publication time, are neither promoted nor
        flagged and have no exposure: apply the catalogue's fields with :meth:`with_changes`.
        The existing rows keep their index, and the arrays of a few thousand new rows cost
        milliseconds even against a large catalogue (the per-row category tuples are shared).

        Raises:
            DataError: an id is already held, or repeated.
        """
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if bool((self.indices_of(ids) >= 0).any()) or len(np.unique(ids)) != len(ids):
            raise DataError("with_items appends new items only; an id is already in the metadata or repeated")
        k = len(ids)
        out = copy.copy(self)
        pad_cats = np.full((k, self.categories.shape[1]), -1, dtype=np.int64)
        arrays = {
            "item_ids": np.concatenate([self.item_ids, ids]),
            "categories": np.vstack([self.categories, pad_cats]),
            "creators": np.concatenate([self.creators, np.full(k, -1, np.int64)]),
            "published_at": np.concatenate([self.published_at, np.zeros(k)]),
            "promoted": np.concatenate([self.promoted, np.zeros(k, bool)]),
            "flagged": np.concatenate([self.flagged, np.zeros(k, bool)]),
            "exposure": np.concatenate([self.exposure, np.zeros(k)]),
            "creator_exposure": np.concatenate([self.creator_exposure, np.zeros(k)]),
        }
        for name, arr in arrays.items():
            arr.setflags(write=False)
            setattr(out, name, arr)
        out.category_tuples = [*self.category_tuples, *([()] * k)]
        out._sort = np.argsort(out.item_ids, kind="stable")
        out._sorted_ids = out.item_ids[out._sort]
        return out

    def with_changes(self, changes: Mapping[int, Mapping[str, Any]]) -> ItemMetadata:
        """A copy with catalogue changes applied to the items it holds (others are ignored).

        Only the changed rows are touched: the other arrays are shared (they are read-only), so a
        few changes to a large catalogue cost milliseconds.

        Args:
            changes: ``item_id -> fields``; the fields read are ``categories`` (names; a name
                not seen before gets a new code), ``published_at`` (ISO time or epoch
                seconds), ``promoted`` and ``flagged``.
        """
        ids = np.fromiter(changes.keys(), dtype=np.int64, count=len(changes))
        rows = self.indices_of(ids)
        promoted, flagged = self.promoted.copy(), self.flagged.copy()
        published = self.published_at.copy()
        names = list(self.category_names)
        code = {n: i for i, n in enumerate(names)}
        new_cats: dict[int, list[int]] = {}
        for iid, row in zip(ids.tolist(), rows.tolist(), strict=True):
            if row < 0:
                continue
            fields = changes[iid]
            if "promoted" in fields:
                promoted[row] = bool(fields["promoted"])
            if "flagged" in fields:
                flagged[row] = bool(fields["flagged"])
            if "published_at" in fields:
                when = fields["published_at"]
                published[row] = float(when) if isinstance(when, int | float) else _epoch(str(when))
            if "categories" in fields:
                for name in fields["categories"]:
                    if name not in code:
                        code[name] = len(names)
                        names.append(name)
                new_cats[row] = [code[name] for name in fields["categories"]]
        out = copy.copy(self)
        for arr in (promoted, flagged, published):
            arr.setflags(write=False)
        out.promoted, out.flagged, out.published_at = promoted, flagged, published
        if new_cats:
            width = max(self.categories.shape[1], *(len(c) for c in new_cats.values()))
            cats = np.full((len(self), width), -1, dtype=np.int64)
            cats[:, : self.categories.shape[1]] = self.categories
            tuples = list(self.category_tuples)
            for row, codes in new_cats.items():
                cats[row] = -1
                cats[row, : len(codes)] = codes
                tuples[row] = tuple(codes)
            cats.setflags(write=False)
            out.categories, out.category_tuples, out.category_names = cats, tuples, tuple(names)
        return out

    @classmethod
    def from_records(
        cls,
        item_ids: Sequence[int],
        categories: Sequence[Sequence[str] | str | None],
        creators: Sequence[str | None],
        published_at: npt.ArrayLike,
        promoted: npt.ArrayLike | None = None,
        flagged: npt.ArrayLike | None = None,
        exposure: npt.ArrayLike | None = None,
    ) -> ItemMetadata:
        """Build from named categories and creators (factorised to codes here).

        Args:
            item_ids: Item ids.
            categories: Per item, a list of category names, one name, or None.
            creators: Per item, a creator name or None.
            published_at: Epoch seconds.
            promoted: Promoted flags.
            flagged: Content-policy flags.
            exposure: Exposure counts.
        """
        lists = [[] if c is None else [c] if isinstance(c, str) else list(c) for c in categories]
        flat_codes, cat_names = _codes(x for row in lists for x in row)
        rows: list[list[int]] = []
        i = 0
        for row in lists:
            rows.append([int(c) for c in flat_codes[i : i + len(row)]])
            i += len(row)
        creator_codes, creator_names = _codes(creators)
        return cls(
            item_ids,
            rows,
            creator_codes,
            published_at,
            promoted,
            flagged,
            exposure,
            category_names=cat_names,
            creator_names=creator_names,
        )

    @classmethod
    def from_frame(
        cls, items: pd.DataFrame, exposure: Mapping[int, float] | npt.ArrayLike | None = None
    ) -> ItemMetadata:
        """Build from an items frame in :data:`streamrec.data.schema.ITEM_SCHEMA`.

        Args:
            items: Columns ``item_id``, ``categories`` (list of names), ``creator``,
                ``published_at`` (timestamp), ``promoted``, ``flagged``.
            exposure: Exposure counts, aligned with the rows or as ``{item_id: count}``
                (missing ids count 0).
        """
        import pandas as pd

        ids = items["item_id"].to_numpy(dtype=np.int64)
        ts = pd.to_datetime(items["published_at"], utc=True)
        epoch = ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
        exp: npt.ArrayLike | None
        if isinstance(exposure, Mapping):
            exp = np.asarray([float(exposure.get(int(i), 0.0)) for i in ids])
        else:
            exp = exposure
        cats = [None if c is None else list(c) for c in items["categories"].tolist()]
        return cls.from_records(
            ids.tolist(),
            cats,
            items["creator"].tolist(),
            epoch,
            items["promoted"].to_numpy(dtype=bool),
            items["flagged"].to_numpy(dtype=bool),
            exp,
        )


def _category_matrix(categories: CategoryInput) -> IntArray:
    """Normalise categories to an (n, m >= 1) int matrix padded with -1."""
    if isinstance(categories, np.ndarray):
        arr = categories.astype(np.int64, copy=False)
        return arr.reshape(-1, 1) if arr.ndim == 1 else arr
    rows: list[Sequence[int]] = [
        [int(r)] if isinstance(r, int | np.integer) else [int(c) for c in r] for r in categories
    ]
    width = max((len(r) for r in rows), default=0) or 1
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = r
    return out  # a length mismatch with ``n`` is reported by the caller


def _epoch(iso: str) -> float:
    """Epoch seconds of an ISO time (UTC when it names no zone)."""
    return epoch_s(iso)
