"""Shadow scoring on a serving replica: the shadow bundle answers sampled requests off the response path.

:class:`ShadowScorer` runs the shadow bundle's whole funnel for a sample of the requests the
champion answered, after the answer is ready, in its own worker threads and under a concurrency
cap: a busy shadow skips requests; it never delays or changes an answer, and its failures are
only recorded. Each run is one row of the request log's ``shadow`` table
(:func:`streamrec.experiments.shadow.shadow_report` reads them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import numpy as np

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.experiments.config import ShadowConfig
from streamrec.experiments.shadow import PAIRS_KEPT, correlation, paired_scores
from streamrec.funnel.stages import Candidates, Stages, run_funnel
from streamrec.monitoring.logs import REQUEST_ID, RequestLog
from streamrec.resilience import ResilienceConfig
from streamrec.service.runner import StageRunner

log = logging.getLogger(__name__)


class ShadowScorer:
    """Scores a sample of requests with the shadow bundle, off the response path.

    Args:
        config: Sampling, concurrency cap and threads.
        resilience: Budgets and breakers of the shadow's own stage runner.
        source_timeout_s: Per-source deadline.
        request_log: Where the runs are written (the ``shadow`` table); None: runs are counted only.
    """

    def __init__(
        self,
        config: ShadowConfig,
        resilience: ResilienceConfig,
        source_timeout_s: float,
        request_log: RequestLog | None,
    ) -> None:
        self.config = config
        self._runner = StageRunner(resilience, source_timeout_s, config.threads)
        self._source_timeout_s = source_timeout_s
        self._log = request_log
        self._stages: Stages | None = None
        self.version = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self.runs = 0
        self.errors = 0
        self.skipped = 0

    def set_stages(self, stages: Stages | None, version: str = "") -> None:
        """Shadow these stages from now on (None: stop shadowing)."""
        self._stages, self.version = stages, version

    @property
    def active(self) -> bool:
        """Whether a shadow bundle is set."""
        return self._stages is not None

    def observe(self, request: RecommendRequest, resp: RecommendResponse, ranked: Candidates | None) -> None:
        """After the champion answered: maybe start a shadow run of ``request`` (never waits)."""
        stages = self._stages
        if stages is None or (self.config.sample_rate < 1.0 and random.random() >= self.config.sample_rate):
            return
        if len(self._tasks) >= self.config.max_concurrent:
            self.skipped += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._run(stages, self.version, request, resp.metadata.model_version, ranked, REQUEST_ID.get())
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        stages: Stages,
        version: str,
        request: RecommendRequest,
        production_version: str,
        production: Candidates | None,
        request_id: str,
    ) -> None:
        t0 = time.perf_counter()
        error = ""
        ranked: Candidates | None = None
        try:
            _, _, _, ranked, _, _ = await run_funnel(
                self._runner.call_for(stages), request, tuple(stages.source_names), self._source_timeout_s
            )
        except Exception as err:  # the shadow's failure is data, never the user's problem
            error = type(err).__name__
            self.errors += 1
        latency_ms = (time.perf_counter() - t0) * 1e3
        self.runs += 1
        try:
            a, b = paired_scores(production, ranked)
            n_common = len(a)
            corr = correlation(a, b)
            if len(a) > PAIRS_KEPT:
                keep = np.sort(np.random.default_rng().choice(len(a), PAIRS_KEPT, replace=False))
                a, b = a[keep], b[keep]
            if self._log is not None:
                self._log.record_shadow(
                    {
                        "request_id": request_id,
                        "ts": time.time(),
                        "user_id": int(request.user_id),
                        "model_version": production_version,
                        "shadow_version": version,
                        "latency_ms": latency_ms,
                        "error": error or None,
                        "common": n_common,
                        "correlation": corr,
                        "production_scores": a.astype(np.float32).tolist(),
                        "shadow_scores": b.astype(np.float32).tolist(),
                    }
                )
        except Exception as err:  # pragma: no cover - logging must not raise into the loop
            log.warning("shadow run could not be logged: %s: %s", type(err).__name__, err)

    def snapshot(self) -> dict[str, Any]:
        """Counters for the admin status."""
        return {
            "version": self.version or None,
            "runs": self.runs,
            "errors": self.errors,
            "skipped_busy": self.skipped,
            "in_flight": len(self._tasks),
            "sample_rate": self.config.sample_rate,
        }

    def close(self) -> None:
        """Stop the shadow's worker threads."""
        self._runner.close()
