"""End to end: the four services as their own processes against the harness control plane, real NATS and S3.

The one part that cannot run here is a scan pod on a real node: the kubelet stand-in plays it by PUTting a real Trivy
0.76 report to the presigned URL the dispatcher put in the Job, then completing the pod. Everything else is podsweep:
the watcher sees the pods and the Jobs, the dispatcher creates the Jobs, the parser stores the reports, the notifier
signs and sends the webhooks. Traces go to a real OTLP/HTTP receiver on loopback, so "one trace" is checked on what
the four processes exported, not on what they meant to.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from podsweep.config import NatsSettings, S3Settings, Settings, TelemetrySettings
from podsweep.embedded import free_port
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import storage
from services.dispatcher.jobspec import RAW_URL_ENV
from tests.harness import replicas
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import bare_pod, create_fake_node, create_scan_namespaces, expected_image_id, pinned_deployment
from tests.harness.receiver import Receiver, signed_alerts, write_hook_policy
from tests.harness.replicas import eventually
from tests.harness.scanpod import send_uploads
from tests.harness.standin import KubeletStandin, Pod
from tests.harness.streams import read_stored

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
REPORT = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-alpine.json").read_bytes(), mtime=0)
HOOK_KEY = "e2e-hook-key-" + "x" * 24
SERVICES = ("watcher", "dispatcher", "parser", "notifier")
_ids = itertools.count(1)


# ---------------------------------------------------------------------------------------------------------------
# A real OTLP/HTTP trace receiver


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


@dataclass
class TraceReceiver:
    port: int = field(default_factory=free_port)
    spans: list[Span] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Span(service, span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex())
                    )
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


# ---------------------------------------------------------------------------------------------------------------
# The world: namespaces, nodes, the stand-in, four service processes


@dataclass
class World:
    kube: KubeControlPlane
    client: Kube
    settings: Settings
    apps: str
    nodes: list[str]
    receiver: Receiver
    traces: TraceReceiver
    standin: KubeletStandin
    store: ObjectStore
    logs: Path
    running: dict[str, replicas.Replica] = field(default_factory=dict)
    pod_puts: Counter[str] = field(default_factory=Counter)

    def start(self, service: str, metrics_port: int = 0) -> None:
        telemetry = msgspec.structs.replace(self.settings.telemetry, metrics_port=metrics_port)
        settings = msgspec.structs.replace(self.settings, telemetry=telemetry)
        self.running[service] = replicas.start(service, settings, self.logs / f"{service}.log")

    def kill(self, service: str) -> None:
        """kill -9: no drain, no flush, no goodbye."""
        self.running[service].kill()

    def tails(self) -> str:
        return replicas.tails(self.running)


async def play_scan_pod(pod: Pod, puts: Counter[str]) -> None:
    """What the scan pod's upload container does on a real node: send the report to the Job's upload URL."""
    await send_uploads(pod, {RAW_URL_ENV: REPORT})
    puts[pod.metadata.name] += 1


def e2e_settings(
    kube: KubeControlPlane, jobs: str, apps: str, nats: NatsSettings, s3: S3Settings, policy: Path, otlp: str
) -> Settings:
    settings = replicas.fast_settings("e2e", kube.kubeconfig, jobs, apps, nats, s3, policy)
    return msgspec.structs.replace(settings, telemetry=TelemetrySettings(traces="otlp", otlp_endpoint=otlp))


@pytest.fixture
async def world(
    kube: KubeControlPlane,
    kube_api: Kube,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[World]:
    n = next(_ids)
    jobs, apps = f"e2e-jobs-{n}", f"e2e-apps-{n}"
    await create_scan_namespaces(kube_api, jobs, apps)
    nodes = [f"e2e-{n}-node-{i}" for i in range(8)]
    await asyncio.gather(*(create_fake_node(kube_api, name) for name in nodes))
    receiver = Receiver(hmac_key=HOOK_KEY)
    traces = TraceReceiver()
    await receiver.start()
    await traces.start()
    policy = write_hook_policy(tmp_path / "policy.yaml", receiver, "E2E_HOOK_KEY")
    monkeypatch.setenv("E2E_HOOK_KEY", HOOK_KEY)  # the services' processes inherit it; it is never in Settings
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export spans every 200 ms, not every 5 s
    settings = e2e_settings(kube, jobs, apps, nats_settings, s3_settings, policy, traces.url)
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    puts: Counter[str] = Counter()

    async def complete(pod: Pod) -> None:
        await play_scan_pod(pod, puts)

    standin = KubeletStandin(
        kube_api, tmp_path / "standin", namespace=jobs, execute=False, parallel_pods=16, on_complete=complete
    )
    await standin.start()
    logs = tmp_path / "logs"
    logs.mkdir()
    world = World(kube, kube_api, settings, apps, nodes, receiver, traces, standin, store, logs, pod_puts=puts)
    try:
        yield world
    finally:
        for replica in world.running.values():
            replica.stop()
        await standin.stop()
        await receiver.stop()
        await traces.stop()


# ---------------------------------------------------------------------------------------------------------------
# Tests


async def test_a_deployment_on_kwok_nodes_ends_in_one_signed_alert_and_one_trace(world: World) -> None:
    parser_metrics = free_port()
    for service in SERVICES:
        world.start(service, metrics_port=parser_metrics if service == "parser" else 0)
    image = "registry.example.com/e2e/web:1.0"
    deployment = pinned_deployment("web", image, world.nodes[0], container="web")
    await world.client.request("POST", f"/apis/apps/v1/namespaces/{world.apps}/deployments", body=deployment)
    digest_ref = expected_image_id(image, "web")

    async def alerted() -> bool:
        return bool(signed_alerts(world.receiver))

    await eventually(alerted, 120, "the webhook alert", world)
    [[alert]] = signed_alerts(world.receiver).values()
    assert (alert.digest_ref, alert.namespace, alert.workload.kind, alert.workload.name) == (
        digest_ref,
        world.apps,
        "Deployment",
        "web",
    )
    assert alert.counts.CRITICAL >= 1
    report = msgspec.json.decode(await world.store.get(storage.latest_report_key(digest_ref)))
    assert report["digest_ref"] == digest_ref
    assert sum(world.pod_puts.values()) == 1, "two replicas of one digest on one node must be scanned once"

    # Findings by severity per image, as the parser's Prometheus endpoint shows them.
    repository, digest = digest_ref.split("@")
    scraped = ""

    async def scrape() -> bool:  # consumer lag is read every few seconds: the chain can finish before the first
        nonlocal scraped
        async with httpx.AsyncClient() as client:
            scraped = (await client.get(f"http://127.0.0.1:{parser_metrics}/metrics")).text
        return "podsweep_consumer_pending{" in scraped and 'service="parser"' in scraped

    await eventually(scrape, 30, "the parser's consumer lag on /metrics", world)
    wanted = (f'digest="{digest}"', f'repository="{repository}"', 'severity="CRITICAL"')
    critical = [
        float(line.rsplit(" ", 1)[1])
        for line in scraped.splitlines()
        if line.startswith("podsweep_image_vulnerabilities{") and all(label in line for label in wanted)
    ]
    assert len(critical) == 2 and sum(critical) == alert.counts.CRITICAL, scraped[-3000:]  # fixable and not
    durations = [line for line in scraped.splitlines() if line.startswith("podsweep_scan_duration_seconds_count{")]
    assert durations and float(durations[0].rsplit(" ", 1)[1]) == 1, scraped[-3000:]
    lag = [line for line in scraped.splitlines() if line.startswith("podsweep_consumer_pending{")]
    assert any('service="parser"' in line for line in lag), scraped[-3000:]

    # What the alert rules read (deploy/prometheus): readiness checks, the NATS connection, S3 calls by outcome.
    def sample(prefix: str, *labels: str) -> list[float]:
        return [
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith(prefix + "{") and all(label in line for label in labels)
        ]

    assert sample("podsweep_ready", 'check="parser:consuming"') == [1.0], scraped[-3000:]
    assert sample("podsweep_nats_connected", 'service="parser"') == [1.0], scraped[-3000:]
    assert sum(sample("podsweep_s3_requests_total", 'operation="PutObject"', 'outcome="ok"')) >= 1, scraped[-3000:]
    assert sample("podsweep_s3_requests_total", 'outcome="error"') == [], scraped[-3000:]

    # One trace from the watcher's image.seen to the notifier's alert.sent, across the four processes.
    async def exported() -> bool:
        return any(s.name == "publish alert.sent" for s in world.traces.spans)

    await eventually(exported, 30, "the notifier's alert.sent span", world)
    sent = next(s for s in world.traces.spans if s.name == "publish alert.sent")
    chain = world.traces.trace(sent.trace_id)
    names = {s.name for s in chain}
    for step in ("publish image.seen", "create scan Job", "publish scan.completed", "publish report.stored"):
        assert step in names, f"{step!r} is not in the alert's trace: {sorted(names)}"
    assert {s.service for s in chain} == {f"podsweep-{s}" for s in SERVICES}, {s.service for s in chain}
    ids = {s.span_id for s in chain}
    roots = [s for s in chain if not s.parent_id]
    assert [r.name for r in roots] == ["publish image.seen"], roots
    orphans = [s.name for s in chain if s.parent_id and s.parent_id not in ids]
    assert not orphans, f"spans whose parent never arrived: {orphans}"


async def test_kill_9_of_each_service_during_a_200_digest_run_loses_and_duplicates_nothing(world: World) -> None:
    for service in SERVICES:
        world.start(service)
    count = 200
    images = [f"registry.example.com/e2e/app-{i}:1.{i}" for i in range(count)]
    refs = {expected_image_id(image, "app") for image in images}
    assert len(refs) == count

    async def create(i: int) -> None:
        body = bare_pod(f"app-{i}", images[i], world.nodes[i % len(world.nodes)])
        await world.client.request("POST", f"/api/v1/namespaces/{world.apps}/pods", body=body)

    await asyncio.gather(*(create(i) for i in range(count)))

    # Each service in turn, at a point where it has work in flight, then restarted at once.
    def scanned() -> int:
        return len(world.pod_puts)

    def alerted() -> int:
        return len(signed_alerts(world.receiver))

    kills = (("watcher", scanned, 10), ("dispatcher", scanned, 50), ("parser", scanned, 90), ("notifier", alerted, 60))
    for service, progress, at in kills:

        async def reached(progress: Callable[[], int] = progress, at: int = at) -> bool:
            return progress() >= at

        await eventually(reached, 180, f"progress {at} before killing the {service}", world)
        assert progress() < count, f"the run finished before the {service} could be killed in flight"
        world.kill(service)
        world.start(service)

    async def every_digest_alerted() -> bool:
        return {a[0].digest_ref for a in signed_alerts(world.receiver).values()} >= refs

    await eventually(every_digest_alerted, 300, f"an alert for each of the {count} digests", world)

    # Nothing lost: a stored report per digest. Nothing duplicated: one scan pod per digest, one alert per digest.
    for ref in sorted(refs):
        assert await world.store.get_if_exists(storage.latest_report_key(ref)) is not None, ref
    assert len(world.pod_puts) == count and set(world.pod_puts.values()) == {1}, world.pod_puts.most_common(3)
    by_digest = Counter(a[0].digest_ref for a in signed_alerts(world.receiver).values())
    assert set(by_digest) == refs and set(by_digest.values()) == {1}, by_digest.most_common(3)
    # A redelivery after a kill carries the same key, so receivers dedupe.
    for key, copies in signed_alerts(world.receiver).items():
        assert {c.id for c in copies} == {key}, "the idempotency key and the alert's id disagree"
        assert len({(c.scan_id, c.namespace, c.workload, tuple(f.id for f in c.findings)) for c in copies}) == 1, key
    stored = await read_stored(world.settings.nats)
    assert Counter(e.digest_ref for e in stored) == Counter(refs), "report.stored must be once per digest"
