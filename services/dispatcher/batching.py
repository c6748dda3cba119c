"""Claimed SBOM rescans gathering into batch Jobs: up to `size` digests per Job, a short window for a burst to fill one.

Pure bookkeeping: no I/O, and the clock is the caller's (monotonic seconds). Losing it (a restart) loses nothing: the
claims are in KV, expire, and are resumed into a new batch by whichever replica sees them first.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from services.dispatcher.plan import ScanPlan


class Gathered(msgspec.Struct, frozen=True):
    """A claimed SBOM rescan and the claim expiry this replica wrote (the proof the claim is still its own)."""

    key: str
    scan: ScanPlan
    claimed_until: datetime | None


class Gathering:
    """SBOM rescans this replica claimed, oldest first, until they leave in a batch."""

    def __init__(self, size: int, window_s: float, refused_wait_s: float = 5.0) -> None:
        if size < 1:
            raise ValueError(f"sbom batch size is {size} (must be at least 1)")
        self.size = size
        self.window_s = window_s
        self._items: dict[str, Gathered] = {}
        self._since: float | None = None  # when the oldest waiting item arrived
        self.refused_wait_s = refused_wait_s
        self.blocked = False  # the limiter refused the last batch: wait until a slot is released (or refused_wait_s)
        self._blocked_at = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add(self, item: Gathered, now: float) -> None:
        """Add or refresh a claim (a resumed claim replaces the entry under the same key and keeps its place)."""
        if not self._items:
            self._since = now
        self._items[item.key] = item

    def discard(self, key: str) -> None:
        self._items.pop(key, None)
        if not self._items:
            self._since = None

    def ready(self, now: float) -> bool:
        """A batch may leave: a full one at once, a partial one once the oldest item waited the window; after a
        refusal, once a slot was released (`blocked` cleared) or `refused_wait_s` passed (expiries free slots too)."""
        if self.blocked and now - self._blocked_at >= self.refused_wait_s:
            self.blocked = False
        if not self._items or self.blocked:
            return False
        return len(self._items) >= self.size or (self._since is not None and now - self._since >= self.window_s)

    def take(self) -> list[Gathered]:
        """The oldest `size` items, removed (put them back with `restore` when the limiter refuses)."""
        chosen = list(self._items.values())[: self.size]
        for item in chosen:
            del self._items[item.key]
        if not self._items:
            self._since = None
        return chosen

    def refused(self, items: list[Gathered], now: float) -> None:
        """The limiter refused a batch: its items go back in front, and no batch leaves until `ready` says so."""
        self.restore(items, now)
        self.blocked, self._blocked_at = True, now

    def restore(self, items: list[Gathered], now: float) -> None:
        """Put refused items back in front, unless a fresher claim for the same key arrived meanwhile."""
        rest = self._items
        self._items = {i.key: i for i in items if i.key not in rest}
        self._items.update(rest)
        if self._items and self._since is None:
            self._since = now
