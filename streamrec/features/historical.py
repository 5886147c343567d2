"""Point-in-time training sets from the offline store (Feast's historical retrieval), defaults applied."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pandas as pd

from streamrec.features import offline
from streamrec.features.defaults import DefaultContext, apply_defaults
from streamrec.features.spec import TIMESTAMP_FIELD, View


def training_frame(
    store: Any,
    features_dir: Path,
    labelled_events: pd.DataFrame,
    views: Sequence[View],
    context: DefaultContext,
    quiet: Callable[[], AbstractContextManager[Any]],
) -> pd.DataFrame:
    """The features of ``views`` for ``labelled_events``; ``quiet`` wraps Feast's output.

    See :meth:`streamrec.features.client.FeatureClient.training_set` (the checks of its input
    are the caller's).
    """
    df = labelled_events.copy().reset_index(drop=True)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True).astype("datetime64[ns, UTC]")
    df["user_id"] = df["user_id"].astype("int64")
    df["item_id"] = df["item_id"].astype("int64")
    present = [v for v in views if offline.has_data(features_dir, v)]
    for v in present:
        df = df.drop(columns=[c for c in v.feature_names if c in df.columns])
        if len(df):
            df = df.merge(
                historical(store, features_dir, v, df[[v.join_key, "timestamp"]], quiet),
                on=[v.join_key, "timestamp"],
                how="left",
            )
    attrs: dict[str, Any] = {}
    for entity in ("user", "item"):
        cols = [f for v in present if v.entity == entity for f in v.feature_names]
        attrs[f"rows_without_{entity}_features"] = int(df[cols].isna().all(axis=1).sum()) if cols else len(df)
    counts: dict[str, int] = {}
    names = [f for v in views for f in v.feature_names]
    df = apply_defaults(df, context, features=names, counts=counts)
    attrs["defaults_filled"] = counts
    df.attrs.update(attrs)
    return df


def historical(
    store: Any,
    features_dir: Path,
    view: View,
    keys: pd.DataFrame,
    quiet: Callable[[], AbstractContextManager[Any]],
) -> pd.DataFrame:
    """One view's point-in-time values for unique ``(join key, timestamp)`` pairs.

    One Feast call per view on de-duplicated pairs keeps the result independent of the
    offline store. The configured DuckDB store needs none of it, but Feast's file (Dask)
    store drops entity rows whose candidate rows all fall outside the TTL (which would also
    drop the row for every other view of the same call), collapses rows sharing a join key
    and timestamp (feast-dev/feast#6787), and fails to sort the null rows of entities with
    no offline row at all (so those are not sent). Pairs missing from the answer have no
    valid value: the caller's left join leaves them null, :func:`apply_defaults` fills them.
    """
    ent = keys.drop_duplicates().rename(columns={"timestamp": TIMESTAMP_FIELD})
    ent = ent[ent[view.join_key].isin(offline.entity_ids(features_dir, view))].reset_index(drop=True)
    if ent.empty:
        return keys.iloc[:0].assign(**{f: pd.Series(dtype=object) for f in view.feature_names})
    refs = [f"{view.name}:{f}" for f in view.feature_names]
    with quiet():
        got = store.get_historical_features(entity_df=ent, features=refs).to_df()
    got = got.rename(columns={TIMESTAMP_FIELD: "timestamp"})
    got["timestamp"] = pd.to_datetime(got["timestamp"], utc=True).astype("datetime64[ns, UTC]")
    got = got.drop_duplicates([view.join_key, "timestamp"], keep="last")
    return got[[view.join_key, "timestamp", *view.feature_names]]
