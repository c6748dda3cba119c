"""Retries: backoff with full jitter, Retry-After honoured on 429/503, permanent errors and the last attempt give up."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from services.notifier.retry import RetryPolicy, backoff_s, next_attempt, parse_retry_after

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_s=1.0, cap_s=60.0, max_attempts=5, max_retry_after_s=600.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("120", 120.0, id="delta-seconds"),
        pytest.param(" 0 ", 0.0, id="zero-with-spaces"),
        pytest.param("Mon, 23 Nov 2026 12:00:30 GMT", 30.0, id="imf-fixdate"),
        pytest.param("Mon, 23 Nov 2026 11:59:00 GMT", 0.0, id="date-in-the-past-is-now"),
        pytest.param("Mon Nov 23 12:01:00 2026", 60.0, id="asctime-date"),
        pytest.param("Mon, 23 Nov 2026 13:00:30 +0100", 30.0, id="numeric-zone"),
        pytest.param("-5", None, id="negative"),
        pytest.param("1.5", None, id="fraction"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="absent"),
        pytest.param("١٢", None, id="non-ascii-digits"),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("attempt", "rand", "delay"),
    [
        pytest.param(1, 0.999, 0.999, id="first-retry-under-base"),
        pytest.param(3, 0.5, 2.0, id="doubles-each-attempt"),
        pytest.param(10, 0.5, 30.0, id="capped"),
        pytest.param(10_000, 0.5, 30.0, id="huge-attempt-no-overflow"),
        pytest.param(4, 0.0, 0.0, id="full-jitter-can-be-zero"),
    ],
)
def test_backoff_is_full_jitter_under_a_capped_exponential(attempt: int, rand: float, delay: float) -> None:
    assert backoff_s(RetryPolicy(base_s=1.0, cap_s=60.0, max_attempts=99), attempt, lambda: rand) == delay


@pytest.mark.parametrize(
    ("attempt", "status", "retry_after", "retry", "delay", "reason"),
    [
        pytest.param(1, 200, None, False, 0.0, "delivered", id="delivered"),
        pytest.param(1, 204, "30", False, 0.0, "delivered", id="delivered-ignores-retry-after"),
        pytest.param(1, 500, None, True, 0.5, "backoff", id="server-error-backs-off"),
        pytest.param(2, None, None, True, 1.0, "no response", id="timeout-backs-off"),
        pytest.param(1, 429, "30", True, 30.0, "Retry-After 30", id="429-honours-retry-after"),
        pytest.param(1, 503, "Mon, 23 Nov 2026 12:00:45 GMT", True, 45.0, "Retry-After", id="503-with-http-date"),
        pytest.param(1, 429, None, True, 0.5, "backoff", id="429-without-header-backs-off"),
        pytest.param(1, 429, "soon", True, 0.5, "backoff", id="429-unparsable-header-backs-off"),
        pytest.param(1, 500, "30", True, 0.5, "backoff", id="retry-after-only-on-429-and-503"),
        pytest.param(1, 429, "7200", False, 0.0, "more than max_retry_after_s", id="retry-after-too-long-gives-up"),
        pytest.param(1, 400, None, False, 0.0, "permanent", id="bad-request-is-permanent"),
        pytest.param(1, 404, None, False, 0.0, "permanent", id="gone-webhook-is-permanent"),
        pytest.param(1, 401, None, False, 0.0, "permanent", id="bad-token-is-permanent"),
        pytest.param(5, 503, "1", False, 0.0, "after 5 attempts", id="last-attempt-gives-up"),
        pytest.param(4, 503, "1", True, 1.0, "Retry-After", id="one-attempt-left"),
    ],
)
def test_next_attempt(
    attempt: int, status: int | None, retry_after: str | None, retry: bool, delay: float, reason: str
) -> None:
    decision = next_attempt(POLICY, attempt, status, retry_after, NOW, lambda: 0.5)
    assert (decision.retry, decision.delay_s) == (retry, delay)
    assert reason in decision.reason


def test_jitter_spreads_many_retries_of_the_same_attempt() -> None:
    rng = random.Random(7)
    delays = [next_attempt(POLICY, 4, 502, None, NOW, rng.random).delay_s for _ in range(200)]
    assert all(0.0 <= d < 8.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 150
