"""When the dispatcher looks again: timers (backoffs, rescans coming due), digests parked for a slot, the sweep.

Holds no I/O of its own: what to do for a digest, and the clocks, are given to it, so tests drive it by hand. What it
holds is lost with the replica and costs nothing: the claims are in KV and the sweep finds them.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from typing import Literal

from podsweep import logs
from services.dispatcher.parking import Parked, ParkingLot

# How often parked claims (refused by a limit) and timers are looked at while something waits.
TICK_S = 0.5
# Parked digests are looked at when the limiter changed or something new was parked, and at least this often (slots
# past their deadline and creations leaving the one-minute window free room without a write).
PARKED_IDLE_PASS_S = 5.0
# With nothing parked, gathering or due, the tend loop sleeps this long (or until the next timer); anything new wakes it.
IDLE_TEND_S = 30.0

Launch = Literal["created", "exists", "refused", "stale", "failed", "gathered"]
STARTED: frozenset[Launch | None] = frozenset(("created", "exists", "stale", "gathered"))  # a parked wait that ended

log = logs.get("podsweep.dispatcher")


class Schedule:
    """One replica's timers and parked digests, and the instant its tend loop looks next."""

    def __init__(self, clock: Callable[[], datetime], monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.timers: dict[str, datetime] = {}  # digest hex -> when to decide again (the latest setting wins)
        self._heap: list[tuple[datetime, str]] = []
        self.parked = ParkingLot()
        self.parked_lock = asyncio.Lock()  # one pass over parked digests at a time (tend loop, finished scans)
        self.wake = asyncio.Event()
        self.looks_at = 0.0  # monotonic instant the tend loop looks next, unless woken
        self._parked_seen = (-1, -1)  # (limiter revision, parking generation) at the last pass over parked digests
        self._parked_pass_at = 0.0

    def set_timer(self, key: str, at: datetime) -> None:
        self.timers[key] = at
        heapq.heappush(self._heap, (at, key))
        self.look_within((at - self.clock()).total_seconds())

    def due(self, now: datetime) -> Iterator[str]:
        """The digests whose timer came due, each removed as it is yielded (a timer replaced by a later setting,
        even while earlier ones are acted on, is not due)."""
        while self._heap and self._heap[0][0] <= now:
            at, key = heapq.heappop(self._heap)
            if self.timers.get(key) == at:
                del self.timers[key]
                yield key

    def look_within(self, seconds: float) -> None:
        """Wake the tend loop if it would not look again within `seconds` (it sleeps long while nothing waits)."""
        if self.monotonic() + seconds < self.looks_at:
            self.wake.set()

    def wait_s(self, gathering: bool, held_due: float | None) -> float:
        """A tick while digests are parked or a batch gathers (a slot the other replica frees is only seen by
        looking); otherwise until the next timer, or until held sightings come due. An idle replica wakes a few
        times a minute, not twice a second."""
        if self.parked or gathering:
            wait = TICK_S
        elif self._heap:
            wait = min(max((self._heap[0][0] - self.clock()).total_seconds(), 0.0), IDLE_TEND_S)
        else:
            wait = IDLE_TEND_S
        if held_due is not None:
            wait = min(wait, max(held_due - self.monotonic(), 0.0))
        return wait

    def idle_pass_due(self) -> bool:
        """Parked digests were not looked at for PARKED_IDLE_PASS_S (read the limiter first: the watch may lag)."""
        return self.monotonic() - self._parked_pass_at >= PARKED_IDLE_PASS_S

    def parked_pass(self, limiter_revision: int, idle: bool) -> bool:
        """Whether to look at parked digests now: the limiter changed, something new was parked, or an idle pass is
        due (expiries free room without a write). Records the pass."""
        seen = (limiter_revision, self.parked.generation)
        if seen == self._parked_seen and not idle:
            return False
        self._parked_seen, self._parked_pass_at = seen, self.monotonic()
        return True

    async def start_parked(
        self,
        room: Callable[[], tuple[Mapping[str, int], int]],
        per_node_limit: int,
        start: Callable[[str, Parked], Awaitable[Launch | None]],
    ) -> None:
        """Start parked digests, oldest first, while `room` (live slots per node, Jobs that may start) allows."""
        while True:
            per_node, free = room()
            keys = self.parked.candidates(per_node, per_node_limit, free)
            if not keys:
                return
            started = 0
            for key in keys:
                parked = self.parked.get(key)
                if parked is None:
                    continue
                result = await start(key, parked)
                if result in STARTED:
                    started += 1
                elif result == "refused" and room()[1] <= 0:
                    return
            if started == 0:
                return

    async def tend(self, stop: asyncio.Event, step: Callable[[], Awaitable[None]], wait_s: Callable[[], float]) -> None:
        """Run `step` whenever woken or `wait_s` passed, until `stop`; a failing step is logged and tried again."""
        while not stop.is_set():
            wait = wait_s()
            self.looks_at = self.monotonic() + wait
            await wait_for(stop, wait, self.wake)
            self.wake.clear()
            try:
                await step()
            except Exception as exc:  # this loop must outlive any one digest's trouble
                log.warning("parked scans will be tried again", error=f"{type(exc).__name__}: {str(exc)[:300]}")

    async def sweep(
        self,
        stop: asyncio.Event,
        interval_s: float,
        jitter_ratio: float,
        ready: Callable[[], bool],
        candidates: Callable[[], list[str]],
        reconsider: Callable[[str], Awaitable[object]],
    ) -> None:
        """Every interval (with jitter), decide again about each of `candidates()` (while `ready()`: the scan states
        are mirrored). The first pass comes as soon as they are: a replica that just took the lease over picks up
        what the last leader left waiting at once, not a sweep interval later."""
        first = True
        while not stop.is_set():
            interval = interval_s * (1 + jitter_ratio * random.random())  # noqa: S311
            if first:
                began = self.monotonic()
                while not ready() and self.monotonic() - began < interval:
                    if await wait_for(stop, TICK_S):
                        return
                first = False
            elif await wait_for(stop, interval):
                return
            if not ready():
                log.warning("sweep skipped: the scan states are not mirrored yet (its KV watch is restarting)")
                continue
            todo = candidates()
            for key in todo:
                if stop.is_set():
                    return
                try:
                    await reconsider(key)
                except Exception as exc:  # the next sweep tries this digest again
                    log.warning("sweep skipped a digest", key=key, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            log.debug("sweep done", acted_on=len(todo), parked=len(self.parked))


async def wait_for(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> bool:
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
