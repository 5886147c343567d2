"""Configuration of the re-ranking stage (strict: unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from streamrec.config import StrictModel


class PromotionConfig(StrictModel):
    """Promoted-item boost.

    Attributes:
        enabled: Apply the boost.
        mode: ``multiplicative`` raises a score by ``|score| * (factor - 1)`` (i.e. ``score *
            factor`` for positive scores, and still a raise for negative logits); ``additive``
            adds ``bonus``.
        factor: Multiplicative factor (>= 1).
        bonus: Additive bonus (>= 0).
        max_boosted: Most promoted items boosted per request (the best-scored ones); further
            promoted items compete on their own score. This caps the slots promotion can buy.
    """

    enabled: bool = True
    mode: Literal["multiplicative", "additive"] = "multiplicative"
    factor: float = Field(default=1.2, ge=1.0)
    bonus: float = Field(default=0.05, ge=0.0)
    max_boosted: int = Field(default=2, ge=0)


class FreshnessConfig(StrictModel):
    """At least ``min_items`` recently published items in the final top-k, when available.

    Attributes:
        enabled: Enforce the quota.
        window_hours: An item is fresh if published at most this long before the request.
        min_items: Fresh items wanted in the top-k (capped by how many candidates are fresh).
    """

    enabled: bool = True
    window_hours: float = Field(default=48.0, gt=0)
    min_items: int = Field(default=2, ge=0)


class DiversityConfig(StrictModel):
    """At most ``max_per_category`` items per category among the first ``window`` positions.

    Attributes:
        enabled: Apply the cap.
        max_per_category: Cap per category inside the window.
        window: Positions the cap applies to (the top 10 by default).
        categories: ``all`` counts an item toward each of its categories; ``primary`` only
            toward its first one.
    """

    enabled: bool = True
    max_per_category: int = Field(default=3, ge=1)
    window: int = Field(default=10, ge=1)
    categories: Literal["all", "primary"] = "all"


class FairnessConfig(StrictModel):
    """At least ``min_items`` slots for long-tail items or under-exposed creators, when available.

    Attributes:
        enabled: Enforce the quota.
        min_items: Such items wanted in the top-k (capped by how many candidates qualify).
        basis: ``item``: the item's own exposure is below ``item_exposure_below``; ``creator``:
            its creator's total exposure is below ``creator_exposure_below``; ``either``: both
            kinds qualify.
        item_exposure_below: Exposure count under which an item is long-tail.
        creator_exposure_below: Total exposure under which a creator is under-exposed.
    """

    enabled: bool = True
    min_items: int = Field(default=2, ge=0)
    basis: Literal["item", "creator", "either"] = "either"
    item_exposure_below: float = Field(default=100.0, ge=0)
    creator_exposure_below: float = Field(default=1000.0, ge=0)


class ReRankConfig(StrictModel):
    """Settings of :class:`~streamrec.reranking.ReRanker`.

    Attributes:
        k: Items returned by default (a request may ask for another ``k``).
        content_policy: Remove flagged items.
        hide_unpublished: Remove items whose ``published_at`` is after the request time (a
            release scheduled through the catalogue, or an offline evaluation at a cutoff before
            the item existed); an unknown time (0) counts as published.
        suppress_seen: Remove items the user already interacted with (``exclude`` ids are
            always removed).
        promotion: Promoted-item boost.
        freshness: Freshness quota.
        diversity: Per-category cap in the top window.
        fairness: Exposure-fairness quota.
        quota_priority: Which quota is kept whole when the freshness and fairness quotas cannot
            both fit in the top-k (the other is reduced).
    """

    k: int = Field(default=20, ge=1, le=100)
    content_policy: bool = True
    hide_unpublished: bool = True
    suppress_seen: bool = True
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    freshness: FreshnessConfig = Field(default_factory=FreshnessConfig)
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    quota_priority: Literal["freshness", "fairness"] = "freshness"
