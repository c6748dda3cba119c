"""Sends one outbox entry to its destination over HTTP and decides, with retry.py, what happens next.

Outcomes: delivered (marker in KV, `alert.sent`, ack); retry later (`bus.Retry`: a server-side nak delay, so the
wait survives a restart); give up (`alert.failed`, then `bus.Reject`, which dead-letters). Never logs a URL, a
token, a key or a body: destinations are named by `describe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.objectstore import ObjectMissing, ObjectStore, ObjectTooLarge
from podsweep.policy import DefectDojoDestination, Destination, WebhookDestination
from schemas import subjects
from schemas.events import AlertOutcome
from services.notifier import destinations
from services.notifier.destinations import EntryMismatch, HttpRequest, describe
from services.notifier.outbox import OutboxEntry, audit
from services.notifier.policysource import PolicySource
from services.notifier.retry import RetryPolicy, next_attempt
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
    return f"{entry.destination}.{entry.key}"


class Deliverer:
    """The handler of every outbox consumer (one per destination, on `<root>-outbox.<destination>`)."""

    def __init__(
        self,
        bus: busmod.Bus,
        store: ObjectStore,
        policies: PolicySource,
        settings: Settings,
        client: httpx.AsyncClient,
        delivered: KeyValue,
        environ: Mapping[str, str],
    ) -> None:
        self.bus = bus
        self.store = store
        self.policies = policies
        self.settings = settings
        self.client = client
        self.delivered = delivered
        self.environ = environ
        self.retry = retry_policy(settings)
        self.timeout_cap_s = settings.notifier.outbox_ack_wait_s - TIMEOUT_MARGIN_S
        self.max_raw_bytes = int(settings.s3.max_object_mb * 1024 * 1024)

    async def handle(self, entry: OutboxEntry, delivery: busmod.Delivery) -> None:
        attempt = delivery.deliveries
        # A first delivery cannot have been sent before: only redeliveries pay for the marker lookup.
        if attempt > 1 and await self._was_delivered(entry):
            # Sent and marked before a crash, but not acked: record it (deduplicated by msg id), never resend.
            await self._record(entry, attempt, "delivered", "")
            return
        kind = "unknown"
        try:
            dest = self._destination(entry)
            kind = str(dest.__struct_config__.tag)
            request = await self._request(entry, dest)
        except GiveUp as exc:
            await self._give_up(entry, kind, attempt, str(exc))
            return
        status, retry_after, error = await self._post(request, dest, entry, attempt)
        now = datetime.now(UTC)
        decision = next_attempt(self.retry, attempt, status, retry_after, now, random.random)
        if status is not None and 200 <= status < 300:
            # Both before the ack (the consumer loop acks when this returns); independent of each other.
            await asyncio.gather(
                self._mark_delivered(entry, attempt, now), self._record(entry, attempt, "delivered", "")
            )
            alerts_counter.add(1, {"destination": entry.destination, "kind": kind, "outcome": "delivered"})
            latency.record(
                max(0.0, (now - entry.reported_at).total_seconds()), {"destination": entry.destination, "kind": kind}
            )
            log.info(
                "alert delivered",
                destination=describe(dest),
                alert=entry.key,
                attempts=attempt,
                status=status,
                since_report_ms=round((now - entry.reported_at).total_seconds() * 1000, 1),
            )
            return
        reason = f"{decision.reason}{f' ({error})' if error else ''}"
        if decision.retry:
            alerts_counter.add(1, {"destination": entry.destination, "kind": kind, "outcome": "retry"})
            log.info(
                "alert delivery will be retried",
                destination=describe(dest),
                alert=entry.key,
                attempt=attempt,
                delay_s=round(decision.delay_s, 3),
                reason=reason,
            )
            raise busmod.Retry(f"{describe(dest)}: {reason}", decision.delay_s)
        await self._give_up(entry, kind, attempt, f"{describe(dest)}: {reason}")

    # -- steps --------------------------------------------------------------------------------------------------
    def _destination(self, entry: OutboxEntry) -> Destination:
        try:
            return self.policies.policy.destination(entry.destination)
        except KeyError as exc:
            raise GiveUp(str(exc.args[0])) from None

    async def _request(self, entry: OutboxEntry, dest: Destination) -> HttpRequest:
        """Resolve the destination's secrets (and, for DefectDojo, read the raw report) and build the request."""
        try:
            url = dest.url if isinstance(dest, DefectDojoDestination) else read_url(dest.url, self.environ)
            keys = read_keys(dest.hmac_key, self.environ) if isinstance(dest, WebhookDestination) else []
            token = read_secret(dest.token, self.environ) if isinstance(dest, DefectDojoDestination) else ""
            raw = b""
            if isinstance(dest, DefectDojoDestination) and entry.upload is not None:
                raw = await self.store.get(entry.upload.raw_key, self.max_raw_bytes)
            return destinations.http_request(
                entry,
                dest,
                url=url,
                hmac_keys=keys,
                token=token,
                raw_report=raw,
                now_s=int(time.time()),
                timeout_cap_s=self.timeout_cap_s,
            )
        except (SecretError, EntryMismatch, ObjectTooLarge) as exc:
            raise GiveUp(f"{describe(dest)}: {exc}") from None
        except ObjectMissing as exc:
            raise GiveUp(f"{describe(dest)}: raw report {exc.args[0]} is no longer in the bucket") from None
        except ValueError as exc:  # signing refuses a missing or short key
            raise GiveUp(f"{describe(dest)}: hmac_key: {exc}") from None

    async def _post(
        self, request: HttpRequest, dest: Destination, entry: OutboxEntry, attempt: int
    ) -> tuple[int | None, str | None, str]:
        """(status or None, Retry-After, error). The span ends at the HTTP call; it never carries the URL."""
        kind = str(dest.__struct_config__.tag)
        with tracer.start_as_current_span(f"POST {kind}", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", urlsplit(request.url).hostname or "")
            span.set_attribute("podsweep.destination", dest.name)
            span.set_attribute("podsweep.alert_id", entry.key)
            span.set_attribute("http.request.resend_count", attempt - 1)
            started = time.monotonic()
            try:
                if request.file_field:
                    response = await self.client.post(
                        request.url,
                        headers=request.headers,
                        data=request.fields,
                        files={request.file_field: (request.file_name, request.file, request.file_content_type)},
                        timeout=request.timeout_s,
                    )
                else:
                    response = await self.client.post(
                        request.url, headers=request.headers, content=request.body, timeout=request.timeout_s
                    )
            except httpx.TimeoutException as exc:
                span.set_status(Status(StatusCode.ERROR, "timeout"))
                http_duration.record(time.monotonic() - started, {"destination": dest.name, "status": "timeout"})
                return None, None, f"{type(exc).__name__} after {request.timeout_s:.0f} s"
            except httpx.HTTPError as exc:
                # Only the class name: some transport errors quote the URL, which may be a credential.
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                http_duration.record(time.monotonic() - started, {"destination": dest.name, "status": "error"})
                return None, None, type(exc).__name__
            http_duration.record(time.monotonic() - started, {"destination": dest.name, "status": response.status_code})
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status_code}"))
            return response.status_code, response.headers.get("retry-after"), ""

    async def _was_delivered(self, entry: OutboxEntry) -> bool:
        try:
            found = await self.delivered.get(marker_key(entry))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False
        return found.value is not None

    async def _mark_delivered(self, entry: OutboxEntry, attempt: int, now: datetime) -> None:
        record = audit(entry, attempt, "delivered", "", now)
        # Marked already means a concurrent redelivery got there first: nothing to do.
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            await self.delivered.create(marker_key(entry), _encoder.encode(record))

    async def _record(self, entry: OutboxEntry, attempts: int, outcome: AlertOutcome, error: str) -> None:
        name = subjects.ALERT_SENT if outcome == "delivered" else subjects.ALERT_FAILED
        prefix = "sent" if outcome == "delivered" else "failed"
        await self.bus.publish(
            name,
            audit(entry, attempts, outcome, _printable(error), datetime.now(UTC)),
            msg_id=f"{prefix}:{entry.key}.{entry.destination}",
        )

    async def _give_up(self, entry: OutboxEntry, kind: str, attempt: int, reason: str) -> None:
        await self._record(entry, attempt, "failed", reason)
        alerts_counter.add(1, {"destination": entry.destination, "kind": kind, "outcome": "failed"})
        log.warning(
            "alert delivery failed", destination=entry.destination, alert=entry.key, attempts=attempt, reason=reason
        )
        raise busmod.Reject(reason)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)
