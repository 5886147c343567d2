"""Re-ranking: the rule-based last stage of the funnel (ranked candidates -> final top-k).

Pure Python + numpy (no Ray, Feast or torch). See :mod:`streamrec.reranking.reranker` for the
rule order and :class:`ReRankConfig` for the settings.
"""

from streamrec.reranking.config import (
    DiversityConfig,
    FairnessConfig,
    FreshnessConfig,
    PromotionConfig,
    ReRankConfig,
)
from streamrec.reranking.metadata import ItemMetadata
from streamrec.reranking.reranker import (
    RULE_ORDER,
    Candidate,
    ReRankedItem,
    ReRanker,
    ReRankResult,
    ReRankSummary,
)

__all__ = [
    "RULE_ORDER",
    "Candidate",
    "DiversityConfig",
    "FairnessConfig",
    "FreshnessConfig",
    "ItemMetadata",
    "PromotionConfig",
    "ReRankConfig",
    "ReRankResult",
    "ReRankSummary",
    "ReRankedItem",
    "ReRanker",
]
