"""The in-memory last levels of the degradation chain: ``batch`` and ``cached``.

* :class:`BatchTopN`: the batch job's precomputed top-50 per user of one model version
  (``<data>/fallback/<version>/``), served when the funnel itself fails or is short.
* :class:`ResponseCache`: the last good response per user (bounded LRU), the level of last resort.

Both answer with plain item dicts (``item_id``, ``score``, ``sources``) and never block: a dict
lookup and a filter over at most a few dozen items.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
from cachetools import LRUCache

Item = dict[str, Any]


def batch_lists(
    user_ids: npt.ArrayLike,
    item_ids: list[npt.NDArray[np.int64]],
    scores: list[npt.NDArray[np.float32]],
) -> pa.Table:
    """One batch of the batch job's lists, as :meth:`BatchTopN.load` reads them.

    The lists are Arrow ``list<int64>`` / ``list<float>`` columns whatever their lengths: a numpy
    object array of equal-length lists would be written as a fixed-shape tensor column and a
    ragged one as a variable-shaped one, and a folder holding both cannot be read back as one.
    """
    return pa.table(
        {
            "user_id": pa.array(np.asarray(user_ids, dtype=np.int64)),
            "item_ids": pa.array([np.asarray(i, dtype=np.int64) for i in item_ids], type=pa.list_(pa.int64())),
            "scores": pa.array([np.asarray(x, dtype=np.float32) for x in scores], type=pa.list_(pa.float32())),
        }
    )


class BatchTopN:
    """Precomputed top-N per user of one model version.

    Args:
        version: The model version label (``v3``) the lists belong to.
        lists: ``user_id -> (item_ids, scores)``.
    """

    def __init__(
        self, version: str, lists: dict[int, tuple[np.ndarray, np.ndarray]], computed_at: float | None = None
    ) -> None:
        self.version = version
        self._lists = lists
        self.computed_at = computed_at  # epoch seconds the batch job wrote the lists (None: unknown)

    @classmethod
    def empty(cls, version: str = "") -> BatchTopN:
        """No lists (a version without a batch job's output)."""
        return cls(version, {})

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str], version: str) -> BatchTopN:
        """The lists the batch job wrote for ``version`` (empty when it wrote none).

        Args:
            data_dir: The data directory.
            version: Model version label (``v3``).
        """
        path = Path(data_dir) / "fallback" / version
        if not path.is_dir():
            return cls.empty(version)
        frame = pd.read_parquet(path)
        lists = {
            int(u): (np.asarray(i, dtype=np.int64), np.asarray(s, dtype=np.float32))
            for u, i, s in zip(frame["user_id"], frame["item_ids"], frame["scores"], strict=True)
        }
        written = [f.stat().st_mtime for f in path.rglob("*.parquet")]
        return cls(version, lists, max(written) if written else None)

    def __len__(self) -> int:
        return len(self._lists)

    def items(self, user_id: int, k: int, drop: set[int] | frozenset[int] = frozenset()) -> list[Item]:
        """Up to ``k`` of the user's precomputed items, skipping ``drop`` (empty for an unknown user)."""
        hit = self._lists.get(int(user_id))
        if hit is None:
            return []
        out: list[Item] = []
        for i, s in zip(hit[0].tolist(), hit[1].tolist(), strict=True):
            if i not in drop:
                out.append({"item_id": i, "score": s, "sources": ["batch"]})
                if len(out) >= k:
                    break
        return out


class ResponseCache:
    """The last good response's items per user, bounded (least recently used out first).

    Args:
        max_users: Users kept (0 keeps none).
    """

    def __init__(self, max_users: int) -> None:
        self._items: LRUCache[int, tuple[Item, ...]] | None = (
            LRUCache(maxsize=max_users) if max_users > 0 else None
        )
        self._lock = threading.Lock()

    def put(self, user_id: int, items: list[Item]) -> None:
        """Remember ``items`` as the user's last good answer."""
        if self._items is None or not items:
            return
        with self._lock:
            self._items[int(user_id)] = tuple(items)

    def items(self, user_id: int, k: int, drop: set[int] | frozenset[int] = frozenset()) -> list[Item]:
        """Up to ``k`` items of the user's last good answer, skipping ``drop``."""
        if self._items is None:
            return []
        with self._lock:
            hit = self._items.get(int(user_id))
        if not hit:
            return []
        out = [{**it, "sources": ["cached"]} for it in hit if it["item_id"] not in drop]
        return out[:k]

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)
