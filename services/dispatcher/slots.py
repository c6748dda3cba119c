"""This replica's client of the shared limiter: its view of the slots, and every change to them as compare-and-set.

Changes asked for while a write is under way go together, in order, in the next write: this replica's handlers never
race each other for the key, and a burst of acquires is one write. Decides nothing (limits.py does); its only I/O is
the write it is given, so tests drive it with an in-memory key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from podsweep import bus as busmod
from schemas.state import LimiterState, Slot
from services.dispatcher import limits as limiter
from services.dispatcher import livejobs

D = TypeVar("D")
Decide = Callable[[LimiterState | None], tuple[LimiterState | None, D]]
_NO_SLOTS = LimiterState()  # the limiter before its first write (one object: the room is cached by identity)


class LimiterKey(Protocol):
    """The limiter's KV key as this replica sees it: the last state seen, and compare-and-set from a known one."""

    def last(self) -> tuple[LimiterState | None, int]: ...

    def saw(self, state: LimiterState | None, revision: int) -> None: ...

    async def read(self) -> None:
        """Read the key afresh into the view (a watch that fell behind)."""

    async def write(
        self, decide: Decide[D], known: tuple[LimiterState | None, int]
    ) -> tuple[LimiterState | None, int, bool, D]: ...


class MirroredKey:
    """The limiter key in NATS KV (this cluster's: schemas.state.limiter_key), seen through a mirror that its watch
    (and this replica's writes) keep current."""

    def __init__(self, mirror: busmod.KvMirror[LimiterState], key: str) -> None:
        self.mirror = mirror
        self.key = key

    def last(self) -> tuple[LimiterState | None, int]:
        return self.mirror.last(self.key)

    def saw(self, state: LimiterState | None, revision: int) -> None:
        self.mirror.saw(self.key, state, revision)

    async def write(
        self, decide: Decide[D], known: tuple[LimiterState | None, int]
    ) -> tuple[LimiterState | None, int, bool, D]:
        return await busmod.kv_decide(self.mirror.kv, self.key, LimiterState, decide, known=known)

    async def read(self) -> None:
        """A read now and then covers a watch that fell behind."""
        self.saw(*await busmod.kv_read(self.mirror.kv, self.key, LimiterState))


class Slots:
    """Takes and frees limiter slots for this replica. `clock` gives the instant a release is written at."""

    def __init__(self, key: LimiterKey, limits: limiter.Limits, clock: Callable[[], datetime]) -> None:
        self.key = key
        self.limits = limits
        self.clock = clock
        # Slots of finished scans not released yet: the next acquire releases them in the same write.
        self.releasing: set[str] = set()
        self._room_of: tuple[LimiterState, frozenset[str], limiter.Room] | None = None
        self._queue: list[tuple[Decide[Any], asyncio.Future[tuple[bool, Any]]]] = []
        self._writing = False

    @property
    def view(self) -> LimiterState:
        """The limiter as this replica last saw it; the KV key is the authority (every change is compare-and-set)."""
        return self.key.last()[0] or _NO_SLOTS

    @property
    def revision(self) -> int:
        return self.key.last()[1]

    def room(self, now: datetime) -> limiter.Room:
        """Live slots per node and how many Jobs may start now, as last seen (computed once per limiter state until
        its next slot or creation expires), counting the slots waiting to be released as free."""
        cached, seen, releasing = self._room_of, self.view, frozenset(self.releasing)
        if cached is not None and cached[0] is seen and cached[1] == releasing and now < cached[2].valid_until:
            return cached[2]
        current = limiter.room(seen, now, self.limits, releasing)
        self._room_of = (seen, releasing, current)
        return current

    async def acquire(self, slot_id: str, node: str | None, now: datetime, deadline: datetime) -> limiter.Outcome:
        """Take a slot (a node's too when `node` is set), releasing in the same write the slots waiting for one."""
        limits = self.limits

        def decide(old: LimiterState | None) -> tuple[LimiterState | None, tuple[limiter.Outcome, tuple[str, ...]]]:
            start = base = old or LimiterState()
            releasing = tuple(self.releasing)
            for released in releasing:
                base = limiter.release(base, now, released) or base
            new, outcome = limiter.try_acquire(base, now, scan_id=slot_id, node=node, deadline=deadline, limits=limits)
            if new is None and base is not start:
                new = base  # refused (or held already), but the releases are written all the same
            return new, (outcome, releasing)

        wrote, (outcome, carried) = await self.change(decide)
        if wrote:
            self.releasing.difference_update(carried)
        return outcome

    async def acquire_unpinned(self, slot_id: str, now: datetime, deadline: datetime) -> limiter.Outcome:
        """One global slot and no node slot (what an SBOM rescan batch holds); carries no releases."""
        limits = self.limits

        def decide(old: LimiterState | None) -> tuple[LimiterState | None, limiter.Outcome]:
            return limiter.try_acquire(
                old or LimiterState(), now, scan_id=slot_id, node=None, deadline=deadline, limits=limits
            )

        return (await self.change(decide))[1]

    async def release(self, slot_id: str) -> bool:
        """Free a slot now; True when this call wrote (False: not held, or released meanwhile)."""

        def decide(old: LimiterState | None) -> tuple[LimiterState | None, None]:
            return (None if old is None else limiter.release(old, self.clock(), slot_id)), None

        wrote = (await self.change(decide))[0]
        self.releasing.discard(slot_id)  # released now (or by an acquire before this write, or never held)
        return wrote

    async def adopt(self, slots: Sequence[Slot], now: datetime) -> bool:
        """Count Jobs found running (livejobs.py) against the limits."""

        def decide(old: LimiterState | None) -> tuple[LimiterState | None, None]:
            return livejobs.adopt(limiter.live(old or LimiterState(), now), slots), None

        return (await self.change(decide))[0]

    async def change(self, decide: Decide[D]) -> tuple[bool, D]:
        """Compare-and-set on the limiter from the state last seen (no read while it is current: the other replica's
        writes since only cost a failed write and a read). Returns whether `decide`'s change was written, and what
        it decided on the state written (or found unchanged)."""
        done: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((decide, done))
        if not self._writing:
            self._writing = True
            batch: list[tuple[Decide[Any], asyncio.Future[tuple[bool, Any]]]] = []
            try:
                while self._queue:
                    batch, self._queue = self._queue, []
                    await self._write(batch)
            finally:
                self._writing = False
                for _, waiting in batch + self._queue:  # cancelled mid-write: nobody waits forever
                    if not waiting.done():
                        waiting.set_exception(RuntimeError("the limiter write was cancelled; try again"))
                self._queue = []
        wrote, decided = await done
        return wrote, decided

    async def _write(self, batch: list[tuple[Decide[Any], asyncio.Future[tuple[bool, Any]]]]) -> None:
        def combined(old: LimiterState | None) -> tuple[LimiterState | None, list[tuple[bool, Any]]]:
            state, each = old, []
            for decide, _ in batch:
                new, decided = decide(state)
                each.append((new is not None, decided))
                state = new if new is not None else state
            return (state if any(changed for changed, _ in each) else None), each

        try:
            stored, revision, wrote, each = await self.key.write(combined, self.key.last())
        except Exception as exc:
            for _, done in batch:
                if not done.done():  # a waiter cancelled meanwhile
                    done.set_exception(exc)
            return
        self.key.saw(stored, revision)
        for (_, done), (changed, decided) in zip(batch, each, strict=True):
            if not done.done():
                done.set_result((wrote and changed, decided))
