"""Parked digests: the oldest waits that fit the free slots come first, and full nodes cost no look at their waits."""

from __future__ import annotations

import pytest

from services.dispatcher import parking
from services.dispatcher.parking import QUICK_LOOK, ParkingLot
from services.dispatcher.plan import ScanPlan

REF = "registry.example.com/app@sha256:" + "ab" * 32


def scan(n: int, node: str | None) -> ScanPlan:
    return ScanPlan(scan_id=f"psw-{n:024d}", digest_ref=REF, mode="node" if node else "sbom", node=node, attempt=1)


def lot(*waits: tuple[str, str | None]) -> ParkingLot:
    parked = ParkingLot()
    for n, (key, node) in enumerate(waits):
        parked.park(key, scan(n, node), (node,) if node else ())
    return parked


@pytest.mark.parametrize(
    ("waits", "active", "free", "expected"),
    [
        pytest.param([("a", "n1"), ("b", "n2")], {}, 10, ["a", "b"], id="oldest-first"),
        pytest.param([("a", "n1"), ("b", "n2")], {"n1": 2}, 10, ["b"], id="full-node-skipped"),
        pytest.param([("a", "n1"), ("b", "n1"), ("c", "n1")], {"n1": 1}, 10, ["a"], id="only-the-node-room"),
        pytest.param([("a", "n1"), ("b", "n2"), ("c", "n3")], {}, 2, ["a", "b"], id="only-the-global-room"),
        pytest.param([("a", "n1")], {}, 0, [], id="no-global-room"),
        pytest.param([("a", None), ("b", "n1")], {"n1": 2}, 1, ["a"], id="sbom-rescan-needs-no-node"),
    ],
)
def test_candidates_are_the_oldest_waits_that_fit(
    waits: list[tuple[str, str | None]], active: dict[str, int], free: int, expected: list[str]
) -> None:
    assert lot(*waits).candidates(active, 2, free) == expected


def test_a_claimed_scan_replaces_an_unclaimed_wait_and_a_repeat_keeps_its_place() -> None:
    parked = ParkingLot()
    parked.park("a", None, ("n1", "n2"))
    parked.park("b", scan(2, "n2"), ("n2",))
    parked.park("a", scan(1, "n1"), ("n1",))
    assert parked.candidates({}, 2, 10) == ["b", "a"]  # "a" was parked again with its claim: it moved back
    generation = parked.generation
    parked.park("b", None, ("n2",))
    assert parked.generation == generation and parked.get("b") is not None and parked.get("b").scan is not None  # type: ignore[union-attr]
    assert parked.candidates({"n2": 2}, 2, 10) == ["a"]


def test_unparked_digests_leave_every_node_index() -> None:
    parked = ParkingLot()
    parked.park("a", None, ("n1", "n2"))
    parked.unpark("a")
    assert len(parked) == 0 and "a" not in parked
    assert parked.candidates({}, 2, 10) == []


def test_waits_beyond_the_first_ones_on_full_nodes_are_still_found() -> None:
    """The oldest waits are on a full node (more of them than the age-order look covers): the per-node index finds
    the younger ones that fit, oldest first."""
    waits = [(f"full{i}", "busy") for i in range(QUICK_LOOK + 8)] + [("young1", "n1"), ("young2", "n2")]
    assert lot(*waits).candidates({"busy": 2}, 2, 5) == ["young1", "young2"]


def test_both_ways_of_looking_choose_the_same_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Age order, each wait taking room on its node, until the free slots are used: the same with or without the
    quick look."""
    waits = [(f"k{i}", f"n{i % 7}") for i in range(3 * QUICK_LOOK)]
    active = {f"n{i}": i % 3 for i in range(7)}
    for free in range(1, 20):
        room = {node: 2 - count for node, count in active.items()}
        expected = []
        for key, node in waits:
            if len(expected) < free and room[node] > 0:
                room[node] -= 1
                expected.append(key)
        assert lot(*waits).candidates(active, 2, free) == expected
        with monkeypatch.context() as patched:
            patched.setattr(parking, "QUICK_LOOK", 0)
            assert lot(*waits).candidates(active, 2, free) == expected


@pytest.mark.parametrize(
    ("waits", "active", "free", "expected"),
    [
        pytest.param([("a", "n1"), ("b", None)], {}, 1, ["a"], id="the-oldest-wait-has-a-node-and-room"),
        pytest.param([("a", "n1"), ("b", "n1"), ("c", "n2")], {}, 2, ["a", "b"], id="an-idle-node-takes-two"),
        pytest.param(
            [("a", "n1"), ("b", "n1"), ("c", "n1"), ("d", "n2")], {}, 3, ["a", "b", "d"], id="the-third-waits"
        ),
        pytest.param([("a", "n1"), ("b", "n1"), ("c", "n2")], {"n1": 1}, 2, ["a", "c"], id="one-slot-left-on-n1"),
        pytest.param([("a", "n1"), ("b", "n2")], {"n1": 2, "n2": 1}, 1, ["b"], id="a-full-node-is-passed-over"),
        pytest.param([("a", "n1"), ("b", "n1")], {}, -1, [], id="negative-room-starts-nothing"),
    ],
)
def test_the_quick_look_in_age_order_gives_the_answer_of_the_node_index(
    waits: list[tuple[str, str | None]], active: dict[str, int], free: int, expected: list[str]
) -> None:
    """Whenever the first waits in age order fill the free slots, the quick look answers alone: it must count what it
    takes per node (two per idle node at a limit of two), never skip an older wait that fits for a younger one, and
    treat a node missing from the active counts as idle."""
    assert lot(*waits).candidates(active, 2, free) == expected
