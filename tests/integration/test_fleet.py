"""A fleet: three harness control planes (each its own etcd, kube-apiserver, controller-manager and kwok) reporting
into one NATS and one SeaweedFS. Each cluster runs its own watcher and dispatcher; one parser and one notifier serve
them all. Some digests run in every cluster, some in two, some in one: each is scanned once across the fleet, each
cluster's workloads are recorded and indexed under its name, and every workload's alert names its cluster.

The scan pods are played by the kubelet stand-in of the plane that runs them (a real Trivy report PUT to the Job's
presigned URL), as in tests/integration/test_e2e.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep import status as statusmod
from podsweep.config import NatsSettings, S3Settings, TelemetrySettings
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import storage
from schemas.alerts import AlertPayload
from schemas.index import NamespaceIndex, SummaryIndex
from schemas.refs import digest_hex
from schemas.state import WORKLOADS_BUCKET, DigestWorkloads
from tests.harness import replicas
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import create_fake_node, create_namespace, expected_image_id
from tests.harness.receiver import Receiver
from tests.harness.standin import KubeletStandin, Pod
from tests.harness.streams import read_stored
from tests.integration.test_e2e import HOOK_KEY, bare_pod, e2e_settings, play_scan_pod

pytestmark = pytest.mark.kube

CLUSTERS = ("east", "west", "north")
EVERYWHERE = "registry.example.com/fleet/base:1"
EAST_AND_WEST = "registry.example.com/fleet/api:2"
ONLY = {cluster: f"registry.example.com/fleet/{cluster}-only:1" for cluster in CLUSTERS}
# (pod, image) per cluster: the same pod names in every cluster, as fleets have.
PODS = {
    "east": [("base", EVERYWHERE), ("api", EAST_AND_WEST), ("own", ONLY["east"])],
    "west": [("base", EVERYWHERE), ("api", EAST_AND_WEST), ("own", ONLY["west"])],
    "north": [("base", EVERYWHERE), ("own", ONLY["north"])],
}


@pytest.fixture(scope="module")
def planes(kube: KubeControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, KubeControlPlane]]:
    """The session's control plane is east; west and north are started here, side by side (about 1 GB each)."""
    extra = {
        name: KubeControlPlane(bin_dir=kube.bin_dir, work_dir=Path(tmp_path_factory.mktemp(f"kube-{name}")))
        for name in CLUSTERS[1:]
    }
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(len(extra)) as pool:
            for started in [pool.submit(plane.start, 120.0) for plane in extra.values()]:
                started.result()
        print(f"fleet: {len(extra)} more control planes started in {time.monotonic() - began:.1f}s")
        yield {"east": kube, **extra}
    finally:
        for plane in extra.values():
            plane.stop()


@dataclass
class Member:
    """One cluster of the fleet: its API client and the stand-in that plays its scan pods."""

    name: str
    client: Kube
    standin: KubeletStandin | None = None
    scans: Counter[str] = field(default_factory=Counter)  # scan pods played, by pod name


@pytest.fixture
async def fleet(
    planes: dict[str, KubeControlPlane],
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[dict[str, Member], str, Receiver, list[replicas.Replica]]]:
    token = secrets.token_hex(3)
    jobs, apps = f"fleet-jobs-{token}", f"fleet-apps-{token}"  # the same names in every cluster
    receiver = Receiver(hmac_key=HOOK_KEY)
    await receiver.start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndefaults:\n  threshold: {max_critical: 0}\n  destinations: [hook]\ndestinations:\n"
        f'  - {{name: hook, kind: webhook, url: "{receiver.url}/hook", hmac_key: {{env: E2E_HOOK_KEY}}}}\n'
    )
    monkeypatch.setenv("E2E_HOOK_KEY", HOOK_KEY)
    logs = tmp_path / "logs"
    logs.mkdir()
    members: dict[str, Member] = {}
    running: list[replicas.Replica] = []
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    try:
        for name, plane in planes.items():
            client = await Kube.connect(str(plane.kubeconfig))
            for namespace in (jobs, apps):
                await create_namespace(client, namespace)
            await client.request(
                "POST",
                f"/api/v1/namespaces/{jobs}/serviceaccounts",
                body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
            )
            # The same node names in every cluster: a node is known by its cluster and its name.
            await asyncio.gather(*(create_fake_node(client, f"fleet-{token}-node-{i}") for i in range(2)))
            member = Member(name, client)
            scans = member.scans

            async def complete(pod: Pod, scans: Counter[str] = scans) -> None:
                await play_scan_pod(pod, scans)

            member.standin = KubeletStandin(
                client, tmp_path / f"standin-{name}", namespace=jobs, execute=False, on_complete=complete
            )
            await member.standin.start()
            members[name] = member
            settings = msgspec.structs.replace(
                # (traces off: the endpoint only satisfies e2e_settings, the telemetry is replaced here)
                e2e_settings(plane, jobs, apps, nats_settings, s3_settings, policy, "http://127.0.0.1:9"),
                cluster=name,
                telemetry=TelemetrySettings(),
            )
            for service in ("watcher", "dispatcher"):
                running.append(replicas.start(service, settings, logs / f"{service}-{name}.log"))
            if name == "east":  # the shared services: any cluster's settings, they talk to no API server
                for service in ("parser", "notifier"):
                    running.append(replicas.start(service, settings, logs / f"{service}.log"))
        yield members, apps, receiver, running
    finally:
        for replica in running:
            replica.stop()
        for member in members.values():
            if member.standin is not None:
                await member.standin.stop()
            await member.client.close()
        await receiver.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, running: list[replicas.Replica]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        for replica in running:
            if replica.proc.poll() is not None:
                raise AssertionError(f"{replica.name} exited with {replica.proc.returncode}:\n{replica.tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {r.log.name}\n{r.tail(1200)}" for r in running)
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")
        await asyncio.sleep(0.5)


async def test_three_clusters_scan_each_shared_digest_once_and_alert_every_clusters_owners(
    fleet: tuple[dict[str, Member], str, Receiver, list[replicas.Replica]],
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
) -> None:
    members, apps, receiver, running = fleet
    began = time.monotonic()
    token = apps.removeprefix("fleet-apps-")
    for name, pods in PODS.items():
        for i, (pod, image) in enumerate(pods):
            body = bare_pod(pod, image, f"fleet-{token}-node-{i % 2}")
            await members[name].client.request("POST", f"/api/v1/namespaces/{apps}/pods", body=body)
    refs = {image: expected_image_id(image, "app") for pods in PODS.values() for _, image in pods}
    # Every workload of the fleet, by cluster: each gets one alert naming its cluster.
    owners = {(name, pod, refs[image]) for name, pods in PODS.items() for pod, image in pods}

    def alerted() -> set[tuple[str, str, str]]:
        return {(a.cluster, a.workload.name, a.digest_ref) for a in alerts_of(receiver)}

    async def every_owner_alerted() -> bool:
        return alerted() >= owners

    await eventually(every_owner_alerted, 240, f"an alert for each of the {len(owners)} workloads", running)
    elapsed = time.monotonic() - began
    print(f"fleet: {len(refs)} digests, {len(owners)} workloads alerted {elapsed:.1f}s after the pods were created")

    assert alerted() == owners
    assert all(a.namespace == apps for a in alerts_of(receiver))
    assert len(alerts_of(receiver)) == len(owners), "one alert per workload"

    # Scanned once across the fleet: one scan Job (and pod) per digest, whichever cluster ran it.
    jobs_per_cluster = {name: sum(m.scans.values()) for name, m in members.items()}
    assert sum(jobs_per_cluster.values()) == len(refs), jobs_per_cluster
    assert all(n == 1 for m in members.values() for n in m.scans.values()), jobs_per_cluster
    stored = await read_stored(nats_settings)
    assert Counter(e.digest_ref for e in stored) == Counter(set(refs.values())), "one report.stored per digest"
    # A digest only one cluster runs was scanned there.
    scanned_in = {e.digest_ref: e.cluster for e in stored}
    for name in CLUSTERS:
        assert scanned_in[refs[ONLY[name]]] == name

    # Each cluster's workloads under its name: in WORKLOADS, in the index, in podsweep status.
    bus = await busmod.connect(nats_settings, "fleet-test")
    try:
        doc, _ = await busmod.kv_read(await bus.kv(WORKLOADS_BUCKET), digest_hex(refs[EVERYWHERE]), DigestWorkloads)
        assert doc is not None
        assert sorted((r.cluster or "", r.workload.name) for r in doc.runs) == [(c, "base") for c in sorted(CLUSTERS)]
        # A cluster that is not a digest's home notes its nodes in the state with its next sighting's write, which
        # may come after the alerts (they follow report.reached from the parser).
        statuses: list[statusmod.StatusReport] = []

        async def every_cluster_noted() -> bool:
            statuses.append(await statusmod.collect(bus))
            return statuses[-1].by_cluster == {"east": 3, "north": 2, "west": 3}

        await eventually(every_cluster_noted, 60, "podsweep status counting each cluster's digests", running)
        fleet_status = statuses[-1]
        assert fleet_status.digests == len(refs)
        west = await statusmod.collect(bus, "west", "east")
        assert (west.cluster, west.digests, west.by_state) == ("west", 3, {"done": 3})
    finally:
        await bus.close()

    store = ObjectStore(s3_settings)
    expected_index = {digest_hex(refs[EVERYWHERE]): sorted(CLUSTERS), digest_hex(refs[ONLY["west"]]): ["west"]}

    async def indexed() -> bool:
        data = await store.get_if_exists(storage.SUMMARY_KEY)
        if data is None:
            return False
        index = msgspec.json.decode(data, type=SummaryIndex)
        got = {h: index.digests[h].clusters for h in expected_index if h in index.digests}
        return got == expected_index

    await eventually(indexed, 60, "index/summary.json naming each digest's clusters", running)

    async def namespace_indexed() -> bool:
        data = await store.get_if_exists(storage.namespace_index_key(apps))
        if data is None:
            return False
        index = msgspec.json.decode(data, type=NamespaceIndex)
        return sorted((w.cluster or "", w.workload.name) for w in index.workloads) == sorted(
            (name, pod) for name, pods in PODS.items() for pod, _ in pods
        )

    await eventually(namespace_indexed, 60, f"index/namespaces/{apps}.json listing each cluster's workloads", running)


def alerts_of(receiver: Receiver) -> list[AlertPayload]:
    """Accepted, signature-checked alerts, one per idempotency key (a redelivery carries the same key)."""
    by_key: dict[str, AlertPayload] = {}
    for arrival in receiver.accepted("/hook"):
        assert arrival.verified, "a webhook arrived without a valid signature"
        by_key[arrival.key] = msgspec.json.decode(arrival.body, type=AlertPayload)
    return list(by_key.values())
