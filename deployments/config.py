"""Serve config files from Python: load, override, validate, deploy (what ``serve run <yaml>`` does).

The configs in ``configs/serve/`` are ordinary Ray Serve deploy configs (``serve deploy`` /
``serve run`` / the KubeRay ``RayService`` accept them unchanged). The CLI (``streamrec serve``),
the end-to-end tests and the benchmark deploy them through :func:`deploy`, which performs the
same two calls as Ray's own ``serve run <config.yaml>``: start Serve with the file's
``http_options``/``proxy_location``, then ``deploy_apps`` with the whole (validated) config. So
what runs in tests is exactly what the YAML says, plus explicit :func:`override` s (data dir,
port, app name...).

Note that a deploy config is *declarative for the whole cluster*: deploying it replaces every
application not in it. Use :func:`merge` to run several applications at once.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml

from streamrec.errors import ConfigError, ServingError

#: The import path every StreamRec application uses.
IMPORT_PATH = "deployments.app:build_app"


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Serve config YAML (not yet validated).

    Raises:
        ConfigError: missing file or invalid YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Serve config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not data.get("applications"):
        raise ConfigError(f"{p} is not a Serve deploy config (it needs an 'applications' list)")
    return data


def validate(cfg: dict[str, Any], source: str = "<serve config>") -> Any:
    """Validate with Ray's own schema and our builder arguments; return the ``ServeDeploySchema``.

    Raises:
        ConfigError: naming what is wrong.
    """
    from ray.serve.schema import ServeDeploySchema

    from streamrec.service.args import ServeArgs

    try:
        schema = ServeDeploySchema.model_validate(cfg)
    except Exception as err:  # pydantic v1 or v2 error, depending on Ray's build
        raise ConfigError(f"{source}: invalid Serve config: {err}") from None
    for app in cfg["applications"]:
        if app.get("import_path") == IMPORT_PATH:
            ServeArgs.parse(app.get("args") or {})
    return schema


def override(
    cfg: dict[str, Any],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    route_prefix: str | None = None,
    host: str | None = None,
    port: int | None = None,
    env_vars: dict[str, str] | None = None,
    args: dict[str, Any] | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A copy of ``cfg`` with values replaced (every application unless said otherwise).

    Args:
        cfg: The loaded config.
        data_dir: ``args.data_dir`` of every application (made absolute).
        name: Name of the (single) application.
        route_prefix: Route prefix of the (single) application.
        host: ``http_options.host``.
        port: ``http_options.port``.
        env_vars: Added to every application's ``runtime_env.env_vars``.
        args: Merged (one level deep for dicts) into every application's ``args``.
        deployments: Per deployment name, options merged into that deployment's entry
            (``ray_actor_options`` merged one level deep).
    """
    out = copy.deepcopy(cfg)
    http = out.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = int(port)
    apps = out["applications"]
    if (name is not None or route_prefix is not None) and len(apps) != 1:
        raise ConfigError("name/route_prefix overrides need a config with exactly one application")
    for app in apps:
        if name is not None:
            app["name"] = name
        if route_prefix is not None:
            app["route_prefix"] = route_prefix
        a = app.setdefault("args", {})
        if data_dir is not None:
            a["data_dir"] = str(Path(data_dir).expanduser().resolve())
        for k, v in (args or {}).items():
            a[k] = {**a[k], **v} if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        if env_vars:
            rt = app.setdefault("runtime_env", {})
            rt["env_vars"] = {**rt.get("env_vars", {}), **env_vars}
        for dep_name, opts in (deployments or {}).items():
            entries = app.setdefault("deployments", [])
            entry = next((d for d in entries if d.get("name") == dep_name), None)
            if entry is None:
                entry = {"name": dep_name}
                entries.append(entry)
            for k, v in opts.items():
                entry[k] = (
                    {**entry.get(k, {}), **v} if isinstance(v, dict) and isinstance(entry.get(k), dict) else v
                )
    return out


def merge(*cfgs: dict[str, Any]) -> dict[str, Any]:
    """One config running the applications of all ``cfgs`` (cluster options from the first).

    Raises:
        ConfigError: two applications share a name or a route prefix.
    """
    out = copy.deepcopy(cfgs[0])
    out["applications"] = [copy.deepcopy(a) for c in cfgs for a in c["applications"]]
    names = [a.get("name", "default") for a in out["applications"]]
    prefixes = [a.get("route_prefix", "/") for a in out["applications"]]
    if len(set(names)) != len(names) or len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"merged applications need distinct names and route prefixes: {names} {prefixes}")
    return out


def deploy(cfg: dict[str, Any], *, wait: bool = True, timeout_s: float = 180.0) -> list[str]:
    """Deploy a config on the connected Ray cluster (``ray.init`` first), like ``serve run <yaml>``.

    Args:
        cfg: The config (validated here).
        wait: Block until every application is ``RUNNING``.
        timeout_s: How long to wait.

    Returns:
        The application names.

    Raises:
        ConfigError: the config is invalid.
        ServingError: an application failed to deploy or did not become ready in time.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    schema = validate(cfg)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    if wait:
        wait_running(names, timeout_s)
    return names


def wait_running(names: list[str], timeout_s: float = 180.0) -> None:
    """Wait until the applications are ``RUNNING``.

    Raises:
        ServingError: one failed to deploy (with Ray's message) or the wait timed out.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        last = {n: str(getattr(apps[n].status, "value", apps[n].status)) if n in apps else "-" for n in names}
        failed = [n for n, s in last.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            details = {n: apps[n].message for n in failed}
            raise ServingError(f"Serve application(s) failed to deploy: {details}")
        if all(s == "RUNNING" for s in last.values()):
            return
        time.sleep(0.5)
    raise ServingError(f"Serve applications not running after {timeout_s:.0f}s: {last}")


__all__ = ["IMPORT_PATH", "deploy", "load", "merge", "override", "validate", "wait_running"]
