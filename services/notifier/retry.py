"""When to try a delivery again: exponential backoff with full jitter, honouring 429/503 `Retry-After`.

Pure: the attempt number, the response, the time and the random source are arguments; the shell sleeps or
schedules. Permanent failures (most 4xx) give up at once, so a misconfigured destination does not retry for hours.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated

import msgspec

# Worth another try: timeouts, throttling, server trouble. None stands for "no response" (connect error, timeout).
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUS = frozenset({429, 503})
_MAX_EXPONENT = 60


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    base_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    cap_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 8
    # A Retry-After longer than this gives up rather than hold an alert for hours.
    max_retry_after_s: Annotated[float, msgspec.Meta(ge=0)] = 3600.0


class RetryDecision(msgspec.Struct, frozen=True, kw_only=True):
    retry: bool
    delay_s: float = 0.0
    reason: str


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or an HTTP-date), or None when absent or invalid.

    A date in the past means 0. Anything else (negative, fractional, garbage) is ignored, and backoff applies.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text[:12]))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; asctime form carries no zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_s(policy: RetryPolicy, attempt: int, rand: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))), so retries of many alerts spread out."""
    ceiling = min(policy.cap_s, policy.base_s * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT))
    return rand() * ceiling


def next_attempt(
    policy: RetryPolicy,
    attempt: int,
    status: int | None,
    retry_after: str | None,
    now: datetime,
    rand: Callable[[], float],
) -> RetryDecision:
    """After `attempt` tries (1 for the first) ended with `status` (None: no response), retry and after how long?"""
    if status is not None and 200 <= status < 300:
        return RetryDecision(retry=False, reason=f"delivered (HTTP {status})")
    what = f"HTTP {status}" if status is not None else "no response"
    if status is not None and status not in RETRYABLE_STATUS:
        return RetryDecision(retry=False, reason=f"{what} is permanent: fix the destination and resend")
    if attempt >= policy.max_attempts:
        return RetryDecision(
            retry=False, reason=f"{what} after {attempt} attempts (max_attempts {policy.max_attempts})"
        )
    wait = parse_retry_after(retry_after, now) if status in RETRY_AFTER_STATUS else None
    if wait is not None:
        if wait > policy.max_retry_after_s:
            return RetryDecision(
                retry=False,
                reason=f"{what} asks to wait {wait:.0f} s, more than max_retry_after_s {policy.max_retry_after_s:.0f}",
            )
        return RetryDecision(retry=True, delay_s=wait, reason=f"{what}, Retry-After {wait:.0f} s")
    delay = backoff_s(policy, attempt, rand)
    return RetryDecision(retry=True, delay_s=delay, reason=f"{what}, backoff {delay:.1f} s")
