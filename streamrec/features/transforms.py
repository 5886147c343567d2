"""Feature arithmetic shared by the batch pipeline and the streaming path.

The batch build (:mod:`streamrec.features.pipeline`) and the push path
(:meth:`streamrec.features.client.FeatureClient.push_interactions`) compute the streaming
features with these same functions, so a value built from a day of events equals the value
reached by pushing those events one by one (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from streamrec.features.spec import (
    CATEGORY_PRIOR_STRENGTH,
    ENGAGED_EVENT_TYPES,
    RECENT_N,
    TRENDING_HALF_LIFE_H,
)

#: Decay rate of the trending score, 1/hour.
TRENDING_LAMBDA = math.log(2.0) / TRENDING_HALF_LIFE_H
_EPOCH = pd.Timestamp(0, tz="UTC")


def epoch_seconds(ts: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Unix seconds (float64, sub-second precision kept) of tz-aware timestamps."""
    s = pd.to_datetime(ts, utc=True)
    return np.asarray((s - _EPOCH) / pd.Timedelta(seconds=1), dtype=np.float64)


def is_interaction(event_type: pd.Series | np.ndarray, label: pd.Series | np.ndarray) -> np.ndarray:
    """An interaction is any event but an impression, or an impression engaged with (label 1)."""
    et = np.asarray(event_type, dtype=object)
    lb = np.asarray(label)
    return np.asarray((et != "impression") | (lb == 1), dtype=bool)


def derive_label(event_type: str, rating: float | None = None) -> int:
    """Engagement label of an event that carries none (API events): click/complete, or rating >= 4."""
    if event_type in ENGAGED_EVENT_TYPES:
        return 1
    if event_type == "rating" and rating is not None:
        return int(rating >= 4.0)
    return 0


def trending_from_events(event_seconds: np.ndarray, at_seconds: float) -> float:
    """Trending score at ``at_seconds`` of positive events at ``event_seconds`` (all earlier).

    ``score = lambda * sum(exp(-lambda * age_hours))`` — an exponentially weighted rate of
    positive events, in events per hour, with half-life :data:`TRENDING_HALF_LIFE_H`.
    """
    age_h = (at_seconds - np.asarray(event_seconds, dtype=np.float64)) / 3600.0
    return float(TRENDING_LAMBDA * np.exp(-TRENDING_LAMBDA * age_h).sum())


def trending_update(
    score: float, updated_at: float, event_at: float, weight: float = 1.0
) -> tuple[float, float]:
    """Add one positive event to a trending score; returns ``(score, updated_at)``.

    An event later than ``updated_at`` decays the old score to the event time first; an earlier
    (out-of-order) event is decayed to ``updated_at`` instead, so the result is the same whatever
    the arrival order.
    """
    if event_at >= updated_at:
        decayed = score * math.exp(-TRENDING_LAMBDA * (event_at - updated_at) / 3600.0)
        return decayed + TRENDING_LAMBDA * weight, event_at
    return score + TRENDING_LAMBDA * weight * math.exp(
        -TRENDING_LAMBDA * (updated_at - event_at) / 3600.0
    ), updated_at


def decay_trending(
    score: float | np.ndarray, updated_at: float | np.ndarray, now: float
) -> float | np.ndarray:
    """A stored trending score decayed from its ``updated_at`` (Unix s) to ``now`` (Unix s)."""
    age_h = np.maximum(0.0, now - np.asarray(updated_at, dtype=np.float64)) / 3600.0
    out = np.asarray(score, dtype=np.float64) * np.exp(-TRENDING_LAMBDA * age_h)
    return float(out) if np.ndim(out) == 0 else out


def merge_recent(
    items: Sequence[int],
    types: Sequence[str],
    stamps: Sequence[int],
    new_items: Sequence[int],
    new_types: Sequence[str],
    new_stamps: Sequence[int],
    n: int = RECENT_N,
) -> tuple[list[int], list[str], list[int]]:
    """Merge new interactions into a most-recent-first list, keeping the ``n`` latest.

    Newer first; among equal timestamps, the new ones (and, within them, the later in the
    input) come first — the order the batch build produces for events stored in time order.
    """
    old = list(zip(stamps, items, types, strict=True))
    new = list(zip(new_stamps, new_items, new_types, strict=True))[::-1]
    merged = sorted(new + old, key=lambda r: -r[0])[:n]  # sorted() is stable
    return [int(r[1]) for r in merged], [str(r[2]) for r in merged], [int(r[0]) for r in merged]


def add_category_positives(
    prefs: Sequence[float] | np.ndarray,
    positives: float,
    item_categories: Sequence[Sequence[str]],
    vocab: Sequence[str],
    prior_strength: float = CATEGORY_PRIOR_STRENGTH,
) -> tuple[np.ndarray, float]:
    """Add positive events to a user's category preference shares; returns ``(prefs, positives)``.

    The shares are posterior means ``(n_g + s * pi_g) / (N + s)`` with ``N`` the ``positives``
    behind them, so a positive on an item with categories ``C`` (those in ``vocab``) becomes
    ``(prefs * (N + s) + e_C / |C|) / (N + s + 1)`` without knowing the prior ``pi`` or the per-
    category counts: the batch build's formula applied to one more event. Items without a
    category in ``vocab`` are skipped, as the build skips them.

    Args:
        prefs: Current shares, aligned with ``vocab`` (a cold user's are the population prior).
        positives: Positives behind ``prefs`` (0 for a cold user).
        item_categories: The categories of each new positive's item.
        vocab: The category vocabulary of the build.
        prior_strength: ``s``, the prior's pseudo-count.

    Returns:
        The updated float32 shares and positives.
    """
    index = {name: i for i, name in enumerate(vocab)}
    mass = np.asarray(prefs, dtype=np.float64) * (positives + prior_strength)
    total = float(positives)
    for cats in item_categories:
        cols = sorted({index[c] for c in cats if c in index})
        if not cols:
            continue
        mass[cols] += 1.0 / len(cols)
        total += 1.0
    return (mass / (total + prior_strength)).astype(np.float32), total
