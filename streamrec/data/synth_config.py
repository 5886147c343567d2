"""What the synthetic world is made of: its vocabularies, time units and :class:`SynthConfig`.

:mod:`streamrec.data.synth` generates the world from these; the simulator reads them back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import Field, field_validator, model_validator

from streamrec.config import StrictModel
from streamrec.data.click_model import ClickModelParams

#: Users per random-number block. Part of the world's definition: changing it changes the data.
RNG_BLOCK = 128
#: Version of the truth files' layout.
TRUTH_FORMAT = 1
#: The default end of the simulated window (fixed, so output is deterministic by seed).
DEFAULT_END = datetime(2026, 11, 1, tzinfo=UTC)

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
SECOND_US = 1_000_000

CATEGORY_NAMES: tuple[str, ...] = (
    "news", "sports", "music", "movies", "comedy", "gaming", "tech", "science", "food", "travel",
    "fashion", "health", "fitness", "finance", "education", "kids", "nature", "art", "history",
    "politics", "cars", "diy", "beauty", "pets", "books", "anime", "documentary", "business",
    "podcasts", "lifestyle",
)  # fmt: skip
GENDERS: tuple[str, ...] = ("female", "male", "nonbinary")
_GENDER_P = (0.48, 0.46, 0.02, 0.04)  # last: not given (null)
OCCUPATIONS: tuple[str, ...] = (
    "student", "engineer", "teacher", "healthcare", "sales", "artist", "manager", "retired",
    "service", "self-employed", "homemaker", "other",
)  # fmt: skip
_OCCUPATION_P = (0.15, 0.1, 0.06, 0.08, 0.09, 0.05, 0.09, 0.08, 0.1, 0.07, 0.04, 0.09)
#: (region, UTC offset in hours, share of users).
REGIONS: tuple[tuple[str, int, float], ...] = (
    ("us-west", -8, 0.1), ("us-east", -5, 0.2), ("latam", -3, 0.12), ("eu-west", 0, 0.14),
    ("eu-central", 1, 0.14), ("africa", 2, 0.06), ("india", 5, 0.12), ("apac", 8, 0.12),
)  # fmt: skip
#: Devices the synthetic users use (a subset of :data:`streamrec.data.schema.DEVICES`).
SYNTH_DEVICES: tuple[str, ...] = ("mobile", "web", "tv", "tablet")
_DEVICE_P = (0.55, 0.25, 0.12, 0.08)
#: Relative session starts per local hour (quiet nights, a lunch bump, an evening peak).
HOURLY_CYCLE: tuple[float, ...] = (
    0.6, 0.4, 0.3, 0.25, 0.25, 0.35, 0.7, 1.2, 1.5, 1.4, 1.3, 1.4,
    1.6, 1.5, 1.4, 1.5, 1.7, 2.0, 2.4, 2.8, 3.0, 2.8, 2.0, 1.2,
)  # fmt: skip
_ADJECTIVES = (
    "Quiet", "Bold", "Hidden", "Golden", "Electric", "Lost", "Bright", "Wild", "Silent", "Secret",
    "Little", "Endless", "Modern", "Ancient", "Urban", "Frozen", "Hot", "Simple", "Epic", "Daily",
)  # fmt: skip
_NOUNS = (
    "Harbor", "Journey", "Kitchen", "Signal", "Garden", "Machine", "River", "Story", "Season",
    "Street", "Planet", "Market", "Window", "Game", "Voice", "Country", "Code", "Island", "Road",
    "Guide",
)  # fmt: skip
_BACK_PUBLISH_GAP_US = SECOND_US  # back catalogue ends at least this long before the window
_SESSION_SLATE_GAP_US = 45 * SECOND_US
_MAX_SESSION_US = 50 * 60 * SECOND_US

# random streams (the first element of every spawn key)
_S_STRUCTURE, _S_ITEMS, _S_USERS, _S_EVENTS = 1, 2, 3, 4


# ----------------------------------------------------------------------------- configuration
class SynthConfig(StrictModel):
    """Size and shape of the synthetic world.

    The defaults make a demo world (2,000 users x 1,000 items x 14 days, about 180k impressions)
    that generates in about a second.

    Attributes:
        users: Number of users (ids ``1..users``).
        items: Number of items (ids ``1..items``, in publish order).
        days: Length of the simulated window in days; it ends at ``end``.
        seed: Seed of every random draw: same seed and settings, same world.
        end: End of the simulated window (exclusive). A naive datetime is taken as UTC.
        n_categories: Number of categories (the first 30 have names like ``news``).
        n_creators: Number of creators; ``None`` = ``max(1, items // 20)``.
        latent_dim: Dimension of the latent taste / content vectors.
        impressions_per_user_day: Mean impressions per active user-day for an average user
            (before within-slate de-duplication); heavier users see more.
        slate_size: Items per slate (a screenful).
        daily_active_rate: Mean probability that a user is active on a given day.
        extra_sessions_mean: Mean number of sessions beyond the first on an active day.
        affinity_concentration: Dirichlet concentration of category affinities (smaller = more
            focused tastes).
        category_size_exponent: Zipf exponent of category sizes.
        zipf_exponent: Zipf exponent of item popularity.
        back_catalogue_fraction: Share of items published before the window.
        back_catalogue_days: How far back the back catalogue reaches.
        fresh_window_days: "Fresh" candidates were published at most this long ago.
        mix_popular: Relative share of popularity-sampled candidates.
        mix_affine: Relative share of category-affine candidates.
        mix_fresh: Relative share of fresh candidates.
        promoted_fraction: Share of promoted items.
        flagged_fraction: Share of items flagged by content policy.
        chunk_size: Users generated per chunk (bounded memory); rounded up to a multiple of
            :data:`RNG_BLOCK`. Does not change the data.
        click: Click-model parameters.
    """

    users: int = Field(default=2000, ge=1)
    items: int = Field(default=1000, ge=1)
    days: int = Field(default=14, ge=1, le=3660)
    seed: int = Field(default=42, ge=0)
    end: datetime = DEFAULT_END
    n_categories: int = Field(default=20, ge=2, le=1000)
    n_creators: int | None = Field(default=None, ge=1)
    latent_dim: int = Field(default=16, ge=2, le=256)
    impressions_per_user_day: float = Field(default=20.0, gt=0)
    slate_size: int = Field(default=10, ge=1, le=1000)
    daily_active_rate: float = Field(default=0.35, gt=0, le=1)
    extra_sessions_mean: float = Field(default=0.4, ge=0)
    affinity_concentration: float = Field(default=0.3, gt=0)
    category_size_exponent: float = Field(default=0.6, ge=0)
    zipf_exponent: float = Field(default=1.0, ge=0)
    back_catalogue_fraction: float = Field(default=0.6, ge=0, le=1)
    back_catalogue_days: int = Field(default=365, ge=1)
    fresh_window_days: float = Field(default=3.0, gt=0)
    mix_popular: float = Field(default=0.35, ge=0)
    mix_affine: float = Field(default=0.45, ge=0)
    mix_fresh: float = Field(default=0.2, ge=0)
    promoted_fraction: float = Field(default=0.01, ge=0, le=1)
    flagged_fraction: float = Field(default=0.005, ge=0, le=1)
    chunk_size: int = Field(default=16384, ge=1)
    click: ClickModelParams = Field(default_factory=ClickModelParams)

    @field_validator("end")
    @classmethod
    def _utc_end(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @model_validator(mode="after")
    def _check_mix(self) -> SynthConfig:
        if self.mix_popular + self.mix_affine + self.mix_fresh <= 0:
            raise ValueError("mix_popular + mix_affine + mix_fresh must be positive")
        return self

    @property
    def start(self) -> datetime:
        """Start of the simulated window (inclusive)."""
        return self.end - timedelta(days=self.days)

    @property
    def creators(self) -> int:
        """The resolved number of creators."""
        return self.n_creators if self.n_creators is not None else max(1, self.items // 20)

    @property
    def block_chunk_size(self) -> int:
        """``chunk_size`` rounded up to a whole number of :data:`RNG_BLOCK` users."""
        return -(-self.chunk_size // RNG_BLOCK) * RNG_BLOCK


def category_names(n: int) -> list[str]:
    """Names of ``n`` categories: the named ones first, then ``category_NN``."""
    named = list(CATEGORY_NAMES[:n])
    return named + [f"category_{k:02d}" for k in range(len(named), n)]
