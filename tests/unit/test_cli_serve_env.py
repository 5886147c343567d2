"""``streamrec serve --direct-ingress``: the Ray Serve settings it exports before Ray starts."""

from __future__ import annotations

import pytest

from streamrec.cli.serve import PROXY_PORT_OFFSET, direct_ingress_env
from streamrec.errors import ConfigError


@pytest.mark.parametrize("port", [8000, 30000])
def test_haproxy_replicas_proxy_and_listeners_get_distinct_ports_above_the_public_one(port: int) -> None:
    env = direct_ingress_env(port)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    lo = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"])
    hi = int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    replicas = set(range(lo, hi + 1))
    others = [
        int(env[k])
        for k in (
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
            "RAY_SERVE_HAPROXY_STATS_PORT",
            "RAY_SERVE_HAPROXY_METRICS_PORT",
        )
    ]
    # HAProxy takes the public port itself (Serve's http_options.port); nothing else may.
    assert port not in replicas and port not in others
    assert len(replicas) == 50 and min(replicas) == port + 1
    assert not replicas & set(others) and len(set(others)) == 3
    assert int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) == port + PROXY_PORT_OFFSET
    # A restarted or hot-swapped replica must get its port back at once (HAProxy follows it).
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"


@pytest.mark.parametrize("span", [0, PROXY_PORT_OFFSET])
def test_a_replica_range_that_would_reach_the_proxy_port_is_refused(span: int) -> None:
    with pytest.raises(ConfigError, match="port span"):
        direct_ingress_env(8000, span=span)


def test_haproxy_resends_what_a_dead_replica_closed_and_ray_proxy_resends_what_it_never_answered() -> None:
    from ray._common.utils import import_attr

    from streamrec.cli.serve import proxy_resend_env
    from streamrec.service.ingress_retry import ResendUnanswered

    env = direct_ingress_env(8000)
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    assert env["RAY_SERVE_HAPROXY_OBSERVE_MARK_DOWN_ENABLED"] == "0"  # mark-down answered them 502
    (mw,) = import_attr(proxy_resend_env()["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"])()
    assert mw.cls is ResendUnanswered


def test_an_operators_own_proxy_callback_or_none_is_left_alone() -> None:
    from streamrec.cli.serve import install_proxy_resend, proxy_resend_env

    name = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
    env: dict[str, str] = {}
    install_proxy_resend(env)
    assert env == proxy_resend_env()
    for theirs in ("", "their.module:callback"):
        env = {name: theirs}
        install_proxy_resend(env)
        assert env == {name: theirs}
