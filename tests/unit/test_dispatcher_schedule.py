"""schedule.py driven by hand: clocks are given, what to do for a digest is a stand-in."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.parking import Parked
from services.dispatcher.plan import ScanPlan
from services.dispatcher.schedule import IDLE_TEND_S, PARKED_IDLE_PASS_S, TICK_S, Launch, Schedule

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clocks:
    def __init__(self) -> None:
        self.now, self.mono = T0, 1000.0


def schedule(clocks: Clocks) -> Schedule:
    return Schedule(lambda: clocks.now, lambda: clocks.mono)


def test_due_timers_come_oldest_first_and_a_later_setting_replaces_an_earlier_one() -> None:
    s = schedule(Clocks())
    s.set_timer("b", T0 + timedelta(seconds=2))
    s.set_timer("a", T0 + timedelta(seconds=1))
    s.set_timer("c", T0 + timedelta(seconds=1))
    s.set_timer("c", T0 + timedelta(seconds=60))  # moved later: not due at +5s
    assert list(s.due(T0 + timedelta(seconds=5))) == ["a", "b"]
    assert s.timers == {"c": T0 + timedelta(seconds=60)}
    assert list(s.due(T0 + timedelta(seconds=60))) == ["c"]


def test_a_timer_replaced_while_earlier_ones_are_acted_on_is_not_due() -> None:
    s = schedule(Clocks())
    s.set_timer("a", T0)
    s.set_timer("b", T0 + timedelta(seconds=1))
    acted = []
    for key in s.due(T0 + timedelta(seconds=5)):
        acted.append(key)
        if key == "a":
            s.set_timer("b", T0 + timedelta(minutes=5))  # what "a" did moved "b" later
    assert acted == ["a"]


@pytest.mark.parametrize(
    ("parked", "gathering", "timer_in_s", "held_in_s", "expected"),
    [
        pytest.param(False, False, None, None, IDLE_TEND_S, id="idle"),
        pytest.param(True, False, None, None, TICK_S, id="parked-ticks"),
        pytest.param(False, True, 20.0, None, TICK_S, id="gathering-ticks"),
        pytest.param(False, False, 3.0, None, 3.0, id="until-the-next-timer"),
        pytest.param(False, False, -4.0, None, 0.0, id="overdue-timer"),
        pytest.param(False, False, 3600.0, None, IDLE_TEND_S, id="far-timer-capped"),
        pytest.param(False, False, 20.0, 2.0, 2.0, id="held-sightings-sooner"),
        pytest.param(True, False, None, -1.0, 0.0, id="held-sightings-overdue"),
    ],
)
def test_the_tend_loop_sleeps_as_long_as_nothing_can_change(
    parked: bool, gathering: bool, timer_in_s: float | None, held_in_s: float | None, expected: float
) -> None:
    clocks = Clocks()
    s = schedule(clocks)
    if parked:
        s.parked.park("p", None, ("n1",))
    if timer_in_s is not None:
        s.set_timer("t", T0 + timedelta(seconds=timer_in_s))
    held_due = clocks.mono + held_in_s if held_in_s is not None else None
    assert s.wait_s(gathering, held_due) == pytest.approx(expected)


def test_the_loop_is_woken_only_when_it_would_look_too_late() -> None:
    clocks = Clocks()
    s = schedule(clocks)
    s.looks_at = clocks.mono + 10.0
    s.look_within(20.0)
    assert not s.wake.is_set()
    s.set_timer("a", T0 + timedelta(seconds=5))
    assert s.wake.is_set()


def test_parked_digests_are_looked_at_when_the_limiter_or_the_parking_changed_or_an_idle_pass_is_due() -> None:
    clocks = Clocks()
    s = schedule(clocks)
    assert s.parked_pass(limiter_revision=7, idle=False), "the first pass"
    assert not s.parked_pass(limiter_revision=7, idle=False), "nothing changed"
    assert s.parked_pass(limiter_revision=8, idle=False), "a slot freed (a limiter write)"
    s.parked.park("p", None, ("n1",))
    assert s.parked_pass(limiter_revision=8, idle=False), "something new parked"
    assert not s.idle_pass_due()
    clocks.mono += PARKED_IDLE_PASS_S
    assert s.idle_pass_due()
    assert s.parked_pass(limiter_revision=8, idle=True), "expiries free room without a write"


def _scan(n: int) -> ScanPlan:
    return ScanPlan(scan_id=f"psw-{n:024x}", digest_ref=f"r@sha256:{n:064x}", mode="node", node="n1", attempt=1)


async def test_parked_digests_start_oldest_first_within_the_room() -> None:
    s = schedule(Clocks())
    for n in range(5):
        s.parked.park(f"k{n}", _scan(n), ("n1",))
    free = [3]
    started: list[str] = []

    async def start(key: str, parked: Parked) -> Launch | None:
        started.append(key)
        s.parked.unpark(key)
        free[0] -= 1
        return "created"

    def room() -> tuple[Mapping[str, int], int]:
        return {}, free[0]

    await s.start_parked(room, per_node_limit=10, start=start)
    assert started == ["k0", "k1", "k2"]
    assert list(s.parked) == ["k3", "k4"]


async def test_starting_parked_digests_stops_when_the_limiter_refuses_and_is_full() -> None:
    s = schedule(Clocks())
    for n in range(4):
        s.parked.park(f"k{n}", _scan(n), ("n1",))
    calls: list[str] = []

    async def refused(key: str, parked: Parked) -> Launch | None:
        calls.append(key)
        return "refused"

    full = [False]

    def room() -> tuple[Mapping[str, int], int]:
        free = 0 if full[0] else 4
        full[0] = True  # the other replica took every slot meanwhile
        return {}, free

    await s.start_parked(room, per_node_limit=10, start=refused)
    assert calls == ["k0"], "a refusal with no room left ends the pass"


async def test_starting_parked_digests_ends_when_a_round_starts_none() -> None:
    s = schedule(Clocks())
    s.parked.park("k0", _scan(0), ("n1",))
    rounds: list[str] = []

    async def still_parked(key: str, parked: Parked) -> Launch | None:
        rounds.append(key)
        return "refused"

    await s.start_parked(lambda: ({}, 1), per_node_limit=10, start=still_parked)
    assert rounds == ["k0"], "no second round over what could not start"
