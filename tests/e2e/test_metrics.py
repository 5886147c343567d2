"""The serving metrics reach Ray's Prometheus endpoint, and sampled requests reach the request log.

Both compositions run on the session's Serve instance (``served``); Ray was started with a
metrics export port (fixture ``metrics_port``), which is what Prometheus scrapes on every node.
"""

from __future__ import annotations

import json
import re
import time

import httpx

from streamrec.monitoring.logs import read_impressions, read_requests
from tests.e2e.conftest import READ_KEY, WRITE_KEY, Served

#: Metrics every running gateway exports once it has served recommends and events.
EXPECTED = (
    "ray_streamrec_request_latency_ms_bucket",
    "ray_streamrec_stage_latency_ms_bucket",
    "ray_streamrec_requests_total",
    "ray_streamrec_source_candidates_bucket",
    "ray_streamrec_http_responses_total",
    "ray_streamrec_events_total",
    "ray_streamrec_breaker_state",
    "ray_streamrec_health_alert",
    "ray_streamrec_model_version",
    "ray_streamrec_skew_alerts",
    "ray_streamrec_skew_check_age_seconds",
    "ray_streamrec_rate_limited_total",
)


def _scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
    except httpx.ConnectError:  # the node's metrics agent may still be starting
        return ""


def _wait_for(port: int, pattern: str, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, _scrape(port)):
            return True
        time.sleep(2)
    return False


def test_metrics_are_exported_for_both_compositions_with_bounded_labels(served: Served, metrics_port: int) -> None:
    from streamrec.data.store import DataStore

    store = DataStore(served.data_dir)
    user = int(store.users()["user_id"].iloc[0])
    item = int(store.items()["item_id"].iloc[0])
    with served.client() as c:
        for app in ("fused", "cluster"):
            for u in range(1, 11):
                r = c.post(f"/{app}/v1/recommend", json={"user_id": u, "k": 5}, headers={"X-API-Key": READ_KEY})
                assert r.status_code == 200
            ev = {"events": [{"event_id": f"metrics-{app}", "user_id": user, "item_id": item, "event_type": "click"}]}
            assert c.post(f"/{app}/v1/events", json=ev, headers={"X-API-Key": WRITE_KEY}).status_code == 200
            assert c.post(f"/{app}/v1/recommend", json={"user_id": 1}, headers={}).status_code == 401
        # Past the per-address bucket for missing keys (burst 20 per gateway replica, and the fused
        # composition runs two, each with its own buckets): 429 with Retry-After, counted.
        anon = []
        for _ in range(200):
            anon.append(c.post("/fused/v1/recommend", json={"user_id": 1}, headers={}))
            if anon[-1].status_code == 429 and len([r for r in anon if r.status_code == 429]) >= 3:
                break
        limited = [r for r in anon if r.status_code == 429]
        assert limited and all("retry-after" in r.headers for r in limited), [r.status_code for r in anon]
    def requests_counted(text: str, app: str) -> bool:
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_streamrec_requests_total{")]
        return any(f'application="{app}"' in ln and 'level="' in ln and 'reason="' in ln for ln in lines)

    # Each replica's metrics reach the node agent on their own schedule (the agent exports every few
    # seconds, the health loop runs every 10 s): wait for everything the assertions below read.
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        text = _scrape(metrics_port)
        if all(name in text for name in EXPECTED) and all(requests_counted(text, a) for a in ("fused", "cluster")):
            break
        time.sleep(3)
    missing = [name for name in EXPECTED if name not in text]
    assert not missing, f"not exported: {missing}"
    for app in ("fused", "cluster"):
        assert requests_counted(text, app), f"no ray_streamrec_requests_total from the {app} application"
    assert re.search(r'ray_streamrec_http_responses_total\{[^}]*route="recommend"[^}]*status_class="4xx"', text) or \
        re.search(r'ray_streamrec_http_responses_total\{[^}]*status_class="4xx"[^}]*route="recommend"', text)
    assert re.search(r'ray_streamrec_events_total\{[^}]*outcome="accepted"', text)
    assert re.search(r'ray_streamrec_rate_limited_total\{[^}]*limiter="', text)
    # The cluster's stage replicas export their own breakers (the ranker's lives in Ranker).
    assert re.search(r'ray_streamrec_breaker_state\{[^}]*deployment="Ranker"[^}]*\}', text) or _wait_for(
        metrics_port, r'ray_streamrec_breaker_state\{[^}]*deployment="Ranker"'
    ), "no breaker state from the cluster's Ranker replicas"
    # Bounded labels: no user or item ids anywhere in our metrics' label values.
    ours = [ln for ln in text.splitlines() if ln.startswith("ray_streamrec_")]
    labels = {m.group(1) for ln in ours for m in re.finditer(r'(\w+)="', ln)}
    assert not {"user_id", "item_id", "user", "item", "request_id"} & labels
    values = {(m.group(1), m.group(2)) for ln in ours for m in re.finditer(r'(\w+)="([^"]*)"', ln) if m.group(1) != "le"}
    assert not [kv for kv in values if kv[1].isdigit()], "a label value looks like an id"


def test_sampled_requests_are_written_to_the_request_log(served: Served) -> None:
    with served.client() as c:
        for u in (1, 2, 3):
            r = c.post("/fused/v1/recommend", json={"user_id": u, "k": 5}, headers={"X-API-Key": READ_KEY})
            assert r.status_code == 200
    rid = r.json()["metadata"]["request_id"]
    deadline = time.monotonic() + 30  # the e2e config flushes every second
    while time.monotonic() < deadline:
        reqs = read_requests(served.data_dir)
        if rid in set(reqs["request_id"]):
            break
        time.sleep(1)
    row = reqs[reqs["request_id"] == rid].iloc[0]
    assert row["user_id"] == 3 and row["n_items"] == 5 and row["latency_ms"] > 0
    imps = read_impressions(served.data_dir)
    assert list(imps[imps["request_id"] == rid].sort_values("position")["item_id"]) == [
        i["item_id"] for i in r.json()["items"]
    ]


def test_a_health_alert_reaches_readyz_while_it_fires_and_leaves_when_it_clears(served: Served) -> None:
    """A skew check with alerts (as ``streamrec monitor skew`` leaves it) turns into a /readyz warning."""
    path = served.data_dir / "monitoring" / "skew" / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = {"checked_at_epoch": time.time(), "alerts": 2, "alerted_features": ["e2e_feature_a", "e2e_feature_b"]}
    path.write_text(json.dumps(facts))

    def warnings(c: httpx.Client) -> list[str]:
        r = c.get("/fused/readyz")
        assert r.status_code == 200  # still ready: a degraded answer is an answer
        return list(r.json().get("warnings") or [])

    def wait(c: httpx.Client, firing: bool) -> list[str]:
        deadline = time.monotonic() + 45  # the health loop runs every 10 s
        seen = warnings(c)
        while any("e2e_feature_a" in w for w in seen) != firing and time.monotonic() < deadline:
            time.sleep(1)
            seen = warnings(c)
        return seen

    try:
        with served.client() as c:
            seen = wait(c, firing=True)
            assert any("2 feature(s) differ" in w and "e2e_feature_a" in w for w in seen), seen
            path.unlink()
            seen = wait(c, firing=False)
            assert not any("e2e_feature_a" in w for w in seen), seen
    finally:
        path.unlink(missing_ok=True)
