"""The dispatcher lease's decisions: who may take it, when the holder renews, when it must stand down."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.state import DispatcherLease
from services.dispatcher.leadership import Observed, may_take, must_step_down, observe, renewal_due

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def lease(holder: str, ttl_s: float = 15.0) -> DispatcherLease:
    return DispatcherLease(holder=holder, acquired_at=T0, renewed_at=T0, ttl_s=ttl_s)


def test_a_revision_is_dated_from_when_it_was_first_seen() -> None:
    first = observe(None, 7, now=100.0)
    assert first == Observed(7, 100.0)
    assert observe(first, 7, now=112.0) == Observed(7, 100.0)  # unchanged: still dated 100
    assert observe(first, 8, now=112.0) == Observed(8, 112.0)  # renewed: dated again


@pytest.mark.parametrize(
    ("held", "seen_for_s", "expected"),
    [
        pytest.param(None, 0.0, True, id="nobody-ever-held-it"),
        pytest.param(lease(""), 0.0, True, id="released-on-a-clean-stop"),
        pytest.param(lease("pod-a:1"), 0.0, True, id="its-own-after-a-restart"),
        pytest.param(lease("pod-b:1"), 14.9, False, id="another-holder-renewing"),
        pytest.param(lease("pod-b:1"), 15.0, True, id="another-holder-silent-for-its-lease"),
        pytest.param(lease("pod-b:1", ttl_s=60.0), 30.0, False, id="the-holders-own-lease-length-counts"),
    ],
)
def test_who_may_take_the_lease(held: DispatcherLease | None, seen_for_s: float, expected: bool) -> None:
    observed = Observed(3, 1000.0)
    assert may_take(held, observed, 1000.0 + seen_for_s, "pod-a:1") is expected


def test_the_holder_renews_every_third_and_stands_down_before_a_standby_may_take_over() -> None:
    ttl = 15.0
    assert renewal_due(last_renewed=100.0, ttl_s=ttl, now=100.0) == 5.0
    assert renewal_due(last_renewed=100.0, ttl_s=ttl, now=107.0) == 0.0
    assert not must_step_down(100.0, ttl, 109.9)
    assert must_step_down(100.0, ttl, 110.0)
    # A standby that first saw the holder's last renewal no earlier than it was written may take it only at +15 s:
    # by then the holder has stopped leading for 5 s (it stands down at +10 s).
    for silent_s in (10.0, 12.0, 14.9):
        assert must_step_down(100.0, ttl, 100.0 + silent_s)
        assert not may_take(lease("pod-b:1", ttl), Observed(1, 100.0), 100.0 + silent_s, "pod-a:1")
