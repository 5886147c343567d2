"""The cluster gateway's calls to its stage deployments: one retry when a replica is lost.

A stage replica that dies mid-request (``SIGKILL``, OOM, node loss) fails the calls it was
serving with Ray's ``ActorDiedError`` (or ``ActorUnavailableError`` while its death is not yet
known); Serve's router does not resend a request a replica had already accepted. Every stage
call is a read (user context, one retrieval source, rank, rerank), so
:func:`call_with_retry` sends it once more: the router has marked the dead replica and picks a
live one, or waits for the replacement, within the funnel's level timeout. A second loss raises
:class:`ReplicaLostError`, which the funnel's breaker ignores: a replica Serve is replacing says
nothing of the funnel's health (ADR-010, "Dead replicas").

Ray is imported on first use only: :mod:`streamrec.service.policy` names
:class:`ReplicaLostError` without importing Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from streamrec.errors import ServingError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Resends after the first lost replica (1: one retry).
RETRIES = 1


class ReplicaLostError(ServingError):
    """A stage call met a dead or unreachable replica on every attempt (Serve is replacing it)."""


def replica_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a call whose replica died or cannot be reached.

    ``RayActorError`` covers ``ActorDiedError`` and ``ActorUnavailableError``; an error raised
    *inside* a live replica arrives as ``RayTaskError`` (or the stage's own type) and is not
    retried.
    """
    from ray.exceptions import RayActorError

    return (RayActorError,)


async def call_with_retry(
    stage: str,
    send: Callable[[], Awaitable[T]],
    *,
    retries: int = RETRIES,
    lost: tuple[type[BaseException], ...] | None = None,
) -> T:
    """``await send()``, sent again (up to ``retries`` times) when its replica is lost.

    Args:
        stage: The stage call's name (for the log and the error).
        send: Makes a fresh call each time (e.g. ``lambda: handle.rank.remote(ctx, merged)``).
        retries: Resends after a lost replica.
        lost: The errors that mean "replica lost" (default: :func:`replica_errors`).

    Raises:
        ReplicaLostError: every attempt met a lost replica (the last Ray error chained).
    """
    lost = replica_errors() if lost is None else lost
    attempt = 0
    while True:
        try:
            return await send()
        except lost as err:
            if attempt >= retries:
                raise ReplicaLostError(
                    f"stage '{stage}': replica lost on {attempt + 1} attempt(s) ({type(err).__name__})"
                ) from err
            attempt += 1
            log.warning("stage '%s': replica lost (%s); resending to another replica", stage, type(err).__name__)
