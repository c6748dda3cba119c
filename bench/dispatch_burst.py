"""A burst of image.seen events through two dispatcher replicas against the test harness: Jobs, limits, CPU per event.

Starts its own control plane (tests/harness/kube.py), nats-server and SeaweedFS, 500 kwok nodes, the kubelet stand-in
in completer mode and a Job observer that plays the watcher (tests/harness/scanjobs.py); then publishes 10,000 events
for 2,000 digests and waits until every digest is scanned. CPU is the two replicas' own (from /proc: the leader's and
the standby's), counted from when the leader consumes and both have settled until the last scan is recorded, so
start-up is not in it. Side by side: what a tool that creates one Job per event would have created.
Run: .venv/bin/python bench/dispatch_burst.py [--events N --digests N --nodes N --replicas N]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import nats.js.errors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._local_run import local_settings, run_in_tempdir
from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import ConsumerSettings, DispatcherSettings, Settings
from podsweep.kube import Kube
from schemas import subjects
from schemas.refs import digest_hex
from schemas.state import LIMITS_BUCKET, SCANS_BUCKET, DigestScanState
from tests.harness import replicas
from tests.harness.events import digest_ref, image_seen
from tests.harness.kube import KubeControlPlane, locate_binaries
from tests.harness.kwok import create_fake_node, create_scan_namespaces
from tests.harness.scanjobs import ScanJobObserver
from tests.harness.standin import KubeletStandin

NAMESPACE = "podsweep-bench"


async def run(args: argparse.Namespace, work: Path) -> dict[str, float | int]:
    plane = KubeControlPlane(bin_dir=locate_binaries(), work_dir=work / "kube")
    nats_server = embedded.start_nats(work / "nats")
    s3_server = embedded.start_seaweedfs(work / "s3")
    started: list[replicas.Replica] = []
    try:
        plane.start()
        client = await Kube.connect(str(plane.kubeconfig))
        await create_scan_namespaces(client, NAMESPACE)
        nodes = [f"bench-n{i}" for i in range(args.nodes)]
        for chunk in range(0, len(nodes), 50):
            await asyncio.gather(*(create_fake_node(client, name) for name in nodes[chunk : chunk + 50]))
        nats, s3 = local_settings(nats_server, s3_server, "bench", "podsweep-bench")
        section = DispatcherSettings(
            max_active=args.max_active,
            max_active_per_node=args.max_per_node,
            max_created_per_minute=100_000,
            claim_ttl_s=30.0,
            job_deadline_s=600.0,
            trivy_image="registry.example.com/aquasec/trivy:0.76.0",
            podsweep_image="registry.example.com/podsweep/podsweep:bench",
        )
        settings = Settings(
            kubeconfig=str(plane.kubeconfig),
            namespace=NAMESPACE,
            nats=nats,
            s3=s3,
            log_level=args.log_level,
            log_format="json",
            consumer=ConsumerSettings(max_deliver=20, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=30, batch=64),
            dispatcher=section,
        )
        standin = KubeletStandin(client, work / "standin", namespace=NAMESPACE, execute=False, parallel_pods=16)
        await standin.start()
        bus = await busmod.connect(nats, "bench")
        await busmod.ensure_stream(bus)
        observer = ScanJobObserver(client, NAMESPACE, bus)
        await observer.start()

        for i in range(args.replicas):
            profile = Path(args.profile) / f"dispatcher-{i}.prof" if args.profile else None
            started.append(replicas.start("dispatcher", settings, work / f"replica-{i}.log", profile=profile))
        await _wait_for_consumer(bus, started)
        cpu_before = sum(r.cpu_seconds() for r in started)
        sys_before = sum(r.cpu_times()[1] for r in started)
        began = time.monotonic()

        refs = [digest_ref("bench", n) for n in range(args.digests)]
        events = [
            image_seen(
                refs[i % args.digests], nodes[(i * 7 + i // args.digests) % len(nodes)], i % args.digests, workloads=400
            )
            for i in range(args.events)
        ]
        for chunk in range(0, len(events), 200):
            await asyncio.gather(
                *(
                    bus.publish(subjects.IMAGE_SEEN, event, msg_id=f"seen-{chunk + k}")
                    for k, event in enumerate(events[chunk : chunk + 200])
                )
            )
        published_s = time.monotonic() - began
        # Intake: every image.seen handled (claimed, parked or found claimed); the rest of the run is Job churn.
        while True:
            info = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
            if info.num_pending == 0 and (info.num_ack_pending or 0) == 0:
                break
            await asyncio.sleep(0.1)
        intake_s = time.monotonic() - began
        intake_cpu_s = sum(r.cpu_seconds() for r in started) - cpu_before
        await observer.wait(
            lambda: sum(1 for f in observer.finished.values() if f == "completed") >= args.digests,
            args.timeout,
            f"{args.digests} scans completed",
        )
        kv = await bus.kv(SCANS_BUCKET)

        async def all_done() -> bool:
            for ref in refs:
                state, _ = await busmod.kv_read(kv, digest_hex(ref), DigestScanState)
                if state is None or state.status != "done":
                    return False
            return True

        for _ in range(120):  # the last completions are recorded moments after their events
            if await all_done():
                break
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - began
        cpu_s = sum(r.cpu_seconds() for r in started) - cpu_before
        sys_s = sum(r.cpu_times()[1] for r in started) - sys_before
        # What the replicas cost doing nothing (the sweep, parked and timer ticks): CPU that grows with wall time, not
        # with events; this harness completes about 3 Jobs/s on 2 shared cores, so the run is long.
        idle_before = sum(r.cpu_seconds() for r in started)
        await asyncio.sleep(10)  # also: anything created late still shows up as a duplicate
        idle_ms_per_s = (sum(r.cpu_seconds() for r in started) - idle_before) * 1000 / 10
        per_digest = observer.digests_with_jobs()
        consumer = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
        # Every KV write is one message in its bucket's stream: the writes per digest, counted by the server.
        writes = {
            name: (await bus.js.stream_info(f"KV_{bus.kv_bucket(name)}")).state.last_seq
            for name in (SCANS_BUCKET, LIMITS_BUCKET)
        }
        await observer.stop()
        await standin.stop()
        await bus.close()
        await client.close()
        print(
            json.dumps(
                {
                    "baseline": "one Job per event (no digest dedup)",
                    "baseline_jobs": args.events,
                    "podsweep_jobs": len(observer.jobs),
                    "publish_s": round(published_s, 1),
                    "intake_s": round(intake_s, 1),
                    "intake_cpu_ms_per_event": round(intake_cpu_s * 1000 / args.events, 3),
                    "all_scanned_s": round(elapsed, 1),
                    "jobs_per_s": round(len(observer.jobs) / elapsed, 1),
                    "idle_cpu_ms_per_s": round(idle_ms_per_s, 1),
                    "cpu_s": round(cpu_s, 1),
                    "cpu_system_s": round(sys_s, 1),
                    "deliveries": consumer.delivered.consumer_seq,
                    "redelivered": consumer.num_redelivered,
                    "scans_writes_per_digest": round(writes[SCANS_BUCKET] / args.digests, 2),
                    "limiter_writes_per_digest": round(writes[LIMITS_BUCKET] / args.digests, 2),
                }
            )
        )
        return {
            "events": args.events,
            "unique_digests": len(set(refs)),
            "jobs_created": len(observer.jobs),
            "duplicates": sum(count - 1 for count in per_digest.values()),
            "max_active": observer.max_active,
            "limit_active": args.max_active,
            "max_active_per_node": observer.max_active_per_node,
            "limit_per_node": args.max_per_node,
            "cpu_ms_per_event": round(cpu_s * 1000 / args.events, 3),
        }
    finally:
        for replica in started:
            replica.stop()
        if args.logs:
            for i, replica in enumerate(started):
                shutil.copy(replica.log, Path(args.logs) / f"dispatcher-{i}.log")
        plane.stop()
        nats_server.stop()
        s3_server.stop()


async def _wait_for_consumer(bus: busmod.Bus, started: list[replicas.Replica], timeout_s: float = 60.0) -> None:
    """The leader bound to the durable consumer (a waiting pull), and every replica done starting: a standby only
    reads the lease, so its CPU settles (under 50 ms in a second) once it is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for replica in started:
            if replica.proc.poll() is not None:
                raise RuntimeError(f"dispatcher exited with {replica.proc.returncode}:\n{replica.tail()}")
        try:
            info = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
            if info.num_waiting:
                before = sum(r.cpu_seconds() for r in started)
                await asyncio.sleep(1.0)
                if sum(r.cpu_seconds() for r in started) - before < 0.05:
                    return
                continue
        except nats.js.errors.NotFoundError:  # not created yet
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the dispatcher replicas did not start consuming")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--digests", type=int, default=2_000)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-active", type=int, default=100)
    parser.add_argument("--max-per-node", type=int, default=2)
    parser.add_argument("--log-level", default="warning", help="the replicas' log level")
    parser.add_argument("--logs", default="", help="a directory: keep the replicas' logs there")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument(
        "--profile", default="", help="a directory: run the replicas under cProfile (CPU time), writing there"
    )
    args = parser.parse_args()
    for directory in (args.profile, args.logs):
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
    run_in_tempdir(run, args, "podsweep-bench-")


if __name__ == "__main__":
    main()
