"""SBOM rescans end to end: real watcher, dispatcher and parser, the kubelet stand-in executing every Job's containers
with real Trivy against a real Trivy server, real NATS and S3.

Node scans store a report and an SBOM; after a new advisory reaches the Trivy server, `podsweep rescan` makes the
digests due and one unpinned batch Job rescans them from their SBOMs (no node Job); a digest scaled to zero is
rescanned until its time runs out; a bad SBOM upload is quarantined and that digest goes back to a node scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NatsSettings,
    ParserSettings,
    S3Settings,
    Settings,
    WatcherSettings,
)
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import jobs, storage, subjects
from schemas.events import ReportQuarantined, ReportStored, RescanAccepted
from schemas.refs import digest_hex
from schemas.report import Report
from schemas.state import SCANS_BUCKET, DigestScanState
from services.dispatcher import rescans
from services.dispatcher.cli import request_rescan
from services.dispatcher.main import main as dispatcher_main
from services.parser.main import main as parser_main
from services.watcher.main import main as watcher_main
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import create_fake_node, create_namespace, expected_image_id, wait_until
from tests.harness.rootfs import EXPECTED_FINDINGS, EXTRA_FINDINGS, FixtureKind, build_rootfs
from tests.harness.standin import ImageRoot, RootfsImage, StartStandin, scan_images
from tests.harness.trivy import BASE_ADVISORIES, EXTRA_ADVISORIES, TrivyServer

pytestmark = pytest.mark.kube

FAST = ConsumerSettings(max_deliver=20, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=10, batch=32, concurrency=8)
IMAGES = {
    "app": ("registry.example.com/team/app:1.0", FixtureKind.COMBINED),
    "worker": ("registry.example.com/team/worker:2.0", FixtureKind.NPM),
}
_report = msgspec.json.Decoder(Report)
_stored = msgspec.json.Decoder(ReportStored)
_quarantined = msgspec.json.Decoder(ReportQuarantined)


@dataclass
class World:
    settings: Settings
    bus: busmod.Bus
    store: ObjectStore
    kube_api: Kube
    workloads: str
    scans: str
    refs: dict[str, str]
    stored: list[ReportStored] = field(default_factory=list)
    quarantined: list[ReportQuarantined] = field(default_factory=list)

    async def state(self, name: str) -> DigestScanState | None:
        kv = await self.bus.kv(SCANS_BUCKET)
        found, _ = await busmod.kv_read(kv, digest_hex(self.refs[name]), DigestScanState)
        return found

    async def scan_jobs(self) -> list[dict[str, Any]]:
        listing = msgspec.json.decode(await self.kube_api.get(f"/apis/batch/v1/namespaces/{self.scans}/jobs"))
        return list(listing["items"])

    async def rescan(self, **selection: Any) -> RescanAccepted:
        request = rescans.rescan_request(
            cluster=self.settings.cluster,
            request_id=rescans.new_request_id(),
            digests=selection.get("digests", []),
            namespace=selection.get("namespace"),
            everything=selection.get("everything", False),
            requested_by="test",
            reason="trivy db updated",
            now=datetime.now(UTC),
        )
        answer = await request_rescan(self.settings, request, 20.0)
        assert answer is not None, "the dispatcher answers a rescan request"
        return answer

    async def scanned(self, name: str, seq: int, timeout_s: float = 60.0, sbom: bool = False) -> DigestScanState:
        """The digest's state once its `seq`-th scan is done (and, with `sbom`, the parser recorded its SBOM)."""

        async def check() -> DigestScanState | None:
            found = await self.state(name)
            if found is None or found.status != "done" or found.scan_seq < seq:
                return None
            return found if found.sbom_key is not None or not sbom else None

        return await wait_until(check, timeout_s, f"{name} scanned {seq} time(s)")

    def stored_for(self, name: str) -> list[ReportStored]:
        return [s for s in self.stored if s.digest_ref == self.refs[name]]


def _pod(name: str, node: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": image}]},
    }


@contextlib.asynccontextmanager
async def _running(
    *services: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]], settings: Settings
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service(settings, stop)) for service in services]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


@pytest.fixture
async def world(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    kubelet_standin: StartStandin,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    trivy_bin: Path,
    trivy_server: TrivyServer,
) -> AsyncIterator[World]:
    scans = f"scans-{secrets.token_hex(3)}"
    await create_namespace(kube_api, scans)
    await kube_api.request(
        "POST",
        f"/api/v1/namespaces/{scans}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
    )
    node = f"e2e-{secrets.token_hex(3)}"
    await create_fake_node(kube_api, node)
    refs = {name: expected_image_id(image, "main") for name, (image, _) in IMAGES.items()}
    images: dict[str, ImageRoot] = scan_images(trivy_bin)
    for name, (_, kind) in IMAGES.items():
        images[refs[name]] = RootfsImage(path=str(build_rootfs(kind)))
    await kubelet_standin(images, namespace=scans)
    settings = Settings(
        cluster="e2e",
        kubeconfig=str(kube.kubeconfig),
        namespace=scans,
        nats=nats_settings,
        s3=s3_settings,
        consumer=FAST,
        log_format="json",
        watcher=WatcherSettings(include_namespaces=[kube_namespace]),
        parser=ParserSettings(max_sbom_mb=1),
        dispatcher=msgspec.convert(
            {
                "trivy_server": trivy_server.url,
                "sweep_interval_s": 1.0,
                "claim_ttl_s": 20.0,
                "backoff_base_s": 0.5,
                "backoff_max_s": 1.0,
                "job_deadline_s": 120.0,
                "deadline_grace_s": 10.0,
                "max_created_per_minute": 600,
                "sbom_batch_window_s": 1.0,
                "rescan_gone_for_s": 25.0,
            },
            DispatcherSettings,
        ),
    )
    bus = await busmod.connect(nats_settings, "test")
    await busmod.ensure_stream(bus)
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    world = World(settings, bus, store, kube_api, kube_namespace, scans, refs)

    async def on_stored(msg: Any) -> None:
        world.stored.append(_stored.decode(msg.data))

    async def on_quarantined(msg: Any) -> None:
        world.quarantined.append(_quarantined.decode(msg.data))

    subs = [
        await bus.nc.subscribe(bus.subject(subjects.REPORT_STORED), cb=on_stored),
        await bus.nc.subscribe(bus.subject(subjects.REPORT_QUARANTINED), cb=on_quarantined),
    ]
    try:
        async with _running(watcher_main, dispatcher_main, parser_main, settings=settings):
            for name, (image, _) in IMAGES.items():
                await kube_api.request(
                    "POST", f"/api/v1/namespaces/{kube_namespace}/pods", body=_pod(name, node, image)
                )
            yield world
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await bus.close()
        await asyncio.to_thread(trivy_server.restart, (BASE_ADVISORIES,))


async def test_new_advisory_is_found_by_one_unpinned_batch_rescan_and_scaled_to_zero_stays_covered(
    world: World, trivy_server: TrivyServer
) -> None:
    # 1. Node scans, executed for real, store a report and an SBOM per digest.
    first = {name: await world.scanned(name, 1, timeout_s=90, sbom=True) for name in IMAGES}
    for name, done in first.items():
        assert done.sbom_key is not None, f"{name}: the parser recorded the scan's SBOM"
        assert done.sbom_trivy_version == "0.76.0"
    node_jobs = await world.scan_jobs()
    assert len(node_jobs) == 2
    assert all(j["spec"]["template"]["spec"].get("nodeName") for j in node_jobs), "first scans run on the node"
    report = _report.decode(await world.store.get(storage.latest_report_key(world.refs["app"])))
    found = {(f.package, f.id) for f in report.findings}
    assert {(e.package, e.vulnerability_id) for e in EXPECTED_FINDINGS[FixtureKind.COMBINED]} <= found
    assert report.counts.CRITICAL >= 1, "the critical fixture CVE is reported"
    sbom = gzip.decompress(await world.store.get(str(first["app"].sbom_key)))
    assert b'"bomFormat"' in sbom

    # 2. A new advisory reaches the Trivy server; `podsweep rescan --all` makes both digests due.
    await asyncio.to_thread(trivy_server.restart, (BASE_ADVISORIES, EXTRA_ADVISORIES))
    answer = await world.rescan(everything=True)
    assert answer.due == 2
    second = {name: await world.scanned(name, 2) for name in IMAGES}
    rescan_jobs = [j for j in await world.scan_jobs() if j["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "sbom"]
    assert len(await world.scan_jobs()) == 3, "one rescan Job and no new node Job"
    (batch,) = rescan_jobs
    pod_spec = batch["spec"]["template"]["spec"]
    assert "nodeName" not in pod_spec and "affinity" not in pod_spec, "the rescan Job is not pinned"
    images = {c["image"] for c in pod_spec["initContainers"] + pod_spec["containers"]}
    assert not images & set(world.refs.values()), "the rescan Job never names a target image"
    items = msgspec.json.decode(batch["metadata"]["annotations"][jobs.BATCH_ANNOTATION])
    assert {i["scan_id"] for i in items} == {second[n].scan_id for n in IMAGES}, "both digests in one batch"
    new_cve = next(iter(EXTRA_FINDINGS[FixtureKind.COMBINED]))

    async def stored_twice() -> bool | None:
        return True if all(len(world.stored_for(n)) >= 2 for n in IMAGES) else None

    await wait_until(stored_twice, 30, "report.stored for both rescans")
    for name in IMAGES:
        rescanned = world.stored_for(name)[-1]
        assert rescanned.mode == "sbom"
        assert [(f.id, f.package) for f in rescanned.new] == [(new_cve.vulnerability_id, new_cve.package)]
        assert rescanned.fixed == []
    latest = _report.decode(await world.store.get(storage.latest_report_key(world.refs["app"])))
    assert new_cve.vulnerability_id in {f.id for f in latest.findings}

    # 3. Scale the worker to zero: it is still rescanned from its SBOM, and its report says since when.
    await world.kube_api.request("DELETE", f"/api/v1/namespaces/{world.workloads}/pods/worker")

    async def gone() -> DigestScanState | None:
        found = await world.state("worker")
        return found if found is not None and found.not_running_since is not None else None

    stopped = await wait_until(gone, 30, "the worker's digest recorded as not running")
    answer = await world.rescan(digests=[world.refs["worker"]])
    assert answer.due == 1
    await world.scanned("worker", 3)
    await wait_until(lambda: _async(len(world.stored_for("worker")) >= 3 or None), 30, "report of the third scan")
    third = world.stored_for("worker")[-1]
    assert third.mode == "sbom"
    assert third.not_running_since == stopped.not_running_since
    worker_report = _report.decode(await world.store.get(storage.latest_report_key(world.refs["worker"])))
    assert worker_report.not_running_since == stopped.not_running_since

    # ... until the configured time (25 s here) runs out: then nothing is due any more.
    remaining = 25.0 - (datetime.now(UTC) - stopped.not_running_since).total_seconds()  # type: ignore[operator]
    await asyncio.sleep(max(remaining, 0) + 1)
    late = await world.rescan(digests=[world.refs["worker"]])
    assert late.due == 0
    every = await world.scan_jobs()
    node_mode = [j for j in every if j["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "node"]
    assert len(node_mode) == 2, "after the first scans, no node Job: every rescan came from an SBOM"
    assert len(every) == 4
    assert world.quarantined == []


async def _async(value: bool | None) -> bool | None:
    return value
