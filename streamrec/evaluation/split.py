"""Temporal train/test split and raw-id <-> dense-index mapping.

Offline evaluation must not see the future: :func:`temporal_split` cuts an interactions frame at
one point in time ``T``. Everything strictly before ``T`` is training data; the test set is the
*positive* interactions at or after ``T`` of users who appear in training, on items that appear
in training (a model cannot rank an item it has never seen; those rows are counted, not hidden).

Models, metrics and retrieval sources work on dense integer indices (users ``0..U-1``, items
``0..I-1``); :class:`IdMap` converts between those and raw ids and is meant to be reused by every
component that needs the same conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from streamrec.data.ids import IdMap
from streamrec.errors import DataError, TrainingDataError

#: Columns :func:`temporal_split` needs.
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "label")


@dataclass(frozen=True)
class TemporalSplit:
    """The result of :func:`temporal_split`.

    Attributes:
        train: Interactions strictly before ``cutoff`` (all labels), with ``user_idx``/``item_idx``.
        test: Positive interactions at or after ``cutoff`` of known users on known items, one row
            per (user, item), excluding items the user already had in training; with
            ``user_idx``/``item_idx``.
        cutoff: The cut point, in the type of the ``timestamp`` column.
        users: Map of the users seen in training.
        items: Map of the items seen in training.
        stats: Row counts of what was kept and dropped, for the run report.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    cutoff: Any
    users: IdMap
    items: IdMap
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        """Number of users in the training window."""
        return len(self.users)

    @property
    def n_items(self) -> int:
        """Number of items in the training window."""
        return len(self.items)

    def train_matrix(self, positives_only: bool = True) -> sp.csr_matrix:
        """The binary user x item interaction matrix of the training window.

        Args:
            positives_only: Keep only rows with ``label > 0`` (the usual implicit-feedback
                matrix); ``False`` keeps every interaction.

        Returns:
            A ``(n_users, n_items)`` float32 CSR matrix with 1.0 where the user interacted.
        """
        df = self.train[self.train["label"] > 0] if positives_only else self.train
        return interaction_matrix(
            df["user_idx"].to_numpy(), df["item_idx"].to_numpy(), self.n_users, self.n_items
        )

    def test_matrix(self) -> sp.csr_matrix:
        """The binary user x item matrix of test positives (same shape as the train matrix)."""
        return interaction_matrix(
            self.test["user_idx"].to_numpy(), self.test["item_idx"].to_numpy(), self.n_users, self.n_items
        )


def interaction_matrix(
    user_idx: npt.ArrayLike, item_idx: npt.ArrayLike, n_users: int, n_items: int
) -> sp.csr_matrix:
    """Binary user x item CSR matrix from index pairs (duplicates collapse to 1.0).

    Args:
        user_idx: Dense user indices.
        item_idx: Dense item indices (same length).
        n_users: Number of rows.
        n_items: Number of columns.

    Returns:
        A float32 CSR matrix with sorted indices and values 1.0.
    """
    u = np.asarray(user_idx, dtype=np.int64)
    i = np.asarray(item_idx, dtype=np.int64)
    m = sp.csr_matrix((np.ones(u.shape[0], np.float32), (u, i)), shape=(n_users, n_items), dtype=np.float32)
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def temporal_split(
    interactions: pd.DataFrame,
    *,
    cutoff: Any = None,
    quantile: float = 0.8,
    min_train_rows: int = 1,
    min_test_users: int = 1,
) -> TemporalSplit:
    """Split interactions at one point in time, without leakage.

    Train is every row with ``timestamp < T``; test is every row with ``timestamp >= T`` and
    ``label > 0`` whose user and item both occur in train, deduplicated per (user, item) and
    without pairs the user already had in train (seen-item masking would make them unreachable).

    Args:
        interactions: Frame with at least ``user_id``, ``item_id``, ``timestamp`` and ``label``.
            ``timestamp`` may be datetimes or numbers (e.g. epoch seconds).
        cutoff: The cut point ``T``, comparable with ``timestamp``. When ``None``, ``T`` is the
            ``quantile`` of the timestamps.
        quantile: Quantile of time used when ``cutoff`` is ``None`` (0.8 = last 20% of time-ordered
            rows go to test). Must be in (0, 1).
        min_train_rows: Fewest training rows acceptable.
        min_test_users: Fewest users with at least one test positive acceptable.

    Returns:
        The :class:`TemporalSplit`.

    Raises:
        DataError: a required column is missing or ``quantile`` is out of range.
        TrainingDataError: the frame is empty, the training window is smaller than
            ``min_train_rows`` or has no positives, or fewer than ``min_test_users`` users have a
            test positive.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in interactions.columns]
    if missing:
        raise DataError(f"interactions frame lacks column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
    if len(interactions) == 0:
        raise TrainingDataError("no interactions to split: the input frame is empty")
    ts = interactions["timestamp"]
    if cutoff is None:
        if not 0.0 < quantile < 1.0:
            raise DataError(f"quantile must be in (0, 1), got {quantile}")
        cutoff = ts.quantile(quantile, interpolation="higher")
    before = (ts < cutoff).to_numpy()
    train = interactions.loc[before]
    if len(train) < max(min_train_rows, 1):
        raise TrainingDataError(
            f"training window before {cutoff} has {len(train)} rows, fewer than {max(min_train_rows, 1)}; "
            "move the cutoff later or supply more history"
        )
    if not (train["label"] > 0).any():
        raise TrainingDataError(f"training window before {cutoff} has no positive labels")

    users = IdMap.fit(train["user_id"].to_numpy())
    items = IdMap.fit(train["item_id"].to_numpy())
    train = train.assign(
        user_idx=users.to_index(train["user_id"].to_numpy()),
        item_idx=items.to_index(train["item_id"].to_numpy()),
    )

    after = interactions.loc[~before]
    pos = after[after["label"] > 0]
    u_idx = users.to_index(pos["user_id"].to_numpy())
    i_idx = items.to_index(pos["item_id"].to_numpy())
    known = (u_idx >= 0) & (i_idx >= 0)
    test = pos.loc[known].assign(user_idx=u_idx[known], item_idx=i_idx[known])
    n_known = len(test)
    test = test.sort_values("timestamp", kind="stable").drop_duplicates(
        ["user_idx", "item_idx"], keep="first"
    )
    n_dedup = len(test)
    # Drop pairs already in the user's training history (all labels count as "seen").
    seen_keys = train["user_idx"].to_numpy() * len(items) + train["item_idx"].to_numpy()
    test_keys = test["user_idx"].to_numpy() * len(items) + test["item_idx"].to_numpy()
    test = test.loc[~np.isin(test_keys, seen_keys)].reset_index(drop=True)

    n_test_users = int(test["user_idx"].nunique())
    if n_test_users < max(min_test_users, 1):
        raise TrainingDataError(
            f"test window from {cutoff} has positives for {n_test_users} known users, fewer than "
            f"{max(min_test_users, 1)}; move the cutoff earlier or supply more recent data"
        )
    stats = {
        "train_rows": len(train),
        "test_rows": len(test),
        "test_users": n_test_users,
        "after_cutoff_rows": len(after),
        "after_cutoff_positives": len(pos),
        "dropped_unknown_user_or_item": len(pos) - n_known,
        "dropped_duplicate_pairs": n_known - n_dedup,
        "dropped_seen_in_train": n_dedup - len(test),
    }
    return TemporalSplit(train.reset_index(drop=True), test, cutoff, users, items, stats)
