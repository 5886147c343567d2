"""Several bundles in one gateway: the champion's funnel, a challenger's and a shadow, routed per user.

:class:`Variants` keeps, on each gateway replica, the bundles the registry's ``challenger`` and
``shadow`` aliases name (loaded in a worker thread, swapped in with one assignment) and the
treatment share in force (:func:`~streamrec.experiments.rollout.share_in_force`), polling the
registry every ``experiment.poll_s``. Each replica polls for itself: assignment is a pure
function of the user, so replicas agree without talking to each other once they read the same
registry state. :class:`ExperimentRouter` is what the HTTP layer calls: it routes a request to
the champion's or the challenger's :class:`~streamrec.service.policy.FunnelService` (each with its
own breakers, batch level and response cache, so a failing challenger degrades only its own
users) and names the variant in the response.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig, assign, preregister
from streamrec.experiments.rollout import share_in_force
from streamrec.funnel.stages import Stages, run_funnel
from streamrec.monitoring.logs import RequestLog
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.service.args import ServeArgs
from streamrec.service.loading import LoadedStages, load_stages, settle_heap
from streamrec.service.policy import FunnelService
from streamrec.service.runner import StageRunner, local_primary
from streamrec.service.shadow import ShadowScorer

log = logging.getLogger(__name__)


#: Deadline of the serving-version question during a handover (cluster: a remote call).
SERVING_VERSION_TIMEOUT_S = 2.0
#: Room for the champion reload's load in the handover's time limit.
HANDOVER_LOAD_S = 60.0


def _rss_mb() -> float:
    """Resident memory of the process now (MB), from ``/proc`` (the peak where ``/proc`` is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: Requests a new challenger answers, unrecorded, before it serves users.
WARM_UP_REQUESTS = 3


async def _warm(runner: StageRunner, stages: Stages, source_timeout_s: float) -> None:
    """Run a few requests through ``runner`` (failures ignored: the funnel service handles them later)."""
    for user in range(1, WARM_UP_REQUESTS + 1):
        try:
            await run_funnel(runner.call_for(stages), RecommendRequest(user_id=user, k=10),
                             tuple(stages.source_names), source_timeout_s)  # fmt: skip
        except Exception as err:
            log.debug("challenger warm-up request failed: %s", err)


class HeldBundle:
    """A challenger or shadow bundle this replica serves, and what loading it cost.

    Attributes:
        role: ``challenger`` or ``shadow``.
        version: Registry version.
        loaded: The stages.
        memory_mb: Resident memory the load added (this process, measured around the load).
    """

    def __init__(self, role: str, version: int, loaded: LoadedStages, memory_mb: float) -> None:
        self.role, self.version, self.loaded, self.memory_mb = role, version, loaded, memory_mb

    def describe(self) -> dict[str, Any]:
        """Facts for ``/v1/admin/status``."""
        return {  # no integers: the status over several replicas sums them
            "version": f"v{self.version}",
            "model_version": self.loaded.version,
            "load_seconds": round(self.loaded.load_seconds, 3),
            "memory_mb": round(self.memory_mb, 1),
            "loaded_at": self.loaded.loaded_at,
        }


class Variants:
    """The challenger and shadow bundles of one gateway replica and the treatment share.

    Args:
        args: The Serve args (``args.experiment`` must be set).
        fallback: ``() -> the gateway's popularity stages`` (the challenger's funnel falls back
            through the same chain as the champion's).
        metrics: Where the challenger's funnel records.
        request_log: Where the challenger's sampled answers are logged.
        shadow: The replica's shadow scorer (its stages are set here).
        registry_state: ``() -> (aliases, states)`` of the registry (tests inject one).
        flagged: The catalogue's flagged items (the treatment's answers never hold them either).
        loader: ``version -> LoadedStages`` (default: the trained recommender of that registry
            version, :func:`~streamrec.service.loading.load_stages`; tests inject one).
        serving_version: ``async () -> the registry version this replica's champion stages
            serve`` (None: unknown). When the held challenger is promoted, it answers every user
            until the replica's champion stages are that version (the champion watcher reloads
            them), so a promotion reaches all users at the next poll, not at the next reload.
    """

    def __init__(
        self,
        args: ServeArgs,
        *,
        fallback: Callable[[], Stages | None],
        metrics: ServingMetrics | None = None,
        request_log: RequestLog | None = None,
        shadow: ShadowScorer | None = None,
        registry_state: Callable[[], tuple[dict[str, int], dict[str, Any]]] | None = None,
        loader: Callable[[int], LoadedStages] | None = None,
        flagged: Callable[[], Awaitable[frozenset[int]]] | None = None,
        serving_version: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        self._flagged = flagged
        self._serving_version = serving_version
        self.handing_over = False
        self._handover_since: float | None = None
        if args.experiment is None:
            raise ValueError("Variants needs args.experiment")
        self.config: ExperimentConfig = args.experiment
        self._args = args.model_copy(update={"stages": "recommender", "factory": None})
        self._fallback = fallback
        self._metrics = metrics
        self._request_log = request_log
        self.shadow = shadow
        self._state = registry_state or self._read_registry
        self._load = loader or (lambda version: load_stages(self._args, version))
        self.challenger: HeldBundle | None = None
        self.treatment: FunnelService | None = None
        self._treatment_runner: StageRunner | None = None
        self.shadow_bundle: HeldBundle | None = None
        self.share = 0.0
        self.refused: dict[str, str] = {}  # "role vN" -> why it did not load (retried after a pause)
        self._retry_at: dict[str, float] = {}
        self._tries: dict[str, int] = {}
        self.polled_at: float | None = None
        preregister(args.data_dir, self.config)

    async def _serve(self, held: HeldBundle | None) -> None:
        """Make ``held`` the challenger: its funnel service over its own stage runner (own breakers).

        The new runner is warmed first (:data:`WARM_UP_REQUESTS` requests through its threads,
        recorded nowhere): a cold bundle's first answers (thread start, first ranker pass) would
        miss their deadline and count against the challenger as fallbacks.
        """
        old = self._treatment_runner
        if held is None:
            self.challenger, self.treatment, self._treatment_runner = None, None, None
        else:
            a, stages = self._args, held.loaded.stages
            runner = StageRunner(
                a.resilience,
                a.source_timeout_ms / 1e3,
                a.source_threads,
                a.treatment_faults,
                metrics=self._metrics,
            )
            await _warm(runner, stages, a.source_timeout_ms / 1e3)
            self.treatment = FunnelService(
                local_primary(lambda: stages, runner),
                self._fallback(),
                a.resilience,
                a.source_timeout_ms / 1e3,
                batch=lambda: getattr(stages, "batch", None),
                metrics=self._metrics,
                request_log=self._request_log,
                flagged=self._flagged,
            )
            self.challenger, self._treatment_runner = held, runner
        if old is not None:  # requests already routed to it finish first: close it after the budget
            grace_s = 2 * self._args.resilience.request_budget_ms / 1e3 + 1.0
            asyncio.get_running_loop().call_later(grace_s, old.close)

    def set_fallback(self, fallback: Stages | None) -> None:
        """The gateway's popularity level changed (a reload): the challenger's funnel uses it too."""
        if self.treatment is not None:
            self.treatment.set_fallback(fallback)

    def _read_registry(self) -> tuple[dict[str, int], dict[str, Any]]:
        from streamrec.registry.store import ModelRegistry

        aliases, states = ModelRegistry(data_dir=self._args.data_dir).serving_state()
        return aliases, states

    # ------------------------------------------------------------------ routing
    def route(self, user_id: int) -> str | None:
        """The user's variant: None when no challenger serves, else ``control`` or ``treatment``."""
        if self.treatment is None:
            return None
        return assign(user_id, self.config.hash_salt, self.share)

    # ------------------------------------------------------------------ keeping up with the registry
    async def refresh(self) -> None:
        """Read the registry once; load, swap or drop bundles to match it (loads off the event loop).

        The share in force is applied together with the challenger swap, before the shadow loads.
        """
        aliases, states = await asyncio.to_thread(self._state)
        champion = aliases.get("champion")
        cap = self.config.max_bundles
        want_ch = aliases.get("challenger") if cap >= 2 else None
        want_sh = aliases.get("shadow") if cap >= 3 else None
        self.handing_over = await self._promoted_not_served(champion)
        if want_ch == champion or self.handing_over:
            # the champion already serves everyone, or will once reloaded: until then the held
            # bundle of the promoted version answers every user
            want_ch = champion if self.handing_over else None
        if want_sh is not None and want_sh in (champion, want_ch):
            want_sh = None  # its answers are already the production or treatment answers
        named = {f"challenger v{want_ch}", f"shadow v{want_sh}"}
        for key in [k for k in self.refused if k not in named]:  # the registry moved on: forget it
            self.refused.pop(key)
            self._retry_at.pop(key, None)
            self._tries.pop(key, None)
        share = 1.0 if self.handing_over else share_in_force(aliases, states, self.config)
        held_ch = await self._keep("challenger", self.challenger, want_ch)
        if held_ch is not self.challenger:
            await self._serve(held_ch)
        self.share = share if self.treatment is not None else 0.0
        self.shadow_bundle = await self._keep("shadow", self.shadow_bundle, want_sh)
        if self.shadow is not None:
            sb = self.shadow_bundle
            self.shadow.set_stages(
                None if sb is None else sb.loaded.stages, "" if sb is None else sb.loaded.version
            )
        self.polled_at = time.time()

    def _handover_limit_s(self) -> float:
        """How long a handover may last: two champion-watcher polls, two experiment polls and a load."""
        return 2 * self._args.watch_champion_s + 2 * self.config.poll_s + HANDOVER_LOAD_S

    async def _promoted_not_served(self, champion: int | None) -> bool:
        """Whether the held challenger is now the champion and this replica still serves another.

        The handover ends when the replica's champion stages are that version, or after
        :meth:`_handover_limit_s` (a reload that failed, or no watcher: the champion path answers
        again, with a warning). The serving version is asked with a short deadline; when it
        cannot be known, the previous state holds.
        """
        held = self.challenger
        if champion is None or held is None or held.version != champion or self._serving_version is None:
            self._handover_since = None
            return False
        try:
            serving = await asyncio.wait_for(self._serving_version(), SERVING_VERSION_TIMEOUT_S)
        except Exception as err:  # unknown (a slow or failing stage): keep the previous state
            log.warning("serving version unknown (%s: %s): handover state kept", type(err).__name__, err)
            return self.handing_over
        if serving is None or serving == champion:
            self._handover_since = None
            return False
        now = time.monotonic()
        if self._handover_since is None:
            self._handover_since = now
            log.info("challenger v%d promoted: it answers every user until the champion reload", champion)
        elif now - self._handover_since > self._handover_limit_s():
            if self.handing_over:
                log.warning(
                    "champion v%d not loaded by this replica %.0fs after its promotion (it serves v%d): "
                    "handover ended, the champion path answers; reload it (POST /v1/admin/reload)",
                    champion,
                    now - self._handover_since,
                    serving,
                )
            return False
        return True

    async def _keep(self, role: str, held: HeldBundle | None, want: int | None) -> HeldBundle | None:
        """The bundle to hold for ``role``: ``held`` if it is the one wanted, else ``want`` loaded.

        A version that cannot load is not served (None: the champion answers everyone) and is
        tried again after a growing pause (a transient failure must not keep replicas apart).
        """
        if want is None:
            if held is not None:
                log.info("%s v%d is no longer named by the registry: unloaded", role, held.version)
            return None
        if held is not None and held.version == want:
            return held
        key = f"{role} v{want}"
        if key in self.refused and time.monotonic() < self._retry_at.get(key, 0.0):
            return None
        rss = _rss_mb()
        try:
            loaded = await asyncio.to_thread(self._load, want)
        except Exception as err:  # a bad bundle never serves; the champion keeps everyone
            tries = self._tries.get(key, 0) + 1
            self._tries[key] = tries
            pause = min(self.config.poll_s * 2**tries, 600.0)
            self._retry_at[key] = time.monotonic() + pause
            self.refused[key] = f"{type(err).__name__}: {err}"
            log.error("%s could not load (%s); not served, retried in %.0fs", key, self.refused[key], pause)
            return None
        self.refused.pop(key, None)
        self._tries.pop(key, None)
        settle_heap()
        log.info("%s loaded in %.1fs", key, loaded.load_seconds)
        return HeldBundle(role, want, loaded, max(0.0, _rss_mb() - rss))

    def challenger_stages(self) -> Stages | None:
        """The challenger's stages while one is held (None otherwise)."""
        held = self.challenger
        return held.loaded.stages if held is not None else None

    def describe(self) -> dict[str, Any]:
        """Facts for ``/v1/admin/status``: the experiment, the share, each bundle and its cost."""
        return {
            "experiment": self.config.name,
            "treatment_share": self.share,
            "handing_over": int(self.handing_over),  # an int: the status over replicas sums it
            "challenger": None if self.challenger is None else self.challenger.describe(),
            "shadow": None if self.shadow_bundle is None else self.shadow_bundle.describe(),
            "shadow_runs": None if self.shadow is None else self.shadow.snapshot(),
            "treatment_funnel": None if self.treatment is None else self.treatment.snapshot(),
            "refused": dict(self.refused),
            "polled_at": self.polled_at,
        }


class ExperimentRouter:
    """The recommend callable of a gateway: routes each request to its variant's funnel.

    Args:
        control: The champion's funnel service.
        variants: The challenger / shadow bundles (None: no experiment configured).
    """

    def __init__(self, control: FunnelService, variants: Variants | None) -> None:
        self.control = control
        self.variants = variants

    def variant_of(self, user_id: int) -> str | None:
        """The user's variant now (events are stamped with it when they carry none)."""
        return None if self.variants is None else self.variants.route(user_id)

    async def __call__(self, request: RecommendRequest) -> RecommendResponse:
        """The response, from the treatment's funnel for treated users, else the champion's."""
        v = self.variants
        if v is None:
            return await self.control(request)
        variant = v.route(request.user_id)
        treatment = v.treatment
        if variant == TREATMENT and treatment is not None:
            return await treatment(request, variant=TREATMENT)
        return await self.control(request, variant=CONTROL if variant else None)
