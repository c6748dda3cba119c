"""pick_node: fewest active scans, never a node at its limit, a node that just failed only as the last resort."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.limits import Limits
from services.dispatcher.nodes import pick_node

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LIMITS = Limits(max_active_per_node=2)


@pytest.mark.parametrize(
    ("nodes", "active", "failures", "expected"),
    [
        pytest.param(["n1"], {}, {}, "n1", id="only-node"),
        pytest.param(["n1", "n2", "n3"], {"n1": 1, "n3": 1}, {}, "n2", id="fewest-active-scans"),
        pytest.param(["n1", "n2"], {"n1": 2, "n2": 1}, {}, "n2", id="node-at-its-limit-is-skipped"),
        pytest.param(["n1", "n2"], {"n1": 2, "n2": 2}, {}, None, id="every-node-full-waits"),
        pytest.param([], {}, {}, None, id="no-node-runs-the-digest"),
        pytest.param(["n1", "n2"], {"n2": 1}, {"n1": T0}, "n2", id="node-that-just-failed-is-avoided-despite-load"),
        pytest.param(
            ["n1", "n2"], {}, {"n1": T0, "n2": T0 - timedelta(minutes=5)}, "n2", id="all-failed-oldest-failure-first"
        ),
        pytest.param(["n1"], {}, {"n1": T0}, "n1", id="failed-node-is-the-last-resort"),
        pytest.param(["n1", "n2"], {"n2": 2}, {"n1": T0}, "n1", id="failed-node-rather-than-a-full-one"),
    ],
)
def test_pick_node(
    nodes: list[str], active: dict[str, int], failures: dict[str, datetime], expected: str | None
) -> None:
    assert pick_node(nodes, active, failures, LIMITS, tie_break="d") == expected


def test_equally_loaded_nodes_are_spread_across_digests_and_agreed_by_replicas() -> None:
    nodes = [f"node-{i}" for i in range(10)]
    picks = [pick_node(nodes, {}, {}, LIMITS, tie_break=f"{d:064x}") for d in range(1000)]
    again = [pick_node(list(reversed(nodes)), {}, {}, LIMITS, tie_break=f"{d:064x}") for d in range(1000)]
    assert picks == again  # input order does not matter: two replicas choose alike
    counts = Counter(picks)
    assert len(counts) == 10
    assert max(counts.values()) < 150  # about 100 each
