"""A fleet of clusters reporting into one NATS and one S3: Jobs created fleet-wide, time to every digest stored, each
service's peak RSS, side by side with per-cluster deduplication only (what the tools in use today do at best).

Starts its own control planes (tests/harness/kube.py: one per cluster, each with its kwok nodes), nats-server and
SeaweedFS (podsweep.embedded) in a temp dir, and stops only those. The pods are not created: each cluster's
`image.seen` events are generated (one per distinct digest and node, as a watcher publishes them for 6,000 pods) and
published as that cluster's watcher would. Everything after is podsweep's own processes: a watcher and a dispatcher
per cluster (the watcher sees the scan Jobs finish), one parser; the kubelet stand-in of each plane plays the scan
pods by POSTing a real Trivy report to the Job's upload URL.

- fleet: one installation, a cluster name per cluster: each digest scanned once across the fleet.
- per_cluster: an installation per cluster (own subjects, buckets, parser): each cluster scans what it runs.

Run: .venv/bin/python bench/fleet.py [--clusters 3 --nodes 300 --pods 6000 --digests 1500 --shared 500].
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NatsSettings,
    S3Settings,
    Settings,
    WatcherSettings,
)
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import subjects
from schemas.events import ImageSeen, Workload
from schemas.state import SUMMARIES_BUCKET
from services.dispatcher import digests, livejobs
from services.dispatcher.jobspec import RAW_URL_ENV
from tests.harness import replicas
from tests.harness.events import digest_ref
from tests.harness.kube import KubeControlPlane, locate_binaries
from tests.harness.kwok import create_fake_node, create_namespace
from tests.harness.scanpod import send_uploads
from tests.harness.standin import KubeletStandin, Pod

REPO = Path(__file__).resolve().parent.parent
REPORT = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-alpine.json").read_bytes(), mtime=0)
APPS = "apps"  # the watchers' pod namespace: empty, the sightings are generated


@dataclass
class Cluster:
    name: str
    plane: KubeControlPlane
    client: Kube
    digests: list[str]
    sightings: list[ImageSeen] = field(default_factory=list)


def world(args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    """The fleet's digests: `shared` run in every cluster, the rest split between them; each cluster's list."""
    refs = [digest_ref("fleet", n) for n in range(args.digests)]
    shared, rest = refs[: args.shared], refs[args.shared :]
    return refs, [shared + rest[k :: args.clusters] for k in range(args.clusters)]


def sightings(cluster: str, digests: list[str], nodes: int, pods: int) -> list[ImageSeen]:
    """What a watcher publishes for `pods` pods running `digests` over `nodes` nodes: one per (digest, node)."""
    now = datetime.now(UTC)
    pairs: dict[tuple[str, int], int] = {}
    for i in range(pods):
        pairs.setdefault((digests[i % len(digests)], (i * 7 + i // len(digests)) % nodes), i)
    return [
        ImageSeen(
            cluster=cluster,
            digest_ref=ref,
            image=ref.split("@")[0] + ":1.0",
            node=f"n{node}",
            namespace="apps",
            pod=f"app-{i}",
            container="app",
            container_kind="app",
            workload=Workload("Deployment", f"app-{i % 400}"),
            observed_at=now,
        )
        for (ref, node), i in pairs.items()
    ]


def peak_rss_mb(replica: replicas.Replica) -> float:
    for line in Path(f"/proc/{replica.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def publish_all(settings: NatsSettings, events: list[ImageSeen]) -> None:
    bus = await busmod.connect(settings, "bench-publish")
    try:
        await busmod.ensure_stream(bus)

        async def publish(n: int, event: ImageSeen) -> None:
            for attempt in range(10):  # a loaded machine times a publish out now and then; the msg id dedupes
                try:
                    await bus.publish(subjects.IMAGE_SEEN, event, msg_id=f"seen-{event.cluster}-{n}")
                    return
                except nats.errors.TimeoutError:
                    await asyncio.sleep(0.5 * (attempt + 1))
            raise TimeoutError(f"image.seen {n} of cluster {event.cluster} could not be published")

        for chunk in range(0, len(events), 50):
            await asyncio.gather(*(publish(chunk + k, e) for k, e in enumerate(events[chunk : chunk + 50])))
    finally:
        await bus.close()


async def stored_count(bus: busmod.Bus) -> int | None:
    """Digests with a stored report: keys of the summaries bucket (history 1: one message per key), or None when the
    server did not answer in time (a loaded machine)."""
    try:
        info = await bus.js.stream_info(f"KV_{bus.kv_bucket(SUMMARIES_BUCKET)}")
    except (nats.errors.TimeoutError, nats.js.errors.NotFoundError):
        return None
    return int(info.state.messages)


async def jobs_by_digest(cluster: Cluster, namespace: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for job in await digests.scan_jobs(cluster.client.get, f"/apis/batch/v1/namespaces/{namespace}/jobs"):
        ref = livejobs.digest_of(job)
        if ref is not None:
            found[ref] += 1
    return found


async def run_mode(
    mode: str, args: argparse.Namespace, clusters: list[Cluster], nats: NatsSettings, s3: S3Settings, work: Path
) -> dict[str, object]:
    """One scenario on the running planes: its own namespace, subjects, buckets and processes."""
    namespace = f"{mode.replace('_', '-')}-jobs"
    fleet = mode == "fleet"

    def installation(cluster: str) -> tuple[NatsSettings, S3Settings]:
        name = mode if fleet else f"{mode}-{cluster}".replace("_", "-")
        return (
            msgspec.structs.replace(nats, subject_root=name, stream=name.upper().replace("-", "_"), kv_prefix=name),
            msgspec.structs.replace(s3, bucket=name),
        )

    consumer = ConsumerSettings(max_deliver=20, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=30, batch=64)
    dispatcher = DispatcherSettings(
        max_active=args.max_active,
        max_active_per_node=args.max_per_node,
        max_created_per_minute=100_000,
        claim_ttl_s=60.0,
        ttl_after_finished_s=86_400.0,  # the Jobs are counted at the end
        sbom=False,
        trivy_image="registry.example.com/aquasec/trivy:0.76.0",
        podsweep_image="registry.example.com/podsweep/podsweep:bench",
    )
    started: dict[str, replicas.Replica] = {}
    standins: list[KubeletStandin] = []
    try:
        for cluster in clusters:
            await create_namespace(cluster.client, namespace)
            await cluster.client.request(
                "POST",
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
            )

            async def complete(pod: Pod) -> None:
                await send_uploads(pod, {RAW_URL_ENV: REPORT})

            standin = KubeletStandin(
                cluster.client,
                work / f"standin-{mode}-{cluster.name}",
                namespace=namespace,
                execute=False,
                parallel_pods=32,
                on_complete=complete,
            )
            await standin.start()
            standins.append(standin)
            own_nats, own_s3 = installation(cluster.name)
            await ObjectStore(own_s3).ensure_bucket()
            settings = Settings(
                cluster=cluster.name,
                kubeconfig=str(cluster.plane.kubeconfig),
                namespace=namespace,
                nats=own_nats,
                s3=own_s3,
                log_level="warning",
                log_format="json",
                consumer=consumer,
                watcher=WatcherSettings(include_namespaces=[APPS]),
                dispatcher=dispatcher,
            )
            for service in ("watcher", "dispatcher"):
                started[f"{service}-{cluster.name}"] = replicas.start(
                    service, settings, work / f"{mode}-{service}-{cluster.name}.log"
                )
            if not fleet or cluster is clusters[0]:
                name = "parser" if fleet else f"parser-{cluster.name}"
                started[name] = replicas.start("parser", settings, work / f"{mode}-{name}.log")
        await asyncio.sleep(5)  # the services connect and create their consumers
        began = time.monotonic()
        for cluster in clusters:
            await publish_all(installation(cluster.name)[0], cluster.sightings)
        published_s = time.monotonic() - began
        expected = len({ref for c in clusters for ref in c.digests}) if fleet else sum(len(c.digests) for c in clusters)
        installations = [installation(clusters[0].name)[0]] if fleet else [installation(c.name)[0] for c in clusters]
        buses = [await busmod.connect(s, "bench-count") for s in installations]
        counts = [0] * len(buses)
        stored = 0
        deadline = began + args.timeout
        try:
            while time.monotonic() < deadline:
                for name, replica in started.items():
                    if replica.proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {replica.proc.returncode}:\n{replica.tail()}")
                for i, counted in enumerate([await stored_count(b) for b in buses]):
                    counts[i] = counted if counted is not None else counts[i]
                stored = sum(counts)
                if stored >= expected:
                    break
                await asyncio.sleep(3)
            elapsed = time.monotonic() - began
            # Scans stored per installation: a digest stored twice was scanned twice (a Job retried after a failure
            # of the harness is counted in `jobs`, not here).
            reports = 0
            for bus in buses:
                info = await bus.js.stream_info(
                    bus.settings.stream, subjects_filter=bus.subject(subjects.REPORT_STORED)
                )
                reports += sum((info.state.subjects or {}).values())
        finally:
            for bus in buses:
                await bus.close()
        rss = {name: round(peak_rss_mb(replica), 1) for name, replica in started.items()}
        per_cluster = {c.name: await jobs_by_digest(c, namespace) for c in clusters}
        fleet_jobs: Counter[str] = Counter()
        for found in per_cluster.values():
            fleet_jobs.update(found)
        jobs_total = sum(fleet_jobs.values())
        duplicates = reports - stored  # fleet: across the fleet; per cluster: within each installation
        return {
            "mode": mode,
            "jobs": jobs_total,
            "jobs_per_cluster": {name: sum(found.values()) for name, found in per_cluster.items()},
            "duplicates": duplicates,
            "jobs_beyond_one_per_digest": jobs_total - len(fleet_jobs) if fleet else None,
            "stored": stored,
            "expected_stored": expected,
            "lost": max(expected - stored, 0),
            "publish_s": round(published_s, 1),
            "time_to_all_stored_s": round(elapsed, 1) if stored >= expected else None,
            "peak_rss_mb": rss,
        }
    finally:
        for replica in started.values():
            replica.stop()
        for standin in standins:
            await standin.stop()


async def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    names = [f"c{k}" for k in range(args.clusters)]
    bin_dir = locate_binaries()
    planes = [KubeControlPlane(bin_dir=bin_dir, work_dir=work / f"kube-{name}") for name in names]
    nats_server = embedded.start_nats(work / "nats")
    s3_server = embedded.start_seaweedfs(work / "s3")
    clusters: list[Cluster] = []
    try:
        began = time.monotonic()
        with ThreadPoolExecutor(len(planes)) as pool:
            for done in [pool.submit(plane.start, 180.0) for plane in planes]:
                done.result()
        planes_s = time.monotonic() - began
        refs, per_cluster = world(args)
        for name, plane, digests in zip(names, planes, per_cluster, strict=True):
            client = await Kube.connect(str(plane.kubeconfig))
            await create_namespace(client, APPS)
            nodes = [f"n{i}" for i in range(args.nodes)]  # the same names in every cluster
            for chunk in range(0, len(nodes), 50):
                await asyncio.gather(*(create_fake_node(client, node) for node in nodes[chunk : chunk + 50]))
            cluster = Cluster(name, plane, client, digests)
            cluster.sightings = sightings(name, digests, args.nodes, args.pods)
            clusters.append(cluster)
        setup_s = time.monotonic() - began
        nats = NatsSettings(url=nats_server.url, user=nats_server.user, password=nats_server.password)
        s3 = S3Settings(
            endpoint_url=s3_server.endpoint_url,
            access_key_id=s3_server.identity.access_key_id,
            secret_access_key=s3_server.identity.secret_access_key,
        )
        results = {}
        modes = ("per_cluster", "fleet") if args.per_cluster_first else ("fleet", "per_cluster")
        for mode in modes:
            results[mode] = await run_mode(mode, args, clusters, nats, s3, work)
            print(json.dumps(results[mode]), flush=True)
        for cluster in clusters:
            await cluster.client.close()
        fleet, baseline = results["fleet"], results["per_cluster"]
        print(
            json.dumps(
                {
                    "planes_started_s": round(planes_s, 1),
                    "setup_s": round(setup_s, 1),
                    "sightings": sum(len(c.sightings) for c in clusters),
                    "per_cluster_time_to_all_stored_s": baseline["time_to_all_stored_s"],
                    "per_cluster_peak_rss_mb": baseline["peak_rss_mb"],
                    "per_cluster_duplicates": baseline["duplicates"],
                    "per_cluster_lost": baseline["lost"],
                }
            )
        )
        return {
            "clusters": args.clusters,
            "digests": len(refs),
            "shared_digests": args.shared,
            "jobs": fleet["jobs"],
            "per_cluster_jobs": baseline["jobs"],
            "duplicates": fleet["duplicates"],
            "lost": fleet["lost"],
            "time_to_all_stored_s": fleet["time_to_all_stored_s"],
            "peak_rss_mb": fleet["peak_rss_mb"],
        }
    finally:
        for plane in planes:
            plane.stop()
        nats_server.stop()
        s3_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=300, help="kwok nodes per cluster")
    parser.add_argument("--pods", type=int, default=6000, help="pods per cluster (their sightings are generated)")
    parser.add_argument("--digests", type=int, default=1500, help="distinct digests in the fleet")
    parser.add_argument("--shared", type=int, default=500, help="digests that run in every cluster")
    parser.add_argument("--max-active", type=int, default=100, help="per cluster")
    parser.add_argument("--max-per-node", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per scenario")
    parser.add_argument(
        "--per-cluster-first", action="store_true", help="run the baseline first (the machine's load moves)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="podsweep-bench-") as work:
        result = asyncio.run(run(args, Path(work)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
