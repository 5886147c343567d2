"""The batch job: the precomputed top-N per user behind the ``batch`` degradation level (Ray Data)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from streamrec.data.store import DataStore
from streamrec.features.client import FeatureClient
from streamrec.features.item_table import ItemFeatureTable
from streamrec.features.snapshot import features_as_of
from streamrec.funnel.core import Funnel
from streamrec.funnel.offline import OfflineAnswer, recommend_offline
from streamrec.funnel.recommender import RecommenderStages
from streamrec.paths import DataLayout
from streamrec.pipeline import ray_train
from streamrec.pipeline.train import _epoch, _user_feature_dict, item_table_as_of


def precompute_fallback(
    data_dir: Path,
    bundle_dir: Path,
    version: str,
    users: npt.NDArray[np.int64],
    top_n: int,
    as_of: pd.Timestamp,
) -> Path:
    """Top-N per user with Ray Data (the ``batch`` degradation level), written as parquet."""
    import pyarrow as pa
    import ray

    from streamrec.funnel.fallback import batch_lists

    out = DataLayout.at(data_dir).root / "fallback" / version
    ray_train.ensure_ray()

    class TopN:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.funnel, self.ufeat, self.now = _offline_funnel(data_dir, bundle_dir, as_of)

        def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
            uids = batch["user_id"]
            answers = recommend_offline(
                RecommenderStages(self.funnel, None, "batch"),
                uids,
                lambda u: _user_feature_dict(self.ufeat, u),
                k=top_n,
                now=self.now,
                rerank=False,
            )
            tops = [batch_top(a, self.funnel.table, self.now, top_n) for a in answers]
            return batch_lists(uids, [t[0] for t in tops], [t[1] for t in tops])

    items = ray.data.from_items([{"user_id": int(u)} for u in users])
    # Light reservations: the job must also run beside a serving app on a small shared cluster.
    ds = items.map_batches(TopN, batch_size=512, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    ds.write_parquet(str(out), ray_remote_args={"num_cpus": 0.1})
    return out


def batch_top(
    answer: OfflineAnswer, table: ItemFeatureTable, now: float, top_n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """A user's batch list: the ranker's order without seen and not yet published items, cut to ``top_n``.

    Unpublished items are left out whatever the serving config's ``hide_unpublished`` (not known
    when the batch job runs): a scheduled release never reaches a batch list.

    Args:
        answer: The user's :class:`~streamrec.funnel.offline.OfflineAnswer` (run without re-ranking).
        table: The item table the answer's rows index.
        now: The batch job's ``as_of``, epoch seconds.
        top_n: Items kept.
    """
    top = answer.unranked_top(len(answer.ranked.items))
    keep = np.flatnonzero(table.published_at[top.items] <= now)[:top_n]
    return table.item_ids[top.items[keep]].astype(np.int64), top.scores[keep].astype(np.float32)


def _offline_funnel(
    data_dir: Path, bundle_dir: Path, as_of: pd.Timestamp
) -> tuple[Funnel, pd.DataFrame, float]:
    from streamrec.bundle import LoadedBundle, align_table

    fc = FeatureClient(data_dir)
    b = LoadedBundle(bundle_dir)
    table = align_table(item_table_as_of(fc, as_of), b.item_ids, b.vocab)
    ev = DataStore(data_dir).events(
        start=(as_of - timedelta(days=7)).to_pydatetime(),
        end=as_of.to_pydatetime(),
        columns=["item_id", "timestamp", "label"],
    )
    ev = ev[ev["label"] > 0]
    models = b.retrieval_models(table, table.index_of(ev["item_id"].to_numpy()), ev["timestamp"])
    funnel = Funnel(models, table, b.ranker, b.settings)
    return funnel, features_as_of(fc, "user", as_of).set_index("user_id"), _epoch(as_of)
