"""Chooses the node a scan Job is pinned to. Pure: never asks the API server which nodes exist."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from datetime import datetime

from services.dispatcher.limits import Limits


def _spread(tie_break: str, node: str) -> bytes:
    # Among equally loaded nodes, each digest prefers a different one, the same on every replica.
    return hashlib.sha256(f"{tie_break}\n{node}".encode()).digest()


def pick_node(
    nodes_running_digest: Collection[str],
    active_per_node: Mapping[str, int],
    recent_failures: Mapping[str, datetime],
    limits: Limits,
    *,
    tie_break: str = "",
) -> str | None:
    """The node to scan on, or None when every node running the digest is at its per-node limit.

    Prefers a node that has not just failed this digest, then the fewest active scans. A node that failed is
    used only when no other node runs the digest, the one that failed longest ago first: the backoff and the
    attempt limit bound what that costs.
    """
    free = [n for n in nodes_running_digest if active_per_node.get(n, 0) < limits.max_active_per_node]
    if not free:
        return None
    fresh = [n for n in free if n not in recent_failures]
    if fresh:
        return min(fresh, key=lambda n: (active_per_node.get(n, 0), _spread(tie_break, n)))
    return min(free, key=lambda n: (recent_failures[n], active_per_node.get(n, 0), _spread(tie_break, n)))
