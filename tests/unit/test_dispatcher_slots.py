"""slots.py driven without NATS: an in-memory limiter key with compare-and-set, a write that can be held open."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from schemas.state import LimiterState, Slot
from services.dispatcher.limits import Limits
from services.dispatcher.slots import Decide, Slots

D = TypeVar("D")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEADLINE = T0 + timedelta(minutes=30)


class MemoryKey:
    """The limiter key: compare-and-set on a revision, the writes counted, a gate that holds writes open, a failure
    for the next write."""

    def __init__(self, state: LimiterState | None = None) -> None:
        self.state, self.revision = state, 1 if state is not None else 0
        self.seen: tuple[LimiterState | None, int] = (self.state, self.revision)
        self.writes = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail: Exception | None = None

    def last(self) -> tuple[LimiterState | None, int]:
        return self.seen

    def saw(self, state: LimiterState | None, revision: int) -> None:
        if revision > self.seen[1]:
            self.seen = (state, revision)

    async def read(self) -> None:
        pass  # the view is this key itself

    def other_writer(self, state: LimiterState) -> None:
        """Another replica writes; this one has not seen it."""
        self.state, self.revision = state, self.revision + 1

    async def write(
        self, decide: Decide[D], known: tuple[LimiterState | None, int]
    ) -> tuple[LimiterState | None, int, bool, D]:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            failure, self.fail = self.fail, None  # one write fails
            raise failure
        current, revision = known
        while True:
            new, decided = decide(current)
            if new is None:
                if revision == self.revision:
                    return current, revision, False, decided
            elif revision == self.revision:
                self.writes += 1
                self.state, self.revision = new, self.revision + 1
                return new, self.revision, True, decided
            current, revision = self.state, self.revision  # lost the race: decide again on a fresh read


def slots(key: MemoryKey, **limits: int) -> Slots:
    return Slots(key, Limits(**limits), clock=lambda: T0)


def held(*ids: str, node: str | None = "n1") -> LimiterState:
    return LimiterState(slots=[Slot(scan_id=i, node=node, deadline=DEADLINE) for i in ids])


async def test_changes_asked_for_during_a_write_go_together_in_the_next_one() -> None:
    key = MemoryKey()
    client = slots(key, max_active=10, max_active_per_node=10, max_created_per_minute=10)
    key.gate = asyncio.Event()
    first = asyncio.create_task(client.acquire("psw-a", "n1", T0, DEADLINE))
    await key.entered.wait()
    rest = [asyncio.create_task(client.acquire(f"psw-{n}", "n1", T0, DEADLINE)) for n in "bcd"]
    await asyncio.sleep(0)
    key.gate.set()
    outcomes = await asyncio.gather(first, *rest)
    assert [o.reason for o in outcomes] == ["acquired"] * 4
    assert key.writes == 2, "one write for the first acquire, one for the three queued behind it"
    assert key.state is not None and [s.scan_id for s in key.state.slots] == ["psw-a", "psw-b", "psw-c", "psw-d"]


async def test_each_queued_change_gets_its_own_decision_in_order() -> None:
    key = MemoryKey()
    client = slots(key, max_active=1, max_active_per_node=1, max_created_per_minute=10)
    key.gate = asyncio.Event()
    first = asyncio.create_task(client.acquire("psw-a", "n1", T0, DEADLINE))
    await key.entered.wait()
    second = asyncio.create_task(client.acquire("psw-b", "n2", T0, DEADLINE))
    await asyncio.sleep(0)
    key.gate.set()
    assert (await first).reason == "acquired"
    assert (await second).reason == "global_full", "decided on the state the first acquire left"


async def test_an_acquire_releases_the_finished_slots_in_the_same_write() -> None:
    key = MemoryKey(held("psw-done"))
    client = slots(key, max_active=1, max_active_per_node=1, max_created_per_minute=10)
    client.releasing.add("psw-done")
    outcome = await client.acquire("psw-next", "n1", T0, DEADLINE)
    assert outcome.reason == "acquired"
    assert key.writes == 1 and client.releasing == set()
    assert key.state is not None and [s.scan_id for s in key.state.slots] == ["psw-next"]


async def test_a_refused_acquire_still_writes_the_releases_it_carries() -> None:
    key = MemoryKey(held("psw-done", "psw-busy"))
    key.state = LimiterState(slots=held("psw-done", "psw-busy").slots, created=[T0])  # no creation left
    key.seen = (key.state, key.revision)
    client = slots(key, max_active=5, max_active_per_node=2, max_created_per_minute=1)
    client.releasing.add("psw-done")
    outcome = await client.acquire("psw-next", "n1", T0, DEADLINE)
    assert outcome.reason == "rate_limited"
    assert key.state is not None and [s.scan_id for s in key.state.slots] == ["psw-busy"]
    assert client.releasing == set()


async def test_a_release_of_a_slot_not_held_writes_nothing() -> None:
    key = MemoryKey(held("psw-a"))
    client = slots(key)
    client.releasing.add("psw-gone")
    assert await client.release("psw-gone") is False
    assert key.writes == 0 and client.releasing == set()
    assert await client.release("psw-a") is True
    assert key.state is not None and key.state.slots == []


async def test_a_lost_race_decides_again_on_what_the_other_replica_wrote() -> None:
    key = MemoryKey(LimiterState())
    client = slots(key, max_active=1, max_active_per_node=1, max_created_per_minute=10)
    key.other_writer(held("psw-theirs", node="n9"))
    outcome = await client.acquire("psw-mine", "n1", T0, DEADLINE)
    assert outcome.reason == "global_full"
    assert client.view.slots[0].scan_id == "psw-theirs", "what the lost race read is now this replica's view"


async def test_a_failed_write_fails_every_change_in_it_and_the_next_write_goes_ahead() -> None:
    key = MemoryKey()
    client = slots(key)
    key.gate, key.fail = asyncio.Event(), RuntimeError("nats: timeout")
    first = asyncio.create_task(client.acquire("psw-a", "n1", T0, DEADLINE))
    await key.entered.wait()
    second = asyncio.create_task(client.release("psw-a"))
    await asyncio.sleep(0)
    key.gate.set()
    with pytest.raises(RuntimeError, match="timeout"):
        await first
    assert await second is False, "its own write came after the failed one, and found nothing to release"
    assert (await client.acquire("psw-a", "n1", T0, DEADLINE)).reason == "acquired"


def test_room_counts_the_slots_being_released_as_free() -> None:
    key = MemoryKey(held("psw-a", "psw-b"))
    client = slots(key, max_active=2, max_active_per_node=2, max_created_per_minute=10)
    assert client.room(T0).free == 0
    client.releasing.add("psw-a")
    room = client.room(T0)
    assert (room.free, room.per_node) == (1, {"n1": 1})
