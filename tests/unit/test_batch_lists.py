"""The batch job's lists on disk: every batch written alike, whatever its lists' lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from streamrec.funnel.fallback import BatchTopN, batch_lists


def test_equal_and_ragged_batches_read_back_as_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "fallback" / "v1"
    folder.mkdir(parents=True)
    # One batch where every user has 3 items, one where lengths differ (seen or unpublished
    # items removed): as numpy object arrays Ray wrote these as two different tensor types.
    equal = batch_lists([1, 2], [np.array([10, 11, 12]), np.array([13, 14, 15])], [np.ones(3), np.ones(3)])
    ragged = batch_lists([3, 4], [np.array([10]), np.array([11, 12, 13])], [np.array([0.5]), np.zeros(3)])
    empty = batch_lists([5], [np.array([], np.int64)], [np.array([], np.float32)])
    for n, t in enumerate((equal, ragged, empty)):
        pq.write_table(t, folder / f"part-{n}.parquet")
    batch = BatchTopN.load(tmp_path, "v1")
    assert len(batch) == 5
    assert [it["item_id"] for it in batch.items(2, 10)] == [13, 14, 15]
    assert [(it["item_id"], it["score"]) for it in batch.items(3, 10)] == [(10, 0.5)]
    assert [it["item_id"] for it in batch.items(4, 2, drop={11})] == [12, 13]
    assert batch.items(5, 10) == []
    assert equal.schema.field("item_ids").type == ragged.schema.field("item_ids").type


def test_a_batch_list_leaves_out_seen_and_not_yet_published_items() -> None:
    from types import SimpleNamespace

    from streamrec.funnel.offline import OfflineAnswer
    from streamrec.funnel.stages import Candidates, UserContext
    from streamrec.pipeline.batch import batch_top

    now = 1_800_000_000.0
    # Rows 0..5 (ids 100..105); row 1 is scheduled for tomorrow, row 3 the user has seen.
    table = SimpleNamespace(
        item_ids=np.arange(100, 106, dtype=np.int64),
        published_at=np.array([now - 10, now + 86400, now - 10, now - 10, 0, now], dtype=np.int64),
    )
    ranked = Candidates(np.array([1, 0, 3, 2, 4, 5]), np.linspace(1, 0.5, 6, dtype=np.float32), [["cf"]] * 6)
    ctx = UserContext(user_id=7, user_idx=0, k=3, now=now, device="tv", history=np.array([3]))
    answer = OfflineAnswer(7, ctx, {}, ranked, None, None)
    ids, scores = batch_top(answer, table, now, 3)  # type: ignore[arg-type]
    assert ids.tolist() == [100, 102, 104]  # 101 unpublished, 103 seen; 104's unknown time counts as published
    assert scores.tolist() == ranked.scores[[1, 3, 4]].tolist()
    assert batch_top(answer, table, now + 86400, 10)[0].tolist() == [101, 100, 102, 104, 105]
