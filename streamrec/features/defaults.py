"""Default values for missing and cold entities: one function for training and serving.

:func:`apply_defaults` is the only place a missing feature value is replaced. The training-set
builder calls it on the point-in-time frame, the online path on the one user's dict, the item
table on its columns, so a cold user looks the same to the model in training and in serving.

Literal defaults live in :mod:`streamrec.features.spec`. Defaults that depend on the data (the
population engagement rate, the category prior, the embedding width) are recorded by each
feature build in ``features/meta.json`` and read back as a :class:`DefaultContext`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd

from streamrec.features.spec import FEATURES, Derived, Feature

_LIST_NP = {"int64_list": np.int64, "float32_list": np.float32}


@dataclass
class DefaultContext:
    """Data-dependent defaults recorded by the latest build (``features/meta.json``).

    Attributes:
        values: e.g. ``engagement_rate_prior`` (float), ``category_prior`` (list of float aligned
            with ``category_vocab``), ``top_category_prior`` (str), ``item_ctr_prior`` (float),
            ``user_embedding_dim`` / ``item_embedding_dim`` (int).
    """

    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, meta_path: str | os.PathLike[str]) -> DefaultContext:
        """Read the ``defaults`` section of a ``meta.json`` (empty context if the file is absent)."""
        p = Path(meta_path)
        if not p.is_file():
            return cls()
        return cls(dict(json.loads(p.read_text()).get("defaults", {})))

    def resolve(self, default: Any) -> Any:
        """The concrete value of a spec default (literal, or :class:`~streamrec.features.spec.Derived`)."""
        if not isinstance(default, Derived):
            return default
        if default.key.startswith("zeros:"):
            width = self.values.get(default.key[6:])
            return [0.0] * int(width) if width else default.fallback
        return self.values.get(default.key, default.fallback)


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return v is pd.NA or v is pd.NaT


def _normalize(spec: Feature, v: Any) -> Any:
    """Canonical Python/numpy type of one present value."""
    dt = spec.dtype
    if dt in _LIST_NP:
        return np.asarray(v, dtype=_LIST_NP[dt])
    if dt == "string_list":
        return [str(x) for x in v]
    if dt == "int64":
        return int(v)
    if dt == "float32":
        return float(np.float32(v))
    if dt == "bool":
        return bool(v)
    return str(v)


def _default_value(spec: Feature, ctx: DefaultContext) -> Any:
    return _normalize(spec, ctx.resolve(spec.default))


@overload
def apply_defaults(
    data: pd.DataFrame,
    context: DefaultContext | None = ...,
    *,
    features: Iterable[str] | None = ...,
    counts: MutableMapping[str, int] | None = ...,
) -> pd.DataFrame: ...


@overload
def apply_defaults(  # type: ignore[overload-cannot-match]  # pandas-stubs: DataFrame vs Mapping overlap
    data: Mapping[str, Any],
    context: DefaultContext | None = ...,
    *,
    features: Iterable[str] | None = ...,
    counts: MutableMapping[str, int] | None = ...,
) -> dict[str, Any]: ...


def apply_defaults(
    data: pd.DataFrame | Mapping[str, Any],
    context: DefaultContext | None = None,
    *,
    features: Iterable[str] | None = None,
    counts: MutableMapping[str, int] | None = None,
) -> pd.DataFrame | dict[str, Any]:
    """Replace missing feature values by their defaults and normalise types.

    Works on a frame (training sets, item tables: one column per feature) or on a mapping (one
    entity's online features). Columns/keys that are not features (ids, timestamps, labels) are
    left untouched. After the call, every feature column has its spec type: ``int64``,
    ``float32``, ``bool``, ``str``; numeric lists are numpy arrays, string lists Python lists.

    Args:
        data: A frame or a mapping ``feature name -> value`` (None/NaN mean missing).
        context: Data-dependent defaults of the latest build; without it, the spec's fallbacks
            are used (e.g. an empty embedding).
        features: Features that must be present in the result (added with their defaults when
            absent); default: only those already present.
        counts: If given, ``counts[name]`` is increased by the number of values filled in.

    Returns:
        A new frame or dict; the input is not modified.
    """
    ctx = context or DefaultContext()
    wanted = list(features) if features is not None else None
    if isinstance(data, pd.DataFrame):
        return _apply_frame(data, ctx, wanted, counts)
    out = dict(data)
    names = [k for k in out if k in FEATURES]
    if wanted is not None:
        names += [n for n in wanted if n not in out]
    for name in names:
        spec = FEATURES[name]
        v = out.get(name)
        if _is_missing(v):
            out[name] = _default_value(spec, ctx)
            if counts is not None:
                counts[name] = counts.get(name, 0) + 1
        else:
            out[name] = _normalize(spec, v)
    return out


def _apply_frame(
    frame: pd.DataFrame,
    ctx: DefaultContext,
    wanted: list[str] | None,
    counts: MutableMapping[str, int] | None,
) -> pd.DataFrame:
    out = frame.copy()
    n = len(out)
    for name in wanted or []:
        if name not in out.columns:
            out[name] = pd.Series([None] * n, index=out.index, dtype=object)
    for name in [c for c in out.columns if c in FEATURES]:
        spec = FEATURES[name]
        col = out[name]
        default = ctx.resolve(spec.default)
        if spec.dtype.endswith("_list"):
            values = col.to_numpy(dtype=object)
            missing = np.fromiter((_is_missing(v) for v in values), dtype=bool, count=n)
            filled = np.empty(n, dtype=object)
            for i, v in enumerate(values):
                filled[i] = _normalize(spec, default if missing[i] else v)
            out[name] = pd.Series(filled, index=out.index, dtype=object)
        else:
            missing = col.isna().to_numpy()
            if missing.any():
                col = col.astype(object).where(~missing, default)
            if spec.dtype == "int64":
                out[name] = col.astype("int64")
            elif spec.dtype == "float32":
                out[name] = col.astype("float32")
            elif spec.dtype == "bool":
                out[name] = col.astype(bool)
            else:
                out[name] = col.astype(str).astype(object)
        if counts is not None:
            counts[name] = counts.get(name, 0) + int(missing.sum())
    return out


def normalize_value(name: str, value: Any) -> Any:
    """One feature value in its canonical type, or None when missing (no default applied).

    Used to compare values from different stores (online vs offline) on equal terms.
    """
    if _is_missing(value):
        return None
    return _normalize(FEATURES[name], value)
