"""Canonical pyarrow schemas for users, items and interaction events.

Every loader (synthetic world, MovieLens 100K, MovieLens CSV) produces frames in exactly these
schemas, and everything downstream (features, training, serving) reads only these. Timestamps
are UTC with microsecond precision. Ids are int64.
"""

from __future__ import annotations

import operator
from typing import SupportsIndex

import pandas as pd
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

#: Event types, in rough order of engagement strength.
EVENT_TYPES: tuple[str, ...] = ("impression", "view", "click", "complete", "skip", "rating")
#: Devices a context may name; ``unknown`` where the source does not say.
DEVICES: tuple[str, ...] = ("mobile", "web", "tv", "tablet", "unknown")

#: Largest id the stores hold (ids are int64). The API accepts any non-negative integer, so a
#: larger one is simply unknown: check with :func:`storable_id` before building an int64 array.
INT64_MAX = 2**63 - 1


def storable_id(i: SupportsIndex) -> bool:
    """Whether ``i`` fits the stores' non-negative int64 ids (else it cannot name a known row)."""
    return 0 <= operator.index(i) <= INT64_MAX


USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("age", pa.int16()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
        pa.field("region", pa.string()),
        pa.field("activity_level", pa.float32()),
        pa.field("signup_at", TS, nullable=False),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("categories", pa.list_(pa.string()), nullable=False),
        pa.field("creator", pa.string()),
        pa.field("published_at", TS, nullable=False),
        pa.field("promoted", pa.bool_(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),
    ]
)

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("timestamp", TS, nullable=False),
        pa.field("session_id", pa.string()),
        pa.field("device", pa.string()),
        pa.field("position", pa.int16()),
        pa.field("rating", pa.float32()),
        pa.field("watch_fraction", pa.float32()),
        # The experiment variant the user was in when the API received the event (None outside
        # experiments and in imported histories): lets training exclude or reweight treated users.
        pa.field("experiment_variant", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"users": USER_SCHEMA, "items": ITEM_SCHEMA, "events": EVENT_SCHEMA}


def to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert a frame to a table in ``schema`` (column order and types enforced).

    Columns missing from ``df`` that are nullable in the schema are filled with nulls.

    Raises:
        KeyError: a non-nullable column is missing.
    """
    arrays = []
    for field in schema:
        if field.name in df.columns:
            arrays.append(pa.array(df[field.name], type=field.type, from_pandas=True))
        elif field.nullable:
            arrays.append(pa.nulls(len(df), type=field.type))
        else:
            raise KeyError(f"required column '{field.name}' is missing")
    return pa.Table.from_arrays(arrays, schema=schema)


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty frame with the schema's columns and dtypes."""
    return schema.empty_table().to_pandas()
