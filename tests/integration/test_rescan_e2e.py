"""SBOM rescans end to end: real watcher, dispatcher, parser and notifier, the kubelet stand-in executing every Job's
containers with real Trivy against a real Trivy server, real NATS and S3, and a real webhook receiver.

Node scans store a report and an SBOM and alert on the critical fixture CVE; after a new advisory reaches the Trivy
server, `podsweep rescan` makes the digests due and one unpinned batch Job rescans them from their SBOMs (no node
Job), each affected workload hears once about only the new finding and an unchanged digest stays quiet; a digest
scaled to zero is rescanned until its time runs out. With the DB watch on, the Trivy server moving to a newer DB is
enough: db.updated, SBOM rescans only, and exactly the affected owners alerted once. A bad SBOM upload (truncated, not CycloneDX, oversized) is
quarantined with its reason, the report of the same scan is stored, and that digest's next scan is a node scan.

Set PODSWEEP_WRITE_TRIVY_FIXTURES=1 to copy the Trivy output of the first test into tests/fixtures/trivy/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NatsSettings,
    NotifierSettings,
    ParserSettings,
    S3Settings,
    Settings,
    WatcherSettings,
)
from podsweep.kube import Kube
from podsweep.objectstore import ObjectStore
from schemas import jobs, storage, subjects
from schemas.alerts import AlertPayload
from schemas.events import DbUpdated, ReportQuarantined, ReportStored, RescanAccepted
from schemas.refs import digest_hex
from schemas.report import Report
from schemas.state import LIMITS_BUCKET, SCANS_BUCKET, VULNDB_KEY, DigestScanState, VulnDbSeen
from services.dispatcher import jobspec, rescans
from services.dispatcher.cli import request_rescan
from services.dispatcher.main import main as dispatcher_main
from services.notifier.main import main as notifier_main
from services.parser.main import main as parser_main
from services.watcher.main import main as watcher_main
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import create_fake_node, create_namespace, expected_image_id, wait_until
from tests.harness.receiver import Receiver
from tests.harness.replicas import in_process
from tests.harness.rootfs import EXPECTED_FINDINGS, EXTRA_FINDINGS, FixtureKind, build_rootfs
from tests.harness.standin import ImageRoot, KubeletStandin, LaunchPlan, RootfsImage, scan_images
from tests.harness.trivy import BASE_ADVISORIES, EXTRA_ADVISORIES, TrivyServer

pytestmark = pytest.mark.kube

FAST = ConsumerSettings(max_deliver=20, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=10, batch=32, concurrency=8)
HOOK_KEY = "rescan-hook-key-" + "y" * 24
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trivy"
# The new advisory (tests/fixtures/advisories/extra.json) matches lodash, in `app` and `worker` but not in `base`.
IMAGES = {
    "app": ("registry.example.com/team/app:1.0", FixtureKind.COMBINED),
    "worker": ("registry.example.com/team/worker:2.0", FixtureKind.NPM),
    "base": ("registry.example.com/team/base:3.19", FixtureKind.ALPINE),
}
MAX_SBOM_MB = 1
GONE_FOR_S = 15.0  # how long a digest no node runs is still rescanned from its SBOM
_report = msgspec.json.Decoder(Report)
_stored = msgspec.json.Decoder(ReportStored)
_quarantined = msgspec.json.Decoder(ReportQuarantined)
_alert = msgspec.json.Decoder(AlertPayload)
_db_updated = msgspec.json.Decoder(DbUpdated)
_SBOM_URL_KEY = re.compile(r"sbom/sha256/([0-9a-f]{64})/")  # in the upload URL's query (key=...)

# How an SBOM is damaged on the node before the uploader sends it: from the scan's `out` dir, the bytes to upload.
Damage = Callable[[Path], bytes]


def _sbom_file(out: Path) -> Path:
    return out / Path(jobspec.SBOM).name


def _truncated(out: Path) -> bytes:
    """Cut off half way, as a converter killed mid-write or a full emptyDir leaves it."""
    data = _sbom_file(out).read_bytes()
    return data[: len(data) // 2]


def _not_cyclonedx(out: Path) -> bytes:
    """The scan's own Trivy JSON report where the SBOM should be: valid JSON, real Trivy output, not CycloneDX."""
    return (out / Path(jobspec.REPORT).name).read_bytes()


def _oversized(out: Path) -> bytes:
    """The real SBOM, still valid CycloneDX, padded past the parser's cap (gzip makes the upload itself tiny)."""
    data = _sbom_file(out).read_bytes()
    return data[:1] + b" " * (MAX_SBOM_MB * 1024 * 1024) + data[1:]


class SbomDamagingStandin(KubeletStandin):
    """The kubelet stand-in, running every container of every Job for real, except that for the digests in `damage`
    it rewrites the SBOM `trivy convert` wrote into the pod's `out` emptyDir just before the uploader container
    starts, once per digest. So the bad SBOM travels the real path: presigned PUT by `podsweep upload`, the
    watcher's scan.completed, the parser's checks, the dispatcher's next plan."""

    def __init__(self, *args: Any, damage: Mapping[str, Damage], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.damage = dict(damage)  # digest hex -> how
        self.damaged: dict[str, bytes] = {}  # digest hex -> the bytes the uploader found

    async def _run_container(
        self, uid: str, plan: LaunchPlan, container_dir: Path, log_path: Path
    ) -> tuple[int, str | None]:
        found = _SBOM_URL_KEY.search(plan.env.get(jobspec.SBOM_URL_ENV, ""))
        if plan.argv[:2] == ["podsweep", "upload"] and found is not None and found.group(1) in self.damage:
            out = next(Path(v.source) for v in plan.volumes if v.target == jobspec.OUT_DIR)
            damaged = self.damage.pop(found.group(1))(out)
            _sbom_file(out).write_bytes(damaged)
            self.damaged[found.group(1)] = damaged
        return await super()._run_container(uid, plan, container_dir, log_path)


@dataclass
class World:
    settings: Settings
    bus: busmod.Bus
    store: ObjectStore
    kube_api: Kube
    standin: SbomDamagingStandin
    receiver: Receiver
    workloads: str
    scans: str
    node: str
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

        try:
            return await wait_until(check, timeout_s, f"{name} scanned {seq} time(s)")
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{self.standin.describe()[-6000:]}") from None

    def stored_for(self, name: str) -> list[ReportStored]:
        return [s for s in self.stored if s.digest_ref == self.refs[name]]

    async def stored_count(self, name: str, count: int, timeout_s: float = 30.0) -> list[ReportStored]:
        async def check() -> list[ReportStored] | None:
            found = self.stored_for(name)
            return found if len(found) >= count else None

        return await wait_until(check, timeout_s, f"{count} report.stored for {name}")

    def alerts(self, name: str) -> dict[str, AlertPayload]:
        """Signature-verified alerts about one workload, by idempotency key (a redelivery carries the same key)."""
        by_key: dict[str, AlertPayload] = {}
        for arrival in self.receiver.accepted("/hook"):
            assert arrival.verified, "a webhook arrived without a valid signature"
            payload = _alert.decode(arrival.body)
            if payload.workload.name == name:
                by_key[arrival.key] = payload
        return by_key

    async def alert_for_scan(self, name: str, scan_id: str, timeout_s: float = 30.0) -> AlertPayload:
        async def check() -> AlertPayload | None:
            return next((a for a in self.alerts(name).values() if a.scan_id == scan_id), None)

        return await wait_until(check, timeout_s, f"the alert about {name}'s scan {scan_id}")

    async def notifier_caught_up(self, timeout_s: float = 30.0) -> None:
        """Every report.stored so far decided, and every alert it queued delivered: nothing pending, nothing
        unacknowledged on the notifier's consumer nor on its outbox for the `hook` destination."""

        async def check() -> bool | None:
            for stream, durable in ((self.bus.events, "notifier"), (self.bus.outbox, "hook")):
                info = await self.bus.js.consumer_info(stream.name, durable)
                if info.num_pending or info.num_ack_pending:
                    return None
            return True

        await wait_until(check, timeout_s, "the notifier deciding every report.stored and delivering its alerts")


def _pod(name: str, node: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": image}]},
    }


class MakeWorld(Protocol):
    def __call__(
        self,
        images: Mapping[str, tuple[str, FixtureKind]],
        damage: Mapping[str, Damage] | None = None,
        dispatcher: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[World]: ...


@pytest.fixture
def make_world(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    trivy_bin: Path,
    trivy_server: TrivyServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> MakeWorld:
    """The four services in this process, a kwok node running one pod per image, a stand-in executing the Jobs;
    `damage` names (by pod) the digests whose first SBOM the stand-in spoils; `dispatcher` overrides its settings."""
    monkeypatch.setenv("RESCAN_HOOK_KEY", HOOK_KEY)  # the policy names the variable, never the key

    @contextlib.asynccontextmanager
    async def start(
        images: Mapping[str, tuple[str, FixtureKind]],
        damage: Mapping[str, Damage] | None = None,
        dispatcher: Mapping[str, Any] | None = None,
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
        refs = {name: expected_image_id(image, "main") for name, (image, _) in images.items()}
        roots: dict[str, ImageRoot] = scan_images(trivy_bin)
        for name, (_, kind) in images.items():
            roots[refs[name]] = RootfsImage(path=str(build_rootfs(kind)))
        standin = SbomDamagingStandin(
            kube_api,
            tmp_path / f"standin-{scans}",
            roots,
            namespace=scans,
            damage={digest_hex(refs[name]): how for name, how in (damage or {}).items()},
        )
        await standin.start()
        receiver = Receiver(hmac_key=HOOK_KEY)
        await receiver.start()
        policy = tmp_path / f"policy-{scans}.yaml"
        policy.write_text(
            "version: 1\ndefaults:\n  threshold: {max_critical: 0, max_high: 0}\n  destinations: [hook]\n"
            f'destinations:\n  - {{name: hook, kind: webhook, url: "{receiver.url}/hook", '
            "hmac_key: {env: RESCAN_HOOK_KEY}}\n"
        )
        settings = Settings(
            cluster="e2e",
            kubeconfig=str(kube.kubeconfig),
            namespace=scans,
            nats=nats_settings,
            s3=s3_settings,
            consumer=FAST,
            log_format="json",
            watcher=WatcherSettings(include_namespaces=[kube_namespace]),
            parser=ParserSettings(max_sbom_mb=MAX_SBOM_MB),
            notifier=NotifierSettings(
                policy_file=str(policy),
                workloads_wait_deliveries=5,
                workloads_wait_s=0.5,
                retry_base_s=0.2,
                retry_cap_s=1.0,
                outbox_ack_wait_s=8.0,
            ),
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
                    "max_active_per_node": 4,  # every pod here is on one node: scan them at once
                    "sbom_batch_window_s": 1.0,
                    "rescan_gone_for_s": GONE_FOR_S,
                    "vulndb_poll_s": 0.0,  # rescans here come from `podsweep rescan` unless a test says otherwise
                    **(dispatcher or {}),
                },
                DispatcherSettings,
            ),
        )
        bus = await busmod.connect(nats_settings, "test")
        await busmod.ensure_stream(bus)
        store = ObjectStore(s3_settings)
        await store.ensure_bucket()
        world = World(settings, bus, store, kube_api, standin, receiver, kube_namespace, scans, node, refs)

        async def on_stored(msg: Any) -> None:
            world.stored.append(_stored.decode(msg.data))

        async def on_quarantined(msg: Any) -> None:
            world.quarantined.append(_quarantined.decode(msg.data))

        subs = [
            await bus.nc.subscribe(bus.subject(subjects.REPORT_STORED), cb=on_stored),
            await bus.nc.subscribe(bus.subject(subjects.REPORT_QUARANTINED), cb=on_quarantined),
        ]
        try:
            async with in_process(watcher_main, dispatcher_main, parser_main, notifier_main, settings=settings):
                for name, (image, _) in images.items():
                    await kube_api.request(
                        "POST", f"/api/v1/namespaces/{kube_namespace}/pods", body=_pod(name, node, image)
                    )
                yield world
        finally:
            for sub in subs:
                await sub.unsubscribe()
            await bus.close()
            await standin.stop()
            await receiver.stop()

    return start


def _new_findings(alert: AlertPayload) -> list[tuple[str, str, str]]:
    return [(f.id, f.package, f.installed_version) for f in alert.findings if f.new]


async def test_new_advisory_is_found_by_one_unpinned_batch_rescan_alerted_once_and_scaled_to_zero_stays_covered(
    make_world: MakeWorld, trivy_server: TrivyServer
) -> None:
    async with make_world(IMAGES) as world:
        try:
            await _new_advisory_rescan(world, trivy_server)
        finally:
            await asyncio.to_thread(trivy_server.restart, (BASE_ADVISORIES,))


async def _new_advisory_rescan(world: World, trivy_server: TrivyServer) -> None:
    # 1. Node scans, executed for real, store a report and an SBOM per digest, and alert each breaching workload.
    first = {name: await world.scanned(name, 1, timeout_s=90, sbom=True) for name in IMAGES}
    for name, done in first.items():
        assert done.sbom_key is not None, f"{name}: the dispatcher recorded the SBOM report.stored named"
        assert done.sbom_trivy_version == "0.76.0"
    node_jobs = await world.scan_jobs()
    assert len(node_jobs) == len(IMAGES)
    assert all(j["spec"]["template"]["spec"].get("nodeName") == world.node for j in node_jobs), "first scans: node"
    report = _report.decode(await world.store.get(storage.latest_report_key(world.refs["app"])))
    found = {(f.package, f.id) for f in report.findings}
    assert {(e.package, e.vulnerability_id) for e in EXPECTED_FINDINGS[FixtureKind.COMBINED]} <= found
    assert report.counts.CRITICAL >= 1, "the critical fixture CVE is reported"
    sbom = gzip.decompress(await world.store.get(str(first["app"].sbom_key)))
    assert b'"bomFormat"' in sbom

    critical = {e.vulnerability_id for e in EXPECTED_FINDINGS[FixtureKind.COMBINED] if e.severity == "CRITICAL"}
    first_alerts = {name: await world.alert_for_scan(name, str(first[name].scan_id)) for name in IMAGES}
    app_alert = first_alerts["app"]
    assert (app_alert.digest_ref, app_alert.namespace, app_alert.workload.kind) == (
        world.refs["app"],
        world.workloads,
        "Pod",
    )
    assert {f.id for f in app_alert.findings if f.severity == "CRITICAL"} == critical
    listed = [f for f in app_alert.findings if f.severity == "CRITICAL"]
    assert len(listed) == app_alert.counts.CRITICAL, "every counted critical finding is listed"
    for name, alert in first_alerts.items():
        assert alert.new_count == len(alert.findings), f"{name}: on the first report every finding is new"

    # 2. A new advisory reaches the Trivy server; `podsweep rescan --all` makes every digest due.
    await asyncio.to_thread(trivy_server.restart, (BASE_ADVISORIES, EXTRA_ADVISORIES))
    answer = await world.rescan(everything=True)
    assert answer.due == len(IMAGES)
    second = {name: await world.scanned(name, 2) for name in IMAGES}
    every = await world.scan_jobs()
    rescan_jobs = [j for j in every if j["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "sbom"]
    assert len(every) == len(IMAGES) + 1, "one rescan Job and no new node Job"
    (batch,) = rescan_jobs
    pod_spec = batch["spec"]["template"]["spec"]
    assert "nodeName" not in pod_spec and "affinity" not in pod_spec, "the rescan Job is not pinned"
    images = {c["image"] for c in pod_spec["initContainers"] + pod_spec["containers"]}
    assert not images & set(world.refs.values()), "the rescan Job never names a target image"
    items = msgspec.json.decode(batch["metadata"]["annotations"][jobs.BATCH_ANNOTATION])
    assert {i["scan_id"] for i in items} == {second[n].scan_id for n in IMAGES}, "every digest in one batch"
    new_cve = next(iter(EXTRA_FINDINGS[FixtureKind.COMBINED]))
    new_finding = (new_cve.vulnerability_id, new_cve.package, new_cve.installed_version)

    for name in IMAGES:
        rescanned = (await world.stored_count(name, 2))[-1]
        assert rescanned.mode == "sbom"
        expected_new = [(new_cve.vulnerability_id, new_cve.package)] if name != "base" else []
        assert [(f.id, f.package) for f in rescanned.new] == expected_new, name
        assert rescanned.fixed == []
    latest = _report.decode(await world.store.get(storage.latest_report_key(world.refs["app"])))
    assert new_cve.vulnerability_id in {f.id for f in latest.findings}

    # ... and each affected workload hears about the new finding, and only about it.
    for name in ("app", "worker"):
        alert = await world.alert_for_scan(name, str(second[name].scan_id))
        assert _new_findings(alert) == [new_finding], f"{name}: the rescan's alert names only the new finding"
        assert alert.new_count == 1
        assert len(alert.findings) == len(first_alerts[name].findings) + 1, "the others still listed, not as new"
    await _write_fixtures(world, first["app"], second["app"], sbom)

    # 3. Scale the worker to zero: it is still rescanned from its SBOM, and its report says since when.
    await world.kube_api.request("DELETE", f"/api/v1/namespaces/{world.workloads}/pods/worker")

    async def gone() -> DigestScanState | None:
        found = await world.state("worker")
        return found if found is not None and found.not_running_since is not None else None

    stopped = await wait_until(gone, 30, "the worker's digest recorded as not running")
    since = stopped.not_running_since
    assert since is not None
    answer = await world.rescan(digests=[world.refs["worker"]])
    assert answer.due == 1
    await world.scanned("worker", 3)
    third = (await world.stored_count("worker", 3))[-1]
    assert third.mode == "sbom"
    assert third.not_running_since == since
    worker_report = _report.decode(await world.store.get(storage.latest_report_key(world.refs["worker"])))
    assert worker_report.not_running_since == since
    page = (await world.store.get(storage.digest_page_key(world.refs["worker"]))).decode()
    assert f"not running since {since.astimezone(UTC):%Y-%m-%d %H:%M} UTC" in page, "the digest page says since when"

    # ... until the configured time runs out: then nothing is due any more.
    remaining = GONE_FOR_S - (datetime.now(UTC) - since).total_seconds()
    await asyncio.sleep(max(remaining, 0) + 1)
    late = await world.rescan(digests=[world.refs["worker"]])
    assert late.due == 0
    every = await world.scan_jobs()
    node_mode = [j for j in every if j["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "node"]
    assert len(node_mode) == len(IMAGES), "after the first scans, no node Job: every rescan came from an SBOM"
    assert len(every) == len(IMAGES) + 2
    assert world.quarantined == []

    # Exactly one alert per affected workload per report with something new; none for the unchanged digest.
    await world.notifier_caught_up()
    assert {name: len(world.alerts(name)) for name in IMAGES} == {"app": 2, "worker": 2, "base": 1}
    assert {a.scan_id for a in world.alerts("base").values()} == {first["base"].scan_id}
    keys = [arrival.key for arrival in world.receiver.accepted("/hook")]
    assert len(keys) == len(set(keys)) == 5, "no alert was delivered twice (nothing was killed in this run)"


async def _write_fixtures(world: World, first: DigestScanState, second: DigestScanState, sbom: bytes) -> None:
    """With PODSWEEP_WRITE_TRIVY_FIXTURES=1: the node scan's report, its converted SBOM and the SBOM rescan's report
    of `app`, as the Job's containers wrote them (the uploads, gunzipped), become parser fixtures."""
    if os.environ.get("PODSWEEP_WRITE_TRIVY_FIXTURES") != "1":
        return
    for state, name in (
        (first, "trivy-0.76-node-scan-combined.json"),
        (second, "trivy-0.76-sbom-rescan-combined.json"),
    ):
        upload = await world.store.get(storage.raw_key(world.refs["app"], str(state.scan_id)))
        (FIXTURES / name).write_bytes(gzip.decompress(upload))
    (FIXTURES / "trivy-0.76-combined.cdx.json").write_bytes(sbom)


# How each pod's first SBOM is spoiled, and the kind the parser must name.
BAD_SBOMS: dict[str, tuple[Damage, str]] = {
    "truncated": (_truncated, "truncated"),
    "not-cyclonedx": (_not_cyclonedx, "not-cyclonedx"),
    "oversized": (_oversized, "oversized"),
}


async def test_bad_sbom_upload_is_quarantined_with_its_reason_and_the_digest_goes_back_to_a_node_scan(
    make_world: MakeWorld,
) -> None:
    images = {name: (f"registry.example.com/team/{name}:1.0", FixtureKind.ALPINE) for name in BAD_SBOMS}
    async with make_world(images, damage={name: how for name, (how, _) in BAD_SBOMS.items()}) as world:
        first = {name: await world.scanned(name, 1, timeout_s=90) for name in images}

        async def all_quarantined() -> list[ReportQuarantined] | None:
            return list(world.quarantined) if len(world.quarantined) >= len(images) else None

        quarantined = {q.digest_ref: q for q in await wait_until(all_quarantined, 30, "a quarantine per bad SBOM")}
        for name, (_, kind) in BAD_SBOMS.items():
            ref, state = world.refs[name], first[name]
            uploaded = world.standin.damaged[digest_hex(ref)]
            q = quarantined[ref]
            assert (q.object, q.kind, q.scan_id) == ("sbom", kind, state.scan_id), name
            assert q.source_key == storage.sbom_key(ref, str(state.scan_id))
            assert q.quarantine_key == storage.quarantine_sbom_key(str(state.scan_id))
            assert gzip.decompress(await world.store.get(q.quarantine_key)) == uploaded, "kept as the node sent it"
            error = (await world.store.get(q.error_key)).decode()
            assert f"kind: {kind}\n" in error and f"reason: {q.reason}\n" in error, error
            assert state.sbom_key is None, f"{name}: no usable SBOM is recorded"
            assert await world.store.get_if_exists(storage.latest_sbom_key(ref)) is None
            (stored,) = await world.stored_count(name, 1)
            assert stored.scan_id == state.scan_id, f"{name}: the findings report of the same scan is stored"
            report = _report.decode(await world.store.get(storage.latest_report_key(ref)))
            found = {(f.package, f.id) for f in report.findings}
            assert found == {(e.package, e.vulnerability_id) for e in EXPECTED_FINDINGS[FixtureKind.ALPINE]}
        assert str(MAX_SBOM_MB * 1024 * 1024) in quarantined[world.refs["oversized"]].reason, "the reason names the cap"

        # Their next due scan is a node scan on the node that runs them: no rescan Job from a bad SBOM.
        answer = await world.rescan(everything=True)
        assert answer.due == len(images)
        second = {name: await world.scanned(name, 2, timeout_s=90, sbom=True) for name in images}
        every = await world.scan_jobs()
        assert [j["metadata"]["annotations"][jobs.MODE_ANNOTATION] for j in every] == ["node"] * 2 * len(images)
        assert {j["spec"]["template"]["spec"].get("nodeName") for j in every} == {world.node}
        # This time the stand-in left the SBOMs alone: kept, so the digests' next rescans can come from them.
        assert all(second[name].sbom_key is not None for name in images)
        assert len(world.quarantined) == len(images), "nothing else was quarantined"


async def test_a_newer_trivy_db_rescans_from_sboms_with_no_command_and_alerts_exactly_the_affected_owners(
    make_world: MakeWorld, trivy_server: TrivyServer
) -> None:
    async with make_world(IMAGES, dispatcher={"vulndb_poll_s": 0.5}) as world:
        updates: list[DbUpdated] = []

        async def on_updated(msg: Any) -> None:
            updates.append(_db_updated.decode(msg.data))

        sub = await world.bus.nc.subscribe(world.bus.subject(subjects.DB_UPDATED), cb=on_updated)
        try:
            await _db_update_rescans(world, trivy_server, updates)
        finally:
            await sub.unsubscribe()
            await asyncio.to_thread(trivy_server.restart, (BASE_ADVISORIES,))


async def _db_update_rescans(world: World, trivy_server: TrivyServer, updates: list[DbUpdated]) -> None:
    # 1. Node scans on DB v1 store a report and an SBOM per digest; the leader has recorded the DB it saw.
    first = {name: await world.scanned(name, 1, timeout_s=90, sbom=True) for name in IMAGES}
    for name in IMAGES:
        await world.alert_for_scan(name, str(first[name].scan_id))
    limits = await world.bus.kv(LIMITS_BUCKET)

    async def recorded() -> VulnDbSeen | None:
        return (await busmod.kv_read(limits, VULNDB_KEY, VulnDbSeen))[0]

    v1 = await wait_until(recorded, 30, "the dispatcher recording the Trivy server's DB")
    assert updates == [], "the first DB seen is recorded, not announced"

    # 2. The server moves to v2 (one advisory more: lodash CVE-2020-28500), and nobody types a command.
    v2_at = datetime.now(UTC).replace(microsecond=0)
    await asyncio.to_thread(trivy_server.restart, (BASE_ADVISORIES, EXTRA_ADVISORIES), v2_at)

    async def announced() -> DbUpdated | None:
        return updates[0] if updates else None

    update = await wait_until(announced, 30, "db.updated after the server's DB changed")
    assert (update.previous_updated_at, update.updated_at) == (v1.updated_at, v2_at)
    assert (update.cluster, update.schema_version, update.trivy_version) == ("e2e", 2, "0.76.0")

    second = {name: await world.scanned(name, 2) for name in IMAGES}
    every = await world.scan_jobs()
    node_jobs = [j for j in every if j["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "node"]
    rescan_jobs = [j for j in every if j["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "sbom"]
    assert len(node_jobs) == len(IMAGES), "no node Job after the first scans"
    assert 1 <= len(rescan_jobs) <= len(IMAGES)
    rescanned = {
        i["scan_id"]
        for j in rescan_jobs
        for i in msgspec.json.decode(j["metadata"]["annotations"][jobs.BATCH_ANNOTATION])
    }
    assert rescanned == {second[n].scan_id for n in IMAGES}
    for job in rescan_jobs:
        pod_spec = job["spec"]["template"]["spec"]
        names = [c["name"] for c in pod_spec["initContainers"] + pod_spec["containers"]]
        assert names == ["install-trivy", "rescan"], "one container scans the whole batch"

    # 3. Exactly the digests with lodash gain the CVE; their owners hear of it once, the other owner not at all.
    new_cve = next(iter(EXTRA_FINDINGS[FixtureKind.COMBINED]))
    affected = {"app", "worker"}
    for name in IMAGES:
        stored = (await world.stored_count(name, 2))[-1]
        assert stored.mode == "sbom" and stored.scan_id == second[name].scan_id
        latest = _report.decode(await world.store.get(storage.latest_report_key(world.refs[name])))
        assert (new_cve.vulnerability_id in {f.id for f in latest.findings}) == (name in affected), name
    for name in affected:
        alert = await world.alert_for_scan(name, str(second[name].scan_id))
        assert [f[0] for f in _new_findings(alert)] == [new_cve.vulnerability_id], name
    await world.notifier_caught_up()
    assert {name: len(world.alerts(name)) for name in IMAGES} == {"app": 2, "worker": 2, "base": 1}
    assert len(updates) == 1, "one DB update, announced once"
