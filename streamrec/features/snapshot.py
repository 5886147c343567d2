"""Features of every user or item as the online store held them at a point in time (offline reads)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pandas as pd

from streamrec.features import offline
from streamrec.features.defaults import apply_defaults
from streamrec.features.spec import CREATED_FIELD, TIMESTAMP_FIELD, views_for

if TYPE_CHECKING:
    from streamrec.features.client import FeatureClient


def features_as_of(
    fc: FeatureClient, entity: str, as_of: pd.Timestamp, ids: npt.ArrayLike | None = None
) -> pd.DataFrame:
    """Every feature of one entity as the online store would have held it at ``as_of``.

    Args:
        fc: The feature client.
        entity: ``user`` or ``item``.
        as_of: The point in time.
        ids: When given, exactly these entities in this order (missing ones get defaults).
    """
    frame: pd.DataFrame | None = None
    key = "user_id" if entity == "user" else "item_id"
    names: list[str] = []
    for v in views_for(entity):  # type: ignore[arg-type]
        part = (
            offline.read_latest(fc.features_dir, v, as_of, bound_direct=True)
            .drop([TIMESTAMP_FIELD, CREATED_FIELD])
            .to_pandas()
        )
        frame = part if frame is None else frame.merge(part, on=key, how="outer")
        names += v.feature_names
    assert frame is not None
    if ids is not None:
        frame = frame.set_index(key).reindex(np.asarray(ids, dtype=np.int64)).rename_axis(key).reset_index()
    return apply_defaults(frame, fc.context, features=names)
