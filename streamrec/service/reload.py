"""Hot reload: the two-phase protocol, its per-replica state and the champion watcher.

A reload prepares fresh stages on every replica that holds stages (off the event loop), then
commits (an attribute swap) only if every prepare succeeded, else aborts: a bad bundle is
refused everywhere and the old one keeps serving. :class:`ReloadCoordinator` runs the protocol
over :class:`ReloadTarget` s (each one deployment, every replica of it: :class:`Broadcast` over
a Serve handle) and records the outcome; what each replica keeps between the phases is
:class:`PendingReloads`. :func:`watch_champion` hot-reloads when the registry's ``champion``
alias moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from streamrec.errors import ConfigError, CorruptCheckpointError, ModelError, ServingError

if TYPE_CHECKING:
    from streamrec.monitoring.metrics import ServingMetrics
    from streamrec.service.args import ServeArgs

log = logging.getLogger(__name__)

#: A prepared reload older than this is abandoned: its gateway died between the two phases.
_RELOAD_STALE_S = 600.0


class PendingReloads:
    """What phase 1 prepared on this replica, by reload token: one reload at a time.

    A prepared reload holds a whole bundle in memory until its commit or abort, so a second
    one is refused while one is pending; one older than :data:`_RELOAD_STALE_S` (its gateway
    died between the phases) is dropped first. An abort can overtake a prepare that is still
    loading: what that prepare loaded is then not kept.
    """

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self._ready: dict[str, Any] = {}

    def claim(self, token: str) -> None:
        """Start preparing ``token``.

        Raises:
            ServingError: another reload is in progress on this replica.
        """
        now = time.monotonic()
        for other, t0 in list(self._since.items()):
            if other != token and now - t0 > _RELOAD_STALE_S:
                log.warning("dropping reload %s, prepared %.0fs ago and never committed", other, now - t0)
                self.drop(other)
        busy = [t for t in self._since if t != token]
        if busy:
            raise ServingError(
                f"another reload ({busy[0][:8]}) is in progress on this replica; retry when it ends"
            )
        self._since[token] = now

    def keep(self, token: str, prepared: Any) -> None:
        """Hold what ``token``'s prepare loaded.

        Raises:
            ServingError: ``token`` was aborted while it loaded (nothing is kept).
        """
        if token not in self._since:
            raise ServingError(f"reload {token[:8]} was aborted while this replica prepared it")
        self._ready[token] = prepared

    def take(self, token: str) -> Any:
        """End ``token``: what its prepare loaded (None if nothing)."""
        self._since.pop(token, None)
        return self._ready.pop(token, None)

    def drop(self, token: str) -> None:
        """End ``token`` without using what it loaded (an abort, or a failed prepare)."""
        self.take(token)


def champion_version(data_dir: str | None) -> int | None:
    """The version behind the registry's ``champion`` alias (None when there is none)."""
    from streamrec.registry.store import ModelRegistry

    info = ModelRegistry(data_dir=data_dir).get("champion")
    return None if info is None else int(info.version)


async def read_champion(data_dir: str | None) -> int | None:
    """:func:`champion_version` off the event loop."""
    return await asyncio.to_thread(champion_version, data_dir)


def follows_champion(args: ServeArgs) -> bool:
    """Whether the stages come from the registry's champion alias (reloads and the watcher follow it)."""
    return args.stages in ("auto", "recommender") and not args.factory


class ReloadHistory:
    """The last reload outcomes of this replica (for ``/v1/admin/status``): refusals stay visible.

    Args:
        keep: Outcomes kept.
    """

    def __init__(self, keep: int = 20) -> None:
        self._keep = keep
        self.outcomes: list[dict[str, Any]] = []

    def record(self, version: int | None, outcome: str, detail: str = "") -> None:
        """Remember one reload attempt (``committed``, ``refused`` or ``failed``)."""
        self.outcomes.append(
            {"at": time.time(), "version": version, "outcome": outcome, **({"detail": detail} if detail else {})}
        )
        del self.outcomes[: -self._keep]

    @property
    def refused_now(self) -> dict[str, Any] | None:
        """The latest outcome when it is a refusal (a champion this replica will not serve)."""
        return self.outcomes[-1] if self.outcomes and self.outcomes[-1]["outcome"] == "refused" else None

    def snapshot(self) -> dict[str, Any]:
        """The outcomes, latest last, and the latest refusal if any."""
        refused = [o for o in self.outcomes if o["outcome"] == "refused"]
        return {"recent": list(self.outcomes), "last_refused": refused[-1] if refused else None}


async def watch_champion(
    data_dir: str | None,
    interval_s: float,
    reload: Callable[[int], Awaitable[Any]],
    acts: Callable[[], bool],
    history: ReloadHistory | None = None,
) -> None:
    """Hot-reload when the registry's champion alias moves (promotion or rollback); runs forever.

    Every gateway replica runs the loop, but only the one for which ``acts()`` is true *now*
    (Serve's rank 0, re-ranked after a scale-down) reloads. A version whose bundle is refused is
    not tried again until the alias moves; any other failure (registry unreachable, another
    reload in progress) is retried with a growing pause.

    Args:
        data_dir: The data directory (its registry).
        interval_s: Poll period.
        reload: Reloads every replica to a version.
        acts: Whether this replica is the one that acts.
        history: Where outcomes are recorded.
    """
    seen: int | None = None
    try:
        seen = await asyncio.to_thread(champion_version, data_dir)
    except Exception as err:  # no registry yet: the first promotion will be picked up
        log.info("champion watcher: registry not readable yet (%s)", err)
    retry_at, failures = 0.0, 0
    while True:
        await asyncio.sleep(interval_s)
        if time.monotonic() < retry_at:
            continue
        try:
            latest = await asyncio.to_thread(champion_version, data_dir)
        except Exception as err:
            log.warning("champion watcher: registry unreadable (%s); will retry", err)
            continue
        if not acts():  # another replica acts; follow the alias so as not to redo it
            seen = latest  # when this one becomes the one that acts (after a scale-down)
            continue
        if latest is None or latest == seen:
            continue
        log.info("champion moved from %s to %s: hot reload", seen, latest)
        try:
            await reload(latest)
        except (CorruptCheckpointError, ModelError, ConfigError) as err:
            log.error("hot reload to champion v%s refused, the current model keeps serving: %s", latest, err)
            if history is not None:
                history.record(latest, "refused", f"{type(err).__name__}: {err}")
        except Exception as err:
            failures = min(failures + 1, 16)  # (2**16 polls is far past the 30 min cap)
            pause = min(interval_s * 2**failures, 1800.0)
            retry_at = time.monotonic() + pause
            log.warning("hot reload to champion v%s failed (%s); retrying in %.0fs", latest, err, pause)
            if history is not None:
                history.record(latest, "failed", f"{type(err).__name__}: {err}")
            continue
        seen, failures = latest, 0  # done, or refused for good: never retried on every poll


#: The errors of a bundle that will not load (refused: not retried until the champion moves).
REFUSALS: tuple[type[Exception], ...] = (CorruptCheckpointError, ModelError, ConfigError)


class ReloadTarget(Protocol):
    """One deployment that holds stages, every replica of it: each phase answers one item per replica."""

    async def prepare(self, token: str, version: int | None) -> list[Any]:
        """Phase 1 on every replica (what each prepared: its stages' ``describe()``)."""
        ...

    async def commit(self, token: str) -> list[Any]:
        """Phase 2 on every replica."""
        ...

    async def abort(self, token: str) -> Any:
        """Drop what phase 1 prepared under ``token`` on every replica."""
        ...


class Broadcast:
    """A :class:`ReloadTarget` over a deployment handle: each phase broadcast to every replica.

    The replicas answer ``prepare_reload``, ``commit_reload`` and ``abort_reload``.

    Args:
        handle: Anything with ``broadcast(method, *args).results_async()`` (Serve's
            ``DeploymentHandle``).
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def prepare(self, token: str, version: int | None) -> list[Any]:
        """``prepare_reload`` on every replica."""
        return list(await self.handle.broadcast("prepare_reload", token, version).results_async())

    async def commit(self, token: str) -> list[Any]:
        """``commit_reload`` on every replica."""
        return list(await self.handle.broadcast("commit_reload", token).results_async())

    async def abort(self, token: str) -> Any:
        """``abort_reload`` on every replica."""
        return await self.handle.broadcast("abort_reload", token).results_async()


class ReloadCoordinator:
    """Two-phase reload of every replica holding stages, all to one registry version; one at a time.

    Prepare on every target; if every replica prepared, commit on all (shielded: a client going
    away never leaves some replicas swapped and others not), else abort on all and raise the
    first error. A cancelled prepare also aborts. The outcome (``committed``, ``refused`` for a
    bundle that will not load, ``failed`` otherwise) is counted once and noted on every gateway
    replica, so ``stages.reloads.last_refused`` shows it whichever replica answers.

    Args:
        targets: ``() -> the targets`` of this reload (read per reload: handles are resolved then).
        resolve_version: ``() -> the version`` a reload without one goes to (the champion's, read
            once per reload: replicas that each read the alias could load different versions if
            it moved meanwhile); None: no version (each replica loads what its args say).
        note: Records an outcome on every gateway replica ``(version, outcome, detail)``; when it
            fails (or is None) the outcome goes to ``history`` only.
        history: This replica's outcomes.
        metrics: Where the outcome is counted.
        summary_from: Index of the target whose first replica's prepare is the answer's ``stages``
            (when it answered; else the first target's).
        new_token: Makes a reload token.
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[ReloadTarget]],
        *,
        resolve_version: Callable[[], Awaitable[int | None]] | None = None,
        note: Callable[[int | None, str, str], Awaitable[Any]] | None = None,
        history: ReloadHistory | None = None,
        metrics: ServingMetrics | None = None,
        summary_from: int = 0,
        new_token: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._targets = targets
        self._resolve_version = resolve_version
        self._note = note
        self.history = history if history is not None else ReloadHistory()
        self._metrics = metrics
        self._summary_from = summary_from
        self._new_token = new_token
        self._lock = asyncio.Lock()  # the watcher and POST /v1/admin/reload take turns

    async def reload(self, version: int | None = None) -> dict[str, Any]:
        """Reload every target to ``version`` (default: ``resolve_version()``).

        Returns:
            ``token``, ``replicas`` (committed), ``seconds``, ``stages`` (what was prepared).

        Raises:
            Exception: the first prepare error (every target aborted; the old stages serve).
        """
        async with self._lock:
            if version is None and self._resolve_version is not None:
                version = await self._resolve_version()
            try:
                result = await self.two_phase(version)
            except REFUSALS as err:
                await self.record(version, "refused", f"{type(err).__name__}: {err}")
                raise
            except Exception as err:
                await self.record(version, "failed", f"{type(err).__name__}: {err}")
                raise
            await self.record(version, "committed")
            return result

    async def record(self, version: int | None, outcome: str, detail: str = "") -> None:
        """Count the outcome here and note it on every gateway replica (this one's history if that fails)."""
        if self._metrics is not None:
            self._metrics.reload(outcome)  # counted once, by the replica that ran the reload
        if self._note is not None:
            try:
                await self._note(version, outcome, detail)
                return
            except Exception as err:  # the outcome is still in this replica's log
                log.warning("could not record the reload outcome on every replica: %s", err)
        self.history.record(version, outcome, detail)

    async def two_phase(self, version: int | None) -> dict[str, Any]:
        """Prepare on every target, then commit on all or abort on all (no lock, no record)."""
        targets = list(self._targets())
        token = self._new_token()
        t0 = time.perf_counter()

        async def abort() -> None:
            await asyncio.gather(*(t.abort(token) for t in targets), return_exceptions=True)

        try:
            outcomes = await asyncio.gather(*(t.prepare(token, version) for t in targets), return_exceptions=True)
        except BaseException:  # cancelled (the admin client went away): free what was prepared
            await asyncio.shield(abort())
            raise
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            await asyncio.shield(abort())
            raise errors[0]
        prepared = [o for o in outcomes if not isinstance(o, BaseException)]
        committed = await asyncio.shield(asyncio.gather(*(t.commit(token) for t in targets)))
        replicas = sum(len(r) for r in committed)
        log.info("reload %s committed on %d replicas in %.2fs", token, replicas, time.perf_counter() - t0)
        i = self._summary_from
        first = prepared[i][0] if 0 < i < len(prepared) and prepared[i] else prepared[0][0]
        return {"token": token, "replicas": replicas, "seconds": round(time.perf_counter() - t0, 3), "stages": first}
