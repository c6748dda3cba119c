"""A live cluster as a new user meets it (issue 26): nodes that join and leave while podsweep runs, scan pods the API
server refuses, and scan pods that complete without uploading.

The watcher, the dispatcher and the parser run as their own processes against the harness control plane
(apiserver, controller-manager with the job and pod GC controllers, scheduler, kwok) with real NATS and S3. The
kubelet stand-in plays the scan pods: it sends a real Trivy report to the Job's upload URL, or, where a test says
so, completes the pod without uploading anything, or keeps it running.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep import preflight, progress
from podsweep import status as statusmod
from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NatsSettings,
    ParserSettings,
    S3Settings,
    Settings,
    WatcherSettings,
)
from podsweep.kube import Kube, KubeError
from podsweep.objectstore import ObjectStore
from schemas import jobs, storage, subjects
from schemas.events import ScanFailed
from schemas.refs import digest_hex
from schemas.state import SCANS_BUCKET, DigestScanState
from services.dispatcher.jobspec import RAW_URL_ENV
from tests.harness import replicas
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import create_fake_node, create_namespace, expected_image_id, wait_until
from tests.harness.scanpod import send_uploads, upload_key
from tests.harness.standin import KubeletStandin, Pod
from tests.harness.streams import stored_messages

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
REPORT = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-alpine.json").read_bytes(), mtime=0)
SERVICES = ("watcher", "dispatcher", "parser")
FAST = ConsumerSettings(max_deliver=30, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=5, batch=32, concurrency=8)
MAX_ACTIVE = 3
_ids = itertools.count(1)

Work = Callable[[Pod], Awaitable[None]]


@dataclass
class LiveJobs:
    """Every scan Job in the namespace that has not finished, from a watch: the most there ever were at once."""

    client: Kube
    namespace: str
    live: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)
    most: int = 0
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        params: dict[str, str | int | bool] = {"labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}"}
        listing = msgspec.json.decode(await self.client.get(path, params))
        assert not listing["items"], "a fresh namespace holds no scan Job"
        ready = asyncio.Event()

        async def follow() -> None:
            rv = listing["metadata"]["resourceVersion"]
            while True:
                query = {**params, "resourceVersion": rv, "timeoutSeconds": 60, "allowWatchBookmarks": True}
                ready.set()
                async for line in self.client.watch(path, query, 90):
                    event = msgspec.json.decode(line)
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    conditions = obj.get("status", {}).get("conditions") or []
                    done = any(
                        c["status"] == "True" and c["type"] in ("Complete", "Failed", "SuccessCriteriaMet")
                        for c in conditions
                    )
                    if event["type"] == "DELETED" or done:
                        self.live.discard(name)
                    else:
                        self.live.add(name)
                        self.created.add(name)
                        self.most = max(self.most, len(self.live))

        self._task = asyncio.create_task(follow())
        await ready.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Cluster:
    client: Kube
    settings: Settings
    jobs: str
    apps: str
    nodes: list[str]
    store: ObjectStore
    logs: Path
    live_jobs: LiveJobs
    work: dict[str, Work]  # image digest ref -> what its scan pod does (default: upload the report)
    running: dict[str, replicas.Replica] = field(default_factory=dict)
    puts: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        for service in SERVICES:
            self.running[service] = replicas.start(service, self.settings, self.logs / f"{service}.log")

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{replica.tail(2500)}" for name, replica in self.running.items())

    async def eventually(self, check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not await check():
            for name, replica in self.running.items():
                if replica.proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {replica.proc.returncode}:\n{replica.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.tails()}")
            await asyncio.sleep(0.25)

    async def state(self, ref: str) -> DigestScanState | None:
        bus = await busmod.connect(self.settings.nats, "test")
        try:
            return (await busmod.kv_read(await bus.kv(SCANS_BUCKET), digest_hex(ref), DigestScanState))[0]
        finally:
            await bus.close()

    async def run_pod(self, name: str, image: str, node: str) -> str:
        """A bare pod running `image` on `node`; returns the digest kwok reports for it."""
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": image}]},
        }
        await self.client.request("POST", f"/api/v1/namespaces/{self.apps}/pods", body=body)
        return expected_image_id(image, "app")

    async def scan_failures(self, ref: str) -> list[ScanFailed]:
        """Every scan.failed stored for the digest (read up to the last one stored when the read starts)."""
        bus = await busmod.connect(self.settings.nats, "test")
        found: list[ScanFailed] = []
        try:
            for msg in await stored_messages(bus.js, bus.settings.stream, bus.subject(subjects.SCAN_FAILED)):
                event = msgspec.json.decode(msg.data, type=ScanFailed)
                if event.digest_ref == ref:
                    found.append(event)
        finally:
            await bus.close()
        return found


async def upload(pod: Pod, puts: dict[str, int]) -> None:
    """What the scan pod's upload container does on a real node: send the report to the Job's upload URL."""
    await send_uploads(pod, {RAW_URL_ENV: REPORT})
    puts[pod.metadata.name] = puts.get(pod.metadata.name, 0) + 1


def cluster_settings(
    kube: KubeControlPlane, jobs_ns: str, apps: str, nats: NatsSettings, s3: S3Settings, **dispatcher: Any
) -> Settings:
    section = {
        "sweep_interval_s": 1.0,
        "claim_ttl_s": 10.0,
        "leader_lease_s": 3.0,
        "backoff_base_s": 0.5,
        "backoff_max_s": 2.0,
        "max_active": MAX_ACTIVE,
        "max_active_per_node": 2,
        "max_created_per_minute": 6000,
        "job_deadline_s": 300.0,
        "sbom": False,
        "trivy_image": "registry.example.com/aquasec/trivy:0.76.0",
        "podsweep_image": "registry.example.com/podsweep/podsweep:test",
        **dispatcher,
    }
    return Settings(
        cluster="live",
        kubeconfig=str(kube.kubeconfig),
        namespace=jobs_ns,
        nats=nats,
        s3=s3,
        consumer=FAST,
        log_format="json",
        watcher=WatcherSettings(include_namespaces=[apps]),
        dispatcher=msgspec.convert(section, DispatcherSettings),
        parser=msgspec.convert({"index_flush_s": 0.5, "missing_retries": 2, "missing_retry_s": 0.5}, ParserSettings),
    )


@pytest.fixture
async def make_cluster(
    kube: KubeControlPlane,
    kube_api: Kube,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    made: list[tuple[Cluster, KubeletStandin]] = []

    async def make(*, service_account: bool = True, node_count: int = 2) -> Cluster:
        n = next(_ids)
        jobs_ns, apps = f"live-jobs-{n}", f"live-apps-{n}"
        for namespace in (jobs_ns, apps):
            await create_namespace(kube_api, namespace)
        if service_account:
            await kube_api.request(
                "POST",
                f"/api/v1/namespaces/{jobs_ns}/serviceaccounts",
                body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
            )
        nodes = [f"live-{n}-node-{i}" for i in range(node_count)]
        await asyncio.gather(*(create_fake_node(kube_api, name) for name in nodes))
        store = ObjectStore(s3_settings)
        await store.ensure_bucket()
        logs = tmp_path / f"logs-{n}"
        logs.mkdir()
        live = LiveJobs(kube_api, jobs_ns)
        await live.start()
        settings = cluster_settings(kube, jobs_ns, apps, nats_settings, s3_settings)
        cluster = Cluster(kube_api, settings, jobs_ns, apps, nodes, store, logs, live, work={})

        async def complete(pod: Pod) -> None:
            key = upload_key(pod, RAW_URL_ENV)
            work = next(
                (w for ref, w in cluster.work.items() if key.startswith(f"raw/sha256/{digest_hex(ref)}/")), None
            )
            if work is None:
                await upload(pod, cluster.puts)
            else:
                await work(pod)

        standin = KubeletStandin(
            kube_api, tmp_path / f"standin-{n}", namespace=jobs_ns, execute=False, parallel_pods=8, on_complete=complete
        )
        await standin.start()
        made.append((cluster, standin))
        return cluster

    try:
        yield make
    finally:
        for cluster, standin in made:
            for replica in cluster.running.values():
                replica.stop()
            await standin.stop()
            await cluster.live_jobs.stop()


async def _job_gone(client: Kube, namespace: str, name: str) -> bool:
    try:
        await client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    except KubeError as exc:
        if exc.status == 404:
            return True
        raise
    return False


# ---------------------------------------------------------------------------------------------------------------
# Nodes that join and leave while podsweep runs


async def test_a_node_that_joins_while_podsweep_runs_gets_its_scan_and_one_deleted_under_a_scan_fails_it_as_gone(
    make_cluster: Callable[..., Awaitable[Cluster]], kube_api: Kube
) -> None:
    cluster = await make_cluster()
    cluster.start()
    first = await cluster.run_pod("first", "registry.example.com/live/first:1", cluster.nodes[0])

    async def scanned(ref: str) -> bool:
        state = await cluster.state(ref)
        return state is not None and state.status == "done"

    await cluster.eventually(lambda: scanned(first), 120, "the first digest scanned")  # every service is up

    # A node that joins now, and a pod on it: scanned like any other, never "gone".
    joined = f"{cluster.nodes[0]}-joined"
    await create_fake_node(kube_api, joined)
    late = await cluster.run_pod("late", "registry.example.com/live/late:1", joined)
    await cluster.eventually(lambda: scanned(late), 120, "the digest on the node that joined scanned")
    assert await cluster.scan_failures(late) == [], "a node that joined after the watcher started is not gone"

    # A node deleted while a scan runs on it: the scan fails as NodeGone, and its Job is deleted.
    leaving = f"{cluster.nodes[0]}-leaving"
    await create_fake_node(kube_api, leaving)
    held = asyncio.Event()

    async def hold(pod: Pod) -> None:
        held.set()
        await asyncio.Event().wait()  # runs until the node's deletion takes the pod away

    stranded_image = "registry.example.com/live/stranded:1"
    stranded = expected_image_id(stranded_image, "app")
    cluster.work[stranded] = hold
    await cluster.run_pod("stranded", stranded_image, leaving)

    async def scan_running() -> bool:
        return held.is_set()

    await cluster.eventually(scan_running, 120, "the scan pod running on the node about to leave")
    state = await cluster.state(stranded)
    assert state is not None and state.scan_id is not None
    job = state.scan_id
    await kube_api.request("DELETE", f"/api/v1/nodes/{leaving}")

    async def failed_as_gone() -> bool:
        return any(f.reason == "NodeGone" for f in await cluster.scan_failures(stranded))

    await cluster.eventually(failed_as_gone, 120, "scan.failed NodeGone for the deleted node")
    [gone] = await cluster.scan_failures(stranded)
    # From the node watch's DELETED event, at once: not from the pod garbage collector, 40 s later.
    assert gone.message == "the scan's node no longer exists", gone.message
    await cluster.eventually(lambda: _job_gone(kube_api, cluster.jobs, job), 60, "the given-up Job deleted")
    assert cluster.live_jobs.most <= MAX_ACTIVE


# ---------------------------------------------------------------------------------------------------------------
# Scan pods the API server refuses


async def _no_service_account(client: Kube, cluster: Cluster) -> Callable[[], Awaitable[None]]:
    async def fix() -> None:
        await client.request(
            "POST",
            f"/api/v1/namespaces/{cluster.jobs}/serviceaccounts",
            body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
        )

    return fix


async def _quota_forbids_pods(client: Kube, cluster: Cluster) -> Callable[[], Awaitable[None]]:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    await client.request("POST", f"/api/v1/namespaces/{cluster.jobs}/resourcequotas", body=quota)

    async def fix() -> None:
        await client.request("DELETE", f"/api/v1/namespaces/{cluster.jobs}/resourcequotas/no-pods")

    return fix


async def _restricted_pod_security(client: Kube, cluster: Cluster) -> Callable[[], Awaitable[None]]:
    async def label(level: str) -> None:
        await client.request(
            "PATCH",
            f"/api/v1/namespaces/{cluster.jobs}",
            body={"metadata": {"labels": {"pod-security.kubernetes.io/enforce": level}}},
            content_type="application/merge-patch+json",
        )

    await label("restricted")

    async def fix() -> None:
        await label("baseline")

    return fix


@pytest.mark.parametrize(
    ("setup", "service_account", "expected"),
    [
        pytest.param(
            _no_service_account,
            False,
            'is forbidden: error looking up service account {ns}/scan: serviceaccount "scan" not found',
            id="no-scan-service-account",
        ),
        pytest.param(
            _quota_forbids_pods,
            True,
            "is forbidden: exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0",
            id="quota-forbids-pods",
        ),
        pytest.param(
            _restricted_pod_security,
            True,
            'is forbidden: violates PodSecurity "restricted:latest"',
            id="pod-security-restricted",
        ),
    ],
)
async def test_refused_scan_pods_fail_with_the_api_servers_reason_hold_new_jobs_and_leave_none_behind(
    make_cluster: Callable[..., Awaitable[Cluster]],
    kube_api: Kube,
    setup: Callable[[Kube, Cluster], Awaitable[Callable[[], Awaitable[None]]]],
    service_account: bool,
    expected: str,
) -> None:
    cluster = await make_cluster(service_account=service_account)
    fix = await setup(kube_api, cluster)
    cluster.start()
    refs = [
        await cluster.run_pod(f"app-{i}", f"registry.example.com/live/app-{i}:1", cluster.nodes[i % 2])
        for i in range(2 * MAX_ACTIVE)
    ]
    wanted = expected.format(ns=cluster.jobs)

    async def refused() -> bool:
        states = [await cluster.state(ref) for ref in refs]
        return sum(1 for s in states if s is not None and "PodCreateRejected: " in s.reason) >= 1

    await cluster.eventually(refused, 120, "a scan failed as PodCreateRejected")
    states = [
        s for s in [await cluster.state(ref) for ref in refs] if s is not None and "PodCreateRejected" in s.reason
    ]
    for state in states:
        assert state.status == "failed"
        assert state.reason.startswith("PodCreateRejected: Error creating: pods "), state.reason
        assert wanted in state.reason, state.reason
    failures = [f for ref in refs for f in await cluster.scan_failures(ref) if f.reason == "PodCreateRejected"]
    assert failures and all(wanted in f.message for f in failures)
    # The states are there: one `podsweep status` pass over the bucket must count them (bus.kv_documents).
    bus = await busmod.connect(cluster.settings.nats, "test")
    try:
        report = await statusmod.collect(bus)
    finally:
        await bus.close()
    assert report.failed_by_reason.get("PodCreateRejected", 0) >= 1, report
    line, _ = progress.line(report, progress.Sweep(), 1.0, "")
    assert line is not None and "PodCreateRejected" in line, line

    # The refusal is the namespace's: podsweep says so once, then tries one Job at a time; none are left behind.
    dispatcher_log = cluster.running["dispatcher"]

    async def probed_again() -> bool:
        text = dispatcher_log.log.read_text(errors="replace")
        return "scan pods still refused" in text

    await cluster.eventually(probed_again, 60, "a probe refused again")
    text = dispatcher_log.log.read_text(errors="replace")
    assert text.count("scan pods are refused by the API server") == 1, text[-3000:]
    assert cluster.live_jobs.most <= MAX_ACTIVE, f"{cluster.live_jobs.most} live scan Jobs at once"

    async def at_most_a_probe_left() -> bool:
        return len(cluster.live_jobs.live) <= 1

    await cluster.eventually(at_most_a_probe_left, 60, "every refused Job deleted")

    # Once the cause is fixed, the next probe's pod is created and every digest is scanned.
    await fix()

    async def all_scanned() -> bool:
        states = [await cluster.state(ref) for ref in refs]
        return all(s is not None and s.status == "done" for s in states)

    await cluster.eventually(all_scanned, 180, "every digest scanned once the cause was fixed")
    assert "scan pods are accepted again" in dispatcher_log.log.read_text(errors="replace")
    assert cluster.live_jobs.most <= MAX_ACTIVE, f"{cluster.live_jobs.most} live scan Jobs at once"


# ---------------------------------------------------------------------------------------------------------------
# Scan pods that complete without uploading


async def test_a_scan_pod_that_completes_without_uploading_is_a_failed_scan_retried_and_said_alike_everywhere(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    cluster = await make_cluster()
    silent_image = "registry.example.com/live/silent:1"
    silent = expected_image_id(silent_image, "app")
    attempts: list[str] = []

    async def complete_without_uploading(pod: Pod) -> None:
        attempts.append(pod.metadata.name)
        if len(attempts) >= 3:  # the third attempt uploads: the retry ends the story
            await upload(pod, cluster.puts)

    cluster.work[silent] = complete_without_uploading
    cluster.start()
    await cluster.run_pod("silent", silent_image, cluster.nodes[0])

    async def failed_missing() -> bool:
        state = await cluster.state(silent)
        return state is not None and state.status == "failed" and "ReportMissing" in state.reason

    await cluster.eventually(failed_missing, 120, "the scan failed as ReportMissing")
    state = await cluster.state(silent)
    assert state is not None
    assert state.reason.startswith("attempt 1 failed with ReportMissing on node "), state.reason
    assert f"no object at raw/sha256/{digest_hex(silent)}/" in state.reason, state.reason

    # `podsweep status`, the progress line and the index say the same of this digest.
    bus = await busmod.connect(cluster.settings.nats, "test")
    try:
        report = await statusmod.collect(bus)
    finally:
        await bus.close()
    assert report.by_state.get("done", 0) == 0 and report.by_state.get("failed") == 1
    assert report.failed_by_reason == {"ReportMissing": 1}
    [failure] = report.recent_failures
    assert failure.detail.startswith("attempt 1 failed with ReportMissing")

    async def index_says_failed() -> bool:
        page = await cluster.store.get_if_exists(storage.INDEX_HTML_KEY, 10_000_000)
        return page is not None and b"scan failed: attempt 1 failed with ReportMissing" in page

    await cluster.eventually(index_says_failed, 60, "the index saying the scan failed, with its reason")

    # Retried with backoff until a scan uploads: then a stored report, and done. (Between a scan.completed and the
    # parser's verdict on its upload, a digest is `done` for the seconds the parser waits for a late upload.)
    async def reported() -> bool:
        state = await cluster.state(silent)
        stored = await cluster.store.get_if_exists(storage.latest_report_key(silent), 10_000_000)
        return stored is not None and state is not None and state.status == "done"

    await cluster.eventually(reported, 180, "the digest scanned by a later attempt, its report stored")
    assert len(attempts) == 3
    state = await cluster.state(silent)
    assert state is not None and state.reason == ""


# ---------------------------------------------------------------------------------------------------------------
# `podsweep up`'s check before its first scan


async def _kube_as(kube: KubeControlPlane, client: Kube, namespace: str, account: str, path: Path) -> Kube:
    """A client authenticated as a ServiceAccount (a token from the TokenRequest API)."""
    await client.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
    )
    answer = msgspec.json.decode(
        await client.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
        )
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": kube.server, "certificate-authority": str(kube.ca_file)}}],
        "users": [{"name": account, "user": {"token": answer["status"]["token"]}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": account}}],
        "current-context": "c",
    }
    await asyncio.to_thread(path.write_text, msgspec.json.encode(config).decode())
    return await Kube.connect(str(path))


async def test_up_creates_what_scans_need_when_it_may_and_otherwise_says_what_to_apply(
    kube: KubeControlPlane, kube_api: Kube, tmp_path: Path
) -> None:
    n = next(_ids)
    fresh = f"live-fresh-{n}"
    created = await preflight.prepare(kube_api, fresh, "scan")
    assert created == [f"namespace {fresh}", f"serviceaccount {fresh}/scan"]
    namespace = msgspec.json.decode(await kube_api.get(f"/api/v1/namespaces/{fresh}"))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    account = msgspec.json.decode(await kube_api.get(f"/api/v1/namespaces/{fresh}/serviceaccounts/scan"))
    assert account["automountServiceAccountToken"] is False
    assert await preflight.prepare(kube_api, fresh, "scan") == [], "a second start finds everything there"

    # A user who may only look there: `up` stops before any scan and says what to apply.
    limited = await _kube_as(kube, kube_api, fresh, "nobody", tmp_path / "nobody.kubeconfig")
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "look"},
        "rules": [{"apiGroups": [""], "resources": ["namespaces", "serviceaccounts"], "verbs": ["get"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "look"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "look"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": fresh}],
    }
    await kube_api.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{fresh}/roles", body=role)
    await kube_api.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{fresh}/rolebindings", body=binding)

    async def may_look() -> bool | None:  # RBAC takes effect once the authorizer's cache has the binding
        try:
            await limited.get(f"/api/v1/namespaces/{fresh}")
        except KubeError:
            return None
        return True

    await wait_until(may_look, 30, "the Role taking effect")
    try:
        with pytest.raises(preflight.NotReady) as refused:
            await preflight.prepare(limited, fresh, "scan-missing")
        message = str(refused.value)
        assert f"the ServiceAccount 'scan-missing' scan Jobs run as does not exist in '{fresh}'" in message
        assert "deploy/base/serviceaccounts.yaml" in message
        assert f"may not create jobs.batch, delete jobs.batch, list jobs.batch in '{fresh}'" in message
        with pytest.raises(preflight.NotReady) as no_namespace:
            await preflight.prepare(limited, f"{fresh}-absent", "scan")
        assert f"the namespace '{fresh}-absent' could not be read and this user may not create it" in str(
            no_namespace.value
        )
    finally:
        await limited.close()
