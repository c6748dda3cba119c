"""Zero-day response: a new advisory reaches the Trivy server; how long until the last affected owner is alerted.

Starts its own control plane (tests/harness/kube.py), nats-server, SeaweedFS, a Trivy server over the fixture DB v1,
a webhook receiver, and the four services in this process, with the kubelet stand-in executing every Job for real
(`podsweep download`, `trivy sbom --server`, `podsweep upload`). `--digests` digests are seeded with a stored SBOM
(about 3 % from a tree with lodash 4.17.20, the others from an Alpine tree) and one to three workloads each, and are
scanned once from their SBOMs on v1 (every one breaches: its owners are alerted). Then the server restarts on v2
(one advisory more: lodash CVE-2020-28500) and nothing is typed: the dispatcher's DB watch must publish db.updated and
rescan. Measured from the server answering on v2 to the last alert to an affected workload's owner. Side by side in
the same run, the baseline: Trivy alone scanning the same SBOMs against the same server, one after the other.
Run: .venv/bin/python bench/zeroday.py [--digests 1000 --batch 50]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._local_run import local_settings, run_in_tempdir
from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NotifierSettings,
    Settings,
    WatcherSettings,
)
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import jobs, storage
from schemas.alerts import AlertPayload
from schemas.events import Workload
from schemas.refs import digest_hex
from schemas.state import (
    LIMITS_BUCKET,
    SCANS_BUCKET,
    VULNDB_KEY,
    WORKLOADS_BUCKET,
    DigestScanState,
    DigestWorkloads,
    VulnDbSeen,
    WorkloadRun,
)
from services.dispatcher.main import main as dispatcher_main
from services.notifier.main import main as notifier_main
from services.parser.main import main as parser_main
from services.watcher.main import main as watcher_main
from tests.harness.kube import KubeControlPlane, locate_binaries
from tests.harness.kwok import create_fake_node, create_scan_namespaces
from tests.harness.receiver import Receiver
from tests.harness.replicas import in_process
from tests.harness.rootfs import FixtureKind, build_rootfs
from tests.harness.standin import KubeletStandin, scan_images
from tests.harness.trivy import (
    BASE_ADVISORIES,
    EXTRA_ADVISORIES,
    SBOM_WRITE_FLAGS,
    TrivyServer,
    build_db,
    find_trivy,
    scan_env,
)

HOOK_KEY = "zeroday-bench-hook-key-0123456789"
NEW_CVE = "CVE-2020-28500"
_alert = msgspec.json.Decoder(AlertPayload)


class _ScanEvent(msgspec.Struct, frozen=True):
    job: str
    mode: str = "node"


_scan_event = msgspec.json.Decoder(_ScanEvent)


def _ref(n: int) -> str:
    return f"registry.example.com/zeroday/app{n}@sha256:{hashlib.sha256(f'zd-{n}'.encode()).hexdigest()}"


def _sbom(trivy: Path, kind: FixtureKind, out: Path) -> bytes:
    subprocess.run(
        [
            str(trivy),
            "rootfs",
            "--format",
            "cyclonedx",
            "--output",
            str(out),
            *SBOM_WRITE_FLAGS,
            str(build_rootfs(kind)),
        ],
        check=True,
        capture_output=True,
        env=scan_env(),
    )
    return out.read_bytes()


async def _wait(check: Any, timeout_s: float, what: str, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")


async def _jobs(client: Kube, namespace: str) -> list[dict[str, Any]]:
    listing = msgspec.json.decode(await client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))
    return list(listing["items"])


def _trivy_alone(trivy: Path, server: str, sboms: list[Path], work: Path) -> float:
    """The baseline: `trivy sbom --server` on each SBOM in turn, as a script would, with the Job's flags."""
    flags = ["--scanners", "vuln", "--list-all-pkgs", "--offline-scan", "--disable-telemetry", "--skip-version-check"]
    flags += ["--no-progress", "--server", server, "--cache-dir", str(work / "alone-cache"), "--format", "json"]
    began = time.monotonic()
    for n, sbom in enumerate(sboms):
        out = work / "alone-out" / f"{n}.json"
        subprocess.run([str(trivy), "sbom", *flags, "--output", str(out), str(sbom)], check=True, env=scan_env())
    return time.monotonic() - began


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plane = KubeControlPlane(bin_dir=locate_binaries(), work_dir=work / "kube")
    nats_server = embedded.start_nats(work / "nats")
    s3_server = embedded.start_seaweedfs(work / "s3")
    trivy = find_trivy()
    server = TrivyServer(trivy=trivy, cache_dir=build_db(work / "trivy-cache"), log_path=work / "trivy.log")
    receiver = Receiver(hmac_key=HOOK_KEY)
    try:
        plane.start()
        server.start()
        await receiver.start()
        client = await Kube.connect(str(plane.kubeconfig))
        nats, s3 = local_settings(nats_server, s3_server, "zd", "podsweep-zeroday")
        await create_fake_node(client, "zd-node")  # where the scheduler puts the (unpinned) rescan pods
        scans_ns, apps_ns = "zd-scans", "zd-apps"
        await create_scan_namespaces(client, scans_ns, apps_ns)

        # Seed: SBOMs in S3, scan states due now (done, never rescanned), who runs what.
        (work / "sboms").mkdir()
        (work / "alone-out").mkdir()
        lodash = gzip.compress(_sbom(trivy, FixtureKind.NPM, work / "npm.cdx.json"), mtime=0)
        alpine = gzip.compress(_sbom(trivy, FixtureKind.ALPINE, work / "alpine.cdx.json"), mtime=0)
        every = max(round(1 / args.affected_share), 1)
        affected = {n for n in range(args.digests) if n % every == every // 2}
        store = ObjectStore(s3)
        await store.ensure_bucket()
        bus = await busmod.connect(nats, "bench")
        await busmod.ensure_stream(bus)
        scans_kv, workloads_kv = await bus.kv(SCANS_BUCKET), await bus.kv(WORKLOADS_BUCKET)
        now = datetime.now(UTC)
        scanned_at = now - timedelta(days=1)
        workloads_of: dict[str, list[str]] = {}
        sbom_files: list[Path] = []
        for n in range(args.digests):
            ref = _ref(n)
            body = lodash if n in affected else alpine
            key = storage.history_sbom_key(ref, scanned_at)
            await store.put(key, body)
            path = work / "sboms" / f"{n}.cdx.json"
            path.write_bytes(gzip.decompress(body))
            sbom_files.append(path)
            state = DigestScanState(
                digest_ref=ref,
                cluster="bench",  # the dispatcher's own (a state without one is the default cluster's)
                status="done",
                nodes_seen=["zd-node"],
                last_seen_at=now,
                last_scan_at=scanned_at,
                next_due_at=now,
                sbom_key=key,
                sbom_trivy_version="0.76.0",
            )
            await scans_kv.put(digest_hex(ref), msgspec.json.encode(state))
            names = [f"app{n}-w{w}" for w in range(1 + n % 3)]
            workloads_of[ref] = names
            runs = [
                WorkloadRun(namespace=apps_ns, workload=Workload(kind="Deployment", name=name), image=f"app{n}:1")
                for name in names
            ]
            await workloads_kv.put(
                digest_hex(ref), msgspec.json.encode(DigestWorkloads(digest_ref=ref, runs=runs, v=1))
            )
        affected_refs = {_ref(n) for n in affected}
        affected_workloads = {(ref, w) for ref in affected_refs for w in workloads_of[ref]}
        all_workloads = sum(len(w) for w in workloads_of.values())

        policy = work / "policy.yaml"
        policy.write_text(
            "version: 1\ndefaults:\n  threshold: {max_critical: 0, max_high: 0}\n  destinations: [hook]\n"
            f'destinations:\n  - {{name: hook, kind: webhook, url: "{receiver.url}/hook", '
            "hmac_key: {env: ZERODAY_HOOK_KEY}}\n"
        )
        os.environ["ZERODAY_HOOK_KEY"] = HOOK_KEY
        settings = Settings(
            cluster="bench",
            kubeconfig=str(plane.kubeconfig),
            namespace=scans_ns,
            nats=nats,
            s3=s3,
            log_level="warning",
            log_format="json",
            consumer=ConsumerSettings(max_deliver=20, backoff_s=[0.5, 1.0, 2.0], ack_wait_s=30, batch=64),
            watcher=WatcherSettings(include_namespaces=[apps_ns]),
            notifier=NotifierSettings(policy_file=str(policy), workloads_wait_s=0.5, retry_base_s=0.2),
            dispatcher=DispatcherSettings(
                trivy_server=server.url,
                vulndb_poll_s=args.poll,
                sbom_batch_size=args.batch,
                sbom_batch_window_s=1.0,
                max_active=args.max_active,
                max_active_per_node=args.max_active,
                max_created_per_minute=600,
                sweep_interval_s=5.0,
                job_deadline_s=3600.0,
                ttl_after_finished_s=7200.0,
            ),
        )
        standin = KubeletStandin(
            client, work / "standin", scan_images(trivy), namespace=scans_ns, parallel_pods=args.parallel
        )
        await standin.start()
        limits_kv = await bus.kv(LIMITS_BUCKET)
        # Every scan's Job as its events name it (a failed Job is deleted, so listing Jobs at the end misses it).
        scan_jobs: dict[str, tuple[str, float]] = {}  # job name -> (mode, first seen, monotonic)

        async def on_scan(msg: Any) -> None:
            event = _scan_event.decode(msg.data)
            scan_jobs.setdefault(event.job, (event.mode, time.monotonic()))

        scan_sub = await bus.nc.subscribe(bus.subject("scan.>"), cb=on_scan)

        def alerts_after(since: float) -> list[tuple[AlertPayload, float]]:
            return [(_alert.decode(a.body), a.at) for a in receiver.accepted("/hook") if a.at >= since]

        try:
            async with in_process(watcher_main, dispatcher_main, parser_main, notifier_main, settings=settings):
                # Phase v1: every digest rescanned from its SBOM once; every owner alerted (all breach on v1).
                began = time.monotonic()

                async def v1_done() -> bool:
                    return len({(p.digest_ref, p.workload.name) for p, _ in alerts_after(0)}) >= all_workloads

                await _wait(v1_done, args.timeout, f"{all_workloads} owners alerted on DB v1", every_s=2.0)
                v1_s = time.monotonic() - began

                async def recorded() -> VulnDbSeen | None:
                    return (await busmod.kv_read(limits_kv, VULNDB_KEY, VulnDbSeen))[0]

                await _wait(recorded, 60, "the dispatcher recording DB v1")
                before = {j["metadata"]["name"] for j in await _jobs(client, scans_ns)}
                print(json.dumps({"phase": "v1", "seconds": round(v1_s, 1), "jobs": len(before)}), flush=True)

                # Phase v2: the server moves to the new DB; nothing is typed.
                await asyncio.to_thread(server.restart, (BASE_ADVISORIES, EXTRA_ADVISORIES), datetime.now(UTC))
                t0 = time.monotonic()

                def alerted_now() -> dict[tuple[str, str], float]:
                    found: dict[tuple[str, str], float] = {}
                    for payload, at in alerts_after(t0):
                        if any(f.id == NEW_CVE and f.new for f in payload.findings):
                            found.setdefault((payload.digest_ref, payload.workload.name), at)
                    return found

                async def v2_done() -> bool:
                    return affected_workloads <= set(alerted_now())

                await _wait(v2_done, args.timeout, f"{len(affected_workloads)} affected owners alerted", every_s=0.5)
                reached = alerted_now()
                last_alert = max(reached[w] for w in affected_workloads)
                db_to_last_alert_s = last_alert - t0
                # Whatever else is due reaches the receiver before counting (rescans of the unaffected included).

                async def rescans_done() -> bool:
                    states, _ = await busmod.kv_documents(scans_kv, DigestScanState)
                    return all(s.status == "done" and s.scan_seq >= 2 for s in states)

                await _wait(rescans_done, args.timeout, "every digest rescanned on v2", every_s=2.0)
                after = await _jobs(client, scans_ns)
        finally:
            await scan_sub.unsubscribe()
            await standin.stop()
            await bus.close()

        unexpected = [(p.digest_ref, p.workload.name) for p, _ in alerts_after(t0) if p.digest_ref not in affected_refs]
        listed = {j["metadata"]["name"]: j["metadata"]["annotations"].get(jobs.MODE_ANNOTATION) for j in after}
        node_jobs = {n for n, m in listed.items() if m == "node"} | {
            n for n, (m, _) in scan_jobs.items() if m == "node"
        }
        rescan_jobs = {n for n, m in listed.items() if m == "sbom" and n not in before}
        rescan_jobs |= {n for n, (m, at) in scan_jobs.items() if m == "sbom" and at >= t0 and n not in before}
        alerted_digests = {ref for ref, _ in reached if ref in affected_refs}
        print(
            json.dumps(
                {
                    "affected_workloads": len(affected_workloads),
                    "alerted_workloads": len(set(reached) & affected_workloads),
                    "unaffected_alerted_on_v2": len(unexpected),
                    "all_workloads": all_workloads,
                    "poll_s": args.poll,
                    "parallel_pods": args.parallel,
                    "max_active": args.max_active,
                }
            ),
            flush=True,
        )

        # The baseline, same SBOMs, same server (still on v2).
        trivy_alone_s = await asyncio.to_thread(_trivy_alone, trivy, server.url, sbom_files, work)
        await client.close()
        return {
            "digests": args.digests,
            "affected": len(affected_refs),
            "alerted": len(alerted_digests),
            "node_jobs": len(node_jobs),
            "rescan_jobs": len(rescan_jobs),
            "batch": args.batch,
            "db_to_last_alert_s": round(db_to_last_alert_s, 1),
            "trivy_alone_s": round(trivy_alone_s, 1),
            "ratio": round(db_to_last_alert_s / trivy_alone_s, 2),
        }
    finally:
        await receiver.stop()
        server.stop()
        plane.stop()
        nats_server.stop()
        s3_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--digests", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--affected-share", type=float, default=0.03)
    parser.add_argument("--poll", type=float, default=2.0, help="dispatcher.vulndb_poll_s")
    parser.add_argument("--parallel", type=int, default=4, help="pods the stand-in runs at once")
    parser.add_argument("--max-active", type=int, default=20, help="dispatcher.max_active")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    every = max(round(1 / args.affected_share), 1)
    if args.digests <= every // 2:
        parser.error(f"--digests {args.digests} at --affected-share {args.affected_share} affects none: use more")
    run_in_tempdir(run, args, "podsweep-zeroday-")


if __name__ == "__main__":
    main()
