"""The dispatcher service: turns image and scan events into scan Jobs, one per digest, within the limits.

A thin shell around plan.py (what to do about a digest) and limits.py (may a Job start now): every state change is a
compare-and-set on JetStream KV, so replicas and restarts agree. Touches the API only for its own scan Jobs in its
namespace: creates them, deletes those it gives up on, and lists them when it starts leading (livejobs.py).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import random
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from podsweep import bus as busmod
from podsweep import logs, telemetry
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
    RescanAccepted,
    RescanRequested,
    ScanCompleted,
    ScanFailed,
    ScanStarted,
)
from schemas.refs import digest_hex
from schemas.state import (
    LIMITER_KEY,
    LIMITS_BUCKET,
    SCANS_BUCKET,
    WORKLOADS_BUCKET,
    DigestScanState,
    DigestWorkloads,
    LimiterState,
)
from schemas.storage import StorageKey
from services.dispatcher import jobspec, livejobs, plan, rejections, rescans
from services.dispatcher import limits as limiter
from services.dispatcher.batching import Gathered, Gathering
from services.dispatcher.leadership import Leadership, identity
from services.dispatcher.parking import ParkingLot
from services.dispatcher.plan import Decision, ScanPlan
from services.dispatcher.settings import Configured, configure
from services.dispatcher.sightings import Sightings

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
            ),
        ),
    ),
    buckets=(Bucket(SCANS_BUCKET), Bucket(LIMITS_BUCKET), Bucket(WORKLOADS_BUCKET, writes=False)),
)
# How often parked claims (refused by a limit) and timers (retries after backoff, rescans coming due) are looked at.
TICK_S = 0.5
# Parked digests are looked at when the limiter changed or something new was parked, and at least this often (slots
# past their deadline and creations leaving the one-minute window free room without a write).
PARKED_IDLE_PASS_S = 5.0
# With nothing parked, gathering or due, the tend loop sleeps this long (or until the next timer); anything new wakes it.
IDLE_TEND_S = 30.0
# A sighting that only adds a node to a digest already claimed, scanned or waiting is written at most this long after
# it came, together with the digest's other sightings meanwhile (and well within the consumer's ack_wait).
SIGHTINGS_WINDOW_S = 10.0

log = logs.get("podsweep.dispatcher")
tracer = trace.get_tracer("podsweep.dispatcher")
meter = metrics.get_meter("podsweep.dispatcher")
jobs_created = meter.create_counter("podsweep_dispatcher_jobs_created", description="Scan Jobs created, by mode")
retries = meter.create_counter("podsweep_dispatcher_retries", description="Scans claimed again after a failure")
limit_waits = meter.create_counter(
    "podsweep_dispatcher_limit_waits", description="Claimed scans that waited for a limit, by the limit"
)
scan_failures = meter.create_counter(
    "podsweep_dispatcher_scan_failures", description="Failed scans, by reason (PodCreateRejected, ReportMissing, ...)"
)
jobs_deleted = meter.create_counter(
    "podsweep_dispatcher_jobs_deleted", description="Scan Jobs deleted after their scan failed or was abandoned"
)
_NO_SLOTS = LimiterState()  # the limiter before its first write (one object: _view caches by identity)
_WAITING = ("nodes_full", "limited")  # decisions that park a digest until a slot frees
Launch = Literal["created", "exists", "refused", "stale", "failed", "gathered"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    """One replica's handlers, its parked claims and timers, and its view of the shared limiter state."""

    def __init__(self, *, settings: Settings, cfg: Configured, bus: busmod.Bus, kube: Kube, store: ObjectStore) -> None:
        self.settings = settings
        self.cfg = cfg
        self.bus = bus
        self.kube = kube
        self.store = store
        self.scans: KeyValue
        self.mirror: busmod.KvMirror[DigestScanState]
        self.limits: busmod.KvMirror[LimiterState]  # the limiter as last read, written or watched
        self._view_of: tuple[LimiterState, frozenset[str], limiter.Room] | None = None
        self.parked = ParkingLot()
        self.timers: dict[str, datetime] = {}  # digest hex -> when to decide again (the latest setting wins)
        self._timer_heap: list[tuple[datetime, str]] = []
        self.wake = asyncio.Event()
        self._tend_due = 0.0  # monotonic instant the tend loop looks next, unless woken
        self._parked_seen = (-1, -1)  # (limiter revision, parking generation) at the last pass over parked digests
        self._parked_pass_at = 0.0
        self._parked_lock = asyncio.Lock()  # one pass over parked digests at a time (tend loop, finished scans)
        # Slots of finished scans not released yet: the next acquire releases them in the same write.
        self._releasing: set[str] = set()
        # Limiter changes waiting for the write under way to finish (they go together in the next one).
        self._limiter_queue: list[
            tuple[Callable[[LimiterState | None], LimiterState | None], asyncio.Future[bool]]
        ] = []
        self._limiter_writing = False
        self.jobs_path = f"/apis/batch/v1/namespaces/{cfg.jobs.namespace}/jobs"
        self.gathering = Gathering(cfg.sbom_batch_size, cfg.sbom_batch_window_s)
        self.sightings = Sightings(min(SIGHTINGS_WINDOW_S, settings.consumer.ack_wait_s / 3))
        self.holding = True  # sightings may be held (not once stopping: the last write of held ones has begun)
        self._gathering_blocked_at = 0.0
        self.workloads: KeyValue
        # While the API server refuses scan pods (PodCreateRejected): no new Jobs until a backoff passes, then a probe.
        self.hold: rejections.Hold | None = None

    async def open(self) -> None:
        self.scans = await self.bus.kv(SCANS_BUCKET)
        self.mirror = busmod.KvMirror(self.scans, DigestScanState)
        self.limits = busmod.KvMirror(await self.bus.kv(LIMITS_BUCKET), LimiterState)
        self.workloads = await self.bus.kv(WORKLOADS_BUCKET)
        await self._read_limiter()
        await self._count_existing_jobs()

    async def _count_existing_jobs(self) -> None:
        """Count every unfinished scan Job against the limits, and delete those no claim wants (livejobs.py)."""
        found: list[livejobs.ExistingJob] = []
        token = ""
        while True:
            params: dict[str, str | int | bool] = {
                "labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}",
                "limit": 500,
            }
            if token:
                params["continue"] = token
            page, token = livejobs.decode_page(await self.kube.get(self.jobs_path, params))
            found.extend(page)
            if not token:
                break
        states: dict[str, DigestScanState | None] = {}
        for job in found:
            ref = livejobs.digest_of(job)
            if ref is not None and ref not in states and not livejobs.finished(job):
                states[ref] = (await busmod.kv_read(self.scans, digest_hex(ref), DigestScanState))[0]
        policy = self.cfg.policy
        now = utcnow()
        result = livejobs.reconcile(found, states, now, policy.job_deadline + policy.deadline_grace)
        for name in result.delete:
            await self._delete_job(name)
        if result.count:
            await self._limiter_change(
                lambda old: livejobs.adopt(limiter.live(old or LimiterState(), now), result.count)
            )
        log.info(
            "existing scan Jobs counted",
            jobs=len(found),
            unfinished=len(result.count) + len(result.delete),
            deleted=len(result.delete),
        )

    @property
    def limiter_view(self) -> LimiterState:
        """This replica's view of the limiter; the KV key is the authority (every change is compare-and-set)."""
        return self.limits.last(LIMITER_KEY)[0] or _NO_SLOTS

    async def _read_limiter(self) -> None:
        self.limits.saw(LIMITER_KEY, *await busmod.kv_read(self.limits.kv, LIMITER_KEY, LimiterState))

    def _view(self, now: datetime) -> tuple[dict[str, int], bool]:
        """Live slots per node, and whether a global slot and a creation are left, as this replica last saw the
        limiter (every event asks)."""
        per_node, free = self._room(now)
        return per_node, free > 0

    def _room(self, now: datetime) -> tuple[dict[str, int], int]:
        """Live slots per node and how many Jobs may start now, as this replica last saw the limiter (computed once
        per limiter state until its next slot or creation expires), and no more than a hold on creations allows."""
        per_node, free = self._limiter_room(now)
        allowed = rejections.allowance(self.hold, now)
        return per_node, free if allowed is None else min(free, allowed)

    def _limiter_room(self, now: datetime) -> tuple[dict[str, int], int]:
        cached, seen, releasing = self._view_of, self.limiter_view, frozenset(self._releasing)
        if cached is not None and cached[0] is seen and cached[1] == releasing and now < cached[2].valid_until:
            return cached[2].per_node, cached[2].free
        current = limiter.room(seen, now, self.cfg.limits, releasing)
        self._view_of = (seen, releasing, current)
        return current.per_node, current.free

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
                    self._look_within(self.sightings.window_s)
                return self.sightings.hold(key, seen, time.monotonic())
        await self._record(key, (seen,))
        return None

    async def _record(self, key: str, seen: Sequence[ImageSeen]) -> None:
        """Record sightings of one digest, in order, with one compare-and-set, and carry out what that decides."""
        now = utcnow()
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        written = await self._update(
            key,
            lambda old: plan.on_sightings(old, seen, now, policy, active, limits, room=room),
            tuple(s.node for s in seen),
        )
        await self._follow(key, *written)

    async def _write_sightings(self, key: str) -> None:
        """Write a digest's held sightings together, then settle their events (acked, or retried)."""
        held = self.sightings.take(key)
        if held is None:
            return
        try:
            await self._record(key, held.seen)
        except Exception as exc:  # every held event is delivered again
            for waiter in held.waiters:
                if not waiter.done():  # its consumer stopped waiting (cancelled): redelivered all the same
                    waiter.set_exception(exc)
            log.warning(
                "sightings not written",
                key=key,
                events=len(held.seen),
                error=f"{type(exc).__name__}: {str(exc)[:300]}",
            )
        else:
            for waiter in held.waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _run_sightings(self, everything: bool = False) -> None:
        keys = self.sightings.keys() if everything else self.sightings.due(time.monotonic())
        for key in keys:
            await self._write_sightings(key)

    async def on_image_gone(self, gone: ImageGone, _: busmod.Delivery) -> None:
        now = utcnow()
        key = digest_hex(gone.digest_ref)
        await self._write_sightings(key)  # what this replica holds came first
        decision = (await self._update(key, lambda old: plan.on_gone(old, gone, now, self.cfg.policy)))[0]
        if decision.state is not None and decision.state.status == "not_scanned" and not decision.state.nodes_seen:
            self.parked.unpark(key)
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
        await self._follow(key, *written)

    async def on_scan_failed(self, failed: ScanFailed, _: busmod.Delivery) -> None:
        now = utcnow()
        key = digest_hex(failed.digest_ref)
        scan_failures.add(1, {"reason": failed.reason})
        # A failed Job is given up on: deleted, so no Job the limits stopped counting stays (one refused pods keeps
        # trying to make its pod; one stuck on a gone node never ends), then its slot is freed.
        deleted = await self._delete_job(failed.job if failed.mode == "sbom" else failed.scan_id)
        if failed.reason == "PodCreateRejected":
            self._pods_refused(failed, now)
        else:
            self.hold = rejections.failed_otherwise(self.hold, failed.scan_id) or self.hold
        if deleted:  # a Job that could not be deleted keeps its slot until the slot's deadline: it may still run
            await self._release(failed.job if failed.mode == "sbom" else failed.scan_id)
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        written = await self._update(
            key, lambda old: plan.on_failed(old, failed, now, policy, active, limits, room=room)
        )
        decision = written[0]
        if decision.state is not None:
            log.info(
                "scan failed",
                digest=failed.digest_ref,
                scan_id=failed.scan_id,
                node=failed.node,
                reason=failed.reason,
                status=decision.state.status,
            )
        await self._follow(key, *written)

    async def on_report_quarantined(self, quarantined: ReportQuarantined, _: busmod.Delivery) -> None:
        """The parser found the scan's report missing or unreadable: the scan failed after all (retried with backoff).
        The parser says so with this event; the scan state stays the dispatcher's alone to write."""
        now = utcnow()
        key = digest_hex(quarantined.digest_ref)
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        written = await self._update(
            key, lambda old: plan.on_quarantined(old, quarantined, now, policy, active, limits, room=room)
        )
        decision = written[0]
        if decision.state is not None:
            scan_failures.add(1, {"reason": "ReportMissing" if quarantined.kind == "missing" else "ReportUnreadable"})
            log.info(
                "scan failed: no usable report",
                digest=quarantined.digest_ref,
                scan_id=quarantined.scan_id,
                kind=quarantined.kind,
                status=decision.state.status,
            )
        await self._follow(key, *written)

    # -- pods refused, Jobs given up -------------------------------------------------------------------------------

    def _pods_refused(self, failed: ScanFailed, now: datetime) -> None:
        policy = self.cfg.policy
        hold = rejections.rejected(
            self.hold, failed.scan_id, failed.message, now, policy.backoff_base, policy.backoff_max
        )
        if hold is None:
            return
        first = self.hold is None
        self.hold = hold
        if first:  # said once; a refused probe only moves the next one
            log.warning(
                "scan pods are refused by the API server: no new scan Jobs until one is accepted",
                namespace=self.cfg.jobs.namespace,
                message=failed.message[:500],
                what_to_do="apply what the message names (deploy/base: the scan ServiceAccount, the namespace's "
                "quota or Pod Security labels); podsweep tries one scan Job at a time meanwhile",
            )
        else:
            log.info("scan pods still refused", rejections=hold.rejections, next_probe=hold.until.isoformat())

    def _pods_accepted(self) -> None:
        """A scan pod was created: a hold on creations ends."""
        if self.hold is not None:
            log.warning("scan pods are accepted again: scan Jobs resume", refused_since=self.hold.since.isoformat())
            self.hold = None
            self.wake.set()

    async def _delete_job(self, name: str) -> bool:
        """Delete a scan Job and (in the background, by the garbage collector) its pods; True once it is gone (or
        was). False when this dispatcher may not delete Jobs (said once per Job, with what to apply)."""
        if not name.startswith(plan.SCAN_ID_PREFIX):  # only names podsweep gives its Jobs, whatever an event says
            return True
        try:
            await self.kube.request(
                "DELETE",
                f"{self.jobs_path}/{name}",
                body=msgspec.json.encode({"propagationPolicy": "Background"}),
            )
        except KubeError as exc:
            if exc.status == 404:
                return True
            if exc.status in (401, 403):
                log.warning(
                    "scan Job not deleted: this dispatcher may not delete Jobs",
                    job=name,
                    namespace=self.cfg.jobs.namespace,
                    what_to_do="grant delete on jobs.batch there (deploy/base/rbac-dispatcher.yaml)",
                )
                return False
            raise
        jobs_deleted.add(1)
        log.info("scan Job deleted", job=name)
        return True

    # -- deciding and carrying out ---------------------------------------------------------------------------------

    async def _update(
        self, key: str, decide: Callable[[DigestScanState | None], Decision], seen_on: tuple[str, ...] = ()
    ) -> tuple[Decision, tuple[str, ...], int]:
        """Apply a pure decision with compare-and-set; returns the decision that was written, the digest's nodes and
        the revision written (0: nothing written).

        A decision that was not written (the state did not change) never carries a scan: only the writer of a claim
        carries it out.
        """
        made: list[tuple[Decision, tuple[str, ...]]] = []

        def change(old: DigestScanState | None) -> DigestScanState | None:
            decision = decide(old)
            nodes = tuple(old.nodes_seen) if old is not None else ()
            nodes = (*nodes, *(n for n in dict.fromkeys(seen_on) if n not in nodes))
            made.append((decision, nodes))
            return decision.state

        _, revision, wrote = await self._change(key, change)
        decision, nodes = made[-1]
        if not wrote and decision.scan is not None:
            return Decision(None, None, "claimed", decision.recheck_at), nodes, 0
        return decision, nodes, revision if wrote else 0

    async def _change(
        self,
        key: str,
        change: Callable[[DigestScanState | None], DigestScanState | None],
        known: tuple[DigestScanState | None, int] | None = None,
    ) -> tuple[DigestScanState | None, int, bool]:
        """Compare-and-set on a digest's state, from `known` or else the mirror (a read only when the mirror cannot
        say, or a write lost to another replica). What this replica writes goes into its mirror at once."""
        fresh = known is None
        stored, revision, wrote = await busmod.kv_change(
            self.scans, key, DigestScanState, change, known=known or self.mirror.known(key), fresh=fresh
        )
        if wrote:
            self.mirror.saw(key, stored, revision)
        return stored, revision, wrote

    async def _follow(self, key: str, decision: Decision, nodes: tuple[str, ...], revision: int = 0) -> Launch | None:
        """Carry out a decision: start its scan, park it when every node is full or the limiter has no room, or
        remember when to look again. `revision` is the one the decision's state was written at."""
        if decision.scan is not None:
            if decision.why == "retry":
                retries.add(1)
            if decision.scan.mode == "sbom":
                claimed_until = decision.state.claim_expires_at if decision.state is not None else None
                self.gathering.add(Gathered(key, decision.scan, claimed_until), time.monotonic())
                if len(self.gathering) >= self.gathering.size:
                    self.wake.set()
                self._look_within(self.gathering.window_s)
                return "gathered"
            claimed = (decision.state, revision) if decision.state is not None and revision else None
            return await self._launch(key, decision.scan, claimed)
        if decision.why in _WAITING:
            limit_waits.add(1, {"limit": "node_full" if decision.why == "nodes_full" else "limited"})
            self.parked.park(key, None, nodes)
            self._look_within(TICK_S)
        elif decision.why in ("backoff", "not_due", "gave_up", "recorded") and decision.recheck_at is not None:
            self._set_timer(key, decision.recheck_at)
        return None

    async def reconsider(self, key: str) -> Launch | None:
        """Decide again about one digest (the sweep, timers and parked digests all come here)."""
        now = utcnow()
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits

        abandoned: list[str] = []

        def decide(old: DigestScanState | None) -> Decision:
            if old is None:
                return Decision(None, None, "stale")
            decision = plan.decide(old, now, policy, active, limits, room=room)
            abandoned[:] = [old.scan_id] if _abandons(old, decision) and old.scan_id else []
            return decision

        written = await self._update(key, decide)
        if written[2] and abandoned:  # a claim that expired without a scan event: its Job, if any, is given up
            await self._delete_job(abandoned[0])
        return await self._follow(key, *written)

    async def _launch(self, key: str, scan: ScanPlan, claimed: tuple[DigestScanState, int] | None = None) -> Launch:
        """Take a slot, create the Job, record it running. Every step is keyed by the scan id: repeating is harmless.

        `claimed` is the claim this replica just wrote and its revision: while it is young nobody else may write
        the claim (only its expiry lets another replica resume it, and no scan event can come before the Job), so
        it is not read again.
        """
        now = utcnow()
        policy = self.cfg.policy
        deadline = now + policy.job_deadline + policy.deadline_grace
        outcome = await self._acquire(scan, now, deadline)
        if not outcome.ok:
            limit_waits.add(1, {"limit": outcome.reason})
            self.parked.park(key, scan, (scan.node,) if scan.node else ())
            self._look_within(TICK_S)
            return "refused"
        expires = claimed[0].claim_expires_at if claimed is not None else None
        state: DigestScanState | None
        if claimed is not None and expires is not None and utcnow() < expires - policy.claim_ttl / 2:
            state, revision = claimed
        else:
            state, revision = self.mirror.known(key) or await busmod.kv_read(self.scans, key, DigestScanState)
        if state is None or state.scan_id != scan.scan_id or state.status not in ("pending", "running"):
            # Finished or given up while this replica waited: the slot just taken is not needed.
            await self._release(scan.scan_id)
            self.parked.unpark(key)
            return "stale"
        self.parked.unpark(key)
        if state.status == "running":
            return "exists"  # another replica (or this one, earlier) created it
        try:
            manifest = self._manifest(scan, state)
        except (msgspec.ValidationError, ValueError) as exc:
            await self._release(scan.scan_id)
            await self._fail(key, scan, f"the scan Job could not be built: {exc}")
            return "failed"
        created = await self._create(key, scan, manifest)
        if created == "failed":
            return created
        await self._change(key, lambda old: plan.on_created(old, scan.scan_id, utcnow(), policy), (state, revision))
        return created

    def _url_lifetime_s(self) -> int:
        return jobspec.url_lifetime_s(self.cfg.jobs, self.cfg.policy.deadline_grace)

    def _upload_url(self, key: StorageKey, max_mb: float) -> str:
        return self.store.presign_upload(key, self._url_lifetime_s(), int(max_mb * 1024 * 1024))

    def _manifest(self, scan: ScanPlan, state: DigestScanState) -> jobspec.Manifest:
        """The Job for a claimed scan, with upload URLs for its keys, bounded in size, that last its deadline."""
        options = self.cfg.jobs
        parser = self.settings.parser
        raw_url = self._upload_url(storage.raw_key(scan.digest_ref, scan.scan_id), parser.max_report_mb)
        if scan.mode == "sbom" or scan.node is None:
            raise ValueError("a node scan was planned without a node")
        sbom_key = storage.sbom_key(scan.digest_ref, scan.scan_id)
        sbom_url = self._upload_url(sbom_key, parser.max_sbom_mb) if options.sbom else None
        node_scan = jobspec.validated_node_scan(
            scan_id=scan.scan_id,
            digest_ref=scan.digest_ref,
            node=scan.node,
            raw_put_url=raw_url,
            sbom_put_url=sbom_url,
            ignore_unfixed=scan.options.ignore_unfixed,
        )
        return jobspec.build_node_scan_job(node_scan, options)

    async def _create(self, key: str, scan: ScanPlan, manifest: jobspec.Manifest) -> Launch:
        """POST the Job: 409 means it exists already (a repeated step), which is fine."""
        with tracer.start_as_current_span("create scan Job", kind=SpanKind.CLIENT) as span:
            span.set_attribute("podsweep.scan_id", scan.scan_id)
            span.set_attribute("podsweep.node", scan.node or "")
            _carry_trace(manifest)
            try:
                await self.kube.request("POST", self.jobs_path, body=msgspec.json.encode(manifest))
            except KubeError as exc:
                if exc.status == 409:
                    span.set_attribute("podsweep.job_existed", True)
                    return "exists"
                span.set_status(Status(StatusCode.ERROR, f"HTTP {exc.status}"))
                await self._release(scan.scan_id)
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    # The API will refuse this Job every time (invalid, forbidden, no namespace): count it as a
                    # failed attempt, so the backoff and the attempt limit apply instead of a retry loop.
                    await self._fail(key, scan, f"the API server refused the Job with {exc.status}")
                    return "failed"
                raise
        jobs_created.add(1, {"mode": scan.mode})
        self.hold = rejections.probing(self.hold, scan.scan_id, utcnow()) or self.hold
        log.info("scan created", digest=scan.digest_ref, scan_id=scan.scan_id, node=scan.node, attempt=scan.attempt)
        return "created"

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
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        written = await self._update(
            key, lambda old: plan.on_failed(old, failed, now, policy, active, limits, room=room)
        )
        decision = written[0]
        if decision.scan is None:
            await self._follow(key, *written)
        else:  # never launch from inside a launch: the timer or the sweep picks the retry up
            self._set_timer(key, now)

    # -- SBOM rescans in batches ----------------------------------------------------------------------------------

    async def _run_batches(self) -> None:
        """Start every batch that is ready; when the limiter refuses one, wait for a released slot (or the idle pass)."""
        if self.gathering.blocked and time.monotonic() - self._gathering_blocked_at >= PARKED_IDLE_PASS_S:
            self.gathering.blocked = False
        while self.gathering.ready(time.monotonic()):
            items = self.gathering.take()
            if await self._launch_batch(items) == "refused":
                self.gathering.restore(items, time.monotonic())
                self.gathering.blocked = True
                self._gathering_blocked_at = time.monotonic()
                return

    async def _launch_batch(self, items: list[Gathered]) -> Launch:
        """One slot for the batch, the claims renewed (those no longer this replica's leave), the Job, then running.

        The Job's name is a hash of the scan ids first offered, so repeating a creation is a 409, not a second Job.
        """
        now = utcnow()
        batch_id = plan.batch_id_for([i.scan.scan_id for i in items])
        deadline = now + self.cfg.policy.job_deadline + self.cfg.policy.deadline_grace
        outcome = await self._acquire_slot(batch_id, now, deadline)
        if not outcome.ok:
            limit_waits.add(1, {"limit": outcome.reason})
            return "refused"
        policy = self.cfg.policy
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
            manifest = self._batch_manifest(batch_id, confirmed)
        except (msgspec.ValidationError, ValueError) as exc:
            await self._release(batch_id)
            for item, _ in confirmed:
                await self._fail(item.key, item.scan, f"the SBOM rescan Job could not be built: {exc}")
            return "failed"
        created = await self._create_batch(batch_id, confirmed, manifest)
        if created in ("created", "exists"):
            for item, _ in confirmed:
                running = functools.partial(plan.on_created, scan_id=item.scan.scan_id, now=utcnow(), policy=policy)
                await self._change(item.key, running)
        return created

    def _batch_manifest(self, batch_id: str, confirmed: list[tuple[Gathered, DigestScanState]]) -> jobspec.Manifest:
        """The rescan Job: per digest a presigned GET of its stored SBOM and a presigned PUT for its report."""
        options = self.cfg.jobs
        expires = self._url_lifetime_s()
        max_report_mb = self.settings.parser.max_report_mb
        items = [
            {
                "scan_id": item.scan.scan_id,
                "digest_ref": item.scan.digest_ref,
                "sbom_get_url": self.store.presign_get(storage.checked_key(state.sbom_key or ""), expires),
                "raw_put_url": self._upload_url(
                    storage.raw_key(item.scan.digest_ref, item.scan.scan_id), max_report_mb
                ),
            }
            for item, state in confirmed
        ]
        batch = msgspec.convert({"batch_id": batch_id, "items": items}, jobspec.SbomRescan)
        return jobspec.build_sbom_rescan_job(batch, options)

    async def _create_batch(
        self, batch_id: str, confirmed: list[tuple[Gathered, DigestScanState]], manifest: jobspec.Manifest
    ) -> Launch:
        """POST the batch Job: 409 is a repeated step. A refusal that will repeat fails every item (backoff applies)."""
        with tracer.start_as_current_span("create SBOM rescan Job", kind=SpanKind.CLIENT) as span:
            span.set_attribute("podsweep.batch_id", batch_id)
            span.set_attribute("podsweep.batch_size", len(confirmed))
            _carry_trace(manifest)
            try:
                await self.kube.request("POST", self.jobs_path, body=msgspec.json.encode(manifest))
            except KubeError as exc:
                if exc.status == 409:
                    return "exists"
                span.set_status(Status(StatusCode.ERROR, f"HTTP {exc.status}"))
                await self._release(batch_id)
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    for item, _ in confirmed:
                        await self._fail(item.key, item.scan, f"the API server refused the Job with {exc.status}")
                else:
                    # Transient: the claims stay pending, expire, and are resumed into a new batch.
                    log.warning("sbom rescan Job not created, will be retried", batch=batch_id, status=exc.status)
                return "failed"
        jobs_created.add(1, {"mode": "sbom"})
        self.hold = rejections.probing(self.hold, batch_id, utcnow()) or self.hold
        log.info("sbom rescan created", batch=batch_id, digests=len(confirmed))
        return "created"

    # -- podsweep rescan ---------------------------------------------------------------------------------------------

    async def on_rescan_requested(self, request: RescanRequested, _: busmod.Delivery) -> None:
        """Make the requested digests due (compare-and-set), answer with rescan.accepted, let the timers claim them.

        Claims, batches and every limit apply as for any due digest: a request only moves due times.
        """
        now = utcnow()
        keys, unknown = await self._requested_keys(request)
        due = 0
        for key in keys:
            answers: list[plan.RescanAnswer] = []
            await self._change(key, functools.partial(_make_due, now=now, policy=self.cfg.policy, answers=answers))
            if answers and answers[-1] in ("made_due", "in_flight"):
                due += 1
            if answers and answers[-1] == "made_due":
                self._set_timer(key, now)
        accepted = RescanAccepted(
            cluster=self.settings.cluster, request_id=request.request_id, due=due, unknown=unknown
        )
        await self.bus.publish(subjects.RESCAN_ACCEPTED, accepted, msg_id=f"rescan-accepted-{request.request_id}")
        self.wake.set()
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
            return rescans.keys_in_namespace(await self._workloads(), request.namespace), []
        keys: list[str] = []
        unknown: list[str] = []
        for ref in dict.fromkeys(request.digests):
            state, _ = await busmod.kv_read(self.scans, digest_hex(ref), DigestScanState)
            if state is None:
                unknown.append(ref)
            else:
                keys.append(digest_hex(ref))
        return keys, unknown

    async def _workloads(self) -> list[DigestWorkloads]:
        """Every digest's workloads, from one pass over the WORKLOADS bucket's latest values."""
        found, unreadable = await busmod.kv_documents(self.workloads, DigestWorkloads)
        for key in unreadable:
            log.warning("rescan skipped an unreadable workloads document", key=key)
        return found

    # -- the limiter -----------------------------------------------------------------------------------------------

    async def _acquire(self, scan: ScanPlan, now: datetime, deadline: datetime) -> limiter.Outcome:
        """Take a slot for the scan, releasing in the same write the finished scans' slots waiting for one."""
        outcomes: list[limiter.Outcome] = []
        carried: list[tuple[str, ...]] = []
        limits = self.cfg.limits

        def change(old: LimiterState | None) -> LimiterState | None:
            start = base = old or LimiterState()
            releasing = tuple(self._releasing)
            for slot_id in releasing:
                base = limiter.release(base, now, slot_id) or base
            new, outcome = limiter.try_acquire(
                base, now, scan_id=scan.scan_id, node=scan.node, deadline=deadline, limits=limits
            )
            outcomes.append(outcome)
            carried.append(releasing)
            if new is None and base is not start:
                return base  # refused (or held already), but the releases are written all the same
            return new

        if await self._limiter_change(change):
            self._releasing.difference_update(carried[-1])
        return outcomes[-1]

    async def _acquire_slot(self, slot_id: str, now: datetime, deadline: datetime) -> limiter.Outcome:
        """One global slot and no node slot: what an unpinned SBOM rescan batch holds."""
        outcomes: list[limiter.Outcome] = []
        limits = self.cfg.limits

        def change(old: LimiterState | None) -> LimiterState | None:
            new, outcome = limiter.try_acquire(
                old or LimiterState(), now, scan_id=slot_id, node=None, deadline=deadline, limits=limits
            )
            outcomes.append(outcome)
            return new

        await self._limiter_change(change)
        return outcomes[-1]

    async def _release(self, scan_id: str) -> None:
        def change(old: LimiterState | None) -> LimiterState | None:
            return None if old is None else limiter.release(old, utcnow(), scan_id)

        wrote = await self._limiter_change(change)
        self._releasing.discard(scan_id)  # released now (or by an acquire before this write, or never held)
        if wrote:
            self.gathering.blocked = False
            self.wake.set()

    async def _hand_over(self, slot_id: str) -> None:
        """Free a finished scan's slot. A parked scan that can start takes it in the same limiter write as its own
        acquire (one write where a release and an acquire were two, and one change for the other replica to see);
        with none, the slot is released on its own. Returns once the release is written: the event is acked after."""
        self._releasing.add(slot_id)
        try:
            if self.parked:
                async with self._parked_lock:
                    await self._start_parked()
        finally:
            if slot_id in self._releasing:
                await self._release(slot_id)

    async def _limiter_change(self, change: Callable[[LimiterState | None], LimiterState | None]) -> bool:
        """Compare-and-set on the limiter, starting from the state this replica last saw (no read when it is still
        current: the other replica's writes since only cost a failed write and a read). True when it wrote `change`.

        Changes asked for while a write is under way are applied together, in order, in the next write: this
        replica's handlers never race each other for the key, and a burst of acquires is one write, not one each.

        The limiter's mirror wakes nothing: the replica that freed a slot starts its own parked scans at once; the
        other looks at its next tick, by when that slot is usually taken (both chasing it costs lost CAS)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._limiter_queue.append((change, done))
        if not self._limiter_writing:
            self._limiter_writing = True
            batch: list[tuple[Callable[[LimiterState | None], LimiterState | None], asyncio.Future[bool]]] = []
            try:
                while self._limiter_queue:
                    batch, self._limiter_queue = self._limiter_queue, []
                    await self._limiter_write(batch)
            finally:
                self._limiter_writing = False
                for _, waiting in batch + self._limiter_queue:  # cancelled mid-write: nobody waits forever
                    if not waiting.done():
                        waiting.set_exception(RuntimeError("the limiter write was cancelled; try again"))
                self._limiter_queue = []
        return await done

    async def _limiter_write(
        self, batch: list[tuple[Callable[[LimiterState | None], LimiterState | None], asyncio.Future[bool]]]
    ) -> None:
        changed = [False] * len(batch)

        def combined(old: LimiterState | None) -> LimiterState | None:
            state = old
            for i, (change, _) in enumerate(batch):
                new = change(state)
                changed[i] = new is not None
                state = new if new is not None else state
            return state if any(changed) else None

        try:
            stored, revision, wrote = await busmod.kv_change(
                self.limits.kv, LIMITER_KEY, LimiterState, combined, known=self.limits.last(LIMITER_KEY)
            )
        except Exception as exc:
            for _, done in batch:
                if not done.done():  # a waiter cancelled meanwhile
                    done.set_exception(exc)
            return
        self.limits.saw(LIMITER_KEY, stored, revision)
        for i, (_, done) in enumerate(batch):
            if not done.done():
                done.set_result(wrote and changed[i])

    # -- background: parked claims, timers, the sweep --------------------------------------------------------------

    async def tend(self, stop: asyncio.Event) -> None:
        """Start parked scans as slots free up, and decide again about digests whose timer came due."""
        while not stop.is_set():
            wait = self._tend_wait()
            self._tend_due = time.monotonic() + wait
            await _wait(stop, wait, self.wake)
            self.wake.clear()
            try:
                await self._run_sightings()
                await self._run_timers()
                await self._run_batches()
                if self.parked:
                    await self._run_parked()
            except Exception as exc:  # this loop must outlive any one digest's trouble
                log.warning("parked scans will be tried again", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        # Stopping: hold no more sightings, and write those held (their events are acked before the consumer closes).
        self.holding = False
        await self._run_sightings(everything=True)

    def _tend_wait(self) -> float:
        """A tick while digests are parked or a batch gathers (a slot the other replica frees is only seen by
        looking); otherwise until the next timer. An idle replica then wakes a few times a minute, not twice a
        second."""
        if self.parked or len(self.gathering):
            wait = TICK_S
        elif self._timer_heap:
            wait = min(max((self._timer_heap[0][0] - utcnow()).total_seconds(), 0.0), IDLE_TEND_S)
        else:
            wait = IDLE_TEND_S
        held_due = self.sightings.next_due()
        if held_due is not None:
            wait = min(wait, max(held_due - time.monotonic(), 0.0))
        return wait

    def _look_within(self, seconds: float) -> None:
        """Wake the tend loop if it would not look again within `seconds` (it sleeps long while nothing waits)."""
        if time.monotonic() + seconds < self._tend_due:
            self.wake.set()

    def _set_timer(self, key: str, at: datetime) -> None:
        self.timers[key] = at
        heapq.heappush(self._timer_heap, (at, key))
        self._look_within((at - utcnow()).total_seconds())

    async def _run_timers(self) -> None:
        now = utcnow()
        while self._timer_heap and self._timer_heap[0][0] <= now:
            at, key = heapq.heappop(self._timer_heap)
            if self.timers.get(key) != at:
                continue  # replaced by a later setting
            del self.timers[key]
            await self.reconsider(key)

    async def _run_parked(self) -> None:
        idle = time.monotonic() - self._parked_pass_at >= PARKED_IDLE_PASS_S
        if idle:  # the watch keeps the view current; a read now and then covers a watch that fell behind
            await self._read_limiter()
        seen = (self.limits.revision(LIMITER_KEY), self.parked.generation)
        if seen == self._parked_seen and not idle:
            return  # no slot freed and nothing new parked since the last pass (expiries are caught by the idle pass)
        self._parked_seen, self._parked_pass_at = seen, time.monotonic()
        async with self._parked_lock:
            await self._start_parked()

    async def _start_parked(self) -> None:
        """Start parked scans, oldest first, while the limiter (as last seen) has room for them."""
        limits = self.cfg.limits
        while True:
            per_node, free = self._room(utcnow())
            keys = self.parked.candidates(per_node, limits.max_active_per_node, free)
            if not keys:
                return
            started = 0
            for key in keys:
                parked = self.parked.get(key)
                if parked is None:
                    continue
                if parked.scan is not None:
                    result = await self._resume(key, parked.scan)
                else:
                    self.parked.unpark(key)
                    result = await self.reconsider(key)
                if result in ("created", "exists", "stale", "gathered"):
                    started += 1
                elif result == "refused" and self._full(utcnow()):
                    return
            if started == 0:
                return

    def _full(self, now: datetime) -> bool:
        return self._room(now)[1] <= 0

    async def _resume(self, key: str, scan: ScanPlan) -> Launch | None:
        # No read first: _launch checks the claim once it holds the slot (a stale claim just hands the slot back).
        return await self._launch(key, scan)

    async def sweep(self, stop: asyncio.Event) -> None:
        """Every interval (with jitter), decide again about every digest: due rescans, expired claims, parked ones.

        The first pass comes as soon as the mirror is in: a replica that just took the lease over picks up what the
        last leader left waiting at once, not a sweep interval later."""
        first = True
        while not stop.is_set():
            interval = self.cfg.sweep_interval_s * (1 + self.cfg.sweep_jitter_ratio * random.random())  # noqa: S311
            if first:
                began = time.monotonic()
                while not self.mirror.ready and time.monotonic() - began < interval:
                    if await _wait(stop, TICK_S):
                        return
                first = False
            elif await _wait(stop, interval):
                return
            if not self.mirror.ready:
                log.warning("sweep skipped: the scan states are not mirrored yet (its KV watch is restarting)")
                continue
            todo = self._sweep_candidates()
            for key in todo:
                if stop.is_set():
                    return
                try:
                    await self.reconsider(key)
                except Exception as exc:  # the next sweep tries this digest again
                    log.warning("sweep skipped a digest", key=key, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            log.debug("sweep done", acted_on=len(todo), parked=len(self.parked))

    def _sweep_candidates(self) -> list[str]:
        """The digests a decision would change, from the mirror (nothing read).

        The decision on this snapshot only selects: each one is decided again with compare-and-set.
        """
        now = utcnow()
        active, room = self._view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        todo: list[str] = []
        for key, state in self.mirror.documents():
            if key in self.parked:
                continue
            decision = plan.decide(state, now, policy, active, limits, room=room)
            if decision.state is not None or decision.scan is not None or decision.why in _WAITING:
                todo.append(key)
        return todo

    def observe_active(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(limiter.live(self.limiter_view, utcnow()).slots))

    def observe_active_per_node(self, _: CallbackOptions) -> Iterable[Observation]:
        for node, count in limiter.active_per_node(self.limiter_view, utcnow()).items():
            yield Observation(count, {"node": node})


def _abandons(old: DigestScanState, decision: Decision) -> bool:
    """Whether the decision gives up the node scan `old` claimed (its claim expired without a scan event)."""
    new = decision.state
    return (
        old.status in ("pending", "running")
        and old.node is not None
        and new is not None
        and (new.scan_id != old.scan_id or new.status not in ("pending", "running"))
    )


def _make_due(
    old: DigestScanState | None, *, now: datetime, policy: plan.Policy, answers: list[plan.RescanAnswer]
) -> DigestScanState | None:
    if old is None:
        return None
    new, answer = plan.make_due(old, now, policy)
    answers.append(answer)
    return new


def _carry_trace(manifest: jobspec.Manifest) -> None:
    """Put the current span's traceparent on the Job: the watcher's scan.* events continue this trace from it."""
    carried = telemetry.traceparent()
    if carried is not None:
        manifest["metadata"]["annotations"][jobs.TRACEPARENT_ANNOTATION] = carried


async def _wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Sleep up to `seconds`, less when `stop` (or `wake`) is set; True when stopping."""
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return stop.is_set()


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


def _observe_limits(_: CallbackOptions) -> Iterable[Observation]:
    """The configured limits, so a dashboard can draw the active Jobs against them."""
    if not _replicas:
        return ()
    configured = _replicas[-1].settings.dispatcher
    return [
        Observation(configured.max_active, {"limit": "max_active"}),
        Observation(configured.max_active_per_node, {"limit": "max_active_per_node"}),
        Observation(configured.max_created_per_minute, {"limit": "max_created_per_minute"}),
    ]


meter.create_observable_gauge(
    "podsweep_dispatcher_limit", [_observe_limits], description="The dispatcher's configured scan limits, by limit"
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
                while await lease.acquire(stop):
                    lost, ending = asyncio.Event(), asyncio.Event()  # ending: a shutdown or the lease lost
                    helpers = [
                        asyncio.create_task(lease.keep(lost), name="dispatcher-lease"),
                        asyncio.create_task(_set_on_first(ending, stop, lost), name="dispatcher-lease-end"),
                    ]
                    try:
                        await _lead(settings, cfg, service.bus, kube, service.require_store(), ending)
                    finally:
                        for helper in helpers:
                            helper.cancel()
                        await asyncio.gather(*helpers, return_exceptions=True)
                    if not lost.is_set():
                        await lease.release()
                        return
            finally:
                HEALTH.set("dispatcher:running", False)
    finally:
        await kube.close()


async def _set_on_first(target: asyncio.Event, *events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        target.set()
    finally:
        for waiting in waits:
            waiting.cancel()


async def _lead(
    settings: Settings, cfg: Configured, bus: busmod.Bus, kube: Kube, store: ObjectStore, stop: asyncio.Event
) -> None:
    """Consume and dispatch until `stop` (a shutdown, or the lease lost): a fresh replica state each time."""
    dispatcher = Dispatcher(settings=settings, cfg=cfg, bus=bus, kube=kube, store=store)
    await dispatcher.open()
    _replicas.append(dispatcher)
    background = [
        asyncio.create_task(dispatcher.tend(stop), name="dispatcher-tend"),
        asyncio.create_task(dispatcher.sweep(stop), name="dispatcher-sweep"),
        asyncio.create_task(dispatcher.limits.follow(stop), name="dispatcher-limiter-watch"),
        asyncio.create_task(dispatcher.mirror.follow(stop), name="dispatcher-scans-watch"),
    ]
    routes: dict[str, busmod.Route[Any]] = {
        subjects.IMAGE_SEEN: busmod.Route(ImageSeen, dispatcher.on_image_seen),
        subjects.IMAGE_GONE: busmod.Route(ImageGone, dispatcher.on_image_gone),
        subjects.SCAN_STARTED: busmod.Route(ScanStarted, dispatcher.on_scan_started),
        subjects.SCAN_COMPLETED: busmod.Route(ScanCompleted, dispatcher.on_scan_completed),
        subjects.SCAN_FAILED: busmod.Route(ScanFailed, dispatcher.on_scan_failed),
        subjects.REPORT_QUARANTINED: busmod.Route(ReportQuarantined, dispatcher.on_report_quarantined),
        subjects.RESCAN_REQUESTED: busmod.Route(RescanRequested, dispatcher.on_rescan_requested),
    }
    log.info(
        "dispatcher consuming",
        namespace=cfg.jobs.namespace,
        max_active=cfg.limits.max_active,
        max_active_per_node=cfg.limits.max_active_per_node,
        max_created_per_minute=cfg.limits.max_created_per_minute,
    )
    try:
        await busmod.consume(
            bus,
            service=SERVICE,
            durable=DURABLE,
            routes=routes,
            settings=settings.consumer,
            stop=stop,
        )
    finally:
        if not stop.is_set():
            for task in background:
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        _replicas.remove(dispatcher)
