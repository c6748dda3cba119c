"""The parking lot's bookkeeping: iteration, the generation counter, a claimed scan replacing an unclaimed wait in
the per-node index, and the room of a node with no active Job."""

from __future__ import annotations

from services.dispatcher.parking import QUICK_LOOK, ParkingLot
from tests.unit.test_dispatcher_parking import lot, scan


def test_the_lot_iterates_its_keys_oldest_first() -> None:
    parked = lot(("b", "n1"), ("a", "n2"), ("c", None))
    assert list(parked) == ["b", "a", "c"] and len(parked) == 3 and "a" in parked and "z" not in parked


def test_every_park_that_changes_something_grows_the_generation() -> None:
    parked = ParkingLot()
    assert parked.generation == 0
    parked.park("a", None, ("n1",))
    parked.park("b", scan(1, "n2"), ("n2",))
    assert parked.generation == 2
    parked.park("a", None, ("n1",))  # already waiting: keeps its place, nothing new
    parked.park("b", scan(1, "n2"), ("n2",))
    assert parked.generation == 2
    parked.park("a", scan(2, "n1"), ("n1",))  # claimed now: something new may start
    assert parked.generation == 3


def test_a_claimed_scan_replacing_an_unclaimed_wait_leaves_the_old_nodes_index() -> None:
    parked = ParkingLot()
    parked.park("a", None, ("n1", "n2"))
    parked.park("a", scan(1, "n3"), ("n3",))
    # n1 and n2 have room, n3 is full: the claim waits for n3 only.
    assert parked.candidates({"n3": 2}, 2, 5) == []
    assert parked.candidates({}, 2, 5) == ["a"]
    parked.unpark("a")
    assert len(parked) == 0 and parked.candidates({}, 2, 5) == []


def test_a_node_with_no_active_job_has_all_its_room_in_the_per_node_index() -> None:
    waits = [(f"full{i}", "busy") for i in range(QUICK_LOOK + 1)] + [("x1", "idle"), ("x2", "idle"), ("x3", "idle")]
    assert lot(*waits).candidates({"busy": 2}, 2, 5) == ["x1", "x2"]


def test_unparking_a_key_that_does_not_wait_changes_nothing() -> None:
    parked = lot(("a", "n1"))
    parked.unpark("never-parked")
    parked.unpark("a")
    parked.unpark("a")
    assert len(parked) == 0 and parked.candidates({}, 2, 5) == []
