"""podsweep on a three-server JetStream cluster (R3) that loses a server mid-run, and on an S3 that does.

The four services run as their own processes (`podsweep run <name>`), each as its own NATS user from the deployed
accounts.conf, with `nats.replicas: 3` (tests/harness/jscluster.py). The kubelet stand-in plays the scan pods: it
uploads a real Trivy 0.76 report to the Job's POST URL as `podsweep upload` does (its own retries, its own policy).
What is checked is the outcome only: one Job per digest, one stored report and one report.stored per digest, one
alert per digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
import pytest

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings, Settings, load_settings
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import storage
from schemas.alerts import AlertPayload
from schemas.events import DeadLetter
from services.dispatcher import main as dispatcher_main
from services.dispatcher import upload
from services.dispatcher.jobspec import RAW_URL_ENV
from tests.harness import deployed, replicas
from tests.harness.jscluster import HUB_DOMAIN, NatsCluster, start_cluster, start_leaf
from tests.harness.kube import KubeControlPlane, locate_binaries
from tests.harness.kwok import bare_pod, create_fake_node, create_scan_namespaces, expected_image_id
from tests.harness.receiver import Receiver, signed_alerts, write_hook_policy
from tests.harness.replicas import eventually
from tests.harness.scanpod import upload_env, upload_key
from tests.harness.standin import KubeletStandin, Pod
from tests.harness.streams import read_stored

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
REPORT = (REPO / "tests/fixtures/trivy/trivy-0.76-alpine.json").read_bytes()
HOOK_KEY = "jscluster-hook-key-" + "x" * 24
SERVICES = ("watcher", "dispatcher", "parser", "notifier")
_DIGEST_IN_KEY = re.compile(r"raw/sha256/([0-9a-f]{64})/")
_ids = itertools.count(1)


@dataclass
class World:
    kube: KubeControlPlane
    client: Kube
    settings: Settings
    jobs: str
    apps: str
    nodes: list[str]
    receiver: Receiver
    standin: KubeletStandin
    store: ObjectStore
    logs: Path
    passwords: dict[str, str]
    uploads: Uploads
    running: dict[str, replicas.Replica] = field(default_factory=dict)
    nats_for: dict[str, dict[str, str]] = field(default_factory=dict)  # service -> NatsSettings fields of its own

    @property
    def puts(self) -> Counter[str]:
        return self.uploads.done

    def service_settings(self, service: str) -> Settings:
        """The world's settings as `service`'s own NATS user (its password from the cluster's accounts), and where
        it connects when that is not where the others do (`nats_for`)."""
        if service not in self.passwords:
            return self.settings
        nats = msgspec.structs.replace(self.settings.nats, user=service, password=self.passwords[service])
        nats = msgspec.structs.replace(nats, **self.nats_for.get(service, {}))
        return msgspec.structs.replace(self.settings, nats=nats)

    def start(self, service: str) -> None:
        settings = self.service_settings(service)
        self.running[service] = replicas.start(service, settings, self.logs / f"{service}.log")

    def tails(self) -> str:
        return replicas.tails(self.running)

    def alerts(self) -> dict[str, list[AlertPayload]]:
        return signed_alerts(self.receiver)

    async def create_pods(self, count: int, tag: str) -> set[str]:
        """`count` bare pods, each its own image, spread over the nodes; their digest refs."""
        images = [f"registry.example.com/{tag}/app-{i}:1.{i}" for i in range(count)]

        async def create(i: int) -> None:
            body = bare_pod(f"{tag}-{i}", images[i], self.nodes[i % len(self.nodes)])
            await self.client.request("POST", f"/api/v1/namespaces/{self.apps}/pods", body=body)

        await asyncio.gather(*(create(i) for i in range(count)))
        refs = {expected_image_id(image, "app") for image in images}
        assert len(refs) == count
        return refs

    async def scan_jobs(self) -> list[str]:
        path = f"/apis/batch/v1/namespaces/{self.jobs}/jobs"
        listed = msgspec.json.decode(await self.client.request("GET", path))
        return [item["metadata"]["name"] for item in listed["items"]]

    async def check_once_each(self, refs: set[str]) -> None:
        """One Job, one upload, one stored report, one report.stored and one alert per digest."""
        mine = {ref.rsplit(":", 1)[1] for ref in refs}
        assert len(await self.scan_jobs()) == len(refs), "Jobs created must equal the digests"
        assert dict(self.puts) == dict.fromkeys(mine, 1), self.puts.most_common(3)
        for ref in sorted(refs):
            assert await self.store.get_if_exists(storage.latest_report_key(ref)) is not None, ref
        by_digest = Counter(a[0].digest_ref for a in self.alerts().values())
        assert by_digest == Counter(refs), by_digest.most_common(3)
        stored = await read_stored(self.service_settings("harness").nats)  # the harness's user, when there is one
        assert Counter(e.digest_ref for e in stored) == Counter(refs), "report.stored must be once per digest"


class Gate:
    """How many scan pods may finish so far: the test lets them through a few at a time."""

    def __init__(self, allowed: int = 0) -> None:
        self.allowed = allowed
        self.taken = 0
        self.changed = asyncio.Condition()

    def allow(self, more: int) -> None:
        self.allowed += more
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def turn(self) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.taken < self.allowed)
            self.taken += 1


@dataclass
class Uploads:
    """The scan pods' uploads: begun, done (by digest hex), and attempts that got no HTTP answer at all."""

    gate: Gate
    begun: int = 0
    unanswered: int = 0
    done: Counter[str] = field(default_factory=Counter)

    async def scan_pod(self, pod: Pod) -> None:
        """The scan pod's upload container, once the gate lets it: `podsweep upload`'s own send with its own
        default retry policy (an S3 that is away for a while is waited for), of the gzipped report to the Job's
        POST URL."""
        await self.gate.turn()
        self.begun += 1
        target = upload.UploadTarget(path="/podsweep/out/report.json", url=upload_env(pod)[RAW_URL_ENV])
        body = gzip.compress(REPORT, mtime=0)
        uploads = self

        class Counting(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                try:
                    return super().handle_request(request)
                except httpx.TransportError:
                    uploads.unanswered += 1
                    raise

        def send() -> bool:
            policy = upload.RetryPolicy()
            with httpx.Client(timeout=policy.timeout_s, transport=Counting()) as client:
                return upload.put(client, target, body, policy)

        assert await asyncio.to_thread(send), f"{pod.metadata.name}: the upload failed after its retries"
        found = _DIGEST_IN_KEY.match(upload_key(pod, RAW_URL_ENV))
        assert found is not None
        self.done[found.group(1)] += 1


@contextlib.asynccontextmanager
async def make_world(
    kube: KubeControlPlane,
    client: Kube,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nats: NatsSettings,
    s3: S3Settings,
    passwords: dict[str, str],
    gate: Gate,
) -> AsyncIterator[World]:
    """The namespaces, nodes, stand-in and webhook receiver; services start with `world.start`. `passwords`: the NATS
    users of a cluster with the deployed accounts (empty: every service uses `nats` as it is)."""
    n = next(_ids)
    jobs, apps = f"jsc-jobs-{n}", f"jsc-apps-{n}"
    await create_scan_namespaces(client, jobs, apps)
    nodes = [f"jsc-{n}-node-{i}" for i in range(4)]
    await asyncio.gather(*(create_fake_node(client, name) for name in nodes))
    receiver = Receiver(hmac_key=HOOK_KEY)
    await receiver.start()
    policy = write_hook_policy(tmp_path / "policy.yaml", receiver, "JSC_HOOK_KEY")
    monkeypatch.setenv("JSC_HOOK_KEY", HOOK_KEY)  # the services' processes inherit it
    # cluster: what the deployed accounts.conf is generated for (a named cluster: docs/deploy.md)
    settings = replicas.fast_settings("default", kube.kubeconfig, jobs, apps, nats, s3, policy)
    store = ObjectStore(s3)
    await store.ensure_bucket()
    uploads = Uploads(gate)
    standin = KubeletStandin(
        client,
        tmp_path / "standin",
        namespace=jobs,
        execute=False,
        parallel_pods=16,
        on_complete=uploads.scan_pod,
    )
    await standin.start()
    logs = tmp_path / "logs"
    logs.mkdir()
    world = World(kube, client, settings, jobs, apps, nodes, receiver, standin, store, logs, passwords, uploads)
    try:
        yield world
    finally:
        for replica in world.running.values():
            replica.stop()
        await standin.stop()
        await receiver.stop()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    cluster = await start_cluster(tmp_path / "nats")
    try:
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------


async def test_losing_the_stream_leader_then_the_scans_bucket_leader_scans_stores_and_alerts_each_digest_once(
    kube: KubeControlPlane,
    kube_api: Kube,
    nats_cluster: NatsCluster,
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of the server leading PODSWEEP while scans run and new pods arrive, restarted once another leads it;
    then the same with the server leading the scan states' bucket. Scan pods finish only when the test lets them, so
    each loss happens with work in flight on both sides of it."""
    nats = NatsSettings(url=nats_cluster.url, replicas=3, duplicate_window_s=120)
    gate = Gate()
    async with make_world(
        kube, kube_api, tmp_path, monkeypatch, nats, s3_settings, nats_cluster.passwords, gate
    ) as world:
        for service in SERVICES:
            world.start(service)
        refs = await world.create_pods(10, "jsc-a")
        scans_bucket = f"KV_{nats.kv_prefix}-scans"
        for target, more in ((nats.stream, "jsc-b"), (scans_bucket, "")):
            done = len(world.puts)
            gate.allow(4)
            await eventually(
                lambda n=done + 4: len(world.puts) >= n, 180, f"4 more scans before losing {target}", world
            )
            assert await nats_cluster.replicas(target) == 3
            leader = await nats_cluster.leader(target)
            nats_cluster.kill(leader)
            if more:  # pods seen, claimed and scanned while the stream has no leader, or a new one
                refs |= await world.create_pods(10, more)
            gate.allow(4)
            assert await nats_cluster.new_leader(target, leader) != leader
            await eventually(lambda n=done + 8: len(world.puts) >= n, 180, f"4 scans after losing {target}", world)
            nats_cluster.restart(leader)
            await nats_cluster.wait_current(leader)
        gate.allow(len(refs))

        async def every_digest_alerted() -> bool:
            return {a[0].digest_ref for a in world.alerts().values()} >= refs

        await eventually(every_digest_alerted, 300, f"an alert for each of the {len(refs)} digests", world)
        await world.check_once_each(refs)
        for service in SERVICES:  # each one stayed up through both leader moves (no restart hid a failure)
            assert world.running[service].proc.poll() is None, world.running[service].tail()


async def test_a_clusters_services_on_a_leaf_server_and_the_shared_ones_on_the_hub_scan_store_and_alert_once(
    kube: KubeControlPlane, kube_api: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_settings: S3Settings
) -> None:
    """The hub: three servers (R3) taking leaf connections as deploy/nats-leaf/hub-leafnodes.conf says, JetStream
    domain `hub`. The leaf: deploy/nats-leaf/leaf.conf with its generated accounts.conf, no JetStream. The watcher and
    the dispatcher connect to the leaf (nats.domain: hub), the parser and the notifier to the hub."""
    hub = await start_cluster(tmp_path / "hub", leafnodes=True)
    leaf = None
    try:
        leaf = await start_leaf(tmp_path / "leaf", hub)
        nats = NatsSettings(url=hub.url, replicas=3, duplicate_window_s=120)
        gate = Gate(allowed=1000)
        async with make_world(kube, kube_api, tmp_path, monkeypatch, nats, s3_settings, hub.passwords, gate) as world:
            for service in ("watcher", "dispatcher"):
                world.nats_for[service] = {"url": leaf.url, "domain": HUB_DOMAIN}
            for service in SERVICES:
                world.start(service)
            refs = await world.create_pods(6, "leaf")

            async def every_digest_alerted() -> bool:
                return {a[0].digest_ref for a in world.alerts().values()} >= refs

            await eventually(every_digest_alerted, 180, f"an alert for each of the {len(refs)} digests", world)
            await world.check_once_each(refs)
            assert await hub.replicas(f"KV_{nats.kv_prefix}-scans") == 3  # the dispatcher's bucket, made from the leaf
    finally:
        if leaf is not None and leaf.proc is not None:
            leaf.proc.kill()
            leaf.proc.wait(10)
        hub.stop()


async def test_seaweedfs_killed_during_uploads_and_restarted_on_its_data_loses_no_report(
    kube: KubeControlPlane,
    kube_api: Kube,
    nats_settings: NatsSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of SeaweedFS between scan pods' uploads, restarted on the same data directory once an upload found it gone:
    the uploads are retried by `podsweep upload` itself, the parser's reads and writes by botocore and then by its
    consumer's redelivery; every report is stored, once, and nothing already stored is lost."""
    data = tmp_path / "seaweedfs"
    seaweed = embedded.start_seaweedfs(data)
    s3 = S3Settings(
        endpoint_url=seaweed.endpoint_url,
        bucket="podsweep-s3-kill",
        access_key_id=seaweed.identity.access_key_id,
        secret_access_key=seaweed.identity.secret_access_key,
    )
    gate = Gate()
    try:
        async with make_world(kube, kube_api, tmp_path, monkeypatch, nats_settings, s3, {}, gate) as world:
            for service in SERVICES:
                world.start(service)
            refs = await world.create_pods(12, "s3kill")
            gate.allow(4)
            await eventually(lambda: len(world.puts) >= 4, 180, "4 reports uploaded", world)

            await eventually(
                lambda: len(world.alerts()) >= 1, 120, "a report stored and alerted before the kill", world
            )
            # kill -9 between the batches of uploads, then let the next ones start: each finds S3 gone and tries
            # again (letting them start first raced them: at times every upload ended before the kill).
            seaweed.process.proc.kill()
            seaweed.process.proc.wait(10)
            gate.allow(4)
            await eventually(lambda: world.uploads.unanswered >= 1, 60, "an upload finding S3 gone", world)
            seaweed = await asyncio.to_thread(embedded.start_seaweedfs, data, int(s3.endpoint_url.rsplit(":", 1)[1]))
            gate.allow(len(refs))

            async def every_digest_alerted() -> bool:
                return {a[0].digest_ref for a in world.alerts().values()} >= refs

            await eventually(every_digest_alerted, 300, f"an alert for each of the {len(refs)} digests", world)
            await world.check_once_each(refs)
    finally:
        seaweed.stop()


async def test_the_prod_cluster_overlay_runs_r3_and_keeps_publishing_when_a_server_is_killed(
    tmp_path: Path,
) -> None:
    """overlays/prod-cluster (prod with deploy/components/nats-cluster) run as rendered: the three servers from the
    StatefulSet's command (its routes and cluster listener remapped to loopback, TLS as prod), a service from its
    rendered settings (PODSWEEP_NATS_REPLICAS from the component) declares R3 streams and buckets, and publishes on
    while the stream's leader is killed."""
    rendered = deployed.kustomize(locate_binaries() / "kubectl", "overlays/prod-cluster")
    statefulset = rendered.workload("StatefulSet", "nats")
    assert statefulset.spec.replicas == 3
    ports = [(embedded.free_port(), embedded.free_port()) for _ in range(3)]
    remap = deployed.Remap(
        addresses={
            "nats.podsweep.svc:4222": f"127.0.0.1:{ports[0][0]}",
            **{f"nats-{i}.nats-headless.podsweep.svc:6222": f"127.0.0.1:{route}" for i, (_, route) in enumerate(ports)},
        },
        secret_values=deployed.nats_tls_values(),
    )
    servers: list[replicas.Replica] = []
    try:
        for i, (client, route) in enumerate(ports):
            root = tmp_path / f"nats-{i}"
            config = deployed.pod_process(rendered, "StatefulSet", "nats", root, remap, pod_name=f"nats-{i}")
            argv = [deployed.binary("nats-server"), *config.argv[1:], "--addr", "127.0.0.1", "--port", str(client)]
            argv += ["--http_port", str(embedded.free_port()), "--cluster", f"nats://127.0.0.1:{route}"]
            env = {**deployed.base_environment(root), **config.env}
            servers.append(deployed.spawn(f"nats-{i}", argv, env, root / "nats.log", root))
        service = deployed.pod_process(rendered, "Deployment", "dispatcher", tmp_path / "dispatcher", remap)
        settings = load_settings(environ=service.env).nats
        assert settings.replicas == 3
        every_server = ",".join(f"tls://127.0.0.1:{client}" for client, _ in ports)
        settings = msgspec.structs.replace(settings, url=every_server)
        bus = await busmod.connect(settings, "dispatcher", dispatcher_main.NATS)
        try:
            deadline = time.monotonic() + 90
            while True:  # the meta leader is elected once the three found each other
                try:
                    await busmod.ensure_stream(bus)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            await bus.kv("scans")
            for stream in (settings.stream, f"KV_{settings.kv_prefix}-scans"):
                info = await bus.js.stream_info(stream)
                assert info.config.num_replicas == 3, stream
            info = await bus.js.stream_info(settings.stream)
            assert info.cluster is not None and info.cluster.leader is not None
            leader = next(p for p in servers if p.name == info.cluster.leader)
            leader.kill()
            letter = DeadLetter(
                service="dispatcher", subject="x", stream_seq=1, deliveries=1, error="e", payload=b"", failed_at=_now()
            )
            assert await bus.publish("dead.dispatcher", letter, msg_id="after-the-leader-died")
            moved = await bus.js.stream_info(settings.stream)
            assert moved.cluster is not None and moved.cluster.leader not in (None, leader.name)
        finally:
            await bus.close()
    finally:
        for process in servers:
            process.stop(grace_s=2.0)


def _now() -> datetime:
    return datetime.now(UTC)
