"""Sends outbox entries to their destinations over HTTP: alerts paced and grouped per destination, uploads one by one.

Outcomes: delivered (marker in KV, `alert.sent`, ack); retry later (`bus.Retry`: a server-side nak delay, so the
wait survives a restart); give up (`alert.failed`, then `bus.Reject`, which dead-letters). A group's membership is
written to KV (each member's claim, then the group's record) before its first POST, and its members are acked only
once it is delivered, so a kill -9 at any point neither loses a member nor sends one in two groups. Decisions live in
pace.py (when), grouping.py (who with whom), retry.py (after a failure) and messages.py (what). Never logs a URL, a
token, a key or a body: destinations are named by `describe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import random
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.objectstore import ObjectMissing, ObjectStore, ObjectTooLarge
from podsweep.policy import DefectDojoDestination, Destination, WebhookDestination
from schemas import subjects
from schemas.alerts import GroupClaim, GroupMember, GroupRecord
from schemas.events import AlertOutcome, AlertSent
from services.notifier import destinations, grouping, messages, pace
from services.notifier.destinations import EntryMismatch, HttpRequest, describe
from services.notifier.outbox import OutboxEntry, audit
from services.notifier.policysource import PolicySource
from services.notifier.retry import RetryPolicy, next_attempt, parse_retry_after
from services.notifier.secrets import SecretError, read_keys, read_secret, read_url

log = logs.get("podsweep.notifier")
tracer = trace.get_tracer("podsweep.notifier")
meter = metrics.get_meter("podsweep.notifier")
alerts_counter = meter.create_counter(
    "podsweep_alerts", description="Alert and upload deliveries by destination, kind and outcome"
)
latency = meter.create_histogram(
    "podsweep_alert_delivery_latency",
    unit="s",
    description="From the report being stored to the destination accepting the alert",
)
http_duration = meter.create_histogram(
    "podsweep_alert_http_duration", unit="s", description="One HTTP call to a destination, by status"
)
_encoder = msgspec.json.Encoder()
TIMEOUT_MARGIN_S = 5.0  # an HTTP call always ends this long before the outbox message's ack wait
MAX_RESPONSE_BYTES = 64 * 1024  # what is read of a receiver's answer; the rest is dropped with the connection
_KV_WINDOW = 256  # KV writes of one group in flight at once
_RECORDS_KEPT = 4096  # group records remembered in memory (a redelivered member looks its group up here first)


class GiveUp(Exception):
    """A delivery that cannot succeed: record `alert.failed` and dead-letter the entry."""


def retry_policy(settings: Settings) -> RetryPolicy:
    n = settings.notifier
    return RetryPolicy(
        base_s=n.retry_base_s,
        cap_s=n.retry_cap_s,
        max_attempts=n.retry_max_attempts,
        max_retry_after_s=n.retry_max_after_s,
    )


def marker_key(entry: OutboxEntry) -> str:
    """An upload's delivered marker, and an alert's claim: `<destination>.<key>`."""
    return f"{entry.destination}.{entry.key}"


def record_key(destination: str, group_id: str) -> str:
    return f"{destination}.g.{group_id}"


def session(settings: Settings) -> aiohttp.ClientSession:
    """The one HTTP client of the notifier: verifies TLS, follows no redirect (per request), ignores proxy variables."""
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)


@dataclass
class Held:
    """An alert the destination's pacer holds: settled (acked, retried, dead-lettered) through `settled`."""

    entry: OutboxEntry
    delivery: busmod.Delivery
    settled: busmod.Settled
    arrived: float
    member: GroupMember
    touched: float = 0.0  # when its ack wait was last reset
    trace: otel_context.Context | None = None  # the alert's trace as it arrived: its send continues it


@dataclass
class Resend:
    """A group decided before (a restart, a retry): its record (None for a lone alert) and its members in hand."""

    group_id: str
    record: GroupRecord | None
    held: list[Held] = field(default_factory=list)


class Deliverer:
    """The handler of every outbox consumer (one per destination, on `<root>-outbox.<destination>`)."""

    def __init__(
        self,
        bus: busmod.Bus,
        store: ObjectStore,
        policies: PolicySource,
        settings: Settings,
        client: aiohttp.ClientSession,
        delivered: KeyValue,
        environ: Mapping[str, str],
        stop: asyncio.Event,
    ) -> None:
        self.bus = bus
        self.store = store
        self.policies = policies
        self.settings = settings
        self.client = client
        self.delivered = delivered
        self.environ = environ
        self.stop = stop
        self.retry = retry_policy(settings)
        self.timeout_cap_s = settings.notifier.outbox_ack_wait_s - TIMEOUT_MARGIN_S
        self.max_raw_bytes = int(settings.s3.max_object_mb * 1024 * 1024)
        self.pacers: dict[str, Pacer] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, entry: OutboxEntry, delivery: busmod.Delivery) -> busmod.Settled | None:
        if entry.alert is None:
            await self.upload(entry, delivery)
            return None
        pacer = self.pacers.get(entry.destination)
        if pacer is None:
            pacer = self.pacers[entry.destination] = Pacer(self, entry.destination)
            # Its own (empty) context: the pacer outlives the message whose handler started it, and its spans
            # must not hang under that message's trace.
            task = asyncio.create_task(pacer.run(), context=contextvars.Context())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await pacer.add(entry, delivery)

    async def close(self) -> None:
        """Wait for every pacer to hand back what it holds (after `stop`)."""
        for pacer in self.pacers.values():
            pacer.wake.set()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- one report upload (DefectDojo) -----------------------------------------------------------------------
    async def upload(self, entry: OutboxEntry, delivery: busmod.Delivery) -> None:
        attempt = delivery.deliveries
        # A first delivery cannot have been sent before: only redeliveries pay for the marker lookup.
        if attempt > 1 and await self._marked(marker_key(entry)):
            await self.record([entry], attempt, "delivered", "")  # sent and marked before a crash: never resend
            return
        kind = "unknown"
        try:
            dest = self.destination(entry.destination)
            kind = kind_of(dest)
            request = await self._upload_request(entry, dest)
        except GiveUp as exc:
            await self.give_up([entry], kind, attempt, str(exc))
            raise busmod.Reject(str(exc)) from None
        status, retry_after, error = await self.post(request, dest, entry.key, attempt)
        now = datetime.now(UTC)
        if status is not None and 200 <= status < 300:
            marker = audit(entry, attempt, "delivered", "", now)
            await asyncio.gather(
                self._create(marker_key(entry), _encoder.encode(marker)),
                self.record([entry], attempt, "delivered", ""),
            )
            self.count_delivered([entry], dest, now, status, attempt, entry.key)
            return
        decision = next_attempt(self.retry, attempt, status, retry_after, now, random.random)
        reason = f"{describe(dest)}: {decision.reason}{f' ({error})' if error else ''}"
        if decision.retry:
            alerts_counter.add(1, {"destination": entry.destination, "kind": kind, "outcome": "retry"})
            log.info("alert delivery will be retried", destination=describe(dest), alert=entry.key, reason=reason)
            raise busmod.Retry(reason, decision.delay_s)
        await self.give_up([entry], kind, attempt, reason)
        raise busmod.Reject(reason)

    async def _upload_request(self, entry: OutboxEntry, dest: Destination) -> HttpRequest:
        """Resolve the destination's secrets, read the raw report, and build the request."""
        try:
            url = dest.url if isinstance(dest, DefectDojoDestination) else read_url(dest.url, self.environ)
            token = read_secret(dest.token, self.environ) if isinstance(dest, DefectDojoDestination) else ""
            raw = b""
            if isinstance(dest, DefectDojoDestination) and entry.upload is not None:
                raw = await self.store.get(entry.upload.raw_key, self.max_raw_bytes)
            return destinations.http_request(
                entry,
                dest,
                url=url,
                token=token,
                raw_report=raw,
                now_s=int(time.time()),
                timeout_cap_s=self.timeout_cap_s,
            )
        except (SecretError, EntryMismatch, ObjectTooLarge) as exc:
            raise GiveUp(f"{describe(dest)}: {exc}") from None
        except ObjectMissing as exc:
            raise GiveUp(f"{describe(dest)}: raw report {exc.args[0]} is no longer in the bucket") from None

    # -- shared steps -----------------------------------------------------------------------------------------
    def destination(self, name: str) -> Destination:
        try:
            return self.policies.policy.destination(name)
        except KeyError as exc:
            raise GiveUp(str(exc.args[0])) from None

    def secrets(self, dest: Destination) -> tuple[str, list[bytes]]:
        """The destination's URL and HMAC keys, read now (a rotated Secret applies without a restart)."""
        try:
            url = dest.url if isinstance(dest, DefectDojoDestination) else read_url(dest.url, self.environ)
            keys = read_keys(dest.hmac_key, self.environ) if isinstance(dest, WebhookDestination) else []
        except SecretError as exc:
            raise GiveUp(f"{describe(dest)}: {exc}") from None
        return url, keys

    async def post(
        self, request: HttpRequest, dest: Destination, key: str, attempt: int
    ) -> tuple[int | None, str | None, str]:
        """(status or None, Retry-After, error). The span ends at the HTTP call; it never carries the URL."""
        kind = kind_of(dest)
        with tracer.start_as_current_span(f"POST {kind}", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", urlsplit(request.url).hostname or "")
            span.set_attribute("podsweep.destination", dest.name)
            span.set_attribute("podsweep.alert_id", key)
            span.set_attribute("http.request.resend_count", attempt - 1)
            started = time.monotonic()
            data: bytes | aiohttp.FormData = request.body
            if request.file_field:
                form = aiohttp.FormData()
                for name, values in request.fields.items():
                    for value in values:
                        form.add_field(name, value)
                form.add_field(
                    request.file_field,
                    request.file,
                    filename=request.file_name,
                    content_type=request.file_content_type,
                )
                data = form
            try:
                async with self.client.post(
                    request.url,
                    data=data,
                    headers=request.headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=request.timeout_s),
                ) as response:
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
                    await _drain(response)
            except TimeoutError as exc:
                span.set_status(Status(StatusCode.ERROR, "timeout"))
                http_duration.record(time.monotonic() - started, {"destination": dest.name, "status": "timeout"})
                return None, None, f"{type(exc).__name__} after {request.timeout_s:.0f} s"
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                # Only the class name: some transport errors quote the URL, which may be a credential.
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                http_duration.record(time.monotonic() - started, {"destination": dest.name, "status": "error"})
                return None, None, type(exc).__name__
            http_duration.record(time.monotonic() - started, {"destination": dest.name, "status": status})
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            return status, retry_after, ""

    async def _marked(self, key: str) -> bool:
        return (await self.read(key)) is not None

    async def read(self, key: str) -> bytes | None:
        try:
            found = await self.delivered.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return found.value or None

    async def _create(self, key: str, value: bytes) -> None:
        # Marked already means a concurrent redelivery got there first: nothing to do.
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            await self.delivered.create(key, value)

    async def put_all(self, items: Sequence[tuple[str, bytes]]) -> None:
        """KV puts, a window at a time (a storm's claims)."""
        for start in range(0, len(items), _KV_WINDOW):
            await asyncio.gather(*(self.delivered.put(k, v) for k, v in items[start : start + _KV_WINDOW]))

    async def record(
        self, entries: Sequence[OutboxEntry], attempts: int, outcome: AlertOutcome, error: str, group: str = ""
    ) -> None:
        """`alert.sent` / `alert.failed` for each alert (deduplicated by msg id across redeliveries)."""
        name = subjects.ALERT_SENT if outcome == "delivered" else subjects.ALERT_FAILED
        prefix = "sent" if outcome == "delivered" else "failed"
        now = datetime.now(UTC)
        text = _printable(error)
        out = [
            busmod.Outgoing(
                name,
                msgspec.structs.replace(audit(e, attempts, outcome, text, now), group=group or None),
                f"{prefix}:{e.key}.{e.destination}",
            )
            for e in entries
        ]
        if len(out) == 1:
            await self.bus.publish(out[0].name, out[0].event, msg_id=out[0].msg_id)
        else:
            await self.bus.publish_many(out)

    def count_delivered(
        self, entries: Sequence[OutboxEntry], dest: Destination, now: datetime, status: int, attempt: int, key: str
    ) -> None:
        kind = kind_of(dest)
        alerts_counter.add(len(entries), {"destination": dest.name, "kind": kind, "outcome": "delivered"})
        for e in entries:
            latency.record(max(0.0, (now - e.reported_at).total_seconds()), {"destination": dest.name, "kind": kind})
        log.info(
            "alert delivered",
            destination=describe(dest),
            alert=key,
            members=len(entries),
            attempts=attempt,
            status=status,
            since_report_ms=round((now - min(e.reported_at for e in entries)).total_seconds() * 1000, 1),
        )

    async def give_up(self, entries: Sequence[OutboxEntry], kind: str, attempt: int, reason: str) -> None:
        await self.record(entries, attempt, "failed", reason)
        if entries:
            alerts_counter.add(len(entries), {"destination": entries[0].destination, "kind": kind, "outcome": "failed"})
        log.warning(
            "alert delivery failed",
            destination=entries[0].destination if entries else "",
            alerts=len(entries),
            attempts=attempt,
            reason=reason,
        )


# A grouped message links to at most this many of its alerts' traces (a storm's message names thousands).
_MAX_LINKS = 64


@contextlib.contextmanager
def _send_trace(held: Sequence[Held]) -> Iterator[None]:
    """What a send runs under: a lone alert continues its own trace (image.seen to alert.sent is one trace); a group
    is a trace of its own, linked to its members' traces."""
    if len(held) == 1 and held[0].trace is not None:
        token = otel_context.attach(held[0].trace)
        try:
            yield
        finally:
            otel_context.detach(token)
        return
    links = [
        Link(context)
        for context in (trace.get_current_span(h.trace).get_span_context() for h in held[:_MAX_LINKS] if h.trace)
        if context.is_valid
    ]
    with tracer.start_as_current_span("send alert group", context=otel_context.Context(), links=links) as span:
        span.set_attribute("podsweep.alerts", len(held))
        yield


class Pacer:
    """One destination's alerts: held until its rate lets a message leave, then sent alone or grouped.

    `add` (from the consumer) classifies each alert: free (never in a group), claimed by a group that still has to
    be sent (a resend), or claimed by a delivered group (acked at once). `run` asks pace.py what leaves, claims and
    records new groups, and sends them; only this task sends, so a destination's rate holds.
    """

    def __init__(self, deliverer: Deliverer, destination: str) -> None:
        self.d = deliverer
        self.destination = destination
        self.free: dict[str, Held] = {}  # by alert key, in arrival order
        self.resends: dict[str, Resend] = {}
        self.in_flight: dict[str, Resend] = {}  # groups being sent: a member redelivered meanwhile joins its group
        self.owners: dict[str, Resend] = {}  # alert key → the group this process is claiming or sending it in
        self.records: dict[str, GroupRecord] = {}
        self.bucket: pace.Bucket | None = None
        self.throttled = False
        self.last_sent = -1e9  # when the last message left (monotonic)
        self.last_arrival = 0.0
        # Wakes the loop: a send finished, a group to resend came back, the deliverer stops, or a new alert arrived
        # while none waits for the rate (while alerts wait, an arrival changes nothing before the next token or
        # linger deadline: one split per round, not one per arrival).
        self.wake = asyncio.Event()
        self.sending: set[asyncio.Task[None]] = set()
        self.ack_wait_s = deliverer.settings.notifier.outbox_ack_wait_s
        self.kept_alive_at = -1e9  # when held alerts were last looked over (monotonic)

    # -- intake -------------------------------------------------------------------------------------------------
    async def add(self, entry: OutboxEntry, delivery: busmod.Delivery) -> busmod.Settled:
        settled: busmod.Settled = asyncio.get_running_loop().create_future()
        assert entry.alert is not None
        now = time.monotonic()
        held = Held(
            entry, delivery, settled, now, grouping.member(entry.alert), touched=now, trace=otel_context.get_current()
        )
        owner = self.owners.get(entry.key)
        if owner is not None:  # delivered again while its group is being sent from here: settled with that group
            owner.held.append(held)
            return settled
        if delivery.deliveries > 1 and not await self._claimed(held):
            return settled
        old = self.free.pop(entry.key, None)
        if old is not None and not old.settled.done():
            old.settled.cancel()  # the same alert delivered again (its ack wait ran out): keep the newest delivery
        self.free[entry.key] = held
        self.last_arrival = now
        if not self.throttled:
            self.wake.set()
        return settled

    async def _claimed(self, held: Held) -> bool:
        """For a redelivered alert: True when it is free; otherwise it has joined its group's resend (or is acked
        because that group was delivered)."""
        raw = await self.d.read(marker_key(held.entry))
        if raw is None:
            return True
        try:
            claim = msgspec.json.decode(raw, type=GroupClaim)
        except (msgspec.DecodeError, msgspec.ValidationError):
            if _was_delivered(raw):  # a delivered marker written before alerts were grouped: never resend
                await self.d.record([held.entry], held.delivery.deliveries, "delivered", "")
                held.settled.set_result(None)
                return False
            return True  # garbage: treat as never grouped
        group_id = claim.group
        record = await self._record(group_id)
        if record is not None and record.delivered:
            await self.d.record([held.entry], held.delivery.deliveries, "delivered", "", group_id)
            held.settled.set_result(None)
            return False
        if record is None and group_id != held.entry.key:
            return True  # claimed, but the process died before the group's record: the group never existed
        flying = self.in_flight.get(group_id)
        if flying is not None:  # its group is being sent: settled with it
            flying.held.append(held)
            return False
        resend = self.resends.setdefault(group_id, Resend(group_id, record))
        resend.held = [h for h in resend.held if h.entry.key != held.entry.key] + [held]
        self.last_arrival = time.monotonic()
        self.wake.set()
        return False

    async def _record(self, group_id: str) -> GroupRecord | None:
        if group_id in self.records:
            return self.records[group_id]
        raw = await self.d.read(record_key(self.destination, group_id))
        record = msgspec.json.decode(raw, type=GroupRecord) if raw is not None else None
        if record is not None:
            self._remember(record)
        return record

    def _remember(self, record: GroupRecord) -> None:
        self.records[record.id] = record
        while len(self.records) > _RECORDS_KEPT:
            self.records.pop(next(iter(self.records)))

    # -- the loop -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self.d.stop.is_set():
                wake_at = await self._round()
                self.wake.clear()
                if self.d.stop.is_set():
                    break
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                # One event and one timer per round (no task per waiter): a round per alert at a steady rate.
                # Never longer than a third of the ack wait: held alerts are kept alive in each round.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(timeout if timeout is not None else 5.0, 5.0, self.ack_wait_s / 3)):
                        await self.wake.wait()
        finally:
            if self.sending:
                await asyncio.gather(*self.sending, return_exceptions=True)
            # What was never sent goes back to the stream for the next process.
            for held in [*self.free.values(), *(h for r in self.resends.values() for h in r.held)]:
                if not held.settled.done():
                    held.settled.set_exception(busmod.Retry("notifier stopping", 0.0))
            self.free.clear()
            self.resends.clear()

    async def _round(self) -> float | None:
        """Send what may leave now; return when to look again."""
        try:
            dest = self.d.destination(self.destination)
        except GiveUp as exc:
            await self._fail_all(str(exc))
            return None
        now = time.monotonic()
        settings = self.d.settings.notifier
        rules = pace.Pace(
            rate_per_s=getattr(dest, "rate_per_s", 1.0),
            burst=getattr(dest, "burst", 1),
            quiet_s=settings.group_quiet_s,
            max_wait_s=settings.group_max_wait_s,
        )
        if self.bucket is None:
            self.bucket = pace.full(rules, now)
        await self._keep_alive(now)
        if not self.free and not self.resends:
            self.throttled = False
            return None
        # At most outbox_concurrency messages in flight per destination: a slow receiver gets grouped messages.
        tokens = min(pace.available(self.bucket, rules, now), settings.outbox_concurrency - len(self.sending))
        groups = bool(getattr(dest, "group_alerts", False))
        chunks: list[list[GroupMember]] = []
        if tokens > 0 and self.free:
            kind = kind_of(dest)
            cluster = next(iter(self.free.values())).entry.cluster
            max_bytes = dest.max_body_bytes if isinstance(dest, WebhookDestination) else 0
            if groups:
                members = [h.member for h in self.free.values()]
                chunks = grouping.split(
                    members, lambda ms: messages.group_fits(kind, ms, cluster, max_bytes), limit=tokens
                )
            else:  # one message per alert, at the destination's rate (only the first `tokens` are looked at)
                chunks = [[h.member] for h in itertools.islice(self.free.values(), tokens)]
        waiting, start = [], 0
        for chunk in chunks:
            start += len(chunk)
            oldest = self.free[chunk[0].id].arrived  # a member's id is its alert's key
            # Without grouping nothing is gained by waiting: every message counts as full.
            waiting.append(pace.Waiting(oldest=oldest, full=start < len(self.free) or not groups))
        if not chunks and self.free:  # not split (nothing may leave now): at least one message waits
            waiting.append(pace.Waiting(oldest=next(iter(self.free.values())).arrived, full=False))
        storm = pace.in_storm(rules, self.throttled, self.last_sent, now)
        leaving = pace.what_leaves(rules, tokens, len(self.resends), waiting, storm, self.last_arrival, now)
        self.throttled = leaving.throttled
        sent = leaving.resends + leaving.chunks
        if sent:
            self.bucket = pace.take(self.bucket, rules, now, sent)
            self.last_sent = now
        for group_id in list(self.resends)[: leaving.resends]:
            self._start(self._send(dest, self._own(self.resends.pop(group_id))))
        for chunk in chunks[: leaving.chunks]:
            held = [self.free.pop(m.id) for m in chunk]
            group = Resend(grouping.group_key(self.destination, [h.entry.key for h in held]), None, held)
            self._start(self._send_new(dest, self._own(group)))
        if not self.free and not self.resends:
            return None
        if len(self.sending) >= settings.outbox_concurrency:
            return leaving.wake_at  # a finished send wakes the loop
        next_token = pace.next_token_at(self.bucket, rules, now)
        if leaving.wake_at is not None:  # lingering: look again at least once per message interval
            return min(leaving.wake_at, now + max(1.0 / rules.rate_per_s, 0.25))
        return next_token if next_token > now else now + 0.05

    def _start(self, job: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(job)
        self.sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.sending.discard(task)
        self.wake.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:
            log.error("alert send failed unexpectedly", destination=self.destination, error=repr(task.exception()))

    async def _keep_alive(self, now: float) -> None:
        """Reset the ack wait of alerts held for a third of it, so a paced alert is not redelivered meanwhile.

        Looks them over at most every sixth of the ack wait (so none waits more than half of it), not in every round:
        in a storm a round comes with every send, and thousands are held."""
        if now - self.kept_alive_at < self.ack_wait_s / 6:
            return
        self.kept_alive_at = now
        groups = {id(g): g for g in [*self.resends.values(), *self.owners.values()]}.values()
        stale = [
            h
            for h in [*self.free.values(), *(h for g in groups for h in g.held)]
            if now - h.touched > self.ack_wait_s / 3 and h.delivery.in_progress is not None
        ]
        for held in stale:
            held.touched = now
            assert held.delivery.in_progress is not None
            with contextlib.suppress(Exception):
                await held.delivery.in_progress()

    async def _fail_all(self, reason: str) -> None:
        everyone = [*self.free.values(), *(h for r in self.resends.values() for h in r.held)]
        self.free.clear()
        self.resends.clear()
        await self._settle_failed(everyone, "unknown", reason)

    # -- sending ------------------------------------------------------------------------------------------------
    def _own(self, group: Resend) -> Resend:
        for h in group.held:
            self.owners[h.entry.key] = group
        return group

    def _release(self, group: Resend) -> list[Held]:
        """Stop owning the group's members; what it holds now (with members delivered again meanwhile)."""
        held = list(group.held)
        for h in held:
            if self.owners.get(h.entry.key) is group:
                del self.owners[h.entry.key]
        return held

    async def _send_new(self, dest: Destination, group: Resend) -> None:
        """Claim the members, record the group (when more than one), then send it."""
        held, group_id = list(group.held), group.group_id
        created_at = datetime.now(UTC).replace(microsecond=0)
        claim = _encoder.encode(GroupClaim(group=group_id))
        record: GroupRecord | None = None
        try:
            await self.d.put_all([(marker_key(h.entry), claim) for h in held])
            if len(held) > 1:
                record = GroupRecord(
                    id=group_id, cluster=held[0].entry.cluster, members=[h.member for h in held], created_at=created_at
                )
                await self.d.delivered.put(record_key(self.destination, group_id), _encoder.encode(record))
                self._remember(record)
        except Exception as exc:  # NATS trouble: nothing was sent; the members come back and are decided again
            for h in self._release(group):
                if not h.settled.done():
                    h.settled.set_exception(busmod.Retry(f"group {group_id} not recorded: {type(exc).__name__}"))
            return
        group.record = record
        await self._send(dest, group)

    async def _send(self, dest: Destination, group: Resend) -> None:
        self.in_flight[group.group_id] = group
        try:
            with _send_trace(group.held):
                await self._send_once(dest, group)
        finally:
            self.in_flight.pop(group.group_id, None)
            self._release(group)

    async def _send_once(self, dest: Destination, group: Resend) -> None:
        held = group.held
        attempt = max(h.delivery.deliveries for h in held)
        kind = kind_of(dest)
        try:
            url, keys = self.d.secrets(dest)
            if group.record is None or len(group.record.members) <= 1:
                request = destinations.http_request(
                    held[0].entry, dest, url=url, hmac_keys=keys, now_s=int(time.time()),
                    timeout_cap_s=self.d.timeout_cap_s,
                )  # fmt: skip
            else:
                request = destinations.group_request(
                    dest, group.group_id, group.record.cluster, group.record.members, group.record.created_at,
                    url=url, hmac_keys=keys, now_s=int(time.time()), timeout_cap_s=self.d.timeout_cap_s,
                )  # fmt: skip
        except GiveUp as exc:
            await self._settle_failed(held, kind, str(exc))
            return
        except EntryMismatch as exc:
            await self._settle_failed(held, kind, f"{describe(dest)}: {exc}")
            return
        except ValueError as exc:  # signing refuses a missing or short key
            await self._settle_failed(held, kind, f"{describe(dest)}: hmac_key: {exc}")
            return
        status, retry_after, error = await self.d.post(request, dest, group.group_id, attempt)
        if 200 <= (status or 0) < 300:  # before anyone can look: a member delivered again finds it delivered
            self._remember(
                GroupRecord(
                    id=group.group_id,
                    cluster=held[0].entry.cluster,
                    created_at=group.record.created_at if group.record is not None else datetime.now(UTC),
                    delivered=True,
                )
            )
        # From here on, a member redelivered meanwhile finds the outcome (the cached record) or a new resend.
        self.in_flight.pop(group.group_id, None)
        held = self._release(group)
        now = datetime.now(UTC)
        if status is not None and 200 <= status < 300:
            grouped = group.record is not None and len(group.record.members) > 1
            done = GroupRecord(
                id=group.group_id,
                cluster=held[0].entry.cluster,
                created_at=group.record.created_at if group.record is not None else now,
                delivered=True,
            )
            self._remember(done)
            entries = [h.entry for h in held]
            await asyncio.gather(
                self.d.delivered.put(record_key(self.destination, group.group_id), _encoder.encode(done)),
                self.d.record(entries, attempt, "delivered", "", group.group_id if grouped else ""),
            )
            for h in held:
                if not h.settled.done():
                    h.settled.set_result(None)
            self.d.count_delivered(entries, dest, now, status, attempt, group.group_id)
            return
        wait = parse_retry_after(retry_after, now) if status in (429, 503) else None
        if wait is not None and self.bucket is not None:
            self.bucket = pace.pause(self.bucket, time.monotonic(), wait, self.d.retry.max_retry_after_s)
        decision = next_attempt(self.d.retry, attempt, status, retry_after, now, random.random)
        reason = f"{describe(dest)}: {decision.reason}{f' ({error})' if error else ''}"
        if decision.retry:
            alerts_counter.add(len(held), {"destination": dest.name, "kind": kind, "outcome": "retry"})
            log.info(
                "alert delivery will be retried",
                destination=describe(dest),
                alert=group.group_id,
                members=len(held),
                attempt=attempt,
                delay_s=round(decision.delay_s, 3),
                reason=reason,
            )
            for h in held:
                if not h.settled.done():
                    h.settled.set_exception(busmod.Retry(reason, decision.delay_s))
            return
        await self._settle_failed(held, kind, reason)

    async def _settle_failed(self, held: Sequence[Held], kind: str, reason: str) -> None:
        if not held:
            return
        attempt = max(h.delivery.deliveries for h in held)
        await self.d.give_up([h.entry for h in held], kind, attempt, reason)
        for h in held:
            if not h.settled.done():
                h.settled.set_exception(busmod.Reject(reason))


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read the answer up to MAX_RESPONSE_BYTES (so the connection can be reused); a longer one is cut off."""
    total = 0
    while total <= MAX_RESPONSE_BYTES:
        chunk = await response.content.read(MAX_RESPONSE_BYTES + 1 - total)
        if not chunk:
            return
        total += len(chunk)
    response.close()


def _was_delivered(raw: bytes) -> bool:
    """Whether this is what a notifier before grouping wrote under `<destination>.<alert id>` once the alert was
    delivered (its AlertSent record)."""
    try:
        return msgspec.json.decode(raw, type=AlertSent).outcome == "delivered"
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


def kind_of(dest: Destination) -> str:
    return str(dest.__struct_config__.tag)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)
