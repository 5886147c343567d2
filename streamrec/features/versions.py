"""Versioned feature views: rows stored where values change, read as full snapshots.

A versioned view (:attr:`~streamrec.features.spec.View.versioned`: slowly changing, computed
from a table without history) stores in ``snapshot-<t>.parquet`` only the rows whose values at
``t`` differ from the stored state just before ``t`` (the newest row per entity dated before
``t``), plus new entities and an all-null row for an entity gone since (a tombstone: null reads
as the default, as no row does). Rows are dated ``t``, the cutoff where the change is observed.
So the newest row per entity at or before any time equals the full snapshot of the latest cutoff
before it, with an unbounded TTL.

Rebuilding a cutoff keeps the entities of its old file whose value there changes (so an online
row dated ``t`` with the old value is overwritten by a row dated ``t``, not left stale; one
with an unchanged value needs no overwrite, so a full file from before versions shrinks to
the changes), and a cutoff inserted before existing ones
rewrites the next existing cutoff against the new state before it, so the state at every later
cutoff stays what its last build computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamrec.features import offline
from streamrec.features.spec import CREATED_FIELD, TIMESTAMP_FIELD, View

#: Fingerprint of an all-null row, which reads exactly as no row (defaults).
NULL_FP = "\x01"
_ONE_US = pd.Timedelta(microseconds=1)


def fingerprints(view: View, table: pa.Table) -> npt.NDArray[np.object_]:
    """One string per row that is equal exactly when the rows' feature values are equal.

    Lists are joined element-wise (an empty list differs from null); an all-null row gets
    :data:`NULL_FP`.
    """
    if table.num_rows == 0:
        return np.zeros(0, dtype=object)
    parts = []
    all_null = None
    for name in view.feature_names:
        col = table[name]
        null = pc.is_null(col)
        all_null = null if all_null is None else pc.and_(all_null, null)
        if pa.types.is_list(col.type):
            text = pc.binary_join(pc.cast(col, pa.list_(pa.string())), "\x1f")
            text = pc.binary_join_element_wise("[", text, "")
        else:
            text = pc.cast(col, pa.string())
        parts.append(pc.fill_null(text, NULL_FP))
    joined = pc.binary_join_element_wise(*parts, "\x1e")
    out = np.asarray(joined.to_pylist(), dtype=object)
    assert all_null is not None
    out[np.asarray(all_null.to_pylist(), dtype=bool)] = NULL_FP
    return out


@dataclass(frozen=True)
class State:
    """One row per entity (sorted by join key) with its fingerprint."""

    keys: npt.NDArray[np.int64]
    fp: npt.NDArray[np.object_]
    rows: pa.Table

    @classmethod
    def of(cls, view: View, table: pa.Table) -> State:
        """The state of ``table`` (the last row of a key wins), in :func:`offline.arrow_schema`."""
        table = table.select(offline.arrow_schema(view).names).cast(offline.arrow_schema(view))
        keys = table[view.join_key].to_numpy()
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        last = np.r_[ks[1:] != ks[:-1], True] if len(ks) else np.zeros(0, dtype=bool)
        rows = table.take(pa.array(order[last]))
        return cls(ks[last].astype(np.int64), fingerprints(view, rows), rows)

    @classmethod
    def empty(cls, view: View) -> State:
        """No entity."""
        return cls.of(view, offline.arrow_schema(view).empty_table())

    def fp_of(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.object_]:
        """Fingerprints of ``keys``; :data:`NULL_FP` for an entity without a row."""
        out = np.full(len(keys), NULL_FP, dtype=object)
        if len(self.keys) and len(keys):
            idx = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
            hit = self.keys[idx] == keys
            out[hit] = self.fp[idx[hit]]
        return out

    def overlay(self, newer: State) -> State:
        """The state with ``newer``'s rows replacing (or adding) these ones."""
        if not len(newer.keys):
            return self
        keys = np.concatenate([self.keys, newer.keys])
        src = np.r_[np.zeros(len(self.keys), np.int8), np.ones(len(newer.keys), np.int8)]
        order = np.lexsort((src, keys))
        ks = keys[order]
        pick = order[np.r_[ks[1:] != ks[:-1], True]]
        rows = pa.concat_tables([self.rows, newer.rows]).take(pa.array(pick))
        return State(keys[pick], np.concatenate([self.fp, newer.fp])[pick], rows)

    def same_values(self, other: State) -> bool:
        """Whether both hold the same values for every entity (no row = all null)."""
        keys = np.union1d(self.keys, other.keys)
        return bool((self.fp_of(keys) == other.fp_of(keys)).all())


def changes(
    view: View,
    before: State,
    target: State,
    keep: npt.NDArray[np.int64],
    at: pd.Timestamp,
    created: pd.Timestamp,
) -> pa.Table:
    """The rows of cutoff ``at``: where ``target`` (the full state at ``at``) differs from ``before``.

    Args:
        view: The versioned view.
        before: The stored state just before ``at``.
        target: Every entity's value at ``at``.
        keep: Entities that must have a row at ``at`` whatever their value (those of the old
            file whose value changes, when the cutoff is rebuilt).
        at: The cutoff: every row is dated ``at``.
        created: Write time of the rows.

    Returns:
        Changed and new entities with their target values, entities gone since ``before``
        (non-null there) and kept entities missing from ``target`` as all-null rows; sorted by key.
    """
    in_before = np.isin(target.keys, before.keys, assume_unique=True)
    write = (target.fp != before.fp_of(target.keys)) | ~in_before | np.isin(target.keys, keep)
    gone = before.keys[(before.fp != NULL_FP) & ~np.isin(before.keys, target.keys, assume_unique=True)]
    nulls = np.union1d(gone, keep[~np.isin(keep, target.keys)])
    schema = offline.arrow_schema(view)
    kept = target.rows.filter(pa.array(write))
    blank = pa.table(
        {
            f.name: pa.nulls(len(nulls), f.type) if f.name != view.join_key else pa.array(nulls, f.type)
            for f in schema
        },
        schema=schema,
    )
    out = pa.concat_tables([kept, blank])
    out = out.take(pc.sort_indices(out, sort_keys=[(view.join_key, "ascending")]))
    ts = offline.TS
    out = out.set_column(
        out.schema.get_field_index(TIMESTAMP_FIELD), TIMESTAMP_FIELD, pa.array([at] * out.num_rows, ts)
    )
    return out.set_column(
        out.schema.get_field_index(CREATED_FIELD), CREATED_FIELD, pa.array([created] * out.num_rows, ts)
    )


def stored_cutoffs(features_dir: Path, view: View) -> dict[pd.Timestamp, Path]:
    """The view's snapshot files by cutoff."""
    out = {}
    for f in offline.files(features_dir, view, ["snapshot"]):
        out[pd.to_datetime(f.stem.removeprefix("snapshot-"), format="%Y%m%dT%H%M%S%fZ", utc=True)] = f
    return out


@dataclass
class VersionedWriter:
    """Writes one build's cutoffs of a versioned view (see the module docstring).

    Call :meth:`add` for each cutoff of the build in ascending order, then :meth:`finish`.
    Existing cutoffs the build does not compute are rewritten when the state before them
    changed (:attr:`rewritten`).

    Args:
        features_dir: ``<data dir>/features``.
        view: A versioned batch view.
        cutoffs: The build's cutoffs (UTC).
        created: Write time of the rows.
    """

    features_dir: Path
    view: View
    cutoffs: Sequence[pd.Timestamp]
    created: pd.Timestamp
    rewritten: list[pd.Timestamp] = field(default_factory=list)
    rows: int = 0
    #: Rows written per cutoff of the build.
    written: dict[pd.Timestamp, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.view.versioned or self.view.mode != "batch":
            raise ValueError(f"view {self.view.name} is not a versioned batch view")
        first = min(self.cutoffs)
        self._existing = stored_cutoffs(self.features_dir, self.view)
        #: The newest cutoff stored before this build (None: none).
        self.newest_stored = max(self._existing) if self._existing else None
        built = set(self.cutoffs)
        self._others = sorted(c for c in self._existing if c > first and c not in built)
        base = offline.read_latest(self.features_dir, self.view, first - _ONE_US)
        self._new = State.of(self.view, base)  # the state the new files give
        self._old = self._new  # the state the files had before this build

    def _old_file(self, at: pd.Timestamp) -> State | None:
        path = self._existing.get(at)
        if path is None:
            return None
        return State.of(self.view, pq.read_table(path, schema=offline.arrow_schema(self.view)))

    def _write(self, at: pd.Timestamp, target: State, old_file: State | None) -> None:
        keep = np.zeros(0, dtype=np.int64)
        if old_file is not None:  # its rows may be online, dated ``at``: those whose value changes
            keep = old_file.keys[old_file.fp != target.fp_of(old_file.keys)]
        table = changes(self.view, self._new, target, keep, at, self.created)
        path = self.features_dir / self.view.offline_dir / f"snapshot-{offline.stamp(at)}.parquet"
        offline.write_table(table, path)
        self._new = self._new.overlay(State.of(self.view, table))
        self.rows += table.num_rows
        self.written[at] = table.num_rows

    def _existing_cutoff(self, at: pd.Timestamp) -> None:
        old_file = self._old_file(at)
        assert old_file is not None
        diverged = not self._new.same_values(self._old)
        self._old = self._old.overlay(old_file)
        if diverged:  # its old file encodes changes against a state that no longer holds
            self._write(at, self._old, old_file)
            self.rewritten.append(at)
        else:
            self._new = self._new.overlay(old_file)

    def add(self, at: pd.Timestamp, frame: pd.DataFrame) -> None:
        """Write cutoff ``at`` of the build, ``frame`` being the view's full snapshot there."""
        while self._others and self._others[0] < at:
            self._existing_cutoff(self._others.pop(0))
        old_file = self._old_file(at)
        if old_file is not None:
            self._old = self._old.overlay(old_file)
        self._write(at, State.of(self.view, offline.to_arrow(self.view, frame)), old_file)

    def finish(self) -> list[pd.Timestamp]:
        """Rewrite the existing cutoffs after the build's last one while the state diverges.

        Returns:
            Every existing cutoff rewritten without being computed by this build.
        """
        while self._others and not self._new.same_values(self._old):
            self._existing_cutoff(self._others.pop(0))
        self._others = []
        return self.rewritten
