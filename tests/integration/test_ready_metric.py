"""podsweep_ready, which PodsweepServiceDown and PodsweepAdmissionGateNotReady read: one series per readiness check,
1 while it passes and 0 while /readyz waits for it, on a real process's Prometheus exposition."""

from __future__ import annotations

import re
import subprocess
import sys

SCRIPT = """
import prometheus_client
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider

metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))

from podsweep.health import HEALTH

HEALTH.set("watcher:pods-listed", True)
HEALTH.set("admission:view", False)
print(prometheus_client.generate_latest().decode())
print("--- the gate's view is loaded ---")
HEALTH.set("admission:view", True)
print(prometheus_client.generate_latest().decode())
"""


def _ready(exposition: str) -> dict[str, float]:
    found = re.findall(r'^podsweep_ready\{[^}]*check="([^"]+)"[^}]*\} (\S+)$', exposition, re.MULTILINE)
    return {check: float(value) for check, value in found}


def test_each_readiness_check_is_a_series_that_follows_it() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stdout.split("--- the gate's view is loaded ---")
    assert _ready(first) == {"watcher:pods-listed": 1.0, "admission:view": 0.0}
    assert _ready(second) == {"watcher:pods-listed": 1.0, "admission:view": 1.0}
