"""Trending retrieval: items by time-decayed engagement velocity.

Each engagement of weight ``w`` at time ``t`` contributes ``w * 2^(-(now - t) / half_life)`` to its
item. Multiplied by ``ln 2 / half_life`` this is the exponentially weighted estimate of the item's
engagement *rate* (events per hour here) - recent bursts count, old hits fade, and one half-life
halves any contribution.

Because every item decays by the same factor, ``now`` does not change the *order*; the state is
kept as scores at a reference time and only new events (:meth:`TrendingSource.add`) change the
ranking. The top items are cached and recomputed lazily after updates, so a request costs a
slice, not a sort of the catalogue. The source is the same for everybody (only seen items are
filtered), which makes it the last personalised-looking source left for cold users.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from streamrec.config import StrictModel
from streamrec.errors import TrainingDataError
from streamrec.retrieval.base import Candidates, FloatArray, RetrievalSource, UserContext, top_n


class TrendingConfig(StrictModel):
    """Settings of :class:`TrendingSource`.

    Attributes:
        half_life_hours: Time after which an engagement counts half.
        cache_size: Top items kept ready between updates (grown on demand).
    """

    half_life_hours: float = Field(24.0, gt=0)
    cache_size: int = Field(1000, ge=1)


def to_epoch_seconds(values: Any) -> npt.NDArray[np.float64]:
    """Timestamps as float seconds since the Unix epoch.

    Args:
        values: Numbers (taken as epoch seconds), datetimes, ``datetime64`` arrays or pandas
            datetime series (naive values are taken as UTC); scalar or 1-D.

    Returns:
        A 1-D float64 array.
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "iuf":
        return np.atleast_1d(arr.astype(np.float64))
    idx = pd.DatetimeIndex(pd.to_datetime(np.atleast_1d(values) if arr.ndim == 0 else values, utc=True))
    return np.asarray((idx - pd.Timestamp(0, tz="UTC")).total_seconds(), dtype=np.float64)


class TrendingSource(RetrievalSource):
    """The items with the highest decayed engagement velocity.

    Args:
        n_items: Catalogue size (item indices ``0..n_items-1``).
        config: Half-life and cache size.
        name: Source name for provenance.
        seen: Optional ``(n_users, n_items)`` matrix of items not to return per known user.
    """

    def __init__(
        self,
        n_items: int,
        config: TrendingConfig | None = None,
        name: str = "trending",
        seen: sp.spmatrix | sp.sparray | None = None,
    ) -> None:
        super().__init__(name, seen)
        self.config = config or TrendingConfig()
        self.n_items = n_items
        self._half_life_s = self.config.half_life_hours * 3600.0
        self._score = np.zeros(n_items, dtype=np.float64)
        self._ref: float | None = None
        self._cache: Candidates | None = None

    @classmethod
    def from_events(
        cls,
        n_items: int,
        item_indices: npt.ArrayLike,
        timestamps: Any,
        weights: npt.ArrayLike | None = None,
        **kwargs: Any,
    ) -> TrendingSource:
        """Build a source and :meth:`add` a batch of events (see there for the arguments)."""
        src = cls(n_items, **kwargs)
        src.add(item_indices, timestamps, weights)
        return src

    def with_items(self, n_new: int) -> TrendingSource:
        """A copy with ``n_new`` more items (indices ``n_items ..``) at no engagement yet."""
        out = copy.copy(self)
        out.n_items = self.n_items + n_new
        out._score = np.concatenate([self._score, np.zeros(n_new)])
        out._cache = None
        return out

    def with_events(self, item_indices: npt.ArrayLike, timestamps: Any) -> TrendingSource:
        """A copy with positive events :meth:`add`-ed (this source is unchanged: copy-on-write)."""
        out = copy.copy(self)
        out._score = self._score.copy()
        out._cache = None
        out.add(item_indices, timestamps)
        return out

    @property
    def reference_time(self) -> float | None:
        """Epoch seconds the stored scores refer to (the latest event seen), ``None`` if empty."""
        return self._ref

    def add(self, item_indices: npt.ArrayLike, timestamps: Any, weights: npt.ArrayLike | None = None) -> None:
        """Record engagements (streaming or batch).

        Args:
            item_indices: Item index of each event; events on unknown indices are ignored.
            timestamps: Event times (epoch seconds or datetimes, see :func:`to_epoch_seconds`).
            weights: Per-event weight (default 1; e.g. a completion can count more than a click).

        Raises:
            TrainingDataError: the arrays differ in length.
        """
        items = np.asarray(item_indices, dtype=np.int64).ravel()
        ts = to_epoch_seconds(timestamps)
        w = np.ones(items.size) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        if not (items.size == ts.size == w.size):
            raise TrainingDataError(
                f"{items.size} items, {ts.size} timestamps and {w.size} weights differ in length"
            )
        ok = (items >= 0) & (items < self.n_items) & np.isfinite(ts)
        items, ts, w = items[ok], ts[ok], w[ok]
        if items.size == 0:
            return
        newest = float(ts.max())
        if self._ref is None:
            self._ref = newest
        elif newest > self._ref:
            self._score *= 2.0 ** (-(newest - self._ref) / self._half_life_s)
            self._ref = newest
        contrib = w * np.exp2(-(self._ref - ts) / self._half_life_s)
        self._score += np.bincount(items, weights=contrib, minlength=self.n_items)
        self._cache = None

    def velocity(self, now: Any = None) -> FloatArray:
        """Decayed engagement rate of every item at ``now``, in events per hour.

        Args:
            now: Time to evaluate at (default: the reference time). Events after ``now`` are
                not undone: build the source from events up to ``now`` for offline evaluation.

        Returns:
            ``(n_items,)`` float32.
        """
        if self._ref is None:
            return np.zeros(self.n_items, np.float32)
        t = self._ref if now is None else float(to_epoch_seconds(now)[0])
        decay = 2.0 ** (-(t - self._ref) / self._half_life_s)
        rate = self._score * decay * (math.log(2.0) / self._half_life_s) * 3600.0
        return rate.astype(np.float32)

    def _top(self, n: int) -> Candidates:
        # One read of the attribute: sources may run in worker threads while add() resets it.
        cache = self._cache
        if cache is None or cache[0].size < min(n, self.n_items):
            v = self.velocity()
            v = np.where(v > 0, v, -np.inf).astype(np.float32)
            cache = self._cache = top_n(v, max(n, self.config.cache_size))
        return cache

    def _retrieve(self, ctx: UserContext, n: int) -> Candidates:
        items, scores = self._top(n)
        return items[:n], scores[:n]
