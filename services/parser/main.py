"""The parser service: `scan.completed` → stored report, history, SBOM and `report.stored`; `image.seen` → who runs
a digest. The index/ pages follow through the indexer.

A thin shell around stored.py, sbom.py and podsweep/reports/normalize.py. Reads uploads from S3, writes reports
and index; never touches Kubernetes, and never reads an object whose key it did not derive from the event's digest
and scan id.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import msgspec
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.health import HEALTH
from podsweep.natsaccess import Bucket, Durable, NatsAccess
from podsweep.objectstore import ObjectMissing, ObjectStore, ObjectTooLarge
from podsweep.reports import normalize, trivy
from podsweep.service import open_service
from podsweep.workloads import adds_run, record_seen
from schemas import storage, subjects
from schemas.events import ImageSeen, QuarantinedObject, QuarantineKind, ReportStored, ScanCompleted
from schemas.index import DigestSummary, PackageVersion
from schemas.refs import digest_hex
from schemas.report import Report
from schemas.state import SCANS_BUCKET, SUMMARIES_BUCKET, WORKLOADS_BUCKET, DigestScanState, DigestWorkloads
from services.parser import html, sbom, stored
from services.parser.indexer import HTML, Indexer, postings_for

SERVICE = "parser"
# What it does on NATS (podsweep/natsaccess.py): deploy/base/nats/accounts.conf is generated from this.
NATS = NatsAccess(
    service=SERVICE,
    publishes=(subjects.REPORT_STORED, subjects.REPORT_QUARANTINED, subjects.REPORT_REACHED),
    durables=(Durable(SERVICE, (subjects.SCAN_COMPLETED, subjects.IMAGE_SEEN)),),
    buckets=(Bucket(SUMMARIES_BUCKET), Bucket(WORKLOADS_BUCKET), Bucket(SCANS_BUCKET, writes=False)),
)
MB = 1024 * 1024
# Reports above this are parsed in a worker thread so a large one does not stall the event loop.
THREAD_PARSE_BYTES = 2 * MB

log = logs.get("podsweep.parser")
tracer = trace.get_tracer("podsweep.parser")
meter = metrics.get_meter("podsweep.parser")
reports_stored = meter.create_counter("podsweep_reports_stored", description="Reports stored, by scan mode")
quarantined_total = meter.create_counter(
    "podsweep_uploads_quarantined", description="Uploads quarantined, by object (report, sbom) and kind"
)
parse_seconds = meter.create_histogram("podsweep_report_parse_seconds", unit="s", description="Parse + normalize")
scan_seconds = meter.create_histogram(
    "podsweep_scan_duration_seconds", unit="s", description="Scan Job start to completion, by scan mode"
)

_encoder = msgspec.json.Encoder()
_report_decoder = msgspec.json.Decoder(Report)
_stored_decoder = msgspec.json.Decoder(ReportStored)


class Parser:
    def __init__(
        self,
        bus: busmod.Bus,
        store: ObjectStore,
        settings: Settings,
        summaries: KeyValue,
        workloads: KeyValue,
        scans: KeyValue,
    ) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings.parser
        self.summaries = summaries
        self.workloads = workloads
        self.scans = scans
        self.max_report = int(settings.parser.max_report_mb * MB)
        self.max_sbom = int(settings.parser.max_sbom_mb * MB)

    # -- image.seen ---------------------------------------------------------------------------------------------
    async def seen(self, event: ImageSeen, _: busmod.Delivery) -> None:
        """Record who runs the digest (a KV write only when something changed: resyncs are mostly reads). A workload
        new to a digest whose report is stored (another cluster of the fleet, or one started later) gets that report
        by report.reached: the notifier decides it for the workload now, not at the next rescan."""
        hex_ = digest_hex(event.digest_ref)
        added: list[bool] = []

        def change(doc: DigestWorkloads | None) -> DigestWorkloads | None:
            added.append(adds_run(doc, event))
            return record_seen(doc, event)

        wrote = (await busmod.kv_update(self.workloads, hex_, DigestWorkloads, change))[1]
        if not (wrote and added[-1]):
            return
        summary = (await busmod.kv_read(self.summaries, hex_, DigestSummary))[0]
        if summary is None:  # no report yet: its report.stored will find this workload in the KV
            return
        reached = stored.report_reached(summary, event, datetime.now(UTC))
        await self.bus.publish(subjects.REPORT_REACHED, reached, msg_id=stored.reached_msg_id(reached))
        log.info(
            "report reached a workload",
            digest=event.digest_ref,
            scan_id=summary.scan_id,
            cluster=event.cluster,
            namespace=event.namespace,
            workload=f"{event.workload.kind}/{event.workload.name}",
        )

    # -- scan.completed -----------------------------------------------------------------------------------------
    async def completed(self, event: ScanCompleted, delivery: busmod.Delivery) -> None:
        if event.raw_key != storage.raw_key(event.digest_ref, event.scan_id):
            raise busmod.Reject(f"raw_key {event.raw_key} is not this scan's upload key; refusing to read it")
        if event.sbom_key is not None and event.sbom_key != storage.sbom_key(event.digest_ref, event.scan_id):
            raise busmod.Reject(f"sbom_key {event.sbom_key} is not this scan's SBOM key; refusing to read it")
        hex_ = digest_hex(event.digest_ref)
        summary, _ = await busmod.kv_read(self.summaries, hex_, DigestSummary)
        step = stored.step_for(summary, event)
        if step == "done":
            await self._republish(event)
            return
        report = await self._read_report(event, delivery)
        if report is None:
            return  # quarantined
        report = await self._with_running_state(report, hex_)
        if step == "stale":
            key = storage.history_report_key(event.digest_ref, event.finished_at)
            await self.store.put(key, _encoder.encode(report))
            log.info("older scan kept in history only", digest=event.digest_ref, scan_id=event.scan_id, key=key)
            return
        kept = await self._sbom(event, report)  # first: the stored event names it
        latest = await self._latest(event)
        if latest is not None and latest.scan_id == event.scan_id:
            # A redelivery after latest.json was written: the event stored beside it is the one to publish.
            out = await self._stored_event(event) or stored.report_stored(event, report, report, _now(), kept)
        else:
            out = stored.report_stored(event, report, latest, _now(), kept)
            with tracer.start_as_current_span("s3 put report"):
                # History first, latest last: a crash in between leaves history complete and latest one scan behind.
                await self.store.put(out.history_key, _encoder.encode(report))
                await self.store.put(storage.stored_event_key(event.digest_ref, event.scan_id), _encoder.encode(out))
                await self.store.put(out.report_key, _encoder.encode(report))
        sbom_key = kept.key if kept is not None else None
        new_summary = stored.digest_summary(event, report, out, sbom_key)
        await self._digest_page(report, new_summary)
        await self._postings(event, report, kept.packages if kept is not None else None)  # before the summary
        await busmod.kv_update(self.summaries, hex_, DigestSummary, lambda old: stored.newer_summary(old, new_summary))
        await self.bus.publish(subjects.REPORT_STORED, out, msg_id=stored.stored_msg_id(event.scan_id))
        reports_stored.add(1, {"mode": event.mode})
        if event.started_at is not None:  # counted where the report lands: once per scan, whichever replica
            scan_seconds.record(max(0.0, (event.finished_at - event.started_at).total_seconds()), {"mode": event.mode})
        log.info(
            "report stored",
            digest=event.digest_ref,
            scan_id=event.scan_id,
            findings=report.counts.total(),
            critical=report.counts.CRITICAL,
            new=len(out.new),
            fixed=len(out.fixed),
            first=out.first_report,
            sbom=sbom_key is not None,
        )

    async def _with_running_state(self, report: Report, key: str) -> Report:
        """The report saying since when no node runs the digest (a scaled-to-zero image rescanned from its SBOM)."""
        state, _ = await busmod.kv_read(self.scans, key, DigestScanState)
        if state is None or state.nodes_seen or state.not_running_since is None:
            return report
        return msgspec.structs.replace(report, not_running_since=state.not_running_since)

    async def _republish(self, event: ScanCompleted) -> None:
        found = await self._stored_event(event)
        if found is None:
            raise RuntimeError(
                f"scan {event.scan_id} is recorded as stored but {storage.stored_event_key(event.digest_ref, event.scan_id)}"
                " is missing; was the bucket changed by hand?"
            )
        await self.bus.publish(subjects.REPORT_STORED, found, msg_id=stored.stored_msg_id(event.scan_id))
        log.info("report already stored, event re-published", digest=event.digest_ref, scan_id=event.scan_id)

    async def _stored_event(self, event: ScanCompleted) -> ReportStored | None:
        data = await self.store.get_if_exists(storage.stored_event_key(event.digest_ref, event.scan_id), MB)
        return _stored_decoder.decode(data) if data is not None else None

    async def _latest(self, event: ScanCompleted) -> Report | None:
        key = storage.latest_report_key(event.digest_ref)
        data = await self.store.get_if_exists(key, self.max_report * 2)
        if data is None:
            return None
        try:
            return _report_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Diffing against nothing is better than never storing again; history still holds every report.
            log.warning("latest report unreadable, diffing against none", key=key, error=str(exc)[:200])
            return None

    async def _read_report(self, event: ScanCompleted, delivery: busmod.Delivery) -> Report | None:
        """The normalized report, or None after quarantining the upload (a missing one is waited for first)."""
        try:
            with tracer.start_as_current_span("s3 get raw"):
                data = await self.store.get(event.raw_key, self.max_report)
        except ObjectMissing:
            if delivery.deliveries < self.settings.missing_retries:
                raise busmod.Retry(f"{event.raw_key} not uploaded yet", self.settings.missing_retry_s) from None
            await self._quarantine(event, "report", "missing", f"no object at {event.raw_key}", kept=False)
            return None
        except ObjectTooLarge:
            reason = f"{event.raw_key} is over the {self.max_report}-byte cap (PODSWEEP_PARSER_MAX_REPORT_MB)"
            await self._quarantine(event, "report", "oversized", reason, kept=True)
            return None
        started = time.perf_counter()
        try:
            with tracer.start_as_current_span("parse report") as span:
                span.set_attribute("podsweep.report.bytes", len(data))
                if len(data) > THREAD_PARSE_BYTES:
                    report = await asyncio.to_thread(self._parse, data, event)
                else:
                    report = self._parse(data, event)
        except trivy.ParseError as exc:
            await self._quarantine(event, "report", exc.kind, exc.reason, kept=True)
            return None
        parse_seconds.record(time.perf_counter() - started)
        return report

    def _parse(self, data: bytes, event: ScanCompleted) -> Report:
        return normalize.parse(data, max_bytes=self.max_report, digest_ref=event.digest_ref, scan_id=event.scan_id)

    async def _sbom(self, event: ScanCompleted, report: Report) -> stored.KeptSbom | None:
        """Validate and keep this scan's SBOM; where it was kept (report.stored names it), or None."""
        if event.sbom_key is None:
            return None
        try:
            data = await self.store.get(event.sbom_key, self.max_sbom)
        except ObjectMissing:
            await self._quarantine(event, "sbom", "missing", f"no object at {event.sbom_key}", kept=False)
            return None
        except ObjectTooLarge:
            reason = f"{event.sbom_key} is over the {self.max_sbom}-byte cap (PODSWEEP_PARSER_MAX_SBOM_MB)"
            await self._quarantine(event, "sbom", "oversized", reason, kept=True)
            return None
        try:
            info = sbom.check(data, max_bytes=self.max_sbom)
        except sbom.SbomError as exc:
            await self._quarantine(event, "sbom", exc.kind, exc.reason, kept=True)
            return None
        kind = "application/gzip" if data.startswith(trivy.GZIP_MAGIC) else "application/json"
        key = storage.history_sbom_key(event.digest_ref, event.finished_at)
        with tracer.start_as_current_span("s3 put sbom"):
            await self.store.put(key, data, kind)
            await self.store.put(storage.latest_sbom_key(event.digest_ref), data, kind)
        log.info("sbom stored", digest=event.digest_ref, key=key, components=info.components)
        return stored.KeptSbom(key, info.trivy_version or report.trivy_version or None, info.packages)

    async def _postings(self, event: ScanCompleted, report: Report, packages: list[PackageVersion] | None) -> None:
        """What this report puts in the inverted index (the indexer reads it when the summary changes)."""
        doc = await postings_for(
            self.store, report, event.digest_ref, event.scan_id, event.finished_at, packages, self.max_sbom
        )
        await self.store.put(storage.postings_key(event.digest_ref), _encoder.encode(doc))

    async def _digest_page(self, report: Report, summary: DigestSummary) -> None:
        doc, _ = await busmod.kv_read(self.workloads, digest_hex(summary.digest_ref), DigestWorkloads)
        runs = doc.runs if doc is not None else []
        clusters = sorted({r.cluster for r in runs if r.cluster is not None})
        page = html.digest_page(
            report, summary, sorted({r.image for r in runs}), sorted({r.namespace for r in runs}), clusters
        )
        await self.store.put(storage.digest_page_key(summary.digest_ref), page.encode(), HTML)

    async def _quarantine(
        self, event: ScanCompleted, what: QuarantinedObject, kind: QuarantineKind, reason: str, *, kept: bool
    ) -> None:
        """Keep the upload and the reason, tell subscribers, and go on: nothing is lost, nothing crashes."""
        record = stored.quarantined(event, what=what, kind=kind, reason=reason, kept=kept, at=_now())
        with tracer.start_as_current_span("quarantine"):
            if record.quarantine_key is not None:
                await self.store.copy(record.source_key, record.quarantine_key)
            await self.store.put(record.error_key, stored.error_text(record).encode(), "text/plain; charset=utf-8")
            await self.bus.publish(
                subjects.REPORT_QUARANTINED, record, msg_id=stored.quarantined_msg_id(event.scan_id, what)
            )
        quarantined_total.add(1, {"object": what, "kind": kind})
        log.warning(
            "upload quarantined", object=what, kind=kind, digest=event.digest_ref, scan_id=event.scan_id, reason=reason
        )


def _now() -> datetime:
    return datetime.now(UTC)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    HEALTH.set("parser:consuming", False)
    async with open_service(SERVICE, settings, s3=True, access=NATS) as service:
        bus, store = service.bus, service.require_store()
        summaries = await bus.kv(SUMMARIES_BUCKET)
        workloads = await bus.kv(WORKLOADS_BUCKET)
        scans = await bus.kv(SCANS_BUCKET)
        indexer = Indexer(
            store,
            summaries,
            workloads,
            settings.parser.index_flush_s,
            scans=scans,
            max_report_bytes=int(settings.parser.max_report_mb * MB),
            max_sbom_bytes=int(settings.parser.max_sbom_mb * MB),
        )
        await indexer.start()
        parser = Parser(bus, store, settings, summaries, workloads, scans)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(indexer.run(stop))
                consumer = group.create_task(
                    busmod.consume(
                        bus,
                        service=SERVICE,
                        durable=SERVICE,
                        routes={
                            subjects.SCAN_COMPLETED: busmod.Route(ScanCompleted, parser.completed),
                            subjects.IMAGE_SEEN: busmod.Route(ImageSeen, parser.seen),
                        },
                        settings=settings.consumer,
                        stop=stop,
                    )
                )
                HEALTH.set("parser:consuming", True)
                await consumer
                # The handlers in flight have finished: index what they wrote before returning.
                await indexer.caught_up()
                await indexer.flush()
        finally:
            HEALTH.set("parser:consuming", False)
            await indexer.close()
