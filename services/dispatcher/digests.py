"""Carries out plan.py's decisions about digests: compare-and-set on their scan states, then start, park, gather or
time what was decided. Reaches NATS only through the scan states and the limiter key it is given (tests give it
in-memory ones), the API server through launcher.py, when to look again through schedule.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import NamedTuple, Protocol, TypeVar

import msgspec
from nats.js.kv import KeyValue
from opentelemetry import metrics

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.kube import KubeError
from schemas import jobs
from schemas.events import ScanFailed
from schemas.refs import digest_hex
from schemas.state import DigestScanState
from services.dispatcher import livejobs, plan
from services.dispatcher.batching import Gathered, Gathering
from services.dispatcher.launcher import Launcher
from services.dispatcher.parking import Parked
from services.dispatcher.plan import Decision, ScanPlan
from services.dispatcher.schedule import TICK_S, Launch, Schedule
from services.dispatcher.settings import Configured
from services.dispatcher.slots import LimiterKey, Slots

log = logs.get("podsweep.dispatcher")
meter = metrics.get_meter("podsweep.dispatcher")
retries = meter.create_counter("podsweep_dispatcher_retries", description="Scans claimed again after a failure")
limit_waits = meter.create_counter(
    "podsweep_dispatcher_limit_waits", description="Claimed scans that waited for a limit, by the limit"
)
# Scan states kept decoded in the mirror: the digests whose events came lately (a digest's events come in bursts).
MIRROR_DECODED = 4096
WAITING = ("nodes_full", "limited")  # decisions that park a digest until a slot frees
D = TypeVar("D")
Made = tuple[Decision, tuple[str, ...], DigestScanState | None]  # a decision, the digest's nodes, the state before


def utcnow() -> datetime:
    return datetime.now(UTC)


async def scan_jobs(
    get: Callable[[str, Mapping[str, str | int | bool]], Awaitable[bytes]], path: str
) -> list[livejobs.ExistingJob]:
    """Every scan Job podsweep made under `path` (its label), a page of 500 at a time."""
    found: list[livejobs.ExistingJob] = []
    token = ""
    while True:
        params: dict[str, str | int | bool] = {
            "labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}",
            "limit": 500,
        }
        if token:
            params["continue"] = token
        page, token = livejobs.decode_page(await get(path, params))
        found.extend(page)
        if not token:
            return found


class ScanStates(Protocol):
    """The scans bucket as this replica sees it: a mirror kept current by its watch, reads, and compare-and-set."""

    def known(self, key: str) -> tuple[DigestScanState | None, int] | None: ...

    def documents(self) -> Iterable[tuple[str, DigestScanState]]: ...

    async def read(self, key: str) -> tuple[DigestScanState | None, int]: ...

    async def write(
        self,
        key: str,
        decide: Callable[[DigestScanState | None], tuple[DigestScanState | None, D]],
        known: tuple[DigestScanState | None, int] | None,
        fresh: bool,
    ) -> tuple[DigestScanState | None, int, bool, D]: ...


class MirroredStates:
    """The scans bucket in NATS KV through a KvMirror; what this replica writes goes into the mirror at once. A
    fleet's digests are many: the mirror keeps their bytes, and only the states of the digests handled lately
    decoded (MIRROR_DECODED)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.mirror = busmod.KvMirror(kv, DigestScanState, decoded=MIRROR_DECODED)

    def known(self, key: str) -> tuple[DigestScanState | None, int] | None:
        return self.mirror.known(key)

    def documents(self) -> Iterable[tuple[str, DigestScanState]]:
        return self.mirror.documents()

    async def read(self, key: str) -> tuple[DigestScanState | None, int]:
        return await busmod.kv_read(self.kv, key, DigestScanState)

    async def write(
        self,
        key: str,
        decide: Callable[[DigestScanState | None], tuple[DigestScanState | None, D]],
        known: tuple[DigestScanState | None, int] | None,
        fresh: bool,
    ) -> tuple[DigestScanState | None, int, bool, D]:
        found = await busmod.kv_decide(self.kv, key, DigestScanState, decide, known=known, fresh=fresh)
        if found[2]:
            self.mirror.saw(key, found[0], found[1])
        return found


class Written(NamedTuple):
    """A decision as compare-and-set left it: the digest's nodes, the revision written (0: none), the state before."""

    decision: Decision
    nodes: tuple[str, ...]
    revision: int
    before: DigestScanState | None


class Digests:
    """One replica's scan states (KV and its mirror) and what carries their decisions out."""

    def __init__(
        self,
        *,
        settings: Settings,
        cfg: Configured,
        states: ScanStates,
        limiter_key: LimiterKey,
        launcher: Launcher,
        schedule: Schedule,
        gathering: Gathering,
    ) -> None:
        self.settings, self.cfg, self.states = settings, cfg, states
        self.limiter_key = limiter_key
        self.slots = Slots(limiter_key, cfg.limits, utcnow)
        self.launcher, self.schedule, self.gathering = launcher, schedule, gathering

    async def count_existing_jobs(self, get: Callable[[str, Mapping[str, str | int | bool]], Awaitable[bytes]]) -> None:
        """Count every unfinished scan Job against the limits, and delete those no claim wants (livejobs.py)."""
        found = await scan_jobs(get, self.launcher.jobs_path)
        states: dict[str, DigestScanState | None] = {}
        for job in found:
            ref = livejobs.digest_of(job)
            if ref is not None and ref not in states and not livejobs.finished(job):
                states[ref] = (await self.states.read(digest_hex(ref)))[0]
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

    def room(self, now: datetime) -> tuple[dict[str, int], int]:
        """Live slots per node and how many Jobs may start now, as last seen, and no more than a hold allows."""
        room, allowed = self.slots.room(now), self.launcher.allowance(now)
        return room.per_node, room.free if allowed is None else min(room.free, allowed)

    def view(self, now: datetime) -> tuple[dict[str, int], bool]:
        per_node, free = self.room(now)
        return per_node, free > 0

    # -- deciding and carrying out ---------------------------------------------------------------------------------

    async def update(
        self, key: str, decide: Callable[[DigestScanState | None], Decision], seen_on: tuple[str, ...] = ()
    ) -> Written:
        """Apply a pure decision with compare-and-set. A decision that was not written (the state did not change)
        never carries a scan: only the writer of a claim carries it out."""

        def change(old: DigestScanState | None) -> tuple[DigestScanState | None, Made]:
            decision = decide(old)
            nodes = tuple(old.nodes_seen) if old is not None else ()
            nodes = (*nodes, *(n for n in dict.fromkeys(seen_on) if n not in nodes))
            return decision.state, (decision, nodes, old)

        _, revision, wrote, (decision, nodes, before) = await self.decide(key, change)
        if not wrote and decision.scan is not None:
            return Written(Decision(None, None, "claimed", decision.recheck_at), nodes, 0, before)
        return Written(decision, nodes, revision if wrote else 0, before)

    async def decide(
        self,
        key: str,
        decide: Callable[[DigestScanState | None], tuple[DigestScanState | None, D]],
        known: tuple[DigestScanState | None, int] | None = None,
    ) -> tuple[DigestScanState | None, int, bool, D]:
        """Compare-and-set on a digest's state, from `known` or else the mirror (a read only when the mirror cannot
        say, or a write lost to another replica)."""
        return await self.states.write(key, decide, known or self.states.known(key), known is None)

    async def change(
        self,
        key: str,
        change: Callable[[DigestScanState | None], DigestScanState | None],
        known: tuple[DigestScanState | None, int] | None = None,
    ) -> tuple[DigestScanState | None, int, bool]:
        stored, revision, wrote, _ = await self.decide(key, lambda old: (change(old), None), known)
        return stored, revision, wrote

    async def follow(self, key: str, written: Written) -> Launch | None:
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
            return await self.launch(key, decision.scan, claimed)
        if decision.why in WAITING:
            limit_waits.add(1, {"limit": "node_full" if decision.why == "nodes_full" else "limited"})
            self.schedule.parked.park(key, None, nodes)
            self.schedule.look_within(TICK_S)
        elif decision.why in ("backoff", "not_due", "gave_up", "recorded") and decision.recheck_at is not None:
            self.schedule.set_timer(key, decision.recheck_at)
        return None

    def on_failed(self, failed: ScanFailed, now: datetime) -> Callable[[DigestScanState | None], Decision]:
        """plan.on_failed for `failed`, with the limiter's room as last seen."""
        active, room = self.view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        return lambda old: plan.on_failed(old, failed, now, policy, active, limits, room=room)

    async def reconsider(self, key: str) -> Launch | None:
        """Decide again about one digest (the sweep, timers and parked digests all come here)."""
        now = utcnow()
        active, room = self.view(now)
        policy, limits = self.cfg.policy, self.cfg.limits

        def decide(old: DigestScanState | None) -> Decision:
            return (
                Decision(None, None, "stale")
                if old is None
                else plan.decide(old, now, policy, active, limits, room=room)
            )

        written = await self.update(key, decide)
        old = written.before
        if written.revision and old is not None and old.scan_id and plan.abandons(old, written.decision):
            await self.launcher.delete(old.scan_id)  # a claim that expired without a scan event: its Job is given up
        return await self.follow(key, written)

    async def launch(self, key: str, scan: ScanPlan, claimed: tuple[DigestScanState, int] | None = None) -> Launch:
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
            state, revision = self.states.known(key) or await self.states.read(key)
        self.schedule.parked.unpark(key)
        if state is None or state.scan_id != scan.scan_id or state.status not in ("pending", "running"):
            await self.release(scan.scan_id)  # finished or given up while this replica waited: the slot is not needed
            return "stale"
        if state.status == "running":
            return "exists"  # another replica (or this one, earlier) created it
        try:
            manifest = self.launcher.node_scan(scan)
        except (msgspec.ValidationError, ValueError) as exc:
            await self.release(scan.scan_id)
            await self.fail(key, scan, f"the scan Job could not be built: {exc}")
            return "failed"
        try:
            created, status = await self.launcher.create(
                manifest,
                slot_id=scan.scan_id,
                mode=scan.mode,
                now=utcnow(),
                span_name="create scan Job",
                attributes={"podsweep.scan_id": scan.scan_id, "podsweep.node": scan.node or ""},
            )
        except KubeError:
            await self.release(scan.scan_id)
            raise
        if created == "refused":
            await self.release(scan.scan_id)
            await self.fail(key, scan, f"the API server refused the Job with {status}")
            return "failed"
        if created == "created":
            log.info("scan created", digest=scan.digest_ref, scan_id=scan.scan_id, node=scan.node, attempt=scan.attempt)
        await self.change(key, lambda old: plan.on_created(old, scan.scan_id, utcnow(), policy), (state, revision))
        return created

    async def fail(self, key: str, scan: ScanPlan, message: str) -> None:
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
        written = await self.update(key, self.on_failed(failed, now))
        if written.decision.scan is None:
            await self.follow(key, written)
        else:  # never launch from inside a launch: the timer or the sweep picks the retry up
            self.schedule.set_timer(key, now)

    async def launch_batch(self, items: list[Gathered]) -> Launch:
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
            stored, _, wrote = await self.change(item.key, renew)
            if wrote and stored is not None and stored.sbom_key is not None:
                confirmed.append((item, stored))
        if not confirmed:
            await self.release(batch_id)
            return "stale"
        try:
            manifest = self.launcher.sbom_rescan(batch_id, confirmed)
        except (msgspec.ValidationError, ValueError) as exc:
            return await self._batch_failed(batch_id, confirmed, f"the SBOM rescan Job could not be built: {exc}")
        try:
            created, status = await self.launcher.create(
                manifest,
                slot_id=batch_id,
                mode="sbom",
                now=utcnow(),
                span_name="create SBOM rescan Job",
                attributes={"podsweep.batch_id": batch_id, "podsweep.batch_size": len(confirmed)},
            )
        except KubeError as exc:  # transient: the claims stay pending, expire, and are resumed into a new batch
            await self.release(batch_id)
            log.warning("sbom rescan Job not created, will be retried", batch=batch_id, status=exc.status)
            return "failed"
        if created == "refused":
            return await self._batch_failed(batch_id, confirmed, f"the API server refused the Job with {status}")
        if created == "created":
            log.info("sbom rescan created", batch=batch_id, digests=len(confirmed))
        for item, _ in confirmed:
            await self.change(
                item.key, functools.partial(plan.on_created, scan_id=item.scan.scan_id, now=utcnow(), policy=policy)
            )
        return created

    async def _batch_failed(
        self, batch_id: str, confirmed: list[tuple[Gathered, DigestScanState]], message: str
    ) -> Launch:
        """A batch Job that will never be created: its slot back, every item a failed attempt (backoff applies)."""
        await self.release(batch_id)
        for item, _ in confirmed:
            await self.fail(item.key, item.scan, message)
        return "failed"

    # -- slots freed, and the background: tend loop and sweep ------------------------------------------------------

    async def release(self, slot_id: str) -> None:
        if await self.slots.release(slot_id):
            self.gathering.blocked = False
            self.schedule.wake.set()

    async def hand_over(self, slot_id: str) -> None:
        """Free a finished scan's slot. A parked scan that can start takes it in the same limiter write as its own
        acquire (one write where a release and an acquire were two); with none, the slot is released on its own.
        Returns once the release is written: the event is acked after."""
        self.slots.releasing.add(slot_id)
        try:
            if self.schedule.parked:
                async with self.schedule.parked_lock:
                    await self.start_parked()
        finally:
            if slot_id in self.slots.releasing:
                await self.release(slot_id)

    async def start_parked(self) -> None:
        await self.schedule.start_parked(lambda: self.room(utcnow()), self.cfg.limits.max_active_per_node, self.unpark)

    async def unpark(self, key: str, parked: Parked) -> Launch | None:
        if parked.scan is not None:  # no read first: _launch checks the claim once it holds the slot
            return await self.launch(key, parked.scan)
        self.schedule.parked.unpark(key)
        return await self.reconsider(key)

    async def tend_once(self) -> None:
        """Decide again where a timer came due, send off the batches that are ready, start parked digests."""
        for key in self.schedule.due(utcnow()):
            await self.reconsider(key)
        while self.gathering.ready(time.monotonic()):
            items = self.gathering.take()
            if await self.launch_batch(items) == "refused":  # wait for a released slot (or the idle pass)
                self.gathering.refused(items, time.monotonic())
        if self.schedule.parked:
            idle = self.schedule.idle_pass_due()
            if idle:
                await self.limiter_key.read()
            if self.schedule.parked_pass(self.slots.revision, idle):
                async with self.schedule.parked_lock:
                    await self.start_parked()

    def sweep_candidates(self) -> list[str]:
        """The digests a decision would change, from the mirror (nothing read). The decision on this snapshot only
        selects: each one is decided again with compare-and-set."""
        now = utcnow()
        active, room = self.view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        todo: list[str] = []
        for key, state in self.states.documents():
            if key not in self.schedule.parked:
                decision = plan.decide(state, now, policy, active, limits, room=room)
                if decision.state is not None or decision.scan is not None or decision.why in WAITING:
                    todo.append(key)
        return todo
