"""Candidate-generation settings (a trained bundle carries them; serving and training read them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from streamrec.config import StrictModel
from streamrec.retrieval.covisit import CovisitConfig
from streamrec.retrieval.new_arrivals import NewArrivalsConfig


class RetrievalSettings(StrictModel):
    """Candidate generation.

    Attributes:
        per_source: Candidates each source returns.
        merged: Candidates kept after the merge (ranker input).
        agreement_bonus: Score bonus per additional source agreeing on an item.
        normalisation: How each source's scores are made comparable before the merge
            (``rank`` measured best on ML-100K and the synthetic world; see docs/benchmarks.md).
        ranked: Items the ranker passes to the re-ranker.
        history_length: Recent interactions fed to the user tower.
        cf_factors: Latent factors of the CF model (ALS).
        cf_iterations: ALS iterations.
        trending_half_life_hours: Half-life of the trending score's decay.
        covisit: The co-visitation source (``enabled: true`` trains it; bundles that have it serve it).
        new_arrivals: The new-arrivals source (``enabled: true``: bundles trained so serve it).
        merged_sources: The sources whose candidates are merged (default: every source the bundle
            has). A fitted source left out is not called; CF's score stays a ranker input
            (``x_cf``) either way. E.g. co-visitation instead of CF (docs/benchmarks.md).
    """

    per_source: int = Field(150, ge=1)
    merged: int = Field(500, ge=1)
    agreement_bonus: float = Field(0.3, ge=0)
    normalisation: Literal["minmax", "rank"] = "rank"
    ranked: int = Field(50, ge=1)
    history_length: int = Field(20, ge=1)
    cf_factors: int = Field(64, ge=1)
    cf_iterations: int = Field(15, ge=1)
    trending_half_life_hours: float = Field(72.0, gt=0)
    covisit: CovisitConfig = Field(default_factory=CovisitConfig)
    new_arrivals: NewArrivalsConfig = Field(default_factory=NewArrivalsConfig)
    merged_sources: (
        list[Literal["two_tower", "cf", "affinity", "trending", "covisit", "new_arrivals"]] | None
    ) = Field(None, min_length=1)

    @model_validator(mode="after")
    def _merged_sources_are_trained(self) -> RetrievalSettings:
        if self.merged_sources and "new_arrivals" in self.merged_sources and not self.new_arrivals.enabled:
            raise ValueError(
                "retrieval.merged_sources names new_arrivals but retrieval.new_arrivals.enabled is false: "
                "enable the source or leave it out of merged_sources"
            )
        return self
