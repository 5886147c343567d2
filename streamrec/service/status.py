"""What a gateway replica reports: readiness (``/readyz``) and its part of ``/v1/admin/status``.

:class:`GatewayStatus` gathers the breakers of the replica, its reload outcomes, health alerts,
request log, catalogue, stages (cluster: every replica of every stage deployment, so replicas
out of step show in ``stage_versions``), fallback and experiment. The Serve gateway merges the
replicas' parts (:func:`~streamrec.serving.gateway.merge_replica_status`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from streamrec.monitoring.health import HealthMonitor
from streamrec.monitoring.logs import RequestLog
from streamrec.service.catalogue import CatalogueSync
from streamrec.service.engagement import EngagementSync
from streamrec.service.policy import FunnelService
from streamrec.service.reload import ReloadHistory
from streamrec.service.replica import GatewayStages
from streamrec.service.runner import StageRunner
from streamrec.service.variants import Variants

#: How long readiness waits for the stages (cluster: the ``Features`` deployment's sources).
READY_TIMEOUT_S = 5.0


class GatewayStatus:
    """Readiness and status of one gateway replica.

    Args:
        composition: ``fused`` or ``cluster``.
        stages: The replica's stages (read at each call: a reload swaps them).
        service: The funnel (its breaker and counters).
        runner: The in-process stages' runner (its breakers count when the stages are local).
        history: This replica's reload outcomes.
        health: The replica's health alerts.
        catalogue: The catalogue log's state.
        engagement: The event-log tail feeding streamed engagement, if any.
        request_log: The sampled request log, if any.
        variants: The experiment's challenger and shadow, if any.
    """

    def __init__(
        self,
        composition: str,
        *,
        stages: GatewayStages,
        service: FunnelService,
        runner: StageRunner,
        history: ReloadHistory,
        health: HealthMonitor,
        catalogue: CatalogueSync,
        request_log: RequestLog | None = None,
        variants: Variants | None = None,
        engagement: EngagementSync | None = None,
    ) -> None:
        self.composition = composition
        self._stages = stages
        self._service = service
        self._runner = runner
        self._history = history
        self._health = health
        self._catalogue = catalogue
        self._engagement = engagement
        self._request_log = request_log
        self._variants = variants

    def breakers(self) -> dict[str, dict[str, Any]]:
        """The breakers of this replica: the funnel, and the stage runner when the stages are local."""
        out = {"funnel": self._service.breaker.snapshot()}
        if self._stages.local is not None:
            out.update({k: v for k, v in self._runner.snapshot().items() if k != "faults"})
        events = self._stages.events
        if events is not None and events.sink is not None:
            out["event_sink"] = events.sink_breaker.snapshot()
        return out

    def warnings(self, breakers: dict[str, dict[str, Any]]) -> list[str]:
        """Why the replica is degraded: open breakers, a refused reload, health alerts, variants not served."""
        out = [f"circuit '{name}' is {b['state']}" for name, b in breakers.items() if b["state"] != "closed"]
        refused = self._history.refused_now
        if refused is not None:
            out.append(f"reload to v{refused['version']} was refused: {refused.get('detail', '')}")
        out += self._health.warnings
        if self._variants is not None:
            out += [f"{what} is not served: {why}" for what, why in self._variants.refused.items()]
        return out

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: not ready only when the stages cannot be reached; degraded is ready, with warnings."""
        try:
            _, sources = await asyncio.wait_for(self._stages.primary(), timeout=timeout_s)
        except Exception as err:
            return False, {"reason": f"stages not reachable: {type(err).__name__}: {err}"}
        breakers = self.breakers()
        out: dict[str, Any] = {"composition": self.composition, "source_names": list(sources)}
        out["breakers"] = {name: b["state"] for name, b in breakers.items()}
        warnings = self.warnings(breakers)
        if warnings:  # still ready: a degraded answer is an answer
            out["warnings"] = warnings
        return True, out

    async def info(self) -> dict[str, Any]:
        """The replica's part of ``/v1/admin/status`` (``stages``)."""
        out: dict[str, Any] = {"composition": self.composition, "funnel": self._service.snapshot()}
        out["breakers"] = self.breakers()
        out["reloads"] = self._history.snapshot()
        out["health_alerts"] = self._health.warnings
        out["request_log"] = self._request_log.snapshot() if self._request_log is not None else None
        out["catalogue"] = self._catalogue.snapshot()
        if self._engagement is not None:
            out["engagement"] = self._engagement.snapshot()
        local, cluster = self._stages.local, self._stages.cluster
        if local is not None:
            out["stages"] = local.describe()
        elif cluster is not None:
            out.update(stage_facts(await cluster.describe_all()))
        fallback = self._stages.fallback
        out["fallback"] = fallback.describe() if fallback else None
        out["experiment"] = self._variants.describe() if self._variants is not None else None
        return out


def stage_facts(every: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The status' ``stages``, ``stage_versions`` and ``stage_breakers`` from every replica's facts.

    ``stages`` holds each stage deployment's first replica's ``describe()``.

    Replicas out of step (an autoscaled or restarted one on another version) show in
    ``stage_versions`` (their requests go to the fallback); an open breaker on any replica of a
    stage shows in ``stage_breakers``.
    """
    return {
        "stages": {n: ds[0] for n, ds in every.items()},
        "stage_versions": {n: sorted({str(d.get("model_version")) for d in ds}) for n, ds in every.items()},
        "stage_breakers": {n: [d.get("breakers", {}) for d in ds] for n, ds in every.items()},
    }
