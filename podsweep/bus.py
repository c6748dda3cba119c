"""NATS JetStream: the one way podsweep connects, declares its stream/KV/consumers, publishes and consumes.

Publishing sets `Nats-Msg-Id` (the stream's duplicate window stores a re-published event once) and W3C trace
context; `publish_many` sends a batch with a bounded window of unacknowledged messages and one span for the batch,
re-sending what was not acknowledged (same ids, so nothing is stored twice). The consumer loop decodes with msgspec, acks on success, naks with backoff on failure, and dead-letters to
`<root>.dead.<service>` with the error: a message is never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from podsweep import aio, logs, natsprivate, telemetry
from podsweep.config import ConsumerSettings, NatsSettings
from podsweep.natsaccess import NatsAccess, inbox_prefix, refuse
from schemas import subjects
from schemas.events import DeadLetter

E = TypeVar("E", bound=msgspec.Struct)

log = logs.get("podsweep.bus")
tracer = trace.get_tracer("podsweep.bus")
meter = metrics.get_meter("podsweep.bus")
processed = meter.create_counter("podsweep_events_processed", description="Events handled, by outcome")
published = meter.create_counter("podsweep_events_published", description="Events published (duplicates too)")
asked_again = meter.create_counter(
    "podsweep_nats_requests_retried", description="JetStream requests asked again after no answer (a leader moving)"
)
_encoder = msgspec.json.Encoder()

# Unacknowledged messages a batch keeps on the wire: enough to hide the round trip, few enough that a lost
# connection re-sends little.
PUBLISH_WINDOW = 512
PUBLISH_ACK_TIMEOUT_S = 10.0
PUBLISH_ATTEMPTS = 5
# An idle consumer asks for messages this often; a request unanswered this much longer is presumed lost.
PULL_EXPIRES_S = 10.0
PULL_GRACE_S = 5.0
PULL_PAUSE_S = 1.0  # after the server refused a pull request, before the next one
# A KV watch's server sends a heartbeat after this long without entries; two missed ones end the watch.
WATCH_HEARTBEAT_S = 5.0
# On a JetStream cluster a request the leader of a stream or bucket should answer can go unanswered while that leader
# is lost and another is elected (seconds): it is asked again for this long, when asking again is safe (`settled`).
SETTLE_S = 45.0
SETTLE_FIRST_DELAY_S = 0.25
SETTLE_MAX_DELAY_S = 4.0
# JetStream's answer to a publish whose Nats-Msg-Id is still being replicated from an earlier attempt (409).
MSG_ID_IN_PROCESS = 10158


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: dead-letter it now, with this reason."""


class Retry(Exception):
    """Raised by a handler for a transient failure: redeliver after `delay` seconds (or the backoff)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class MissingBucket(LookupError):
    """A KV bucket that is not there, opened by a user that creates none (the operator commands)."""


class PublishFailed(ConnectionError):
    """Some events of a batch were still unacknowledged after every attempt; `unsent` is what to publish again."""

    def __init__(self, message: str, unsent: Sequence[Outgoing]) -> None:
        super().__init__(message)
        self.unsent = tuple(unsent)


T = TypeVar("T")


def unanswered(exc: BaseException) -> bool:
    """Whether `exc` means the request got no answer from a leader, rather than a refusal: a timeout, no responders
    (nobody leads the stream right now), a 503 (JetStream unavailable, e.g. no meta leader), the connection
    reconnecting to another server, or a publish whose Nats-Msg-Id an earlier, unanswered attempt still has in
    flight (the new leader has not decided it yet). The request may or may not have been carried out."""
    if isinstance(
        exc,
        (
            TimeoutError,  # nats.errors.TimeoutError is one (asyncio.TimeoutError is TimeoutError)
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.js.errors.ServiceUnavailableError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
        ),
    ):
        return True
    if not isinstance(exc, nats.js.errors.APIError):
        return False
    return getattr(exc, "code", None) == 503 or getattr(exc, "err_code", None) == MSG_ID_IN_PROCESS


def settle_delay(attempt: int) -> float:
    """The pause after the n-th unanswered attempt (1-based): doubling from SETTLE_FIRST_DELAY_S, at most
    SETTLE_MAX_DELAY_S."""
    return float(min(SETTLE_MAX_DELAY_S, SETTLE_FIRST_DELAY_S * 2 ** min(attempt - 1, 16)))


async def settled(what: str, call: Callable[[], Awaitable[T]], *, within_s: float = SETTLE_S, **fields: object) -> T:
    """`call()`, asked again after a bounded backoff while it goes unanswered (`unanswered`), for up to `within_s`.

    Only for calls that are safe to repeat when the first one may have been carried out: a publish with its
    Nats-Msg-Id, a compare-and-set write with the same revision, a read, an idempotent create. One log line per
    attempt asked again; after `within_s` the last error propagates.
    """
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            delay = settle_delay(attempt)
            if not unanswered(exc) or time.monotonic() - started + delay > within_s:
                raise
            log.warning(
                "nats request unanswered; asking again",
                what=what,
                attempt=attempt,
                delay_s=delay,
                error=_short(exc),
                **fields,
            )
            asked_again.add(1, {"what": what})
            await asyncio.sleep(delay)
            attempt += 1


class Outgoing(msgspec.Struct, frozen=True):
    """One event of a batch: its subject name (schemas/subjects.py), the event, and its Nats-Msg-Id."""

    name: str
    event: msgspec.Struct
    msg_id: str


@dataclass(frozen=True)
class Delivery:
    """What a handler may need to know about the message besides its event."""

    subject: str
    stream_seq: int
    deliveries: int
    headers: Mapping[str, str]
    # Resets the ack wait: for a handler that holds its event a while (the notifier pacing a destination).
    in_progress: Callable[[], Awaitable[None]] | None = None


# A handler that returns a future hands its event over: the message is acked when the future resolves and retried
# (or dead-lettered) when it fails, as if the handler had raised; its handler slot is free at once. The dispatcher
# writes sightings of one digest together this way, without losing any (an unsettled message is redelivered).
Settled = asyncio.Future[None]


@dataclass(frozen=True)
class Route(Generic[E]):
    """How a consumer handles one subject: the event type to decode and the handler to call."""

    type: type[E]
    handle: Callable[[E, Delivery], Awaitable[Settled | None]]


@dataclass(frozen=True)
class StreamRef:
    """A stream and the subjects it holds, `<root>.>`: names given to publish and consume are relative to `root`."""

    name: str
    root: str

    def subject(self, name: str) -> str:
        return subjects.subject(self.root, name)


class Bus:
    """A connected JetStream context for one service, with podsweep's subject root and KV prefix.

    `events` is the PODSWEEP stream every service shares; `outbox` is the notifier's own (schemas/subjects.py).
    With `access` (a service's declaration, podsweep/natsaccess.py), anything the declaration does not list raises
    `Undeclared` before it reaches the server: the deployed NATS permissions are generated from the same declaration.
    """

    def __init__(self, nc: NatsClient, settings: NatsSettings, access: NatsAccess | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(domain=settings.domain or None)
        self.settings = settings
        self.access = access
        self.events = StreamRef(settings.stream, settings.subject_root)
        self.outbox = StreamRef(subjects.outbox_stream(settings.stream), subjects.outbox_root(settings.subject_root))
        # Holds copies of some events (their subjects unchanged), no subject of its own: see ensure_replay_stream.
        self.replay = StreamRef(subjects.replay_stream(settings.stream), settings.subject_root)

    def subject(self, name: str) -> str:
        return self.events.subject(name)

    def check_publish(self, name: str, stream: StreamRef | None = None) -> None:
        if self.access is None:
            return
        if stream is not None and stream.name == self.outbox.name:
            if not self.access.outbox:
                raise refuse(self.access, f"publishes to the outbox ({stream.subject(name)})")
        elif not self.access.may_publish(name):
            raise refuse(self.access, f"publishes {name}")

    def check_consumer(self, durable: str, names: Sequence[str], stream: StreamRef) -> None:
        if self.access is None:
            return
        if stream.name == self.outbox.name:
            if not self.access.outbox:
                raise refuse(self.access, f"consumes the outbox ({durable})")
            return
        declared = self.access.durable(durable)
        if declared is None or sorted(declared.subjects) != sorted(names):
            raise refuse(self.access, f"consumes {', '.join(names)} through durable {durable}")

    def check_replay(self, name: str) -> None:
        if self.access is not None and name not in self.access.replays:
            raise refuse(self.access, f"replays {name} with an ordered consumer")

    def check_kv(self, name: str) -> None:
        if self.access is not None and self.access.bucket(name) is None:
            raise refuse(self.access, f"opens KV bucket {name}")

    async def listen(self, name: str, cb: Callable[[Msg], Awaitable[None]]) -> Subscription:
        """A plain subscription to the event subject `name` as it is published (no consumer: nothing is replayed or
        acknowledged); the caller unsubscribes."""
        if self.access is not None and name not in self.access.listens:
            raise refuse(self.access, f"listens to {name}")
        return await self.nc.subscribe(self.subject(name), cb=cb)

    async def consumer_info(self, durable: str) -> ConsumerInfo:
        """The info (lag) of a durable consumer on the events stream: the user's own, or one it inspects."""
        if self.access is not None and not self.access.may_inspect(durable):
            raise refuse(self.access, f"reads the info of durable {durable}")
        info: ConsumerInfo = await self.js.consumer_info(self.events.name, durable)
        return info

    async def publish(
        self,
        name: str,
        event: msgspec.Struct,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        stream: StreamRef | None = None,
    ) -> bool:
        """Publish an event (to `events` unless `stream` says otherwise); True when stored, False when the stream
        already had this msg_id (a duplicate, or an earlier attempt of this call whose answer was lost).

        Unanswered (the stream's leader moving) it is sent again with the same msg_id, which the stream stores once.
        """
        into = stream or self.events
        self.check_publish(name, into)
        subject = into.subject(name)
        with tracer.start_as_current_span(f"publish {name}", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.message.id", msg_id)
            out = telemetry.inject({**(headers or {}), "Nats-Msg-Id": msg_id})
            data = _encoder.encode(event)
            ack = await settled(
                "publish",
                lambda: self.js.publish(subject, data, headers=out, stream=into.name),
                subject=subject,
                msg_id=msg_id,
            )
        published.add(1, {"subject": name, "duplicate": bool(ack.duplicate)})
        return not ack.duplicate

    async def publish_many(
        self,
        batch: Sequence[Outgoing],
        *,
        window: int = PUBLISH_WINDOW,
        ack_timeout_s: float = PUBLISH_ACK_TIMEOUT_S,
        attempts: int = PUBLISH_ATTEMPTS,
    ) -> int:
        """Publish a batch; return how many were stored (the rest were duplicates).

        At most `window` messages wait for their ack at once. Every message carries its own Nats-Msg-Id and the
        batch span's traceparent. Messages not acknowledged (timeout, error, reconnect) are sent again with the same
        id, up to `attempts` rounds (so a re-sent message may land after later ones); then PublishFailed carries
        what is left.
        """
        if not batch:
            return 0
        names = sorted({out.name for out in batch})
        for name in names:
            self.check_publish(name)
        span_name = f"publish {names[0]}" if len(names) == 1 else "publish batch"
        stored: dict[str, int] = {}
        duplicates: dict[str, int] = {}
        with tracer.start_as_current_span(span_name, kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.batch.message_count", len(batch))
            trace_headers = telemetry.inject({})
            pending: Sequence[Outgoing] = batch
            for attempt in range(1, attempts + 1):
                pending, error = await self._send_window(
                    pending, trace_headers, window, ack_timeout_s, stored, duplicates
                )
                if not pending:
                    break
                span.set_attribute("messaging.publish.attempts", attempt + 1)
                log.warning("events unacknowledged, sending again", events=len(pending), attempt=attempt, error=error)
                if attempt < attempts:
                    await asyncio.sleep(min(5.0, 0.25 * 2**attempt))
            else:
                span.set_status(Status(StatusCode.ERROR, "unacknowledged"))
                raise PublishFailed(
                    f"nats: {len(pending)} of {len(batch)} events to {self.settings.stream} unacknowledged after "
                    f"{attempts} attempts (last error: {error}); is the stream's server reachable?",
                    pending,
                )
        for name, count in stored.items():
            published.add(count, {"subject": name, "duplicate": False})
        for name, count in duplicates.items():
            published.add(count, {"subject": name, "duplicate": True})
        return sum(stored.values())

    async def _send_window(
        self,
        batch: Sequence[Outgoing],
        trace_headers: Mapping[str, str],
        window: int,
        ack_timeout_s: float,
        stored: dict[str, int],
        duplicates: dict[str, int],
    ) -> tuple[list[Outgoing], str]:
        """One round of a batch: (what was not acknowledged, the last error seen)."""
        in_flight: deque[tuple[Outgoing, asyncio.Future[jsapi.PubAck]]] = deque()
        failed: list[Outgoing] = []
        error = ""

        async def settle_oldest() -> None:
            nonlocal error
            out, ack = in_flight.popleft()
            if not ack.done():
                await asyncio.wait((ack,), timeout=ack_timeout_s)
            if not ack.done():
                ack.cancel()
                failed.append(out)
                error = "ack timeout"
            elif ack.cancelled() or ack.exception() is not None:
                failed.append(out)
                error = "cancelled" if ack.cancelled() else f"{type(ack.exception()).__name__}: {ack.exception()}"
            else:
                counts = duplicates if ack.result().duplicate else stored
                counts[out.name] = counts.get(out.name, 0) + 1

        for out in batch:
            while len(in_flight) >= window or (in_flight and in_flight[0][1].done()):
                await settle_oldest()
            headers = {**trace_headers, "Nats-Msg-Id": out.msg_id}
            try:
                ack = await self.js.publish_async(
                    self.subject(out.name), _encoder.encode(out.event), headers=headers, stream=self.settings.stream
                )
            except (nats.errors.Error, OSError) as exc:
                failed.append(out)
                error = f"{type(exc).__name__}: {exc}"
                continue
            in_flight.append((out, ack))
        while in_flight:
            await settle_oldest()
        return failed, error

    def kv_bucket(self, name: str) -> str:
        return f"{self.settings.kv_prefix}-{name}"

    async def kv(self, name: str, *, history: int = 1, ttl_s: float | None = None) -> KeyValue:
        """The KV bucket `<kv_prefix>-<name>`, created when missing (idempotent).

        Created with direct gets allowed, as the nats CLI and Go client do: a read is then one request answered with
        the value and a few headers, instead of a JSON API answer carrying base64 and the stored headers, which
        nats-py parses with the email parser (about twice the CPU per read).
        """
        self.check_kv(name)
        bucket = self.kv_bucket(name)
        try:
            kv = await settled("kv open", lambda: self.js.key_value(bucket), bucket=bucket)
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            if self.access is not None and not self.access.creates:
                raise MissingBucket(
                    f"nats: KV bucket {bucket} does not exist yet: the podsweep services create it when they start"
                ) from None
        else:
            if not natsprivate.kv_allows_direct(kv):  # False for a bucket an older podsweep made
                log.info(
                    "kv bucket reads use the JSON API: allow direct gets on it to make them cheaper",
                    bucket=bucket,
                    how=f"nats stream edit KV_{bucket} --allow-direct",
                )
            await self._check_kv_replicas(bucket)
            return kv
        config = KeyValueConfig(
            bucket=bucket,
            history=history,
            ttl=ttl_s,
            storage=StorageType.FILE,
            replicas=self.settings.replicas,
            direct=True,
        )
        try:
            return await settled("kv create", lambda: self.js.create_key_value(config), bucket=bucket)
        except BadRequestError:  # another replica created it first
            kv = await settled("kv open", lambda: self.js.key_value(bucket), bucket=bucket)
            await self._check_kv_replicas(bucket)
            return kv

    async def _check_kv_replicas(self, bucket: str) -> None:
        """An existing bucket keeps its replica count. Under a NATS declaration (the deployed users may not update a
        stream) a count other than the settings' is logged with how to change it; without one (`podsweep up`, an
        administrator's credentials) the bucket's stream is updated to it, which JetStream does in place."""
        stream = f"KV_{bucket}"
        info = await settled("stream info", lambda: self.js.stream_info(stream), stream=stream)
        have = info.config.num_replicas or 1
        if have == self.settings.replicas:
            return
        if self.access is not None:
            log.warning(
                "kv bucket replicas differ from the settings and are left as they are: apply them as a NATS "
                "administrator",
                bucket=bucket,
                replicas=have,
                settings=self.settings.replicas,
                how=f"nats stream edit {stream} --replicas {self.settings.replicas}",
            )
            return
        config = dataclasses.replace(info.config, num_replicas=self.settings.replicas)
        await settled("stream update", lambda: self.js.update_stream(config), stream=stream)
        log.info("kv bucket replicas changed", bucket=bucket, replicas=self.settings.replicas, were=have)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()


async def connect(settings: NatsSettings, name: str, access: NatsAccess | None = None) -> Bus:
    """Connect with credentials and TLS when configured; raise with the URL (never the credentials) on failure.

    Replies and pulled messages arrive under an inbox prefix of this connection's own (`_INBOX_<name>`), the only
    subjects a service's NATS user may subscribe to. `access`: the service's declaration, which the Bus enforces.
    """
    options: dict[str, Any] = {
        "name": f"podsweep-{name}",
        "inbox_prefix": inbox_prefix(name),
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
    }
    if settings.creds_file:
        options["user_credentials"] = settings.creds_file
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.tls_ca_file or settings.tls_cert_file:
        ctx = ssl.create_default_context(cafile=settings.tls_ca_file or None)
        if settings.tls_cert_file:
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        options["tls"] = ctx
    servers = [s.strip() for s in settings.url.split(",")]
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)

    try:
        # Reconnects are unlimited once connected; the first connection must succeed within the timeout, so a wrong
        # password or URL fails start-up with a reason instead of retrying forever.
        nc = await asyncio.wait_for(
            nats.connect(servers=servers, allow_reconnect=True, connect_timeout=5, error_cb=on_error, **options),
            timeout=settings.connect_timeout_s,
        )
    except Exception as exc:
        reason = errors[-1] if errors else (str(exc) or type(exc).__name__)
        raise ConnectionError(f"nats: cannot connect to {settings.url}: {reason}") from exc
    return Bus(nc, settings, access)


async def ensure_stream(bus: Bus, stream: StreamRef | None = None) -> None:
    """Create a stream on <root>.>, the PODSWEEP one unless told, or bring an existing one to the settings (idempotent;
    safe from every replica).

    A service under its NATS declaration never updates a stream (its user may not: an update can purge), so a stream
    whose retention differs from the settings is left as it is, with a warning saying how to apply them.
    """
    s = bus.settings
    stream = stream or bus.events
    config = StreamConfig(
        name=stream.name,
        subjects=[f"{stream.root}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=s.max_age_days * 86400,
        duplicate_window=s.duplicate_window_s,
        num_replicas=s.replicas,
    )
    if bus.access is not None and stream.name == bus.outbox.name and not bus.access.outbox:
        raise refuse(bus.access, f"declares the outbox stream {stream.name}")
    if bus.access is not None and stream.name == bus.events.name and not bus.access.creates:
        raise refuse(bus.access, f"declares the events stream {stream.name}")
    name = stream.name
    try:
        info = await settled("stream info", lambda: bus.js.stream_info(name), stream=name)
    except NotFoundError:
        try:
            await settled("stream create", lambda: bus.js.add_stream(config), stream=name)
            return
        except BadRequestError:  # created concurrently
            info = await settled("stream info", lambda: bus.js.stream_info(name), stream=name)
    differs = _stream_differences(info.config, config)
    if not differs:
        return
    if bus.access is not None:
        log.warning(
            "stream differs from the settings and is left as it is: apply them as a NATS administrator",
            stream=stream.name,
            differs=", ".join(differs),
            how=f"nats stream edit {stream.name}",
        )
        return
    await settled("stream update", lambda: bus.js.update_stream(config), stream=name)


async def ensure_replay_stream(bus: Bus, names: Sequence[str]) -> StreamRef:
    """The stream a service replays `names` from (the admission view): a copy of those events of the events stream,
    made by the server (a source filtered to their subjects), then kept current.

    Apart from the events stream so that the consumers a replaying service creates, unnamed and ephemeral, are on a
    stream of its own: a user who may create unnamed consumers on a stream may also redefine any consumer there
    (a create request names it in its body, which NATS permissions cannot see). Returns once the copy holds at least
    every event of `names` the events stream held when this was called.
    """
    for name in names:
        bus.check_replay(name)
    s = bus.settings
    wanted = sorted(bus.subject(name) for name in names)
    config = StreamConfig(
        name=bus.replay.name,
        sources=[
            jsapi.StreamSource(
                name=bus.events.name, subject_transforms=[jsapi.SubjectTransform(src=w, dest=w) for w in wanted]
            )
        ],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=s.max_age_days * 86400,
        duplicate_window=1.0,  # the source stored each event once already; a long window only costs memory
        num_replicas=s.replicas,
    )
    replay = bus.replay.name
    try:
        info = await settled("stream info", lambda: bus.js.stream_info(replay), stream=replay)
    except NotFoundError:
        try:
            info = await settled("stream create", lambda: bus.js.add_stream(config), stream=replay)
        except BadRequestError:  # created concurrently
            info = await settled("stream info", lambda: bus.js.stream_info(replay), stream=replay)
    sources = [
        sorted(t.src for t in (source.subject_transforms or []))
        for source in info.config.sources or []
        if source.name == bus.events.name
    ]
    if sources != [wanted]:
        if bus.access is not None:
            raise RuntimeError(
                f"nats: stream {bus.replay.name} copies {sources} from {bus.events.name}, this version replays "
                f"{wanted}: delete it (`nats stream rm {bus.replay.name}`, nothing is lost: it is a copy) and "
                "start again, which makes it anew"
            )
        await bus.js.update_stream(config)
    for subject in wanted:
        held = await _count(bus, bus.events.name, subject)
        next_log = progress_at = time.monotonic()
        last = -1
        while (copied := await _count(bus, bus.replay.name, subject)) < held:
            now = time.monotonic()
            if copied != last:
                last, progress_at = copied, now
            elif now - progress_at > REPLAY_STALL_S and await _source_lag(bus) == 0:
                break  # events that expired from the source before they were copied: nothing left to copy
            if now >= next_log:
                log.info("replay stream catching up", stream=bus.replay.name, subject=subject, of=held, has=copied)
                next_log = now + 10
            await asyncio.sleep(0.1)
    return bus.replay


REPLAY_STALL_S = 5.0


async def _source_lag(bus: Bus) -> int | None:
    """How far the replay stream's copy is behind the events stream, as the server says (None: not known yet)."""
    info = await bus.js.stream_info(bus.replay.name)
    lags = [
        source.lag
        for source in info.sources or []
        if source.name == bus.events.name and source.active is not None and source.active >= 0  # -1: never heard
    ]
    return lags[0] if lags else None


async def _count(bus: Bus, stream: str, subject: str) -> int:
    info = await settled("stream info", lambda: bus.js.stream_info(stream, subjects_filter=subject), stream=stream)
    return int((info.state.subjects or {}).get(subject, 0))


def _stream_differences(have: StreamConfig, want: StreamConfig) -> list[str]:
    fields = ("subjects", "retention", "storage", "max_age", "duplicate_window", "num_replicas")
    return [
        f"{f} {getattr(have, f)} (settings: {getattr(want, f)})" for f in fields if getattr(have, f) != getattr(want, f)
    ]


async def ensure_consumer(
    bus: Bus, durable: str, names: list[str], settings: ConsumerSettings, stream: StreamRef | None = None
) -> None:
    """A durable pull consumer on the given subjects of `stream` (PODSWEEP unless told). max_deliver is enforced by
    the loop, which dead-letters."""
    stream = stream or bus.events
    bus.check_consumer(durable, names, stream)
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,  # the loop dead-letters after settings.max_deliver, so nothing expires unseen
        filter_subjects=[stream.subject(n) for n in names],
        max_ack_pending=max(settings.batch * 4, settings.max_ack_pending),
    )
    # The same definition every time: asking again after a lost answer creates nothing twice.
    await settled("consumer create", lambda: bus.js.add_consumer(stream.name, config), durable=durable)


def backoff_delay(settings: ConsumerSettings, deliveries: int) -> float:
    """Redelivery delay after the n-th failed delivery (1-based), the last step repeating."""
    return settings.backoff_s[min(deliveries, len(settings.backoff_s)) - 1]


async def dead_letter(bus: Bus, service: str, msg: Msg, deliveries: int, error: str) -> None:
    meta = msg.metadata
    letter = DeadLetter(
        service=service,
        subject=msg.subject,
        stream_seq=meta.sequence.stream,
        deliveries=deliveries,
        error=_printable(error)[:4000],
        payload=msg.data,
        failed_at=datetime.now(UTC),
    )
    await bus.publish(
        f"{subjects.DEAD}.{service}",
        letter,
        msg_id=f"dead:{service}:{meta.stream}:{meta.sequence.stream}",  # the stream the message came from
    )
    log.warning(
        "event dead-lettered",
        service=service,
        subject=msg.subject,
        stream_seq=meta.sequence.stream,
        deliveries=deliveries,
        error=letter.error,
    )


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


async def consume(
    bus: Bus,
    *,
    service: str,
    durable: str,
    routes: Mapping[str, Route[Any]],
    settings: ConsumerSettings,
    stop: asyncio.Event,
    pull_expires_s: float = PULL_EXPIRES_S,
    stream: StreamRef | None = None,
) -> None:
    """Run until `stop` is set, then finish the messages in flight and return (the SIGTERM drain).

    Messages are pulled continuously rather than fetched batch by batch: a pull asks for `settings.batch` messages
    and is topped up once half of them arrived, and each message goes straight to a callback. nats-py's fetch waits
    for every message with a timer and a task of its own and sends two requests per round, once a second when idle;
    here an idle consumer sends one request per `pull_expires_s`. A request the server lost (a restart) is noticed
    when its expiry passes unanswered, and asked again.
    """
    stream = stream or bus.events
    await ensure_consumer(bus, durable, list(routes), settings, stream)
    by_subject = {
        stream.subject(name): (name, route, msgspec.json.Decoder(route.type)) for name, route in routes.items()
    }
    next_subject = f"{natsprivate.api_prefix(bus.js)}.CONSUMER.MSG.NEXT.{stream.name}.{durable}"
    await _PullConsumer(bus, service, settings, stop, pull_expires_s, by_subject, next_subject).run()


class _PullConsumer:
    """One `consume` call's state: how many messages are asked for, when the server was last heard, the handlers
    in flight and the events handed over. The NATS callback and the watchdog loop share it."""

    def __init__(
        self,
        bus: Bus,
        service: str,
        settings: ConsumerSettings,
        stop: asyncio.Event,
        pull_expires_s: float,
        by_subject: Mapping[str, tuple[str, Route[Any], msgspec.json.Decoder[Any]]],
        next_subject: str,
    ) -> None:
        self.bus, self.service, self.settings, self.stop = bus, service, settings, stop
        self.pull_expires_s = pull_expires_s
        self.by_subject = by_subject
        self.next_subject = next_subject
        self.limit = asyncio.Semaphore(settings.concurrency)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.inbox = bus.nc.new_inbox()
        self.expires_ns = int(pull_expires_s * 1_000_000_000)
        self.wanted = 0  # messages asked for and neither delivered nor expired
        self.heard = time.monotonic()  # the last pull sent or answered
        self.paused_until = 0.0  # after a refusal (consumer deleted, ...), the next request waits a moment
        self.retrying: set[asyncio.Future[None]] = set()
        self.waiting = asyncio.Event()  # a delivered message waits for a free handler
        self.handed_over: set[asyncio.Future[None]] = set()  # events a handler settles later (see Settled)

    async def run(self) -> None:
        sub = await self.bus.nc.subscribe(self.inbox, cb=self.on_message)
        try:
            await self.pull()
            while not self.stop.is_set():
                await aio.sleep_unless(self.stop, self.pull_expires_s)
                behind = self.waiting.is_set() or sub.pending_msgs > 0
                if not behind and time.monotonic() - self.heard > self.pull_expires_s + PULL_GRACE_S:
                    self.wanted = 0  # every request should have been answered by now: the server lost them
                await self.pull()
        finally:
            # No new deliveries; those already here are handed out, then the handlers finish.
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
            if self.in_flight:
                await asyncio.gather(*self.in_flight, return_exceptions=True)
            if self.handed_over:  # settled by their handlers' owner as it stops; what is not by ack_wait is redelivered
                await asyncio.wait(set(self.handed_over), timeout=self.settings.ack_wait_s)
            with contextlib.suppress(Exception):  # acks are fire-and-forget: make sure they left before returning
                await self.bus.nc.flush(timeout=5)

    async def one(self, msg: Msg) -> None:
        try:
            await _handle(self.bus, self.service, msg, self.by_subject, self.settings, self.handed_over)
        finally:
            self.limit.release()

    async def pull(self) -> None:
        batch = self.settings.batch
        if self.stop.is_set() or self.wanted > batch // 2 or time.monotonic() < self.paused_until:
            return
        more = batch - self.wanted
        try:
            await self.bus.nc.publish(
                self.next_subject, _encoder.encode({"batch": more, "expires": self.expires_ns}), reply=self.inbox
            )
        except nats.errors.Error as exc:  # closed or reconnecting: the watchdog asks again
            log.debug("pull not sent", service=self.service, error=_short(exc))
            return
        self.wanted += more
        self.heard = time.monotonic()

    def pull_later(self) -> None:  # the pause after a refusal is over
        self.paused_until = 0.0
        task = asyncio.ensure_future(self.pull())
        self.retrying.add(task)
        task.add_done_callback(self.retrying.discard)

    async def on_message(self, msg: Msg) -> None:
        self.heard = time.monotonic()
        if not msg.reply:  # a status: 408 when a request expires, 409 when the server refuses or ends one
            headers = msg.headers or {}
            status = headers.get(jsapi.Header.STATUS, "")
            if status == "100":  # a heartbeat (never asked for)
                return
            left = headers.get("Nats-Pending-Messages")
            self.wanted = max(0, self.wanted - int(left)) if left is not None and left.isdigit() else 0
            if status != "408":
                log.info(
                    "pull ended by the server",
                    service=self.service,
                    status=status,
                    reason=headers.get("Description", ""),
                )
                self.paused_until = time.monotonic() + PULL_PAUSE_S
                asyncio.get_running_loop().call_later(PULL_PAUSE_S, self.pull_later)
            await self.pull()
            return
        self.wanted = max(0, self.wanted - 1)
        if self.limit.locked():
            self.waiting.set()  # every handler busy: the server is not silent, this loop is behind
        await self.limit.acquire()
        self.waiting.clear()
        self.heard = time.monotonic()  # what waited here came from a live server
        task = asyncio.create_task(self.one(msg))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        await self.pull()


async def _handle(
    bus: Bus,
    service: str,
    msg: Msg,
    by_subject: Mapping[str, tuple[str, Route[Any], msgspec.json.Decoder[Any]]],
    settings: ConsumerSettings,
    handed_over: set[asyncio.Future[None]],
) -> None:
    deliveries, stream_seq, _, _ = natsprivate.delivery_sequences(msg.reply)
    headers = dict(msg.headers or {})
    name, route, decoder = by_subject.get(msg.subject, (msg.subject, None, None))
    parent = telemetry.extract(headers)
    with tracer.start_as_current_span(f"process {name}", context=parent, kind=SpanKind.CONSUMER) as span:
        span.set_attribute("messaging.consumer.group.name", service)
        span.set_attribute("messaging.delivery.count", deliveries)
        if route is None or decoder is None:
            await dead_letter(bus, service, msg, deliveries, f"no handler for subject {msg.subject}")
            await msg.term()
            processed.add(1, {"service": service, "subject": name, "outcome": "dead"})
            return
        if deliveries > settings.max_deliver:
            # delivered again after the last attempt: the worker died while handling it
            await dead_letter(bus, service, msg, deliveries, "worker stopped while handling this event too often")
            await msg.term()
            processed.add(1, {"service": service, "subject": name, "outcome": "dead"})
            return
        try:
            event = decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            span.set_status(Status(StatusCode.ERROR, "invalid event"))
            await dead_letter(bus, service, msg, deliveries, f"invalid {name} event: {exc}")
            await msg.term()
            processed.add(1, {"service": service, "subject": name, "outcome": "invalid"})
            return
        delivery = Delivery(
            subject=name, stream_seq=stream_seq, deliveries=deliveries, headers=headers, in_progress=msg.in_progress
        )
        try:
            later = await route.handle(event, delivery)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__ if not isinstance(exc, Reject) else str(exc)))
            await _settle(bus, service, msg, name, deliveries, settings, exc)
            return
        if later is None:
            await _settle(bus, service, msg, name, deliveries, settings, None)
            return
        settling = asyncio.ensure_future(_settle_when(bus, service, msg, name, deliveries, settings, later))
        handed_over.add(settling)
        settling.add_done_callback(handed_over.discard)


async def _settle_when(
    bus: Bus, service: str, msg: Msg, name: str, deliveries: int, settings: ConsumerSettings, later: Settled
) -> None:
    try:
        await later
    except Exception as exc:
        await _settle(bus, service, msg, name, deliveries, settings, exc)
    else:
        await _settle(bus, service, msg, name, deliveries, settings, None)


async def _settle(
    bus: Bus, service: str, msg: Msg, name: str, deliveries: int, settings: ConsumerSettings, exc: Exception | None
) -> None:
    """Ack a handled event; dead-letter a rejected one or one out of attempts; redeliver the rest after a backoff."""
    if exc is None:
        await msg.ack()
        processed.add(1, {"service": service, "subject": name, "outcome": "ok"})
        return
    if isinstance(exc, Reject):
        await dead_letter(bus, service, msg, deliveries, f"rejected: {exc}")
        await msg.term()
        processed.add(1, {"service": service, "subject": name, "outcome": "rejected"})
        return
    error = f"{type(exc).__name__}: {exc}"
    if deliveries >= settings.max_deliver:
        await dead_letter(bus, service, msg, deliveries, f"failed {deliveries} times, last: {error}")
        await msg.term()
        processed.add(1, {"service": service, "subject": name, "outcome": "dead"})
        return
    delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else backoff_delay(settings, deliveries)
    log.info("event will be retried", service=service, subject=name, deliveries=deliveries, delay_s=delay, error=error)
    await msg.nak(delay=delay)
    processed.add(1, {"service": service, "subject": name, "outcome": "retry"})


S = TypeVar("S", bound=msgspec.Struct)
D = TypeVar("D")  # what a compare-and-set decision decided, beside the new document


class Conflict(RuntimeError):
    """A compare-and-set update kept losing to other writers; the caller should retry the event later."""


async def kv_read(kv: KeyValue, key: str, typ: type[S]) -> tuple[S | None, int]:
    """The document under `key` and its revision (0 when absent or deleted)."""
    try:
        entry = await settled("kv read", lambda: kv.get(key), bucket=natsprivate.kv_bucket(kv), key=key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None, 0
    if entry.value is None or entry.revision is None:
        return None, 0
    return msgspec.json.decode(entry.value, type=typ), entry.revision


async def kv_update(
    kv: KeyValue, key: str, typ: type[S], change: Callable[[S | None], S | None], attempts: int = 20
) -> tuple[S | None, bool]:
    """Compare-and-set: apply the pure `change` to the current document and write it only if nobody wrote first.

    Returns (document now stored, whether this call wrote it). `change` returning None means "no change". On a lost
    race the document is read again and `change` re-applied, so two replicas never both act on one old state.
    """
    stored, _, wrote = await kv_change(kv, key, typ, change, attempts=attempts)
    return stored, wrote


async def kv_change(
    kv: KeyValue,
    key: str,
    typ: type[S],
    change: Callable[[S | None], S | None],
    *,
    known: tuple[S | None, int] | None = None,
    fresh: bool = False,
    attempts: int = 20,
) -> tuple[S | None, int, bool]:
    """`kv_update` that may start from a document and revision the caller already holds (its own last write, a
    mirror), saving the read; a stale `known` only costs the failed write. "No change" is concluded from a fresh
    read, or from `known` when the caller says it is as fresh as one (`fresh`: a KvMirror's entry). Returns
    (document, its revision, whether this call wrote it)."""
    stored, revision, wrote, _ = await kv_decide(
        kv, key, typ, lambda old: (change(old), None), known=known, fresh=fresh, attempts=attempts
    )
    return stored, revision, wrote


async def kv_decide(
    kv: KeyValue,
    key: str,
    typ: type[S],
    decide: Callable[[S | None], tuple[S | None, D]],
    *,
    known: tuple[S | None, int] | None = None,
    fresh: bool = False,
    attempts: int = 20,
) -> tuple[S | None, int, bool, D]:
    """`kv_change` whose `decide` returns the new document (None: no change) and what it decided. Returns the
    document, its revision, whether this call wrote it, and the decision made on the document it returns (a lost
    race decides again: only the last decision counts)."""
    for _ in range(attempts):
        if known is not None:
            current, revision = known
            known = None
            new, decided = decide(current)
            if new is None:
                if fresh:
                    return current, revision, False, decided
                continue  # decided on what may be stale: read and decide again
        else:
            current, revision = await kv_read(kv, key, typ)
            new, decided = decide(current)
            if new is None:
                return current, revision, False, decided
        written = await kv_put_if(kv, key, new, revision)
        if written is None:
            continue
        return new, written, True, decided
    raise Conflict(f"kv: key {key!r} lost {attempts} compare-and-set races in a row; retry later")


async def kv_put_if(kv: KeyValue, key: str, document: msgspec.Struct, revision: int) -> int | None:
    """Write `document` only if `key` is still at `revision` (0: absent); its new revision, or None when another
    writer came first. Any other refusal (a value over the bucket's size limit, ...) raises: retrying cannot help.

    An unanswered write (the bucket's leader moving) is sent again with the same revision. When that one is refused
    for a wrong revision, the first may have landed: if the key now holds exactly these bytes, it did, and its
    revision is returned; otherwise another writer came first.
    """
    data = _encoder.encode(document)
    attempts = 0

    async def write() -> int:
        nonlocal attempts
        attempts += 1
        if natsprivate.api_prefix(natsprivate.kv_jetstream(kv)) != DEFAULT_API_PREFIX:
            return await _kv_write_in_domain(kv, key, data, revision)
        if revision == 0:
            return await kv.create(key, data)
        return await kv.update(key, data, last=revision)

    bucket = natsprivate.kv_bucket(kv)
    try:
        return await settled("kv write", write, bucket=bucket, key=key)
    except nats.js.errors.KeyWrongLastSequenceError:
        if attempts == 1:
            return None
    try:
        entry = await settled("kv read", lambda: kv.get(key), bucket=bucket, key=key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    if entry.value == data and entry.revision is not None:
        log.info("kv write landed before its answer was lost", bucket=bucket, key=key, revision=entry.revision)
        return entry.revision
    return None


DEFAULT_API_PREFIX = "$JS.API"
WRONG_LAST_SEQUENCE = 10071  # JetStream's answer to an expected last subject sequence that is not the last


async def _kv_write_in_domain(kv: KeyValue, key: str, data: bytes, revision: int) -> int:
    """A compare-and-set write to a bucket of another JetStream domain (a service on a leaf server writing to the
    hub's): published on `$JS.<domain>.API.$KV.<bucket>.<key>`, the only subject of it that crosses the leaf
    connection. nats-py 2.16 writes `$KV.<bucket>.<key>` whatever the domain (its issue #1010), which no stream hears
    from a leaf. Creating a key over a delete marker takes the marker's revision, as nats-py's create does."""
    js = natsprivate.kv_jetstream(kv)
    subject = f"{natsprivate.api_prefix(js)}.{natsprivate.kv_key_prefix(kv)}{key}"

    async def put(last: int) -> int:
        try:
            ack = await js.publish(subject, data, headers={"Nats-Expected-Last-Subject-Sequence": str(last)})
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) == WRONG_LAST_SEQUENCE:
                raise nats.js.errors.KeyWrongLastSequenceError(description=str(exc)) from None
            raise
        return int(ack.seq)

    try:
        return await put(revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        if revision != 0:
            raise
        try:
            await kv.get(key)
        except nats.js.errors.KeyDeletedError as deleted:
            if deleted.entry is not None and deleted.entry.revision:
                return await put(deleted.entry.revision)
        raise


async def kv_documents(kv: KeyValue, typ: type[S], *, timeout_s: float = 30.0) -> tuple[list[S], list[str]]:
    """Every key's latest document from one pass over the bucket (a watch, not a read per key), and the keys whose
    document could not be decoded (the caller says whether that is worth a log line).

    The pass is a `KvMirror` followed until it has seen the bucket's last revision as of the start. Not nats-py's KV
    watch: on a busy client its "initial values done" marker came before the values, and its ordered consumer,
    restarted after a gap, resumes from a sequence and skips keys not delivered yet (a pass missing keys).
    """
    state = (await kv.status()).stream_info.state
    target = state.last_seq if state.messages else 0
    mirror: KvMirror[S] = KvMirror(kv, typ, quiet=True)
    stop = asyncio.Event()
    following = asyncio.create_task(mirror.follow(stop))
    try:
        async with asyncio.timeout(timeout_s):
            await mirror.caught_up(target)
    finally:
        stop.set()
        await following
    documents = [document for _, document in mirror.documents()]
    return documents, mirror.unreadable()


class KvMirror(Generic[S]):
    """The latest document and revision of every key of a bucket, kept current by a watch.

    A change reaches the mirror for far less CPU than a read costs: compare-and-set
    starts from the mirror, and a pass over every key reads nothing. A mirrored entry is as fresh as a read made a
    moment ago (a read is stale by the time it is used, too); writes stay compare-and-set, so a lagging mirror only
    costs a failed write and a read. Values are decoded when first asked for, not as they arrive: most of another
    replica's writes are never looked at here, and a key that changed twice in between is decoded once.

    Documents are held as their JSON bytes; `decoded` says how many stay decoded as well (None: all; a bucket of a
    fleet's digests holds 100,000 keys, whose decoded documents take about three times their bytes), the most
    recently asked for first. `documents()` decodes one at a time and keeps none of them.
    """

    def __init__(self, kv: KeyValue, typ: type[S], *, quiet: bool = False, decoded: int | None = None) -> None:
        self.kv = kv
        self._quiet = quiet  # unreadable documents are the caller's to report
        self._decoder = msgspec.json.Decoder(typ)
        self._encoder = msgspec.json.Encoder()
        self._held: dict[str, tuple[bytes | None, int]] = {}  # the last readable value's bytes (None: deleted)
        self._raw: dict[str, tuple[bytes, int]] = {}  # arrived, not decoded yet (always newer than _held's)
        self._decoded: OrderedDict[str, tuple[S | None, int]] = OrderedDict()  # the same, decoded
        self._keep = decoded
        self._unreadable: set[str] = set()
        self.ready = False  # the watch has delivered every key once since it (re)started
        self.high = 0  # the highest revision the watch delivered
        self._progress = asyncio.Event()  # set on each delivery

    def known(self, key: str) -> tuple[S | None, int] | None:
        """(document, revision); (None, 0) for a key never written; None while the mirror cannot say (starting,
        its watch restarting, or a document it could not decode): read instead."""
        if not self.ready:
            return None
        found = self.last(key)
        return None if key in self._unreadable else found

    def last(self, key: str) -> tuple[S | None, int]:
        """The last readable document seen and its revision, ready or not ((None, 0): none). A starting point for
        compare-and-set that does not conclude "no change" from it."""
        if key in self._raw:
            self._decode(key)
        found = self._decoded.get(key)
        if found is not None:
            self._decoded.move_to_end(key)
            return found
        data, revision = self._held.get(key, (None, 0))
        document = self._decoder.decode(data) if data is not None else None  # it decoded once already
        self._remember(key, document, revision)
        return document, revision

    def revision(self, key: str) -> int:
        """The latest revision seen of `key` (0: none), readable or not, without decoding it."""
        raw = self._raw.get(key)
        return raw[1] if raw is not None else self._held.get(key, (None, 0))[1]

    def saw(self, key: str, document: S | None, revision: int) -> None:
        """Record a document at a revision (the watch's, or this process's own write); older news is ignored."""
        if revision > self.revision(key):
            self._held[key] = (self._encoder.encode(document) if document is not None else None, revision)
            self._remember(key, document, revision)
            self._raw.pop(key, None)
            self._unreadable.discard(key)

    def documents(self) -> Iterator[tuple[str, S]]:
        """Every key with a readable document, as last seen, decoded one at a time (none kept decoded for it)."""
        for key in list(self._raw):
            self._decode(key, keep=False)
        for key, (data, _) in list(self._held.items()):
            if data is None or key in self._unreadable:
                continue
            found = self._decoded.get(key)
            document = found[0] if found is not None else self._decoder.decode(data)
            if document is not None:
                yield key, document

    def unreadable(self) -> list[str]:
        """The keys whose last document could not be decoded (after `documents()` has decoded everything)."""
        return sorted(self._unreadable)

    async def caught_up(self, revision: int) -> None:
        """Return once the watch has delivered every key and at least `revision` (the bucket's last, read before)."""
        while not (self.ready and self.high >= revision):
            self._progress.clear()
            await self._progress.wait()

    def _remember(self, key: str, document: S | None, revision: int) -> None:
        self._decoded[key] = (document, revision)
        self._decoded.move_to_end(key)
        if self._keep is not None:
            while len(self._decoded) > self._keep:
                self._decoded.popitem(last=False)

    def _decode(self, key: str, *, keep: bool = True) -> None:
        data, revision = self._raw.pop(key)
        try:
            document = self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not self._quiet:
                log.warning(
                    "kv watch saw an unreadable document",
                    bucket=natsprivate.kv_bucket(self.kv),
                    key=key,
                    error=_short(exc),
                )
            self._unreadable.add(key)  # last() keeps the last readable one
            return
        self._held[key] = (data, revision)
        self._decoded.pop(key, None)
        if keep:
            self._remember(key, document, revision)
        self._unreadable.discard(key)

    async def follow(self, stop: asyncio.Event) -> None:
        """Watch the bucket until `stop`; a broken watch is started again (and the mirror is not ready meanwhile)."""
        while not stop.is_set():
            try:
                await self._watch(stop)
            except Exception as exc:  # a broken watch costs reads until the next one has caught up
                log.warning("kv watch restarts", bucket=natsprivate.kv_bucket(self.kv), error=_short(exc))
            finally:
                self.ready = False
            await aio.sleep_unless(stop, 1.0)

    async def _watch(self, stop: asyncio.Event) -> None:
        """One ordered push consumer over the bucket: every key's latest value, then each change, straight into the
        mirror, until `stop` or a lost message.

        Not nats-py's KV watch, which polls for flow control four times a second per watch (most of an idle
        replica's wake-ups) and builds metadata objects for every entry. Here a flow-control request is answered as it
        arrives: callbacks run in order, so everything delivered before it has been applied. A gap in the consumer
        sequence, or silence for two heartbeats, ends this watch, and `follow` starts a new one, which delivers every
        key's latest value again.
        """
        kv = self.kv
        nc = natsprivate.kv_connection(kv)
        prefix = natsprivate.kv_key_prefix(kv)
        inbox = nc.new_inbox()
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        last_seq = 0  # consumer sequence of the last entry applied
        heard = time.monotonic()

        def lose(reason: str) -> None:
            if not lost.done():
                lost.set_result(reason)

        async def on_message(msg: Msg) -> None:
            nonlocal last_seq, heard
            heard = time.monotonic()
            headers = msg.headers or {}
            if not msg.data and headers.get(jsapi.Header.STATUS) == "100":
                # Flow control asks for an empty reply; a heartbeat may carry one that was missed, and says which
                # entry the server delivered last.
                reply = msg.reply or headers.get(jsapi.Header.CONSUMER_STALLED)
                if reply:
                    await nc.publish(reply)
                delivered = headers.get(jsapi.Header.LAST_CONSUMER)
                if delivered is not None and int(delivered) != last_seq:
                    lose(f"the server delivered entry {delivered}, the last one applied here is {last_seq}")
                return
            try:
                _, stream_seq, consumer_seq, pending = natsprivate.delivery_sequences(msg.reply)
            except ValueError as exc:
                lose(str(exc))
                return
            if consumer_seq != last_seq + 1:
                lose(f"entry {consumer_seq} arrived after {last_seq}")
                return
            last_seq = consumer_seq
            self.high = max(self.high, stream_seq)
            key = msg.subject[len(prefix) :]
            if stream_seq > self.revision(key):
                if headers.get("KV-Operation") in ("DEL", "PURGE"):
                    self.saw(key, None, stream_seq)
                else:
                    self._raw[key] = (msg.data, stream_seq)
            if pending == 0:
                self.ready = True  # the latest values are in; what follows are changes
            self._progress.set()

        sub = await nc.subscribe(inbox, cb=on_message)
        try:
            info = await natsprivate.kv_jetstream(kv).add_consumer(
                natsprivate.kv_stream(kv),
                ConsumerConfig(
                    deliver_subject=inbox,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                    ack_policy=AckPolicy.NONE,
                    max_deliver=1,
                    filter_subject=f"{prefix}>",
                    flow_control=True,
                    idle_heartbeat=WATCH_HEARTBEAT_S,
                    mem_storage=True,
                    num_replicas=1,
                    inactive_threshold=WATCH_HEARTBEAT_S * 20,  # the server drops it once this process is gone
                ),
            )
            if info.num_pending == 0 and last_seq == 0:
                self.ready = True  # an empty bucket
                self._progress.set()
            while not stop.is_set():
                await aio.wait_first((lost, stop), at_most_s=WATCH_HEARTBEAT_S)
                if lost.done():
                    raise WatchLost(f"kv watch of {natsprivate.kv_bucket(kv)}: {lost.result()}")
                if time.monotonic() - heard > 2 * WATCH_HEARTBEAT_S:
                    raise WatchLost(
                        f"kv watch of {natsprivate.kv_bucket(kv)}: no heartbeat for {2 * WATCH_HEARTBEAT_S:.0f}s"
                    )
            # Not deleted: no service may delete a consumer on a shared bucket (it could delete another's), and the
            # server removes this one inactive_threshold after the unsubscribe below.
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class WatchLost(ConnectionError):
    """A KV watch missed an entry or stopped hearing from the server; the mirror starts a new one."""


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"
