"""Which dispatcher replica consumes events: one leads, the others stand by until its lease lapses or is released.

Leading saves work, it does not make podsweep correct: every state and limiter change stays compare-and-set, so two
replicas that both believe they lead (a paused process waking up) cost lost writes, never a second Job or a broken
limit. What one leader saves: a digest's sightings all reach one replica and are written together, no replica loses
compare-and-sets to another, and each write reaches one mirror instead of two (docs/dispatcher.md, "One leader").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec
from nats.js.kv import KeyValue

from podsweep import aio, logs
from podsweep import bus as busmod
from schemas.state import LEADER_KEY, DispatcherLease

log = logs.get("podsweep.dispatcher")


class Observed(NamedTuple):
    """A lease revision, and when (this replica's monotonic clock) it was first seen."""

    revision: int
    since: float


def identity() -> str:
    """This process's holder name: the pod (POD_NAME from the downward API) or host, and the pid. A restarted
    container keeps both (pid 1), so it takes its own lease back at once; two processes on one host differ by pid."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}:{os.getpid()}"[:256]


def observe(previous: Observed | None, revision: int, now: float) -> Observed:
    """The observation after reading `revision` at `now`: unchanged revisions keep their first sighting's time."""
    return previous if previous is not None and previous.revision == revision else Observed(revision, now)


def may_take(lease: DispatcherLease | None, observed: Observed, now: float, me: str) -> bool:
    """Whether this replica may take the lease: nobody holds it, it is this process's own (a restart), or it has not
    been renewed for the holder's own `ttl_s`, measured on this replica's clock from when it first saw the revision."""
    if lease is None or not lease.holder or lease.holder == me:
        return True
    return now - observed.since >= lease.ttl_s


def renewal_due(last_renewed: float, ttl_s: float, now: float) -> float:
    """Seconds until the holder renews (every third of the lease)."""
    return max(last_renewed + ttl_s / 3 - now, 0.0)


def must_step_down(last_renewed: float, ttl_s: float, now: float) -> bool:
    """A holder that could not renew for two thirds of its lease stops leading: a standby may take the lease once a
    full `ttl_s` has passed on its clock, so the holder has stopped by then."""
    return now - last_renewed >= ttl_s * 2 / 3


class Leadership:
    """The lease's shell: acquire (standing by meanwhile), keep renewing, release on a clean stop."""

    def __init__(self, kv: KeyValue, me: str, ttl_s: float, key: str = LEADER_KEY) -> None:
        self.kv = kv
        self.key = key  # this cluster's lease (schemas.state.leader_key)
        self.me = me
        self.ttl_s = ttl_s
        self.revision = 0  # the revision this replica last wrote (0: not leading)
        self.acquired_at = datetime.now(UTC)

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the lease (True), or `stop` (False). Reads the key every `ttl_s / 5`."""
        observed: Observed | None = None
        told: str | None = None
        while not stop.is_set():
            try:
                lease, revision = await self._read()
                observed = observe(observed, revision, time.monotonic())
                if may_take(lease, observed, time.monotonic(), self.me):
                    now = datetime.now(UTC)
                    taken = DispatcherLease(holder=self.me, acquired_at=now, renewed_at=now, ttl_s=self.ttl_s)
                    written = await busmod.kv_put_if(self.kv, self.key, taken, revision)
                    if written is not None:
                        self.revision, self.acquired_at = written, now
                        previous = lease.holder if lease is not None and lease.holder != self.me else ""
                        log.info("dispatcher leading", holder=self.me, previous=previous or "none")
                        return True
                    continue  # another standby came first: read again
            except Exception as exc:  # NATS unreachable: a standby keeps trying
                log.warning("dispatcher lease not read; trying again", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                lease = None
            if lease is not None and lease.holder != told:
                told = lease.holder
                log.info("dispatcher standing by", holder=self.me, leader=lease.holder, lease_s=lease.ttl_s)
            await aio.sleep_unless(stop, self.ttl_s / 5)
        return False

    async def keep(self, lost: asyncio.Event) -> None:
        """Renew every third of the lease until cancelled (once leading has ended, drain included); set `lost` when
        another replica took it, or when no renewal got through for two thirds of it (NATS unreachable: a standby may
        take over soon)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(renewal_due(last, self.ttl_s, time.monotonic()))
            now = datetime.now(UTC)
            renewed = DispatcherLease(holder=self.me, acquired_at=self.acquired_at, renewed_at=now, ttl_s=self.ttl_s)
            try:
                # A renewal that hangs must not outlast the deadline for standing down.
                async with asyncio.timeout(max(last + self.ttl_s * 2 / 3 - time.monotonic(), 0.1)):
                    written = await busmod.kv_put_if(self.kv, self.key, renewed, self.revision)
            except Exception as exc:  # retried until the deadline
                if must_step_down(last, self.ttl_s, time.monotonic()):
                    log.warning("dispatcher lease not renewed; standing down", error=f"{type(exc).__name__}: {exc}")
                    self.revision = 0
                    lost.set()
                    return
                await asyncio.sleep(min(1.0, self.ttl_s / 10))
                continue
            if written is None:
                log.warning("dispatcher lease taken by another replica; standing down", holder=self.me)
                self.revision = 0
                lost.set()
                return
            self.revision, last = written, time.monotonic()

    async def release(self) -> None:
        """Hand the lease over at once on a clean stop (a standby takes it at its next read), if still held."""
        if not self.revision:
            return
        now = datetime.now(UTC)
        released = DispatcherLease(holder="", acquired_at=self.acquired_at, renewed_at=now, ttl_s=self.ttl_s)
        with contextlib.suppress(Exception):  # not released: the standby waits for it to lapse instead
            await busmod.kv_put_if(self.kv, self.key, released, self.revision)
        self.revision = 0

    async def _read(self) -> tuple[DispatcherLease | None, int]:
        try:
            return await busmod.kv_read(self.kv, self.key, DispatcherLease)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # taken over once it lapses, like any other
            log.warning("dispatcher lease unreadable; taking it over if it is not renewed", error=str(exc)[:300])
            entry = await self.kv.get(self.key)
            epoch = datetime.fromtimestamp(0, UTC)
            return DispatcherLease(
                holder="?", acquired_at=epoch, renewed_at=epoch, ttl_s=self.ttl_s
            ), entry.revision or 0


async def while_leading(
    lease: Leadership, stop: asyncio.Event, lead: Callable[[asyncio.Event], Awaitable[None]]
) -> None:
    """Take the lease and run `lead(ending)` while holding it, `ending` set on a shutdown or the lease lost; a lost
    lease is waited for again (standing by), a shutdown releases it for the next replica at once."""
    while await lease.acquire(stop):
        lost, ending = asyncio.Event(), asyncio.Event()
        helpers = [
            asyncio.create_task(lease.keep(lost), name="dispatcher-lease"),
            asyncio.create_task(_set_on_first(ending, stop, lost), name="dispatcher-lease-end"),
        ]
        try:
            await lead(ending)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        if not lost.is_set():
            await lease.release()
            return


async def _set_on_first(target: asyncio.Event, *events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        target.set()
    finally:
        for waiting in waits:
            waiting.cancel()
