"""Small asyncio machinery the services share: sleeps that wake on stop, and waiting for the first of several things.

Never cancels what it was given: only the helper tasks it made itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

Waitable = asyncio.Event | asyncio.Future[Any]


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stop` is set meanwhile; True when `stop` is set."""
    await wait_first((stop,), at_most_s=seconds)
    return stop.is_set()


async def wait_first(waits: Iterable[Waitable], *, at_most_s: float | None = None) -> None:
    """Until one event is set or one future (or task) is done, or `at_most_s` seconds pass."""
    waits = list(waits)
    if any(w.is_set() if isinstance(w, asyncio.Event) else w.done() for w in waits):
        return
    made = [asyncio.ensure_future(w.wait()) for w in waits if isinstance(w, asyncio.Event)]
    futures = [w for w in waits if not isinstance(w, asyncio.Event)]
    try:
        await asyncio.wait([*made, *futures], timeout=at_most_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in made:
            task.cancel()
