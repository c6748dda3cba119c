"""The notifier service: `report.stored` (and `report.reached`: a stored report reaching a workload new to its
digest, in any cluster of the fleet) → decide → per-destination outbox → HTTP delivery.

A thin shell: every decision is in decide.py, outbox.py, destinations.py and retry.py. Reads S3 and KV, writes
the outbox, fingerprints and audit events; never touches Kubernetes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from datetime import UTC, datetime

import aiohttp
import msgspec
from nats.js.kv import KeyValue

from podsweep import aio, logs
from podsweep import bus as busmod
from podsweep.config import ConsumerSettings, Settings
from podsweep.health import HEALTH
from podsweep.natsaccess import Bucket, Durable, NatsAccess
from podsweep.objectstore import ObjectStore
from podsweep.policy import Policy
from podsweep.service import open_service
from schemas import subjects
from schemas.alerts import NotifyFingerprint
from schemas.events import ReportReached, ReportStored
from schemas.refs import digest_hex
from schemas.report import Report
from schemas.state import DELIVERED_BUCKET, NOTIFY_BUCKET, WORKLOADS_BUCKET, DigestWorkloads
from services.notifier.decide import decide
from services.notifier.delivery import Deliverer, session
from services.notifier.outbox import OutboxEntry, advance, drop_stale, entries, fingerprint_keys, msg_id
from services.notifier.policysource import PolicySource

SERVICE = "notifier"
# What it does on NATS (podsweep/natsaccess.py): deploy/base/nats/accounts.conf is generated from this.
NATS = NatsAccess(
    service=SERVICE,
    publishes=(subjects.ALERT_SENT, subjects.ALERT_FAILED),
    durables=(Durable(SERVICE, (subjects.REPORT_STORED, subjects.REPORT_REACHED)),),
    buckets=(Bucket(WORKLOADS_BUCKET, writes=False), Bucket(NOTIFY_BUCKET), Bucket(DELIVERED_BUCKET)),
    outbox=True,
)
log = logs.get("podsweep.notifier")
_report_decoder = msgspec.json.Decoder(Report)


class ReportHandler:
    """Decides one `report.stored` and enqueues what it decided before remembering it."""

    def __init__(
        self,
        bus: busmod.Bus,
        store: ObjectStore,
        policies: PolicySource,
        settings: Settings,
        workloads: KeyValue,
        notify: KeyValue,
        client: aiohttp.ClientSession,
    ) -> None:
        self.client = client
        self.bus = bus
        self.store = store
        self.policies = policies
        self.settings = settings
        self.workloads = workloads
        self.notify = notify
        self.max_report_bytes = int(settings.s3.max_object_mb * 1024 * 1024)

    async def handle(self, event: ReportStored, delivery: busmod.Delivery) -> None:
        started = time.perf_counter()
        policy = self.policies.policy
        (report, read_s), (doc, _) = await asyncio.gather(
            self._timed_report(event, started),
            busmod.kv_read(self.workloads, digest_hex(event.digest_ref), DigestWorkloads),
        )
        runs = doc.runs if doc is not None else []
        wait = self.settings.notifier
        if not runs and delivery.deliveries < wait.workloads_wait_deliveries:
            raise busmod.Retry(f"no workload is known to run {event.digest_ref} yet", wait.workloads_wait_s)
        keys = fingerprint_keys(event, runs)
        found = await asyncio.gather(*(busmod.kv_read(self.notify, key, NotifyFingerprint) for key in keys))
        known = dict(zip(keys, found, strict=True))
        previous = {key: fp for key, (fp, _) in known.items() if fp is not None}
        decision = drop_stale(decide(event, report, runs, policy, previous, datetime.now(UTC)), previous, event)
        scan_date = (report.scanned_at or event.stored_at).date()
        queued = entries(decision, event, runs, policy, scan_date)
        # Enqueue first, remember second: a crash in between re-decides, and the outbox drops the duplicate ids.
        # Each step's writes go together (one flush to the server, not one round trip each).
        await asyncio.gather(
            *(self.bus.publish(e.destination, e, msg_id=msg_id(e), stream=self.bus.outbox) for e in queued)
        )
        await asyncio.gather(
            *(
                busmod.kv_change(
                    self.notify,
                    key,
                    NotifyFingerprint,
                    functools.partial(advance, new=msgspec.structs.replace(fp, stored_at=event.stored_at)),
                    known=known.get(key),  # the revision read above: no second read unless someone wrote since
                )
                for key, fp in decision.fingerprints.items()
            )
        )
        log.info(
            "report decided",
            digest=event.digest_ref,
            scan_id=event.scan_id,
            workloads=len(keys),
            alerts=len(decision.alerts),
            uploads=len(decision.uploads),
            queued=len(queued),
            read_ms=round(read_s * 1000, 1),
            total_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def _timed_report(self, event: ReportStored, started: float) -> tuple[Report, float]:
        report = await self._report(event)
        return report, time.perf_counter() - started

    async def _report(self, event: ReportStored) -> Report:
        """The report this event is about: its history copy (latest.json may already be a newer scan)."""
        data = await self.store.fetch(self.client, event.history_key, self.max_report_bytes)
        key = event.history_key
        if data is None:
            key = event.report_key
            data = await self.store.fetch(self.client, key, self.max_report_bytes)
            if data is None:
                raise RuntimeError(
                    f"report {event.history_key} (and {event.report_key}) is not in bucket {self.store.bucket}; "
                    "the parser stores it before publishing report.stored: check the bucket name"
                ) from None
        try:
            return _report_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise busmod.Reject(f"report {key} is not a podsweep Report: {exc}") from None


def outbox_consumer_settings(settings: Settings) -> ConsumerSettings:
    """The loop's own limit sits above retry_max_attempts: the Deliverer gives up (and says so) first."""
    n = settings.notifier
    return ConsumerSettings(
        max_deliver=n.retry_max_attempts + 1,
        backoff_s=[n.retry_base_s],
        ack_wait_s=n.outbox_ack_wait_s,
        # Alerts are handed to the destination's pacer at once (it settles them later): pull many, so a storm's
        # alerts gather in a few rounds; uploads still take a handler each.
        batch=max(n.outbox_concurrency * 2, 256),
        concurrency=n.outbox_concurrency,
    )


class Outboxes:
    """One durable consumer per destination on the outbox stream, named after the destination and started as the
    policy names them (and never stopped before `stop`)."""

    def __init__(
        self, bus: busmod.Bus, deliverer: Deliverer, settings: Settings, stop: asyncio.Event, group: asyncio.TaskGroup
    ) -> None:
        self.bus = bus
        self.deliverer = deliverer
        self.consumer = outbox_consumer_settings(settings)
        self.stop = stop
        self.group = group
        self.running: set[str] = set()

    def ensure(self, policy: Policy) -> None:
        for dest in policy.destinations:
            if dest.name in self.running:
                continue
            self.running.add(dest.name)
            self.group.create_task(
                busmod.consume(
                    self.bus,
                    service=SERVICE,
                    durable=dest.name,
                    routes={dest.name: busmod.Route(OutboxEntry, self.deliverer.handle)},
                    settings=self.consumer,
                    stop=self.stop,
                    stream=self.bus.outbox,
                )
            )
            log.info("outbox consuming", destination=dest.name)


async def _watch_policy(policies: PolicySource, outboxes: Outboxes, every_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        outboxes.ensure(policies.refresh())
        await aio.sleep_unless(stop, every_s)


async def _close_when_stopped(deliverer: Deliverer, stop: asyncio.Event) -> None:
    await stop.wait()
    await deliverer.close()


async def main(settings: Settings, stop: asyncio.Event) -> None:
    policies = PolicySource(settings.notifier.policy_file)
    policies.load()  # an invalid policy stops the start, naming its line and key
    HEALTH.set("notifier:consuming", False)
    async with open_service(SERVICE, settings, s3=True, access=NATS) as service:
        bus, store = service.bus, service.require_store()
        await busmod.ensure_stream(bus, bus.outbox)
        workloads = await bus.kv(WORKLOADS_BUCKET)
        notify = await bus.kv(NOTIFY_BUCKET)
        delivered = await bus.kv(DELIVERED_BUCKET, ttl_s=settings.notifier.delivered_ttl_h * 3600)
        async with session(settings) as client:
            deliverer = Deliverer(bus, store, policies, settings, client, delivered, os.environ, stop)
            reports = ReportHandler(bus, store, policies, settings, workloads, notify, client)
            async with asyncio.TaskGroup() as group:
                group.create_task(_close_when_stopped(deliverer, stop))
                outboxes = Outboxes(bus, deliverer, settings, stop, group)
                outboxes.ensure(policies.refresh())
                group.create_task(_watch_policy(policies, outboxes, settings.notifier.policy_poll_s, stop))
                group.create_task(
                    busmod.consume(
                        bus,
                        service=SERVICE,
                        durable=SERVICE,
                        routes={
                            subjects.REPORT_STORED: busmod.Route(ReportStored, reports.handle),
                            subjects.REPORT_REACHED: busmod.Route(ReportReached, reports.handle),
                        },
                        settings=settings.consumer,
                        stop=stop,
                    )
                )
                HEALTH.set("notifier:consuming", True)
    HEALTH.set("notifier:consuming", False)
