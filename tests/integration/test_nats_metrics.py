"""podsweep_nats_connected, which the PodsweepNatsUnreachable alert reads, as a real service process's /metrics shows
it: 1 while its NATS connection is up, 0 once the server is gone (and it is reconnecting).

The process opens a service as every main() does (`open_service`) against a nats-server of this test's own, which the
test stops; the process configures its own Prometheus exporter (a meter provider is set once per process).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec

from podsweep import embedded
from podsweep.config import NatsSettings, Settings

SCRIPT = """
import asyncio, sys
import msgspec, prometheus_client
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider

metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))

from podsweep.config import Settings
from podsweep.service import open_service

def gauge() -> str:
    lines = prometheus_client.generate_latest().decode().splitlines()
    return next((l for l in lines if l.startswith("podsweep_nats_connected{")), "none")

async def main() -> None:
    settings = msgspec.json.decode(sys.argv[1], type=Settings)
    async with open_service("watcher", settings):
        print("up", gauge(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the server is stopped now
        for _ in range(600):
            if gauge().endswith(" 0.0"):
                break
            await asyncio.sleep(0.1)
        print("down", gauge(), flush=True)

asyncio.run(main())
"""


def test_nats_connected_is_1_while_connected_and_0_once_the_server_is_gone(tmp_path: Path) -> None:
    server = embedded.start_nats(tmp_path / "nats")
    nats = NatsSettings(url=server.url, user=server.user, password=server.password, connect_timeout_s=5.0)
    settings = Settings(nats=nats)
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, msgspec.json.encode(settings).decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        up = process.stdout.readline()
        assert re.fullmatch(r'up podsweep_nats_connected\{[^}]*service="watcher"[^}]*\} 1\.0\n', up), up + _tail(
            process
        )
        server.stop()
        process.stdin.write("stopped\n")
        process.stdin.flush()
        down = process.stdout.readline()
        assert re.fullmatch(r'down podsweep_nats_connected\{[^}]*service="watcher"[^}]*\} 0\.0\n', down), down + _tail(
            process
        )
    finally:
        server.stop()
        process.kill()
        process.wait(timeout=30)


def _tail(process: subprocess.Popen[str]) -> str:
    process.kill()
    _, err = process.communicate(timeout=30)
    return err[-3000:]
