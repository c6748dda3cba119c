"""The dispatcher against the real control plane (apiserver, controller-manager, kwok), real NATS and real S3.

The kubelet stand-in (completer mode) finishes scan pods; tests/harness/scanjobs.py plays the watcher's part for Jobs:
it records how many were active at once and publishes scan.completed / scan.failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NatsSettings,
    S3Settings,
    Settings,
)
from podsweep.embedded import free_port
from podsweep.kube import Kube, KubeError
from schemas import jobs, storage, subjects
from schemas.events import DbUpdated, DeadLetter, FailureReason, ReportStored, SeverityCounts, Workload
from schemas.refs import digest_hex
from schemas.state import (
    LEADER_KEY,
    LIMITER_KEY,
    LIMITS_BUCKET,
    SCANS_BUCKET,
    WORKLOADS_BUCKET,
    DigestScanState,
    DigestWorkloads,
    DispatcherLease,
    LimiterState,
    WorkloadRun,
)
from services.dispatcher import jobspec
from services.dispatcher.leadership import identity
from services.dispatcher.main import main
from services.dispatcher.plan import scan_id_for
from services.dispatcher.settings import job_options
from tests.harness import replicas as replicas_mod
from tests.harness.events import digest_ref, image_seen
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import create_fake_node
from tests.harness.replicas import in_process
from tests.harness.scanjobs import ScanJobObserver, SeenJob
from tests.harness.standin import StartStandin

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
FAST = ConsumerSettings(max_deliver=20, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=5, batch=32, concurrency=8)
_ids = itertools.count(1)


def dispatcher_settings(
    kube: KubeControlPlane, namespace: str, nats: NatsSettings, s3: S3Settings, **dispatcher: Any
) -> Settings:
    section = {
        "sweep_interval_s": 1.0,
        "claim_ttl_s": 5.0,
        "leader_lease_s": 3.0,
        "backoff_base_s": 0.2,
        "backoff_max_s": 1.0,
        "job_deadline_s": 120.0,
        "deadline_grace_s": 10.0,
        "max_created_per_minute": 6000,
        "trivy_image": "registry.example.com/aquasec/trivy:0.76.0",
        "podsweep_image": "registry.example.com/podsweep/podsweep:test",
        **dispatcher,
    }
    return Settings(
        kubeconfig=str(kube.kubeconfig),
        namespace=namespace,
        nats=nats,
        s3=s3,
        consumer=FAST,
        log_format="json",
        dispatcher=msgspec.convert(section, DispatcherSettings),
    )


@contextlib.asynccontextmanager
async def observer(
    kube_api: Kube, namespace: str, nats: NatsSettings, verdict: Callable[[SeenJob], FailureReason | None] | None = None
) -> AsyncIterator[tuple[ScanJobObserver, busmod.Bus]]:
    bus = await busmod.connect(nats, "test")
    await busmod.ensure_stream(bus)
    watcher = ScanJobObserver(kube_api, namespace, bus, verdict=verdict or (lambda _job: None))
    await watcher.start()
    try:
        yield watcher, bus
    finally:
        await watcher.stop()
        await bus.close()


async def prepare_namespace(kube_api: Kube, namespace: str, nodes: int, *, baseline: bool = False) -> list[str]:
    """The `scan` ServiceAccount the Jobs run as, and `nodes` fake nodes of this test's own."""
    await kube_api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
    )
    if baseline:
        await kube_api.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}",
            body={"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}},
            content_type="application/merge-patch+json",
        )
    names = [f"{namespace}-n{i}" for i in range(nodes)]
    await asyncio.gather(*(create_fake_node(kube_api, name) for name in names))
    return names


async def states(bus: busmod.Bus, refs: list[str]) -> dict[str, DigestScanState | None]:
    kv = await bus.kv(SCANS_BUCKET)
    found: dict[str, DigestScanState | None] = {}
    for ref in refs:
        found[ref], _ = await busmod.kv_read(kv, digest_hex(ref), DigestScanState)
    return found


async def leader(bus: busmod.Bus, running: list[replicas_mod.Replica]) -> replicas_mod.Replica | None:
    """The replica holding the dispatcher lease (its holder name ends with the pid); None while nobody holds it."""
    lease, _ = await busmod.kv_read(await bus.kv(LIMITS_BUCKET), LEADER_KEY, DispatcherLease)
    holder = lease.holder if lease is not None else ""
    return next((r for r in running if holder and holder.endswith(f":{r.proc.pid}")), None)


def with_metrics(settings: Settings, port: int) -> Settings:
    return msgspec.structs.replace(settings, telemetry=msgspec.structs.replace(settings.telemetry, metrics_port=port))


async def leading_gauge(port: int) -> float | None:
    """podsweep_dispatcher_leading as a replica's /metrics shows it (None: not there, or not serving yet)."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^podsweep_dispatcher_leading(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def limit_gauges(port: int) -> dict[str, float]:
    """podsweep_dispatcher_limit by limit, as a replica's /metrics shows it."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    found = re.findall(r'^podsweep_dispatcher_limit\{[^}]*limit="([a-z_]+)"[^}]*\} (\S+)$', text, re.MULTILINE)
    return {name: float(value) for name, value in found}


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


async def last_seen_handled(bus: busmod.Bus, timeout_s: float = 60) -> None:
    """Wait until the dispatcher has acked the last image.seen published so far (its consumer's ack floor reaches
    that event): whatever the event makes the dispatcher do, it has done."""
    stream = bus.settings.stream
    last = await bus.js.get_last_msg(stream, bus.subject(subjects.IMAGE_SEEN))

    async def acked() -> bool:
        info = await bus.js.consumer_info(stream, "dispatcher")
        return info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= (last.seq or 0)

    await eventually(acked, timeout_s, f"the dispatcher's ack of image.seen #{last.seq}")


async def all_acked(bus: busmod.Bus) -> bool:
    consumer = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
    return (consumer.num_pending, consumer.num_ack_pending) == (0, 0)


_captured: list[str] = []


def logged(capsys: pytest.CaptureFixture[str], text: str) -> bool:
    """Whether a service running in this process has logged `text` (structured lines go to the captured stderr)."""
    out, err = capsys.readouterr()
    _captured.append(out + err)
    return any(text in chunk for chunk in _captured)


# --- every Job the builder makes is accepted by the real apiserver ------------------------------------------------

OPTION_COMBINATIONS = [
    pytest.param({}, True, id="defaults-client-server-sbom-dac-override"),
    pytest.param({"sbom": False, "severities": ["CRITICAL", "HIGH"]}, True, id="no-sbom-severities"),
    pytest.param({"trivy_server": "", "db_claim": "trivy-db"}, True, id="standalone-db-claim"),
    pytest.param({"pinning": "affinity", "priority_class": "system-node-critical"}, True, id="affinity-priority"),
    pytest.param(
        {"ignore_unfixed": True, "honor_workload_ignore_unfixed": True, "scan_limits_cpu": "1"},
        True,
        id="ignore-unfixed-cpu-limit",
    ),
    pytest.param({"service_account": ""}, True, id="namespace-default-service-account"),
    pytest.param({"read_capability": "DAC_READ_SEARCH"}, False, id="dac-read-search-refused-by-baseline"),
]


@pytest.mark.parametrize(("overrides", "admitted_by_baseline"), OPTION_COMBINATIONS)
async def test_every_generated_job_is_accepted_by_the_apiserver(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    overrides: dict[str, Any],
    admitted_by_baseline: bool,
) -> None:
    """Server-side validation of the Job (dry run), and of its pod under Pod Security "baseline" like deploy/base."""
    await prepare_namespace(kube_api, kube_namespace, 0, baseline=True)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings, **overrides)
    options = job_options(settings.dispatcher, kube_namespace)
    ref = digest_ref(kube_namespace, 1)
    url = "https://s3.example.com/podsweep/raw/x.json?X-Amz-Signature=abc"
    node_scan = jobspec.validated_node_scan(
        scan_id="psw-" + "a" * 24,
        digest_ref=ref,
        node="worker-1",
        raw_put_url=url,
        sbom_put_url=url,
        ignore_unfixed=True,
    )
    batch = msgspec.convert(
        {
            "batch_id": "psw-b-" + "b" * 24,
            "items": [
                {"scan_id": f"psw-{n:024d}", "digest_ref": digest_ref(kube_namespace, n), "sbom_get_url": url}
                | {"raw_put_url": url}
                for n in range(3)
            ],
        },
        jobspec.SbomRescan,
    )
    for manifest in (jobspec.build_node_scan_job(node_scan, options), jobspec.build_sbom_rescan_job(batch, options)):
        jobs_path = f"/apis/batch/v1/namespaces/{kube_namespace}/jobs"
        await kube_api.request("POST", jobs_path, {"dryRun": "All"}, body=manifest)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": manifest["metadata"]["name"], "namespace": kube_namespace},
            "spec": manifest["spec"]["template"]["spec"],
        }
        pods_path = f"/api/v1/namespaces/{kube_namespace}/pods"
        is_node_scan = manifest["metadata"]["annotations"][jobs.MODE_ANNOTATION] == "node"
        if admitted_by_baseline or not is_node_scan:
            await kube_api.request("POST", pods_path, {"dryRun": "All"}, body=pod)
        else:
            with pytest.raises(KubeError) as refused:
                await kube_api.request("POST", pods_path, {"dryRun": "All"}, body=pod)
            assert refused.value.status == 403
            assert b"DAC_READ_SEARCH" in refused.value.body


# --- two replicas, a burst of events, limits held -----------------------------------------------------------------


@pytest.mark.parametrize("kill_one", [False, True], ids=["both-replicas-live", "one-replica-killed-mid-run"])
async def test_two_replicas_create_exactly_one_job_per_digest_within_the_limits(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
    tmp_path: Path,
    kill_one: bool,
) -> None:
    nodes = await prepare_namespace(kube_api, kube_namespace, 20)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    limits = {"max_active": 12, "max_active_per_node": 2}
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings, **limits)
    refs = [digest_ref(kube_namespace, n) for n in range(200)]
    async with observer(kube_api, kube_namespace, nats_settings) as (watcher, bus):
        replicas = [replicas_mod.start("dispatcher", settings, tmp_path / f"replica-{i}.log") for i in range(2)]
        try:
            # 1,000 events: each digest five times, on up to three nodes, interleaved like a resync.
            for i in range(1000):
                n = i % 200
                node = nodes[(n + (i // 200) % 3) % len(nodes)]
                await bus.publish(subjects.IMAGE_SEEN, image_seen(refs[n], node, n), msg_id=f"seen-{i}")
            if kill_one:
                await watcher.wait(lambda: len(watcher.jobs) >= 40, 120, "40 Jobs created")
                killed = await leader(bus, replicas)  # the standby has nothing to lose: kill the one at work
                assert killed is not None, "no replica holds the lease"
                killed.kill()
                assert len(watcher.jobs) < 200, "the replica was killed after the run, not during it"
            await watcher.wait(
                lambda: sum(1 for f in watcher.finished.values() if f == "completed") >= 200, 300, "200 scans done"
            )
            await eventually(lambda: all_acked(bus), 120, "every event acked")
            final = await states(bus, refs)
            assert {s.status for s in final.values() if s is not None} == {"done"}
        finally:
            for replica in replicas:
                replica.stop()
        per_digest = watcher.digests_with_jobs()
        assert len(watcher.jobs) == 200, f"{len(watcher.jobs)} Jobs for 200 digests"
        assert set(per_digest) == set(refs)
        assert max(per_digest.values()) == 1
        # Held, and reached: a burst this size fills every slot, so a limit that is never hit proves nothing.
        assert watcher.max_active == limits["max_active"]
        # Per node it is held; whether it is reached depends on how the replicas spread (they prefer idle nodes).
        assert 1 <= watcher.max_active_per_node <= limits["max_active_per_node"]
        # Every sighting was recorded, those held and written together too (a killed replica's held ones were
        # delivered again), and every event was acked.
        expected_nodes = {ref: {nodes[(n + k) % len(nodes)] for k in range(3)} for n, ref in enumerate(refs)}
        assert {ref: set(s.nodes_seen) for ref, s in final.items() if s is not None} == expected_nodes
        consumer = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
        assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
        limiter, _ = await busmod.kv_read(await bus.kv(LIMITS_BUCKET), LIMITER_KEY, LimiterState)
        assert limiter is not None and limiter.slots == []
    for replica in replicas:
        if not kill_one or replica is not killed:
            assert replica.proc.returncode == 0, replica.tail()


async def test_one_replica_leads_and_a_clean_stop_hands_the_lease_over_at_once(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
    tmp_path: Path,
) -> None:
    """Only the leader consumes; on SIGTERM it releases the lease, so the standby takes over at its next read of the
    lease (every fifth of it) instead of waiting for the lease to lapse, and carries on with new events."""
    nodes = await prepare_namespace(kube_api, kube_namespace, 4)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    # A long lease: were it not released, the standby could not take over within this test's waits.
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings, leader_lease_s=60.0)
    refs = [digest_ref(kube_namespace, n) for n in range(20)]
    ports = [free_port(), free_port()]
    async with observer(kube_api, kube_namespace, nats_settings) as (watcher, bus):
        running = [
            replicas_mod.start("dispatcher", with_metrics(settings, port), tmp_path / f"replica-{i}.log")
            for i, port in enumerate(ports)
        ]
        try:
            for n, ref in enumerate(refs[:10]):
                await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, nodes[n % 4], n), msg_id=f"seen-{n}")
            await watcher.wait(lambda: len(watcher.jobs) == 10, 60, "10 Jobs created")
            first = await leader(bus, running)
            assert first is not None, "no replica holds the lease"
            (standby,) = [r for r in running if r is not first]
            assert "dispatcher consuming" not in standby.log.read_text(), "a standby consumed events"
            leading = {r.proc.pid: await leading_gauge(ports[running.index(r)]) for r in running}
            assert leading == {first.proc.pid: 1.0, standby.proc.pid: 0.0}
            limits = settings.dispatcher
            assert await limit_gauges(ports[running.index(first)]) == {
                "max_active": limits.max_active,
                "max_active_per_node": limits.max_active_per_node,
                "max_created_per_minute": limits.max_created_per_minute,
            }
            first.stop()
            assert first.proc.returncode == 0, first.tail()

            async def standby_leads() -> bool:
                return await leader(bus, running) is standby

            await eventually(standby_leads, 30, "the standby leading (the lease released, not lapsed)")

            async def gauge_says_leading() -> bool:
                return await leading_gauge(ports[running.index(standby)]) == 1.0

            await eventually(gauge_says_leading, 10, "the new leader's podsweep_dispatcher_leading at 1")
            for n, ref in enumerate(refs[10:], start=10):
                await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, nodes[n % 4], n), msg_id=f"seen-{n}")
            await watcher.wait(
                lambda: sum(1 for f in watcher.finished.values() if f == "completed") >= 20, 120, "20 scans done"
            )
        finally:
            for replica in running:
                replica.stop()
        assert sorted(watcher.digests_with_jobs().values()) == [1] * 20
        final = await states(bus, refs)
        assert {s.status for s in final.values() if s is not None} == {"done"}
    assert standby.proc.returncode == 0, standby.tail()


async def test_a_leader_whose_lease_is_taken_stands_down_until_it_lapses(
    capsys: pytest.CaptureFixture[str],
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    """Another holder wrote the lease (a standby that judged it lapsed): the leader sees it at its next renewal and
    stops consuming; events wait while that holder renews, and are handled once its lease lapses."""
    (node,) = await prepare_namespace(kube_api, kube_namespace, 1)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings, leader_lease_s=3.0)
    async with observer(kube_api, kube_namespace, nats_settings) as (watcher, bus), in_process(main, settings=settings):
        limits_kv = await bus.kv(LIMITS_BUCKET)

        async def holder() -> str:
            lease, _ = await busmod.kv_read(limits_kv, LEADER_KEY, DispatcherLease)
            return lease.holder if lease is not None else ""

        async def leading() -> bool:
            return (await holder()) == identity()

        await eventually(leading, 30, "the dispatcher leading")
        await bus.publish(subjects.IMAGE_SEEN, image_seen(digest_ref(kube_namespace, 1), node, 1), msg_id="seen-1")
        await watcher.wait(lambda: len(watcher.jobs) == 1, 60, "the first Job created")

        # The intruder takes the lease and renews it every half second for 6 s.
        _, revision = await busmod.kv_read(limits_kv, LEADER_KEY, DispatcherLease)
        now = datetime.now(UTC)
        intruder = DispatcherLease(holder="intruder:1", acquired_at=now, renewed_at=now, ttl_s=3.0)
        written = await busmod.kv_put_if(limits_kv, LEADER_KEY, intruder, revision)
        assert written is not None
        stood_down = "dispatcher lease taken by another replica; standing down"
        for _ in range(60):  # the intruder renews every half second until the leader says it stood down
            if logged(capsys, stood_down):
                break
            await asyncio.sleep(0.5)
            renewed = msgspec.structs.replace(intruder, renewed_at=datetime.now(UTC))
            written = await busmod.kv_put_if(limits_kv, LEADER_KEY, renewed, written)
            assert written is not None, "the lease was taken from a holder that renews it"
        assert logged(capsys, stood_down), "the leader never noticed the lease was taken"
        await bus.publish(subjects.IMAGE_SEEN, image_seen(digest_ref(kube_namespace, 2), node, 2), msg_id="seen-2")
        seen_2 = await bus.js.get_last_msg(bus.settings.stream, bus.subject(subjects.IMAGE_SEEN))
        for _ in range(8):  # the intruder holds the lease for 4 s more
            await asyncio.sleep(0.5)
            renewed = msgspec.structs.replace(intruder, renewed_at=datetime.now(UTC))
            written = await busmod.kv_put_if(limits_kv, LEADER_KEY, renewed, written)
            assert written is not None, "the lease was taken from a holder that renews it"
        consumer = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
        assert consumer.delivered is not None and (consumer.delivered.stream_seq or 0) < (seen_2.seq or 0), (
            "a replica that does not hold the lease was handed an event"
        )
        assert len(watcher.jobs) == 1, "a replica that does not hold the lease consumed an event"
        assert await holder() == "intruder:1"

        # The intruder falls silent: 3 s later (on the dispatcher's clock) the dispatcher leads again and catches up.
        await eventually(leading, 30, "the dispatcher leading again")
        await watcher.wait(lambda: len(watcher.jobs) == 2, 60, "the second Job created")


async def test_sightings_of_a_claimed_digest_on_many_nodes_are_written_together_and_all_acked(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    """A DaemonSet's image is seen once per node: after the first sighting, the rest wait a moment and are written
    in a few compare-and-sets instead of one each; none is lost and every event is acked after its write."""
    (node,) = await prepare_namespace(kube_api, kube_namespace, 1)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings, claim_ttl_s=60.0)
    ref = digest_ref(kube_namespace, 1)
    others = [f"{kube_namespace}-ds{i}" for i in range(40)]
    async with observer(kube_api, kube_namespace, nats_settings) as (watcher, bus), in_process(main, settings=settings):
        await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id="seen-first")
        await watcher.wait(lambda: len(watcher.jobs) == 1, 60, "the scan Job created")
        await bus.publish_many(
            [busmod.Outgoing(subjects.IMAGE_SEEN, image_seen(ref, n, 1), f"seen-{n}") for n in others]
        )

        async def all_recorded() -> bool:
            state = (await states(bus, [ref]))[ref]
            return state is not None and set(state.nodes_seen) == {node, *others}

        await eventually(all_recorded, 30, "every node recorded")
        _, revision = await busmod.kv_read(await bus.kv(SCANS_BUCKET), digest_hex(ref), DigestScanState)

        async def all_acked() -> bool:
            info = await bus.js.consumer_info(bus.settings.stream, "dispatcher")
            return (info.num_pending, info.num_ack_pending) == (0, 0)

        await eventually(all_acked, 10, "every sighting acked")
    # The only key of this test's bucket: its revision counts its writes. The claim, perhaps `running` and `done`,
    # and the held sightings in a few writes; one write per sighting would be 43 or more.
    assert revision <= 10, f"{revision} writes for 41 sightings"
    assert len(watcher.jobs) == 1


# --- retries, nodes gone, rescans ---------------------------------------------------------------------------------


async def test_a_failed_scan_is_retried_on_another_node(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    nodes = await prepare_namespace(kube_api, kube_namespace, 2)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings)
    ref = digest_ref(kube_namespace, 1)
    failed_once: set[str] = set()

    def fail_first(job: SeenJob) -> FailureReason | None:
        if job.digest_ref in failed_once:
            return None
        failed_once.add(job.digest_ref)
        return "ScanError"

    async with (
        observer(kube_api, kube_namespace, nats_settings, fail_first) as (watcher, bus),
        in_process(main, settings=settings),
    ):
        for i, node in enumerate(nodes):
            await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id=f"seen-{i}")
        await watcher.wait(lambda: "completed" in watcher.finished.values(), 60, "the retry completed")
        (state,) = (await states(bus, [ref])).values()
    first, second = watcher.jobs_for(ref)
    assert watcher.finished[first.name] == "ScanError"
    assert {first.node, second.node} == set(nodes)
    # The cycle's attempts stay until the next rescan: a report found missing afterwards counts as a third.
    assert state is not None and state.status == "done" and state.attempts == 2


async def test_the_sbom_report_stored_names_is_recorded_and_one_of_another_digest_is_dead_lettered(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    (node,) = await prepare_namespace(kube_api, kube_namespace, 1)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings)
    ref, other = digest_ref(kube_namespace, 1), digest_ref(kube_namespace, 2)
    kept = storage.history_sbom_key(ref, datetime(2026, 11, 23, 10, 0, tzinfo=UTC))

    def report_stored(sbom_key: str, scan_id: str) -> ReportStored:
        return ReportStored(
            cluster="default",
            scan_id=scan_id,
            digest_ref=ref,
            report_key=storage.latest_report_key(ref),
            history_key=storage.history_report_key(ref, datetime(2026, 11, 23, 10, 0, tzinfo=UTC)),
            counts=SeverityCounts(),
            fixable=SeverityCounts(),
            stored_at=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
            sbom_key=sbom_key,
            sbom_trivy_version="0.76.0",
        )

    async with (
        observer(kube_api, kube_namespace, nats_settings, lambda _job: None) as (watcher, bus),
        in_process(main, settings=settings),
    ):
        letters = await bus.nc.subscribe(subjects.dead_letter_subject(nats_settings.subject_root, "dispatcher"))
        await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id="seen-1")
        await watcher.wait(lambda: "completed" in watcher.finished.values(), 60, "the scan completed")
        (job,) = watcher.jobs_for(ref)
        elsewhere = storage.history_sbom_key(other, datetime(2026, 11, 23, 10, 0, tzinfo=UTC))
        await bus.publish(subjects.REPORT_STORED, report_stored(elsewhere, job.name), msg_id="stored-elsewhere")
        letter = msgspec.json.decode((await letters.next_msg(timeout=30)).data, type=DeadLetter)
        await letters.unsubscribe()
        await bus.publish(subjects.REPORT_STORED, report_stored(kept, job.name), msg_id="stored-1")

        async def recorded() -> bool:
            state = (await states(bus, [ref]))[ref]
            return state is not None and state.sbom_key == kept

        await eventually(recorded, 30, "the SBOM recorded in the digest's state")
        (state,) = (await states(bus, [ref])).values()
    assert letter.error.startswith("rejected: sbom_key of scan"), letter.error
    assert state is not None and state.status == "done" and state.sbom_trivy_version == "0.76.0"


async def test_a_digest_whose_nodes_all_vanished_ends_not_scanned_with_the_reason(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    nodes = await prepare_namespace(kube_api, kube_namespace, 2)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings)
    ref = digest_ref(kube_namespace, 1)
    async with (
        observer(kube_api, kube_namespace, nats_settings, lambda _job: "NodeGone") as (watcher, bus),
        in_process(main, settings=settings),
    ):
        for i, node in enumerate(nodes):
            await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id=f"seen-{i}")

        async def not_scanned() -> bool:
            state = (await states(bus, [ref]))[ref]
            return state is not None and state.status == "not_scanned"

        await eventually(not_scanned, 60, "the digest recorded as not scanned")
        await eventually(lambda: all_acked(bus), 60, "both sightings acked")
        state = (await states(bus, [ref]))[ref]
    assert [j.node for j in watcher.jobs_for(ref)] in (nodes, nodes[::-1])
    assert state is not None and state.nodes_seen == []
    assert "no node runs this digest any more" in state.reason and "NodeGone" in state.reason


async def test_a_digest_seen_again_before_its_interval_creates_nothing_and_after_it_one_rescan(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    (node,) = await prepare_namespace(kube_api, kube_namespace, 1)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    interval = 8.0
    settings = dispatcher_settings(
        kube, kube_namespace, nats_settings, s3_settings, rescan_interval_s=interval, jitter_ratio=0.0
    )
    ref = digest_ref(kube_namespace, 1)
    async with observer(kube_api, kube_namespace, nats_settings) as (watcher, bus), in_process(main, settings=settings):
        await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id="seen-0")
        await watcher.wait(lambda: len(watcher.finished) == 1, 60, "the first scan done")

        async def done_once() -> bool:
            state = (await states(bus, [ref]))[ref]
            return state is not None and state.status == "done"

        await eventually(done_once, 60, "the first scan recorded done")
        first = (await states(bus, [ref]))[ref]
        assert first is not None and first.next_due_at is not None
        await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id="seen-1")
        await last_seen_handled(bus)
        if datetime.now(UTC) < first.next_due_at:  # handled before it was due (a machine this slow proves nothing)
            assert len(watcher.jobs) == 1, "a digest seen again before its interval was scanned again"
            assert (await states(bus, [ref]))[ref] == first
        await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id="seen-2")
        await watcher.wait(lambda: len(watcher.jobs) == 2, interval + 30, "the rescan after the interval")
        await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, node, 1), msg_id="seen-3")
        await watcher.wait(lambda: len(watcher.finished) == 2, 30, "the rescan done")
        await last_seen_handled(bus)
        second = (await states(bus, [ref]))[ref]
    assert len(watcher.jobs) == 2
    # The rescan was claimed no earlier than the dispatcher had said it was due.
    assert second is not None and second.last_scan_at is not None and second.last_scan_at >= first.next_due_at


# --- bad input -----------------------------------------------------------------------------------------------------


async def test_unusable_events_are_dead_lettered_with_the_reason_and_create_nothing(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
) -> None:
    (node,) = await prepare_namespace(kube_api, kube_namespace, 1)
    settings = dispatcher_settings(kube, kube_namespace, nats_settings, s3_settings)
    good = msgspec.to_builtins(image_seen(digest_ref(kube_namespace, 1), node, 1))
    hostile_ref = {**good, "digest_ref": "evil.example.com/x@sha256:" + "0" * 64 + "; rm -rf /"}
    completed = {
        "cluster": "default",
        "scan_id": "psw-" + "c" * 24,
        "digest_ref": good["digest_ref"],
        "job": "psw-" + "c" * 24,
        "raw_key": "raw/sha256/" + "f" * 64 + "/psw-" + "c" * 24 + ".json",  # another digest's key
        "finished_at": "2026-11-23T10:00:00Z",
    }
    bus = await busmod.connect(nats_settings, "test")
    await busmod.ensure_stream(bus)
    letters = await bus.nc.subscribe(subjects.dead_letter_subject(nats_settings.subject_root, "dispatcher"))
    try:
        async with in_process(main, settings=settings):
            for name, payload in ((subjects.IMAGE_SEEN, hostile_ref), (subjects.SCAN_COMPLETED, completed)):
                await bus.js.publish(bus.subject(name), msgspec.json.encode(payload), stream=nats_settings.stream)
            errors = []
            for _ in range(2):
                message = await letters.next_msg(timeout=30)
                errors.append(msgspec.json.decode(message.data, type=DeadLetter).error)
        listing = await kube_api.get(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs")
    finally:
        await letters.unsubscribe()
        await bus.close()
    assert any(e.startswith("invalid image.seen event") and "digest_ref" in e for e in errors), errors
    assert any(e.startswith("rejected: raw_key is not the key of scan") for e in errors), errors
    assert msgspec.json.decode(listing)["items"] == []


async def _live_jobs(kube_api: Kube, namespace: str) -> set[str]:
    """The scan Jobs in the namespace that have not finished."""
    listing = msgspec.json.decode(
        await kube_api.get(
            f"/apis/batch/v1/namespaces/{namespace}/jobs",
            {"labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}"},
        )
    )
    return {
        job["metadata"]["name"]
        for job in listing["items"]
        if not any(
            c["status"] == "True" and c["type"] in ("Complete", "Failed")
            for c in job.get("status", {}).get("conditions") or []
        )
    }


async def test_after_a_restart_that_lost_the_limiter_the_jobs_still_there_count_and_orphans_are_deleted(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
) -> None:
    """No stand-in: the scan pods never finish, so every Job created stays live until the dispatcher deletes it."""
    nodes = await prepare_namespace(kube_api, kube_namespace, 3)
    settings = dispatcher_settings(
        kube, kube_namespace, nats_settings, s3_settings, max_active=2, max_active_per_node=2
    )
    refs = [digest_ref(kube_namespace, n) for n in range(3)]
    bus = await busmod.connect(nats_settings, "test")
    try:
        await busmod.ensure_stream(bus)
        async with in_process(main, settings=settings):
            for n, ref in enumerate(refs[:2]):
                await bus.publish(subjects.IMAGE_SEEN, image_seen(ref, nodes[n], n), msg_id=f"seen-{n}")

            async def two_live() -> bool:
                return len(await _live_jobs(kube_api, kube_namespace)) == 2

            await eventually(two_live, 60, "two live scan Jobs")
        before = await states(bus, refs[:2])
        orphan = before[refs[0]]
        kept = before[refs[1]]
        assert orphan is not None and kept is not None and orphan.scan_id and kept.scan_id
        # What a lost store looks like: no limiter, and the first digest's state no longer claims its Job.
        limits_kv = await bus.kv(LIMITS_BUCKET)
        await limits_kv.delete(LIMITER_KEY)
        scans = await bus.kv(SCANS_BUCKET)
        await busmod.kv_update(
            scans,
            digest_hex(refs[0]),
            DigestScanState,
            lambda old: msgspec.structs.replace(old, status="done", claim_expires_at=None) if old else None,
        )
        async with in_process(main, settings=settings):
            await bus.publish(subjects.IMAGE_SEEN, image_seen(refs[2], nodes[2], 2), msg_id="seen-2")

            async def third_claimed() -> bool:
                third = (await states(bus, [refs[2]]))[refs[2]]
                return third is not None and third.status == "running"

            await eventually(third_claimed, 60, "the third digest's Job, once the orphan is gone")
            live = await _live_jobs(kube_api, kube_namespace)
            third = (await states(bus, [refs[2]]))[refs[2]]
            assert third is not None
            assert live == {kept.scan_id, third.scan_id}, "the orphan deleted, the kept Job counted, never 3 at once"
            limiter, _ = await busmod.kv_read(limits_kv, LIMITER_KEY, LimiterState)
            assert limiter is not None and {s.scan_id for s in limiter.slots} == {kept.scan_id, third.scan_id}
    finally:
        await bus.close()


async def test_a_db_update_makes_sbom_digests_due_most_run_first_not_running_last_and_leaves_the_others(
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubelet_standin: StartStandin,
) -> None:
    (node,) = await prepare_namespace(kube_api, kube_namespace, 1)
    await kubelet_standin(namespace=kube_namespace, execute=False)
    settings = dispatcher_settings(
        kube,
        kube_namespace,
        nats_settings,
        s3_settings,
        sbom_batch_size=10,
        sbom_batch_window_s=5.0,  # all four in one batch, however slow the machine
        sweep_interval_s=60.0,
        vulndb_poll_s=0.0,
    )
    names = ["one", "three", "two", "gone", "no-sbom"]
    refs = {name: digest_ref(kube_namespace, n) for n, name in enumerate(names)}
    runs = {"one": 1, "three": 3, "two": 2, "gone": 5, "no-sbom": 9}  # not running beats any number of workloads
    now = datetime.now(UTC)
    async with observer(kube_api, kube_namespace, nats_settings) as (_watcher, bus):
        scans, workloads = await bus.kv(SCANS_BUCKET), await bus.kv(WORKLOADS_BUCKET)
        for name, ref in refs.items():
            state = DigestScanState(
                digest_ref=ref,
                status="done",
                scan_seq=1,
                scan_id=scan_id_for(ref, 1),
                nodes_seen=[] if name == "gone" else [node],
                last_seen_at=now,
                last_scan_at=now - timedelta(hours=1),
                next_due_at=now + timedelta(days=1),
                not_running_since=now - timedelta(minutes=5) if name == "gone" else None,
                sbom_key=None if name == "no-sbom" else storage.history_sbom_key(ref, now - timedelta(hours=1)),
                sbom_trivy_version=None if name == "no-sbom" else "0.76.0",
            )
            await scans.put(digest_hex(ref), msgspec.json.encode(state))
            doc = DigestWorkloads(
                digest_ref=ref,
                runs=[
                    WorkloadRun(namespace="apps", workload=Workload(kind="Deployment", name=f"w{i}"), image="app:1")
                    for i in range(runs[name])
                ],
            )
            await workloads.put(digest_hex(ref), msgspec.json.encode(doc))
        async with in_process(main, settings=settings):
            update = DbUpdated(cluster="default", updated_at=now, schema_version=2, detected_at=now)
            await bus.publish(subjects.DB_UPDATED, update, msg_id="db-updated-1")

            async def batch() -> bool:
                return any(
                    j["metadata"]["annotations"].get(jobs.MODE_ANNOTATION) == "sbom"
                    for j in await _jobs(kube_api, kube_namespace)
                )

            await eventually(batch, 30, "an SBOM rescan Job")
            (job,) = await _jobs(kube_api, kube_namespace)
            after = await states(bus, list(refs.values()))
    listing = msgspec.json.decode(job["metadata"]["annotations"][jobs.BATCH_ANNOTATION])
    assert [i["digest_ref"] for i in listing] == [refs[n] for n in ("three", "two", "one", "gone")]
    untouched = after[refs["no-sbom"]]
    assert untouched is not None and untouched.next_due_at == now + timedelta(days=1), "no SBOM: no node scan now"


async def _jobs(kube_api: Kube, namespace: str) -> list[dict[str, Any]]:
    listing = msgspec.json.decode(await kube_api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))
    return list(listing["items"])
