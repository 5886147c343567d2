"""The synthetic world: StreamRec's embedded default dataset.

A deterministic (by seed) little universe of users, items and logged impressions, generated from
an explicit click model whose ground truth is kept *apart* from the data, so that offline metrics
can be checked against the truth and a :class:`~streamrec.data.simulator.UserSimulator` can play
the users online (A/B, shadow).

The world
---------
* **Categories** -- ``n_categories`` named ones (``news``, ``sports``, ...), each with a unit
  centroid in the latent space and a size weight (a few big categories, a long tail).
* **Users** -- a latent taste vector (pulled towards the centroids of the categories they like),
  Dirichlet category affinities (tilted by age bucket and gender, so demographics carry signal
  for cold start), age, gender (null for a few), occupation, region (with a UTC offset that
  shifts their daily cycle), a preferred device, a heavy-tailed (log-normal) activity level that
  sets how often they come back, and a ``signup_at`` (most before the window, some during it;
  nobody acts before the day after signing up).
* **Items** -- a primary category (often their creator's home category) and sometimes a second
  one, a creator (null for ~2%; creator output is Zipf-distributed), ``published_at`` (a back
  catalogue spread over ``back_catalogue_days`` before the window, the rest spread over every
  simulated day), a latent vector correlated with their categories, a Zipf popularity
  (normalised to mean 1), exactly ``round(promoted_fraction * items)`` promoted and
  ``round(flagged_fraction * items)`` flagged items, and a title. Item ids follow publish order.
* **Impressions** -- on each day a user is active with probability proportional to their
  activity. An active user-day has sessions (1 + Poisson), each on a device (mostly the user's
  preferred one) starting at an hour drawn from a daily cycle in the user's local time. It shows
  ``1 + Poisson`` slates of ``slate_size`` items; slate candidates mix *popular* (by popularity),
  *category-affine* (a category drawn from the user's affinities, then an item of it by
  popularity) and *fresh* (published in the last ``fresh_window_days``) items. Nothing is shown
  before its ``published_at`` (an unpublished draw falls back to the back catalogue); duplicates
  within a slate are dropped and positions renumbered 0..k-1. All impressions of a slate share
  its timestamp.

The click model
---------------
For user ``u``, item ``i`` shown at position ``p`` (0 = top) at time ``t``::

    logit = bias + w_aff * <latent_u, latent_i>
                 + w_cat * category_affinity(u, i)        # n_categories * mean affinity of i's categories
                 + w_pop * log(popularity_i)              # popularity normalised to mean 1
                 + w_fresh * exp(-age_days(t) / fresh_tau_days)
                 - position_bias * log2(1 + p)
    P(click) = sigmoid(logit)

Given a click, the watch fraction is ``U ** ((1 - m) / m)`` (mean ``m``) with
``m = sigmoid(watch_bias + watch_w_aff * <latent_u, latent_i>)``; a watch fraction of at least
``complete_threshold`` is a completion. A non-clicked impression is an explicit skip with
probability ``skip_rate * sigmoid(-2 * <latent_u, latent_i>)``. :func:`pair_terms`,
:func:`click_probability` and :func:`sample_outcomes` are the *one* implementation, used by the
generator and by the simulator alike.

Event representation
--------------------
**One row per impression**, ``event_type`` being its strongest outcome:

=============  =====  ================  ===================================================
event_type     label  watch_fraction    meaning
=============  =====  ================  ===================================================
``impression`` 0      null              shown, ignored
``skip``       0      null              shown and explicitly dismissed
``click``      1      (0, threshold)    clicked, watched part of it
``complete``   1      [threshold, 1]    clicked and watched to the end
=============  =====  ================  ===================================================

So ``label`` is "clicked" and every row is an impression (``position`` and ``session_id``
always set; ``rating`` always null). Event ids are ``syn<seed>-<YYYYMMDD>-u<user_id>-<n>``
(``n`` = index of the impression in that user-day), session ids
``syn<seed>-<YYYYMMDD>-u<user_id>-s<k>``: unique and deterministic.

Determinism and chunks
----------------------
Every random draw comes from a numpy ``Generator`` seeded by ``SeedSequence(seed,
spawn_key=(stream, ...))``: one for the category structure, one for all items, one per *block*
of :data:`RNG_BLOCK` users (demographics and tastes) and one per (day, block) for the events.
Users are processed in chunks of whole blocks (``chunk_size`` is rounded up to a multiple of
:data:`RNG_BLOCK`), and every later step is row-wise, so the data do not depend on the chunk size.

Ground truth
------------
Written under :attr:`streamrec.paths.DataLayout.truth`, never next to the data: ``params.json``
(the resolved configuration, click-model parameters, category names, window, counts),
``items.npz`` (latent vectors, categories, popularity, publish times, creators, flags) and
``users_latent.npy``, ``users_affinity.npy``, ``users_activity.npy`` (row ``k`` = user id
``k + 1``; written chunk by chunk through memory maps).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from streamrec.config import record_config, utc_stamp
from streamrec.data.click_model import (
    EV_CLICK,
    OUTCOME_EVENT_TYPES,
    click_probability,
    pair_terms,
    sample_outcomes,
)
from streamrec.data.store import DataStore
from streamrec.data.synth_config import (  # noqa: F401 - re-exported: the world's definition
    _ADJECTIVES,
    _BACK_PUBLISH_GAP_US,
    _DEVICE_P,
    _GENDER_P,
    _MAX_SESSION_US,
    _NOUNS,
    _OCCUPATION_P,
    _S_EVENTS,
    _S_ITEMS,
    _S_STRUCTURE,
    _S_USERS,
    _SESSION_SLATE_GAP_US,
    CATEGORY_NAMES,
    DAY_US,
    DEFAULT_END,
    GENDERS,
    HOUR_US,
    HOURLY_CYCLE,
    OCCUPATIONS,
    REGIONS,
    RNG_BLOCK,
    SECOND_US,
    SYNTH_DEVICES,
    TRUTH_FORMAT,
    SynthConfig,
    category_names,
)
from streamrec.errors import DataError
from streamrec.paths import DataLayout

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
IntArr = npt.NDArray[np.integer[Any]]
BoolArr = npt.NDArray[np.bool_]


# ------------------------------------------------------------------------------ click model
@dataclass(frozen=True)
class ItemTruth:
    """Ground truth of every item (row ``k`` = item id ``k + 1``).

    Attributes:
        latent: ``(n, d)`` latent content vectors.
        primary: Primary category index.
        secondary: Secondary category index, -1 where none.
        popularity: Zipf popularity, mean 1 over the catalogue.
        published_us: Publish time, microseconds since the epoch (UTC).
        creator: Creator index, -1 where none.
        promoted: Promoted items.
        flagged: Items flagged by content policy.
    """

    latent: F32
    primary: npt.NDArray[np.int16]
    secondary: npt.NDArray[np.int16]
    popularity: F64
    published_us: I64
    creator: npt.NDArray[np.int32]
    promoted: BoolArr
    flagged: BoolArr

    @property
    def n(self) -> int:
        """Number of items."""
        return len(self.primary)

    @property
    def item_id(self) -> I64:
        """Item ids (``1..n``)."""
        return np.arange(1, self.n + 1, dtype=np.int64)

    @property
    def log_popularity(self) -> F64:
        """``log(popularity)``, the click model's popularity term."""
        return np.log(self.popularity)

    def save(self, path: Path) -> None:
        """Write the truth as an ``.npz`` file."""
        with open(path, "wb") as fh:
            np.savez(fh, item_id=self.item_id, **{k: getattr(self, k) for k in _ITEM_TRUTH_FIELDS})

    @classmethod
    def load(cls, path: Path) -> ItemTruth:
        """Read a file written by :meth:`save`."""
        with np.load(path) as z:
            return cls(**{k: z[k] for k in _ITEM_TRUTH_FIELDS})


_ITEM_TRUTH_FIELDS = (
    "latent", "primary", "secondary", "popularity", "published_us", "creator", "promoted", "flagged",
)  # fmt: skip


@dataclass(frozen=True)
class UserBatch:
    """A contiguous range of users with their ground truth and attributes.

    Attributes:
        start: Index of the first user (its id is ``start + 1``).
        latent: ``(m, d)`` latent taste vectors.
        affinity: ``(m, C)`` category affinities (rows sum to 1).
        activity: Activity level (log-normal, heavy-tailed).
        age: Age in years.
        gender: Index into :data:`GENDERS`, -1 = not given.
        occupation: Index into :data:`OCCUPATIONS`.
        region: Index into :data:`REGIONS`.
        device: Preferred device, index into :data:`SYNTH_DEVICES`.
        signup_us: Sign-up time, microseconds since the epoch (UTC).
    """

    start: int
    latent: F32
    affinity: F32
    activity: F32
    age: npt.NDArray[np.int16]
    gender: npt.NDArray[np.int8]
    occupation: npt.NDArray[np.int8]
    region: npt.NDArray[np.int8]
    device: npt.NDArray[np.int8]
    signup_us: I64

    @property
    def n(self) -> int:
        """Number of users in the batch."""
        return len(self.age)

    @property
    def user_id(self) -> I64:
        """User ids of the batch."""
        return np.arange(self.start + 1, self.start + 1 + self.n, dtype=np.int64)

    def frame(self) -> pd.DataFrame:
        """The users in :data:`~streamrec.data.schema.USER_SCHEMA` columns."""
        genders = np.array([*GENDERS, None], dtype=object)
        return pd.DataFrame(
            {
                "user_id": self.user_id,
                "age": self.age,
                "gender": genders[self.gender],  # -1 picks the trailing None
                "occupation": np.array(OCCUPATIONS, dtype=object)[self.occupation],
                "region": np.array([r[0] for r in REGIONS], dtype=object)[self.region],
                "activity_level": self.activity,
                "signup_at": _us_to_series(self.signup_us),
            }
        )


@dataclass(frozen=True)
class EventBatch:
    """Events generated for one chunk of users on one day.

    Attributes:
        frame: Events in :data:`~streamrec.data.schema.EVENT_SCHEMA` columns, sorted by time.
        click_probability: The click model's probability of each row (ground truth).
    """

    frame: pd.DataFrame
    click_probability: F64


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def to_us(ts: datetime) -> int:
    """Microseconds since the epoch of a datetime (naive = UTC)."""
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _us_to_series(us: I64) -> pd.Series:
    return pd.Series(np.asarray(us, dtype=np.int64).astype("datetime64[us]")).dt.tz_localize("UTC")


def _arrow_series(arr: pa.Array) -> pd.Series:
    return pd.Series(pd.arrays.ArrowExtensionArray(arr))


def _unit_rows(x: F64) -> F64:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _blend(signal: F64, noise: F64, rho: float, scale: float) -> F32:
    """``scale * unit(rho * unit(signal) + sqrt(1 - rho^2) * unit(noise))`` row-wise."""
    mixed = rho * _unit_rows(signal) + math.sqrt(1.0 - rho * rho) * _unit_rows(noise)
    return (scale * _unit_rows(mixed)).astype(np.float32)


def _zipf_weights(n: int, exponent: float) -> F64:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def _cum_search(cum: F64, u: F64) -> I64:
    """Inverse CDF: the first index whose cumulative weight reaches ``u`` (``cum[-1] == 1``)."""
    idx = np.searchsorted(cum, u, side="right")
    return np.minimum(idx, len(cum) - 1).astype(np.int64)


class _CandidateIndex:
    """Sampling structures over the catalogue for the three candidate sources."""

    def __init__(self, items: ItemTruth, n_categories: int, window_start_us: int) -> None:
        self.pub = items.published_us
        self.pop_cum = np.cumsum(items.popularity) / items.popularity.sum()
        # the back catalogue (published before the window; never empty): the fallback for draws
        # that are not published yet at the time of the slate
        back_mask = items.published_us < window_start_us
        self.back = np.flatnonzero(back_mask)
        back_pop = items.popularity[self.back]
        self.back_cum = np.cumsum(back_pop) / back_pop.sum()
        self.by_cat_all = self._by_category(items, np.ones(items.n, dtype=bool), n_categories)
        self.by_cat_back = self._by_category(items, back_mask, n_categories)
        self.pub_order = np.argsort(items.published_us, kind="stable")
        self.pub_sorted = items.published_us[self.pub_order]

    @staticmethod
    def _by_category(items: ItemTruth, mask: BoolArr, n_categories: int) -> tuple[I64, F64]:
        ids = np.flatnonzero(mask)
        cats = items.primary[ids].astype(np.int64)
        order = np.lexsort((ids, cats))
        ids, cats = ids[order], cats[order]
        pop = items.popularity[ids]
        cum = np.cumsum(pop)
        starts = np.searchsorted(cats, np.arange(n_categories), side="left")
        ends = np.searchsorted(cats, np.arange(n_categories), side="right")
        before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
        total = np.where(ends > starts, cum[np.maximum(ends - 1, 0)] - before, 1.0)
        within = (cum - before[cats]) / total[cats]
        key: F64 = cats.astype(np.float64) + np.minimum(within, 1.0)
        return ids.astype(np.int64), key

    @staticmethod
    def _cat_pick(struct: tuple[I64, F64], cat: I64, u: F64) -> I64:
        ids, key = struct
        # first item of category ``cat`` whose cumulative share exceeds ``u``; an empty category
        # falls through to the next non-empty one.
        idx = np.searchsorted(key, cat + np.minimum(u, 1.0 - 1e-12), side="right")
        return ids[np.minimum(idx, len(ids) - 1)]

    def popular(self, u: F64, t_us: I64) -> I64:
        item = _cum_search(self.pop_cum, u)
        late = self.pub[item] > t_us
        if late.any():
            item[late] = self.back[_cum_search(self.back_cum, u[late])]
        return item

    def affine(self, cat: I64, u: F64, t_us: I64) -> I64:
        item = self._cat_pick(self.by_cat_all, cat, u)
        late = self.pub[item] > t_us
        if late.any():
            item[late] = self._cat_pick(self.by_cat_back, cat[late], u[late])
        return item

    def fresh(self, u: F64, t_us: I64, window_us: int, fallback_u: F64) -> I64:
        hi = np.searchsorted(self.pub_sorted, t_us, side="right")
        lo = np.searchsorted(self.pub_sorted, t_us - window_us, side="left")
        span = hi - lo
        pick = lo + np.minimum((u * np.maximum(span, 1)).astype(np.int64), np.maximum(span - 1, 0))
        item = self.pub_order[np.minimum(pick, len(self.pub_order) - 1)].astype(np.int64)
        empty = span <= 0
        if empty.any():
            item[empty] = self.popular(fallback_u[empty], t_us[empty])
        return item


# -------------------------------------------------------------------------------- generator
class WorldGenerator:
    """Generates the synthetic world piece by piece, deterministically from a config.

    Args:
        cfg: The world's configuration.

    Example:
        >>> gen = WorldGenerator(SynthConfig(users=300, items=200, days=3))
        >>> users = gen.users(0, 300)
        >>> batch = gen.events(users, day=0)
    """

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.start_us = to_us(cfg.start)
        self.end_us = to_us(cfg.end)
        self.categories = category_names(cfg.n_categories)
        c, d = cfg.n_categories, cfg.latent_dim
        rng = _rng(cfg.seed, _S_STRUCTURE)
        self.centroids = _unit_rows(rng.standard_normal((c, d)))
        self.category_weights = _zipf_weights(c, cfg.category_size_exponent)
        # tilt of category affinities per (age bucket x gender) group
        self.group_tilt = rng.normal(0.0, 0.8, size=(5 * (len(GENDERS) + 1), c))
        self.latent_scale = float(d) ** 0.25  # random pairs: <u, v> has std ~1
        mix = np.array([cfg.mix_popular, cfg.mix_affine, cfg.mix_fresh], dtype=np.float64)
        self.mix_cum = np.cumsum(mix / mix.sum())
        self.hour_cum = np.cumsum(HOURLY_CYCLE) / np.sum(HOURLY_CYCLE)
        self.region_offset_h = np.array([r[1] for r in REGIONS], dtype=np.int64)
        self.mean_activity = math.exp(_ACT_MU + _ACT_SIGMA**2 / 2)
        self._items: ItemTruth | None = None
        self._titles: list[str] | None = None
        self._index: _CandidateIndex | None = None

    # ------------------------------------------------------------------ chunks
    def chunks(self) -> list[tuple[int, int]]:
        """``[start, stop)`` user-index ranges of the chunks, each a whole number of blocks."""
        size = self.cfg.block_chunk_size
        return [(s, min(s + size, self.cfg.users)) for s in range(0, self.cfg.users, size)]

    # ------------------------------------------------------------------- items
    @property
    def items(self) -> ItemTruth:
        """The items' ground truth (generated once, all at once: the catalogue is small)."""
        if self._items is None:
            self._generate_items()
        assert self._items is not None
        return self._items

    def _generate_items(self) -> None:
        cfg = self.cfg
        n, c = cfg.items, cfg.n_categories
        rng = _rng(cfg.seed, _S_ITEMS)
        n_creators = cfg.creators
        creator_home = rng.choice(c, size=n_creators, p=self.category_weights)
        creator = rng.choice(n_creators, size=n, p=_zipf_weights(n_creators, 0.8)).astype(np.int32)
        creator[rng.random(n) < 0.02] = -1
        own = rng.random(n)
        drawn = rng.choice(c, size=n, p=self.category_weights)
        primary = np.where((creator >= 0) & (own < 0.7), creator_home[np.maximum(creator, 0)], drawn)
        has2 = rng.random(n) < 0.25
        secondary = np.where(has2, (primary + 1 + rng.integers(0, max(c - 1, 1), n)) % c, -1)
        popularity = _zipf_weights(n, cfg.zipf_exponent)[rng.permutation(n)] * n
        # publish times: a back catalogue before the window, new items spread over every day
        n_back = min(n, max(1, round(cfg.back_catalogue_fraction * n)))
        is_back = np.zeros(n, dtype=bool)
        is_back[rng.permutation(n)[:n_back]] = True
        span_us = cfg.back_catalogue_days * DAY_US - _BACK_PUBLISH_GAP_US
        back_pub = self.start_us - _BACK_PUBLISH_GAP_US - (rng.random(n) * span_us).astype(np.int64)
        new_day = rng.permutation(n) % cfg.days
        new_pub = self.start_us + new_day * DAY_US + (rng.random(n) * (DAY_US - 1)).astype(np.int64)
        published = np.where(is_back, back_pub, new_pub)
        signal = self.centroids[primary] + 0.5 * np.where(
            (secondary >= 0)[:, None], self.centroids[np.maximum(secondary, 0)], 0.0
        )
        latent = _blend(signal, rng.standard_normal((n, cfg.latent_dim)), 0.6, self.latent_scale)
        promoted = np.zeros(n, dtype=bool)
        promoted[rng.permutation(n)[: round(cfg.promoted_fraction * n)]] = True
        flagged = np.zeros(n, dtype=bool)
        flagged[rng.permutation(n)[: round(cfg.flagged_fraction * n)]] = True
        adj = rng.integers(0, len(_ADJECTIVES), n)
        noun = rng.integers(0, len(_NOUNS), n)
        # ids follow publish order
        order = np.argsort(published, kind="stable")
        self._items = ItemTruth(
            latent=np.ascontiguousarray(latent[order]),
            primary=primary[order].astype(np.int16),
            secondary=secondary[order].astype(np.int16),
            popularity=popularity[order],
            published_us=published[order].astype(np.int64),
            creator=creator[order],
            promoted=promoted[order],
            flagged=flagged[order],
        )
        pairs = zip(adj[order].tolist(), noun[order].tolist(), strict=True)
        self._titles = [f"{_ADJECTIVES[a]} {_NOUNS[b]} #{k + 1}" for k, (a, b) in enumerate(pairs)]

    def items_frame(self) -> pd.DataFrame:
        """The items in :data:`~streamrec.data.schema.ITEM_SCHEMA` columns."""
        it = self.items
        assert self._titles is not None
        names = self.categories
        cats = [
            [names[p]] if s < 0 else [names[p], names[s]]
            for p, s in zip(it.primary.tolist(), it.secondary.tolist(), strict=True)
        ]
        creators = [None if k < 0 else f"creator_{k:05d}" for k in it.creator.tolist()]
        return pd.DataFrame(
            {
                "item_id": it.item_id,
                "title": self._titles,
                "categories": cats,
                "creator": creators,
                "published_at": _us_to_series(it.published_us),
                "promoted": it.promoted,
                "flagged": it.flagged,
            }
        )

    @property
    def candidates(self) -> _CandidateIndex:
        """Sampling structures of the candidate sources (built once)."""
        if self._index is None:
            self._index = _CandidateIndex(self.items, self.cfg.n_categories, self.start_us)
        return self._index

    # ------------------------------------------------------------------- users
    def users(self, start: int, stop: int) -> UserBatch:
        """Users ``start..stop-1`` (indices; ids are one higher).

        Args:
            start: First user index; a multiple of :data:`RNG_BLOCK`.
            stop: One past the last index (capped at ``cfg.users``).

        Raises:
            ValueError: ``start`` is not block-aligned.
        """
        if start % RNG_BLOCK:
            raise ValueError(f"start must be a multiple of RNG_BLOCK={RNG_BLOCK}, got {start}")
        stop = min(stop, self.cfg.users)
        parts = [self._user_block(b) for b in range(start // RNG_BLOCK, -(-stop // RNG_BLOCK))]
        fields = {k: np.concatenate([getattr(p, k) for p in parts])[: stop - start] for k in _USER_FIELDS}
        return UserBatch(start=start, **fields)

    def _user_block(self, block: int) -> UserBatch:
        cfg = self.cfg
        lo = block * RNG_BLOCK
        m = min(lo + RNG_BLOCK, cfg.users) - lo
        rng = _rng(cfg.seed, _S_USERS, block)
        age = np.clip(np.rint(rng.normal(33.0, 12.0, m)), 13, 80).astype(np.int16)
        gender = rng.choice(len(_GENDER_P), size=m, p=_GENDER_P).astype(np.int8)
        gender[gender == len(GENDERS)] = -1
        occupation = rng.choice(len(OCCUPATIONS), size=m, p=_OCCUPATION_P).astype(np.int8)
        region = rng.choice(len(REGIONS), size=m, p=[r[2] for r in REGIONS]).astype(np.int8)
        device = rng.choice(len(SYNTH_DEVICES), size=m, p=_DEVICE_P).astype(np.int8)
        activity = np.clip(rng.lognormal(_ACT_MU, _ACT_SIGMA, m), 0.02, 50.0).astype(np.float32)
        early = rng.random(m) < 0.9
        before = self.start_us - (rng.random(m) * 730 * DAY_US).astype(np.int64) - 1
        during = self.start_us + (rng.random(m) * (self.end_us - self.start_us)).astype(np.int64)
        signup = np.where(early, before, during)
        age_bucket = np.searchsorted(np.array([18, 25, 35, 50]), age, side="right")
        group = age_bucket * (len(GENDERS) + 1) + np.where(gender < 0, len(GENDERS), gender)
        alpha = cfg.affinity_concentration * np.exp(self.group_tilt[group])
        g = rng.standard_gamma(alpha) + 1e-12
        affinity = (g / g.sum(axis=1, keepdims=True)).astype(np.float32)
        latent = _blend(
            affinity.astype(np.float64) @ self.centroids,
            rng.standard_normal((m, cfg.latent_dim)),
            0.6,
            self.latent_scale,
        )
        return UserBatch(
            start=lo, latent=latent, affinity=affinity, activity=activity, age=age, gender=gender,
            occupation=occupation, region=region, device=device, signup_us=signup.astype(np.int64),
        )  # fmt: skip

    # ------------------------------------------------------------------ events
    def events(self, users: UserBatch, day: int) -> EventBatch:
        """Impressions (with outcomes) of ``users`` on simulated day ``day``.

        Args:
            users: A block-aligned batch from :meth:`users`.
            day: Day index, 0 = first day of the window.

        Returns:
            The events, sorted by timestamp, and the click model's probability of each.
        """
        cfg = self.cfg
        day_start = self.start_us + day * DAY_US
        day_end = day_start + DAY_US
        n_slate = cfg.slate_size
        base_slates = max(cfg.impressions_per_user_day / n_slate - 1.0, 0.0)
        act_rel = users.activity.astype(np.float64) / self.mean_activity
        p_active = np.minimum(0.98, cfg.daily_active_rate * act_rel)
        lam_slates = base_slates * np.sqrt(np.clip(act_rel, 0.2, 8.0))
        eligible = users.signup_us <= day_start

        # ---- per-block draws (the only randomness; keyed by (day, block))
        sl_cnt, se_cnt, se_u, sl_u, im_u = [], [], [], [], []
        first_block = users.start // RNG_BLOCK
        for b in range(first_block, -(-(users.start + users.n) // RNG_BLOCK)):
            lo = b * RNG_BLOCK - users.start
            hi = min(lo + RNG_BLOCK, users.n)
            rng = _rng(cfg.seed, _S_EVENTS, day, b)
            m = hi - lo
            u_active = rng.random(m)
            extra_slates = rng.poisson(lam_slates[lo:hi])
            extra_sessions = rng.poisson(cfg.extra_sessions_mean, m)
            active = (u_active < p_active[lo:hi]) & eligible[lo:hi]
            n_slates = np.where(active, 1 + extra_slates, 0)
            n_sess = np.where(active, np.minimum(n_slates, 1 + extra_sessions), 0)
            sl_cnt.append(n_slates)
            se_cnt.append(n_sess)
            se_u.append(rng.random((int(n_sess.sum()), 4)))
            sl_u.append(rng.random(int(n_slates.sum())))
            im_u.append(rng.random((int(n_slates.sum()) * n_slate, 6)))
        slates_per_user = np.concatenate(sl_cnt).astype(np.int64)
        sess_per_user = np.concatenate(se_cnt).astype(np.int64)
        sess_u = np.concatenate(se_u)
        slate_u = np.concatenate(sl_u)
        imp_u = np.concatenate(im_u)

        # ---- sessions: start time on the local daily cycle, device
        sess_user = np.repeat(np.arange(users.n), sess_per_user)
        local_hour = np.minimum(np.searchsorted(self.hour_cum, sess_u[:, 0], side="right"), 23)
        utc_hour = (local_hour - self.region_offset_h[users.region[sess_user]]) % 24
        sess_start = day_start + utc_hour * HOUR_US + (sess_u[:, 1] * HOUR_US).astype(np.int64)
        sess_start = np.minimum(sess_start, day_end - _MAX_SESSION_US - SECOND_US)
        n_dev = len(SYNTH_DEVICES)
        other_device = np.minimum((sess_u[:, 3] * n_dev).astype(np.int64), n_dev - 1)
        sess_device = np.where(sess_u[:, 2] < 0.75, users.device[sess_user], other_device)
        sess_first = np.cumsum(sess_per_user) - sess_per_user  # first session row of each user
        sess_k = np.arange(len(sess_user)) - sess_first[sess_user]

        # ---- slates: round-robin over the user's sessions
        slate_user = np.repeat(np.arange(users.n), slates_per_user)
        slate_first = np.cumsum(slates_per_user) - slates_per_user
        slate_j = np.arange(len(slate_user)) - slate_first[slate_user]
        n_sess_u = np.maximum(sess_per_user[slate_user], 1)
        slate_sess = sess_first[slate_user] + slate_j % n_sess_u
        offset = np.minimum((slate_j // n_sess_u) * _SESSION_SLATE_GAP_US, _MAX_SESSION_US - 20 * SECOND_US)
        slate_t = sess_start[slate_sess] + offset + (slate_u * 20 * SECOND_US).astype(np.int64)

        # ---- impressions: candidates from the three sources
        n_imp = len(slate_user) * n_slate
        imp_slate = np.repeat(np.arange(len(slate_user)), n_slate)
        imp_user = slate_user[imp_slate]
        t = slate_t[imp_slate]
        src = np.searchsorted(self.mix_cum, imp_u[:, 0], side="right")
        item = np.zeros(n_imp, dtype=np.int64)
        ci = self.candidates
        m_pop = src == 0
        m_aff = src == 1
        m_new = src >= 2
        item[m_pop] = ci.popular(imp_u[m_pop, 1], t[m_pop])
        if m_aff.any():
            aff_cum = np.cumsum(users.affinity.astype(np.float64), axis=1)
            aff_cum /= aff_cum[:, -1:]
            rows = aff_cum[imp_user[m_aff]]
            cat = np.minimum((imp_u[m_aff, 2][:, None] >= rows).sum(axis=1), cfg.n_categories - 1)
            item[m_aff] = ci.affine(cat.astype(np.int64), imp_u[m_aff, 1], t[m_aff])
        window = int(cfg.fresh_window_days * DAY_US)
        item[m_new] = ci.fresh(imp_u[m_new, 1], t[m_new], window, imp_u[m_new, 2])

        # ---- drop duplicates within a slate, renumber positions
        _, first = np.unique(imp_slate * np.int64(cfg.items) + item, return_index=True)
        keep = np.sort(first)
        imp_slate, imp_user, item = imp_slate[keep], imp_user[keep], item[keep]
        t, imp_u = t[keep], imp_u[keep]
        position = np.arange(len(keep)) - np.searchsorted(imp_slate, imp_slate, side="left")

        # ---- the click model (the same functions as the simulator)
        it = self.items
        dot, cat_aff = pair_terms(
            users.latent, users.affinity, imp_user, it.latent, it.primary, it.secondary, item
        )
        age_days = (t - it.published_us[item]) / DAY_US
        prob = click_probability(cfg.click, dot, cat_aff, np.log(it.popularity[item]), age_days, position)
        outcome, watch = sample_outcomes(cfg.click, prob, dot, imp_u[:, 3], imp_u[:, 4], imp_u[:, 5])

        # ---- ids and frame, sorted by time
        user_first = np.searchsorted(imp_user, imp_user, side="left")
        n_in_day = np.arange(len(imp_user)) - user_first
        order = np.lexsort((n_in_day, imp_user, t))
        uid = users.user_id[imp_user][order]
        stamp = (self.cfg.start + timedelta(days=day)).strftime("%Y%m%d")
        prefix = f"syn{cfg.seed}-{stamp}-u"
        sess_of_imp = slate_sess[imp_slate][order]
        frame = pd.DataFrame(
            {
                "event_id": _arrow_series(_join_ids(prefix, uid, "-", n_in_day[order])),
                "user_id": uid,
                "item_id": it.item_id[item][order],
                "event_type": _arrow_series(_take_strings(OUTCOME_EVENT_TYPES, outcome[order])),
                "label": (outcome[order] >= EV_CLICK).astype(np.int8),
                "timestamp": _us_to_series(t[order]),
                "session_id": _arrow_series(_join_ids(prefix, uid, "-s", sess_k[sess_of_imp])),
                "device": _arrow_series(_take_strings(SYNTH_DEVICES, sess_device[sess_of_imp])),
                "position": position[order].astype(np.int16),
                "watch_fraction": watch[order],
            }
        )
        return EventBatch(frame=frame, click_probability=prob[order])


_ACT_MU, _ACT_SIGMA = -0.4, 0.9
_USER_FIELDS = (
    "latent", "affinity", "activity", "age", "gender", "occupation", "region", "device", "signup_us",
)  # fmt: skip


def _join_ids(prefix: str, user_id: I64, sep: str, n: IntArr) -> pa.Array:
    users = pc.cast(pa.array(np.asarray(user_id, dtype=np.int64)), pa.string())
    nums = pc.cast(pa.array(np.asarray(n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), users, pa.scalar(sep), nums, "")


def _take_strings(vocab: tuple[str, ...], codes: IntArr) -> pa.Array:
    return pa.array(vocab, type=pa.string()).take(pa.array(np.asarray(codes, dtype=np.int64)))


# --------------------------------------------------------------------------------- writing
def _holds_data(layout: DataLayout) -> bool:
    has_events = layout.events.is_dir() and any(layout.events.rglob("*.parquet"))
    return has_events or layout.users.exists() or layout.items.exists() or layout.truth.exists()


def _clear_synthetic(layout: DataLayout) -> None:
    params = layout.truth / "params.json"
    if not params.is_file():
        raise DataError(
            f"{layout.root} holds data that was not generated by the synthetic world (no "
            f"{params.relative_to(layout.root)}); refusing to delete it: use an empty --data-dir"
        )
    for path in (layout.events, layout.truth):
        if path.exists():
            shutil.rmtree(path)
    for path in (layout.users, layout.items):
        path.unlink(missing_ok=True)


def _write_params(layout: DataLayout, gen: WorldGenerator, counts: dict[str, Any] | None) -> None:
    cfg = gen.cfg
    payload = {
        "format": TRUTH_FORMAT,
        "complete": counts is not None,
        "config": cfg.model_dump(mode="json"),
        "click_model": cfg.click.model_dump(mode="json"),
        "categories": gen.categories,
        "window": {"start": cfg.start.isoformat(), "end": cfg.end.isoformat()},
        "rng_block": RNG_BLOCK,
        "id_base": 1,
        "counts": counts or {},
        "files": {
            "items": "items.npz",
            "users_latent": "users_latent.npy",
            "users_affinity": "users_affinity.npy",
            "users_activity": "users_activity.npy",
        },
    }
    tmp = layout.truth / "params.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(layout.truth / "params.json")


def synthesize(
    cfg: SynthConfig,
    data_dir: str | Path,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic world into a data directory.

    Writes items and users through :class:`~streamrec.data.store.DataStore`, then events chunk
    by chunk (``append_events(..., assume_new=True)``: ids are fresh by construction), and the
    ground truth under ``truth/``. Memory is bounded by one chunk of events plus the user and
    item tables, whatever the number of days.

    Args:
        cfg: The world's configuration.
        data_dir: Target data directory; must not hold data yet.
        progress: Show a tqdm progress bar over chunks on stderr.
        overwrite: Delete a previous synthetic world in ``data_dir`` first (refused when the
            data there was not generated by this module).

    Returns:
        Counts: ``{"users", "items", "events", "positives", "days", "seconds"}``.

    Raises:
        DataError: ``data_dir`` already holds data and ``overwrite`` is false (or the data there
            is not synthetic).
    """
    t0 = time.perf_counter()
    store = DataStore(data_dir)
    layout = store.layout
    if _holds_data(layout):
        if not overwrite:
            raise DataError(
                f"{layout.root} already holds data (events, users, items or truth): use an empty "
                f"--data-dir, or pass --overwrite (overwrite=True) to replace a previous synthetic world"
            )
        _clear_synthetic(layout)
    layout.ensure()
    layout.truth.mkdir(parents=True, exist_ok=True)
    gen = WorldGenerator(cfg)
    _write_params(layout, gen, None)  # marks the directory as synthetic even if interrupted

    items = gen.items
    items.save(layout.truth / "items.npz")
    store.upsert_items(gen.items_frame())

    chunks = gen.chunks()
    n, d, c = cfg.users, cfg.latent_dim, cfg.n_categories
    mm_latent = np.lib.format.open_memmap(layout.truth / "users_latent.npy", "w+", np.float32, (n, d))
    mm_aff = np.lib.format.open_memmap(layout.truth / "users_affinity.npy", "w+", np.float32, (n, c))
    mm_act = np.lib.format.open_memmap(layout.truth / "users_activity.npy", "w+", np.float32, (n,))
    frames = []
    for lo, hi in _bar(chunks, progress, "synth users"):
        ub = gen.users(lo, hi)
        mm_latent[lo:hi], mm_aff[lo:hi], mm_act[lo:hi] = ub.latent, ub.affinity, ub.activity
        frames.append(ub.frame())
    for mm in (mm_latent, mm_aff, mm_act):
        mm.flush()
    del mm_latent, mm_aff, mm_act
    store.upsert_users(pd.concat(frames, ignore_index=True))
    del frames

    n_events = n_pos = 0
    for lo, hi in _bar(chunks, progress, "synth events"):
        ub = gen.users(lo, hi)
        for day in range(cfg.days):
            batch = gen.events(ub, day)
            if len(batch.frame):
                store.append_events(batch.frame, assume_new=True)
            n_events += len(batch.frame)
            n_pos += int(batch.frame["label"].sum())
    counts: dict[str, Any] = {
        "users": cfg.users,
        "items": cfg.items,
        "events": n_events,
        "positives": n_pos,
        "days": cfg.days,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_params(layout, gen, counts)
    run = {"synth": cfg.model_dump(mode="json"), "counts": counts}
    record_config(layout.reports, f"synth-{utc_stamp()}", run)
    return counts


def _bar(chunks: list[tuple[int, int]], progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    yield from tqdm(chunks, desc=desc, unit="chunk", file=sys.stderr, disable=not progress, leave=False)
