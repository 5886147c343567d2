"""An experiment's pre-registered definition and the deterministic assignment of users to variants.

The definition (``args.experiment`` of a Serve config) is fixed before any data is seen: the
metric suite, guardrails, expected effect and rollout steps. What changes while the experiment
runs (which registry version is the challenger, the share of traffic it gets) lives in the model
registry (:mod:`streamrec.experiments.rollout`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from streamrec.config import StrictModel
from streamrec.errors import ConfigError, DataNotFoundError
from streamrec.paths import resolve_data_dir

log = logging.getLogger(__name__)

#: The variant served by the champion while an experiment runs.
CONTROL = "control"
#: The variant served by the challenger.
TREATMENT = "treatment"
#: The gradual rollout of the seed: share of traffic on the challenger at each step.
DEFAULT_STEPS: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 1.0)

Metric = Literal["ctr", "completion_rate", "coverage"]
#: The default pre-registered metric suite.
SUITE: tuple[Metric, ...] = ("ctr", "completion_rate", "coverage")


class Guardrails(StrictModel):
    """Limits the treatment must stay within, whatever its primary metric does.

    Attributes:
        latency_p99_ratio: Treatment p99 latency at most this multiple of control's.
        latency_p99_ms: And at most this many milliseconds (the serving budget).
        error_rate_increase: Treatment error rate (requests its model did not answer) at most
            this much above control's (absolute).
        metric_drop: The primary metric's interval must not lie entirely below
            ``-metric_drop`` relative to control (a significantly worse treatment is a breach).
        min_requests: Requests each variant needs before the latency and error-rate guardrails
            are judged (one slow request among five is not a p99).
    """

    latency_p99_ratio: float = Field(default=1.5, gt=1.0)
    latency_p99_ms: float = Field(default=200.0, gt=0)
    error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    metric_drop: float = Field(default=0.0, ge=0, le=1)
    min_requests: int = Field(default=50, ge=1)


class ShadowGates(StrictModel):
    """The gates a shadow must pass before it may take canary traffic (``is_ready_for_canary``).

    Attributes:
        min_requests: Shadow-scored requests at least.
        min_correlation: Spearman correlation of shadow and production scores on the candidates
            both ranked, median over requests, at least.
        max_p99_latency_ms: Shadow funnel p99 latency at most.
        max_error_rate: Share of shadow runs that failed at most.
        max_score_psi: PSI of the shadow's score distribution against production's at most.
    """

    min_requests: int = Field(default=1000, ge=1)
    min_correlation: float = Field(default=0.7, ge=-1, le=1)
    max_p99_latency_ms: float = Field(default=200.0, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_score_psi: float = Field(default=0.25, ge=0)


class ShadowConfig(StrictModel):
    """Shadow scoring on the serving replicas.

    Attributes:
        sample_rate: Share of requests the shadow bundle also scores (off the response path).
        max_concurrent: Shadow runs in flight per replica at most; a request arriving while the
            shadow is this busy is not shadowed (counted as skipped), never delayed.
        threads: Worker threads of the shadow's own stage runner (not the production one's).
        gates: The canary gates.
    """

    sample_rate: float = Field(default=1.0, ge=0, le=1)
    max_concurrent: int = Field(default=2, ge=1, le=64)
    threads: int = Field(default=2, ge=1, le=16)
    gates: ShadowGates = Field(default_factory=ShadowGates)


class ExperimentConfig(StrictModel):
    """One experiment, pre-registered (``args.experiment`` of the Serve config).

    Attributes:
        name: The experiment's name: where its definition and records are kept.
        salt: Hashing salt of the assignment (default: ``name``). A new salt reshuffles users.
        treatment_share: Share of users on the challenger when the registry names no rollout
            step (a canary: 0.05; an A/B test: 0.5). A rollout overrides it.
        primary_metric: The metric the decision rests on.
        metrics: The pre-registered suite (the primary metric is always in it).
        expected_effect: Relative lift of the primary metric the test is sized for (0.05 = +5%).
        alpha: Two-sided significance level of the primary test.
        power: Power the minimum sample size is computed for.
        srm_alpha: A sample-ratio-mismatch p-value below this invalidates the comparison.
        guardrails: Limits that roll the treatment back when breached.
        rollout_steps: Treatment shares of the gradual rollout, increasing, ending at 1.0.
        min_requests_per_step: Treatment requests needed before a rollout step is judged.
        max_bundles: Bundles one replica may hold (champion, challenger, shadow): 1 serves the
            champion alone, 2 adds the challenger, 3 also the shadow.
        poll_s: How often each replica reads the registry's challenger/shadow aliases and rollout.
        shadow: Shadow scoring settings.
        offline_gate: The registry's offline no-regression gate at the promotion that ends a won
            rollout: ``report`` (default) compares and records the offline metrics but lets the
            A/B's significant win decide, when the primary metric is a user outcome (``ctr``,
            ``completion_rate``) and the champion is the one the A/B compared against; ``refuse``
            lets an offline regression refuse the promotion, as it does outside experiments
            (ADR-012).
    """

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    salt: str | None = None
    treatment_share: float = Field(default=0.05, ge=0, le=1)
    primary_metric: Metric = "ctr"
    metrics: list[Metric] = Field(default_factory=lambda: list(SUITE))
    expected_effect: float = Field(default=0.05, gt=0, le=10)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    power: float = Field(default=0.8, gt=0, lt=1)
    srm_alpha: float = Field(default=0.001, gt=0, lt=1)
    guardrails: Guardrails = Field(default_factory=Guardrails)
    rollout_steps: list[float] = Field(default_factory=lambda: list(DEFAULT_STEPS), min_length=1)
    min_requests_per_step: int = Field(default=200, ge=1)
    max_bundles: int = Field(default=3, ge=1, le=3)
    poll_s: float = Field(default=10.0, gt=0)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    offline_gate: Literal["report", "refuse"] = "report"

    @field_validator("rollout_steps")
    @classmethod
    def _steps_increase_to_one(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("rollout_steps must increase strictly within (0, 1]")
        if steps[-1] != 1.0:
            raise ValueError("rollout_steps must end at 1.0 (the last step is full traffic)")
        return steps

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.primary_metric not in self.metrics:
            self.metrics = [self.primary_metric, *self.metrics]
        if self.rollout_steps[0] >= 1.0:
            raise ValueError("rollout_steps need a step below 1.0: at 100% there is no control to compare")
        if self.min_requests_per_step < self.guardrails.min_requests:
            raise ValueError(
                f"min_requests_per_step ({self.min_requests_per_step}) must be at least guardrails.min_requests "
                f"({self.guardrails.min_requests}): a step must not advance before its guardrails are judged"
            )
        return self

    @property
    def hash_salt(self) -> str:
        """The salt users are hashed with."""
        return self.salt or self.name


#: Fields that decide who is treated or how the result is judged: fixed once pre-registered
#: (the others, e.g. ``poll_s``, ``max_bundles`` and the shadow settings, are operational).
ANALYSED: tuple[str, ...] = (
    "salt",
    "treatment_share",
    "primary_metric",
    "metrics",
    "expected_effect",
    "alpha",
    "power",
    "srm_alpha",
    "guardrails",
    "rollout_steps",
    "min_requests_per_step",
    "offline_gate",
)


def bucket(user_id: int, salt: str) -> float:
    """The user's fixed position in ``[0, 1)`` for ``salt`` (BLAKE2b of salt and id: stable everywhere)."""
    digest = hashlib.blake2b(f"{salt}:{int(user_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign(user_id: int, salt: str, treatment_share: float) -> str:
    """The user's variant: :data:`TREATMENT` when their bucket is below the share, else :data:`CONTROL`.

    Sticky: the same user gets the same variant on every replica and every request, and a user
    in treatment stays there when the share grows (the rollout only adds users).
    """
    return TREATMENT if bucket(user_id, salt) < treatment_share else CONTROL


def experiments_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``<data_dir>/experiments``: one folder per experiment name."""
    return resolve_data_dir(data_dir) / "experiments"


def preregister(data_dir: str | os.PathLike[str] | None, config: ExperimentConfig) -> Path:
    """Write the definition once, before any data (``experiments/<name>/definition.json``).

    A definition already there is kept: analysing an experiment by rules changed after it began
    is what pre-registration prevents. Operational settings may differ (``poll_s``...).

    Returns:
        The definition file.

    Raises:
        ConfigError: the registered definition differs in a field of :data:`ANALYSED`.
    """
    path = experiments_dir(data_dir) / config.name / "definition.json"
    payload = config.model_dump(mode="json")
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = None
        if kept is not None:
            # A field added since the definition was written compares as its default.
            defaults = ExperimentConfig().model_dump(mode="json")
            changed = sorted(k for k in ANALYSED if kept.get(k, defaults.get(k)) != payload.get(k))
            if changed:
                raise ConfigError(
                    f"experiment '{config.name}' is pre-registered ({path}) with other {', '.join(changed)}: "
                    "its rules cannot change once it ran; give the changed experiment a new name"
                )
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def load_definition(data_dir: str | os.PathLike[str] | None, name: str | None = None) -> ExperimentConfig:
    """The pre-registered definition of experiment ``name`` (the newest one when None).

    Raises:
        DataNotFoundError: no experiment was registered in ``data_dir`` (or none by that name).
        ConfigError: the definition file is not a valid experiment.
    """
    root = experiments_dir(data_dir)
    found = sorted(root.glob("*/definition.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if name is not None:
        found = [p for p in found if p.parent.name == name]
    if not found:
        what = f"experiment '{name}'" if name else "any experiment"
        raise DataNotFoundError(
            f"no pre-registered {what} in {root}: serve with an 'experiment:' block in the Serve args "
            "(configs/serve/*.yaml), which registers it when the replicas start"
        )
    path = found[-1]
    try:
        return ExperimentConfig.model_validate_json(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not a valid experiment definition: {err}") from err
