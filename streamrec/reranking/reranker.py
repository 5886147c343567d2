"""Rule-based re-ranking: the last stage of the funnel (~50-500 ranked candidates -> top-k).

Rule order (see ``docs/adr/ADR-005-degradation.md``):

1. **content_policy** — flagged items are removed, and (``hide_unpublished``) items whose
   publication time is after the request (a scheduled release).
2. **seen_suppression** — items the user already interacted with, and the request's ``exclude``
   ids, are removed; duplicate candidates keep their best-scored copy.
3. **promoted_boost** — the best ``max_boosted`` promoted items get a score boost.
4. Candidates are ordered by adjusted score (ties: original rank), then the top-k is filled
   greedily, position by position, under three constraints:

   * **freshness** — at least ``min_items`` items published within the window,
   * **exposure_fairness** — at least ``min_items`` long-tail items / under-exposed creators,
   * **diversity** — at most ``max_per_category`` items per category in the first ``window``
     positions.

   At each position the best-scored remaining item is taken, unless (a) taking it would leave
   too few slots to meet the freshness / fairness quotas — then the best item that keeps them
   reachable is taken — or (b) it is inside the diversity window and its category is full —
   then it is deferred to a later position. The quotas are *hard* (met whenever enough
   qualifying candidates exist; if both cannot fit, ``quota_priority`` decides which yields);
   diversity is *soft*: when no remaining item fits the cap, the best one is used anyway
   (backfill). Quota items are therefore placed as late as their score allows.

The result is deterministic for a given input and ``now``. Everything before the greedy loop
is vectorised with numpy; the loop touches Python objects only for the k picks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from streamrec.errors import ServingError
from streamrec.reranking.config import ReRankConfig
from streamrec.reranking.metadata import ItemMetadata

#: Item ids given to the seen / exclude filters.
IdsInput = Iterable[int] | npt.NDArray[np.integer[Any]]

#: The rules, in the order they are applied.
RULE_ORDER: tuple[str, ...] = (
    "content_policy",
    "seen_suppression",
    "promoted_boost",
    "freshness",
    "diversity",
    "exposure_fairness",
)

# Reason codes attached to output items.
REASON_PROMOTED = "promoted_boost"
REASON_FRESHNESS = "freshness_quota"
REASON_FAIRNESS = "fairness_quota"
REASON_DIVERSITY_BACKFILL = "diversity_backfill"
REASON_DIVERSITY_DEFERRED = "diversity_deferred"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ranked candidate.

    Attributes:
        index: Catalog row of the item in the :class:`ItemMetadata` (not the item id; see
            :meth:`ItemMetadata.indices_of`).
        score: Ranker score (higher is better).
        sources: Retrieval sources that produced it.
    """

    index: int
    score: float
    sources: tuple[str, ...] = ()


class ReRankedItem(NamedTuple):
    """One item of the re-ranked top-k (a named tuple: immutable and cheap to build).

    Attributes:
        item_index: Catalog row.
        item_id: Item id.
        score: Score after adjustments (the promoted boost).
        original_score: Ranker score.
        original_rank: 0-based rank by ranker score among the input candidates.
        sources: Retrieval sources.
        reasons: Why the item was adjusted or placed: ``promoted_boost``, ``freshness_quota``,
            ``fairness_quota`` (placed to meet a quota ahead of better-scored items),
            ``diversity_deferred`` (pushed down by the category cap), ``diversity_backfill``
            (placed although its category was full: nothing else fit).
        fresh: Published within the freshness window.
        long_tail: Counts toward the exposure-fairness quota.
    """

    item_index: int
    item_id: int
    score: float
    original_score: float
    original_rank: int
    sources: tuple[str, ...]
    reasons: tuple[str, ...]
    fresh: bool
    long_tail: bool

    @property
    def score_adjustment(self) -> float:
        """``score - original_score``."""
        return self.score - self.original_score


@dataclass(frozen=True, slots=True)
class ReRankSummary:
    """What each rule did to one request.

    Attributes:
        input_count: Candidates received.
        output_count: Items returned.
        k: Items asked for.
        removed_flagged: Removed by the content policy.
        removed_unpublished: Removed as not published yet at the request (``hide_unpublished``).
        removed_seen: Removed as already seen.
        removed_excluded: Removed because the request excluded them (and not already counted).
        duplicates_removed: Duplicate candidates dropped.
        unknown_exclude_ids: ``exclude`` ids not in the catalog.
        promoted_eligible: Promoted candidates left after filtering.
        promoted_boosted: Promoted candidates boosted (<= ``max_boosted``).
        promoted_in_top_k: Promoted items in the output.
        fresh_available: Fresh candidates left after filtering.
        fresh_target: Fresh items required (quota capped by availability and ``k``).
        fresh_in_top_k: Fresh items in the output.
        fresh_forced: Fresh items placed ahead of better-scored items to meet the quota.
        diversity_deferred: Positions where a better-scored item was skipped for the cap.
        diversity_backfilled: Positions filled against the cap because nothing else fit.
        max_category_count: Largest per-category count inside the diversity window.
        fairness_available: Long-tail / under-exposed candidates left after filtering.
        fairness_target: Such items required.
        fairness_in_top_k: Such items in the output.
        fairness_forced: Such items placed ahead of better-scored items to meet the quota.
        quota_conflict: The two quotas could not both fit; ``quota_priority`` decided.
    """

    input_count: int
    output_count: int
    k: int
    removed_flagged: int = 0
    removed_unpublished: int = 0
    removed_seen: int = 0
    removed_excluded: int = 0
    duplicates_removed: int = 0
    unknown_exclude_ids: int = 0
    promoted_eligible: int = 0
    promoted_boosted: int = 0
    promoted_in_top_k: int = 0
    fresh_available: int = 0
    fresh_target: int = 0
    fresh_in_top_k: int = 0
    fresh_forced: int = 0
    diversity_deferred: int = 0
    diversity_backfilled: int = 0
    max_category_count: int = 0
    fairness_available: int = 0
    fairness_target: int = 0
    fairness_in_top_k: int = 0
    fairness_forced: int = 0
    quota_conflict: bool = False

    def by_rule(self) -> dict[str, dict[str, int | bool]]:
        """The counts grouped by rule, in :data:`RULE_ORDER`.

        For logs and offline analysis; a response carries each item's ``reasons`` instead.
        """
        d = asdict(self)
        groups = {
            "content_policy": ("removed_flagged", "removed_unpublished"),
            "seen_suppression": (
                "removed_seen",
                "removed_excluded",
                "duplicates_removed",
                "unknown_exclude_ids",
            ),
            "promoted_boost": ("promoted_eligible", "promoted_boosted", "promoted_in_top_k"),
            "freshness": ("fresh_available", "fresh_target", "fresh_in_top_k", "fresh_forced"),
            "diversity": ("diversity_deferred", "diversity_backfilled", "max_category_count"),
            "exposure_fairness": (
                "fairness_available",
                "fairness_target",
                "fairness_in_top_k",
                "fairness_forced",
                "quota_conflict",
            ),
        }
        return {rule: {f: d[f] for f in groups[rule]} for rule in RULE_ORDER}


@dataclass(frozen=True, slots=True)
class ReRankResult:
    """The re-ranked top-k and what each rule did.

    Attributes:
        items: The final items, best first.
        summary: Per-rule counts.
    """

    items: tuple[ReRankedItem, ...]
    summary: ReRankSummary

    @property
    def item_ids(self) -> list[int]:
        """Item ids of :attr:`items`, in order."""
        return [it.item_id for it in self.items]


@dataclass(slots=True)
class _Selection:
    """Counters and per-candidate reasons from :meth:`ReRanker._select`."""

    reasons: dict[int, list[str]]
    fresh_target: int
    fair_target: int
    fresh_forced: int
    fair_forced: int
    deferred: int
    backfilled: int
    max_category_count: int
    quota_conflict: bool


def _quota_feasible(a: int, b: int, both: int, only_a: int, only_b: int, slots: int) -> bool:
    """Whether ``a`` items of kind A and ``b`` of kind B can be chosen within ``slots`` picks.

    ``both`` items count for A and B, ``only_a`` for A, ``only_b`` for B. Using dual items
    first, up to ``max(a, b)``, is optimal: it never costs an extra slot and spares the pools.
    """
    x = min(both, max(a, b))
    ra = max(0, a - x)
    rb = max(0, b - x)
    return ra <= only_a and rb <= only_b and x + ra + rb <= slots


def _isin(values: npt.NDArray[np.int64], ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """``np.isin`` for small arrays without its fixed overhead (sort + binary search)."""
    if len(ids) == 0:
        return np.zeros(len(values), dtype=bool)
    ref = np.sort(ids)
    pos = np.minimum(np.searchsorted(ref, values), len(ref) - 1)
    return ref[pos] == values


def _as_id_array(ids: IdsInput | None) -> npt.NDArray[np.int64]:
    if ids is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64, copy=False).reshape(-1)
    return np.fromiter(ids, dtype=np.int64)


class ReRanker:
    """Applies the re-ranking rules (see the module docstring for the order).

    Stateless apart from its configuration and the metadata arrays, so one instance can serve
    concurrent requests; swap :attr:`metadata` (one reference assignment) when the item
    catalog is refreshed.

    Args:
        metadata: Per-item arrays, indexed by catalog row.
        config: Rule settings (defaults: :class:`ReRankConfig`).
    """

    def __init__(self, metadata: ItemMetadata, config: ReRankConfig | None = None) -> None:
        self.metadata = metadata
        self.config = config or ReRankConfig()

    def rerank(
        self,
        candidates: Sequence[Candidate],
        *,
        k: int | None = None,
        seen_ids: IdsInput | None = None,
        exclude_ids: IdsInput | None = None,
        exclude_rows: IdsInput | None = None,
        now: float | None = None,
    ) -> ReRankResult:
        """Re-rank ``candidates`` into the top-k.

        Args:
            candidates: Ranked candidates (any order; scores decide).
            k: Items to return (default ``config.k``).
            seen_ids: Item ids the user already interacted with.
            exclude_ids: Item ids the request excludes.
            exclude_rows: Catalog rows to remove (e.g. exclude ids already resolved to rows).
            now: Request time, epoch seconds (default: the wall clock).

        Raises:
            ServingError: a candidate's catalog row is out of range.
        """
        n = len(candidates)
        indices = np.fromiter((c.index for c in candidates), dtype=np.int64, count=n)
        scores = np.fromiter((c.score for c in candidates), dtype=np.float64, count=n)
        return self.rerank_arrays(
            indices,
            scores,
            [c.sources for c in candidates],
            k=k,
            seen_ids=seen_ids,
            exclude_ids=exclude_ids,
            exclude_rows=exclude_rows,
            now=now,
        )

    def rerank_arrays(
        self,
        indices: npt.ArrayLike,
        scores: npt.ArrayLike,
        sources: Sequence[Sequence[str]] | None = None,
        *,
        k: int | None = None,
        seen_ids: IdsInput | None = None,
        exclude_ids: IdsInput | None = None,
        exclude_rows: IdsInput | None = None,
        now: float | None = None,
    ) -> ReRankResult:
        """Re-rank candidates given as parallel arrays (the fast path for the ranker's output).

        Args:
            indices: Catalog rows of the candidates.
            scores: Their ranker scores.
            sources: Their retrieval sources, aligned with ``indices`` (optional).
            k: Items to return (default ``config.k``).
            seen_ids: Item ids the user already interacted with.
            exclude_ids: Item ids the request excludes (unknown ids are counted in the summary).
            exclude_rows: Catalog rows to remove (e.g. exclude ids already resolved to rows);
                counted with ``exclude_ids`` as ``removed_excluded``.
            now: Request time, epoch seconds (default: the wall clock).

        Raises:
            ServingError: the arrays disagree in length, or a catalog row is out of range.
        """
        cfg = self.config
        meta = self.metadata
        k = cfg.k if k is None else int(k)
        if k < 1:
            raise ServingError(f"re-ranking needs k >= 1, got {k}")
        now_s = time.time() if now is None else float(now)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        sc = np.asarray(scores, dtype=np.float64).reshape(-1)
        n0 = len(idx)
        if len(sc) != n0 or (sources is not None and len(sources) != n0):
            raise ServingError(
                f"re-ranking got {n0} indices, {len(sc)} scores and "
                f"{'no' if sources is None else len(sources)} source lists; they must align"
            )
        exclude = _as_id_array(exclude_ids)
        unknown_excl = meta.count_unknown(exclude) if len(exclude) else 0
        if n0 == 0:
            return ReRankResult((), ReRankSummary(0, 0, k, unknown_exclude_ids=unknown_excl))
        if int(idx.min()) < 0 or int(idx.max()) >= len(meta):
            raise ServingError(
                f"candidate catalog rows must be in [0, {len(meta)}); got [{int(idx.min())}, "
                f"{int(idx.max())}] — is the item metadata stale?"
            )
        sc = np.where(np.isnan(sc), -np.inf, sc)  # NaN scores sink to the bottom

        # Original rank: by ranker score, ties by input position.
        order0 = np.argsort(-sc, kind="stable")
        rank0 = np.empty(n0, dtype=np.int64)
        rank0[order0] = np.arange(n0)

        keep = np.ones(n0, dtype=bool)
        # 1. content policy
        removed_flagged = 0
        if cfg.content_policy:
            flagged = meta.flagged[idx]
            removed_flagged = int(np.count_nonzero(flagged))
            keep &= ~flagged
        removed_unpublished = 0
        if cfg.hide_unpublished:
            unpublished = keep & (meta.published_at[idx] > now_s)  # 0 = unknown: published
            removed_unpublished = int(np.count_nonzero(unpublished))
            keep &= ~unpublished
        # 2. seen-item suppression, request excludes, duplicates
        cand_ids = meta.item_ids[idx]
        removed_seen = removed_excl = 0
        if cfg.suppress_seen and seen_ids is not None:
            seen = _as_id_array(seen_ids)
            if len(seen):
                seen_mask = keep & _isin(cand_ids, seen)
                removed_seen = int(np.count_nonzero(seen_mask))
                keep &= ~seen_mask
        excl_rows = _as_id_array(exclude_rows)
        if len(exclude) or len(excl_rows):
            excl_mask = keep & (_isin(cand_ids, exclude) | _isin(idx, excl_rows))
            removed_excl = int(np.count_nonzero(excl_mask))
            keep &= ~excl_mask
        alive_by_score = order0[keep[order0]]
        alive_rows = np.sort(idx[alive_by_score])
        duplicates = 0
        if len(alive_rows) > 1 and bool(np.any(alive_rows[1:] == alive_rows[:-1])):
            _, first = np.unique(idx[alive_by_score], return_index=True)
            duplicates = len(alive_by_score) - len(first)
            keep[:] = False
            keep[alive_by_score[first]] = True

        # 3. promoted boost
        adj = sc.copy()
        promo = cfg.promotion
        promoted_mask = keep & meta.promoted[idx]
        promoted_pos = np.flatnonzero(promoted_mask)
        boosted_pos = promoted_pos[:0]
        if promo.enabled and promo.max_boosted > 0 and len(promoted_pos):
            boosted_pos = promoted_pos[np.argsort(rank0[promoted_pos], kind="stable")[: promo.max_boosted]]
            base = sc[boosted_pos]
            if promo.mode == "multiplicative":
                delta = np.where(np.isfinite(base), np.abs(base) * (promo.factor - 1.0), 0.0)
            else:
                delta = np.full(len(boosted_pos), promo.bonus)
            adj[boosted_pos] += delta
        boosted = np.zeros(n0, dtype=bool)
        boosted[boosted_pos] = True

        # 4. order by adjusted score (ties: original rank), then constrained greedy fill.
        alive = np.flatnonzero(keep)
        order = alive[np.lexsort((rank0[alive], -adj[alive]))]
        fresh = np.zeros(n0, dtype=bool)
        if cfg.freshness.enabled:
            # Published inside the window and not after the request (a future date is not fresh).
            pub = meta.published_at[idx]
            fresh = (pub >= now_s - cfg.freshness.window_hours * 3600.0) & (pub <= now_s)
        fair = np.zeros(n0, dtype=bool)
        if cfg.fairness.enabled:
            fcfg = cfg.fairness
            if fcfg.basis in ("item", "either"):
                fair |= meta.exposure[idx] < fcfg.item_exposure_below
            if fcfg.basis in ("creator", "either"):
                fair |= meta.creator_exposure[idx] < fcfg.creator_exposure_below

        picks, info = self._select(order, idx, fresh, fair, k)

        picked = np.asarray(picks, dtype=np.int64)
        reasons_of = info.reasons
        items = [
            ReRankedItem(
                item_index=row,
                item_id=item_id,
                score=score,
                original_score=orig,
                original_rank=rank,
                sources=tuple(sources[p]) if sources is not None else (),
                reasons=(REASON_PROMOTED, *reasons_of.get(p, ()))
                if is_boosted
                else tuple(reasons_of.get(p, ())),
                fresh=is_fresh,
                long_tail=is_fair,
            )
            for p, row, item_id, score, orig, rank, is_boosted, is_fresh, is_fair in zip(
                picks,
                idx[picked].tolist(),
                cand_ids[picked].tolist(),
                adj[picked].tolist(),
                sc[picked].tolist(),
                rank0[picked].tolist(),
                boosted[picked].tolist(),
                fresh[picked].tolist(),
                fair[picked].tolist(),
                strict=True,
            )
        ]
        summary = ReRankSummary(
            input_count=n0,
            output_count=len(items),
            k=k,
            removed_flagged=removed_flagged,
            removed_unpublished=removed_unpublished,
            removed_seen=removed_seen,
            removed_excluded=removed_excl,
            duplicates_removed=int(duplicates),
            unknown_exclude_ids=unknown_excl,
            promoted_eligible=len(promoted_pos),
            promoted_boosted=len(boosted_pos),
            promoted_in_top_k=int(np.count_nonzero(promoted_mask[picked])) if len(picked) else 0,
            fresh_available=int(np.count_nonzero(fresh[alive])),
            fresh_target=info.fresh_target,
            fresh_in_top_k=int(np.count_nonzero(fresh[picked])) if len(picked) else 0,
            fresh_forced=info.fresh_forced,
            diversity_deferred=info.deferred,
            diversity_backfilled=info.backfilled,
            max_category_count=info.max_category_count,
            fairness_available=int(np.count_nonzero(fair[alive])),
            fairness_target=info.fair_target,
            fairness_in_top_k=int(np.count_nonzero(fair[picked])) if len(picked) else 0,
            fairness_forced=info.fair_forced,
            quota_conflict=info.quota_conflict,
        )
        return ReRankResult(tuple(items), summary)

    def _select(
        self,
        order: npt.NDArray[np.int64],
        idx: npt.NDArray[np.int64],
        fresh: npt.NDArray[np.bool_],
        fair: npt.NDArray[np.bool_],
        k: int,
    ) -> tuple[list[int], _Selection]:
        """Greedy fill of the top-k under the quota and diversity constraints.

        Returns:
            The chosen candidate positions in output order, and counters / per-item reasons.
        """
        cfg = self.config
        meta = self.metadata
        n = len(order)
        slots = min(k, n)
        # kind: bit 0 = fresh, bit 1 = long-tail / under-exposed
        kinds = (fresh[order].astype(np.int64) + 2 * fair[order].astype(np.int64)).tolist()
        pool: list[int] = np.bincount(np.asarray(kinds, dtype=np.int64), minlength=4).tolist()
        want_a = min(cfg.freshness.min_items, pool[1] + pool[3], slots) if cfg.freshness.enabled else 0
        want_b = min(cfg.fairness.min_items, pool[2] + pool[3], slots) if cfg.fairness.enabled else 0
        conflict = False
        while not _quota_feasible(want_a, want_b, pool[3], pool[1], pool[2], slots):
            conflict = True
            if cfg.quota_priority == "freshness":
                if want_b > 0:
                    want_b -= 1
                else:
                    want_a -= 1
            elif want_a > 0:
                want_a -= 1
            else:
                want_b -= 1
        need_a, need_b = want_a, want_b

        div = cfg.diversity
        window = min(div.window, slots) if div.enabled else 0
        cap = div.max_per_category
        primary = div.categories == "primary"
        cat_count: dict[int, int] = {}
        order_l = order.tolist()
        rows_l = idx[order].tolist()  # catalog row of each position in ``order``
        cat_tuples = meta.category_tuples
        full: set[int] = set()  # categories at the cap inside the window

        remaining = list(range(n))  # positions in ``order`` not yet picked
        picks: list[int] = []
        reasons: dict[int, list[str]] = {}
        deferred_items: set[int] = set()
        deferred = backfilled = fresh_forced = fair_forced = 0
        all_kinds: tuple[bool, ...] = (True, True, True, True)

        for p in range(slots):
            in_window = p < window
            if need_a == 0 and need_b == 0:
                if not in_window:  # nothing constrains the rest: take it in score order
                    for j in remaining[: slots - p]:
                        if j in deferred_items:
                            reasons[order_l[j]] = [REASON_DIVERSITY_DEFERRED]
                        picks.append(order_l[j])
                    break
                allowed = all_kinds
            else:
                left = slots - p - 1
                # Taking an item of kind 0 (neither fresh nor long-tail) is the most demanding
                # choice; when even that keeps the quotas reachable, every kind does.
                if pool[0] > 0 and _quota_feasible(need_a, need_b, pool[3], pool[1], pool[2], left):
                    allowed = all_kinds
                else:
                    allowed = (
                        False,
                        _quota_feasible(max(0, need_a - 1), need_b, pool[3], pool[1] - 1, pool[2], left),
                        _quota_feasible(need_a, max(0, need_b - 1), pool[3], pool[1], pool[2] - 1, left),
                        _quota_feasible(
                            max(0, need_a - 1), max(0, need_b - 1), pool[3] - 1, pool[1], pool[2], left
                        ),
                    )
            first_allowed = -1
            pick = -1
            quota_skip = False
            for r, j in enumerate(remaining):
                if not allowed[kinds[j]]:
                    quota_skip = True
                    continue
                if first_allowed < 0:
                    first_allowed = r
                if not in_window:
                    pick = r
                    break
                if j in deferred_items:  # counts only grow: once over the cap, always over it
                    continue
                cats = cat_tuples[rows_l[j]]
                if full.isdisjoint(cats[:1] if primary else cats):
                    pick = r
                    break
                deferred_items.add(j)
            why: list[str] = []
            if pick < 0:  # nothing fits the diversity cap: backfill with the best allowed item
                pick = max(first_allowed, 0)
                backfilled += 1
                why.append(REASON_DIVERSITY_BACKFILL)
            elif pick != first_allowed:
                deferred += 1
            j = remaining.pop(pick)
            t = kinds[j]
            pool[t] -= 1
            if quota_skip:
                if t & 1 and need_a > 0:
                    why.append(REASON_FRESHNESS)
                    fresh_forced += 1
                if t & 2 and need_b > 0:
                    why.append(REASON_FAIRNESS)
                    fair_forced += 1
            if j in deferred_items and REASON_DIVERSITY_BACKFILL not in why:
                why.append(REASON_DIVERSITY_DEFERRED)
            need_a = max(0, need_a - (t & 1))
            need_b = max(0, need_b - (t >> 1))
            if in_window:
                cats = cat_tuples[rows_l[j]]
                for c in cats[:1] if primary else cats:
                    cnt = cat_count[c] = cat_count.get(c, 0) + 1
                    if cnt >= cap:
                        full.add(c)
            cand = order_l[j]
            if why:
                reasons[cand] = why
            picks.append(cand)

        info = _Selection(
            reasons=reasons,
            fresh_target=want_a,
            fair_target=want_b,
            fresh_forced=fresh_forced,
            fair_forced=fair_forced,
            deferred=deferred,
            backfilled=backfilled,
            max_category_count=max(cat_count.values(), default=0),
            quota_conflict=conflict,
        )
        return picks, info
