"""Gradual rollout of a challenger: 1% -> 5% -> 25% -> 50% -> 100%, judged step by step.

The rollout's state (which version, which step, since when) is kept in the model registry with
the ``challenger`` alias, so every serving replica reads one source of truth when it polls
(:mod:`streamrec.service.variants`). :func:`advance` judges the current step on the data logged
since it began (:func:`~streamrec.experiments.logged.analyse_experiment`) and moves on,
holds, promotes or rolls back; every step is recorded with its numbers in the registry history
(``streamrec registry history``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from streamrec.errors import ConfigError, DataNotFoundError, PromotionRefusedError, RegistryError
from streamrec.experiments.config import TREATMENT, ExperimentConfig
from streamrec.timeutil import utc

log = logging.getLogger(__name__)

#: Name of the rollout's state in the registry (:meth:`ModelRegistry.write_state`).
STATE = "rollout"

Action = Literal["advanced", "held", "promoted", "rolled_back", "stopped"]

#: Primary metrics whose significant win stands in for the offline no-regression gate at the
#: promotion (user outcomes; coverage is not one: a ranker that cannot rank wins it).
ONLINE_VERDICT_METRICS = frozenset({"ctr", "completion_rate"})


@dataclass(frozen=True)
class RolloutState:
    """The rollout in progress.

    Attributes:
        experiment: Name of the experiment definition that judges it.
        version: The challenger's registry version.
        step: Index into the definition's ``rollout_steps``.
        share: Share of users on the challenger at this step.
        since: When this step began (UTC).
        champion: The champion when this step began: what its control arm served (None in a
            state written before it was recorded).
    """

    experiment: str
    version: int
    step: int
    share: float
    since: datetime
    champion: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The registry form."""
        return {**asdict(self), "since": self.since.isoformat()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RolloutState:
        """Parse the registry form.

        Raises:
            RegistryError: the stored state is not a rollout state.
        """
        try:
            return cls(
                str(raw["experiment"]),
                int(raw["version"]),
                int(raw["step"]),
                float(raw["share"]),
                utc(str(raw["since"])),
                None if raw.get("champion") is None else int(raw["champion"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RegistryError(f"the registry's rollout state is unreadable ({err}): {raw!r}") from None


@dataclass
class RolloutDecision:
    """What one :func:`advance` did.

    Attributes:
        action: ``advanced`` (next step), ``held`` (not enough data yet, or not yet significant),
            ``promoted`` (the challenger is the champion), ``rolled_back`` (guardrail breached or
            invalid comparison: the challenger is off), ``stopped`` (enough data and no win: the
            champion stays, the challenger is off).
        version: The challenger version.
        share: The treatment share now.
        reasons: Why, with the numbers.
        analysis: The analysis the decision rests on (JSON-safe), if one ran.
    """

    action: Action
    version: int
    share: float
    reasons: list[str] = field(default_factory=list)
    analysis: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)


def _registry(data_dir: str | os.PathLike[str] | None) -> Any:
    from streamrec.registry.store import ModelRegistry

    return ModelRegistry(data_dir=data_dir)


def read_rollout(states: dict[str, Any]) -> RolloutState | None:
    """The rollout in ``states`` (from :meth:`ModelRegistry.serving_state`), if one runs."""
    raw = states.get(STATE)
    return None if not raw else RolloutState.from_json(raw)


def share_in_force(aliases: dict[str, int], states: dict[str, Any], config: ExperimentConfig) -> float:
    """The treatment share the replicas serve: the rollout's step, else ``config.treatment_share``.

    0 when the registry names no challenger; a rollout of another experiment or of a version that
    is no longer the challenger is ignored.
    """
    challenger = aliases.get("challenger")
    if challenger is None:
        return 0.0
    state = read_rollout(states)
    if state is not None and state.experiment == config.name and state.version == challenger:
        return state.share
    return config.treatment_share


def current_share(data_dir: str | os.PathLike[str] | None, config: ExperimentConfig) -> float:
    """:func:`share_in_force` read from ``data_dir``'s registry (0 when there is no registry yet)."""
    try:
        aliases, states = _registry(data_dir).serving_state()
    except RegistryError:
        return 0.0
    return share_in_force(aliases, states, config)


def start(data_dir: str | os.PathLike[str] | None, config: ExperimentConfig, version: int) -> RolloutState:
    """Make ``version`` the challenger at the first rollout step.

    Raises:
        ConfigError: ``version`` is the champion.
        RegistryError: no such version, or the registry could not be written.
    """
    reg = _registry(data_dir)
    champion = reg.aliases().get("champion")
    if champion == version:
        raise ConfigError(f"version {version} is already the champion; roll out another version")
    reg.get_version(version)  # exists?
    state = RolloutState(config.name, version, 0, config.rollout_steps[0], datetime.now(UTC), champion)
    # The state first: a replica polling between the two writes must not serve the definition's
    # default share to a challenger that is meant to start at the first step.
    reg.write_state(STATE, state.to_json())
    reg.set_alias("challenger", version)
    reg.record_event(
        version,
        "rollout_started",
        "challenger",
        experiment=config.name,
        share=state.share,
        steps=config.rollout_steps,
    )
    log.info("rollout of v%d started at %.0f%% of users", version, state.share * 100)
    return state


def _end(reg: Any, state: RolloutState, event: str, **detail: Any) -> None:
    reg.write_state(STATE, None)
    if reg.aliases().get("challenger") == state.version:
        reg.clear_alias("challenger")
    reg.record_event(
        state.version,
        event,
        "challenger",
        experiment=state.experiment,
        step=state.step,
        share=state.share,
        step_since=state.since.isoformat(),
        **detail,
    )


def step_window(
    data_dir: str | os.PathLike[str] | None, config: ExperimentConfig
) -> tuple[datetime, datetime | None, float] | None:
    """``(since, until, share)`` of the rollout step of ``config`` that runs, else of the last one.

    Where :func:`advance` looks, so that ``experiments analyse`` and ``report`` judge the same
    data by default: one step, one share (a window over several steps or experiments would fail
    the sample-ratio check by construction). None when the registry has no rollout of it.
    """
    reg = _registry(data_dir)
    skip = timedelta(seconds=2 * config.poll_s)
    state = read_rollout(reg.serving_state()[1])
    if state is not None and state.experiment == config.name:
        return state.since + skip, None, state.share
    for e in reg.history(limit=None):
        if e.event in _ENDS and e.alias == "challenger" and e.detail.get("experiment") == config.name:
            try:
                since = utc(str(e.detail["step_since"]))
            except (KeyError, ValueError):
                return None
            return since + skip, e.at, float(e.detail.get("share", 0.0))
    return None


def _blocked_at_step(reg: Any, state: RolloutState, champion: int | None) -> str | None:
    """Why the promotion was refused at this step, if asking again would change nothing.

    That is a refusal by a gate comparing the candidate with the champion (schema, metrics)
    while the same champion holds. A refusal of the bundle gate (download, verification, smoke
    test: possibly transient) is asked again at each tick.
    """
    for e in reg.history(limit=None):
        if e.at < state.since:
            return None
        if e.event == "rollout_blocked" and e.version == state.version:
            if e.detail.get("gate") in (None, "bundle", "unknown") or e.detail.get("champion") != champion:
                return None
            return str(e.detail.get("reason", "see `streamrec registry history`"))
    return None


#: Registry events that end a rollout.
_ENDS = frozenset({"rollout_promoted", "rollout_rolled_back", "rollout_stopped"})


def advance(
    data_dir: str | os.PathLike[str] | None,
    config: ExperimentConfig,
    *,
    analysis: Any = None,
    now: datetime | None = None,
    smoke_test: Callable[[Path], None] | None = None,
) -> RolloutDecision:
    """Judge the current step and act on it (run it periodically: cron, or ``--every``).

    The step's data starts ``2 * config.poll_s`` after it began (replicas take up to one poll to
    serve the new share; mixed data would fail the sample-ratio check). Then:

    * a guardrail breach or a sample-ratio mismatch rolls back (challenger cleared);
    * fewer than ``min_requests_per_step`` treatment requests holds;
    * nothing logged at the step yet holds (not a verdict);
    * below the A/B step (shares under 0.5, and a next step that is not the promotion) the step
      advances once the guardrails hold;
    * from the A/B step on, the step advances only on a significant win of the primary metric;
      with the minimum sample size reached and no win the rollout stops (champion kept);
    * the step to 100% is the promotion of the challenger, through the registry's gates (with
      no control left there would be nothing to compare).

    Args:
        data_dir: The data directory (registry and logs).
        config: The experiment definition that judges the rollout.
        analysis: A precomputed :class:`~streamrec.experiments.analysis.ExperimentAnalysis` of
            the step (tests); computed from the logs when None.
        now: The current time (tests).
        smoke_test: The promotion's bundle check (``streamrec.pipeline.train.smoke_test``: the
            CLI passes it; this module sits below the pipeline).

    Raises:
        RegistryError: no rollout runs, or the registry could not be read or written.
    """
    from streamrec.experiments.logged import analyse_experiment

    reg = _registry(data_dir)
    aliases, states = reg.serving_state()
    state = read_rollout(states)
    if state is None or state.experiment != config.name:
        raise RegistryError(
            f"no rollout of experiment '{config.name}' is running: start one with "
            "`streamrec experiments rollout start --version N`"
        )
    if aliases.get("challenger") != state.version:
        _end(reg, state, "rollout_stopped", reason="the challenger alias moved away from this version")
        return RolloutDecision(
            "stopped", state.version, 0.0, ["the challenger alias no longer names this version"]
        )
    now = now or datetime.now(UTC)
    if analysis is None:
        since = state.since + timedelta(seconds=2 * config.poll_s)
        try:
            analysis = analyse_experiment(data_dir, config, since=since, expected_share=state.share)
        except DataNotFoundError as err:  # nothing logged at this step yet: not a verdict
            return RolloutDecision("held", state.version, state.share, [f"not judged yet: {err}"])
    numbers = analysis.to_dict()
    treated = analysis.variants.get(TREATMENT)
    n_treated = 0 if treated is None else int(treated.requests)
    decision = str(analysis.decision)
    reasons = list(analysis.reasons)
    summary = {"decision": decision, "treatment_requests": n_treated, "reasons": reasons[:10]}
    if decision in ("rollback", "invalid"):
        _end(reg, state, "rollout_rolled_back", **summary)
        log.warning(
            "rollout of v%d rolled back at %.0f%%: %s", state.version, state.share * 100, "; ".join(reasons)
        )
        return RolloutDecision("rolled_back", state.version, 0.0, reasons, numbers)
    if n_treated < config.min_requests_per_step:
        return RolloutDecision(
            "held",
            state.version,
            state.share,
            [f"{n_treated} of {config.min_requests_per_step} treatment requests logged at this step"],
            numbers,
        )
    steps = config.rollout_steps
    # From 50% on, and whenever the next step is the promotion, only a significant win advances.
    ab_step = state.share >= 0.5 or state.step + 1 >= len(steps) or steps[state.step + 1] >= 1.0
    if ab_step and decision != "ship":
        if decision == "no_difference":
            _end(reg, state, "rollout_stopped", **summary)
            return RolloutDecision("stopped", state.version, 0.0, reasons, numbers)
        return RolloutDecision("held", state.version, state.share, reasons, numbers)
    if state.step + 1 >= len(steps) or steps[state.step + 1] >= 1.0:  # 100% is the champion: promote
        blocked = _blocked_at_step(reg, state, aliases.get("champion"))
        if blocked is not None:  # the same comparison against the same champion: asking again changes nothing
            why = (
                f"promotion refused at this step ({blocked}); promote by hand "
                "(`streamrec registry promote`) or end the rollout"
            )
            return RolloutDecision("held", state.version, state.share, [why], numbers)
        # The A/B measured what the offline metrics estimate: by default its win stands in for
        # the offline no-regression gate (compared and recorded, not refusing), when the win is
        # on a user outcome (not coverage) against the champion the promotion replaces.
        online = None
        champion_now = aliases.get("champion")
        if (
            config.offline_gate == "report"
            and config.primary_metric in ONLINE_VERDICT_METRICS
            and state.champion is not None
            and champion_now == state.champion
        ):
            online = f"experiment '{config.name}' at {state.share:.0%}: {reasons[0] if reasons else decision}"
        elif (
            config.offline_gate == "report" and state.champion is not None and champion_now != state.champion
        ):
            log.warning(
                "the champion changed during the step (v%s -> v%s): the A/B did not compare against "
                "it, so the offline gate decides the promotion",
                state.champion,
                champion_now,
            )
        try:
            reg.promote(state.version, smoke_test=smoke_test, online=online)
        except PromotionRefusedError as err:
            refusal = getattr(err, "decision", None)
            failed = next((g.name for g in getattr(refusal, "gates", ()) if g.passed is False), "unknown")
            reg.record_event(
                state.version,
                "rollout_blocked",
                "challenger",
                reason=str(err),
                gate=failed,
                champion=aliases.get("champion"),
                **summary,
            )
            return RolloutDecision("held", state.version, state.share, [f"promotion refused: {err}"], numbers)
        _end(reg, state, "rollout_promoted", **summary)
        return RolloutDecision("promoted", state.version, 1.0, reasons, numbers)
    nxt = RolloutState(
        state.experiment, state.version, state.step + 1, steps[state.step + 1], now, aliases.get("champion")
    )
    reg.write_state(STATE, nxt.to_json())
    reg.record_event(
        state.version,
        "rollout_advanced",
        "challenger",
        experiment=state.experiment,
        step=nxt.step,
        share=nxt.share,
        from_share=state.share,
        **summary,
    )
    log.info("rollout of v%d advanced to %.0f%%", state.version, nxt.share * 100)
    return RolloutDecision("advanced", state.version, nxt.share, reasons, numbers)
