"""The dispatcher service: turns image and scan events into scan Jobs, one per digest, within the limits.

The async shell: every state change is a compare-and-set on JetStream KV decided by plan.py, so replicas and restarts
agree. slots.py takes limiter slots, schedule.py says when to look again, launcher.py creates and deletes the Jobs
(and holds them while pods are refused), batching.py and sightings.py gather what goes out together.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue
from opentelemetry import metrics

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.health import HEALTH
from podsweep.kube import Kube
from podsweep.natsaccess import Bucket, Durable, NatsAccess, durable_name
from podsweep.objectstore import ObjectStore
from podsweep.runtime import kubeconfig_path
from podsweep.service import open_service
from schemas import storage, subjects
from schemas.events import (
    DbUpdated,
    ImageGone,
    ImageSeen,
    ReportQuarantined,
    ReportStored,
    RescanAccepted,
    RescanRequested,
    ScanCompleted,
    ScanFailed,
    ScanStarted,
)
from schemas.refs import digest_hex
from schemas.state import (
    DEFAULT_CLUSTER,
    LIMITS_BUCKET,
    SCANS_BUCKET,
    WORKLOADS_BUCKET,
    DigestWorkloads,
    LimiterState,
    leader_key,
    limiter_key,
)
from services.dispatcher import gauges, plan, rescans, vulndb
from services.dispatcher.batching import Gathering
from services.dispatcher.dbpoll import DbPoller
from services.dispatcher.digests import Digests, MirroredStates, utcnow
from services.dispatcher.launcher import Launcher
from services.dispatcher.leadership import Leadership, identity, while_leading
from services.dispatcher.schedule import Schedule
from services.dispatcher.settings import Configured, configure
from services.dispatcher.sightings import Sightings
from services.dispatcher.slots import MirroredKey

SERVICE = "dispatcher"
# One consumer per cluster of a fleet (each dispatcher creates Jobs through its own cluster's API server): every
# cluster's events reach each, which handles only its own cluster's (see `Dispatcher.ours`).
EVENTS = Durable(
    "dispatcher",
    (
        subjects.IMAGE_SEEN,
        subjects.IMAGE_GONE,
        subjects.SCAN_STARTED,
        subjects.SCAN_COMPLETED,
        subjects.SCAN_FAILED,
        subjects.RESCAN_REQUESTED,
        subjects.REPORT_QUARANTINED,
        subjects.REPORT_STORED,
        subjects.DB_UPDATED,
    ),
    per_cluster=True,
)
# What it does on NATS (podsweep/natsaccess.py): deploy/base/nats/accounts.conf is generated from this.
NATS = NatsAccess(
    service=SERVICE,
    publishes=(subjects.RESCAN_ACCEPTED, subjects.DB_UPDATED),
    durables=(EVENTS,),
    buckets=(Bucket(SCANS_BUCKET), Bucket(LIMITS_BUCKET), Bucket(WORKLOADS_BUCKET, writes=False)),
)
# A sighting that only adds a node to a digest already claimed, scanned or waiting is written at most this long after
# it came, together with the digest's other sightings meanwhile (and well within the consumer's ack_wait).
SIGHTINGS_WINDOW_S = 10.0

log = logs.get("podsweep.dispatcher")
meter = metrics.get_meter("podsweep.dispatcher")
scan_failures = meter.create_counter(
    "podsweep_dispatcher_scan_failures", description="Failed scans, by reason (PodCreateRejected, ReportMissing, ...)"
)


class Dispatcher:
    """One replica's handlers, wired to its limiter client, schedule, Job launcher and gatherings."""

    def __init__(self, *, settings: Settings, cfg: Configured, bus: busmod.Bus, kube: Kube, store: ObjectStore) -> None:
        self.settings, self.cfg, self.bus, self.kube, self.store = settings, cfg, bus, kube, store
        self.schedule = Schedule(utcnow)
        self.launcher = Launcher(cfg, settings.parser, kube.request, store)
        self.gathering = Gathering(cfg.sbom_batch_size, cfg.sbom_batch_window_s)
        self.sightings = Sightings(min(SIGHTINGS_WINDOW_S, settings.consumer.ack_wait_s / 3))
        self.holding = True  # sightings may be held (not once stopping: the last write of held ones has begun)
        self.digests: Digests
        self.states: MirroredStates
        self.limiter_key: MirroredKey
        self.workloads: KeyValue

    async def open(self) -> None:
        self.states = MirroredStates(await self.bus.kv(SCANS_BUCKET))
        self.workloads = await self.bus.kv(WORKLOADS_BUCKET)
        limits_mirror = busmod.KvMirror(await self.bus.kv(LIMITS_BUCKET), LimiterState)
        self.limiter_key = key = MirroredKey(limits_mirror, limiter_key(self.settings.cluster))
        self.digests = Digests(
            settings=self.settings,
            cfg=self.cfg,
            states=self.states,
            limiter_key=key,
            launcher=self.launcher,
            schedule=self.schedule,
            gathering=self.gathering,
        )
        self.slots = self.digests.slots
        await key.read()
        await self.digests.count_existing_jobs(self.kube.get)

    def ours(self, cluster: str) -> bool:
        """Whether an event is this dispatcher's: its cluster's nodes, Jobs and requests. The scan states it writes
        are the fleet's (one per digest), so what another cluster saw reaches them through that cluster's
        dispatcher, which alone can create Jobs there."""
        return cluster == self.settings.cluster

    # -- event handlers --------------------------------------------------------------------------------------------

    async def on_image_seen(self, seen: ImageSeen, _: busmod.Delivery) -> busmod.Settled | None:
        if not self.ours(seen.cluster):
            return None
        key = digest_hex(seen.digest_ref)
        known = self.states.known(key) if self.holding else None
        if known is not None:
            now = utcnow()
            active, room = self.digests.view(now)
            decision = plan.on_seen(known[0], seen, now, self.cfg.policy, active, self.cfg.limits, room=room)
            if plan.holdable(known[0], decision):
                if key not in self.sightings:
                    self.schedule.look_within(self.sightings.window_s)
                return self.sightings.hold(key, seen, time.monotonic())
        await self._record(key, (seen,))
        return None

    async def _record(self, key: str, seen: Sequence[ImageSeen]) -> None:
        """Record sightings of one digest, in order, with one compare-and-set, and carry out what that decides."""
        now = utcnow()
        active, room = self.digests.view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        nodes = tuple(s.node for s in seen)
        written = await self.digests.update(
            key, lambda old: plan.on_sightings(old, seen, now, policy, active, limits, room=room), nodes
        )
        await self.digests.follow(key, written)

    async def on_image_gone(self, gone: ImageGone, _: busmod.Delivery) -> None:
        if not self.ours(gone.cluster):
            return
        now = utcnow()
        key = digest_hex(gone.digest_ref)
        await self.sightings.write(key, self._record)  # what this replica holds came first
        decision = (await self.digests.update(key, lambda old: plan.on_gone(old, gone, now, self.cfg.policy))).decision
        if decision.state is not None and decision.state.status == "not_scanned" and not decision.state.nodes_seen:
            self.schedule.parked.unpark(key)
            log.info("digest not scanned", digest=gone.digest_ref, reason=decision.state.reason)

    async def on_scan_started(self, started: ScanStarted, _: busmod.Delivery) -> None:
        if not self.ours(started.cluster):
            return
        self._pods_accepted()
        await self.digests.change(
            digest_hex(started.digest_ref), lambda old: plan.on_started(old, started, self.cfg.policy)
        )

    async def on_scan_completed(self, done: ScanCompleted, _: busmod.Delivery) -> None:
        if not self.ours(done.cluster):
            return
        if done.raw_key != storage.raw_key(done.digest_ref, done.scan_id):
            raise busmod.Reject(f"raw_key is not the key of scan {done.scan_id} (expected raw/sha256/<hex>/<id>.json)")
        key = digest_hex(done.digest_ref)
        self._pods_accepted()
        written = await self.digests.update(key, lambda old: plan.on_completed(old, done, self.cfg.policy))
        # An SBOM rescan's slot is its batch Job's (named by the batch); a node scan's is its own.
        await self.digests.hand_over(done.job if done.mode == "sbom" else done.scan_id)
        await self.digests.follow(key, written)

    async def on_report_stored(self, stored: ReportStored, _: busmod.Delivery) -> None:
        """The parser kept the scan's SBOM: record it in the digest's state (the dispatcher alone writes states)."""
        if stored.sbom_key is None or not self.ours(stored.cluster):
            return
        if not stored.sbom_key.startswith(storage.history_sbom_prefix(stored.digest_ref)):
            raise busmod.Reject(f"sbom_key of scan {stored.scan_id} is not under its digest's sbom/.../history/")
        await self.digests.change(digest_hex(stored.digest_ref), lambda old: plan.on_sbom_stored(old, stored))

    async def on_scan_failed(self, failed: ScanFailed, _: busmod.Delivery) -> None:
        if not self.ours(failed.cluster):
            return
        now = utcnow()
        key = digest_hex(failed.digest_ref)
        scan_failures.add(1, {"reason": failed.reason})
        # A failed Job is given up on: deleted, so no Job the limits stopped counting stays (one refused pods keeps
        # trying to make its pod; one stuck on a gone node never ends), then its slot is freed.
        job = failed.job if failed.mode == "sbom" else failed.scan_id
        deleted = await self.launcher.delete(job)
        if failed.reason == "PodCreateRejected":
            self.launcher.pods_refused(failed, now)
        else:
            self.launcher.failed_otherwise(failed.scan_id)
        if deleted:  # a Job that could not be deleted keeps its slot until the slot's deadline: it may still run
            await self.digests.release(job)
        written = await self.digests.update(key, self.digests.on_failed(failed, now))
        if written.decision.state is not None:
            log.info(
                "scan failed",
                digest=failed.digest_ref,
                scan_id=failed.scan_id,
                node=failed.node,
                reason=failed.reason,
                status=written.decision.state.status,
            )
        await self.digests.follow(key, written)

    async def on_report_quarantined(self, quarantined: ReportQuarantined, _: busmod.Delivery) -> None:
        """The parser found the scan's report missing or unreadable: the scan failed after all (retried with backoff).
        The parser says so with this event; the scan state stays the dispatcher's alone to write."""
        if not self.ours(quarantined.cluster):
            return
        now = utcnow()
        active, room = self.digests.view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        written = await self.digests.update(
            digest_hex(quarantined.digest_ref),
            lambda old: plan.on_quarantined(old, quarantined, now, policy, active, limits, room=room),
        )
        if written.decision.state is not None:
            scan_failures.add(1, {"reason": "ReportMissing" if quarantined.kind == "missing" else "ReportUnreadable"})
            log.info(
                "scan failed: no usable report",
                digest=quarantined.digest_ref,
                scan_id=quarantined.scan_id,
                kind=quarantined.kind,
                status=written.decision.state.status,
            )
        await self.digests.follow(digest_hex(quarantined.digest_ref), written)

    async def on_rescan_requested(self, request: RescanRequested, _: busmod.Delivery) -> None:
        """Make the requested digests due (compare-and-set), answer with rescan.accepted, let the timers claim them.
        Claims, batches and every limit apply as for any due digest: a request only moves due times. The dispatcher
        of the requester's cluster answers; digests another cluster is home to are claimed by its sweep."""
        if not self.ours(request.cluster):
            return
        now, policy = utcnow(), self.cfg.policy
        keys, unknown = await self._requested_keys(request)
        due = 0
        for key in keys:
            answer = (
                await self.digests.decide(
                    key, lambda old: plan.make_due(old, now, policy) if old is not None else (None, None)
                )
            )[3]
            due += answer in ("made_due", "in_flight")
            if answer == "made_due":
                self.schedule.set_timer(key, now)
        accepted = RescanAccepted(
            cluster=self.settings.cluster, request_id=request.request_id, due=due, unknown=unknown
        )
        await self.bus.publish(subjects.RESCAN_ACCEPTED, accepted, msg_id=f"rescan-accepted-{request.request_id}")
        self.schedule.wake.set()
        log.info(
            "rescan accepted",
            request_id=request.request_id,
            requested_by=request.requested_by,
            due=due,
            unknown=len(unknown),
        )

    async def on_db_updated(self, updated: DbUpdated, _: busmod.Delivery) -> None:
        """A newer vulnerability DB: every digest with a usable SBOM is due now (by compare-and-set, as a rescan
        request makes it), in the order its timers fire: running digests run by the most workloads first, digests
        no node runs last. Claims, batches and every limit apply; digests without a usable SBOM keep their due time."""
        if not self.states.mirror.ready:
            raise busmod.Retry("the scan states are not mirrored yet", delay=2.0)  # the order needs them all
        now, policy = utcnow(), self.cfg.policy
        runs = await self._workload_counts()
        candidates = [
            (key, runs.get(key, 0), bool(state.nodes_seen))
            for key, state in self.states.documents()
            if plan.rescannable_from_sbom(state, now, policy)
        ]
        due = 0
        for rank, key in enumerate(vulndb.order_for_rescan(candidates)):
            answer = (
                await self.digests.decide(
                    key, lambda old: plan.make_due(old, now, policy) if old is not None else (None, None)
                )
            )[3]
            if answer == "made_due":
                due += 1
                # One microsecond apart: the timers fire, and the batches fill, in this order.
                self.schedule.set_timer(key, now + timedelta(microseconds=rank))
        self.schedule.wake.set()
        log.info(
            "vulnerability DB updated: SBOM rescans due",
            updated_at=updated.updated_at.isoformat(),
            candidates=len(candidates),
            due=due,
        )

    async def _workload_counts(self) -> dict[str, int]:
        """Digest key -> how many workloads run it (WORKLOADS bucket, read only)."""
        found, unreadable = await busmod.kv_documents(self.workloads, DigestWorkloads)
        for key in unreadable:
            log.warning("rescan order skipped an unreadable workloads document", key=key)
        return {
            digest_hex(d.digest_ref): len({(r.namespace, r.workload.kind, r.workload.name) for r in d.runs})
            for d in found
        }

    async def _requested_keys(self, request: RescanRequested) -> tuple[list[str], list[str]]:
        """The digest keys a request names, and the digests it names that this dispatcher has never seen."""
        if request.all:
            try:
                return sorted(await self.states.kv.keys()), []
            except nats.js.errors.NoKeysError:
                return [], []
        if request.namespace is not None:
            found, unreadable = await busmod.kv_documents(self.workloads, DigestWorkloads)
            for key in unreadable:
                log.warning("rescan skipped an unreadable workloads document", key=key)
            return rescans.keys_in_namespace(found, request.namespace), []
        keys: list[str] = []
        unknown: list[str] = []
        for ref in dict.fromkeys(request.digests):
            state, _ = await self.states.read(digest_hex(ref))
            if state is None:
                unknown.append(ref)
            else:
                keys.append(digest_hex(ref))
        return keys, unknown

    def _pods_accepted(self) -> None:
        if self.launcher.pods_accepted():
            self.schedule.wake.set()

    async def tend(self, stop: asyncio.Event) -> None:
        """Start parked scans as slots free up, batches as they fill, and decide again when a timer comes due."""
        await self.schedule.tend(
            stop, self._tend_once, lambda: self.schedule.wait_s(len(self.gathering) > 0, self.sightings.next_due())
        )
        # Stopping: hold no more sightings, and write those held (their events are acked before the consumer closes).
        self.holding = False
        await self.sightings.write_all(self._record)

    async def _tend_once(self) -> None:
        for key in self.sightings.due(time.monotonic()):
            await self.sightings.write(key, self._record)
        await self.digests.tend_once()


async def main(settings: Settings, stop: asyncio.Event) -> None:
    cfg = configure(settings)  # a config error stops start-up before anything connects
    kube = await Kube.connect(kubeconfig_path(settings))
    try:
        async with open_service(SERVICE, settings, s3=True, access=NATS) as service:
            lease = Leadership(
                await service.bus.kv(LIMITS_BUCKET), identity(), cfg.leader_lease_s, leader_key(settings.cluster)
            )
            HEALTH.set("dispatcher:running", True)  # a standby is as ready as the leader: it takes over on its own
            try:
                store = service.require_store()
                await while_leading(lease, stop, functools.partial(_lead, settings, cfg, service.bus, kube, store))
            finally:
                HEALTH.set("dispatcher:running", False)
    finally:
        await kube.close()


async def _lead(
    settings: Settings, cfg: Configured, bus: busmod.Bus, kube: Kube, store: ObjectStore, stop: asyncio.Event
) -> None:
    """Consume and dispatch until `stop` (a shutdown, or the lease lost): a fresh replica state each time."""
    dispatcher = Dispatcher(settings=settings, cfg=cfg, bus=bus, kube=kube, store=store)
    await dispatcher.open()
    mirror, own = dispatcher.states.mirror, settings.cluster
    stop_reporting = gauges.leading(
        lambda: dispatcher.slots.view,
        settings.dispatcher,
        # The digests this cluster is home to: in a fleet each cluster's leader counts its own, so a sum is the fleet.
        lambda: (s for _, s in mirror.documents() if (s.cluster or DEFAULT_CLUSTER) == own) if mirror.ready else None,
    )
    background = [
        asyncio.create_task(dispatcher.tend(stop), name="dispatcher-tend"),
        asyncio.create_task(
            dispatcher.schedule.sweep(
                stop,
                cfg.sweep_interval_s,
                cfg.sweep_jitter_ratio,
                lambda: dispatcher.states.mirror.ready,
                dispatcher.digests.sweep_candidates,
                dispatcher.digests.reconsider,
            ),
            name="dispatcher-sweep",
        ),
        asyncio.create_task(dispatcher.limiter_key.mirror.follow(stop), name="dispatcher-limiter-watch"),
        asyncio.create_task(dispatcher.states.mirror.follow(stop), name="dispatcher-scans-watch"),
    ]
    if cfg.vulndb_poll_s > 0 and cfg.jobs.trivy_server is not None:
        poller = DbPoller(
            bus=bus,
            kv=await bus.kv(LIMITS_BUCKET),
            server=cfg.jobs.trivy_server,
            cluster=settings.cluster,
            interval_s=cfg.vulndb_poll_s,
        )
        background.append(asyncio.create_task(poller.run(stop), name="dispatcher-vulndb-poll"))
    routes: dict[str, busmod.Route[Any]] = {
        subjects.IMAGE_SEEN: busmod.Route(ImageSeen, dispatcher.on_image_seen),
        subjects.IMAGE_GONE: busmod.Route(ImageGone, dispatcher.on_image_gone),
        subjects.SCAN_STARTED: busmod.Route(ScanStarted, dispatcher.on_scan_started),
        subjects.SCAN_COMPLETED: busmod.Route(ScanCompleted, dispatcher.on_scan_completed),
        subjects.SCAN_FAILED: busmod.Route(ScanFailed, dispatcher.on_scan_failed),
        subjects.REPORT_QUARANTINED: busmod.Route(ReportQuarantined, dispatcher.on_report_quarantined),
        subjects.REPORT_STORED: busmod.Route(ReportStored, dispatcher.on_report_stored),
        subjects.RESCAN_REQUESTED: busmod.Route(RescanRequested, dispatcher.on_rescan_requested),
        subjects.DB_UPDATED: busmod.Route(DbUpdated, dispatcher.on_db_updated),
    }
    limits = cfg.limits
    log.info(
        "dispatcher consuming",
        cluster=settings.cluster,
        namespace=cfg.jobs.namespace,
        max_active=limits.max_active,
        max_active_per_node=limits.max_active_per_node,
        max_created_per_minute=limits.max_created_per_minute,
    )
    try:
        await busmod.consume(
            bus,
            service=SERVICE,
            durable=durable_name(EVENTS, settings.cluster),
            routes=routes,
            settings=settings.consumer,
            stop=stop,
        )
    finally:
        if not stop.is_set():
            for task in background:
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        stop_reporting()
