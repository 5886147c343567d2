"""Re-ranking rules: hand-made scenarios plus property-style checks over seeded random worlds.

The property tests draw a few hundred random catalogs / candidate lists (numpy, fixed seeds, no
extra dependency) and check that each constraint holds whenever it is satisfiable.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamrec.config import parse_config
from streamrec.errors import ConfigError, DataError, ServingError
from streamrec.reranking import (
    RULE_ORDER,
    Candidate,
    ItemMetadata,
    ReRankConfig,
    ReRanker,
    ReRankResult,
)

NOW = 1_800_000_000.0
HOUR = 3600.0
OLD = NOW - 30 * 24 * HOUR
FRESH = NOW - 1 * HOUR


def cfg(**rules: Any) -> ReRankConfig:
    """A config with every rule off except those given (``name={...}`` or ``name=True``)."""
    base: dict[str, Any] = {
        "content_policy": False,
        "hide_unpublished": False,
        "suppress_seen": False,
        "promotion": {"enabled": False},
        "freshness": {"enabled": False},
        "diversity": {"enabled": False},
        "fairness": {"enabled": False},
    }
    for name, value in rules.items():
        if isinstance(value, dict):
            base[name] = {"enabled": True, **value}
        elif name in ("content_policy", "hide_unpublished", "suppress_seen", "k", "quota_priority"):
            base[name] = value
        else:
            base[name] = {"enabled": bool(value)}
    return ReRankConfig.model_validate(base)


def meta_of(n: int, **cols: Any) -> ItemMetadata:
    return ItemMetadata(
        item_ids=cols.get("item_ids", np.arange(n) + 1000),
        categories=cols.get("categories", np.full(n, -1)),
        creators=cols.get("creators", np.arange(n)),
        published_at=cols.get("published_at", np.full(n, OLD)),
        promoted=cols.get("promoted"),
        flagged=cols.get("flagged"),
        exposure=cols.get("exposure", np.full(n, 1e6)),
    )


def ranked(n: int) -> list[Candidate]:
    """Candidates 0..n-1 with strictly decreasing scores."""
    return [Candidate(i, float(n - i), ("two_tower",)) for i in range(n)]


# --------------------------------------------------------------------------- random worlds


class World:
    def __init__(self, seed: int, single_category: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        n = int(rng.integers(60, 400))
        n_cat = int(rng.integers(2, 9))
        if single_category:
            cats: Any = rng.integers(-1, n_cat, n)  # -1: uncategorised
        else:
            cats = [
                list(rng.choice(n_cat, size=int(rng.integers(0, min(4, n_cat + 1))), replace=False))
                for _ in range(n)
            ]
        fresh_share = rng.uniform(0.0, 0.3)
        self.meta = ItemMetadata(
            item_ids=rng.permutation(10 * n)[:n] + 1,
            categories=cats,
            creators=rng.integers(-1, n // 4 + 1, n),
            published_at=np.where(
                rng.random(n) < fresh_share,
                NOW - rng.uniform(0, 47 * HOUR, n),
                NOW - rng.uniform(49, 2000, n) * HOUR,
            ),
            promoted=rng.random(n) < 0.1,
            flagged=rng.random(n) < 0.05,
            exposure=rng.pareto(1.0, n) * 200,
        )
        m = int(rng.integers(0, min(n, 300)))
        self.indices = rng.choice(n, m, replace=False)
        self.scores = rng.normal(size=m)
        self.seen = rng.choice(self.meta.item_ids, int(rng.integers(0, 30)))
        self.exclude = np.concatenate([rng.choice(self.meta.item_ids, int(rng.integers(0, 5))), [-5, -6]])
        self.k = int(rng.integers(1, 40))

    def run(self, config: ReRankConfig, **kw: Any) -> ReRankResult:
        args: dict[str, Any] = {"seen_ids": self.seen, "exclude_ids": self.exclude, "now": NOW, "k": self.k}
        args.update(kw)
        return ReRanker(self.meta, config).rerank_arrays(self.indices, self.scores, **args)

    def survivors(self, config: ReRankConfig) -> np.ndarray:
        """Candidate catalog rows left after the filters."""
        ids = self.meta.item_ids[self.indices]
        keep = np.ones(len(self.indices), bool)
        if config.content_policy:
            keep &= ~self.meta.flagged[self.indices]
        if config.suppress_seen:
            keep &= ~np.isin(ids, self.seen)
        keep &= ~np.isin(ids, self.exclude)
        return np.asarray(self.indices[keep])

    def fresh(self, rows: Any) -> np.ndarray:
        return np.asarray(self.meta.published_at[rows] >= NOW - 48 * HOUR)


SEEDS = range(150)


def is_sorted_desc(xs: list[float]) -> bool:
    return all(a >= b for a, b in zip(xs, xs[1:], strict=False))


# ------------------------------------------------------------------------------ basic shape


def test_no_rules_is_a_plain_top_k_by_score() -> None:
    rr = ReRanker(meta_of(30), cfg(k=5))
    cands = ranked(30)[::-1]  # input order does not matter
    res = rr.rerank(cands, now=NOW)
    assert [it.item_index for it in res.items] == [0, 1, 2, 3, 4]
    assert [it.original_rank for it in res.items] == [0, 1, 2, 3, 4]
    assert res.item_ids == [1000, 1001, 1002, 1003, 1004]
    assert all(it.reasons == () and it.sources == ("two_tower",) for it in res.items)
    assert res.summary.output_count == 5 and res.summary.input_count == 30


def test_empty_and_short_inputs() -> None:
    rr = ReRanker(meta_of(5))
    assert rr.rerank([], now=NOW).items == ()
    assert len(rr.rerank(ranked(3), k=20, now=NOW).items) == 3


def test_k_override_and_config_default() -> None:
    rr = ReRanker(meta_of(50), cfg(k=7))
    assert len(rr.rerank(ranked(50), now=NOW).items) == 7
    assert len(rr.rerank(ranked(50), k=12, now=NOW).items) == 12


def test_invalid_inputs_raise_serving_errors() -> None:
    rr = ReRanker(meta_of(5))
    with pytest.raises(ServingError, match="catalog rows must be in"):
        rr.rerank([Candidate(5, 1.0)], now=NOW)
    with pytest.raises(ServingError, match="must align"):
        rr.rerank_arrays([0, 1], [1.0], now=NOW)
    with pytest.raises(ServingError, match="k >= 1"):
        rr.rerank(ranked(3), k=0, now=NOW)


def test_nan_scores_sink_to_the_bottom() -> None:
    rr = ReRanker(meta_of(4), cfg(k=4))
    res = rr.rerank_arrays([0, 1, 2, 3], [np.nan, 1.0, 3.0, 2.0], now=NOW)
    assert [it.item_index for it in res.items] == [2, 3, 1, 0]


def test_summary_groups_follow_rule_order() -> None:
    res = ReRanker(meta_of(10)).rerank(ranked(10), now=NOW)
    assert tuple(res.summary.by_rule()) == RULE_ORDER
    assert RULE_ORDER == (
        "content_policy",
        "seen_suppression",
        "promoted_boost",
        "freshness",
        "diversity",
        "exposure_fairness",
    )


def test_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="unknown key 'diversity.max_per_cat'"):
        parse_config({"diversity": {"max_per_cat": 2}}, ReRankConfig)
    with pytest.raises(ConfigError, match="'k'"):
        parse_config({"k": 0}, ReRankConfig)
    with pytest.raises(ConfigError, match="promotion.factor"):
        parse_config({"promotion": {"factor": 0.5}}, ReRankConfig)


# ------------------------------------------------------------------------------ filters


def test_content_policy_and_seen_suppression_scenario() -> None:
    flagged = np.zeros(10, bool)
    flagged[[0, 3]] = True
    rr = ReRanker(meta_of(10, flagged=flagged), cfg(content_policy=True, suppress_seen=True, k=10))
    res = rr.rerank(ranked(10), seen_ids={1001, 1003}, exclude_ids=[1002, 1001, 99999], now=NOW)
    assert [it.item_index for it in res.items] == [4, 5, 6, 7, 8, 9]
    s = res.summary
    assert (s.removed_flagged, s.removed_seen, s.removed_excluded, s.unknown_exclude_ids) == (2, 1, 1, 1)


def test_unpublished_items_are_hidden_until_their_publication_time() -> None:
    # Rows 1 and 3 are scheduled releases (published after the request); row 4's time is unknown.
    published = np.full(6, OLD)
    published[[1, 3]] = NOW + 3600.0
    published[4] = 0.0
    meta = meta_of(6, published_at=published)
    res = ReRanker(meta, cfg(hide_unpublished=True, k=6)).rerank(ranked(6), now=NOW)
    assert [it.item_index for it in res.items] == [0, 2, 4, 5]
    assert res.summary.removed_unpublished == 2
    assert res.summary.by_rule()["content_policy"]["removed_unpublished"] == 2
    # At their publication time they are served; with the rule off, always.
    later = ReRanker(meta, cfg(hide_unpublished=True, k=6)).rerank(ranked(6), now=NOW + 3600.0)
    assert [it.item_index for it in later.items] == [0, 1, 2, 3, 4, 5]
    off = ReRanker(meta, cfg(k=6)).rerank(ranked(6), now=NOW)
    assert len(off.items) == 6 and off.summary.removed_unpublished == 0
    # The default keeps the rule on.
    assert ReRankConfig().hide_unpublished


def test_excludes_apply_even_when_seen_suppression_is_off() -> None:
    rr = ReRanker(meta_of(5), cfg(suppress_seen=False, k=5))
    res = rr.rerank(ranked(5), seen_ids=[1000], exclude_ids=[1001], now=NOW)
    assert res.item_ids == [1000, 1002, 1003, 1004]


def test_exclude_rows_remove_catalog_rows() -> None:
    rr = ReRanker(meta_of(6), cfg(k=6))
    res = rr.rerank(ranked(6), exclude_rows=np.array([0, 4]), exclude_ids=[1001], now=NOW)
    assert [it.item_index for it in res.items] == [2, 3, 5]
    assert res.summary.removed_excluded == 3


def test_duplicates_keep_the_best_copy() -> None:
    rr = ReRanker(meta_of(5), cfg(k=5))
    cands = [Candidate(1, 0.5, ("cf",)), Candidate(2, 0.7), Candidate(1, 0.9, ("two_tower",))]
    res = rr.rerank(cands, now=NOW)
    assert [(it.item_index, it.score, it.sources) for it in res.items] == [
        (1, 0.9, ("two_tower",)),
        (2, 0.7, ()),
    ]
    assert res.summary.duplicates_removed == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_property_filtered_items_never_returned(seed: int) -> None:
    w = World(seed)
    config = cfg(
        content_policy=True, suppress_seen=True, promotion={}, freshness={}, diversity={}, fairness={}
    )
    res = w.run(config)
    out_rows = [it.item_index for it in res.items]
    out_ids = set(res.item_ids)
    assert not any(w.meta.flagged[r] for r in out_rows)
    assert out_ids.isdisjoint(w.seen.tolist()) and out_ids.isdisjoint(w.exclude.tolist())
    assert len(set(out_rows)) == len(out_rows)
    survivors = w.survivors(config)
    assert len(res.items) == min(w.k, len(survivors))
    assert set(out_rows) <= set(survivors.tolist())
    s = res.summary
    assert s.removed_flagged + s.removed_seen + s.removed_excluded + len(survivors) == len(w.indices)
    assert s.unknown_exclude_ids == 2


# ------------------------------------------------------------------------------ promotion


def test_promoted_boost_multiplicative_is_capped_and_explained() -> None:
    promoted = np.zeros(10, bool)
    promoted[[5, 7, 9]] = True
    rr = ReRanker(meta_of(10, promoted=promoted), cfg(k=10, promotion={"factor": 2.0, "max_boosted": 2}))
    res = rr.rerank(ranked(10), now=NOW)  # scores 10..1
    by_row = {it.item_index: it for it in res.items}
    assert (
        by_row[5].score == 10.0
        and by_row[5].score_adjustment == 5.0
        and by_row[5].reasons == ("promoted_boost",)
    )
    assert by_row[7].score == 6.0
    assert by_row[9].score == 1.0 and by_row[9].reasons == ()  # over the cap: not boosted
    assert res.items[0].item_index == 0 and res.items[1].item_index == 5  # tie 10.0: original rank wins
    assert (res.summary.promoted_eligible, res.summary.promoted_boosted) == (3, 2)


def test_promoted_boost_additive_and_negative_scores() -> None:
    rr = ReRanker(
        meta_of(3, promoted=[True, True, False]), cfg(promotion={"mode": "multiplicative", "factor": 1.5})
    )
    res = rr.rerank_arrays([0, 1, 2], [-2.0, -4.0, -1.5], now=NOW)
    assert {it.item_index: it.score for it in res.items} == {
        0: -1.0,
        1: -2.0,
        2: -1.5,
    }  # raised, never lowered
    rr = ReRanker(
        meta_of(3, promoted=[False, True, False]), cfg(promotion={"mode": "additive", "bonus": 0.3})
    )
    res = rr.rerank_arrays([0, 1, 2], [1.0, 0.8, 0.9], now=NOW)
    assert [it.item_index for it in res.items] == [1, 0, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_property_promotion_boosts_at_most_max_best_promoted(seed: int) -> None:
    w = World(seed)
    max_boosted = seed % 4
    config = cfg(content_policy=True, promotion={"max_boosted": max_boosted, "factor": 1.3})
    res = w.run(config, k=300)  # everything that survives
    boosted = [it for it in res.items if "promoted_boost" in it.reasons]
    promoted = [it for it in res.items if w.meta.promoted[it.item_index]]
    assert len(boosted) == min(max_boosted, len(promoted)) == res.summary.promoted_boosted
    if boosted:  # the boosted ones are the best-scored promoted ones
        cutoff = min(it.original_score for it in boosted)
        assert all(it.original_score <= cutoff for it in promoted if it not in boosted)
    for it in res.items:
        expected = it.original_score + (abs(it.original_score) * 0.3 if it in boosted else 0.0)
        assert it.score == pytest.approx(expected)
    assert is_sorted_desc([it.score for it in res.items])


# ------------------------------------------------------------------------------ freshness


def test_freshness_fills_the_last_slots_with_the_best_fresh_items() -> None:
    pub = np.full(30, OLD)
    pub[[20, 25, 28]] = FRESH
    rr = ReRanker(meta_of(30, published_at=pub), cfg(k=10, freshness={"min_items": 2}))
    res = rr.rerank(ranked(30), now=NOW)
    assert [it.item_index for it in res.items] == [0, 1, 2, 3, 4, 5, 6, 7, 20, 25]
    assert res.items[-1].reasons == ("freshness_quota",) and res.items[-1].fresh
    s = res.summary
    assert (s.fresh_available, s.fresh_target, s.fresh_in_top_k, s.fresh_forced) == (3, 2, 2, 2)


def test_freshness_window_is_configurable_and_quota_capped_by_availability() -> None:
    pub = np.full(20, OLD)
    pub[15] = NOW - 60 * HOUR
    meta = meta_of(20, published_at=pub)
    assert (
        ReRanker(meta, cfg(k=5, freshness={"min_items": 3})).rerank(ranked(20), now=NOW).summary.fresh_target
        == 0
    )
    res = ReRanker(meta, cfg(k=5, freshness={"min_items": 3, "window_hours": 72})).rerank(ranked(20), now=NOW)
    assert res.summary.fresh_target == 1 and 15 in [it.item_index for it in res.items]


def test_an_item_dated_after_the_request_is_not_fresh() -> None:
    pub = np.full(20, OLD)
    pub[[12, 15]] = [NOW + 2 * HOUR, FRESH]  # 12: a publish date in the future (bad metadata)
    res = ReRanker(meta_of(20, published_at=pub), cfg(k=5, freshness={"min_items": 2})).rerank(
        ranked(20), now=NOW
    )
    rows = [it.item_index for it in res.items]
    assert 15 in rows and 12 not in rows
    assert (res.summary.fresh_available, res.summary.fresh_target) == (1, 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_property_freshness_quota_holds_when_satisfiable(seed: int) -> None:
    w = World(seed)
    m = seed % 6
    config = cfg(content_policy=True, suppress_seen=True, freshness={"min_items": m})
    res = w.run(config)
    rows = np.asarray([it.item_index for it in res.items], dtype=np.int64)
    survivors = w.survivors(config)
    available = int(w.fresh(survivors).sum())
    assert int(w.fresh(rows).sum()) >= min(m, available, len(rows))
    # minimal disruption: within each kind, items appear best-first and form a prefix by score
    for kind in (True, False):
        mine = [it for it in res.items if it.fresh == kind]
        pool = sorted(
            (
                float(w.scores[list(w.indices).index(r)])
                for r in survivors
                if w.fresh(np.array([r]))[0] == kind
            ),
            reverse=True,
        )
        assert [it.original_score for it in mine] == pool[: len(mine)]


# ------------------------------------------------------------------------------ fairness


def test_fairness_reserves_slots_for_long_tail_and_underexposed_creators() -> None:
    exposure = np.full(30, 5000.0)
    exposure[22] = 3.0  # long-tail item
    creators = np.arange(30)
    creators[22] = 0  # ... by a well-exposed creator
    creators[[26, 27]] = 99  # a creator with little total exposure
    exposure[[26, 27]] = 200.0
    meta = meta_of(30, exposure=exposure, creators=creators)
    base = {"min_items": 2, "item_exposure_below": 100, "creator_exposure_below": 1000}
    res = ReRanker(meta, cfg(k=8, fairness={**base, "basis": "either"})).rerank(ranked(30), now=NOW)
    assert [it.item_index for it in res.items] == [0, 1, 2, 3, 4, 5, 22, 26]
    assert res.items[-1].reasons == ("fairness_quota",) and res.items[-1].long_tail
    res = ReRanker(meta, cfg(k=8, fairness={**base, "basis": "item"})).rerank(ranked(30), now=NOW)
    assert [it.item_index for it in res.items][-1] == 22 and res.summary.fairness_target == 1
    res = ReRanker(meta, cfg(k=8, fairness={**base, "basis": "creator"})).rerank(ranked(30), now=NOW)
    assert [it.item_index for it in res.items][-2:] == [26, 27]


@pytest.mark.parametrize("seed", SEEDS)
def test_property_fairness_quota_holds_when_satisfiable(seed: int) -> None:
    w = World(seed)
    f = seed % 5
    config = cfg(
        content_policy=True,
        fairness={
            "min_items": f,
            "item_exposure_below": 20,
            "creator_exposure_below": 150,
            "basis": "either",
        },
    )
    res = w.run(config)
    survivors = w.survivors(config)
    fair = (w.meta.exposure[survivors] < 20) | (w.meta.creator_exposure[survivors] < 150)
    assert sum(it.long_tail for it in res.items) >= min(f, int(fair.sum()), len(res.items))
    assert res.summary.fairness_available == int(fair.sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_property_both_quotas_hold_when_they_fit_together(seed: int) -> None:
    w = World(seed)
    m, f = seed % 4, (seed // 4) % 4
    k = max(w.k, m + f)
    config = cfg(
        content_policy=True,
        freshness={"min_items": m},
        fairness={"min_items": f, "item_exposure_below": 10, "creator_exposure_below": 50},
    )
    res = w.run(config, k=k)
    s = res.summary
    assert s.fresh_in_top_k >= min(m, s.fresh_available, len(res.items))
    assert s.fairness_in_top_k >= min(f, s.fairness_available, len(res.items))
    assert not s.quota_conflict


def test_quota_priority_decides_when_quotas_cannot_both_fit() -> None:
    pub = np.full(20, OLD)
    pub[[10, 11, 12]] = FRESH
    exposure = np.full(20, 1e6)
    exposure[[15, 16, 17]] = 0.0
    meta = meta_of(20, published_at=pub, exposure=exposure)
    rules: dict[str, Any] = {
        "k": 4,
        "freshness": {"min_items": 3},
        "fairness": {"min_items": 3, "basis": "item", "item_exposure_below": 1},
    }
    res = ReRanker(meta, cfg(quota_priority="freshness", **rules)).rerank(ranked(20), now=NOW)
    assert [it.item_index for it in res.items] == [10, 11, 12, 15]
    assert res.summary.quota_conflict and res.summary.fresh_target == 3 and res.summary.fairness_target == 1
    res = ReRanker(meta, cfg(quota_priority="fairness", **rules)).rerank(ranked(20), now=NOW)
    assert [it.item_index for it in res.items] == [10, 15, 16, 17]


def test_items_that_are_fresh_and_long_tail_serve_both_quotas() -> None:
    pub = np.full(20, OLD)
    pub[[18, 19]] = FRESH
    exposure = np.full(20, 1e6)
    exposure[[18, 19]] = 0.0
    meta = meta_of(20, published_at=pub, exposure=exposure)
    config = cfg(
        k=3, freshness={"min_items": 2}, fairness={"min_items": 2, "basis": "item", "item_exposure_below": 1}
    )
    res = ReRanker(meta, config).rerank(ranked(20), now=NOW)
    assert [it.item_index for it in res.items] == [0, 18, 19]
    assert res.items[1].reasons == ("freshness_quota", "fairness_quota")


# ------------------------------------------------------------------------------ diversity


def test_diversity_defers_then_backfills() -> None:
    cats = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 2])
    rr = ReRanker(meta_of(10, categories=cats), cfg(k=10, diversity={"max_per_category": 2, "window": 6}))
    res = rr.rerank(ranked(10), now=NOW)
    rows = [it.item_index for it in res.items]
    # window of 6: two of cat 0, two of cat 1, one of cat 2, then nothing fits: best left (2) backfills
    assert rows[:6] == [0, 1, 4, 6, 9, 2]
    assert rows[6:] == [3, 5, 7, 8]  # after the window: score order
    reasons = {it.item_index: it.reasons for it in res.items}
    assert reasons[2] == ("diversity_backfill",) and reasons[9] == ()
    assert all(reasons[r] == ("diversity_deferred",) for r in (3, 5, 7, 8))
    s = res.summary
    assert s.diversity_backfilled == 1 and s.diversity_deferred == 3 and s.max_category_count == 3


def test_diversity_multi_category_and_primary_mode() -> None:
    cats = [[0, 1], [1], [0], [2], [1, 2]]
    meta = meta_of(5, categories=cats)
    res = ReRanker(meta, cfg(k=5, diversity={"max_per_category": 1, "window": 3})).rerank(ranked(5), now=NOW)
    assert [it.item_index for it in res.items][:2] == [0, 3]
    res = ReRanker(
        meta, cfg(k=5, diversity={"max_per_category": 1, "window": 3, "categories": "primary"})
    ).rerank(ranked(5), now=NOW)
    assert [it.item_index for it in res.items][:3] == [0, 1, 3]


def _window_counts(w: World, res: ReRankResult, window: int) -> Counter[int]:
    c: Counter[int] = Counter()
    for it in res.items[:window]:
        c.update(w.meta.category_tuple(it.item_index))
    return c


@pytest.mark.parametrize("seed", SEEDS)
def test_property_diversity_cap_holds_when_satisfiable(seed: int) -> None:
    w = World(seed, single_category=True)
    cap, window = 1 + seed % 3, 10
    config = cfg(
        content_policy=True, suppress_seen=True, diversity={"max_per_category": cap, "window": window}
    )
    res = w.run(config)
    survivors = w.survivors(config)
    n_win = min(window, len(res.items))
    cats = w.meta.categories[survivors, 0]
    capacity = int((cats < 0).sum()) + sum(min(cap, c) for c in Counter(cats[cats >= 0].tolist()).values())
    counts = _window_counts(w, res, window)
    if capacity >= n_win:
        assert max(counts.values(), default=0) <= cap
        assert res.summary.diversity_backfilled == 0
    else:
        assert res.summary.diversity_backfilled == n_win - capacity
    rows = [it.item_index for it in res.items]
    assert rows == _reference_diversity(w, survivors, cap, window, len(res.items))
    assert len(res.items) == min(w.k, len(survivors))
    # after the window, remaining items follow score order
    assert is_sorted_desc([it.score for it in res.items[window:]])
    assert set(rows) <= set(survivors.tolist())


def _reference_diversity(w: World, survivors: np.ndarray, cap: int, window: int, n: int) -> list[int]:
    """Greedy reference: each window position takes the best remaining item that keeps every one
    of its categories under the cap (else the best remaining one: a backfill), then score order."""
    score_of = dict(zip(w.indices.tolist(), w.scores.tolist(), strict=True))
    pool = sorted(survivors.tolist(), key=lambda r: -score_of[r])
    expected: list[int] = []
    counts: Counter[int] = Counter()
    while pool and len(expected) < n:
        if len(expected) < window:
            fits = [r for r in pool if all(counts[c] < cap for c in w.meta.category_tuple(r))]
            r = (fits or pool)[0]
            counts.update(w.meta.category_tuple(r))
        else:
            r = pool[0]
        pool.remove(r)
        expected.append(r)
    return expected


@pytest.mark.parametrize("seed", SEEDS)
def test_property_multi_category_diversity_is_consistent(seed: int) -> None:
    w = World(seed, single_category=False)
    cap = 1 + seed % 3
    config = cfg(diversity={"max_per_category": cap, "window": 10})
    res = w.run(config)
    survivors = w.survivors(config)
    assert [it.item_index for it in res.items] == _reference_diversity(w, survivors, cap, 10, len(res.items))
    if res.summary.diversity_backfilled == 0:
        assert max(_window_counts(w, res, 10).values(), default=0) <= cap


# ------------------------------------------------------------------------------ everything together


@pytest.mark.parametrize("seed", SEEDS)
def test_property_all_rules_together(seed: int) -> None:
    w = World(seed, single_category=bool(seed % 2))
    config = ReRankConfig.model_validate(
        {
            "freshness": {"min_items": 2},
            "fairness": {"min_items": 2, "item_exposure_below": 10, "creator_exposure_below": 50},
            "diversity": {"max_per_category": 2},
            "promotion": {"max_boosted": 2},
        }
    )
    k = max(w.k, 4)
    res = w.run(config, k=k)
    s = res.summary
    survivors = w.survivors(config)
    assert len(res.items) == min(k, len(survivors))
    assert s.fresh_in_top_k >= min(2, s.fresh_available, len(res.items))
    assert s.fairness_in_top_k >= min(2, s.fairness_available, len(res.items))
    assert sum("promoted_boost" in it.reasons for it in res.items) <= 2
    assert not any(w.meta.flagged[it.item_index] for it in res.items)
    if s.diversity_backfilled == 0:
        assert max(_window_counts(w, res, 10).values(), default=0) <= 2
    # deterministic, and independent of the input order (scores are distinct)
    again = w.run(config, k=k)
    assert again == res
    perm = w.rng.permutation(len(w.indices))
    shuffled = ReRanker(w.meta, config).rerank_arrays(
        w.indices[perm], w.scores[perm], seen_ids=w.seen, exclude_ids=w.exclude, now=NOW, k=k
    )
    assert shuffled.item_ids == res.item_ids


def test_rerank_and_rerank_arrays_agree() -> None:
    w = World(7)
    rr = ReRanker(w.meta)
    cands = [
        Candidate(int(i), float(s), ("cf", "trending")) for i, s in zip(w.indices, w.scores, strict=True)
    ]
    a = rr.rerank(cands, now=NOW, k=10, seen_ids=set(w.seen.tolist()))
    b = rr.rerank_arrays(
        w.indices, w.scores, [("cf", "trending")] * len(cands), now=NOW, k=10, seen_ids=w.seen
    )
    assert a == b


# ------------------------------------------------------------------------------ metadata


def test_metadata_from_records_and_lookups() -> None:
    meta = ItemMetadata.from_records(
        item_ids=[30, 10, 20],
        categories=[["drama", "comedy"], "drama", None],
        creators=["ann", None, "ann"],
        published_at=[1.0, 2.0, 3.0],
        exposure=[5, 7, 11],
    )
    assert meta.category_names == ("drama", "comedy") and meta.creator_names == ("ann",)
    assert (
        meta.category_tuple(0) == (0, 1) and meta.category_tuple(1) == (0,) and meta.category_tuple(2) == ()
    )
    assert meta.creator_exposure.tolist() == [16.0, 7.0, 16.0]
    assert meta.indices_of([20, 30, 99, 10]).tolist() == [2, 0, -1, 1]
    assert meta.count_unknown([99, 10, -1]) == 2
    assert not meta.promoted.any() and not meta.flagged.any()
    assert meta.with_exposure([0, 0, 1]).creator_exposure.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        meta.exposure[0] = 3  # read-only arrays


def test_metadata_validation() -> None:
    with pytest.raises(DataError, match="duplicate item ids"):
        meta_of(3, item_ids=[1, 1, 2])
    with pytest.raises(DataError, match="'published_at' has 2 rows but there are 3"):
        meta_of(3, published_at=[1.0, 2.0])


def test_metadata_from_items_frame() -> None:
    items = pd.DataFrame(
        {
            "item_id": [5, 6],
            "title": ["a", "b"],
            "categories": [["news"], ["news", "sport"]],
            "creator": ["c1", "c2"],
            "published_at": pd.to_datetime(["2027-01-15 08:00:00", "2020-01-01 00:00:00"], utc=True),
            "promoted": [True, False],
            "flagged": [False, True],
        }
    )
    meta = ItemMetadata.from_frame(items, exposure={6: 42})
    assert meta.item_ids.tolist() == [5, 6]
    assert meta.published_at[0] == pd.Timestamp("2027-01-15 08:00:00", tz="UTC").timestamp()
    assert meta.exposure.tolist() == [0.0, 42.0]
    assert meta.promoted.tolist() == [True, False] and meta.flagged.tolist() == [False, True]
    assert meta.category_tuple(1) == (0, 1)
