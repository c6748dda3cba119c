"""Pacing a destination: the token bucket, a 429's pause (bounded), and which waiting messages leave now."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from services.notifier import pace
from services.notifier.retry import parse_retry_after

SLACK = pace.Pace(rate_per_s=1.0, burst=1, quiet_s=2.0, max_wait_s=30.0)
HOOK = pace.Pace(rate_per_s=10.0, burst=5, quiet_s=2.0, max_wait_s=30.0)
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("rules", "bucket", "now", "tokens"),
    [
        pytest.param(SLACK, pace.full(SLACK, 0.0), 0.0, 1, id="quiet-destination-has-one"),
        pytest.param(HOOK, pace.full(HOOK, 0.0), 0.0, 5, id="burst-after-quiet"),
        pytest.param(SLACK, pace.Bucket(tokens=0.0, at=10.0), 10.5, 0, id="half-a-second-after-a-message"),
        pytest.param(SLACK, pace.Bucket(tokens=0.0, at=10.0), 11.0, 1, id="a-second-after-a-message"),
        pytest.param(SLACK, pace.Bucket(tokens=0.0, at=10.0), 500.0, 1, id="never-more-than-the-burst"),
        pytest.param(HOOK, pace.Bucket(tokens=0.0, at=0.0), 0.25, 2, id="refills-at-the-rate"),
        pytest.param(SLACK, pace.Bucket(tokens=1.0, at=0.0, paused_until=5.0), 4.9, 0, id="paused-by-a-429"),
        pytest.param(SLACK, pace.Bucket(tokens=1.0, at=5.0, paused_until=5.0), 5.0, 1, id="pause-over"),
    ],
)
def test_available_messages(rules: pace.Pace, bucket: pace.Bucket, now: float, tokens: int) -> None:
    assert pace.available(bucket, rules, now) == tokens


def test_taking_a_token_delays_the_next_by_the_rate() -> None:
    after = pace.take(pace.full(SLACK, 100.0), SLACK, 100.0, 1)
    assert pace.available(after, SLACK, 100.0) == 0
    assert pace.next_token_at(after, SLACK, 100.0) == pytest.approx(101.0)
    assert pace.next_token_at(after, SLACK, 101.5) == 101.5


@pytest.mark.parametrize(
    ("wait_s", "until"),
    [
        pytest.param(3.0, 13.0, id="retry-after-honoured"),
        pytest.param(0.0, 10.0, id="zero"),
        pytest.param(-5.0, 10.0, id="negative-is-now"),
        pytest.param(1e12, 70.0, id="huge-is-capped"),
        pytest.param(math.inf, 70.0, id="infinite-is-capped"),
        pytest.param(math.nan, 70.0, id="nan-is-capped"),
    ],
)
def test_pause_after_429_is_bounded(wait_s: float, until: float) -> None:
    paused = pace.pause(pace.full(SLACK, 10.0), 10.0, wait_s, cap_s=60.0)
    assert paused.paused_until == until
    assert pace.next_token_at(paused, SLACK, 10.0) == until
    assert pace.available(paused, SLACK, until) == 1, "one message may leave when the pause ends"


def test_a_later_pause_never_shortens_an_earlier_one() -> None:
    first = pace.pause(pace.full(SLACK, 0.0), 0.0, 30.0, cap_s=60.0)
    assert pace.pause(first, 1.0, 2.0, cap_s=60.0).paused_until == 30.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("99999999999999999999999", 999999999999.0, id="huge-digits-read-bounded"),
        pytest.param("x" * 100_000, None, id="hostile-long-garbage"),
        pytest.param("Fri, 31 Dec 9999 23:59:59 GMT", (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - NOW).total_seconds(), id="far-future-date"),
    ],
)  # fmt: skip
def test_retry_after_values_that_a_hostile_receiver_sends(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds
    if seconds is not None:  # whatever it says, the pause is capped
        assert pace.pause(pace.full(SLACK, 0.0), 0.0, seconds, cap_s=3600.0).paused_until == 3600.0


W = pace.Waiting


@pytest.mark.parametrize(
    ("tokens", "resends", "waiting", "throttled", "last_arrival", "now", "expected"),
    [
        pytest.param(1, 0, [W(oldest=9.9, full=False)], False, 9.9, 10.0,
                     pace.Leaving(resends=0, chunks=1, throttled=False, wake_at=None), id="lone-alert-leaves-at-once"),
        pytest.param(0, 0, [W(oldest=9.9, full=False)], False, 9.9, 10.0,
                     pace.Leaving(resends=0, chunks=0, throttled=True, wake_at=None), id="no-token-waits-and-throttles"),
        pytest.param(1, 0, [W(oldest=9.0, full=False)], True, 9.5, 10.0,
                     pace.Leaving(resends=0, chunks=0, throttled=True, wake_at=11.5),
                     id="storm-partial-lingers-while-alerts-arrive"),
        pytest.param(1, 0, [W(oldest=9.0, full=False)], True, 7.9, 10.0,
                     pace.Leaving(resends=0, chunks=1, throttled=False, wake_at=None), id="storm-partial-leaves-when-quiet"),
        pytest.param(1, 0, [W(oldest=-21.0, full=False)], True, 9.9, 10.0,
                     pace.Leaving(resends=0, chunks=1, throttled=False, wake_at=None),
                     id="storm-partial-leaves-after-max-wait"),
        pytest.param(1, 0, [W(oldest=9.0, full=True), W(oldest=9.5, full=False)], True, 9.9, 10.0,
                     pace.Leaving(resends=0, chunks=1, throttled=True, wake_at=None), id="storm-full-message-leaves"),
        pytest.param(3, 0, [W(oldest=9.0, full=True), W(oldest=9.5, full=False)], True, 9.9, 10.0,
                     pace.Leaving(resends=0, chunks=2, throttled=False, wake_at=None),
                     id="spare-messages-send-the-partial-too"),
        pytest.param(2, 0, [W(oldest=9.0, full=True), W(oldest=9.5, full=False)], True, 9.9, 10.0,
                     pace.Leaving(resends=0, chunks=1, throttled=True, wake_at=11.9),
                     id="the-last-message-lingers"),
        pytest.param(1, 2, [W(oldest=9.0, full=True)], True, 9.9, 10.0,
                     pace.Leaving(resends=1, chunks=0, throttled=True, wake_at=None), id="resends-go-first"),
        pytest.param(5, 2, [W(oldest=9.0, full=True), W(oldest=9.0, full=False)], False, 9.9, 10.0,
                     pace.Leaving(resends=2, chunks=2, throttled=False, wake_at=None), id="burst-sends-everything"),
        pytest.param(1, 0, [], False, 0.0, 10.0,
                     pace.Leaving(resends=0, chunks=0, throttled=False, wake_at=None), id="nothing-waiting"),
    ],
)  # fmt: skip
def test_what_leaves(
    tokens: int,
    resends: int,
    waiting: list[pace.Waiting],
    throttled: bool,
    last_arrival: float,
    now: float,
    expected: pace.Leaving,
) -> None:
    assert pace.what_leaves(SLACK, tokens, resends, waiting, throttled, last_arrival, now) == expected


@pytest.mark.parametrize(
    ("throttled", "last_sent", "now", "storm"),
    [
        pytest.param(False, -1e9, 10.0, False, id="never-sent-is-quiet"),
        pytest.param(False, 5.0, 10.0, False, id="last-message-long-ago-is-quiet"),
        pytest.param(False, 9.0, 10.0, True, id="a-message-just-left-is-a-storm"),
        pytest.param(True, -1e9, 10.0, True, id="alerts-waited-for-the-rate"),
    ],
)
def test_in_storm(throttled: bool, last_sent: float, now: float, storm: bool) -> None:
    assert pace.in_storm(SLACK, throttled, last_sent, now) is storm
