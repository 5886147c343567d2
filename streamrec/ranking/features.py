"""The ranker's input features: ONE implementation used by training, evaluation and serving.

Training calls :meth:`RankerFeatures.build` on many (user, item) rows whose user and item
feature values come from the feature store's point-in-time joins; serving calls it on one user's
~500 candidates with the user's online features and the in-memory item table. Same code, same
column order, so there is no training-serving skew by construction.

Dense columns (float32), in order:

* user numeric features (:data:`USER_DENSE`, from the feature store spec);
* item numeric features (:data:`~streamrec.features.item_table.DENSE_FEATURES`);
* cross features: the user's category preference for the item's categories, log item age in
  days at request time, the two-tower score, the CF score, each retrieval source's normalised
  score (0 when the source did not return the item), and the number of sources that did;
* context: hour of day as sin/cos.

Sparse columns (int64): item row, primary category, creator, device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from streamrec.data.schema import DEVICES
from streamrec.features.item_table import DENSE_FEATURES, ItemFeatureTable
from streamrec.features.spec import views_for
from streamrec.retrieval.base import csr_rows_dot

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: Version of the ranker input layout (MAJOR.MINOR); bump MAJOR when columns change meaning.
FEATURE_SCHEMA_VERSION = "1.0"

#: User numeric features fed to the ranker (timestamps and ids excluded).
USER_DENSE: tuple[str, ...] = tuple(
    f.name
    for v in views_for("user", ("batch", "stream"))
    for f in v.features
    if f.dtype in ("int64", "float32") and f.model_input and not f.name.endswith("_at")
)
DEVICE_INDEX = {d: i for i, d in enumerate(DEVICES)}
#: Sparse inputs of bounded cardinality that the request log records (as ids) next to the dense
#: ones, and whose training frequencies the manifest keeps for the skew check.
SKEW_CATEGORICAL: tuple[str, ...] = ("primary_category", "device")


def user_dense_matrix(features: pd.DataFrame | dict[str, Any]) -> F32:
    """The :data:`USER_DENSE` columns of a frame (rows) or one user's feature dict (1 row)."""
    if isinstance(features, dict):
        return np.asarray([[float(features.get(n, 0.0) or 0.0) for n in USER_DENSE]], dtype=np.float32)
    cols = [pd.to_numeric(features[n], errors="coerce").fillna(0.0).to_numpy(np.float32) for n in USER_DENSE]
    return np.ascontiguousarray(np.stack(cols, axis=1)) if cols else np.zeros((len(features), 0), np.float32)


def category_pref_matrix(values: pd.Series | list[object], width: int) -> F32:
    """Stack per-user ``category_prefs`` vectors into ``(n, width)`` (zeros where missing)."""
    out = np.zeros((len(values), width), dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None and np.size(v):
            a = np.asarray(v, dtype=np.float32).ravel()[:width]
            out[i, : a.size] = a
    return out


@dataclass(frozen=True)
class Layout:
    """Column names of the ranker's inputs (saved with the model)."""

    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    cardinalities: tuple[int, ...]


class RankerFeatures:
    """Builds ranker inputs against one item table.

    Args:
        table: The item feature table (row = item index used everywhere in the funnel).
        source_names: Retrieval sources, in the order of the per-source score columns.
    """

    def __init__(self, table: ItemFeatureTable, source_names: tuple[str, ...]) -> None:
        self.table = table
        self.source_names = source_names
        n, c = len(table), len(table.category_vocab)
        cats = table.category_matrix()
        counts = np.maximum(np.asarray(cats.sum(axis=1)).ravel(), 1.0)
        self.item_categories = sp.csr_matrix(sp.diags(1.0 / counts) @ cats, dtype=np.float32)
        self.n_categories = c
        self.layout = Layout(
            dense=(
                *USER_DENSE,
                *DENSE_FEATURES,
                "x_category_pref",
                "x_log_age_days",
                "x_two_tower",
                "x_cf",
                *(f"x_src_{s}" for s in source_names),
                "x_n_sources",
                "ctx_hour_sin",
                "ctx_hour_cos",
            ),
            sparse=("item", "primary_category", "creator", "device"),
            cardinalities=(n, c, max(len(table.creator_vocab), 1), len(DEVICES)),
        )

    def with_table(self, table: ItemFeatureTable) -> RankerFeatures:
        """The same layout (the trained model's) over ``table``, e.g. with items appended.

        The sparse ``item`` id of a row beyond the layout's cardinality reads the model's
        unknown-item embedding.
        """
        out = copy.copy(self)
        out.table = table
        same = self.table.categories_indices is table.categories_indices
        if same and self.table.categories_indptr is table.categories_indptr:
            return out  # only feature values changed (streamed engagement): categories shared
        cats = table.category_matrix()
        counts = np.maximum(np.asarray(cats.sum(axis=1)).ravel(), 1.0)
        out.item_categories = sp.csr_matrix(sp.diags(1.0 / counts) @ cats, dtype=np.float32)
        return out

    def build(
        self,
        *,
        user_dense: F32,
        category_prefs: F32,
        item_rows: I64,
        item_dense: F32,
        now: float | npt.NDArray[np.float64],
        device: int | I64,
        two_tower: F32,
        cf: F32,
        source_scores: F32,
    ) -> tuple[F32, I64]:
        """Assemble ``(dense, sparse)`` for ``n`` (user, item) rows.

        User-side arrays may have one row (broadcast to all items, the serving case).

        Args:
            user_dense: ``(n|1, len(USER_DENSE))``.
            category_prefs: ``(n|1, n_categories)`` user category preferences.
            item_rows: ``(n,)`` item table rows.
            item_dense: ``(n, len(DENSE_FEATURES))`` item numeric features.
            now: Request time(s), epoch seconds (scalar or ``(n,)``).
            device: Device index (scalar or ``(n,)``), see :data:`DEVICE_INDEX`.
            two_tower: ``(n,)`` two-tower dot products (0 when unavailable).
            cf: ``(n,)`` CF scores (0 when unavailable).
            source_scores: ``(n, n_sources)`` normalised retrieval scores (0 = not returned).
        """
        n = int(item_rows.shape[0])
        t = self.table
        if category_prefs.shape[0] == 1:  # serving: one user, ~500 items
            pref = csr_rows_dot(self.item_categories, item_rows, category_prefs[0])
        else:
            ic = self.item_categories[item_rows]
            pref = np.asarray(ic.multiply(category_prefs).sum(axis=1)).ravel()
        now_arr = np.broadcast_to(np.asarray(now, dtype=np.float64), (n,))
        pub = t.published_at[item_rows].astype(np.float64)
        age_days = np.where(pub > 0, np.maximum(now_arr - pub, 0.0) / 86400.0, 365.0)
        hour = (now_arr % 86400.0) / 3600.0
        n_src = (source_scores > 0).sum(axis=1, dtype=np.float32)
        dense = np.concatenate(
            [
                np.broadcast_to(user_dense, (n, user_dense.shape[1])),
                item_dense,
                np.stack(
                    [
                        np.asarray(pref, dtype=np.float32),
                        np.log1p(age_days).astype(np.float32),
                        two_tower.astype(np.float32, copy=False),
                        cf.astype(np.float32, copy=False),
                    ],
                    axis=1,
                ),
                source_scores.astype(np.float32, copy=False),
                n_src[:, None],
                np.stack([np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)], axis=1).astype(
                    np.float32
                ),
            ],
            axis=1,
            dtype=np.float32,
        )
        sparse = np.empty((n, 4), dtype=np.int64)
        sparse[:, 0] = item_rows
        sparse[:, 1] = t.category_id[item_rows]
        sparse[:, 2] = t.creator_id[item_rows]
        sparse[:, 3] = device
        return np.ascontiguousarray(dense), sparse
