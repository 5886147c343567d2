"""The synthetic world's click model: who clicks, skips and completes what, at which position.

The ground truth behind the synthetic world (:mod:`streamrec.data.synth` samples its events with
it) and behind the user simulator (:mod:`streamrec.data.simulator`); the formula is in
:mod:`streamrec.data.synth`'s docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from streamrec.config import StrictModel
from streamrec.data.schema import EVENT_TYPES

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
IntArr = npt.NDArray[np.integer[Any]]

#: Outcome codes of an impression.
EV_IMPRESSION, EV_SKIP, EV_CLICK, EV_COMPLETE = 0, 1, 2, 3
#: The event type each outcome code is logged as (index = code): the synthetic event log's
#: ``event_type`` and the user simulator's, all of them :data:`~streamrec.data.schema.EVENT_TYPES`.
OUTCOME_EVENT_TYPES: tuple[str, ...] = ("impression", "skip", "click", "complete")
if not set(OUTCOME_EVENT_TYPES) <= set(EVENT_TYPES):  # pragma: no cover
    raise RuntimeError(f"click_model.OUTCOME_EVENT_TYPES {OUTCOME_EVENT_TYPES} is not within {EVENT_TYPES}")


class ClickModelParams(StrictModel):
    """Parameters of the click model (see the module docstring for the formula).

    Attributes:
        bias: Intercept of the click logit.
        w_aff: Weight of the latent match ``<user, item>`` (about N(0, 1) over random pairs).
        w_cat: Weight of the category affinity (``n_categories`` x the user's mean affinity for
            the item's categories; 1 = indifferent).
        w_pop: Weight of ``log(popularity)`` (popularity has mean 1 over the catalogue).
        w_fresh: Weight of freshness ``exp(-age_days / fresh_tau_days)``.
        fresh_tau_days: Decay time of freshness, in days.
        position_bias: Logit penalty per ``log2(1 + position)``.
        watch_bias: Intercept of the mean watch fraction's logit, given a click.
        watch_w_aff: Weight of the latent match in the mean watch fraction's logit.
        complete_threshold: Watch fraction from which a click counts as a completion.
        skip_rate: Largest probability that a non-clicked impression is explicitly skipped.
    """

    bias: float = -3.9
    w_aff: float = 0.9
    w_cat: float = 0.12
    w_pop: float = 0.2
    w_fresh: float = 1.0
    fresh_tau_days: float = Field(default=2.0, gt=0)
    position_bias: float = Field(default=0.35, ge=0)
    watch_bias: float = 0.2
    watch_w_aff: float = 0.6
    complete_threshold: float = Field(default=0.9, gt=0, le=1)
    skip_rate: float = Field(default=0.1, ge=0, le=1)


def sigmoid(x: npt.ArrayLike) -> F64:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def pair_terms(
    user_latent: F32,
    user_affinity: F32,
    user_rows: IntArr,
    item_latent: F32,
    item_primary: IntArr,
    item_secondary: IntArr,
    item_rows: IntArr,
) -> tuple[F64, F64]:
    """Latent match and category affinity of (user, item) pairs.

    Args:
        user_latent: ``(U, d)`` user latent vectors.
        user_affinity: ``(U, C)`` user category affinities (rows sum to 1).
        user_rows: ``(n,)`` row of ``user_latent`` / ``user_affinity`` of each pair.
        item_latent: ``(I, d)`` item latent vectors.
        item_primary: ``(I,)`` primary category index of each item.
        item_secondary: ``(I,)`` secondary category index, -1 where none.
        item_rows: ``(n,)`` row of the item arrays of each pair.

    Returns:
        ``(dot, category_affinity)``, each ``(n,)`` float64. ``category_affinity`` is
        ``C`` x the mean affinity of the user for the item's categories (1 = indifferent).
        The dot product is accumulated dimension by dimension, so every pair's value is
        bit-identical however the pairs are batched.
    """
    user_rows = np.asarray(user_rows)
    item_rows = np.asarray(item_rows)
    u = user_latent[user_rows]
    v = item_latent[item_rows]
    dot = np.zeros(len(user_rows), dtype=np.float64)
    for k in range(u.shape[1]):
        dot += u[:, k].astype(np.float64) * v[:, k]
    n_cat = user_affinity.shape[1]
    prim = item_primary[item_rows].astype(np.int64)
    sec = item_secondary[item_rows].astype(np.int64)
    has2 = sec >= 0
    a1 = user_affinity[user_rows, prim].astype(np.float64)
    a2 = user_affinity[user_rows, np.where(has2, sec, prim)].astype(np.float64)
    cat = n_cat * np.where(has2, 0.5 * (a1 + a2), a1)
    return dot, cat


def click_probability(
    params: ClickModelParams,
    dot: npt.ArrayLike,
    category_affinity: npt.ArrayLike,
    log_popularity: npt.ArrayLike,
    age_days: npt.ArrayLike,
    positions: npt.ArrayLike,
) -> F64:
    """Probability of a click under the click model (broadcasting over its arguments).

    Args:
        params: Click-model parameters.
        dot: Latent match ``<user, item>``.
        category_affinity: See :func:`pair_terms`.
        log_popularity: ``log`` of the item's popularity (mean-1 normalised).
        age_days: Age of the item when shown, in days (negative ages count as 0).
        positions: 0-based position in the slate.

    Returns:
        Click probabilities in (0, 1), float64.
    """
    fresh = np.exp(-np.maximum(np.asarray(age_days, dtype=np.float64), 0.0) / params.fresh_tau_days)
    logit = (
        params.bias
        + params.w_aff * np.asarray(dot, dtype=np.float64)
        + params.w_cat * np.asarray(category_affinity, dtype=np.float64)
        + params.w_pop * np.asarray(log_popularity, dtype=np.float64)
        + params.w_fresh * fresh
        - params.position_bias * np.log2(1.0 + np.asarray(positions, dtype=np.float64))
    )
    return sigmoid(logit)


def sample_outcomes(
    params: ClickModelParams,
    probability: F64,
    dot: F64,
    u_click: F64,
    u_watch: F64,
    u_skip: F64,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Turn click probabilities and uniforms into outcomes.

    Args:
        params: Click-model parameters.
        probability: Click probability of each impression.
        dot: Latent match of each impression (drives watch fraction and skips).
        u_click: Uniforms in [0, 1) deciding the clicks.
        u_watch: Uniforms deciding the watch fraction of clicks.
        u_skip: Uniforms deciding explicit skips of non-clicks.

    Returns:
        ``(outcome, watch_fraction)``: outcome codes (0 impression, 1 skip, 2 click,
        3 complete; index into ``("impression", "skip", "click", "complete")``) and the watch
        fraction (NaN where not clicked).
    """
    clicked = u_click < probability
    mean_watch = sigmoid(params.watch_bias + params.watch_w_aff * dot)
    watch = np.clip(np.power(u_watch, (1.0 - mean_watch) / mean_watch), 0.01, 1.0)
    skipped = ~clicked & (u_skip < params.skip_rate * sigmoid(-2.0 * dot))
    outcome = np.full(len(probability), EV_IMPRESSION, dtype=np.int8)
    outcome[skipped] = EV_SKIP
    outcome[clicked] = np.where(watch[clicked] >= params.complete_threshold, EV_COMPLETE, EV_CLICK)
    wf = np.where(clicked, watch, np.nan).astype(np.float32)
    return outcome, wf


# ----------------------------------------------------------------------------- world objects
