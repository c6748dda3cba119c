"""Gathering SBOM rescans into batches: when a partial batch may leave, and how the oldest item's age is kept."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from services.dispatcher.batching import Gathering
from tests.unit.test_dispatcher_rescans import T0, _item


def test_a_batch_size_below_one_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="sbom batch size is 0"):
        Gathering(size=0, window_s=1.0)
    assert Gathering(size=1, window_s=1.0).size == 1


def test_the_window_runs_from_the_oldest_item_not_the_newest() -> None:
    gathering = Gathering(size=10, window_s=5.0)
    assert not gathering.ready(0.0), "nothing gathered: nothing leaves"
    gathering.add(_item(1), now=100.0)
    gathering.add(_item(2), now=104.0)
    assert not gathering.ready(104.9)
    assert gathering.ready(105.0), "the oldest has waited exactly the window"


def test_a_full_batch_leaves_before_the_window() -> None:
    gathering = Gathering(size=2, window_s=60.0)
    gathering.add(_item(1), now=0.0)
    assert not gathering.ready(0.0)
    gathering.add(_item(2), now=0.0)
    assert gathering.ready(0.0)


def test_emptied_by_discard_the_window_starts_again_with_the_next_item() -> None:
    gathering = Gathering(size=10, window_s=5.0)
    gathering.add(_item(1), now=0.0)
    gathering.discard(_item(1).key)
    gathering.discard(_item(9).key)  # not there: nothing happens
    assert len(gathering) == 0
    gathering.add(_item(2), now=50.0)
    assert not gathering.ready(54.0) and gathering.ready(55.0)


def test_discarding_one_of_several_keeps_the_oldest_age() -> None:
    gathering = Gathering(size=10, window_s=5.0)
    gathering.add(_item(1), now=0.0)
    gathering.add(_item(2), now=3.0)
    gathering.discard(_item(2).key)
    assert gathering.ready(5.0)


def test_emptied_by_take_the_window_starts_again_with_the_next_item() -> None:
    gathering = Gathering(size=2, window_s=5.0)
    gathering.add(_item(1), now=0.0)
    gathering.add(_item(2), now=0.0)
    assert gathering.take() == [_item(1), _item(2)]
    gathering.add(_item(3), now=10.0)
    assert not gathering.ready(14.0) and gathering.ready(15.0), "the next item waits from when it arrived"


def test_a_partial_take_keeps_the_age_of_what_is_left() -> None:
    gathering = Gathering(size=2, window_s=5.0)
    for n in range(3):
        gathering.add(_item(n), now=0.0)
    gathering.take()
    assert _item(2).key in gathering and gathering.ready(5.0)


def test_restored_items_wait_from_when_they_came_back_and_a_fresher_claim_wins() -> None:
    gathering = Gathering(size=10, window_s=5.0)
    gathering.add(_item(1), now=0.0)
    gathering.add(_item(2), now=0.0)
    refused = gathering.take()
    assert len(gathering) == 0
    fresher = msgspec.structs.replace(_item(2), claimed_until=T0 + timedelta(minutes=5))
    gathering.restore(refused, now=20.0)
    gathering.add(fresher, now=21.0)
    assert not gathering.ready(24.9) and gathering.ready(25.0)
    assert gathering.take() == [_item(1), fresher]


def test_restoring_before_a_fresher_claim_keeps_the_fresher_one() -> None:
    gathering = Gathering(size=10, window_s=0.0)
    gathering.add(_item(1), now=0.0)
    refused = gathering.take()
    fresher = msgspec.structs.replace(_item(1), claimed_until=T0 + timedelta(minutes=5))
    gathering.add(fresher, now=1.0)
    gathering.restore(refused, now=2.0)
    assert gathering.take() == [fresher]


def test_part_of_a_refused_batch_put_back_beside_a_waiting_item_keeps_the_window_of_the_first_arrival() -> None:
    """Items dropped from a batch before it left are not put back: what comes back joins an item that kept waiting,
    and the window still runs from the first arrival, not from the refusal."""
    gathering = Gathering(size=3, window_s=10.0, refused_wait_s=1.0)
    for n in range(4):
        gathering.add(_item(n), now=float(n))
    batch = gathering.take()
    assert [g.key for g in batch] == [_item(n).key for n in range(3)] and len(gathering) == 1
    gathering.refused(batch[:1], now=4.0)
    assert not gathering.ready(9.9)
    assert gathering.ready(10.0), "the window runs from the first arrival (0), not from the refusal (4)"
