"""SBOM rescans against node scans: how many Jobs 1,000 due digests cost, and the time per digest of each, side by side.

Starts its own control plane (tests/harness/kube.py), nats-server, SeaweedFS and a Trivy server over the fixture DB.
Part 1 (Jobs): 1,000 digests come due at once, half with a stored SBOM; one dispatcher decides. Expected: a node Job
for each digest without an SBOM, and ceil(500 / batch) unpinned rescan Jobs for the rest. Part 2 (time): the kubelet
stand-in executes, for real, `--sample` node scan Jobs (real `trivy rootfs` against the Trivy server, SBOM written)
and then one rescan Job of a full batch (`--batch` digests, each reading one of those SBOMs: a batch's cost depends
on its size, and a DB update fills batches); wall time from creation to the last Job done, per digest, and the CPU time of every container run (this process's
reaped children: the stand-in's containers) per digest, which the machine's load changes less.
Run: .venv/bin/python bench/rescan.py [--digests N --batch N --sample N]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import secrets
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
from podsweep.config import ConsumerSettings, DispatcherSettings, NatsSettings, S3Settings, Settings
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import jobs, storage
from schemas.refs import digest_hex
from schemas.state import SCANS_BUCKET, DigestScanState
from services.dispatcher import jobspec
from services.dispatcher.plan import scan_id_for
from tests.harness import replicas
from tests.harness.kube import KubeControlPlane, locate_binaries
from tests.harness.kwok import create_fake_node, create_namespace, create_scan_namespaces
from tests.harness.rootfs import FixtureKind, build_rootfs
from tests.harness.standin import KubeletStandin, RootfsImage, scan_images
from tests.harness.trivy import TrivyServer, build_db, find_trivy

NAMESPACE = "podsweep-bench"


def _ref(n: int) -> str:
    return f"registry.example.com/bench/app@sha256:{n:064x}"


async def _jobs(client: Kube, namespace: str) -> list[dict[str, Any]]:
    listing = msgspec.json.decode(await client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))
    return list(listing["items"])


async def _finished(client: Kube, namespace: str, names: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = {
            j["metadata"]["name"]
            for j in await _jobs(client, namespace)
            if any(
                c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in j["status"].get("conditions", [])
            )
        }
        if names <= done:
            failed = [
                j["metadata"]["name"]
                for j in await _jobs(client, namespace)
                if any(c["type"] == "Failed" and c["status"] == "True" for c in j["status"].get("conditions", []))
            ]
            if set(failed) & names:
                raise RuntimeError(f"bench Jobs failed: {sorted(set(failed) & names)}")
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{len(names)} Jobs did not finish within {timeout_s:.0f}s")


async def count_jobs(
    args: argparse.Namespace, client: Kube, nats: NatsSettings, s3: S3Settings, work: Path
) -> dict[str, int]:
    """Part 1: seed 1,000 due states (half with an SBOM) and count the Jobs one dispatcher creates for them."""
    namespace = f"{NAMESPACE}-count"
    await create_namespace(client, namespace)
    nodes = [f"bench-n{i}" for i in range(args.nodes)]
    for chunk in range(0, len(nodes), 50):
        await asyncio.gather(*(create_fake_node(client, name) for name in nodes[chunk : chunk + 50]))
    bus = await busmod.connect(nats, "bench")
    await busmod.ensure_stream(bus)
    kv = await bus.kv(SCANS_BUCKET)
    now = datetime.now(UTC)
    with_sbom = args.digests // 2
    for n in range(args.digests):
        ref = _ref(n)
        state = DigestScanState(
            digest_ref=ref,
            status="done",
            scan_seq=1,
            scan_id=scan_id_for(ref, 1),
            nodes_seen=[nodes[n % len(nodes)]],
            last_seen_at=now,
            last_scan_at=now - timedelta(days=1),
            next_due_at=now - timedelta(seconds=1),
            sbom_key=storage.history_sbom_key(ref, now - timedelta(days=1)) if n < with_sbom else None,
            sbom_trivy_version="0.76.0" if n < with_sbom else None,
        )
        await kv.put(digest_hex(ref), msgspec.json.encode(state))
    section = DispatcherSettings(
        max_active=args.digests,
        max_active_per_node=args.digests,
        max_created_per_minute=100_000,
        sweep_interval_s=2.0,
        sbom_batch_size=args.batch,
        job_deadline_s=600.0,
        trivy_image="registry.example.com/aquasec/trivy:0.76.0",
        podsweep_image="registry.example.com/podsweep/podsweep:bench",
    )
    settings = Settings(
        kubeconfig=str(args.kubeconfig),
        namespace=namespace,
        nats=nats,
        s3=s3,
        log_level="warning",
        log_format="json",
        consumer=ConsumerSettings(max_deliver=20, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=30, batch=64),
        dispatcher=section,
    )
    replica = replicas.start("dispatcher", settings, work / "dispatcher.log")
    try:
        deadline = time.monotonic() + args.timeout
        expected = (args.digests - with_sbom) + math.ceil(with_sbom / args.batch)
        created: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            created = await _jobs(client, namespace)
            claimed = sum(len(_items(j)) for j in created)
            if claimed >= args.digests:
                break
            if replica.proc.poll() is not None:
                raise RuntimeError(f"dispatcher exited:\n{replica.tail()}")
            await asyncio.sleep(1.0)
        await asyncio.sleep(3.0)  # anything created late still counts
        created = await _jobs(client, namespace)
    finally:
        replica.stop()
        await bus.close()
    node_jobs = [j for j in created if j["metadata"]["annotations"].get(jobs.MODE_ANNOTATION) == "node"]
    rescan_jobs = [j for j in created if j["metadata"]["annotations"].get(jobs.MODE_ANNOTATION) == "sbom"]
    pinned_rescans = sum(1 for j in rescan_jobs if "nodeName" in j["spec"]["template"]["spec"])
    return {
        "digests": args.digests,
        "with_sbom": with_sbom,
        "node_jobs": len(node_jobs),
        "rescan_jobs": len(rescan_jobs),
        "rescan_jobs_bound": math.ceil(with_sbom / args.batch),
        "expected_jobs": expected,
        "pinned_rescan_jobs": pinned_rescans,
        "digests_in_rescans": sum(len(_items(j)) for j in rescan_jobs),
    }


def _items(job: dict[str, Any]) -> list[Any]:
    annotations = job["metadata"]["annotations"]
    if annotations.get(jobs.MODE_ANNOTATION) == "sbom":
        return list(msgspec.json.decode(annotations[jobs.BATCH_ANNOTATION]))
    return [annotations.get(jobs.DIGEST_REF_ANNOTATION)]


def _children_cpu() -> float:
    """CPU seconds of this process's finished children: every container the stand-in ran (each is a child process
    whose command was exec'd in it, and reaps what it starts), on a machine whose wall times depend on its load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def time_scans(
    args: argparse.Namespace, client: Kube, s3: S3Settings, trivy_url: str, work: Path
) -> dict[str, float]:
    """Part 2: `sample` node scans executed for real, then one rescan Job of their SBOMs; seconds per digest."""
    namespace = f"{NAMESPACE}-time"
    await create_scan_namespaces(client, namespace)
    node = "bench-exec"
    await create_fake_node(client, node)
    await asyncio.sleep(4)  # kwok marks the node Ready
    store = ObjectStore(s3)
    await store.ensure_bucket()
    trivy = find_trivy()
    rootfs = build_rootfs(FixtureKind.COMBINED)
    refs = [f"registry.example.com/bench/exec@sha256:{secrets.token_hex(32)}" for _ in range(args.sample)]
    images = scan_images(trivy)
    for ref in refs:
        images[ref] = RootfsImage(path=str(rootfs))
    standin = KubeletStandin(client, work / "standin", images, namespace=namespace, parallel_pods=args.parallel)
    await standin.start()
    options = jobspec.JobOptions(namespace=namespace, trivy_server=trivy_url)
    try:
        began, cpu = time.monotonic(), _children_cpu()
        names: set[str] = set()
        for n, ref in enumerate(refs):
            scan_id = f"node-{n:04d}-{secrets.token_hex(4)}"
            scan = jobspec.validated_node_scan(
                scan_id=scan_id,
                digest_ref=ref,
                node=node,
                raw_put_url=store.presign_put(storage.raw_key(ref, scan_id), 600),
                sbom_put_url=store.presign_put(storage.sbom_key(ref, scan_id), 600),
            )
            await client.request(
                "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=jobspec.build_node_scan_job(scan, options)
            )
            names.add(scan_id)
        await _finished(client, namespace, names, args.timeout)
        node_s, node_cpu = time.monotonic() - began, _children_cpu() - cpu
        sboms = [storage.sbom_key(ref, name) for ref, name in zip(refs, sorted(names), strict=True)]
        batch_refs = [f"registry.example.com/bench/batch@sha256:{secrets.token_hex(32)}" for _ in range(args.batch)]
        began, cpu = time.monotonic(), _children_cpu()
        items = []
        for n, ref in enumerate(batch_refs):
            scan_id = f"sbom-{n:04d}-{secrets.token_hex(4)}"
            items.append(
                {
                    "scan_id": scan_id,
                    "digest_ref": ref,
                    "sbom_get_url": store.presign_get(sboms[n % len(sboms)], 600),
                    "raw_put_url": store.presign_put(storage.raw_key(ref, scan_id), 600),
                }
            )
        batch = msgspec.convert({"batch_id": f"batch-{secrets.token_hex(6)}", "items": items}, jobspec.SbomRescan)
        await client.request(
            "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=jobspec.build_sbom_rescan_job(batch, options)
        )
        await _finished(client, namespace, {batch.batch_id}, args.timeout)
        sbom_s, sbom_cpu = time.monotonic() - began, _children_cpu() - cpu
    finally:
        await standin.stop()
    return {
        "node_scan_s_per_digest": round(node_s / args.sample, 2),
        "sbom_rescan_s_per_digest": round(sbom_s / args.batch, 3),
        "ratio": round((node_s / args.sample) / (sbom_s / args.batch), 2),
        "node_scan_cpu_s_per_digest": round(node_cpu / args.sample, 3),
        "sbom_rescan_cpu_s_per_digest": round(sbom_cpu / args.batch, 3),
        "cpu_ratio": round((node_cpu / args.sample) / (sbom_cpu / args.batch), 2),
        "sample": args.sample,
        "batch": args.batch,
        "node_scan_parallel_pods": args.parallel,
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plane = KubeControlPlane(bin_dir=locate_binaries(), work_dir=work / "kube")
    nats_server = embedded.start_nats(work / "nats")
    s3_server = embedded.start_seaweedfs(work / "s3")
    trivy = TrivyServer(trivy=find_trivy(), cache_dir=build_db(work / "trivy-cache"), log_path=work / "trivy.log")
    try:
        plane.start()
        trivy.start()
        args.kubeconfig = plane.kubeconfig
        client = await Kube.connect(str(plane.kubeconfig))
        nats, s3 = local_settings(nats_server, s3_server, "bench", "podsweep-bench")
        counts = await count_jobs(args, client, nats, s3, work)
        print(json.dumps(counts), flush=True)
        timing = await time_scans(args, client, s3, trivy.url, work)
        print(json.dumps(timing), flush=True)
        await client.close()
        return {
            "digests": counts["digests"],
            "node_jobs": counts["node_jobs"],
            "rescan_jobs": counts["rescan_jobs"],
            "batch": args.batch,
            "sbom_rescan_s_per_digest": timing["sbom_rescan_s_per_digest"],
            "node_scan_s_per_digest": timing["node_scan_s_per_digest"],
            "ratio": timing["ratio"],
            "node_scan_cpu_s_per_digest": timing["node_scan_cpu_s_per_digest"],
            "sbom_rescan_cpu_s_per_digest": timing["sbom_rescan_cpu_s_per_digest"],
            "cpu_ratio": timing["cpu_ratio"],
        }
    finally:
        trivy.stop()
        plane.stop()
        nats_server.stop()
        s3_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--digests", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--sample", type=int, default=8, help="digests scanned for real in the timing part")
    parser.add_argument("--parallel", type=int, default=4, help="pods the stand-in runs at once")
    parser.add_argument("--timeout", type=float, default=600.0)
    run_in_tempdir(run, parser.parse_args(), "podsweep-bench-")


if __name__ == "__main__":
    main()
