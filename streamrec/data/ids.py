"""Raw ids <-> dense indices, shared by training and serving."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class IdMap:
    """A bijection between raw ids and dense indices ``0..n-1``.

    Indices follow the sorted order of the raw ids, so the mapping is deterministic for a given
    set of ids. Unknown raw ids map to ``-1``.

    Attributes:
        raw_ids: Sorted, unique raw ids; ``raw_ids[i]`` is the raw id of index ``i``.
    """

    raw_ids: npt.NDArray[np.int64]

    @classmethod
    def fit(cls, ids: npt.ArrayLike) -> IdMap:
        """Build a map from any collection of raw ids (duplicates are fine).

        Args:
            ids: Raw integer ids.

        Returns:
            The map over the distinct ids, in ascending order.
        """
        return cls(np.unique(np.asarray(ids, dtype=np.int64)))

    def __len__(self) -> int:
        return int(self.raw_ids.shape[0])

    def to_index(self, ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Map raw ids to dense indices; ids not in the map give ``-1``.

        Args:
            ids: Raw ids (scalar or array).

        Returns:
            An int64 array of the same shape as ``ids``.
        """
        arr = np.asarray(ids, dtype=np.int64)
        if len(self) == 0:
            return np.full(arr.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.raw_ids, arr), len(self) - 1)
        return np.where(self.raw_ids[pos] == arr, pos, -1).astype(np.int64)

    def to_raw(self, indices: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Map dense indices back to raw ids.

        Args:
            indices: Dense indices in ``0..n-1``.

        Returns:
            An int64 array of raw ids, same shape as ``indices``.

        Raises:
            IndexError: an index is negative or ``>= len(self)``.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for an IdMap of {len(self)} ids")
        return self.raw_ids[idx]
