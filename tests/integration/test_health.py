"""The health/metrics server over real HTTP on loopback."""

from __future__ import annotations

import httpx

from podsweep import embedded, health


async def test_readiness_waits_for_every_component_and_metrics_are_served() -> None:
    state = health.Health()
    state.set("watcher:first-list", False)
    port = embedded.free_port()
    runner = await health.serve(port, state, host="127.0.0.1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            waiting = await http.get("/readyz")
            assert waiting.status_code == 503
            assert "watcher:first-list" in waiting.text
            state.set("watcher:first-list", True)
            assert (await http.get("/readyz")).status_code == 200
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert "python_info" in metrics.text
    finally:
        await runner.cleanup()
