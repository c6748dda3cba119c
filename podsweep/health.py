"""Liveness, readiness and Prometheus metrics over HTTP, one small server per process.

Readiness is the AND of what each service reports (`Health.set`), so a pod receives no traffic and a rollout waits
until, e.g., the watcher's first list is done or the admission view is loaded. Each check is also the gauge
`podsweep_ready{check}` on /metrics, for alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import prometheus_client
from aiohttp import web
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation


@dataclass
class Health:
    ready: dict[str, bool] = field(default_factory=dict)

    def set(self, component: str, ready: bool) -> None:
        self.ready[component] = ready

    def not_ready(self) -> list[str]:
        return sorted(name for name, ok in self.ready.items() if not ok)


HEALTH = Health()


def _observe_ready(_: CallbackOptions) -> list[Observation]:
    return [Observation(1 if ok else 0, {"check": name}) for name, ok in sorted(HEALTH.ready.items())]


metrics.get_meter("podsweep.health").create_observable_gauge(
    "podsweep_ready", [_observe_ready], description="1 while a readiness check passes, 0 while /readyz waits for it"
)


async def serve(port: int, health: Health = HEALTH, host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104
    """Start /healthz, /readyz and /metrics; the caller cleans the returned runner up."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        waiting = health.not_ready()
        if waiting:
            return web.Response(status=503, text="waiting for: " + ", ".join(waiting) + "\n")
        return web.Response(text="ok\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
