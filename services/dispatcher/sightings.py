"""Sightings of known digests on more nodes, held briefly so that one write records several.

A digest that runs on many nodes is seen once per node: a DaemonSet's image hundreds of times in one watcher sync.
Each sighting that only adds a node to a digest already claimed, scanned or waiting changes no decision, so the
dispatcher holds it here and writes a digest's held sightings together once the oldest has waited `window_s`. The
events are acked only after that write (bus.Settled): a replica that dies holding sightings loses none, they are
delivered again. No I/O and no clock of its own.
"""

from __future__ import annotations

import asyncio

from schemas.events import ImageSeen


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
