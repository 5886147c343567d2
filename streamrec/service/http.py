"""The gateway's HTTP app wired to the request policy, the event log and its streaming sink."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from streamrec.api_models import RecommendRequest, RecommendResponse
from streamrec.auth import ApiKeyAuth
from streamrec.data.event_log import EventLog, Sink
from streamrec.monitoring.metrics import ServingMetrics
from streamrec.service.args import ServeArgs
from streamrec.service.loading import import_object
from streamrec.serving.gateway import create_app

log = logging.getLogger(__name__)


def load_sink(args: ServeArgs) -> Sink | None:
    """The streaming sink named by ``args.events_sink`` (None when unset or unavailable)."""
    if not args.events_sink:
        return None
    try:
        sink: Sink = import_object(args.events_sink)(args.data_dir)
        return sink
    except Exception as err:  # events are still logged durably; only the streaming path is off
        log.warning(
            "events sink %s unavailable (%s); events are logged without streaming push", args.events_sink, err
        )
        return None


def feature_client_sink(data_dir: str | None) -> Sink:
    """The feature store's streaming push (``FeatureClient.push_interactions``) as the events sink.

    Use as ``events_sink: streamrec.service.http:feature_client_sink`` in the Serve config.

    Raises:
        FeatureStoreError: no feature store has been built under ``data_dir`` (the gateway then
            logs a warning and serves events without the streaming push).
    """
    from pathlib import Path

    from streamrec.errors import FeatureStoreError
    from streamrec.features.client import FeatureClient

    client = FeatureClient(data_dir)
    if not Path(client.meta_path).is_file():
        raise FeatureStoreError(
            f"no feature store under {client.features_dir}: run 'streamrec features build' and "
            "'streamrec features apply' first"
        )
    _ = client.store  # import Feast and load the registry now, not on the first event (~10 s here)
    push: Sink = client.push_interactions
    return push


def build_gateway(
    args: ServeArgs,
    recommend: Callable[[RecommendRequest], Awaitable[RecommendResponse]],
    *,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ready: Callable[[], Any] | None = None,
    info: Callable[[], Any] | None = None,
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    environ: dict[str, str] | None = None,
    behind_ray_proxy: bool = False,
    metrics: ServingMetrics | None = None,
    variant_of: Callable[[int], str | None] | None = None,
    upsert_items: Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]] | None = None,
) -> tuple[FastAPI, EventLog | None]:
    """The gateway app for ``args`` plus its event log.

    ``behind_ray_proxy``: Ray Serve's proxy assigns and echoes ``X-Request-ID`` itself.
    ``status``: the admin status over every replica (see ``create_app``).
    ``metrics``: where responses and rate-limited requests are counted.
    ``variant_of``: the experiment variant of a user (stamps events that carry none).
    ``upsert_items``: records catalogue upserts (``POST /v1/admin/items``).

    Raises:
        ConfigError: no API key is configured while authentication is enabled.
    """
    auth = ApiKeyAuth.from_config(args.auth, environ if environ is not None else dict(os.environ))
    events = None
    if args.event_log:
        events = EventLog.open(
            args.data_dir,
            sink=load_sink(args),
            fsync=args.event_log_fsync,
            sink_timeout_s=args.events_sink_timeout_ms / 1e3,
        )
    app = create_app(
        recommend,
        events,
        auth,
        args.limits,
        reload=reload,
        ready=ready,
        info=info,
        status=status,
        echo_request_id=not behind_ray_proxy,
        metrics=metrics,
        variant_of=variant_of,
        upsert_items=upsert_items,
    )
    return app, events
