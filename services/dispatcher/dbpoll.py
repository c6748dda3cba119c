"""The leader's watch on the Trivy server's vulnerability DB: polls `GET /version`, and when the DB is newer than the
one recorded (LIMITS_BUCKET, key `vulndb`) publishes `db.updated` and records it. vulndb.py decides; this only does
the I/O. A server that is down or answers nonsense costs a warning and the next poll, never the dispatcher: the
same failure again is a warning once an hour (the PodsweepVulnDBStale alert is what pages), and the first good answer
after failures says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import httpx
import msgspec
from nats.js.kv import KeyValue
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep import bus as busmod
from podsweep import logs
from schemas import subjects
from schemas.state import VULNDB_KEY, VulnDbSeen
from services.dispatcher import vulndb
from services.dispatcher.digests import utcnow
from services.dispatcher.schedule import wait_for

log = logs.get("podsweep.dispatcher")
REQUEST_TIMEOUT_S = 10.0
REPEAT_WARNING_S = 3600.0  # the same failure again is warned about at most this often (info in between)
_latest: dict[str, float] = {}  # "updated_at" -> unix seconds of the DB this process last recorded, while leading


def _observe(_: CallbackOptions) -> Iterable[Observation]:
    if "updated_at" in _latest:
        yield Observation(_latest["updated_at"])


metrics.get_meter("podsweep.dispatcher").create_observable_gauge(
    "podsweep_vulndb_updated_timestamp_seconds",
    [_observe],
    unit="s",
    description="UpdatedAt of the vulnerability DB the Trivy server serves, as the leading dispatcher last saw it",
)


async def fetch_version(client: httpx.AsyncClient, server: str) -> bytes:
    """The body of the server's /version answer, at most vulndb.MAX_BODY_BYTES + 1 bytes (the rest is not read)."""
    async with client.stream("GET", f"{server.rstrip('/')}/version") as response:
        if response.status_code != 200:
            raise httpx.HTTPStatusError(f"HTTP {response.status_code}", request=response.request, response=response)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > vulndb.MAX_BODY_BYTES:
                break
        return bytes(body)


class DbPoller:
    """Polls one Trivy server every `interval_s` while this replica leads."""

    def __init__(self, *, bus: busmod.Bus, kv: KeyValue, server: str, cluster: str, interval_s: float) -> None:
        self.bus, self.kv, self.server, self.cluster, self.interval_s = bus, kv, server, cluster, interval_s
        self.failing: str | None = None  # the failure of the last poll, if it failed
        self.failed_polls = 0
        self.warned_at = 0.0  # when that failure was last a warning (monotonic)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("watching the vulnerability DB", server=self.server, interval_s=self.interval_s)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, follow_redirects=False) as client:
            try:
                while not stop.is_set():
                    try:
                        change = await self.poll_once(client)
                    except Exception as exc:  # the next poll tries again; the dispatcher goes on
                        self._failed(f"{type(exc).__name__}: {str(exc)[:300]}")
                    else:
                        if change is not None:
                            self._answered()
                    if await wait_for(stop, self.interval_s):
                        return
            finally:
                _latest.clear()

    def _failed(self, error: str) -> None:
        self.failed_polls += 1
        now = time.monotonic()
        again = error == self.failing and now - self.warned_at < REPEAT_WARNING_S
        if not again:
            self.warned_at = now
        self.failing = error
        (log.info if again else log.warning)(
            "vulnerability DB version not read, will poll again",
            server=self.server,
            error=error,
            failed_polls=self.failed_polls,
            retry_in_s=self.interval_s,
        )

    def _answered(self) -> None:
        if self.failing is not None:
            log.info("vulnerability DB version read again", server=self.server, failed_polls=self.failed_polls)
        self.failing, self.failed_polls = None, 0

    async def poll_once(self, client: httpx.AsyncClient) -> vulndb.Change | None:
        """One poll: None when the answer could not be used (logged), else what the DB did."""
        body = await fetch_version(client, self.server)
        now = utcnow()
        current = vulndb.read_version(body, now)
        if isinstance(current, vulndb.Unreadable):
            self._failed(f"unreadable answer: {current.reason}")
            return None
        try:
            last, revision = await busmod.kv_read(self.kv, VULNDB_KEY, VulnDbSeen)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("the recorded vulnerability DB is unreadable: recording the current one", key=VULNDB_KEY)
            last, revision = None, (await self.kv.get(VULNDB_KEY)).revision or 0
        change = vulndb.judge(last, current)
        if change == "newer":
            event = vulndb.updated_event(self.cluster, last, current, now)
            await self.bus.publish(subjects.DB_UPDATED, event, msg_id=vulndb.message_id(event))
            log.info(
                "vulnerability DB updated",
                server=self.server,
                updated_at=current.updated_at.isoformat(),
                previous_updated_at=last.updated_at.isoformat() if last else None,
                schema_version=current.schema_version,
            )
        elif change == "older" and last is not None:
            log.warning(
                "the Trivy server serves an older vulnerability DB than one seen before: no rescan",
                server=self.server,
                updated_at=current.updated_at.isoformat(),
                newest_seen=last.updated_at.isoformat(),
            )
        if change in ("first", "newer"):
            # After the publish: a replica killed in between publishes again (the stream drops the duplicate).
            await busmod.kv_put_if(self.kv, VULNDB_KEY, vulndb.seen(current, now), revision)
            if change == "first":
                log.info("vulnerability DB recorded", server=self.server, updated_at=current.updated_at.isoformat())
        recorded = current if change != "older" or last is None else last
        _latest["updated_at"] = recorded.updated_at.timestamp()
        return change
