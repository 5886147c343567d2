"""``streamrec serve``: start Ray and the serving application from a Serve config (blocking)."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from streamrec.errors import ConfigError, DataNotFoundError, ServingError
from streamrec.paths import resolve_data_dir

app = typer.Typer(help="Run the recommendation service.", no_args_is_help=True)

#: Environment variable naming an extra key with the ``admin`` scope (optional).
ENV_ADMIN_KEY = "STREAMREC_ADMIN_KEY"
#: With ``--direct-ingress``, Ray's HTTP proxy moves this far above ``--port``.
PROXY_PORT_OFFSET = 100


def direct_ingress_env(port: int, span: int = 50) -> dict[str, str]:
    """Ray Serve settings that make ingress replicas answer HTTP themselves from ``port`` up.

    ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (a Ray Serve feature flag, part of
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED``) starts an HTTP server inside every ingress replica, on
    the lowest free port of ``[port, port + span)``; clients that connect there skip the proxy
    actor and its extra hop. The port quarantine is off so that a restarted or reloaded replica
    gets the same port back at once. Must be in the environment of the processes that start
    Ray (see docs/operations.md and ADR-008).
    """
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + span - 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


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
    """Block until ``url`` answers 200 (the direct-ingress server starts after the deploy returns)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServingError(f"the gateway replica did not answer at {url} within {timeout_s:.0f} s")


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
            help="The gateway replica answers HTTP itself on --port (Ray Serve direct ingress; local Ray "
            f"only): no proxy hop, 1.5-2x the throughput of one fused replica on 2 cores (measured). Ray's "
            f"proxy moves to --port + {PROXY_PORT_OFFSET}."
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the application to be ready.")] = 300.0,
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
    if direct_ingress and addr:
        raise ConfigError(
            "--direct-ingress needs a Ray started by this command; on a running cluster set the "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS variables when starting Ray (docs/operations.md)"
        )
    cfg = serve_config.load(_find_config(config))
    cfg = serve_config.override(cfg, data_dir=root, host=host, port=port)
    direct_url = None
    if direct_ingress:
        http_opts = cfg.setdefault("http_options", {})
        public = int(http_opts.get("port", 8000))
        http_opts["port"] = public + PROXY_PORT_OFFSET
        os.environ.update(direct_ingress_env(public))
        direct_url = f"http://{http_opts.get('host', '127.0.0.1')}:{public}"
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
    import ray
    from ray import serve as ray_serve

    typer.echo(f"starting Ray ({'joining ' + addr if addr else 'local'}) and {config} ...", err=True)
    if addr:
        ray.init(address=addr, namespace="serve")
    else:
        ray.init(address="local", num_cpus=num_cpus, namespace="serve", include_dashboard=False)
    try:
        serve_config.deploy(cfg, timeout_s=timeout)
        if direct_url is not None:
            _wait_healthy(f"{direct_url}{prefix}/healthz", timeout)
            typer.echo(f"Ray's proxy serves the same application at {url}{prefix}")
            url = direct_url
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
