"""Compare-and-set from a revision the dispatcher already holds (bus.kv_change), against a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import NatsSettings
from schemas.state import LimiterState, Slot


@pytest.fixture
async def bus(nats_settings: NatsSettings) -> AsyncIterator[busmod.Bus]:
    b = await busmod.connect(nats_settings, "test-dispatcher-kv")
    yield b
    await b.close()


DEADLINE = datetime(2030, 1, 1, tzinfo=UTC)


def _add(scan_id: str) -> Callable[[LimiterState | None], LimiterState | None]:
    def change(old: LimiterState | None) -> LimiterState | None:
        current = old or LimiterState()
        if any(s.scan_id == scan_id for s in current.slots):
            return None
        slot = Slot(scan_id=scan_id, node=None, deadline=DEADLINE)
        return msgspec.structs.replace(current, slots=[*current.slots, slot])

    return change


@pytest.mark.parametrize("stale", [False, True], ids=["known_is_current", "known_is_stale"])
async def test_a_write_from_a_known_revision_never_loses_another_writers_update(bus: busmod.Bus, stale: bool) -> None:
    kv = await bus.kv(f"kvchange-{int(stale)}")
    mine, revision, wrote = await busmod.kv_change(kv, "active", LimiterState, _add("psw-mine-1"))
    assert wrote and mine is not None
    if stale:  # another replica writes after this one's last write
        await busmod.kv_change(kv, "active", LimiterState, _add("psw-other-1"))
    stored, new_revision, wrote = await busmod.kv_change(
        kv, "active", LimiterState, _add("psw-mine-2"), known=(mine, revision)
    )
    assert wrote and stored is not None and new_revision > revision
    expected = ["psw-mine-1", "psw-other-1", "psw-mine-2"] if stale else ["psw-mine-1", "psw-mine-2"]
    assert [s.scan_id for s in stored.slots] == expected
    read, read_revision = await busmod.kv_read(kv, "active", LimiterState)
    assert read == stored and read_revision == new_revision


async def test_no_change_is_only_concluded_from_a_fresh_read(bus: busmod.Bus) -> None:
    """A stale copy that already holds the slot must not hide that the stored document lost it."""
    kv = await bus.kv("kvchange-nochange")
    held, revision, _ = await busmod.kv_change(kv, "active", LimiterState, _add("psw-x"))
    await kv.put("active", msgspec.json.encode(LimiterState()))  # the slot was released meanwhile
    stored, _, wrote = await busmod.kv_change(kv, "active", LimiterState, _add("psw-x"), known=(held, revision))
    assert wrote and stored is not None and [s.scan_id for s in stored.slots] == ["psw-x"]
