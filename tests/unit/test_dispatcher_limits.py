"""The limiter: never above a limit, expired and released slots free, the per-minute window slides."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from schemas.state import LimiterState, Slot
from services.dispatcher import limits
from services.dispatcher.limits import Limits, try_acquire

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LATER = T0 + timedelta(minutes=10)


def _slot(scan_id: str, node: str | None = "n1", deadline: datetime = LATER) -> Slot:
    return Slot(scan_id=scan_id, node=node, deadline=deadline)


@pytest.mark.parametrize(
    ("state", "node", "cfg", "reason", "retry_at"),
    [
        pytest.param(LimiterState(), "n1", Limits(), "acquired", None, id="empty-state-acquires"),
        pytest.param(
            LimiterState(slots=[_slot("s-aaaaaaaa", "n1"), _slot("s-bbbbbbbb", "n2")]),
            "n3",
            Limits(max_active=2),
            "global_full",
            LATER,
            id="global-limit-refuses-on-an-idle-node",
        ),
        pytest.param(
            LimiterState(
                slots=[_slot("s-aaaaaaaa", "n1", LATER), _slot("s-bbbbbbbb", "n1", LATER - timedelta(minutes=1))]
            ),
            "n1",
            Limits(max_active_per_node=2),
            "node_full",
            LATER - timedelta(minutes=1),
            id="per-node-limit-refuses-with-the-earliest-deadline",
        ),
        pytest.param(
            LimiterState(slots=[_slot("s-aaaaaaaa", "n1"), _slot("s-bbbbbbbb", "n1")]),
            "n2",
            Limits(max_active_per_node=2),
            "acquired",
            None,
            id="a-full-node-does-not-block-another-node",
        ),
        pytest.param(
            LimiterState(slots=[_slot("s-aaaaaaaa", "n1", T0), _slot("s-bbbbbbbb", "n1", T0 - timedelta(hours=1))]),
            "n1",
            Limits(max_active=2, max_active_per_node=2),
            "acquired",
            None,
            id="slots-past-their-deadline-hold-nothing",
        ),
        pytest.param(
            LimiterState(created=[T0 - timedelta(seconds=50), T0 - timedelta(seconds=10)]),
            "n1",
            Limits(max_created_per_minute=2),
            "rate_limited",
            T0 + timedelta(seconds=10),
            id="two-creations-in-the-last-minute-refuse-a-third",
        ),
        pytest.param(
            LimiterState(created=[T0 - timedelta(seconds=60), T0 - timedelta(seconds=10)]),
            "n1",
            Limits(max_created_per_minute=2),
            "acquired",
            None,
            id="a-creation-exactly-a-minute-old-left-the-window",
        ),
        pytest.param(
            LimiterState(slots=[_slot("s-aaaaaaaa", None), _slot("s-bbbbbbbb", None)]),
            "n1",
            Limits(max_active=3, max_active_per_node=1),
            "acquired",
            None,
            id="unpinned-sbom-rescans-count-globally-not-per-node",
        ),
    ],
)
def test_try_acquire(state: LimiterState, node: str, cfg: Limits, reason: str, retry_at: datetime | None) -> None:
    new, outcome = try_acquire(state, T0, scan_id="s-cccccccc", node=node, deadline=LATER, limits=cfg)
    assert outcome.reason == reason
    assert outcome.retry_at == retry_at
    if reason == "acquired":
        assert new is not None
        assert [s.scan_id for s in new.slots][-1] == "s-cccccccc"
        assert new.created[-1] == T0
        assert all(s.deadline > T0 for s in new.slots)
    else:
        assert new is None


def test_taking_a_held_slot_again_writes_nothing_and_counts_once() -> None:
    state, _ = try_acquire(LimiterState(), T0, scan_id="s-aaaaaaaa", node="n1", deadline=LATER, limits=Limits())
    assert state is not None
    again, outcome = try_acquire(state, T0, scan_id="s-aaaaaaaa", node="n1", deadline=LATER, limits=Limits())
    assert again is None
    assert outcome.reason == "already_held"
    assert outcome.ok


@pytest.mark.parametrize(
    ("held", "scan_id", "remaining"),
    [
        pytest.param(["s-aaaaaaaa", "s-bbbbbbbb"], "s-aaaaaaaa", ["s-bbbbbbbb"], id="finished-scan-frees-its-slot"),
        pytest.param(["s-aaaaaaaa"], "s-zzzzzzzz", None, id="unknown-scan-id-writes-nothing"),
    ],
)
def test_release(held: list[str], scan_id: str, remaining: list[str] | None) -> None:
    state = LimiterState(slots=[_slot(s) for s in held])
    new = limits.release(state, T0, scan_id)
    if remaining is None:
        assert new is None
    else:
        assert new is not None
        assert [s.scan_id for s in new.slots] == remaining


def test_random_workload_never_exceeds_any_limit() -> None:
    """Replays a random mix of acquires, releases and time passing, checking every limit after each step."""
    cfg = Limits(max_active=5, max_active_per_node=2, max_created_per_minute=7)
    rng = random.Random(7)
    state = LimiterState()
    now = T0
    creations: list[datetime] = []
    acquired = 0
    for step in range(3000):
        now += timedelta(seconds=rng.choice([0, 1, 3, 10]))
        if rng.random() < 0.3 and state.slots:
            released = limits.release(state, now, rng.choice(state.slots).scan_id)
            state = released or state
            continue
        node = rng.choice(["n1", "n2", "n3", None])
        deadline = now + timedelta(seconds=rng.choice([5, 60, 600]))
        new, outcome = try_acquire(state, now, scan_id=f"s-{step:08d}", node=node, deadline=deadline, limits=cfg)
        if new is None:
            assert not outcome.ok
            continue
        state, acquired = new, acquired + 1
        creations.append(now)
        live = [s for s in state.slots if s.deadline > now]
        assert len(live) <= cfg.max_active
        for n in ("n1", "n2", "n3"):
            assert sum(s.node == n for s in live) <= cfg.max_active_per_node
        assert sum(now - t < limits.WINDOW for t in creations) <= cfg.max_created_per_minute
    assert acquired > 100  # the run exercised the limits rather than refusing everything


def test_active_per_node_counts_only_live_pinned_slots() -> None:
    state = LimiterState(
        slots=[
            _slot("s-aaaaaaaa", "n1"),
            _slot("s-bbbbbbbb", "n1", T0),
            _slot("s-cccccccc", None),
            _slot("s-dddddddd", "n2"),
        ]
    )
    assert limits.active_per_node(state, T0) == {"n1": 1, "n2": 1}


@pytest.mark.parametrize("field", ["max_active", "max_active_per_node", "max_created_per_minute"])
def test_a_zero_limit_is_refused_with_its_name(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: 0})  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(20))
def test_room_agrees_with_the_live_state_and_says_until_when_it_holds(seed: int) -> None:
    rng = random.Random(seed)
    cfg = Limits(max_active=rng.choice([5, 20, 100]), max_active_per_node=2, max_created_per_minute=rng.choice([3, 50]))
    state = LimiterState(
        slots=[
            _slot(f"s-{i:08x}", rng.choice(["n1", "n2", "n3", None]), T0 + timedelta(seconds=rng.randint(-30, 60)))
            for i in range(rng.randint(0, 40))
        ],
        created=sorted(T0 - timedelta(seconds=rng.randint(0, 90)) for _ in range(rng.randint(0, 60))),
    )
    releasing = {s.scan_id for s in state.slots if rng.random() < 0.2}
    got = limits.room(state, T0, cfg, releasing)
    current = limits.live(state, T0)
    kept = LimiterState(slots=[s for s in current.slots if s.scan_id not in releasing], created=current.created)
    assert got.per_node == limits.active_per_node(kept, T0)
    assert got.free == min(cfg.max_active - len(kept.slots), cfg.max_created_per_minute - len(kept.created))
    # The answer holds until valid_until and changes no earlier than that: nothing expires before it.
    just_before = got.valid_until - timedelta(microseconds=1)
    if got.valid_until != datetime.max.replace(tzinfo=UTC):
        assert limits.room(state, just_before, cfg, releasing) == got
        after = limits.room(state, got.valid_until + timedelta(microseconds=1), cfg, releasing)
        assert after.free >= got.free


def test_the_limits_default_to_the_documented_20_active_2_per_node_30_a_minute() -> None:
    """docs/dispatcher.md's table; config.py's DispatcherSettings carries the same defaults."""
    default = Limits()
    assert (default.max_active, default.max_active_per_node, default.max_created_per_minute) == (20, 2, 30)
