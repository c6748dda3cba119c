"""What one dispatcher's mirror of the scans bucket holds at fleet size: N digest states in a real nats-server's KV,
then a fresh process mirrors the bucket (`bus.KvMirror`, as the dispatcher does) and reports its resident memory.

Three figures, each the process's RSS minus its RSS before the mirror started: once the watch has delivered every
key (raw values, as they arrive), after one sweep (`documents()`: every state decoded, as the dispatcher's sweep
does each minute: the CPU seconds it took), and the process's peak. Side by side, the same for a bare dict of the raw values (what holding
only the bytes costs). States are fleet-shaped: a home cluster with 3 nodes, two other clusters with 2 nodes each,
a done scan with an SBOM.
Run: .venv/bin/python bench/mirror_memory.py [--digests 100000]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings
from schemas.state import SCANS_BUCKET, DigestScanState
from services.dispatcher.plan import scan_id_for
from tests.harness.events import digest_ref

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def state(n: int) -> DigestScanState:
    ref = digest_ref("fleet", n)
    hex_ = ref.rsplit(":", 1)[1]
    return DigestScanState(
        digest_ref=ref,
        cluster="eu-west-1",
        status="done",
        attempts=1,
        scan_id=scan_id_for(ref, 1),
        node=f"ip-10-0-{n % 250}-{n % 200}.eu-west-1.compute.internal",
        nodes_seen=[f"ip-10-0-{(n + i) % 250}-{i}.eu-west-1.compute.internal" for i in range(3)],
        elsewhere={
            cluster: [f"ip-10-1-{(n + i) % 250}-{i}.{cluster}.compute.internal" for i in range(2)]
            for cluster in ("us-east-1", "ap-south-1")
        },
        last_scan_at=T0,
        next_due_at=T0 + timedelta(hours=24),
        last_seen_at=T0,
        sbom_key=f"sbom/sha256/{hex_}/history/20261205t120000000000z.cdx.json",
        sbom_trivy_version="0.76.0",
        scan_seq=1,
    )


async def fill(settings: NatsSettings, digests: int) -> int:
    bus = await busmod.connect(settings, "bench-fill")
    try:
        kv = await bus.kv(SCANS_BUCKET)
        encoder = msgspec.json.Encoder()
        size = 0
        for chunk in range(0, digests, 500):
            docs = [state(n) for n in range(chunk, min(chunk + 500, digests))]
            payloads = [encoder.encode(d) for d in docs]
            size += sum(len(p) for p in payloads)
            await asyncio.gather(
                *(kv.put(d.digest_ref.rsplit(":", 1)[1], p) for d, p in zip(docs, payloads, strict=True))
            )
        return size
    finally:
        await bus.close()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(settings: NatsSettings, digests: int, raw_only: bool) -> dict[str, float]:
    """In a process of its own: the mirror's memory once every key arrived, and after one sweep decoded them all."""
    bus = await busmod.connect(settings, "bench-mirror")
    try:
        kv = await bus.kv(SCANS_BUCKET)
        gc.collect()
        before = rss_mb()
        began = time.monotonic()
        if raw_only:  # the baseline: the values' bytes in a dict, nothing else
            raw: dict[str, bytes] = {}
            watcher = await kv.watchall()
            async for entry in watcher:
                if entry is None:
                    break
                raw[entry.key] = entry.value or b""
            await watcher.stop()
            gc.collect()
            return {"held": len(raw), "ready_mb": rss_mb() - before, "ready_s": time.monotonic() - began}
        mirror = busmod.KvMirror(kv, DigestScanState)
        stop = asyncio.Event()
        follow = asyncio.create_task(mirror.follow(stop))
        while not mirror.ready:  # noqa: ASYNC110 - the mirror has no event to wait on; polled as the tests do
            await asyncio.sleep(0.05)
        ready_s = time.monotonic() - began
        gc.collect()
        ready_mb = rss_mb() - before
        swept = time.process_time()  # CPU, not wall time: the machine is shared
        held = sum(1 for _ in mirror.documents())
        sweep_s = time.process_time() - swept
        gc.collect()
        swept_mb = rss_mb() - before
        stop.set()
        await follow
        return {
            "held": held,
            "ready_mb": ready_mb,
            "swept_mb": swept_mb,
            "peak_mb": hwm_mb() - before,
            "ready_s": ready_s,
            "sweep_cpu_s": sweep_s,
        }
    finally:
        await bus.close()


def run_child(settings: NatsSettings, digests: int, raw_only: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", msgspec.json.encode(settings).decode(), str(digests), str(raw_only)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        settings = msgspec.json.decode(sys.argv[2], type=NatsSettings)
        print(json.dumps(asyncio.run(measure(settings, int(sys.argv[3]), sys.argv[4] == "True"))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--digests", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="podsweep-bench-") as work:
        server = embedded.start_nats(Path(work) / "nats")
        try:
            settings = NatsSettings(
                url=server.url, user=server.user, password=server.password, subject_root="bench", kv_prefix="bench"
            )
            began = time.monotonic()
            size = asyncio.run(fill(settings, args.digests))
            print(f"filled {args.digests} states ({size / 1e6:.1f} MB of JSON) in {time.monotonic() - began:.0f}s")
            mirror = run_child(settings, args.digests, raw_only=False)
            raw = run_child(settings, args.digests, raw_only=True)
        finally:
            server.stop()
    result = {
        "digests": args.digests,
        "json_mb": round(size / 1e6, 1),
        "mirror_ready_mb": round(mirror["ready_mb"], 1),
        "mirror_after_sweep_mb": round(mirror["swept_mb"], 1),
        "mirror_peak_mb": round(mirror["peak_mb"], 1),
        "mirror_ready_s": round(mirror["ready_s"], 1),
        "sweep_cpu_s": round(mirror["sweep_cpu_s"], 2),
        "baseline_raw_dict_mb": round(raw["ready_mb"], 1),
        "target_mb": 150,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
