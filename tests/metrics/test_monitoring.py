"""What an operator loads into Prometheus and Grafana (issue 35, item 4): alert rules and a dashboard.

The rules pass ``promtool check rules`` and fire on the series they are written for (``promtool
test rules``); the Prometheus config that loads them passes ``promtool check config``. Every metric
the rules and the dashboard query is one a real broker process exports, with the labels and label
values it exports. The dashboard is checked against a JSON Schema of what Grafana needs of it, and
no rule adds a label or an annotation about a person or a session.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.metrics.test_metrics import Scrape, Served, scrape, served  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "broker-dashboard.json"
COMPOSE = REPO / "deploy" / "compose.yaml"

#: What each alert the issue asks for is called in alerts.yml.
REQUIRED_ALERTS = {
    "BrokerDown",  # broker not ready: not scraped at all
    "BrokerNotReady",  # broker not ready: /readyz answers 503
    "BrokerRedisErrors",
    "BrokerEventLoopStalls",
    "BrokerCallSetupSlow",
    "BrokerErrorRepliesRising",
    "SessionRedisCameBackEmpty",
    "BrokerPreflightsFailing",  # the closest observable signal to TURN credentials failing
}
#: What the dashboard must show: each a metric one of its queries reads.
REQUIRED_PANELS = {
    "broker_sessions",
    "broker_websocket_connections",
    "broker_joins_total",
    "broker_admissions_total",
    "broker_relayed_messages_total",
    "broker_error_replies_total",
    "broker_websocket_closes_total",
    "broker_call_setup_seconds_bucket",
    "broker_store_command_seconds_bucket",
    "broker_store_errors_total",
    "broker_bus_reconnects_total",
    "broker_event_loop_lag_seconds_bucket",
    "broker_event_loop_stall_max_seconds",
    "broker_gc_pause_seconds_bucket",
    "process_resident_memory_bytes",
    "broker_login_attempts_total",
    "broker_throttled_total",
    "broker_ready",
}
#: Labels Prometheus itself adds to every scraped series: a broker process, never a person.
TARGET_LABELS = {"instance", "job"}


def promtool() -> str:
    """promtool (Debian package prometheus; scripts/test installs it), or a skip saying so."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: apt-get install -y --no-install-recommends prometheus")
    return found


def run_promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def dashboard_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


#: Grafana's variables in a query, replaced by what they stand for when checking the PromQL.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*", "$job": ".*"}


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets and the variables' queries."""
    queries = [t["expr"] for p in dashboard_panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", query)
            assert match, query
            queries.append(match.group(1))
    out = []
    for query in queries:
        for name, value in VARIABLES.items():
            query = query.replace(name, value)
        out.append(query)
    return out


# --------------------------------------------------------------------------- promtool


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_prometheus_config_loads_the_rules_and_passes_promtool_check_config() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["broker"]  # the rules' job="broker"
    result = run_promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    # The compose file's Prometheus has the rules where the config says (beside it).
    volumes = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    assert (
        "--config.file=/etc/prometheus/prometheus.yml"
        in yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]["command"]
    )


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query (with Grafana's variables filled in) as a recording rule."""
    board = dashboard()
    queries = dashboard_queries(board)
    recording = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{n}", "expr": q} for n, q in enumerate(queries)]}
        ]
    }
    written = tmp_path / "dashboard-queries.yml"
    written.write_text(yaml.safe_dump(recording), encoding="utf-8")
    result = run_promtool("check", "rules", str(written))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


#: Series for ``promtool test rules``, with what must fire (and what must not) at a given time.
ALERT_CASES: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="broker", instance="broker1:9464"}', "values": "1 1 0 0 0 0"},
            {"series": 'up{job="broker", instance="broker2:9464"}', "values": "1 1 1 1 1 1"},
            {"series": 'broker_ready{job="broker", instance="broker2:9464"}', "values": "1 0 0 0 0 0"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "BrokerDown", "exp_alerts": []},
            {
                "eval_time": "5m",
                "alertname": "BrokerDown",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "broker", "instance": "broker1:9464"}}],
            },
            {
                "eval_time": "5m",
                "alertname": "BrokerNotReady",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "broker", "instance": "broker2:9464"}}],
            },
            {"eval_time": "5m", "alertname": "NoBrokerReady", "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # Found emptied at 1 700 000 000 (Unix time), from the third minute on.
            {"series": 'broker_store_emptied_timestamp_seconds{instance="b1:9464"}', "values": "0 0 1700000000x5"},
            {"series": 'broker_event_loop_stall_max_seconds{instance="b1:9464"}', "values": "0.01 0.2x10"},
            {"series": 'broker_store_errors_total{instance="b1:9464", operation="get"}', "values": "0 0 5 10 15 20 25"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "SessionRedisCameBackEmpty", "exp_alerts": []},
            {
                "eval_time": "3m",
                "alertname": "SessionRedisCameBackEmpty",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "critical"},
                        "exp_annotations": {
                            "summary": "The session Redis came back empty: scheduled sessions were lost",
                            # 1 700 000 000 as promtool's humanizeTimestamp writes it; the rest is added below.
                            "description": "The brokers found the session Redis without its data at "
                            "2023-11-14 22:13:20 +0000 UTC",
                        },
                    }
                ],
            },
            {"eval_time": "4m", "alertname": "BrokerEventLoopStalls", "exp_alerts": []},
            {
                "eval_time": "7m",
                "alertname": "BrokerEventLoopStalls",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "b1:9464"}}],
            },
            {
                "eval_time": "6m",
                "alertname": "BrokerRedisErrors",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "b1:9464"}}],
            },
        ],
    },
    {
        "interval": "1m",
        # 60 calls set up in an hour; from minute 30 on, they take 2.5-5 s instead of under 0.5 s.
        "input_series": [
            {"series": 'broker_call_setup_seconds_bucket{le="0.5"}', "values": "0+1x30 30x30"},
            {"series": 'broker_call_setup_seconds_bucket{le="1.0"}', "values": "0+1x30 30x30"},
            {"series": 'broker_call_setup_seconds_bucket{le="2.5"}', "values": "0+1x30 30x30"},
            {"series": 'broker_call_setup_seconds_bucket{le="5.0"}', "values": "0+1x60"},
            {"series": 'broker_call_setup_seconds_bucket{le="+Inf"}', "values": "0+1x60"},
            {"series": "broker_call_setup_seconds_count", "values": "0+1x60"},
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": "BrokerCallSetupSlow", "exp_alerts": []},
            {
                "eval_time": "60m",
                "alertname": "BrokerCallSetupSlow",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        "interval": "1m",
        # A steady trickle of invalid tokens all day, then a burst of "unavailable".
        "input_series": [
            {"series": 'broker_error_replies_total{code="invalid_token"}', "values": "0+1x1500"},
            {"series": 'broker_error_replies_total{code="unavailable"}', "values": "0x1470 0+30x30"},
            {"series": 'broker_error_replies_total{code="internal"}', "values": "0x1490 1x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "1500m",
                "alertname": "BrokerErrorRepliesRising",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "code": "unavailable"}}],
            },
            {
                "eval_time": "1500m",
                "alertname": "BrokerInternalErrors",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'broker_preflights_total{outcome="connected"}', "values": "0+1x60"},
            {"series": 'broker_preflights_total{outcome="failed"}', "values": "0x20 0+3x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "BrokerPreflightsFailing", "exp_alerts": []},
            {
                "eval_time": "60m",
                "alertname": "BrokerPreflightsFailing",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
]


def test_the_alerts_fire_on_what_they_are_for_and_not_before(tmp_path: Path) -> None:
    """``promtool test rules``: each required alert fires on series that show its fault, not on healthy ones."""
    cases = copy.deepcopy(ALERT_CASES)
    # Only the start of the description is written out above: fill in the rest from the rule.
    rule = next(r for r in rules() if r["alert"] == "SessionRedisCameBackEmpty")
    expected = cases[1]["alert_rule_test"][1]["exp_alerts"][0]["exp_annotations"]
    template = rule["annotations"]["description"]
    rest = template.split("{{ $value | humanizeTimestamp }}", 1)[1]
    assert expected["description"].startswith(template.split("{{", 1)[0])
    expected["description"] += rest
    tested = {test["alertname"] for case in cases for test in case["alert_rule_test"]}
    assert REQUIRED_ALERTS <= tested
    # promtool compares annotations whole: the rules under test keep them on that one alert only.
    stripped = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in stripped["groups"]:
        for each in group["rules"]:
            if each["alert"] != "SessionRedisCameBackEmpty":
                del each["annotations"]
    rules_copy = tmp_path / "alerts.yml"
    rules_copy.write_text(yaml.safe_dump(stripped, sort_keys=False), encoding="utf-8")
    suite = {"rule_files": [str(rules_copy)], "evaluation_interval": "1m", "tests": cases}
    written = tmp_path / "alerts.test.yml"
    written.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    result = run_promtool("test", "rules", str(written))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- what the rules say


def test_every_alert_tells_an_operator_what_to_do_and_names_nobody() -> None:
    found = rules()
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in found}
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"].keys() == {"severity"} and rule["labels"]["severity"] in ("critical", "warning")
        annotations = rule["annotations"]
        assert annotations.keys() == {"summary", "description"}, rule["alert"]
        assert len(annotations["description"]) > 100, f"{rule['alert']}: say what to do"
        for text in annotations.values():
            # A template may name the broker process, an error code or the figure: nothing else.
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in TARGET_LABELS | {"code"}, (rule["alert"], label)
            for used in re.findall(r"\{\{(.*?)\}\}", text):
                assert re.fullmatch(r" *\$(labels\.\w+|value)( *\| *\w+)? *", used), (rule["alert"], used)


# --------------------------------------------------------------------------- against a real broker

#: A metric selector in PromQL: a name (not a function: no "(" follows) and its matchers, if any.
SELECTOR = re.compile(r"\b((?:broker|process|python)_[a-z0-9_]+)\b(?!\s*\()(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported_labels(scraped: Scrape) -> dict[str, dict[str, set[str]]]:
    """Per sample name, each label and the values it takes."""
    out: dict[str, dict[str, set[str]]] = {}
    for name, labels in scraped.samples:
        names = out.setdefault(name, {})
        for label, value in labels:
            names.setdefault(label, set()).add(value)
    return out


def check_query(query: str, exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """What in ``query`` a real broker does not export: metric names, labels, label values."""
    problems = []
    labels_here: set[str] = set(TARGET_LABELS) | {"le"}
    for name, matchers in SELECTOR.findall(query):
        if name not in exported:
            problems.append(f"{name} is not exported")
            continue
        labels_here |= exported[name].keys()
        for label, op, value in MATCHER.findall(matchers):
            if label in TARGET_LABELS:
                continue
            if label not in exported[name]:
                problems.append(f"{name} has no label {label}")
            elif op in ("=", "=~") and "$" not in value and ".*" not in value:
                wanted = value.split("|") if op == "=~" else [value]
                problems += [
                    f"{name}{{{label}={v!r}}} is never exported" for v in wanted if v not in exported[name][label]
                ]
    for grouping in GROUPING.findall(query):
        for label in (x.strip() for x in grouping.split(",") if x.strip()):
            if label not in labels_here:
                problems.append(f"grouping by {label}, which none of its metrics has")
    return problems


async def test_every_metric_the_rules_and_the_dashboard_read_is_one_a_broker_exports(
    served: Served,  # noqa: F811
) -> None:
    exported = exported_labels(await scrape(served.metrics_url))
    expressions = [rule["expr"] for rule in rules()] + dashboard_queries(dashboard())
    problems = [f"{expr!r}: {p}" for expr in expressions for p in check_query(expr, exported)]
    assert problems == []
    used = {name for expr in expressions for name, _ in SELECTOR.findall(expr)}
    assert REQUIRED_PANELS <= used, REQUIRED_PANELS - used
    documented = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    for name in used:  # an operator reading an alert or a panel finds the metric's meaning
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        assert f"`{family}`" in documented or f"`{name}`" in documented, name
    # The check itself sees a wrong name, suffix, label and label value.
    assert check_query("rate(broker_call_setup_seconds_total[5m])", exported)
    assert check_query('broker_error_replies_total{code="no_such_code"}', exported)
    assert check_query('broker_joins_total{reason="x"}', exported)
    assert check_query("sum by (session) (broker_sessions)", exported)


# --------------------------------------------------------------------------- the dashboard

_DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}},
}
_GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
#: What Grafana (schemaVersion 39, Grafana 10/11) needs of an imported or provisioned dashboard,
#: and what this project asks of every panel: a Prometheus query through the chosen data source.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36, "maximum": 41},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "contains": {
                        "type": "object",
                        "required": ["name", "type", "query"],
                        "properties": {
                            "name": {"const": "datasource"},
                            "type": {"const": "datasource"},
                            "query": {"const": "prometheus"},
                        },
                    },
                    "items": {"type": "object", "required": ["name", "type"]},
                }
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "text"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": _GRID,
                },
                "if": {"properties": {"type": {"const": "row"}}},
                "then": {"required": ["panels", "collapsed"]},
                "else": {
                    "required": ["datasource", "targets", "description"],
                    "properties": {
                        "datasource": _DATASOURCE,
                        "targets": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["refId", "expr", "datasource"],
                                "properties": {
                                    "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                    "expr": {"type": "string", "minLength": 1},
                                    "datasource": _DATASOURCE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_the_dashboard_loads_and_has_what_grafana_needs() -> None:
    board = dashboard()
    jsonschema.Draft202012Validator.check_schema(DASHBOARD_SCHEMA)
    jsonschema.validate(board, DASHBOARD_SCHEMA, cls=jsonschema.Draft202012Validator)
    panels = list(dashboard_panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        ref_ids = [target["refId"] for target in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    # The schema refuses what Grafana could not show: a panel without a query, or a fixed data source.
    broken = copy.deepcopy(board)
    next(p for p in broken["panels"] if p["type"] != "row")["targets"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA, cls=jsonschema.Draft202012Validator)
    broken = copy.deepcopy(board)
    next(p for p in broken["panels"] if p["type"] != "row")["datasource"] = {"type": "prometheus", "uid": "abc123"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_the_dashboard_groups_by_no_label_that_could_name_someone() -> None:
    """Legends and groupings use the small fixed label sets (broker/metrics/labels.py) and the target."""
    from broker.metrics.labels import ALLOWED

    for query in dashboard_queries(dashboard()):
        for grouping in GROUPING.findall(query):
            for label in (x.strip() for x in grouping.split(",") if x.strip()):
                assert label in ALLOWED.keys() | TARGET_LABELS | {"le"}, (query, label)
    for panel in dashboard_panels(dashboard()):
        for target in panel.get("targets", []):
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in ALLOWED.keys() | TARGET_LABELS, (panel["title"], label)
