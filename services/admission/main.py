"""The admission gate service: an HTTPS AdmissionReview endpoint answering from memory (decide.py over view.py).

The request path reads the view and the policy only: no S3, NATS or Kubernetes call. Filling the view (stored
index, stream replay, stored reports), publishing audits and scan requests, and reloading certificates and the
policy all run beside it. Not ready (503) until the view is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from aiohttp import web
from nats.js.api import ConsumerConfig, DeliverPolicy
from opentelemetry import metrics

from podsweep import aio, logs
from podsweep import bus as busmod
from podsweep.config import Settings
from podsweep.health import HEALTH
from podsweep.natsaccess import NatsAccess
from podsweep.objectstore import ObjectStore
from podsweep.policy import EMPTY_POLICY, Policy, PolicyError, load_policy
from podsweep.service import open_service
from schemas import storage, subjects
from schemas.admission import AdmissionDecided
from schemas.events import ImageSeen, ReportStored, RescanRequested
from schemas.index import SummaryIndex
from schemas.report import Report
from services.admission import review
from services.admission.decide import Decision, GateRules, VerdictCache, allow, decide, rules_from
from services.admission.listener import Listener
from services.admission.view import FindingsWanted, View, compact

SERVICE = "admission"
# What it does on NATS (podsweep/natsaccess.py): deploy/base/nats/accounts.conf is generated from this.
NATS = NatsAccess(
    service=SERVICE,
    publishes=(subjects.ADMISSION_DECIDED, subjects.RESCAN_REQUESTED),
    replays=(subjects.IMAGE_SEEN, subjects.REPORT_STORED),
)
PATH = "/validate"
READY = "admission:view"
MAX_INDEX_BYTES = 256 * 1024 * 1024

log = logs.get("podsweep.admission")
meter = metrics.get_meter("podsweep.admission")
decisions = meter.create_counter("podsweep_admission_decisions", description="Admission decisions, by verdict")
latency = meter.create_histogram(
    "podsweep_admission_request_seconds",
    unit="s",
    description="AdmissionReview handling time, body read to response",
    explicit_bucket_boundaries_advisory=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0],
)
audit_dropped = meter.create_counter("podsweep_admission_audit_dropped", description="Audits dropped: queue full")
events_skipped = meter.create_counter("podsweep_admission_events_skipped", description="Unreadable stream events")

_report_decoder = msgspec.json.Decoder(Report)
_index_decoder = msgspec.json.Decoder(SummaryIndex)
_seen_decoder = msgspec.json.Decoder(ImageSeen)
_stored_decoder = msgspec.json.Decoder(ReportStored)


# ---------------------------------------------------------------------------------------------------------------
# The request path


class Gate:
    """The state a request reads (view, policy, rules) and the queue it leaves audits and scan requests in."""

    def __init__(
        self,
        rules: GateRules,
        policy: Policy,
        audit_queue: int,
        rescan_every_s: float,
        max_body_bytes: int = 32 * 1024 * 1024,
        read_timeout_s: float = 5.0,
    ) -> None:
        self.view = View()
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.rules = rules
        self.policy = policy
        self.loaded = False
        self.outbox: asyncio.Queue[AdmissionDecided | RescanRequested] = asyncio.Queue(audit_queue)
        self.rescan_every_s = rescan_every_s
        self.requested: dict[str, float] = {}  # digest ref -> monotonic time of the last scan request
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.cache = VerdictCache()

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if not self.loaded:
            return web.Response(status=503, text="podsweep admission: the view is still loading\n")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._refuse(413, f"body of {request.content_length} bytes is over {self.max_body_bytes}")
        # The whole body, however it was split on the wire (read() waits for the end, checking the app's
        # client_max_size as it goes), within a deadline so a slow or silent client is answered and let go.
        try:
            async with asyncio.timeout(self.read_timeout_s):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(413, f"body is over {self.max_body_bytes} bytes")
        except TimeoutError:
            response = self._refuse(
                408, f"the body did not arrive within {self.read_timeout_s} s (admission.read_timeout_s)"
            )
            response.force_close()
            return response
        try:
            admission = review.decode(body)
        except review.InvalidReview as exc:
            return self._refuse(400, str(exc))
        now = self.clock()
        try:
            decision = decide(admission, self.view, self.policy, self.rules, now, self.cache)
        except Exception as exc:  # a bug must not take pod creation down with it: allow, and say why
            log.exception("admission decision failed, allowing", uid=admission.uid[:64], error=str(exc)[:200])
            decision = allow(admission.uid, "", "error", f"{type(exc).__name__}: {exc}")
        self._after(decision, admission.dry_run)
        elapsed = time.perf_counter() - started
        latency.record(elapsed)
        decisions.add(1, {"verdict": decision.outcome, "namespace": decision.namespace or "-"})
        if decision.log_reason:
            log.info("admission allowed without judging", uid=admission.uid[:64], reason=decision.log_reason)
        elif decision.audit is not None:
            log.info(
                "admission decided",
                uid=admission.uid[:64],
                namespace=decision.namespace,
                verdict=decision.outcome,
                allowed=decision.response.allowed,
                ms=round(elapsed * 1000, 2),
            )
        return web.Response(body=review.encode(decision.response), content_type="application/json")

    def _refuse(self, status: int, reason: str) -> web.Response:
        decisions.add(1, {"verdict": f"http-{status}", "namespace": "-"})
        log.warning("admission request refused", status=status, reason=reason[:300])
        return web.Response(status=status, text=f"podsweep admission: {reason}\n")

    def _after(self, decision: Decision, dry_run: bool) -> None:
        """Queue the audit and scan requests; never wait for room (a full queue is counted and logged)."""
        if dry_run:
            return  # sideEffects NoneOnDryRun: a dry run leaves no audit and asks for no scan
        if decision.audit is not None:
            self._queue(decision.audit)
        monotonic = time.monotonic()
        for digest_ref in decision.rescans:
            last = self.requested.get(digest_ref)
            if last is not None and monotonic - last < self.rescan_every_s:
                continue
            self.requested[digest_ref] = monotonic
            now = self.clock()
            bucket = int(now.timestamp() // self.rescan_every_s)
            request_id = "adm-" + hashlib.sha256(f"{digest_ref}|{bucket}".encode()).hexdigest()[:24]
            self._queue(
                RescanRequested(
                    cluster=self.rules.cluster,
                    request_id=request_id,
                    digests=[digest_ref],
                    requested_by="admission",
                    reason="an admission request runs this digest and podsweep has no report for it",
                    requested_at=now,
                )
            )
        if len(self.requested) > 100_000:  # forget the oldest half rather than grow without bound
            for key in sorted(self.requested, key=self.requested.__getitem__)[:50_000]:
                del self.requested[key]

    def _queue(self, event: AdmissionDecided | RescanRequested) -> None:
        try:
            self.outbox.put_nowait(event)
        except asyncio.QueueFull:
            kind = "audit" if isinstance(event, AdmissionDecided) else "rescan"
            audit_dropped.add(1, {"kind": kind})
            log.warning("admission outbox full, event dropped", kind=kind, queue=self.outbox.maxsize)


async def publish_outbox(gate: Gate, bus: busmod.Bus, stop: asyncio.Event) -> None:
    """Drain the outbox to the stream in batches: what gathered while the last batch was out goes as one
    `publish_many` (one span, acks collected in a window), so an audit costs the request loop a fraction of a publish
    awaited on its own. What is still unacknowledged after publish_many's attempts is counted, logged and dropped."""
    while not (stop.is_set() and gate.outbox.empty()):
        try:
            first = await asyncio.wait_for(gate.outbox.get(), 0.5)
        except TimeoutError:
            continue
        batch = [first]
        while len(batch) < OUTBOX_BATCH and not gate.outbox.empty():
            batch.append(gate.outbox.get_nowait())
        try:
            await bus.publish_many([_outgoing(event) for event in batch])
        except busmod.PublishFailed as exc:
            _dropped(len(exc.unsent), str(exc))
        except Exception as exc:  # the drain must outlive a broken connection: the next batch tries again
            _dropped(len(batch), f"{type(exc).__name__}: {exc}")


OUTBOX_BATCH = 256


def _outgoing(event: AdmissionDecided | RescanRequested) -> busmod.Outgoing:
    if isinstance(event, AdmissionDecided):
        return busmod.Outgoing(subjects.ADMISSION_DECIDED, event, f"admission:{event.uid}")
    return busmod.Outgoing(subjects.RESCAN_REQUESTED, event, f"rescan:{event.request_id}")


def _dropped(count: int, error: str) -> None:
    audit_dropped.add(count, {"kind": "publish-failed"})
    log.warning("admission events not published", events=count, error=error[:300])


# ---------------------------------------------------------------------------------------------------------------
# Filling the view


async def follow(
    bus: busmod.Bus,
    name: str,
    start: datetime | None,
    apply: Callable[[bytes], None],
    caught_up: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Replay `name` from `start` (everything when None) out of the replay stream (`open_replay`), then follow it
    live until `stop`. Times there are when the server copied an event, never earlier than it was published: a
    replay from `start` holds every event published since."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME if start is not None else DeliverPolicy.ALL,
        opt_start_time=start,
    )
    bus.check_replay(name)
    sub = await bus.js.subscribe(bus.subject(name), ordered_consumer=True, config=config, stream=bus.replay.name)
    try:
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=0.2 if not caught_up.is_set() else 1.0)
            except TimeoutError:
                if not caught_up.is_set():
                    with contextlib.suppress(Exception):
                        info = await sub.consumer_info()
                        if info.num_pending == 0:
                            caught_up.set()
                continue
            try:
                apply(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                events_skipped.add(1, {"subject": name})
                log.warning("event skipped by the admission view", subject=name, error=str(exc)[:200])
            if not caught_up.is_set() and msg.metadata.num_pending == 0:
                caught_up.set()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def open_replay(bus: busmod.Bus) -> busmod.StreamRef:
    """The stream the view replays image.seen and report.stored from (bus.ensure_replay_stream), made when missing and
    caught up with the events stream."""
    return await busmod.ensure_replay_stream(bus, NATS.replays)


class Loader:
    """Fills the view: the stored index, then the stream since shortly before it was written, then findings."""

    def __init__(self, gate: Gate, bus: busmod.Bus, store: ObjectStore, settings: Settings) -> None:
        self.gate = gate
        self.bus = bus
        self.store = store
        self.settings = settings
        self.limit = asyncio.Semaphore(settings.admission.findings_concurrency)
        self.max_report_bytes = int(settings.s3.max_object_mb * 1024 * 1024)
        self.fetches: set[asyncio.Task[None]] = set()
        self.live = False  # from now on a new report's findings are fetched as it arrives

    async def run(self, stop: asyncio.Event, group: asyncio.TaskGroup) -> None:
        started = time.perf_counter()
        view = self.gate.view
        start: datetime | None = None
        data = await self.store.get_if_exists(storage.SUMMARY_KEY, MAX_INDEX_BYTES)
        if data is not None:
            try:
                index = _index_decoder.decode(data)
                view.load_index(index)
                start = index.generated_at - timedelta(seconds=self.settings.admission.replay_s)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("stored index unreadable, replaying the whole stream", error=str(exc)[:200])
        await open_replay(self.bus)
        seen_done, stored_done = asyncio.Event(), asyncio.Event()
        group.create_task(follow(self.bus, subjects.IMAGE_SEEN, start, self._seen, seen_done, stop))
        group.create_task(follow(self.bus, subjects.REPORT_STORED, start, self._stored, stored_done, stop))
        await seen_done.wait()
        await stored_done.wait()
        self.live = True
        wanted = view.wanted()  # in the same step as `live`: no report falls between the two
        await asyncio.gather(*(self._findings(w, None) for w in wanted))
        # The loaded view is most of the heap and lives as long as the process: keep the cyclic collector from
        # walking it again and again (a full collection over a large view is a pause that a request waiting behind
        # it sees as its latency).
        gc.collect()
        gc.freeze()
        self.gate.loaded = True
        HEALTH.set(READY, True)
        log.info(
            "admission view loaded",
            digests=len(view.digests),
            tags=len(view.tags),
            findings_loaded=len(wanted),
            replay_from=start.isoformat() if start else "stream start",
            seconds=round(time.perf_counter() - started, 2),
        )

    def _seen(self, data: bytes) -> None:
        seen = _seen_decoder.decode(data)
        self.gate.view.apply_seen(seen, here=seen.cluster == self.gate.rules.cluster)

    def _stored(self, data: bytes) -> None:
        event = _stored_decoder.decode(data)
        wanted = self.gate.view.apply_report(event)
        if wanted is not None and self.live:
            task = asyncio.create_task(self._findings(wanted, event.history_key))
            self.fetches.add(task)
            task.add_done_callback(self.fetches.discard)

    async def _findings(self, wanted: FindingsWanted, key: str | None) -> None:
        """Read a stored report and keep its compact findings; until then the digest is judged on its counts."""
        key = key or storage.latest_report_key(wanted.digest_ref)
        async with self.limit:
            for attempt in range(4):
                try:
                    data = await self.store.get_if_exists(key, self.max_report_bytes)
                    if data is None and key != storage.latest_report_key(wanted.digest_ref):
                        key = storage.latest_report_key(wanted.digest_ref)
                        continue
                    if data is None:
                        log.warning("stored report missing, judging on counts", key=key)
                        return
                    report = _report_decoder.decode(data)
                    if report.scan_id != wanted.scan_id:
                        log.info("stored report is another scan, judging on counts", key=key)
                        return
                    self.gate.view.apply_findings(wanted.hex, wanted.scan_id, compact(report.findings))
                    return
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("stored report unreadable, judging on counts", key=key, error=str(exc)[:200])
                    return
                except Exception as exc:
                    if attempt == 3:
                        log.warning("stored report not read, judging on counts", key=key, error=str(exc)[:200])
                        return
                    await asyncio.sleep(0.5 * 2**attempt)


# ---------------------------------------------------------------------------------------------------------------
# Files that change underneath: certificates and the policy


def _mtimes(*paths: str) -> tuple[float, ...]:
    out = []
    for path in paths:
        try:
            out.append(os.stat(path).st_mtime)
        except OSError:
            out.append(-1.0)
    return tuple(out)


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


async def watch_files(
    context: ssl.SSLContext, gate: Gate, settings: Settings, policy_file: str, stop: asyncio.Event
) -> None:
    """Reload the certificate pair into the live context (new connections get it) and the policy when changed.
    A pair or policy that does not load keeps the previous one and is logged."""
    a = settings.admission
    certs = _mtimes(a.cert_file, a.key_file)
    policy_at = _mtimes(policy_file) if policy_file else ()
    next_cert = next_policy = time.monotonic()
    while not stop.is_set():
        await aio.sleep_unless(stop, min(a.cert_reload_s, a.policy_poll_s))
        now = time.monotonic()
        if now >= next_cert:
            next_cert = now + a.cert_reload_s
            current = _mtimes(a.cert_file, a.key_file)
            if current != certs:
                try:
                    context.load_cert_chain(a.cert_file, a.key_file)
                    certs = current
                    log.info("admission certificate reloaded", cert=a.cert_file)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("admission certificate not reloaded, keeping the old one", error=str(exc)[:200])
        if policy_file and now >= next_policy:
            next_policy = now + a.policy_poll_s
            current = _mtimes(policy_file)
            if current != policy_at:
                policy_at = current
                try:
                    gate.policy = read_policy(policy_file)
                    log.info("admission policy reloaded", file=policy_file)
                except (OSError, PolicyError) as exc:
                    log.warning("admission policy not reloaded, keeping the old one", error=str(exc)[:300])


def read_policy(path: str) -> Policy:
    return load_policy(Path(path).read_text(), path) if path else EMPTY_POLICY


# ---------------------------------------------------------------------------------------------------------------
# The service


def app_for(gate: Gate) -> web.Application:
    app = web.Application(client_max_size=gate.max_body_bytes)
    app.router.add_post(PATH, gate.handle)
    return app


async def main(settings: Settings, stop: asyncio.Event) -> None:
    a = settings.admission
    if not a.cert_file:
        raise RuntimeError(
            "admission: cert_file and key_file (PODSWEEP_ADMISSION_CERT_FILE, PODSWEEP_ADMISSION_KEY_FILE) are "
            "required: the apiserver calls webhooks over HTTPS only (docs/admission.md, certificates)"
        )
    try:
        context = tls_context(a.cert_file, a.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(
            f"admission: cannot load the TLS pair cert_file={a.cert_file!r} key_file={a.key_file!r}: {exc} "
            "(PEM certificate chain and its private key, e.g. a mounted kubernetes.io/tls Secret)"
        ) from None
    policy_file = a.policy_file or settings.notifier.policy_file
    gate = Gate(
        rules_from(settings),
        read_policy(policy_file),
        a.audit_queue,
        a.rescan_every_s,
        max_body_bytes=int(a.max_body_mb * 1024 * 1024),
        read_timeout_s=a.read_timeout_s,
    )
    HEALTH.set(READY, False)
    async with open_service(SERVICE, settings, s3=True, access=NATS) as service:
        listener = Listener(app_for(gate), a.read_timeout_s)
        await listener.start(a.host, a.port, context)
        log.info("admission listening", host=a.host, port=a.port, path=PATH, policy=policy_file or "(none)")
        try:
            async with asyncio.TaskGroup() as group:
                loader = Loader(gate, service.bus, service.require_store(), settings)
                group.create_task(loader.run(stop, group))
                group.create_task(watch_files(context, gate, settings, policy_file, stop))
                group.create_task(publish_outbox(gate, service.bus, stop))
                await stop.wait()
        finally:
            HEALTH.set(READY, False)
            await listener.close()
