"""Held sightings: written in age order once the oldest has waited the window; every event is settled by its future."""

from __future__ import annotations

import asyncio

from schemas.events import ImageSeen
from services.dispatcher.sightings import Sightings
from tests.harness.events import digest_ref, image_seen

REF = digest_ref("sightings", 1)


def seen(node: str) -> ImageSeen:
    return image_seen(REF, node, 1)


async def test_held_sightings_come_due_oldest_first_after_the_window() -> None:
    held = Sightings(window_s=10.0)
    assert held.next_due() is None and held.due(1e9) == []
    first = held.hold("a", seen("n1"), now=100.0)
    held.hold("b", seen("n1"), now=104.0)
    held.hold("a", seen("n2"), now=108.0)  # joins a's batch: a is still due at 110
    assert held.next_due() == 110.0
    assert held.due(109.9) == []
    assert held.due(110.0) == ["a"]
    assert held.due(114.0) == ["a", "b"]
    taken = held.take("a")
    assert taken is not None and [s.node for s in taken.seen] == ["n1", "n2"] and len(taken.waiters) == 2
    assert taken.waiters[0] is first and not first.done()
    assert "a" not in held and len(held) == 1 and held.take("a") is None
    assert held.keys() == ["b"] and "b" in held  # a digest with held sightings is known to be held
    taken.waiters[0].set_result(None)
    await asyncio.wait_for(first, 1)


async def test_a_written_digest_acks_every_held_event_in_one_record_call() -> None:
    held = Sightings(window_s=10.0)
    waiters = [held.hold("a", seen(n), now=1.0) for n in ("n1", "n2", "n3")]
    other = held.hold("b", seen("n1"), now=1.0)
    calls: list[tuple[str, list[str]]] = []

    async def record(key: str, sightings: object) -> None:
        calls.append((key, [s.node for s in sightings]))  # type: ignore[attr-defined]

    await held.write("a", record)
    assert calls == [("a", ["n1", "n2", "n3"])]
    assert all(w.done() and w.result() is None for w in waiters)
    assert not other.done() and "a" not in held
    await held.write("a", record)
    assert len(calls) == 1, "nothing held: nothing written"
    await held.write_all(record)
    assert calls[-1] == ("b", ["n1"]) and other.done() and len(held) == 0


async def test_a_failed_write_sends_every_held_event_back_for_redelivery() -> None:
    held = Sightings(window_s=10.0)
    waiters = [held.hold("a", seen(n), now=1.0) for n in ("n1", "n2")]
    waiters[1].cancel()  # its consumer stopped waiting: redelivered all the same

    async def record(key: str, sightings: object) -> None:
        raise RuntimeError("nats: timeout")

    await held.write("a", record)
    assert isinstance(waiters[0].exception(), RuntimeError)
    assert "a" not in held
