"""The ``popularity`` degradation level as a complete :class:`~streamrec.funnel.stages.Stages`.

:class:`PopularityStages` serves the most-engaged items of a recent window of the stored events,
minus the request's ``exclude`` list and the items the user has already interacted with. It needs
nothing but the data directory (no model bundle, no feature store), which makes it:

* the last fallback of the real recommender (it cannot fail once loaded: every call is a few
  numpy operations over in-memory arrays);
* what the serving layer runs when no trained bundle exists yet (tests, first deployment).

Definitions:

* **engagement** of an event = :data:`DEFAULT_WEIGHTS` of its type (``complete`` > ``click`` >
  ``view`` = ``rating``; impressions and skips count nothing);
* **window**: the ``window_days`` days ending at ``as_of`` (default: the latest stored event, so
  historical datasets such as MovieLens have a meaningful "recent" window). Items are ordered by
  window engagement, ties broken by all-time engagement, then by item id (fully deterministic);
* **seen items**: items with any non-impression event of the user (views, clicks, completions,
  skips, ratings), most recent first — never recommended again;
* **content policy**: items flagged in the catalogue are never served.

The stage calls are cheap and allocation-light: the fused composition runs them in-process on
every request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.data.schema import storable_id
from streamrec.data.store import DataStore
from streamrec.errors import DataNotFoundError
from streamrec.funnel.stages import POPULARITY, Candidates, UserContext, check_context_version

log = logging.getLogger(__name__)

#: Engagement weight per event type (types not listed weigh 0).
DEFAULT_WEIGHTS: Mapping[str, float] = {"view": 1.0, "click": 2.0, "complete": 3.0, "rating": 1.0}
#: Event types that do *not* make an item "seen" by the user.
NOT_SEEN_TYPES: frozenset[str] = frozenset({"impression"})
#: Name of the single retrieval source.
SOURCE = POPULARITY

_EMPTY = np.empty(0, dtype=np.int64)


def _lookup(sorted_ids: np.ndarray, ids: list[int]) -> tuple[np.ndarray, int]:
    """Dense indices of the ``ids`` found in ``sorted_ids`` and how many were not found.

    Ids that do not fit in int64 count as not found (they cannot be in the catalogue).
    """
    fits = [i for i in ids if storable_id(i)]
    if not fits or sorted_ids.size == 0:
        return _EMPTY, len(ids)
    arr = np.asarray(fits, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, arr)
    pos_c = np.minimum(pos, sorted_ids.size - 1)
    found = sorted_ids[pos_c] == arr
    return pos_c[found].astype(np.int64), len(ids) - int(found.sum())


class PopularityStages:
    """Most-engaged items of a recent window, as the five funnel stages.

    Build it with :meth:`from_data_dir` (reads the :class:`~streamrec.data.store.DataStore`) or
    directly from frames (tests).

    Args:
        items: Catalogue in :data:`~streamrec.data.schema.ITEM_SCHEMA` (``item_id`` required;
            ``title`` and ``flagged`` used when present).
        events: Events with at least ``user_id``, ``item_id``, ``event_type``, ``timestamp``.
        users: User ids known to the service (``user_idx`` of the context); defaults to the
            users appearing in ``events``.
        window_days: Length of the popularity window in days.
        as_of: End of the window (default: the latest event's timestamp, else now).
        n_candidates: Candidates returned by the retrieval stage.
        rank_keep: Candidates kept by the ranking stage (at least the request's ``k``).
        history_len: Most recent seen items kept as the context's ``history``.
        weights: Engagement weight per event type (default :data:`DEFAULT_WEIGHTS`).

    Raises:
        DataNotFoundError: the catalogue is empty.
    """

    source_names: tuple[str, ...] = (SOURCE,)
    #: In-memory numpy only: the runner calls these inline.
    blocking = False

    def __init__(
        self,
        items: pd.DataFrame,
        events: pd.DataFrame,
        users: np.ndarray | None = None,
        *,
        window_days: float = 7.0,
        as_of: datetime | None = None,
        n_candidates: int = 500,
        rank_keep: int = 50,
        history_len: int = 200,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if items.empty:
            raise DataNotFoundError(
                "no items are stored: run 'streamrec data ingest' or 'streamrec data synth' first"
            )
        if window_days <= 0 or n_candidates < 1 or rank_keep < 1:
            raise ValueError("window_days must be > 0, n_candidates and rank_keep >= 1")
        t0 = time.perf_counter()
        self.window_days = float(window_days)
        self.n_candidates = int(n_candidates)
        self.rank_keep = int(rank_keep)
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)

        items = items.sort_values("item_id", kind="stable").reset_index(drop=True)
        self.item_ids: np.ndarray = items["item_id"].to_numpy(dtype=np.int64)
        titles = items["title"] if "title" in items else pd.Series([None] * len(items))
        self.titles: list[str | None] = [t if isinstance(t, str) else None for t in titles]
        flagged = (
            items["flagged"].fillna(False).to_numpy(dtype=bool)
            if "flagged" in items
            else np.zeros(len(items), dtype=bool)
        )
        n_items = len(self.item_ids)

        ev = events[["user_id", "item_id", "event_type", "timestamp"]]
        ts = pd.to_datetime(ev["timestamp"], utc=True)
        if as_of is None:
            as_of = ts.max().to_pydatetime() if len(ev) else datetime.now(UTC)
        self.as_of = as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC)
        # Events of items outside the catalogue are ignored (the contract normally prevents them).
        item_pos = np.searchsorted(self.item_ids, ev["item_id"].to_numpy(dtype=np.int64))
        item_pos_c = np.minimum(item_pos, max(n_items - 1, 0))
        in_catalog = self.item_ids[item_pos_c] == ev["item_id"].to_numpy(dtype=np.int64)
        w = ev["event_type"].map(self.weights).fillna(0.0).to_numpy(dtype=np.float64)
        start = pd.Timestamp(self.as_of - timedelta(days=self.window_days))
        in_window = ((ts >= start) & (ts <= pd.Timestamp(self.as_of))).to_numpy(dtype=bool)
        all_time = np.bincount(item_pos_c[in_catalog], weights=w[in_catalog], minlength=n_items)
        sel = in_catalog & in_window
        recent = np.bincount(item_pos_c[sel], weights=w[sel], minlength=n_items)

        # Order: window engagement desc, then all-time engagement desc, then item id asc.
        order = np.lexsort((self.item_ids, -all_time, -recent))
        self.order: np.ndarray = order[~flagged[order]].astype(np.int64)
        # Score in [0, 1]: window engagement share of the best item (ties keep the order above).
        top = float(recent.max()) if n_items and recent.max() > 0 else 1.0
        self.scores: np.ndarray = (recent / top).astype(np.float32)
        self.n_flagged = int(flagged.sum())

        # Users and their seen items (CSR, most recent first).
        if users is None:
            users = np.unique(ev["user_id"].to_numpy(dtype=np.int64))
        self.user_ids: np.ndarray = np.unique(np.asarray(users, dtype=np.int64))
        seen_mask = in_catalog & ~ev["event_type"].isin(NOT_SEEN_TYPES).to_numpy(dtype=bool)
        u_pos = np.searchsorted(self.user_ids, ev["user_id"].to_numpy(dtype=np.int64))
        u_pos_c = np.minimum(u_pos, max(len(self.user_ids) - 1, 0))
        known_user = (
            self.user_ids[u_pos_c] == ev["user_id"].to_numpy(dtype=np.int64)
            if len(self.user_ids)
            else np.zeros(len(ev), dtype=bool)
        )
        sel = seen_mask & known_user
        su = u_pos_c[sel].astype(np.int64)
        si = item_pos_c[sel].astype(np.int64)
        st = ts.dt.tz_convert(None).to_numpy().astype("datetime64[us]").astype(np.int64)[sel]
        # Sort by user, then most recent first; keep the first (latest) occurrence of each pair.
        o = np.lexsort((-st, su))
        su, si = su[o], si[o]
        if su.size:
            key = su * max(n_items, 1) + si
            _, first = np.unique(key, return_index=True)
            first.sort()
            su, si = su[first], si[first]
        self._seen_items: np.ndarray = si
        self._seen_ptr: np.ndarray = np.searchsorted(su, np.arange(len(self.user_ids) + 1))
        self.history_len = int(history_len)
        self.n_events = len(ev)
        self.model_version = f"popularity-{self.window_days:g}d@{self.as_of:%Y-%m-%dT%H:%M}"
        self.load_seconds = time.perf_counter() - t0
        self._sources_1 = [SOURCE]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_data_dir(
        cls,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        window_days: float = 7.0,
        seen_days: float | None = None,
        **kwargs: Any,
    ) -> PopularityStages:
        """Load items, users and events from a data directory.

        Args:
            data_dir: The data directory (see :func:`streamrec.paths.resolve_data_dir`).
            window_days: Popularity window (days before the latest stored event).
            seen_days: Only events this recent define "seen" items and all-time engagement
                (default: every stored event).
            **kwargs: Passed to the constructor (``n_candidates``, ``rank_keep``, ...).

        Raises:
            DataNotFoundError: nothing is stored there.
        """
        store = DataStore(data_dir)
        items = store.items()
        if items.empty:
            raise DataNotFoundError(
                f"no items stored under {store.layout.root}: run 'streamrec data ingest' or "
                "'streamrec data synth --data-dir ...' first"
            )
        start = None
        if seen_days is not None:
            dates = store.event_dates()
            if dates:
                last = datetime.combine(dates[-1], datetime.min.time(), UTC) + timedelta(days=1)
                start = last - timedelta(days=max(seen_days, window_days) + 1)
        events = store.events(start=start, columns=["user_id", "item_id", "event_type", "timestamp"])
        users = store.users()["user_id"].to_numpy(dtype=np.int64)
        stages = cls(items, events, users, window_days=window_days, **kwargs)
        log.info(
            "popularity stages loaded from %s: %d items (%d flagged), %d users, %d events in %.2fs",
            store.layout.root,
            len(stages.item_ids),
            stages.n_flagged,
            len(stages.user_ids),
            stages.n_events,
            stages.load_seconds,
        )
        return stages

    def describe(self) -> dict[str, Any]:
        """Facts for health and admin endpoints."""
        return {
            "stages": type(self).__name__,
            "model_version": self.model_version,
            "items": int(self.item_ids.size),
            "servable_items": int(self.order.size),
            "users": int(self.user_ids.size),
            "events": int(self.n_events),
            "window_days": self.window_days,
            "as_of": self.as_of.isoformat(),
        }

    # ------------------------------------------------------------------ helpers
    def seen(self, user_idx: int) -> np.ndarray:
        """Item indices the user has interacted with, most recent first (empty when unknown)."""
        if user_idx < 0:
            return _EMPTY
        return self._seen_items[self._seen_ptr[user_idx] : self._seen_ptr[user_idx + 1]]

    def _mask(self, exclude: np.ndarray) -> np.ndarray:
        """Boolean mask over the catalogue, True at ``exclude`` (faster than ``np.isin`` here)."""
        mask = np.zeros(self.item_ids.size, dtype=bool)
        mask[exclude] = True
        return mask

    def item_index(self, item_ids: list[int]) -> tuple[np.ndarray, int]:
        """Dense indices of catalogue items and the number of ids not in the catalogue."""
        return _lookup(self.item_ids, item_ids)

    # ------------------------------------------------------------------ stages
    def read_features(self, user_id: int) -> dict[str, Any]:
        """No online features: these stages use none."""
        return {}

    def user_context(self, request: RecommendRequest, features: dict[str, Any] | None = None) -> UserContext:
        """Resolve the user (unknown -> ``user_idx = -1``), seen items and ``exclude``."""
        uid = request.user_id
        user_idx = -1
        if storable_id(uid) and self.user_ids.size:
            pos = int(np.searchsorted(self.user_ids, uid))
            if pos < self.user_ids.size and int(self.user_ids[pos]) == uid:
                user_idx = pos
        excl, unknown = self.item_index(request.exclude) if request.exclude else (_EMPTY, 0)
        seen = self.seen(user_idx)
        # May hold duplicates (an excluded item also seen); every consumer uses it as a mask.
        exclude = np.concatenate((excl, seen)) if excl.size else seen
        ts = request.context.timestamp
        return UserContext(
            user_id=uid,
            user_idx=user_idx,
            k=request.k,
            now=ts.timestamp() if ts is not None else time.time(),
            device=request.context.device,
            history=seen[: self.history_len],
            exclude=exclude,
            unknown_exclude_ids=unknown,
        )

    def retrieve(self, source: str, ctx: UserContext) -> Candidates:
        """The ``n_candidates`` most popular servable items not excluded for this user.

        Raises:
            KeyError: ``source`` is not ``popularity``.
        """
        check_context_version("", ctx)  # a trained model's context means other rows
        if source != SOURCE:
            raise KeyError(f"unknown retrieval source '{source}' (PopularityStages has only '{SOURCE}')")
        need = self.n_candidates
        exclude = ctx.exclude
        if exclude.size == 0:
            items = self.order[:need]
        else:
            head = self.order[: need + exclude.size]
            items = head[~self._mask(exclude)[head]][:need]
        # One shared provenance list per response (read-only by convention; cheap to build).
        return Candidates(items, self.scores[items], [self._sources_1] * int(items.size))

    def merge(self, ctx: UserContext, parts: dict[str, Candidates]) -> Candidates:
        """Union of the sources' candidates: best score per item, sources unioned, excluded dropped."""
        present = [c for c in parts.values() if len(c)]
        if not present:
            return Candidates(_EMPTY, np.empty(0, dtype=np.float32), [])
        if len(present) == 1:
            merged = present[0]
        else:
            items = np.concatenate([c.items for c in present])
            scores = np.concatenate([c.scores for c in present]).astype(np.float32)
            sources = [s for c in present for s in c.sources]
            uniq, inv = np.unique(items, return_inverse=True)
            best = np.full(uniq.size, -np.inf, dtype=np.float32)
            np.maximum.at(best, inv, scores)
            prov: list[list[str]] = [[] for _ in range(uniq.size)]
            for j, srcs in zip(inv.tolist(), sources, strict=True):
                prov[j].extend(s for s in srcs if s not in prov[j])
            merged = Candidates(uniq.astype(np.int64), best, prov)
        if ctx.exclude.size:
            keep = ~self._mask(ctx.exclude)[merged.items]
            if not keep.all():
                idx = np.flatnonzero(keep)
                merged = Candidates(merged.items[idx], merged.scores[idx], [merged.sources[i] for i in idx])
        return merged

    def rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """Order by popularity (ties: catalogue order) and keep ``max(rank_keep, k)``."""
        check_context_version("", ctx)
        if not len(candidates):
            return candidates
        keep = max(self.rank_keep, ctx.k)
        o = np.lexsort((candidates.items, -candidates.scores))[:keep]
        return Candidates(candidates.items[o], candidates.scores[o], [candidates.sources[i] for i in o])

    def rank_batch(self, ctxs: list[UserContext], candidates: list[Candidates]) -> list[Candidates]:
        """:meth:`rank` per request."""
        return [self.rank(c, m) for c, m in zip(ctxs, candidates, strict=True)]

    def simple_rank(self, ctx: UserContext, candidates: Candidates) -> Candidates:
        """:meth:`rank` (already a ranking by retrieval score)."""
        return self.rank(ctx, candidates)

    def rerank(self, ctx: UserContext, ranked: Candidates) -> RecommendResponse:
        """The top ``k`` as a response at degradation level ``popularity``.

        ``metadata.request_id`` and ``metadata.timings_ms`` are left for the caller to fill.
        """
        check_context_version("", ctx)
        k = min(ctx.k, len(ranked))
        idx = ranked.items[:k].tolist()
        ids = self.item_ids[ranked.items[:k]].tolist()
        scores = ranked.scores[:k].tolist()
        titles = self.titles
        # One validation call over plain data is the cheapest way to a checked response.
        return RecommendResponse.model_validate(
            {
                "user_id": ctx.user_id,
                "items": [
                    {"item_id": ids[j], "score": scores[j], "sources": ranked.sources[j], "title": titles[i]}
                    for j, i in enumerate(idx)
                ],
                "metadata": {
                    "model_version": self.model_version,
                    "degradation_level": "popularity",
                    "unknown_exclude_ids": ctx.unknown_exclude_ids,
                    "request_id": "",
                },
            }
        )


def build_popularity_stages(
    data_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> PopularityStages:
    """Factory with the same shape as ``recommender.build_stages`` (``data_dir`` first).

    Args:
        data_dir: The data directory.
        **kwargs: Passed to :meth:`PopularityStages.from_data_dir`.
    """
    return PopularityStages.from_data_dir(data_dir, **kwargs)


__all__ = ["DEFAULT_WEIGHTS", "PopularityStages", "build_popularity_stages"]
