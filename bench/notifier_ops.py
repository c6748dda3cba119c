"""Where a notifier alert's CPU goes: the CPU of each kind of call it makes, one at a time, in one process.

Real nats-server and SeaweedFS (embedded, in a temp dir) and an aiohttp receiver on loopback in this process, on
uvloop as the services run. Each operation runs `--calls` times after a warm-up; CPU is this process's user +
system time (so the POSTs include the receiver's side, the same for both clients). Side by side: boto3's GET against
the presigned GET over aiohttp (`ObjectStore.fetch`), and httpx's POST against aiohttp's.

Then the same NATS and HTTP calls, and the seven NATS round trips an alert makes in turn (two KV reads, the outbox
publish, three KV writes, the audit publish), once back to back and once spaced at `--paced-rate` (25/s, as
bench/alert_latency.py's paced phase): what a call costs when the process sleeps between alerts, the floor under the
notifier's CPU per alert at that rate.
Run: .venv/bin/python bench/notifier_ops.py [--calls 300] [--paced-rate 25]. The last line is one JSON object (ms of
CPU per call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings
from podsweep.objectstore import ObjectStore


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def per_call(calls: int, op: Callable[[], Awaitable[object]], rate: float | None = None) -> float:
    """CPU ms per call: back to back, or one call every 1/rate seconds (asleep in between, as a quiet notifier)."""
    for _ in range(20):
        await op()
    loop = asyncio.get_running_loop()
    began = loop.time()
    start = cpu_s()
    for i in range(calls):
        if rate:
            await asyncio.sleep(max(0.0, began + i / rate - loop.time()))
        await op()
    return round((cpu_s() - start) * 1000 / calls, 3)


async def run(calls: int, paced_rate: float, data: Path) -> dict[str, object]:
    nats = embedded.start_nats(data / "nats")
    s3 = embedded.start_seaweedfs(data / "s3")
    runner: web.AppRunner | None = None
    try:
        settings = NatsSettings(
            url=nats.url, user=nats.user, password=nats.password, subject_root="ops", stream="OPS", kv_prefix="ops"
        )
        bus = await busmod.connect(settings, "bench")
        await busmod.ensure_stream(bus)
        store = ObjectStore(
            S3Settings(
                endpoint_url=s3.endpoint_url,
                bucket="podsweep-ops",
                access_key_id=s3.identity.access_key_id,
                secret_access_key=s3.identity.secret_access_key,
            )
        )
        await store.ensure_bucket()
        key = "reports/sha256/aa/latest.json"
        await store.put(key, b'{"findings": []}' * 60)  # about the size of a small report
        kv = await bus.kv("delivered")
        await kv.put("hook.k", b"v")
        app = web.Application()
        app.router.add_post("/hook", lambda _: asyncio.sleep(0, web.Response(status=204)))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = embedded.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}/hook"
        body = b"{}" * 400
        out: dict[str, object] = {"bench": "notifier_ops", "calls": calls}
        async with aiohttp.ClientSession() as session, httpx.AsyncClient() as client:

            async def aiohttp_post() -> None:
                async with session.post(url, data=body) as response:
                    await response.read()

            out["s3_get_boto3_ms"] = await per_call(calls, lambda: store.get(key))
            out["s3_get_presigned_aiohttp_ms"] = await per_call(calls, lambda: store.fetch(session, key, 1 << 20))
            out["kv_get_ms"] = await per_call(calls, lambda: kv.get("hook.k"))
            out["kv_put_ms"] = await per_call(calls, lambda: kv.put("hook.k", b"v"))
            out["js_publish_ms"] = await per_call(calls, lambda: bus.js.publish("ops.x", b"{}", stream="OPS"))
            out["post_httpx_ms"] = await per_call(calls, lambda: client.post(url, content=body))
            out["post_aiohttp_ms"] = await per_call(calls, aiohttp_post)

            async def round_trips() -> None:  # an alert's NATS calls, one after the other
                await kv.get("hook.k")
                await kv.get("hook.k")
                await bus.js.publish("ops.x", b"{}", stream="OPS")
                await kv.put("hook.k", b"v")
                await kv.put("hook.k", b"v")
                await kv.put("hook.k", b"v")
                await bus.js.publish("ops.x", b"{}", stream="OPS")

            out["seven_round_trips_ms"] = await per_call(calls, round_trips)
            paced = max(20, calls // 2)
            out["paced_rate_per_s"] = paced_rate
            out["kv_get_paced_ms"] = await per_call(paced, lambda: kv.get("hook.k"), paced_rate)
            out["js_publish_paced_ms"] = await per_call(
                paced, lambda: bus.js.publish("ops.x", b"{}", stream="OPS"), paced_rate
            )
            out["post_aiohttp_paced_ms"] = await per_call(paced, aiohttp_post, paced_rate)
            out["s3_get_presigned_aiohttp_paced_ms"] = await per_call(
                paced, lambda: store.fetch(session, key, 1 << 20), paced_rate
            )
            out["seven_round_trips_paced_ms"] = await per_call(paced, round_trips, paced_rate)
        await bus.close()
        out["load_average_1m"] = round(os.getloadavg()[0], 2)
        return out
    finally:
        if runner is not None:
            await runner.cleanup()
        s3.stop()
        nats.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per operation (after 20 to warm up)")
    parser.add_argument("--paced-rate", type=float, default=25.0, help="calls per second in the paced runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="podsweep-ops-") as tmp:
        result = uvloop.run(run(args.calls, args.paced_rate, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
