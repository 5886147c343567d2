"""Hyper-parameters of the baselines, and the search grids that tune them.

Kept apart from :mod:`streamrec.evaluation.baselines` so that loading a training configuration
(which validates the grids) does not import the ``implicit`` library.

A grid maps hyper-parameter names to candidate values, ``{"factors": [32, 64], "alpha": [1, 10]}``;
its points are the cartesian product (:func:`grid_points`). :func:`validate_grid` checks names and
values against the baseline's config model, so a typo is a configuration error at load time.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError

from streamrec.config import StrictModel, format_validation_error
from streamrec.errors import ConfigError

#: Every baseline the evaluation knows, by the name used in configs and result tables.
BaselineName = Literal["most_popular", "item_knn", "als", "bpr", "ease"]
BASELINE_NAMES: tuple[str, ...] = get_args(BaselineName)

#: Bootstrap interval methods (``scipy.stats.bootstrap``); see :mod:`streamrec.evaluation.intervals`.
IntervalMethod = Literal["percentile", "basic", "BCa"]

#: Parameters that are not hyper-parameters (runtime or guards): never searched by a grid.
NOT_TUNABLE: frozenset[str] = frozenset({"num_threads", "seed", "max_items", "block"})


class MostPopularConfig(StrictModel):
    """:class:`~streamrec.evaluation.baselines.MostPopular` has no hyper-parameters."""


class ItemKNNConfig(StrictModel):
    """Hyper-parameters of :class:`~streamrec.evaluation.baselines.ItemKNN`.

    Attributes:
        neighbours: Neighbours kept per item.
        shrink: Added to the cosine denominator (damps similarities built on few co-occurrences).
        block: Items per similarity block (memory ``block * n_items`` floats; not tuned).
    """

    neighbours: int = Field(100, ge=1)
    shrink: float = Field(0.0, ge=0)
    block: int = Field(2048, ge=1)


class ALSConfig(StrictModel):
    """Hyper-parameters of :class:`~streamrec.evaluation.baselines.ALS`.

    Attributes:
        factors: Latent dimension.
        regularization: L2 weight.
        alpha: Confidence scale: an interaction of value ``r`` gets confidence ``1 + alpha * r``.
        iterations: ALS sweeps.
        num_threads: Worker threads (0 = all cores; use 1 in tests on shared machines).
        seed: Random seed for reproducible factors.
    """

    factors: int = 32
    regularization: float = 0.1
    alpha: float = 1.0
    iterations: int = 15
    num_threads: int = 0
    seed: int = 42


class BPRConfig(StrictModel):
    """Hyper-parameters of :class:`~streamrec.evaluation.baselines.BPR`.

    Attributes:
        factors: Latent dimension (``implicit`` adds one bias column).
        learning_rate: SGD step.
        regularization: L2 weight.
        iterations: Epochs.
        num_threads: Worker threads (0 = all cores).
        seed: Random seed.
    """

    factors: int = 32
    learning_rate: float = 0.01
    regularization: float = 0.01
    iterations: int = 50
    num_threads: int = 0
    seed: int = 42


class EASEConfig(StrictModel):
    """Hyper-parameters of :class:`~streamrec.evaluation.baselines.EASE`.

    Attributes:
        l2: Ridge weight ``lambda`` added to the Gram matrix's diagonal.
        max_items: Refuse catalogues larger than this: EASE holds two dense
            ``n_items x n_items`` float64 matrices (16 bytes * n_items^2; 6.4 GB at 20,000 items)
            and inverts one (cubic time). Not tuned.
    """

    l2: float = Field(500.0, gt=0)
    max_items: int = Field(20_000, ge=1)


#: The config model of each baseline.
BASELINE_CONFIGS: dict[str, type[StrictModel]] = {
    "most_popular": MostPopularConfig,
    "item_knn": ItemKNNConfig,
    "als": ALSConfig,
    "bpr": BPRConfig,
    "ease": EASEConfig,
}

#: Small default grids (58 fits in all, about 25 s on ML-100K with one thread on the 2-core box):
#: each holds its baseline's default and a step either side of the settings that matter most.
DEFAULT_GRIDS: dict[BaselineName, dict[str, list[Any]]] = {
    "item_knn": {"neighbours": [10, 20, 50, 100, 200], "shrink": [0.0, 10.0]},
    "als": {"factors": [16, 32, 64], "regularization": [0.1, 1.0, 10.0, 100.0], "alpha": [1.0, 5.0]},
    "bpr": {"factors": [32, 64], "learning_rate": [0.005, 0.01, 0.02], "iterations": [25, 50, 100]},
    "ease": {"l2": [10.0, 50.0, 200.0, 500.0, 1000.0, 3000.0]},
}


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a grid, in a stable order (the first name varies slowest).

    Args:
        grid: Hyper-parameter name to candidate values.

    Returns:
        One dict per point; ``[{}]`` for an empty grid (the defaults alone).
    """
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def baseline_config(name: str, params: Mapping[str, Any] | None = None) -> StrictModel:
    """The validated config of baseline ``name`` with ``params`` over its defaults.

    Raises:
        ConfigError: unknown baseline, unknown hyper-parameter or a value out of range.
    """
    if name not in BASELINE_CONFIGS:
        raise ConfigError(f"unknown baseline '{name}'; known: {', '.join(BASELINE_NAMES)}")
    try:
        return BASELINE_CONFIGS[name].model_validate(dict(params or {}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"the {name} baseline's parameters")) from None


def validate_grid(name: str, grid: Mapping[str, Sequence[Any]]) -> None:
    """Check that every name of ``grid`` is a tunable hyper-parameter of ``name``, every value valid.

    Raises:
        ConfigError: naming the baseline and the offending key or value.
    """
    fields = type(baseline_config(name)).model_fields
    for key, values in grid.items():
        if key not in fields or key in NOT_TUNABLE:
            tunable = sorted(set(fields) - NOT_TUNABLE)
            raise ConfigError(
                f"'{key}' is not a tunable hyper-parameter of the {name} baseline; "
                f"tunable: {', '.join(tunable) or 'none'}"
            )
        if len(values) == 0:
            raise ConfigError(
                f"the {name} grid lists no value for '{key}'; give at least one or drop the key"
            )
        for v in values:
            baseline_config(name, {key: v})
