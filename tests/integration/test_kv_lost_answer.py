"""A compare-and-set write whose answer is lost (a bucket's leader dying after it stored the write): `kv_put_if` asks
again, and tells its own landed write from another writer's. Against the session's real nats-server; only the
answer is taken away, the write itself happens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import nats.errors
import pytest
from nats.js.kv import KeyValue

from podsweep import bus as busmod
from podsweep.config import NatsSettings
from schemas.state import DispatcherLease


class AnswerLost(KeyValue):
    """The bucket, except that the first update's answer never arrives: it is stored, then the caller times out.
    `meanwhile` runs between the stored write and the lost answer (another writer getting in)."""

    def __init__(self, kv: KeyValue, meanwhile: Callable[[], Awaitable[None]] | None = None) -> None:
        self.__dict__.update(kv.__dict__)
        self.lost = 0
        self.meanwhile = meanwhile

    async def update(self, key: str, value: bytes, last: int | None = None, validate_keys: bool = True) -> int:
        revision = await super().update(key, value, last=last, validate_keys=validate_keys)
        if self.lost == 0:
            self.lost += 1
            if self.meanwhile is not None:
                await self.meanwhile()
            raise nats.errors.TimeoutError
        return revision


def lease(holder: str) -> DispatcherLease:
    now = datetime(2026, 12, 5, tzinfo=UTC)
    return DispatcherLease(holder=holder, acquired_at=now, renewed_at=now, ttl_s=3)


@pytest.fixture
async def bus(nats_settings: NatsSettings) -> AsyncIterator[busmod.Bus]:
    b = await busmod.connect(nats_settings, "test")
    try:
        yield b
    finally:
        await b.close()


async def test_a_write_that_landed_before_its_answer_was_lost_is_this_writers(bus: busmod.Bus) -> None:
    kv = await bus.kv("limits")
    first = await busmod.kv_put_if(kv, "leader", lease("a"), 0)
    assert first is not None
    lossy = AnswerLost(kv)
    renewed = await busmod.kv_put_if(lossy, "leader", lease("a-renewed"), first)
    assert lossy.lost == 1
    assert renewed is not None and renewed > first  # not "another writer came first"
    assert await busmod.kv_read(kv, "leader", DispatcherLease) == (lease("a-renewed"), renewed)


async def test_a_lost_answer_then_another_writer_is_a_lost_race(bus: busmod.Bus) -> None:
    kv = await bus.kv("limits")
    first = await busmod.kv_put_if(kv, "leader", lease("a"), 0)
    assert first is not None

    async def another_writer() -> None:
        landed, _ = await busmod.kv_read(kv, "leader", DispatcherLease)
        revision = (await kv.get("leader")).revision
        assert landed == lease("a-renewed") and revision is not None
        assert await busmod.kv_put_if(kv, "leader", lease("b"), revision) is not None

    lossy = AnswerLost(kv, another_writer)
    assert await busmod.kv_put_if(lossy, "leader", lease("a-renewed"), first) is None
    assert (await busmod.kv_read(kv, "leader", DispatcherLease))[0] == lease("b")
