"""A real Prometheus (cmd/prometheus v0.316.0, built by tests/harness/toolbins/build.sh) on loopback: it scrapes the
given targets every second, evaluates the given rule files, and answers the HTTP API as it would for Grafana.

Test code only. The scrape keeps the scraped labels on a clash (`honor_labels`, as the chart's PodMonitor does), so
`podsweep_namespace_vulnerabilities{namespace}` keeps the workload's namespace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from podsweep.embedded import free_port
from tests.harness.deployed import spawn, wait_tcp
from tests.harness.replicas import Replica


@dataclass
class Prometheus:
    process: Replica
    url: str

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: its `data`; an error answer (a query that does not parse, say) raises with its text."""
        async with httpx.AsyncClient(timeout=30) as client:
            answer = (await client.get(f"{self.url}/api/v1/{path}", params=params)).json()
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    async def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        data = await self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def targets_up(self, want: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until `want` active targets have been scraped successfully; the targets."""
        deadline = time.monotonic() + timeout_s
        while True:
            active: list[dict[str, Any]] = (await self.api("targets"))["activeTargets"]
            if sum(t["health"] == "up" for t in active) >= want:
                return active
            if time.monotonic() > deadline:
                health = [(t["labels"].get("pod"), t["health"], t.get("lastError")) for t in active]
                raise TimeoutError(f"Prometheus: {want} targets up expected within {timeout_s:.0f}s, got {health}")
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        self.process.stop(grace_s=5.0)


class PrometheusError(RuntimeError):
    pass


def start_prometheus(
    binary: Path, root: Path, targets: Mapping[str, str], rule_files: Sequence[Path] = ()
) -> Prometheus:
    """Scrape each `pod -> host:port` every second (job `podsweep`, label `pod`), evaluate `rule_files` every second."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": "podsweep",
                "honor_labels": True,
                "static_configs": [{"targets": [address], "labels": {"pod": pod}} for pod, address in targets.items()],
            }
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        str(binary),
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    process = spawn("prometheus", argv, {"PATH": "/usr/bin:/bin", "HOME": str(root)}, root / "prometheus.log", root)
    wait_tcp(process, port)
    return Prometheus(process, f"http://127.0.0.1:{port}")
