"""Digests waiting for a limiter slot in one replica, indexed by node so freed slots find their waiters quickly.

Pure bookkeeping: no I/O and no clock. Losing it (a restart) loses nothing: the claims are in KV and the sweep finds them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import msgspec

from services.dispatcher.plan import ScanPlan

ANY_NODE = ""  # the index entry of a wait that needs no particular node (an SBOM rescan)
QUICK_LOOK = 32  # waits looked at in age order before the per-node index


class Parked(msgspec.Struct, frozen=True):
    """What waits: its claimed scan (None: not claimed yet, every node it runs on was full) and its nodes."""

    scan: ScanPlan | None
    nodes: tuple[str, ...]
    order: int = 0


class ParkingLot:
    def __init__(self) -> None:
        self._parked: dict[str, Parked] = {}
        self._by_node: dict[str, dict[str, None]] = {}  # node -> keys waiting for it, oldest first
        self._order = itertools.count()
        self.generation = 0  # grows with every park(): something new may be able to start

    def __contains__(self, key: object) -> bool:
        return key in self._parked

    def __len__(self) -> int:
        return len(self._parked)

    def __iter__(self) -> Iterator[str]:
        return iter(self._parked)

    def get(self, key: str) -> Parked | None:
        return self._parked.get(key)

    def park(self, key: str, scan: ScanPlan | None, nodes: tuple[str, ...]) -> None:
        """Wait for a slot. A claimed scan replaces an unclaimed wait; otherwise the first wait keeps its place."""
        old = self._parked.get(key)
        if old is not None and (scan is None or old.scan == scan):
            return
        if old is not None:
            self.unpark(key)
        self._parked[key] = Parked(scan, nodes, next(self._order))
        self.generation += 1
        for node in nodes or (ANY_NODE,):
            self._by_node.setdefault(node, {})[key] = None

    def unpark(self, key: str) -> None:
        parked = self._parked.pop(key, None)
        if parked is None:
            return
        for node in parked.nodes or (ANY_NODE,):
            waiting = self._by_node.get(node)
            if waiting is not None:
                waiting.pop(key, None)
                if not waiting:
                    del self._by_node[node]

    def candidates(self, active_per_node: Mapping[str, int], per_node_limit: int, free: int) -> list[str]:
        """The oldest waits that could start now: at most `free`, and per node at most its free slots.

        Looks at nodes, not at every wait, so thousands of digests parked on full nodes cost nothing per pass.
        """
        if free <= 0:
            return []
        # Most passes free a slot or two while the oldest waits have room (they wait for a global slot): the first
        # waits in age order settle it. Only when those are on full nodes does the per-node index take over.
        quick: list[str] = []
        taken: dict[str, int] = {}
        for key, parked in itertools.islice(self._parked.items(), QUICK_LOOK):
            for node in parked.nodes or (ANY_NODE,):
                if node == ANY_NODE or active_per_node.get(node, 0) + taken.get(node, 0) < per_node_limit:
                    taken[node] = taken.get(node, 0) + 1
                    quick.append(key)
                    break
            if len(quick) == free:
                return quick
        chosen: dict[str, int] = {}
        for node, waiting in self._by_node.items():
            room = free if node == ANY_NODE else per_node_limit - active_per_node.get(node, 0)
            for key in itertools.islice(waiting, max(min(room, free), 0)):
                chosen[key] = self._parked[key].order
        return sorted(chosen, key=chosen.__getitem__)[:free]
