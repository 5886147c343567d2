"""The new-arrivals source: recent publications newest first, in the funnel, a bundle and new catalogue items."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from streamrec.retrieval.base import UserContext
from streamrec.retrieval.new_arrivals import NewArrivalsConfig, NewArrivalsSource

DAY = 86_400.0
NOW = 1_800_000_000.0


def test_items_published_in_the_window_newest_first_never_later_than_the_request() -> None:
    #                 0 old       1 2 days   2 1 hour   3 tomorrow  4 unknown  5 exactly now  6 3 days
    pub = np.array([NOW - 30 * DAY, NOW - 2 * DAY, NOW - 3600, NOW + DAY, 0, NOW, NOW - 3 * DAY])
    src = NewArrivalsSource(pub, NewArrivalsConfig(window_days=3.0))
    items, scores = src.retrieve(UserContext(now=NOW), 10)
    assert items.tolist() == [5, 2, 1, 6]  # the window's edge included, 0/3/4 never
    assert scores.tolist() == sorted(scores.tolist(), reverse=True) and scores[0] == 0.0
    assert src.retrieve(UserContext(now=NOW), 2)[0].tolist() == [5, 2]
    assert src.retrieve(UserContext(now=NOW + DAY), 10)[0].tolist() == [3, 5, 2, 1]  # tomorrow came
    assert src.retrieve(UserContext(), 10)[0].size == 0  # no request time: nothing is new


def test_seen_and_excluded_items_are_left_out() -> None:
    pub = np.array([NOW - 10, NOW - 20, NOW - 30])
    seen = sp.csr_matrix(np.array([[0, 1, 0]], dtype=np.float32))
    src = NewArrivalsSource(pub, seen=seen)
    ctx = UserContext(user_index=0, exclude=np.array([0]), now=NOW)
    assert src.retrieve(ctx, 10)[0].tolist() == [2]


def test_new_catalogue_rows_are_candidates_at_once() -> None:
    src = NewArrivalsSource(np.array([NOW - DAY, NOW - 2 * DAY]))
    grown = src.with_items([NOW - 60, 0.0])
    assert grown.n_items == 4 and src.n_items == 2
    assert grown.retrieve(UserContext(now=NOW), 10)[0].tolist() == [2, 0, 1]
    assert src.retrieve(UserContext(now=NOW), 10)[0].tolist() == [0, 1]  # the original unchanged


def _with_source(window_days: float = 3.0) -> object:
    """test_covisit's real five-item funnel, with the new-arrivals source (items published at 100)."""
    from streamrec.funnel.core import Funnel
    from streamrec.retrieval.config import RetrievalSettings
    from tests.unit.test_covisit import _funnel

    f = _funnel(covisit=False)
    assert isinstance(f, Funnel)
    cfg = NewArrivalsConfig(enabled=True, window_days=window_days)
    models = replace(f.models, new_arrivals=NewArrivalsSource(f.table.published_at, cfg, seen=f.models.train))
    return Funnel(models, f.table, None, RetrievalSettings(new_arrivals=cfg))


def test_the_funnel_serves_it_with_its_own_ranker_column_and_grows_it() -> None:
    from streamrec.funnel.core import SOURCE_NAMES, Funnel

    f = _with_source()
    assert isinstance(f, Funnel)
    assert f.source_names == (*SOURCE_NAMES, "new_arrivals")
    assert "x_src_new_arrivals" in f.features.layout.dense
    # Items 10..14 were published at t=100; user 101 trained on rows 0 and 1.
    items, _ = f.retrieve("new_arrivals", f.context(101, {}, now=100.0 + DAY))
    assert sorted(items.tolist()) == [2, 3, 4]
    assert f.retrieve("new_arrivals", f.context(101, {}, now=100.0 + 4 * DAY))[0].size == 0  # too old by then
    # A catalogue item published now is a candidate on the next request, newest first.
    grown = f.with_catalogue({99: {"categories": ["drama"], "published_at": 100.0 + DAY - 60}})
    items, _ = grown.retrieve("new_arrivals", grown.context(101, {}, now=100.0 + DAY))
    assert items[0] == grown.table.index(99) and grown.models.new_arrivals is not None


def test_a_bundle_trained_with_it_serves_it(tmp_path: Path) -> None:
    from streamrec.bundle import LoadedBundle
    from streamrec.funnel.core import Funnel
    from tests.unit.test_covisit import save_tiny_bundle

    f = _with_source(window_days=2.0)
    assert isinstance(f, Funnel)
    roles = save_tiny_bundle(f, tmp_path / "b")
    assert "new_arrivals" not in roles  # nothing stored: built from the item table
    b = LoadedBundle(tmp_path / "b")
    assert b.settings.new_arrivals.enabled and b.settings.new_arrivals.window_days == 2.0
    served = Funnel(b.retrieval_models(f.table, [], []), f.table, b.ranker, b.settings)
    assert served.source_names == f.source_names
    ctx = served.context(101, {}, now=100.0 + DAY)
    assert served.retrieve("new_arrivals", ctx)[0].tolist() == f.retrieve("new_arrivals", ctx)[0].tolist()
    merged, src = served.merge({s: served.retrieve(s, ctx) for s in served.source_names})
    scores, _ = served.score_with_inputs([ctx], [merged.items], [src])
    assert scores[0].shape == (len(merged),) and np.isfinite(scores[0]).all()


def test_publication_times_the_catalogue_sets_reach_the_source() -> None:
    from streamrec.funnel.core import Funnel

    f = _with_source()
    assert isinstance(f, Funnel)
    now = 100.0 + DAY
    # (An unknown user: nothing seen.) Item 12 (row 2) is moved to next week, item 10 (row 0) re-dated to an hour ago.
    moved = f.with_catalogue({12: {"published_at": now + 7 * DAY}, 10: {"published_at": now - 3600}})
    items = moved.retrieve("new_arrivals", moved.context(999, {}, now=now))[0].tolist()
    assert items[0] == 0 and 2 not in items
    assert (
        f.retrieve("new_arrivals", f.context(999, {}, now=now))[0].tolist() != items
    )  # the original unchanged
    # The log replaced (no changes in force): the times go back to the bundle's.
    reset = moved.with_catalogue({})
    assert (
        reset.retrieve("new_arrivals", reset.context(999, {}, now=now))[0].tolist()
        == f.retrieve("new_arrivals", f.context(999, {}, now=now))[0].tolist()
    )
    # A new item upserted without a publication time is published when the log first described it:
    # the re-ranker's freshness quota and this source both see that time.
    first_seen = "1970-01-02T00:00:00+00:00"  # t = 86,400 s
    grown = f.with_catalogue({99: {"categories": ["drama"], "first_seen_at": first_seen}})
    row = grown.table.index(99)
    assert grown.reranker.metadata.published_at[row] == DAY == grown.table.published_at[row]
    assert grown.retrieve("new_arrivals", grown.context(999, {}, now=DAY + 60))[0].tolist()[0] == row


def test_merged_sources_cannot_name_it_while_it_is_off() -> None:
    import pytest
    from pydantic import ValidationError

    from streamrec.retrieval.config import RetrievalSettings

    with pytest.raises(ValidationError, match="new_arrivals.enabled is false"):
        RetrievalSettings(merged_sources=["two_tower", "new_arrivals"])
    on = RetrievalSettings(merged_sources=["two_tower", "new_arrivals"], new_arrivals={"enabled": True})
    assert on.merged_sources == ["two_tower", "new_arrivals"]


def test_bundles_without_the_source_are_readable_by_code_from_before_it(tmp_path: Path) -> None:
    """Off (the default), the setting is not written; a bundle lacking it loads with the source off."""
    import json

    from streamrec.bundle import LoadedBundle
    from streamrec.funnel.core import SOURCE_NAMES, Funnel
    from tests.unit.test_covisit import _funnel, save_tiny_bundle

    f = _funnel(covisit=False)
    assert isinstance(f, Funnel)
    save_tiny_bundle(f, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert "new_arrivals" not in saved["retrieval"]
    b = LoadedBundle(tmp_path / "b")
    assert not b.settings.new_arrivals.enabled
    assert (
        Funnel(b.retrieval_models(f.table, [], []), f.table, b.ranker, b.settings).source_names
        == SOURCE_NAMES
    )


def test_a_bundle_whose_settings_this_code_cannot_read_is_refused_clearly(tmp_path: Path) -> None:
    import json

    import pytest

    from streamrec.bundle import LoadedBundle
    from streamrec.errors import CorruptCheckpointError

    test_bundles_without_the_source_are_readable_by_code_from_before_it(tmp_path)
    path = tmp_path / "b" / "settings.json"
    saved = json.loads(path.read_text())
    saved["retrieval"]["a_source_from_the_future"] = {"enabled": True}
    path.write_text(json.dumps(saved))
    with pytest.raises(CorruptCheckpointError, match="a_source_from_the_future"):
        LoadedBundle(tmp_path / "b")
