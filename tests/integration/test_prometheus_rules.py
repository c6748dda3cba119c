"""deploy/prometheus checked by Prometheus's own promtool (built from github.com/prometheus/prometheus v0.316.0):
the rule file is valid, and each alert in podsweep-rules.test.yaml fires on the series that should fire it and
stays quiet on the others."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness.toolbins import locate_tool

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


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
    assert "SUCCESS: 9 rules found" in result.stdout + result.stderr


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
