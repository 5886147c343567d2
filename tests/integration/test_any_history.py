"""Any history trains (issue 17 item 1): one day, thirty days, ten years of events.

Each world is synthesized, edited to hold the awkward cases real catalogues have (items without
categories, an item whose category nothing else has, a user with a single event), trained end to
end in-process, and checked where the pipeline reads features: the item table at the ranker's
window start and at the test cutoff has every item's metadata, however far those times lie from
the last event. Before the fix a ten-year history failed in the first retrieval step ("no item
has a category"): the build wrote daily snapshots for the last 120 days only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.data.store import DataStore
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.features.client import FeatureClient
from streamrec.pipeline.train import PipelineState, item_table_as_of, load_events, run_pipeline
from tests.integration.test_training_pipeline import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORLDS = {  # days -> (users, items, daily active rate): a few thousand events each
    1: (300, 120, 0.9),
    30: (120, 120, 0.3),
    3650: (40, 120, 0.03),
}


def _awkward(d: Path) -> dict[str, Any]:
    """Items without categories, a one-of-a-kind category, a user with one event."""
    store = DataStore(d)
    items = store.items()
    bare = items["item_id"].to_numpy()[::7][:10]
    odd = int(items["item_id"].iloc[-1])
    items["categories"] = [
        [] if i in set(bare.tolist()) else (["zz-one-of-a-kind"] if i == odd else list(c))
        for i, c in zip(items["item_id"], items["categories"], strict=True)
    ]
    store.upsert_items(items)
    ev = store.events()
    one = ev.iloc[[len(ev) // 2]].copy()  # a click in the middle of history by a user seen nowhere else
    lonely = int(store.users()["user_id"].max()) + 1
    users = store.users()
    row = users.iloc[[0]].copy()
    row["user_id"] = lonely
    store.upsert_users(row)
    one["user_id"], one["event_id"], one["event_type"], one["label"] = lonely, f"lonely-{lonely}", "click", 1
    store.append_events(one)
    return {"bare": bare, "odd": odd, "lonely": lonely}


@pytest.mark.parametrize("days", sorted(WORLDS))
def test_a_history_of_any_length_trains_with_features_at_every_split_time(
    days: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    users, items, rate = WORLDS[days]
    d = tmp_path_factory.mktemp(f"history-{days}d")
    synthesize(
        SynthConfig(users=users, items=items, days=days, seed=11, daily_active_rate=rate), d, progress=False
    )
    awkward = _awkward(d)
    cfg = small_config(use_ray=False)
    cfg.evaluation.tuning.enabled = False
    cfg.split.min_train_events = 20
    report = run_pipeline(d, cfg, register=False, log=lambda m: None)

    methods = {m["method"]: m for m in report["methods"]}
    assert np.isfinite(methods["streamrec_full"]["ndcg@10"]), methods["streamrec_full"]
    fc = FeatureClient(d)
    state = PipelineState(d, cfg, "check", log=lambda m: None)
    load_events(state)  # the split times the pipeline used
    for at in (state.t_rank, state.t_test):
        assert at is not None
        table = item_table_as_of(fc, at)
        rows = table.index_of(np.asarray([awkward["odd"]]))
        assert len(table) >= items and rows[0] >= 0, f"item metadata missing at {at}"
        assert len(table.categories_indices) > 0, f"no item has a category at {at}"
        odd = table.row(awkward["odd"]) or {}
        assert odd.get("categories") == ["zz-one-of-a-kind"], odd
