"""The user simulator as an HTTP client: real traffic against a running StreamRec API.

:func:`simulate` picks users of the synthetic world (seeded), sends ``POST /v1/recommend`` for
them with a few requests in flight, lets each simulated user react to the served slate with the
world's ground-truth click model (:meth:`streamrec.data.simulator.UserSimulator.simulate_session`)
and posts what they did to ``POST /v1/events`` (skips, clicks, completions; each event names the
response's experiment variant and has an id derived from the request id, so a retried batch is
stored once). It tallies, per variant the server reported, requests, users, items shown, clicks,
completions, errors and latencies, and compares treatment with control by
:func:`streamrec.experiments.analysis.analyse`.

Latency is measured by the client: the round trip of the answered attempt (retries' waits not
included). An error is a request the API did not answer after the retries (counted in the
user's variant when an earlier answer named it, else ``none``: assignment is sticky) or one
answered below the levels at which the variant's model answers
(:data:`~streamrec.experiments.analysis.ANSWERED_LEVELS`).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pandas as pd

from streamrec.data.simulator import UserSimulator
from streamrec.errors import ConfigError, DataError, ServingError
from streamrec.experiments.analysis import (
    ANSWERED_LEVELS,
    NO_VARIANT,
    REQUEST_FRAME_COLUMNS,
    ExperimentAnalysis,
    VariantSummary,
    analyse,
    summarise,
)
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig
from streamrec.jsonsafe import json_safe
from streamrec.monitoring.drift import quality_row
from streamrec.paths import resolve_data_dir

#: Statuses retried (with the server's ``Retry-After`` when it gives one).
RETRY_STATUSES: frozenset[int] = frozenset({429, 503})
#: Event types posted for an item's outcome (``impression``: the user did nothing with it).
OUTCOME_EVENTS: dict[str, tuple[str, ...]] = {
    "skip": ("skip",),
    "click": ("click",),
    "complete": ("click", "complete"),
}
#: Longest wait between two attempts, seconds.
MAX_BACKOFF_S = 10.0


@dataclass
class _Request:
    """One simulated request and what came of it."""

    index: int
    user_id: int
    variant: str = NO_VARIANT
    request_id: str = ""
    ts: float = math.nan
    latency_ms: float = math.nan
    error: bool = False
    failure: str | None = None
    items: list[int] = field(default_factory=list)
    clicks: int = 0
    completions: int = 0
    events_posted: int = 0
    events_failed: int = 0


@dataclass(frozen=True)
class SimulationResult:
    """What a simulation sent, what the users did, and the comparison of the variants.

    Attributes:
        url: The API's base URL (with the prefix).
        experiment: The experiment definition the comparison used.
        expected_share: Treatment share the SRM check expected.
        summaries: Per variant the server reported (``none`` outside an experiment).
        analysis: Treatment against control (None unless both were served).
        requests: Recommend requests sent.
        events_posted: Events the API accepted.
        event_errors: Events whose batch failed after the retries, per variant.
        retries: Attempts retried after a 429 or 503.
        failures: Requests not answered, by reason (``HTTP 500``, ``ConnectError``...).
        wall_s: Seconds the simulation took.
    """

    url: str
    experiment: ExperimentConfig
    expected_share: float
    summaries: dict[str, VariantSummary]
    analysis: ExperimentAnalysis | None
    requests: int
    events_posted: int
    event_errors: dict[str, int]
    retries: int
    failures: dict[str, int]
    wall_s: float

    @property
    def decision(self) -> str | None:
        """The analysis' decision (None when there was nothing to compare)."""
        return self.analysis.decision if self.analysis is not None else None

    def variant_rows(self) -> list[dict[str, Any]]:
        """Per variant: counts, CTR and completion rate with their Wilson intervals, latency."""
        confidence = 1 - self.experiment.alpha
        return [
            {
                "variant": name,
                "users": s.users,
                "requests": s.requests,
                **quality_row(s.impressions, s.clicks, s.completions, confidence),
                "errors": s.errors,
                "error_rate": s.error_rate,
                "latency_p50_ms": s.latency_p50_ms,
                "latency_p99_ms": s.latency_p99_ms,
                "distinct_items": s.distinct_items,
                "event_errors": self.event_errors.get(name, 0),
            }
            for name, s in self.summaries.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the variants, the comparison, the decision and its reasons."""
        analysis = self.analysis.to_dict() if self.analysis is not None else None
        out = {
            "url": self.url,
            "experiment": self.experiment.name,
            "expected_share": self.expected_share,
            "requests": self.requests,
            "events_posted": self.events_posted,
            "retries": self.retries,
            "failures": dict(self.failures),
            "wall_s": self.wall_s,
            "variants": self.variant_rows(),
            "comparison": None if analysis is None else analysis["metrics"],
            "decision": self.decision,
            "reasons": [] if analysis is None else analysis["reasons"],
            "analysis": analysis,
        }
        return json_safe(out)


def simulate(
    url: str,
    api_key: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    users: int,
    requests: int,
    k: int = 20,
    concurrency: int = 4,
    seed: int = 0,
    prefix: str = "",
    config: ExperimentConfig | None = None,
    expected_share: float | None = None,
    progress: bool = False,
    max_retries: int = 5,
    timeout_s: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SimulationResult:
    """Send ``requests`` recommend requests for ``users`` simulated users and post what they do.

    Args:
        url: Base URL of the API (``http://127.0.0.1:8000``).
        api_key: Key with the ``read`` and ``write`` scopes (``X-API-Key``).
        data_dir: The synthetic world the server serves (its ``truth/`` drives the users).
        users: Distinct users, drawn from the world without replacement (seeded); requests go
            to them in turn.
        requests: Recommend requests to send.
        k: Items asked for per request.
        concurrency: Requests in flight at most.
        seed: Seed of the users drawn and of every simulated reaction.
        prefix: Route prefix of the API (``/streamrec`` behind an ingress).
        config: The experiment definition (default: :class:`ExperimentConfig` defaults).
        expected_share: Treatment share the SRM check expects (default: ``config.treatment_share``).
        progress: A progress bar on stderr.
        max_retries: Retries of a request answered 429 or 503 (or not at all).
        timeout_s: Timeout of one HTTP call.
        transport: An httpx transport (e.g. ``httpx.ASGITransport(app)`` to run in-process).

    Returns:
        The tallies per variant and the comparison (when control and treatment were served).

    Raises:
        ConfigError: an argument is out of range.
        DataNotFoundError: ``data_dir`` holds no synthetic world.
        DataError: the server served items or users the world does not have.
        ServingError: the API refused the key (401/403): nothing else would work.
    """
    if users < 1 or requests < 1 or concurrency < 1 or not 1 <= k <= 100 or max_retries < 0:
        raise ConfigError(
            f"users ({users}), requests ({requests}) and concurrency ({concurrency}) must be at least 1, "
            f"k ({k}) within 1..100 and max_retries ({max_retries}) at least 0"
        )
    cfg = config or ExperimentConfig()
    share = cfg.treatment_share if expected_share is None else expected_share
    if not 0 <= share <= 1:
        raise ConfigError(f"expected share {share} is not in [0, 1]: give the treatment's share of users")
    return asyncio.run(
        _simulate(
            url.rstrip("/") + "/" + prefix.strip("/") if prefix.strip("/") else url.rstrip("/"),
            api_key,
            data_dir,
            users=users,
            n_requests=requests,
            k=k,
            concurrency=concurrency,
            seed=seed,
            config=cfg,
            share=share,
            progress=progress,
            max_retries=max_retries,
            timeout_s=timeout_s,
            transport=transport,
        )
    )


async def _simulate(
    base: str,
    api_key: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    users: int,
    n_requests: int,
    k: int,
    concurrency: int,
    seed: int,
    config: ExperimentConfig,
    share: float,
    progress: bool,
    max_retries: int,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None,
) -> SimulationResult:
    world = UserSimulator(resolve_data_dir(data_dir))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(world.n_users, size=min(users, world.n_users), replace=False) + 1
    plan = [_Request(i, int(chosen[i % len(chosen)])) for i in range(n_requests)]
    sticky: dict[int, str] = {}
    counters = {"retries": 0}
    failures: dict[str, int] = {}
    bar = _progress_bar(n_requests) if progress else None
    started = time.perf_counter()
    headers = {"X-API-Key": api_key}
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=timeout_s, transport=transport
    ) as client:
        queue: asyncio.Queue[_Request] = asyncio.Queue()
        for r in plan:
            queue.put_nowait(r)

        async def call(path: str, body: dict[str, Any]) -> tuple[httpx.Response | None, float, str | None]:
            return await _post(client, path, body, max_retries, counters)

        async def worker() -> None:
            while True:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _one(r, k, seed, world, call, sticky, failures)
                if bar is not None:
                    bar.update(1)

        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, n_requests))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # one worker's error ends the run: stop the others first
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if bar is not None:
                bar.close()
    wall = time.perf_counter() - started
    for r in plan:  # a failure before the user's first answer: its variant is known now
        if r.failure is not None and r.variant == NO_VARIANT and r.user_id in sticky:
            r.variant = sticky[r.user_id]
    summaries = summarise(_frame(plan), seed=seed)
    analysis = None
    if CONTROL in summaries and TREATMENT in summaries:
        analysis = analyse(summaries, config, share, world.n_items)
    event_errors: dict[str, int] = {}
    for r in plan:
        if r.events_failed:
            event_errors[r.variant] = event_errors.get(r.variant, 0) + r.events_failed
    return SimulationResult(
        url=base,
        experiment=config,
        expected_share=share,
        summaries=summaries,
        analysis=analysis,
        requests=n_requests,
        events_posted=sum(r.events_posted for r in plan),
        event_errors=event_errors,
        retries=counters["retries"],
        failures=failures,
        wall_s=wall,
    )


async def _one(
    r: _Request,
    k: int,
    seed: int,
    world: UserSimulator,
    call: Callable[[str, dict[str, Any]], Any],
    sticky: dict[int, str],
    failures: dict[str, int],
) -> None:
    """Send one request, simulate the user's reaction, post the events."""
    device = world.preferred_devices([r.user_id])[0]  # as the user's recorded sessions were
    body = {"user_id": r.user_id, "k": k, "context": {"device": device}}
    resp, latency_ms, failure = await call("/v1/recommend", body)
    r.ts = time.time()
    if resp is None:
        r.failure = failure or "no answer"
        r.error = True
        r.variant = sticky.get(r.user_id, NO_VARIANT)
        failures[r.failure] = failures.get(r.failure, 0) + 1
        return
    body = resp.json()
    meta = body.get("metadata") or {}
    variant = meta.get("experiment_variant")
    r.variant = str(variant) if variant else NO_VARIANT
    if variant:
        sticky[r.user_id] = r.variant
    r.request_id = str(meta.get("request_id") or f"req{r.index}")
    r.latency_ms = latency_ms
    r.error = meta.get("degradation_level") not in ANSWERED_LEVELS
    r.items = [int(it["item_id"]) for it in body.get("items") or []]
    if not r.items:
        return
    try:
        outcome = world.simulate_session(r.user_id, r.items, rng=np.random.default_rng([seed, r.index]))
    except DataError as err:
        raise DataError(
            f"the API served what the synthetic world does not know ({err}): point --data-dir at the "
            "world the server was built from"
        ) from err
    r.clicks = int(outcome.clicked.sum())
    r.completions = sum(1 for t in outcome.event_types if t == "complete")
    now = datetime.now(UTC).isoformat()
    events: list[dict[str, Any]] = []
    for item, kind, watch in zip(r.items, outcome.event_types, outcome.watch_fraction.tolist(), strict=True):
        for event_type in OUTCOME_EVENTS.get(kind, ()):
            ev: dict[str, Any] = {
                "event_id": f"sim-{r.request_id}-{item}-{event_type}",
                "user_id": r.user_id,
                "item_id": item,
                "event_type": event_type,
                "timestamp": now,
                "device": device,
            }
            if event_type == "complete" and math.isfinite(watch):
                ev["watch_fraction"] = min(max(float(watch), 0.0), 1.0)
            if variant:
                ev["experiment_variant"] = r.variant
            events.append(ev)
    if not events:
        return
    posted, _, _ = await call("/v1/events", {"events": events})
    if posted is None:
        r.events_failed = len(events)
    else:
        r.events_posted = len(events)


async def _post(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], max_retries: int, counters: dict[str, int]
) -> tuple[httpx.Response | None, float, str | None]:
    """POST with retries of 429/503 and transport errors; ``(response or None, latency ms, failure)``."""
    failure: str | None = None
    for attempt in range(max_retries + 1):
        wait = min(MAX_BACKOFF_S, 0.1 * 2**attempt)
        t0 = time.perf_counter()
        try:
            resp = await client.post(path, json=body)
        except httpx.TransportError as err:
            failure = type(err).__name__
        else:
            latency_ms = (time.perf_counter() - t0) * 1e3
            if resp.is_success:
                return resp, latency_ms, None
            if resp.status_code in (401, 403):
                raise ServingError(
                    f"{path} answered {resp.status_code}: {resp.text[:300]}; set STREAMREC_API_KEY to a key "
                    "with the read and write scopes"
                )
            failure = f"HTTP {resp.status_code}"
            if resp.status_code not in RETRY_STATUSES:
                return None, math.nan, failure
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            if retry_after is not None:
                wait = min(MAX_BACKOFF_S, retry_after)
        if attempt < max_retries:
            counters["retries"] += 1
            await asyncio.sleep(wait)
    return None, math.nan, failure


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _frame(plan: list[_Request]) -> pd.DataFrame:
    """The simulated requests as :func:`~streamrec.experiments.analysis.summarise` takes them."""
    return pd.DataFrame(
        {
            "request_id": [r.request_id or f"failed-{r.index}" for r in plan],
            "ts": pd.to_datetime([r.ts for r in plan], unit="s", utc=True),
            "variant": [r.variant for r in plan],
            "user_id": [r.user_id for r in plan],
            "latency_ms": [r.latency_ms for r in plan],
            "error": [r.error for r in plan],
            "impressions": [len(r.items) for r in plan],
            "clicks": [r.clicks for r in plan],
            "completions": [r.completions for r in plan],
            "items": [r.items for r in plan],
        },
        columns=list(REQUEST_FRAME_COLUMNS),
    )


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulate", file=sys.stderr)


