"""The offline store's files: one folder of parquet files per feature view.

Layout under ``<data dir>/features/offline/<view>/``::

    snapshot-<as_of>.parquet     rows of one batch build (rebuilding the same cutoff replaces it;
                                 a versioned view's hold the changed rows only, see
                                 :mod:`streamrec.features.versions`)
    push-<stamp>-<id>.parquet    rows written by the streaming path (also already online)
    training-<stamp>-<id>.parquet  embeddings written by training jobs (also already online)

Every file has the view's :func:`arrow_schema`: the join key, the features, ``event_timestamp``
and ``created_timestamp``. Feast's offline store (DuckDB; the file/Dask store reads the same
layout) reads the whole folder for point-in-time joins and materialization; :func:`read_latest`
gives the newest row per entity as the online store should hold it, for the in-memory item
table and for the consistency check.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamrec.features.spec import CREATED_FIELD, TIMESTAMP_FIELD, View

TS = pa.timestamp("us", tz="UTC")
_ARROW = {
    "int64": pa.int64(),
    "float32": pa.float32(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "int64_list": pa.list_(pa.int64()),
    "float32_list": pa.list_(pa.float32()),
    "string_list": pa.list_(pa.string()),
}
#: File prefixes whose rows reached the online store directly (not through materialization).
DIRECT_PREFIXES = ("push", "training")


def arrow_schema(view: View) -> pa.Schema:
    """The parquet schema of a view's offline files."""
    fields = [pa.field(view.join_key, pa.int64(), nullable=False)]
    fields += [pa.field(f.name, _ARROW[f.dtype]) for f in view.features]
    fields += [pa.field(TIMESTAMP_FIELD, TS, nullable=False), pa.field(CREATED_FIELD, TS)]
    return pa.schema(fields)


def to_arrow(view: View, frame: pd.DataFrame) -> pa.Table:
    """Convert a frame (join key, features, timestamps) into the view's schema.

    Raises:
        KeyError: a column of the schema is missing from ``frame``.
    """
    schema = arrow_schema(view)
    arrays = []
    for fld in schema:
        if fld.name not in frame.columns:
            raise KeyError(f"view {view.name}: column '{fld.name}' missing")
        col = frame[fld.name]
        if pa.types.is_list(fld.type):
            values = [None if v is None or (isinstance(v, float) and np.isnan(v)) else list(v) for v in col]
            arrays.append(pa.array(values, type=fld.type))
        elif pa.types.is_timestamp(fld.type):
            arrays.append(pa.array(pd.to_datetime(col, utc=True), type=fld.type))
        else:
            arrays.append(pa.array(col, type=fld.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def view_dir(features_dir: Path, view: View) -> Path:
    """Absolute folder of a view's offline files."""
    return features_dir / view.offline_dir


def _atomic_write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _stamp(ts: datetime | pd.Timestamp) -> str:
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.strftime("%Y%m%dT%H%M%S%fZ")


def stamp(ts: datetime | pd.Timestamp) -> str:
    """The UTC time as it appears in file names (``20261204T000000000000Z``)."""
    return _stamp(ts)


def write_table(table: pa.Table, path: Path) -> None:
    """Write a table in the view's schema to ``path`` atomically (replacing it)."""
    _atomic_write(table, path)


def write_snapshot(
    features_dir: Path, view: View, frame: pd.DataFrame, as_of: datetime | pd.Timestamp
) -> Path:
    """Write (or replace) the snapshot of ``view`` for cutoff ``as_of``; returns the file."""
    path = view_dir(features_dir, view) / f"snapshot-{_stamp(as_of)}.parquet"
    _atomic_write(to_arrow(view, frame), path)
    return path


def upgrade_files(features_dir: Path, view: View) -> int:
    """Rewrite the view's files written before a feature was added or moved, to the spec's schema.

    Feast reads a view's folder with one schema; a file without a column the spec now declares
    (e.g. ``category_positives``, added 2026-12-04) breaks every read and materialization of
    the view. Null reads as the feature's default. A column the view no longer declares (e.g.
    ``tenure_days``, moved from ``user_profile`` to ``user_tenure``) is dropped. Returns how
    many files were rewritten.
    """
    schema = arrow_schema(view)
    done = 0
    for f in files(features_dir, view):
        have = pq.read_schema(f)
        missing = [fld for fld in schema if fld.name not in have.names]
        if not missing and set(have.names) <= set(schema.names):
            continue
        t = pq.read_table(f)
        for fld in missing:
            t = t.append_column(fld, pa.nulls(t.num_rows, type=fld.type))
        _atomic_write(t.select(schema.names).cast(schema), f)
        done += 1
    return done


def write_rows(
    features_dir: Path, view: View, rows: pd.DataFrame | list[dict[str, Any]], prefix: str
) -> Path:
    """Append rows as a new file ``<prefix>-<now>-<id>.parquet`` (prefix ``push`` or ``training``).

    ``rows`` is a frame or a list of row dicts (the streaming path avoids pandas).
    """
    name = f"{prefix}-{_stamp(pd.Timestamp.now(tz='UTC'))}-{uuid.uuid4().hex[:8]}.parquet"
    path = view_dir(features_dir, view) / name
    if isinstance(rows, pd.DataFrame):
        table = to_arrow(view, rows)
    else:
        schema = arrow_schema(view)
        table = pa.Table.from_pylist(
            [
                {**r, TIMESTAMP_FIELD: _utc(r[TIMESTAMP_FIELD]), CREATED_FIELD: _utc(r[CREATED_FIELD])}
                for r in rows
            ],
            schema=schema,
        )
    _atomic_write(table, path)
    return path


def _utc(ts: Any) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def files(features_dir: Path, view: View, prefixes: Iterable[str] | None = None) -> list[Path]:
    """The view's parquet files (optionally only those with the given prefixes), sorted by name."""
    d = view_dir(features_dir, view)
    if not d.is_dir():
        return []
    out = sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))
    if prefixes is not None:
        pre = tuple(f"{p}-" for p in prefixes)
        out = [p for p in out if p.name.startswith(pre)]
    return out


def has_data(features_dir: Path, view: View) -> bool:
    """Whether the view has at least one offline file."""
    return bool(files(features_dir, view))


def entity_ids(features_dir: Path, view: View) -> np.ndarray:
    """Distinct join-key values present in the view's offline files (int64, sorted)."""
    parts = [
        pq.read_table(f, columns=[view.join_key]).column(0).to_numpy() for f in files(features_dir, view)
    ]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def time_range(features_dir: Path, view: View) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """Earliest and latest ``event_timestamp`` over the view's files (None when empty)."""
    lo: pd.Timestamp | None = None
    hi: pd.Timestamp | None = None
    for f in files(features_dir, view):
        col = pq.read_table(f, columns=[TIMESTAMP_FIELD]).column(0)
        if len(col) == 0:
            continue
        mm = pc.min_max(col)
        a, b = pd.Timestamp(mm["min"].as_py()), pd.Timestamp(mm["max"].as_py())
        lo = a if lo is None or a < lo else lo
        hi = b if hi is None or b > hi else hi
    return (lo, hi) if lo is not None and hi is not None else None


def read_latest(
    features_dir: Path,
    view: View,
    until: datetime | pd.Timestamp | None,
    *,
    entities: np.ndarray | None = None,
    bound_direct: bool = False,
) -> pa.Table:
    """Newest row per entity, as the online store holds it.

    Rows of snapshot files count when their ``event_timestamp <= until`` (the view's last
    materialization end; ``None``: no snapshot row counts); rows of push / training files always
    count, because they were written online directly. Ties on ``event_timestamp`` go to the
    later ``created_timestamp``.

    Args:
        features_dir: ``<data dir>/features``.
        view: The view.
        until: Materialization end of the view (inclusive), or None.
        entities: Restrict to these join-key values.
        bound_direct: Also drop push / training rows later than ``until`` (the state *as of*
            ``until`` for offline evaluation, rather than what the online store holds now).

    Returns:
        A table in :func:`arrow_schema` order, one row per entity, sorted by the join key.
    """
    schema = arrow_schema(view)
    key = view.join_key
    parts: list[pa.Table] = []
    bound = None
    if until is not None:
        u = pd.Timestamp(until)
        bound = pa.scalar(u.tz_localize("UTC") if u.tzinfo is None else u.tz_convert("UTC"), type=TS)
    for f in files(features_dir, view):
        direct = f.name.startswith(tuple(f"{p}-" for p in DIRECT_PREFIXES)) and not bound_direct
        if not direct and bound is None:
            continue
        t = pq.read_table(f, schema=schema)
        mask = None
        if not direct:
            mask = pc.less_equal(t[TIMESTAMP_FIELD], bound)
        if entities is not None:
            m2 = pc.is_in(t[key], value_set=pa.array(np.asarray(entities, dtype=np.int64)))
            mask = m2 if mask is None else pc.and_(mask, m2)
        if mask is not None:
            t = t.filter(mask)
        if t.num_rows:
            parts.append(t)
    if not parts:
        return schema.empty_table()
    table = pa.concat_tables(parts)
    keys = table[key].to_numpy()
    ts = table[TIMESTAMP_FIELD].cast(pa.int64()).to_numpy()
    created = table[CREATED_FIELD].cast(pa.int64()).fill_null(0).to_numpy()
    order = np.lexsort((created, ts, keys))
    k_sorted = keys[order]
    last = np.r_[k_sorted[1:] != k_sorted[:-1], True] if len(k_sorted) else np.zeros(0, dtype=bool)
    return table.take(pa.array(order[last]))


def compact(features_dir: Path, view: View, prefix: str = "push", min_files: int = 8) -> int:
    """Merge the view's ``prefix`` files into one when there are at least ``min_files``.

    Streaming writes one small file per push call; Feast reads every file of the folder, so
    the build compacts them. Returns the number of files merged (0 when below the threshold).
    """
    fs = files(features_dir, view, [prefix])
    if len(fs) < min_files:
        return 0
    schema = arrow_schema(view)
    merged = pa.concat_tables([pq.read_table(f, schema=schema) for f in fs])
    name = f"{prefix}-{_stamp(pd.Timestamp.now(tz='UTC'))}-compacted-{uuid.uuid4().hex[:8]}.parquet"
    _atomic_write(merged, view_dir(features_dir, view) / name)
    for f in fs:
        f.unlink()
    return len(fs)
