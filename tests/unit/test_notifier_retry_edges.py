"""Retry decisions at their edges: which statuses retry, the 2xx range's end, Retry-After at its limit, the exponent
cap and the defaults (bench/mutation.py found these unpinned)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.notifier.retry import RetryPolicy, backoff_s, next_attempt, parse_retry_after

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_s=1.0, cap_s=300.0, max_attempts=5, max_retry_after_s=600.0)


def test_the_defaults_are_the_documented_ones() -> None:
    assert RetryPolicy() == RetryPolicy(base_s=1.0, cap_s=300.0, max_attempts=8, max_retry_after_s=3600.0)


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        *[pytest.param(s, True, id=f"{s}-retries") for s in (408, 425, 429, 500, 502, 503, 504)],
        *[pytest.param(s, False, id=f"{s}-is-permanent") for s in (300, 400, 407, 409, 424, 426, 501, 505)],
        pytest.param(None, True, id="no-response-retries"),
    ],
)
def test_which_responses_are_worth_another_try(status: int | None, retry: bool) -> None:
    decision = next_attempt(POLICY, 1, status, None, NOW, lambda: 0.5)
    assert decision.retry is retry
    if not retry:
        assert "permanent" in decision.reason


@pytest.mark.parametrize(("status", "delivered"), [(200, True), (299, True), (300, False), (199, False)])
def test_only_2xx_is_delivered(status: int, delivered: bool) -> None:
    assert next_attempt(POLICY, 1, status, None, NOW, lambda: 0.5).reason.startswith("delivered") is delivered


@pytest.mark.parametrize(("after", "retry"), [("600", True), ("601", False)])
def test_a_retry_after_of_exactly_the_limit_is_waited_out(after: str, retry: bool) -> None:
    decision = next_attempt(POLICY, 1, 429, after, NOW, lambda: 0.5)
    assert decision.retry is retry
    if retry:
        assert decision.delay_s == 600.0


def test_retry_after_reads_at_most_twelve_digits() -> None:
    assert parse_retry_after("1234567890123", NOW) == 123456789012.0


def test_the_exponent_stops_growing_so_a_huge_attempt_number_never_overflows() -> None:
    unbounded = RetryPolicy(base_s=1.0, cap_s=1e300)
    assert backoff_s(unbounded, 61, lambda: 1.0) == 2.0**60
    assert backoff_s(unbounded, 10_000, lambda: 1.0) == 2.0**60
    assert backoff_s(unbounded, 60, lambda: 1.0) == 2.0**59
