"""deploy/prometheus checked by Prometheus's own promtool (built from github.com/prometheus/prometheus v0.316.0):
the rule file is valid, and each alert in podsweep-rules.test.yaml fires on the series that should fire it and
stays quiet on the others."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness.toolbins import locate_tool

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
DASHBOARD = PROMETHEUS.parent / "grafana" / "podsweep.json"


@pytest.fixture(scope="module")
def promtool() -> Path:
    return locate_tool("promtool")


def test_promtool_accepts_the_rule_file(promtool: Path) -> None:
    result = subprocess.run(
        [str(promtool), "check", "rules", str(PROMETHEUS / "podsweep-rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout + result.stderr


def test_alerts_fire_on_their_series_and_stay_quiet_otherwise(promtool: Path) -> None:
    result = subprocess.run(
        [str(promtool), "test", "rules", "podsweep-rules.test.yaml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """Each panel's query, as a recording rule: `promtool check rules` parses it with Prometheus's own parser."""
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    rules = [
        {"record": f"podsweep_dashboard:panel{p['id']}_{t['refId'].lower()}", "expr": t["expr"]}
        for p in panels
        for t in p["targets"]
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout + result.stderr
