"""The Grafana dashboard and the Prometheus rules name only metrics podsweep exposes, each alert has a runbook, and
the dashboard reads as Grafana's own dashboard model.

Metric names are collected from the source (tests/harness/metricnames.py) and turned into the names /metrics shows by
the Prometheus exporter's rules, which a test here checks against the real exporter. A renamed or removed metric
fails this test, not a dashboard in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime as grafana_runtime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider

from tests.harness import metricnames

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "podsweep.json"
RULES = ROOT / "deploy" / "prometheus" / "podsweep-rules.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
CHART_DASHBOARD = ROOT / "deploy" / "helm" / "podsweep" / "files" / "grafana" / "podsweep.json"
CHART_RULES = ROOT / "deploy" / "helm" / "podsweep" / "files" / "prometheus" / "podsweep-rules.yaml"
METRIC = re.compile(r"\bpodsweep_[a-z0-9_]+\b")


@pytest.fixture(scope="module")
def exposed_names() -> set[str]:
    return metricnames.exposed_names()


def test_the_source_scan_finds_the_instruments_of_every_service() -> None:
    found = metricnames.instruments()
    for expected in (
        "podsweep_events_processed",  # bus
        "podsweep_consumer_pending",  # service
        "podsweep_dispatcher_active_jobs",
        "podsweep_reports_stored",
        "podsweep_alerts",
        "podsweep_admission_decisions",
        "podsweep_watcher_relists",
        "podsweep_ready",
        "podsweep_nats_connected",
        "podsweep_s3_requests",
        "podsweep_digests",  # dispatcher gauges
        "podsweep_namespace_vulnerabilities",  # parser indexer
    ):
        assert expected in found, expected
    assert found["podsweep_scan_duration_seconds"] == ("histogram", "s")


@pytest.mark.parametrize(
    ("kind", "name", "unit"),
    [
        ("counter", "podsweep_t_events", ""),
        ("histogram", "podsweep_t_wait_seconds", "s"),
        ("histogram", "podsweep_t_latency", "s"),
        ("observable_gauge", "podsweep_t_pending", ""),
        ("up_down_counter", "podsweep_t_open", ""),
    ],
)
def test_naming_rule_matches_the_real_exporter(kind: str, name: str, unit: str) -> None:
    registry = prometheus_client.CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("naming-check")
    if kind == "counter":
        meter.create_counter(name, unit=unit).add(1)
    elif kind == "histogram":
        meter.create_histogram(name, unit=unit).record(0.5)
    elif kind == "up_down_counter":
        meter.create_up_down_counter(name, unit=unit).add(1)
    else:

        def observe(_: CallbackOptions) -> list[Observation]:
            return [Observation(3)]

        meter.create_observable_gauge(name, [observe], unit=unit)
    text = prometheus_client.generate_latest(registry).decode()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith(name)}
    provider.shutdown()
    assert samples == metricnames.exposed(name, kind, unit)


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _dashboard_expressions() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(("title", "expr"), _dashboard_expressions())
def test_dashboard_query_names_only_exposed_metrics(exposed_names: set[str], title: str, expr: str) -> None:
    unknown = sorted(set(METRIC.findall(expr)) - exposed_names)
    assert unknown == [], f"panel {title!r} queries {unknown}, which no podsweep code exposes"
    assert METRIC.search(expr), f"panel {title!r} reads none of podsweep's metrics"


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: str(r.get("alert") or r.get("record")))
def test_rule_names_only_exposed_metrics_and_has_a_runbook(exposed_names: set[str], rule: dict[str, Any]) -> None:
    unknown = sorted(set(METRIC.findall(rule["expr"])) - exposed_names)
    assert unknown == [], f"{rule['alert']} reads {unknown}, which no podsweep code exposes"
    assert METRIC.search(rule["expr"]), f"{rule['alert']} reads none of podsweep's metrics"
    anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[-1]
    assert anchor == rule["alert"].lower()
    headings = {line.removeprefix("## ").strip().lower() for line in RUNBOOKS.read_text().splitlines()}
    assert anchor in headings, f"docs/runbooks.md has no section '## {rule['alert']}'"


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in _dashboard()["templating"]["list"]}
    assert "datasource" in variables
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def _lost(given: object, read: object, path: str = "") -> list[str]:
    """What of `given` is missing or different in `read` (what the model added, its defaults, is not counted)."""
    if isinstance(given, dict) and isinstance(read, dict):
        return [
            lost
            for key, value in given.items()
            for lost in ([f"{path}/{key}"] if key not in read else _lost(value, read[key], f"{path}/{key}"))
        ]
    if isinstance(given, list) and isinstance(read, list) and len(given) == len(read):
        return [lost for i, (a, b) in enumerate(zip(given, read, strict=True)) for lost in _lost(a, b, f"{path}[{i}]")]
    return [] if given == read else [f"{path}: {given!r} became {read!r}"]


def test_the_dashboard_is_grafanas_own_model_field_for_field() -> None:
    """Grafana's dashboard model (grafana-foundation-sdk for Grafana 11.0) reads every panel, option, field setting
    and query: a key its model does not know (a misspelled option, a query field) is dropped by the round trip, and
    each panel type must be one of Grafana's panel plugins."""
    plugins.register_default_plugins()
    source = _dashboard()
    unknown = [
        p["title"] for p in source["panels"] if p["type"] != "row" and not grafana_runtime.panelcfg_config(p["type"])
    ]
    assert unknown == [], f"panel types Grafana does not have: {unknown}"
    read = json.loads(json.dumps(Dashboard.from_json(source), cls=JSONEncoder))
    assert _lost(source, read) == []


@pytest.mark.parametrize(("chart_copy", "source"), [(CHART_RULES, RULES), (CHART_DASHBOARD, DASHBOARD)])
def test_chart_copy_equals_the_file_in_deploy(chart_copy: Path, source: Path) -> None:
    assert chart_copy.read_text() == source.read_text(), (
        f"copy {source.relative_to(ROOT)} to {chart_copy.relative_to(ROOT)} (the chart cannot read outside itself)"
    )
