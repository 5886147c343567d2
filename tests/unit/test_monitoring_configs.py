"""The Prometheus rules, the scrape config and the Grafana dashboard in configs/monitoring.

Every PromQL expression is parsed (``promql-parser``, Rust bindings of a complete PromQL parser),
and every StreamRec metric and label it names is checked against the catalogue
(streamrec/monitoring/metrics.py) as Ray exports it: ``ray_`` + name, histograms as
``_bucket``/``_sum``/``_count``, the metric's tags plus the labels Ray Serve, Ray and the scrape
add. Where ``promtool`` is on PATH, it also checks the rules file and runs unit tests of the main
alerts on synthetic series (skipped otherwise: it is not a Python package). docs/operations.md
must hold the metric table of the catalogue and name every alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from streamrec.monitoring.metrics import CATALOGUE, MetricSpec

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "configs" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS = MONITORING / "prometheus.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

PREFIX = "ray_"
#: Labels on every exported series besides the metric's tags: Ray Serve's (application,
#: deployment, replica), Ray's (NodeAddress, SessionName, Component, Version, WorkerId) and the
#: scrape's (instance, job).
RAY_LABELS = frozenset(
    {
        "application",
        "deployment",
        "replica",
        "NodeAddress",
        "SessionName",
        "Component",
        "Version",
        "WorkerId",
        "instance",
        "job",
    }
)
SEVERITIES = frozenset({"critical", "warning", "info"})
#: Functions that need a counter (or histogram bucket/count/sum) under them: never a gauge.
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase"})
#: Grafana's interval variables become a duration, every other variable a plain word (they only
#: appear in label values and ranges).
_GRAFANA_INTERVAL = re.compile(
    r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}"
)
_GRAFANA_VAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------- the checker
def exported_series(catalogue: dict[str, MetricSpec] = CATALOGUE) -> dict[str, tuple[MetricSpec, str]]:
    """Series name as Prometheus sees it -> (spec, part); part is ``bucket``/``sum``/``count`` or ``""``."""
    out: dict[str, tuple[MetricSpec, str]] = {}
    for spec in catalogue.values():
        name = PREFIX + spec.name
        if spec.kind == "histogram":
            for part in ("bucket", "sum", "count"):
                out[f"{name}_{part}"] = (spec, part)
        else:
            out[name] = (spec, "")
    return out


def _labels_of(spec: MetricSpec, part: str) -> frozenset[str]:
    return RAY_LABELS | set(spec.tags) | ({"le"} if part == "bucket" else set())


def _selectors(node: Any) -> list[Any]:
    found: list[Any] = []

    def visit(n: Any) -> bool:
        if isinstance(n, promql_parser.VectorSelector):
            found.append(n)
        return True

    promql_parser.walk(node, visit)
    return found


def _selector_name(sel: Any) -> str | None:
    if sel.name:
        return str(sel.name)
    for m in sel.matchers.matchers:
        if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
            return str(m.value)
    return None


def _is_streamrec(name: str | None) -> bool:
    return name is not None and (name.startswith(PREFIX + "streamrec_") or name.startswith("streamrec_"))


def _label_scope(node: Any, series: dict[str, tuple[MetricSpec, str]]) -> frozenset[str] | None:
    """Labels the StreamRec series under ``node`` can carry (None: no StreamRec series there)."""
    labels: set[str] = set()
    seen = False
    for sel in _selectors(node):
        name = _selector_name(sel)
        if name in series:
            seen = True
            labels |= _labels_of(*series[name])
    return frozenset(labels) if seen else None


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with its Grafana variables replaced, so that it parses as PromQL."""
    return _GRAFANA_VAR.sub("var", _GRAFANA_INTERVAL.sub("5m", expr))


def check_expr(expr: str, catalogue: dict[str, MetricSpec] = CATALOGUE) -> list[str]:
    """Problems of one PromQL expression against the catalogue; empty when it is fine."""
    try:
        tree = promql_parser.parse(expr)
    except ValueError as err:
        return [f"does not parse: {err}"]
    series = exported_series(catalogue)
    problems: list[str] = []
    for sel in _selectors(tree):
        name = _selector_name(sel)
        if not _is_streamrec(name):
            continue
        if name not in series:
            hint = " (exported names carry the ray_ prefix)" if PREFIX + str(name) in series else ""
            problems.append(f"unknown metric {name}{hint}")
            continue
        allowed = _labels_of(*series[name])
        for m in sel.matchers.matchers:
            if m.name != "__name__" and m.name not in allowed:
                problems.append(f"{name} has no label {m.name!r} (it has {sorted(allowed)})")

    def visit(n: Any) -> bool:
        if isinstance(n, promql_parser.AggregateExpr) and n.modifier is not None:
            scope = _label_scope(n.expr, series)
            for label in n.modifier.labels:
                if scope is not None and label not in scope:
                    problems.append(f"aggregation over {label!r}, which the series under it lack: {n}")
        elif isinstance(n, promql_parser.BinaryExpr) and n.modifier is not None:
            scope = _union(_label_scope(n.lhs, series), _label_scope(n.rhs, series))
            matching = n.modifier.matching
            labels = list(matching.labels if matching is not None else []) + list(
                n.modifier.group_labels or []
            )
            for label in labels:
                if scope is not None and label not in scope:
                    problems.append(f"vector matching on {label!r}, which neither side has: {n}")
        elif isinstance(n, promql_parser.Call):
            func = n.func.name
            under = [series[s] for s in map(_selector_name, _selectors(n)) if s in series]
            if func in COUNTER_FUNCTIONS:
                for spec, _part in under:
                    if spec.kind == "gauge":
                        problems.append(f"{func}() of the gauge {PREFIX}{spec.name}")
            if func == "histogram_quantile":
                for spec, part in under:
                    if part != "bucket":
                        problems.append(f"histogram_quantile() of {PREFIX}{spec.name} without _bucket")
                for agg in _aggregations(n):
                    mod = agg.modifier
                    by = mod is not None and mod.type == promql_parser.AggModifierType.By
                    if by and "le" not in mod.labels:
                        problems.append(f"histogram_quantile() over an aggregation that drops le: {agg}")
        return True

    promql_parser.walk(tree, visit)
    return problems


def _union(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None and b is None:
        return None
    return (a or frozenset()) | (b or frozenset())


def _aggregations(node: Any) -> list[Any]:
    found: list[Any] = []

    def visit(n: Any) -> bool:
        if isinstance(n, promql_parser.AggregateExpr):
            found.append(n)
        return True

    promql_parser.walk(node, visit)
    return found


def check_rules(doc: Any) -> list[str]:
    """Problems of a Prometheus rules file (parsed YAML); empty when it is fine."""
    problems: list[str] = []
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not groups:
        return ["no groups"]
    names: set[str] = set()
    for group in groups:
        gname = group.get("name")
        if not gname or not group.get("rules"):
            problems.append(f"group {gname!r} needs a name and rules")
            continue
        for rule in group["rules"]:
            alert = rule.get("alert")
            where = f"{gname}/{alert}"
            if not alert or "record" in rule:
                problems.append(f"{where}: every rule is an alert")
                continue
            if alert in names:
                problems.append(f"{where}: alert name used twice")
            names.add(alert)
            try:
                promql_parser.parse_duration(str(rule.get("for")))
            except (ValueError, TypeError):
                problems.append(f"{where}: 'for' is not a duration: {rule.get('for')!r}")
            if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
                problems.append(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}")
            notes = rule.get("annotations") or {}
            for key in ("summary", "description"):
                if not str(notes.get(key) or "").strip():
                    problems.append(f"{where}: annotations.{key} is missing")
            if "docs/operations.md" not in str(notes.get("description")):
                problems.append(f"{where}: the description should point to docs/operations.md")
            expr = str(rule.get("expr") or "")
            problems += [f"{where}: {p}" for p in check_expr(expr)]
            problems += [f"{where}: {p}" for p in _check_keeps_application(expr)]
    return problems


def _check_keeps_application(expr: str) -> list[str]:
    """An alert on StreamRec series keeps ``application``: no aggregation may drop it."""
    try:
        tree = promql_parser.parse(expr)
    except ValueError:
        return []  # reported by check_expr
    series = exported_series()
    problems = []
    for agg in _aggregations(tree):
        if _label_scope(agg.expr, series) is None:
            continue
        mod = agg.modifier
        if mod is None or (mod.type == promql_parser.AggModifierType.By and "application" not in mod.labels):
            problems.append(f"aggregation drops application (alerts of two apps would merge): {agg}")
        elif mod.type == promql_parser.AggModifierType.Without and "application" in mod.labels:
            problems.append(f"aggregation without application: {agg}")
    return problems


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard.get("panels") or []:
        out.append(p)
        out += p.get("panels") or []  # a collapsed row keeps its panels inside
    return out


def check_dashboard(dashboard: Any) -> list[str]:
    """Problems of a Grafana dashboard (parsed JSON); empty when it is fine."""
    problems: list[str] = []
    if not isinstance(dashboard, dict):
        return ["not a JSON object"]
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        problems.append("schemaVersion must be a number >= 36 (Grafana 9+)")
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append("needs a uid and a title")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("needs a 'datasource' template variable of type datasource, query prometheus")
    app = variables.get("application")
    app_query = json.dumps((app or {}).get("query"))
    m = re.search(r"label_values\((\w+),\s*application\)", app_query)
    if not app or app.get("type") != "query" or not m:
        problems.append("needs an 'application' query variable: label_values(<metric>, application)")
    elif m.group(1) not in exported_series():
        problems.append(f"the application variable reads an unknown metric {m.group(1)}")
    if app and (app.get("datasource") or {}).get("uid") != "${datasource}":
        problems.append("the application variable must use the ${datasource} variable")

    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        title = panel.get("title")
        pid = panel.get("id")
        if not isinstance(pid, int) or pid in ids:
            problems.append(f"panel {title!r}: id {pid!r} missing or used twice")
        ids.add(pid)  # type: ignore[arg-type]
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            problems.append(f"panel {title!r}: gridPos must be inside the 24 columns")
        else:
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    if (x, y) in cells:
                        problems.append(f"panel {title!r} overlaps {cells[(x, y)]!r}")
                        break
                    cells[(x, y)] = str(title)
                else:
                    continue
                break
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"panel {title!r}: datasource must be the ${{datasource}} variable")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        for t in targets:
            expr = t.get("expr")
            if not expr:
                problems.append(f"panel {title!r}: a target without expr")
                continue
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"panel {title!r}: target datasource must be the ${{datasource}} variable")
            problems += [f"panel {title!r}: {p}" for p in check_expr(grafana_to_promql(expr))]
            problems += [f"panel {title!r}: {p}" for p in _check_application_filter(expr)]
    return problems


def _check_application_filter(expr: str) -> list[str]:
    """Every StreamRec selector of a panel is filtered by the ``application`` variable."""
    try:
        tree = promql_parser.parse(grafana_to_promql(expr.replace("$application", "APPLICATION_VARIABLE")))
    except ValueError:
        return []  # reported by check_expr
    out = []
    for sel in _selectors(tree):
        if _is_streamrec(_selector_name(sel)) and not any(
            m.name == "application" and m.value == "APPLICATION_VARIABLE" for m in sel.matchers.matchers
        ):
            out.append(f'{_selector_name(sel)} is not filtered by application=~"$application"')
    return out


def metric_table_rows(catalogue: dict[str, MetricSpec] = CATALOGUE) -> list[str]:
    """The rows of the metric table in docs/operations.md, one per catalogue entry."""
    rows = []
    for spec in catalogue.values():
        tags = ", ".join(f"`{t}`" for t in spec.tags) or "—"
        rows.append(f"| `{PREFIX}{spec.name}` | {spec.kind} | {tags} | {spec.help} |")
    return rows


def _metric_names_in(exprs: list[str]) -> set[str]:
    series = exported_series()
    names = set()
    for expr in exprs:
        for sel in _selectors(promql_parser.parse(grafana_to_promql(expr))):
            name = _selector_name(sel)
            if name in series:
                names.add(series[name][0].name)
    return names


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    doc = yaml.safe_load(RULES.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def _alert_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in doc["groups"] for r in g["rules"]]


# ---------------------------------------------------------------------------- the rules
def test_rules_are_valid_and_match_the_catalogue(rules: dict[str, Any]) -> None:
    assert check_rules(rules) == []


def test_rules_cover_the_serving_signals(rules: dict[str, Any]) -> None:
    exprs = {r["alert"]: r["expr"] for r in _alert_rules(rules)}
    text = "\n".join(exprs.values())
    # p95 over 200 ms from the latency histogram
    assert re.search(r"histogram_quantile\(0\.95,\s*sum by \(application, le\)", text)
    assert re.search(r"ray_streamrec_request_latency_ms_bucket\[5m\]\)\)\s*\)\s*> 200", text)
    for needle in (
        'status_class="5xx"',
        'ray_streamrec_requests_total{level!="full"}',
        "ray_streamrec_breaker_state) == 2",
        "ray_streamrec_health_alert) == 1",
        "ray_streamrec_batch_fallback_age_seconds) > 36 * 3600",
        "ray_streamrec_model_age_seconds) >",
        "ray_streamrec_feature_snapshot_age_seconds) >",
        "ray_streamrec_skew_alerts) > 0",
        'outcome="push_failed"',
        "ray_streamrec_request_log_dropped_total",
    ):
        assert needle in text, needle
    # every catalogue metric an operator must be woken for has a rule
    wanted = set(CATALOGUE) - {
        "streamrec_stage_latency_ms",  # the dashboard's breakdown of a slow p95
        "streamrec_source_candidates",
        "streamrec_online_store_read_ms",
        "streamrec_rate_limited_total",  # 429s are the limits working
    }
    assert wanted <= _metric_names_in(list(exprs.values()))


def test_rule_thresholds_match_the_health_defaults(rules: dict[str, Any]) -> None:
    """The Prometheus-side staleness thresholds are the replicas' defaults (HealthConfig)."""
    from streamrec.monitoring.health import HealthConfig  # the replicas' health alerts

    c = HealthConfig()
    exprs = {r["alert"]: r["expr"] for r in _alert_rules(rules)}
    assert f"> {c.batch_fallback_max_age_h:g} * 3600" in exprs["StreamRecBatchFallbackStale"]
    assert f"> {c.model_max_age_h:g} * 3600" in exprs["StreamRecModelStale"]
    assert f"> {c.feature_snapshot_max_age_h:g} * 3600" in exprs["StreamRecFeatureSnapshotStale"]
    assert f"> {c.degradation_share:g}" in exprs["StreamRecDegradationHigh"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_the_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _bucket_series(app: str, level: str, per_minute: dict[float, int]) -> list[dict[str, str]]:
    """Cumulative ``le`` bucket series of a histogram, ``per_minute`` requests at each latency."""
    series = []
    bounds = [*CATALOGUE["streamrec_request_latency_ms"].boundaries, float("inf")]
    for le in bounds:
        n = sum(c for v, c in per_minute.items() if v <= le)
        le_text = "+Inf" if le == float("inf") else f"{float(le)}"
        series.append(
            {
                "series": f'ray_streamrec_request_latency_ms_bucket{{application="{app}",deployment="Gateway",'
                f'replica="r1",level="{level}",le="{le_text}"}}',
                "values": f"0+{n}x40",
            }
        )
    total = sum(per_minute.values())
    series.append(
        {
            "series": f'ray_streamrec_request_latency_ms_count{{application="{app}",deployment="Gateway",'
            f'replica="r1",level="{level}"}}',
            "values": f"0+{total}x40",
        }
    )
    return series


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_unit_tests_of_the_main_alerts(tmp_path: Path) -> None:
    """Synthetic series: the alerts fire for the application that misbehaves, and only for it."""
    ok, slow = "recs-ok", "recs-slow"
    labels = 'deployment="Gateway",replica="r1"'
    series = (
        # recs-slow: p95 in the 300 ms bucket; recs-ok: everything under 50 ms
        _bucket_series(slow, "full", {40: 50, 250: 10})
        + _bucket_series(ok, "full", {40: 60})
        + [
            # 30% of recs-slow's answers below full, none of recs-ok's
            {
                "series": f'ray_streamrec_requests_total{{application="{slow}",{labels},level="full",reason="none"}}',
                "values": "0+70x40",
            },
            {
                "series": f'ray_streamrec_requests_total{{application="{slow}",{labels},level="batch",'
                'reason="online_store_timeout"}',
                "values": "0+30x40",
            },
            {
                "series": f'ray_streamrec_requests_total{{application="{ok}",{labels},level="full",reason="none"}}',
                "values": "0+100x40",
            },
            # 5xx: 2% on recs-slow's recommend route; readyz 503s on recs-ok do not count
            {
                "series": f'ray_streamrec_http_responses_total{{application="{slow}",{labels},route="recommend",'
                'status_class="2xx"}',
                "values": "0+98x40",
            },
            {
                "series": f'ray_streamrec_http_responses_total{{application="{slow}",{labels},route="recommend",'
                'status_class="5xx"}',
                "values": "0+2x40",
            },
            {
                "series": f'ray_streamrec_http_responses_total{{application="{ok}",{labels},route="recommend",'
                'status_class="2xx"}',
                "values": "0+100x40",
            },
            {
                "series": f'ray_streamrec_http_responses_total{{application="{ok}",{labels},route="readyz",'
                'status_class="5xx"}',
                "values": "0+50x40",
            },
            # breakers: open on recs-slow's replica, closed on recs-ok
            {
                "series": f'ray_streamrec_breaker_state{{application="{slow}",{labels},breaker="online_store"}}',
                "values": "2x40",
            },
            {
                "series": f'ray_streamrec_breaker_state{{application="{ok}",{labels},breaker="online_store"}}',
                "values": "0x40",
            },
            # health alert and ages
            {
                "series": f'ray_streamrec_health_alert{{application="{slow}",{labels},alert="model_stale"}}',
                "values": "1x40",
            },
            {
                "series": f'ray_streamrec_health_alert{{application="{ok}",{labels},alert="model_stale"}}',
                "values": "0x40",
            },
            {
                "series": f'ray_streamrec_batch_fallback_age_seconds{{application="{slow}",{labels}}}',
                "values": "200000x40",
            },
            {
                "series": f'ray_streamrec_batch_fallback_age_seconds{{application="{ok}",{labels}}}',
                "values": "3600x40",
            },
        ]
    )
    common = {"application": slow}

    def expect(alertname: str, severity: str, **extra: str) -> dict[str, Any]:
        return {
            "eval_time": "30m",
            "alertname": alertname,
            "exp_alerts": [{"exp_labels": {**common, "severity": severity, **extra}}],
        }

    # promtool compares annotations too: test a copy without them (check rules validates their templates)
    bare = yaml.safe_load(RULES.read_text())
    for group in bare["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(bare, sort_keys=False))
    doc = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    expect("StreamRecLatencyP95High", "critical"),
                    expect("StreamRecDegradationHigh", "warning"),
                    expect("StreamRecHTTP5xxRateHigh", "critical"),
                    expect("StreamRecBreakerOpen", "warning", breaker="online_store"),
                    expect("StreamRecHealthAlert", "warning", alert="model_stale"),
                    expect("StreamRecBatchFallbackStale", "warning"),
                    {"eval_time": "30m", "alertname": "StreamRecEventPushFailing", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------- the dashboard
def test_dashboard_is_valid_and_matches_the_catalogue(dashboard: dict[str, Any]) -> None:
    assert check_dashboard(dashboard) == []


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets") or []]
    missing = set(CATALOGUE) - _metric_names_in(exprs)
    assert not missing, f"metrics without a panel: {sorted(missing)}"
    titles = {p["title"] for p in _panels(dashboard)}
    for title in (
        "Recommend latency p50 / p95 / p99",
        "Latency by stage (p95)",
        "Responses by degradation level",
        "Top degradation reasons",
        "Breaker states",
        "Health alerts",
    ):
        assert title in titles
    stacked = next(p for p in _panels(dashboard) if p["title"] == "Responses by degradation level")
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"


# ---------------------------------------------------------------------------- scrape config and docs
def test_prometheus_config_loads_the_rules_and_scrapes_ray() -> None:
    doc = yaml.safe_load(PROMETHEUS.read_text())
    assert [MONITORING / f for f in doc["rule_files"]] == [RULES]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["ray"]["static_configs"][0]["targets"]
    assert "prom_metrics_service_discovery.json" in PROMETHEUS.read_text()  # the multi-node way
    # StreamRecMetricsTargetDown watches the job this config (and Ray's discovery file) names
    assert 'up{job="ray"}' in RULES.read_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_the_prometheus_config() -> None:
    out = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("name", "model_path"),
    [
        ("skew.yaml", "streamrec.monitoring.skew:SkewConfig"),
        ("drift.yaml", "streamrec.monitoring.drift:DriftConfig"),
    ],
)
def test_check_threshold_files_are_the_commands_defaults(name: str, model_path: str) -> None:
    """configs/monitoring/{skew,drift}.yaml load as the checks' configs and equal their defaults."""
    import importlib

    from streamrec.config import load_config

    module, _, cls = model_path.partition(":")
    model = getattr(importlib.import_module(module), cls)
    loaded = load_config(MONITORING / name, model)
    # Every setting spelled out (a reader sees each threshold), each the value the command uses.
    assert set(yaml.safe_load((MONITORING / name).read_text())) == set(model.model_fields)
    assert loaded == model()
    assert f"--config configs/monitoring/{name}" in OPERATIONS.read_text()  # the guide shows how to use it


def test_operations_guide_has_the_metric_table_and_every_alert(rules: dict[str, Any]) -> None:
    from streamrec.monitoring.health import ALERTS

    text = OPERATIONS.read_text()
    assert "## Metrics, dashboards and alerts" in text
    missing_rows = [row for row in metric_table_rows() if row not in text]
    assert not missing_rows, "docs/operations.md's metric table is out of date; expected rows:\n" + "\n".join(
        metric_table_rows()
    )
    for rule in _alert_rules(rules):
        assert f"`{rule['alert']}`" in text, rule["alert"]
    for alert in ALERTS:  # what each health alert means
        assert f"`{alert}`" in text, alert


# ---------------------------------------------------------------------------- the checker fails
@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum by (application) (rate(ray_streamrec_nonexistent_total[5m])) > 0", "unknown metric"),
        ("max by (application) (streamrec_breaker_state) == 2", "ray_ prefix"),
        ('ray_streamrec_breaker_state{state="open"}', "has no label 'state'"),
        ('sum(rate(ray_streamrec_requests_total{le="100.0"}[5m]))', "has no label 'le'"),
        ("sum by (application, route) (rate(ray_streamrec_requests_total[5m]))", "aggregation over 'route'"),
        ("rate(ray_streamrec_model_age_seconds[5m])", "rate() of the gauge"),
        (
            "histogram_quantile(0.95, sum by (application) (rate(ray_streamrec_request_latency_ms_bucket[5m])))",
            "drops le",
        ),
        ("histogram_quantile(0.95, rate(ray_streamrec_request_latency_ms_count[5m]))", "without _bucket"),
        ("ray_streamrec_request_latency_ms > 200", "unknown metric"),
        ("sum(rate(ray_streamrec_requests_total[5m])", "does not parse"),
        ("rate(ray_streamrec_requests_total[5x])", "does not parse"),
        ("sum_by(ray_streamrec_requests_total)", "does not parse"),
        (
            "ray_streamrec_skew_alerts / on (application, source) ray_streamrec_model_version",
            "vector matching on 'source'",
        ),
    ],
)
def test_the_expression_checker_reports(expr: str, problem: str) -> None:
    problems = check_expr(expr)
    assert any(problem in p for p in problems), problems


def test_the_expression_checker_accepts_ray_labels_and_other_metrics() -> None:
    assert check_expr('max by (application, NodeAddress) (ray_streamrec_breaker_state{replica="x"})') == []
    assert check_expr('up{job="ray", anything="goes"} == 0') == []  # not StreamRec's: not checked
    assert check_expr('{__name__="ray_streamrec_requests_total", level="full"}') == []
    assert check_expr('{__name__="ray_streamrec_requests_total", colour="red"}') != []


def test_the_rules_checker_reports(rules: dict[str, Any]) -> None:
    def broken(**change: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(rules))
        doc["groups"][0]["rules"][0].update(change)
        return doc

    def reported(doc: Any, text: str) -> bool:
        return any(text in p for p in check_rules(doc))

    assert reported(broken(expr="ray_streamrec_unknown > 0"), "unknown metric ray_streamrec_unknown")
    assert reported(broken(expr="sum(rate(ray_streamrec_requests_total[5m])) > 1"), "drops application")
    assert reported(
        broken(expr="sum by (level) (rate(ray_streamrec_requests_total[5m])) > 1"), "drops application"
    )
    assert reported(broken(**{"for": "ten minutes"}), "not a duration")
    assert reported(broken(labels={"severity": "urgent"}), "severity")
    assert reported(broken(annotations={"summary": "x"}), "annotations.description")
    doc = broken()
    doc["groups"][1]["rules"][0]["alert"] = doc["groups"][0]["rules"][0]["alert"]
    assert reported(doc, "used twice")
    del doc["groups"][0]["rules"][0]["for"]
    assert reported(doc, "'for' is not a duration")
    assert check_rules({"groups": []}) == ["no groups"]


def test_the_dashboard_checker_reports(dashboard: dict[str, Any]) -> None:
    def broken() -> dict[str, Any]:
        return json.loads(json.dumps(dashboard))

    def reported(doc: Any, text: str) -> bool:
        return any(text in p for p in check_dashboard(doc))

    graphs = [i for i, p in enumerate(dashboard["panels"]) if p["type"] != "row"]
    first, second = graphs[0], graphs[1]

    doc = broken()
    doc["panels"][second]["id"] = doc["panels"][first]["id"]
    assert reported(doc, "used twice")
    doc = broken()
    doc["panels"][first]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    assert reported(doc, "datasource must be the ${datasource} variable")
    doc = broken()
    doc["panels"][first]["targets"] = []
    assert reported(doc, "no targets")
    doc = broken()
    doc["panels"][first]["targets"][0]["expr"] = (
        'sum(rate(ray_streamrec_gone_total{application=~"$application"}[5m]))'
    )
    assert reported(doc, "unknown metric ray_streamrec_gone_total")
    doc = broken()
    doc["panels"][first]["targets"][0]["expr"] = (
        'sum(rate(ray_streamrec_requests_total{application=~"$application"}[5m])'
    )
    assert reported(doc, "does not parse")
    doc = broken()
    doc["panels"][first]["targets"][0]["expr"] = "sum(rate(ray_streamrec_requests_total[$__rate_interval]))"
    assert reported(doc, "not filtered by application")
    doc = broken()
    doc["panels"][second]["gridPos"] = dict(doc["panels"][first]["gridPos"])
    assert reported(doc, "overlaps")
    doc = broken()
    doc["templating"]["list"] = [v for v in doc["templating"]["list"] if v["name"] != "datasource"]
    assert reported(doc, "'datasource' template variable")
    doc = broken()
    for v in doc["templating"]["list"]:
        if v["name"] == "application":
            v["query"]["query"] = "label_values(ray_streamrec_gone, application)"
    assert reported(doc, "unknown metric ray_streamrec_gone")
    doc = broken()
    doc["schemaVersion"] = 16
    assert reported(doc, "schemaVersion")


def test_the_docs_table_follows_the_catalogue() -> None:
    extra = {**CATALOGUE, "streamrec_new_total": MetricSpec("streamrec_new_total", "counter", "New", ("x",))}
    text = OPERATIONS.read_text()
    assert [row for row in metric_table_rows(extra) if row not in text] == [
        "| `ray_streamrec_new_total` | counter | `x` | New |"
    ]
