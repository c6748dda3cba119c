"""podsweep_s3_requests_total, which the PodsweepS3Unreachable alert reads, as a real process's /metrics shows it:
an answer is `ok` or `http_4xx`/`http_5xx`, no answer at all is `error`. Against the real SeaweedFS and a closed port.

The process configures its own Prometheus exporter (a meter provider is set once per process, so not in pytest's).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import msgspec

from podsweep.config import S3Settings
from podsweep.embedded import free_port

SCRIPT = """
import asyncio, sys
import msgspec, prometheus_client
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider

metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))

from podsweep.config import S3Settings
from podsweep.objectstore import ObjectStore

async def main() -> None:
    reachable = msgspec.json.decode(sys.argv[1], type=S3Settings)
    unreachable = msgspec.json.decode(sys.argv[2], type=S3Settings)
    store = ObjectStore(reachable)
    await store.ensure_bucket()
    await store.put("metrics/one.json", b"{}")
    assert await store.get_if_exists("metrics/absent.json") is None
    try:
        await ObjectStore(unreachable).get("metrics/one.json")
    except Exception:
        pass
    else:
        raise SystemExit("a closed port answered")
    sys.stdout.write(prometheus_client.generate_latest().decode())

asyncio.run(main())
"""


def _samples(exposition: str) -> dict[tuple[str, str], float]:
    found = re.findall(r"^podsweep_s3_requests_total\{([^}]*)\} (\S+)$", exposition, re.MULTILINE)
    samples: dict[tuple[str, str], float] = {}
    for labels, value in found:
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        samples[(pairs["operation"], pairs["outcome"])] = float(value)
    return samples


def test_s3_calls_are_counted_by_operation_and_outcome(s3_settings: S3Settings) -> None:
    closed = msgspec.structs.replace(s3_settings, endpoint_url=f"http://127.0.0.1:{free_port()}")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            json.dumps(msgspec.to_builtins(s3_settings)),
            msgspec.json.encode(closed).decode(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = _samples(result.stdout)
    assert samples[("PutObject", "ok")] == 1, samples
    assert samples[("GetObject", "http_4xx")] == 1, samples  # a missing key is an answer, not an outage
    assert samples[("GetObject", "error")] == 1, samples  # connection refused: nothing answered
    assert not [k for k in samples if k[1] == "http_5xx"], samples
