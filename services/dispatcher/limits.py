"""The scan-Job limiter: global active Jobs, active Jobs per node, Job creations per minute.

Pure: a function of one `LimiterState` document and the clock it is given. The shell keeps that document under a
single KV key and writes every new state with compare-and-set on the revision it read, retrying from a fresh read on
conflict; so two replicas, or a replica and its restarted self, can never both take the last slot. A slot whose
deadline passed is dropped on every update, and `release` drops a finished scan's slot: neither holds a slot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

import msgspec

from schemas.state import LimiterState, Slot

WINDOW = timedelta(minutes=1)

AcquireReason = Literal["acquired", "already_held", "global_full", "node_full", "rate_limited"]


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Configured limits; every one must be at least 1."""

    max_active: int = 20
    max_active_per_node: int = 2
    max_created_per_minute: int = 30

    def __post_init__(self) -> None:
        for name in ("max_active", "max_active_per_node", "max_created_per_minute"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits: {name} is {getattr(self, name)} (must be at least 1)")


class Outcome(msgspec.Struct, frozen=True):
    """Why try_acquire said yes or no; `retry_at` is the earliest instant a refused call can succeed, when known."""

    reason: AcquireReason
    retry_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.reason in ("acquired", "already_held")


def live(state: LimiterState, now: datetime) -> LimiterState:
    """The state without expired slots and creations outside the window (what every decision is made on)."""
    slots = [s for s in state.slots if s.deadline > now]
    created = [t for t in state.created if now - t < WINDOW]
    if len(slots) == len(state.slots) and len(created) == len(state.created):
        return state
    return msgspec.structs.replace(state, slots=slots, created=created)


class Room(NamedTuple):
    """What the limiter allows now: live slots per node, how many Jobs may start, and until when that holds."""

    per_node: dict[str, int]
    free: int
    valid_until: datetime


_NEVER = datetime.max.replace(tzinfo=UTC)


def room(state: LimiterState, now: datetime, limits: Limits, releasing: Collection[str] = ()) -> Room:
    """The room left in `state` at `now`, counting the slots in `releasing` as free (they are being released).

    One pass over the slots and the creations, building no new state: every replica works this out again after each
    limiter change, for every event. Valid until a slot's deadline passes, or a creation leaves the window while
    creations are what limits.
    """
    per_node: dict[str, int] = {}
    active = 0
    valid_until = _NEVER
    for slot in state.slots:
        if slot.deadline <= now or slot.scan_id in releasing:
            continue
        active += 1
        if slot.node is not None:
            per_node[slot.node] = per_node.get(slot.node, 0) + 1
        if slot.deadline < valid_until:
            valid_until = slot.deadline
    cutoff = now - WINDOW
    created = [t for t in state.created if t > cutoff]
    slots_left = limits.max_active - active
    creations_left = limits.max_created_per_minute - len(created)
    if creations_left <= slots_left and created:
        valid_until = min(valid_until, min(created) + WINDOW)
    return Room(per_node, min(slots_left, creations_left), valid_until)


def active_per_node(state: LimiterState, now: datetime) -> dict[str, int]:
    """Live slots per node (unpinned SBOM rescans count globally only)."""
    return dict(Counter(s.node for s in live(state, now).slots if s.node is not None))


def try_acquire(
    state: LimiterState, now: datetime, *, scan_id: str, node: str | None, deadline: datetime, limits: Limits
) -> tuple[LimiterState | None, Outcome]:
    """Take a slot for `scan_id` on `node` until `deadline`, or say why not.

    Returns the new state to write with compare-and-set, or None when nothing must be written (refused, or the
    slot is already held by this scan id: taking it twice is harmless, so a redelivered event or a resumed claim
    never counts twice).
    """
    current = live(state, now)
    if any(s.scan_id == scan_id for s in current.slots):
        return None, Outcome("already_held")
    if len(current.slots) >= limits.max_active:
        return None, Outcome("global_full", min(s.deadline for s in current.slots))
    if node is not None:
        on_node = [s.deadline for s in current.slots if s.node == node]
        if len(on_node) >= limits.max_active_per_node:
            return None, Outcome("node_full", min(on_node))
    if len(current.created) >= limits.max_created_per_minute:
        # The window is sorted by construction; the oldest creation leaves it first.
        return None, Outcome("rate_limited", min(current.created) + WINDOW)
    new = msgspec.structs.replace(
        current,
        slots=[*current.slots, Slot(scan_id=scan_id, node=node, deadline=deadline)],
        created=[*current.created, now],
    )
    return new, Outcome("acquired")


def release(state: LimiterState, now: datetime, scan_id: str) -> LimiterState | None:
    """The state without `scan_id`'s slot (its Job finished or was deleted); None when there is nothing to write."""
    if not any(s.scan_id == scan_id for s in state.slots):
        return None
    current = live(state, now)
    return msgspec.structs.replace(current, slots=[s for s in current.slots if s.scan_id != scan_id])
