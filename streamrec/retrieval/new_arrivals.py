"""New-arrivals retrieval: the items published in the last few days, newest first.

The other sources learn from engagement, so an item published an hour ago has little for them to
go on (the two-tower places it by its categories, affinity at a prior quantile, trending once it
is clicked). This source does not look at engagement or popularity at all: every item whose
``published_at`` lies in ``[now - window_days, now]`` is a candidate, the newest first (an item
published later than the request is not one). It is the same list for everybody, minus what the
user has seen; the ranker decides who gets which new item (``x_log_age_days`` and the item's
categories are among its inputs).

A request costs two binary searches and a slice: the publication times are kept sorted.
"""

from __future__ import annotations

import copy

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field

from streamrec.config import StrictModel
from streamrec.retrieval.base import Candidates, RetrievalSource, UserContext, empty_candidates

DAY_S = 86_400.0


class NewArrivalsConfig(StrictModel):
    """Settings of :class:`NewArrivalsSource`.

    Attributes:
        enabled: Train and serve the source (a bundle trained with it serves it).
        window_days: How recent a publication must be, in days before the request.
    """

    enabled: bool = False
    window_days: float = Field(3.0, gt=0)


class NewArrivalsSource(RetrievalSource):
    """Items published within ``window_days`` before the request, newest first.

    Args:
        published_at: ``(n_items,)`` publication time of each item row, epoch seconds (0 or less:
            unknown; such items are never new arrivals).
        config: The window.
        name: Source name for provenance.
        seen: Optional ``(n_users, n_items)`` matrix of items not to return per known user.
    """

    def __init__(
        self,
        published_at: npt.ArrayLike,
        config: NewArrivalsConfig | None = None,
        name: str = "new_arrivals",
        seen: sp.spmatrix | sp.sparray | None = None,
    ) -> None:
        super().__init__(name, seen)
        self.config = config or NewArrivalsConfig()
        pub = np.asarray(published_at, dtype=np.float64).ravel()
        #: Publication time of every item row (epoch seconds; 0 unknown).
        self.published_at: npt.NDArray[np.float64] = pub
        self.n_items = int(pub.size)
        known = np.flatnonzero(pub > 0)
        order = known[np.argsort(pub[known], kind="stable")]
        self._rows = order.astype(np.int64)  # item rows by publication time, oldest first
        self._times = pub[order]

    def with_items(self, published_at: npt.ArrayLike) -> NewArrivalsSource:
        """A copy with new item rows ``n_items ..`` (in order) published at ``published_at``.

        Catalogue items added while serving are what this source is for: they are candidates at
        once. This source is unchanged.
        """
        pub = np.asarray(published_at, dtype=np.float64).ravel()
        out = copy.copy(self)
        rows = np.concatenate([self._rows, np.arange(self.n_items, self.n_items + pub.size, dtype=np.int64)])
        times = np.concatenate([self._times, pub])
        keep = times > 0
        rows, times = rows[keep], times[keep]
        order = np.argsort(times, kind="stable")
        out._rows, out._times = rows[order], times[order]
        out.n_items = self.n_items + int(pub.size)
        out.published_at = np.concatenate([self.published_at, pub])
        return out

    def with_published(self, published_at: npt.ArrayLike) -> NewArrivalsSource:
        """A copy over new publication times of every row (the catalogue moved some); same rows."""
        out = NewArrivalsSource(published_at, self.config, self.name)
        out._seen = self._seen
        return out

    def _retrieve(self, ctx: UserContext, n: int) -> Candidates:
        if ctx.now is None:  # no request time: nothing is new
            return empty_candidates()
        lo = int(np.searchsorted(self._times, ctx.now - self.config.window_days * DAY_S, side="left"))
        hi = int(np.searchsorted(self._times, ctx.now, side="right"))
        rows = self._rows[lo:hi][::-1][:n]  # newest first
        age_hours = (ctx.now - self._times[lo:hi][::-1][:n]) / 3600.0
        return rows.copy(), (-age_hours).astype(np.float32)
