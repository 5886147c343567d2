"""Hot reload: the two-phase protocol's per-replica state and the champion watcher.

A reload prepares fresh stages on every replica that holds stages (off the event loop), then
commits (an attribute swap) only if every prepare succeeded, else aborts: a bad bundle is
refused everywhere and the old one keeps serving. The Serve wrappers broadcast the phases;
what each replica keeps between them is :class:`PendingReloads`. :func:`watch_champion` hot-reloads
when the registry's ``champion`` alias moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streamrec.errors import ConfigError, CorruptCheckpointError, ModelError, ServingError

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
    from streamrec.registry import ModelRegistry

    info = ModelRegistry(data_dir=data_dir).get("champion")
    return None if info is None else int(info.version)


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
