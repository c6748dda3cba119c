"""Sightings of known digests on more nodes, held briefly so that one write records several.

A digest that runs on many nodes is seen once per node: a DaemonSet's image hundreds of times in one watcher sync.
Each sighting that only adds a node to a digest already claimed, scanned or waiting changes no decision, so the
dispatcher holds it here and writes a digest's held sightings together once the oldest has waited `window_s`. The
events are acked only after that write (bus.Settled): a replica that dies holding sightings loses none, they are
delivered again. No I/O and no clock of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from podsweep import logs
from schemas.events import ImageSeen

log = logs.get("podsweep.dispatcher")


class Held:
    """One digest's held sightings, and the futures that settle their events."""

    __slots__ = ("seen", "since", "waiters")

    def __init__(self, since: float) -> None:
        self.since = since
        self.seen: list[ImageSeen] = []
        self.waiters: list[asyncio.Future[None]] = []


class Sightings:
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._held: dict[str, Held] = {}  # digest hex -> held sightings, oldest first (insertion order)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def hold(self, key: str, seen: ImageSeen, now: float) -> asyncio.Future[None]:
        """Hold a sighting; the future resolves once it is written (its event is acked then)."""
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = Held(now)
        held.seen.append(seen)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        held.waiters.append(waiter)
        return waiter

    def next_due(self) -> float | None:
        """When the oldest held sightings are due to be written (None: nothing held)."""
        for held in self._held.values():
            return held.since + self.window_s
        return None

    def due(self, now: float) -> list[str]:
        """The digests whose oldest held sighting has waited the window."""
        keys: list[str] = []
        for key, held in self._held.items():
            if now - held.since < self.window_s:
                break  # insertion order is age order
            keys.append(key)
        return keys

    def take(self, key: str) -> Held | None:
        return self._held.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._held)

    async def write_all(self, record: Callable[[str, Sequence[ImageSeen]], Awaitable[None]]) -> None:
        for key in list(self._held):
            await self.write(key, record)

    async def write(self, key: str, record: Callable[[str, Sequence[ImageSeen]], Awaitable[None]]) -> None:
        """Write a digest's held sightings together with `record`, then settle their events (acked, or retried)."""
        held = self.take(key)
        if held is None:
            return
        try:
            await record(key, held.seen)
        except Exception as exc:  # every held event is delivered again
            for waiter in held.waiters:
                if not waiter.done():  # its consumer stopped waiting (cancelled): redelivered all the same
                    waiter.set_exception(exc)
            log.warning(
                "sightings not written", key=key, events=len(held.seen), error=f"{type(exc).__name__}: {str(exc)[:300]}"
            )
        else:
            for waiter in held.waiters:
                if not waiter.done():
                    waiter.set_result(None)
