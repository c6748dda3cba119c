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
    assert held.keys() == ["b"]
    taken.waiters[0].set_result(None)
    await asyncio.wait_for(first, 1)
