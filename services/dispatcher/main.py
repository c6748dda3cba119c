"""The dispatcher service: turns image and scan events into scan Jobs, one per digest, within the limits.

The async shell: every state change is a compare-and-set on JetStream KV decided by plan.py, so replicas and restarts
agree. slots.py takes limiter slots, schedule.py says when to look again, launcher.py creates and deletes the Jobs
(and holds them while pods are refused), batching.py and sightings.py gather what goes out together.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.health import HEALTH
from podsweep.kube import Kube, KubeError
from podsweep.natsaccess import Bucket, Durable, NatsAccess
from podsweep.objectstore import ObjectStore
from podsweep.runtime import kubeconfig_path
from podsweep.service import open_service
from schemas import jobs, storage, subjects
from schemas.events import (
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
from schemas.state import LIMITS_BUCKET, SCANS_BUCKET, WORKLOADS_BUCKET, DigestScanState, DigestWorkloads, LimiterState
from services.dispatcher import limits as limiter
from services.dispatcher import livejobs, plan, rescans
from services.dispatcher.batching import Gathered, Gathering
from services.dispatcher.launcher import Launcher
from services.dispatcher.leadership import Leadership, identity, while_leading
from services.dispatcher.parking import Parked
from services.dispatcher.plan import Decision, ScanPlan
from services.dispatcher.schedule import TICK_S, Launch, Schedule
from services.dispatcher.settings import Configured, configure
from services.dispatcher.sightings import Sightings
from services.dispatcher.slots import MirroredKey, Slots

SERVICE = "dispatcher"
DURABLE = "dispatcher"
# What it does on NATS (podsweep/natsaccess.py): deploy/base/nats/accounts.conf is generated from this.
NATS = NatsAccess(
    service=SERVICE,
    publishes=(subjects.RESCAN_ACCEPTED,),
    durables=(
        Durable(
            DURABLE,
            (
                subjects.IMAGE_SEEN,
                subjects.IMAGE_GONE,
                subjects.SCAN_STARTED,
                subjects.SCAN_COMPLETED,
                subjects.SCAN_FAILED,
                subjects.RESCAN_REQUESTED,
                subjects.REPORT_QUARANTINED,
                subjects.REPORT_STORED,
            ),
        ),
    ),
    buckets=(Bucket(SCANS_BUCKET), Bucket(LIMITS_BUCKET), Bucket(WORKLOADS_BUCKET, writes=False)),
)
# A sighting that only adds a node to a digest already claimed, scanned or waiting is written at most this long after
# it came, together with the digest's other sightings meanwhile (and well within the consumer's ack_wait).
SIGHTINGS_WINDOW_S = 10.0

log = logs.get("podsweep.dispatcher")
meter = metrics.get_meter("podsweep.dispatcher")
retries = meter.create_counter("podsweep_dispatcher_retries", description="Scans claimed again after a failure")
limit_waits = meter.create_counter(
    "podsweep_dispatcher_limit_waits", description="Claimed scans that waited for a limit, by the limit"
)
scan_failures = meter.create_counter(
    "podsweep_dispatcher_scan_failures", description="Failed scans, by reason (PodCreateRejected, ReportMissing, ...)"
)
_WAITING = ("nodes_full", "limited")  # decisions that park a digest until a slot frees
D = TypeVar("D")
Made = tuple[Decision, tuple[str, ...], DigestScanState | None]  # a decision, the digest's nodes, the state before


def utcnow() -> datetime:
    return datetime.now(UTC)


class Written(NamedTuple):
    """A decision as compare-and-set left it: the digest's nodes, the revision written (0: none), the state before."""

    decision: Decision
    nodes: tuple[str, ...]
    revision: int
    before: DigestScanState | None


class Dispatcher:
    """One replica's handlers, wired to its limiter client, schedule, Job launcher and gatherings."""

    def __init__(self, *, settings: Settings, cfg: Configured, bus: busmod.Bus, kube: Kube, store: ObjectStore) -> None:
        self.settings, self.cfg, self.bus, self.kube = settings, cfg, bus, kube
        self.scans: KeyValue
        self.workloads: KeyValue
        self.mirror: busmod.KvMirror[DigestScanState]
        self.limiter_key: MirroredKey
        self.slots: Slots
        self.schedule = Schedule(utcnow)
        self.launcher = Launcher(cfg, settings.parser, kube.request, store)
        self.gathering = Gathering(cfg.sbom_batch_size, cfg.sbom_batch_window_s)
        self.sightings = Sightings(min(SIGHTINGS_WINDOW_S, settings.consumer.ack_wait_s / 3))
        self.holding = True  # sightings may be held (not once stopping: the last write of held ones has begun)

    async def open(self) -> None:
        self.scans = await self.bus.kv(SCANS_BUCKET)
        self.workloads = await self.bus.kv(WORKLOADS_BUCKET)
        self.mirror = busmod.KvMirror(self.scans, DigestScanState)
        self.limiter_key = MirroredKey(busmod.KvMirror(await self.bus.kv(LIMITS_BUCKET), LimiterState))
        self.slots = Slots(self.limiter_key, self.cfg.limits, utcnow)
        await self.limiter_key.read()
        await self._count_existing_jobs()

    async def _count_existing_jobs(self) -> None:
        """Count every unfinished scan Job against the limits, and delete those no claim wants (livejobs.py)."""
        found: list[livejobs.ExistingJob] = []
        token = ""
        while True:
            params: dict[str, str | int | bool] = {"labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}"}
            params.update({"limit": 500, **({"continue": token} if token else {})})
            page, token = livejobs.decode_page(await self.kube.get(self.launcher.jobs_path, params))
            found.extend(page)
            if not token:
                break
        states: dict[str, DigestScanState | None] = {}
        for job in found:
            ref = livejobs.digest_of(job)
            if ref is not None and ref not in states and not livejobs.finished(job):
                states[ref] = (await busmod.kv_read(self.scans, digest_hex(ref), DigestScanState))[0]
        now, policy = utcnow(), self.cfg.policy
        result = livejobs.reconcile(found, states, now, policy.job_deadline + policy.deadline_grace)
        for name in result.delete:
            await self.launcher.delete(name)
        if result.count:
            await self.slots.adopt(result.count, now)
        log.info(
            "existing scan Jobs counted",
            jobs=len(found),
            unfinished=len(result.count) + len(result.delete),
            deleted=len(result.delete),
        )

    def _room(self, now: datetime) -> tuple[dict[str, int], int]:
        """Live slots per node and how many Jobs may start now, as last seen, and no more than a hold allows."""
        room, allowed = self.slots.room(now), self.launcher.allowance(now)
        return room.per_node, room.free if allowed is None else min(room.free, allowed)

    def _view(self, now: datetime) -> tuple[dict[str, int], bool]:
        per_node, free = self._room(now)
        return per_node, free > 0

    # -- event handlers --------------------------------------------------------------------------------------------

    async def on_image_seen(self, seen: ImageSeen, _: busmod.Delivery) -> busmod.Settled | None:
        key = digest_hex(seen.digest_ref)
        known = self.mirror.known(key) if self.holding else None
        if known is not None:
            now = utcnow()
            active, room = self._view(now)
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
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        nodes = tuple(s.node for s in seen)
        written = await self._update(
            key, lambda old: plan.on_sightings(old, seen, now, policy, active, limits, room=room), nodes
        )
        await self._follow(key, written)

    async def on_image_gone(self, gone: ImageGone, _: busmod.Delivery) -> None:
        now = utcnow()
        key = digest_hex(gone.digest_ref)
        await self.sightings.write(key, self._record)  # what this replica holds came first
        decision = (await self._update(key, lambda old: plan.on_gone(old, gone, now, self.cfg.policy))).decision
        if decision.state is not None and decision.state.status == "not_scanned" and not decision.state.nodes_seen:
            self.schedule.parked.unpark(key)
            log.info("digest not scanned", digest=gone.digest_ref, reason=decision.state.reason)

    async def on_scan_started(self, started: ScanStarted, _: busmod.Delivery) -> None:
        self._pods_accepted()
        await self._change(digest_hex(started.digest_ref), lambda old: plan.on_started(old, started, self.cfg.policy))

    async def on_scan_completed(self, done: ScanCompleted, _: busmod.Delivery) -> None:
        if done.raw_key != storage.raw_key(done.digest_ref, done.scan_id):
            raise busmod.Reject(f"raw_key is not the key of scan {done.scan_id} (expected raw/sha256/<hex>/<id>.json)")
        key = digest_hex(done.digest_ref)
        self._pods_accepted()
        written = await self._update(key, lambda old: plan.on_completed(old, done, self.cfg.policy))
        # An SBOM rescan's slot is its batch Job's (named by the batch); a node scan's is its own.
        await self._hand_over(done.job if done.mode == "sbom" else done.scan_id)
        await self._follow(key, written)

    async def on_report_stored(self, stored: ReportStored, _: busmod.Delivery) -> None:
        """The parser kept the scan's SBOM: record it in the digest's state (the dispatcher alone writes states)."""
        if stored.sbom_key is None:
            return
        if not stored.sbom_key.startswith(storage.history_sbom_prefix(stored.digest_ref)):
            raise busmod.Reject(f"sbom_key of scan {stored.scan_id} is not under its digest's sbom/.../history/")
        await self._change(digest_hex(stored.digest_ref), lambda old: plan.on_sbom_stored(old, stored))

    async def on_scan_failed(self, failed: ScanFailed, _: busmod.Delivery) -> None:
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
            await self._release(job)
        written = await self._update(key, self._on_failed(failed, now))
        if written.decision.state is not None:
            log.info(
                "scan failed",
                digest=failed.digest_ref,
                scan_id=failed.scan_id,
                node=failed.node,
                reason=failed.reason,
                status=written.decision.state.status,
            )
        await self._follow(key, written)

    def _on_failed(self, failed: ScanFailed, now: datetime) -> Callable[[DigestScanState | None], Decision]:
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        return lambda old: plan.on_failed(old, failed, now, policy, active, limits, room=room)

    async def on_report_quarantined(self, quarantined: ReportQuarantined, _: busmod.Delivery) -> None:
        """The parser found the scan's report missing or unreadable: the scan failed after all (retried with backoff).
        The parser says so with this event; the scan state stays the dispatcher's alone to write."""
        now = utcnow()
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        written = await self._update(
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
        await self._follow(digest_hex(quarantined.digest_ref), written)

    async def on_rescan_requested(self, request: RescanRequested, _: busmod.Delivery) -> None:
        """Make the requested digests due (compare-and-set), answer with rescan.accepted, let the timers claim them.
        Claims, batches and every limit apply as for any due digest: a request only moves due times."""
        now, policy = utcnow(), self.cfg.policy
        keys, unknown = await self._requested_keys(request)
        due = 0
        for key in keys:
            answer = (await self._decide(key, functools.partial(_make_due, now=now, policy=policy)))[3]
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

    async def _requested_keys(self, request: RescanRequested) -> tuple[list[str], list[str]]:
        """The digest keys a request names, and the digests it names that this dispatcher has never seen."""
        if request.all:
            try:
                return sorted(await self.scans.keys()), []
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
            state, _ = await busmod.kv_read(self.scans, digest_hex(ref), DigestScanState)
            if state is None:
                unknown.append(ref)
            else:
                keys.append(digest_hex(ref))
        return keys, unknown

    def _pods_accepted(self) -> None:
        if self.launcher.pods_accepted():
            self.schedule.wake.set()

    # -- deciding and carrying out ---------------------------------------------------------------------------------

    async def _update(
        self, key: str, decide: Callable[[DigestScanState | None], Decision], seen_on: tuple[str, ...] = ()
    ) -> Written:
        """Apply a pure decision with compare-and-set. A decision that was not written (the state did not change)
        never carries a scan: only the writer of a claim carries it out."""

        def change(old: DigestScanState | None) -> tuple[DigestScanState | None, Made]:
            decision = decide(old)
            nodes = tuple(old.nodes_seen) if old is not None else ()
            nodes = (*nodes, *(n for n in dict.fromkeys(seen_on) if n not in nodes))
            return decision.state, (decision, nodes, old)

        _, revision, wrote, (decision, nodes, before) = await self._decide(key, change)
        if not wrote and decision.scan is not None:
            return Written(Decision(None, None, "claimed", decision.recheck_at), nodes, 0, before)
        return Written(decision, nodes, revision if wrote else 0, before)

    async def _decide(
        self,
        key: str,
        decide: Callable[[DigestScanState | None], tuple[DigestScanState | None, D]],
        known: tuple[DigestScanState | None, int] | None = None,
    ) -> tuple[DigestScanState | None, int, bool, D]:
        """Compare-and-set on a digest's state, from `known` or else the mirror (a read only when the mirror cannot
        say, or a write lost to another replica). What this replica writes goes into its mirror at once."""
        found = await busmod.kv_decide(
            self.scans, key, DigestScanState, decide, known=known or self.mirror.known(key), fresh=known is None
        )
        if found[2]:
            self.mirror.saw(key, found[0], found[1])
        return found

    async def _change(
        self,
        key: str,
        change: Callable[[DigestScanState | None], DigestScanState | None],
        known: tuple[DigestScanState | None, int] | None = None,
    ) -> tuple[DigestScanState | None, int, bool]:
        stored, revision, wrote, _ = await self._decide(key, lambda old: (change(old), None), known)
        return stored, revision, wrote

    async def _follow(self, key: str, written: Written) -> Launch | None:
        """Carry out a decision: start its scan, park it when every node is full or the limiter has no room, or
        remember when to look again."""
        decision, nodes, revision = written.decision, written.nodes, written.revision
        if decision.scan is not None:
            if decision.why == "retry":
                retries.add(1)
            if decision.scan.mode == "sbom":
                claimed_until = decision.state.claim_expires_at if decision.state is not None else None
                self.gathering.add(Gathered(key, decision.scan, claimed_until), time.monotonic())
                if len(self.gathering) >= self.gathering.size:
                    self.schedule.wake.set()
                self.schedule.look_within(self.gathering.window_s)
                return "gathered"
            claimed = (decision.state, revision) if decision.state is not None and revision else None
            return await self._launch(key, decision.scan, claimed)
        if decision.why in _WAITING:
            limit_waits.add(1, {"limit": "node_full" if decision.why == "nodes_full" else "limited"})
            self.schedule.parked.park(key, None, nodes)
            self.schedule.look_within(TICK_S)
        elif decision.why in ("backoff", "not_due", "gave_up", "recorded") and decision.recheck_at is not None:
            self.schedule.set_timer(key, decision.recheck_at)
        return None

    async def reconsider(self, key: str) -> Launch | None:
        """Decide again about one digest (the sweep, timers and parked digests all come here)."""
        now = utcnow()
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits

        def decide(old: DigestScanState | None) -> Decision:
            return (
                Decision(None, None, "stale")
                if old is None
                else plan.decide(old, now, policy, active, limits, room=room)
            )

        written = await self._update(key, decide)
        old = written.before
        if written.revision and old is not None and old.scan_id and plan.abandons(old, written.decision):
            await self.launcher.delete(old.scan_id)  # a claim that expired without a scan event: its Job is given up
        return await self._follow(key, written)

    async def _launch(self, key: str, scan: ScanPlan, claimed: tuple[DigestScanState, int] | None = None) -> Launch:
        """Take a slot, create the Job, record it running. Every step is keyed by the scan id: repeating is harmless.

        `claimed` is the claim this replica just wrote and its revision: while it is young nobody else may write
        the claim (only its expiry lets another replica resume it, and no scan event can come before the Job), so
        it is not read again.
        """
        now, policy = utcnow(), self.cfg.policy
        outcome = await self.slots.acquire(
            scan.scan_id, scan.node, now, now + policy.job_deadline + policy.deadline_grace
        )
        if not outcome.ok:
            limit_waits.add(1, {"limit": outcome.reason})
            self.schedule.parked.park(key, scan, (scan.node,) if scan.node else ())
            self.schedule.look_within(TICK_S)
            return "refused"
        expires = claimed[0].claim_expires_at if claimed is not None else None
        state: DigestScanState | None
        if claimed is not None and expires is not None and utcnow() < expires - policy.claim_ttl / 2:
            state, revision = claimed
        else:
            state, revision = self.mirror.known(key) or await busmod.kv_read(self.scans, key, DigestScanState)
        self.schedule.parked.unpark(key)
        if state is None or state.scan_id != scan.scan_id or state.status not in ("pending", "running"):
            await self._release(scan.scan_id)  # finished or given up while this replica waited: the slot is not needed
            return "stale"
        if state.status == "running":
            return "exists"  # another replica (or this one, earlier) created it
        try:
            manifest = self.launcher.node_scan(scan)
            created, status = await self.launcher.create(
                manifest, slot_id=scan.scan_id, mode=scan.mode, now=utcnow(), span_name="create scan Job"
            )
        except (msgspec.ValidationError, ValueError) as exc:
            await self._release(scan.scan_id)
            await self._fail(key, scan, f"the scan Job could not be built: {exc}")
            return "failed"
        except KubeError:
            await self._release(scan.scan_id)
            raise
        if created == "refused":
            await self._release(scan.scan_id)
            await self._fail(key, scan, f"the API server refused the Job with {status}")
            return "failed"
        if created == "created":
            log.info("scan created", digest=scan.digest_ref, scan_id=scan.scan_id, node=scan.node, attempt=scan.attempt)
        await self._change(key, lambda old: plan.on_created(old, scan.scan_id, utcnow(), policy), (state, revision))
        return created

    async def _fail(self, key: str, scan: ScanPlan, message: str) -> None:
        now = utcnow()
        failed = ScanFailed(
            cluster=self.settings.cluster,
            scan_id=scan.scan_id,
            digest_ref=scan.digest_ref,
            mode=scan.mode,
            node=scan.node,
            job=scan.scan_id,
            reason="Unknown",
            message=message[:1000],
            failed_at=now,
        )
        log.warning("scan not created", digest=scan.digest_ref, scan_id=scan.scan_id, error=message[:300])
        written = await self._update(key, self._on_failed(failed, now))
        if written.decision.scan is None:
            await self._follow(key, written)
        else:  # never launch from inside a launch: the timer or the sweep picks the retry up
            self.schedule.set_timer(key, now)

    async def _launch_batch(self, items: list[Gathered]) -> Launch:
        """One slot for the batch, the claims renewed (those no longer this replica's leave), the Job, then running.
        The Job's name is a hash of the scan ids first offered, so repeating a creation is a 409, not a second Job."""
        now, policy = utcnow(), self.cfg.policy
        batch_id = plan.batch_id_for([i.scan.scan_id for i in items])
        outcome = await self.slots.acquire_unpinned(batch_id, now, now + policy.job_deadline + policy.deadline_grace)
        if not outcome.ok:
            limit_waits.add(1, {"limit": outcome.reason})
            return "refused"
        confirmed: list[tuple[Gathered, DigestScanState]] = []
        for item in items:
            renew = functools.partial(
                plan.confirm_batch_item,
                scan_id=item.scan.scan_id,
                claimed_until=item.claimed_until,
                now=now,
                policy=policy,
            )
            stored, _, wrote = await self._change(item.key, renew)
            if wrote and stored is not None and stored.sbom_key is not None:
                confirmed.append((item, stored))
        if not confirmed:
            await self._release(batch_id)
            return "stale"
        try:
            manifest = self.launcher.sbom_rescan(batch_id, confirmed)
            created, status = await self.launcher.create(
                manifest, slot_id=batch_id, mode="sbom", now=utcnow(), span_name="create SBOM rescan Job"
            )
        except (msgspec.ValidationError, ValueError, KubeError) as exc:
            created, status = "refused", exc.status if isinstance(exc, KubeError) else 0
            if status:  # transient: the claims stay pending, expire, and are resumed into a new batch
                log.warning("sbom rescan Job not created, will be retried", batch=batch_id, status=status)
                await self._release(batch_id)
                return "failed"
            message = f"the SBOM rescan Job could not be built: {exc}"
        else:
            message = f"the API server refused the Job with {status}"
        if created == "refused":
            await self._release(batch_id)
            for item, _ in confirmed:
                await self._fail(item.key, item.scan, message)
            return "failed"
        if created == "created":
            log.info("sbom rescan created", batch=batch_id, digests=len(confirmed))
        for item, _ in confirmed:
            await self._change(
                item.key, functools.partial(plan.on_created, scan_id=item.scan.scan_id, now=utcnow(), policy=policy)
            )
        return created

    # -- slots freed, and the background: tend loop and sweep ------------------------------------------------------

    async def _release(self, slot_id: str) -> None:
        if await self.slots.release(slot_id):
            self.gathering.blocked = False
            self.schedule.wake.set()

    async def _hand_over(self, slot_id: str) -> None:
        """Free a finished scan's slot. A parked scan that can start takes it in the same limiter write as its own
        acquire (one write where a release and an acquire were two); with none, the slot is released on its own.
        Returns once the release is written: the event is acked after."""
        self.slots.releasing.add(slot_id)
        try:
            if self.schedule.parked:
                async with self.schedule.parked_lock:
                    await self._start_parked()
        finally:
            if slot_id in self.slots.releasing:
                await self._release(slot_id)

    async def _start_parked(self) -> None:
        await self.schedule.start_parked(
            lambda: self._room(utcnow()), self.cfg.limits.max_active_per_node, self._unpark
        )

    async def _unpark(self, key: str, parked: Parked) -> Launch | None:
        if parked.scan is not None:  # no read first: _launch checks the claim once it holds the slot
            return await self._launch(key, parked.scan)
        self.schedule.parked.unpark(key)
        return await self.reconsider(key)

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
        for key in self.schedule.due(utcnow()):
            await self.reconsider(key)
        while self.gathering.ready(time.monotonic()):
            items = self.gathering.take()
            if await self._launch_batch(items) == "refused":  # wait for a released slot (or the idle pass)
                self.gathering.refused(items, time.monotonic())
        if self.schedule.parked:
            idle = self.schedule.idle_pass_due()
            if idle:
                await self.limiter_key.read()
            if self.schedule.parked_pass(self.slots.revision, idle):
                async with self.schedule.parked_lock:
                    await self._start_parked()

    def sweep_candidates(self) -> list[str]:
        """The digests a decision would change, from the mirror (nothing read). The decision on this snapshot only
        selects: each one is decided again with compare-and-set."""
        now = utcnow()
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        todo: list[str] = []
        for key, state in self.mirror.documents():
            if key not in self.schedule.parked:
                decision = plan.decide(state, now, policy, active, limits, room=room)
                if decision.state is not None or decision.scan is not None or decision.why in _WAITING:
                    todo.append(key)
        return todo

    def observe_active(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(limiter.live(self.slots.view, utcnow()).slots))

    def observe_active_per_node(self, _: CallbackOptions) -> Iterable[Observation]:
        for node, count in limiter.active_per_node(self.slots.view, utcnow()).items():
            yield Observation(count, {"node": node})


def _make_due(
    old: DigestScanState | None, *, now: datetime, policy: plan.Policy
) -> tuple[DigestScanState | None, plan.RescanAnswer | None]:
    return plan.make_due(old, now, policy) if old is not None else (None, None)


_replicas: list[Dispatcher] = []


def _observe_active(options: CallbackOptions) -> Iterable[Observation]:
    return _replicas[-1].observe_active(options) if _replicas else ()


def _observe_active_per_node(options: CallbackOptions) -> Iterable[Observation]:
    return _replicas[-1].observe_active_per_node(options) if _replicas else ()


meter.create_observable_gauge(
    "podsweep_dispatcher_active_jobs", [_observe_active], description="Scan Jobs holding a limiter slot"
)
meter.create_observable_gauge(
    "podsweep_dispatcher_active_jobs_per_node",
    [_observe_active_per_node],
    description="Scan Jobs holding a limiter slot, by node",
)
meter.create_observable_gauge(
    "podsweep_dispatcher_leading",
    [lambda _: [Observation(1 if _replicas else 0)]],
    description="1 while this replica holds the dispatcher lease and consumes, 0 while it stands by",
)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    cfg = configure(settings)  # a config error stops start-up before anything connects
    kube = await Kube.connect(kubeconfig_path(settings))
    try:
        async with open_service(SERVICE, settings, s3=True, access=NATS) as service:
            lease = Leadership(await service.bus.kv(LIMITS_BUCKET), identity(), cfg.leader_lease_s)
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
    _replicas.append(dispatcher)
    background = [
        asyncio.create_task(dispatcher.tend(stop), name="dispatcher-tend"),
        asyncio.create_task(
            dispatcher.schedule.sweep(
                stop,
                cfg.sweep_interval_s,
                cfg.sweep_jitter_ratio,
                lambda: dispatcher.mirror.ready,
                dispatcher.sweep_candidates,
                dispatcher.reconsider,
            ),
            name="dispatcher-sweep",
        ),
        asyncio.create_task(dispatcher.limiter_key.mirror.follow(stop), name="dispatcher-limiter-watch"),
        asyncio.create_task(dispatcher.mirror.follow(stop), name="dispatcher-scans-watch"),
    ]
    routes: dict[str, busmod.Route[Any]] = {
        subjects.IMAGE_SEEN: busmod.Route(ImageSeen, dispatcher.on_image_seen),
        subjects.IMAGE_GONE: busmod.Route(ImageGone, dispatcher.on_image_gone),
        subjects.SCAN_STARTED: busmod.Route(ScanStarted, dispatcher.on_scan_started),
        subjects.SCAN_COMPLETED: busmod.Route(ScanCompleted, dispatcher.on_scan_completed),
        subjects.SCAN_FAILED: busmod.Route(ScanFailed, dispatcher.on_scan_failed),
        subjects.REPORT_QUARANTINED: busmod.Route(ReportQuarantined, dispatcher.on_report_quarantined),
        subjects.REPORT_STORED: busmod.Route(ReportStored, dispatcher.on_report_stored),
        subjects.RESCAN_REQUESTED: busmod.Route(RescanRequested, dispatcher.on_rescan_requested),
    }
    limits = cfg.limits
    log.info(
        "dispatcher consuming",
        namespace=cfg.jobs.namespace,
        max_active=limits.max_active,
        max_active_per_node=limits.max_active_per_node,
        max_created_per_minute=limits.max_created_per_minute,
    )
    try:
        await busmod.consume(
            bus, service=SERVICE, durable=DURABLE, routes=routes, settings=settings.consumer, stop=stop
        )
    finally:
        if not stop.is_set():
            for task in background:
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        _replicas.remove(dispatcher)
