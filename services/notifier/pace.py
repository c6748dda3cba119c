"""When messages may leave for one destination: a token bucket at the destination's rate, paused by a 429's
Retry-After, and the rule that decides which waiting groups leave now.

Pure: the time is an argument (monotonic seconds); the shell sleeps until `next_wake` and asks again. A lone alert
in a quiet period leaves at once; once alerts wait for the rate, a partly filled message lingers while more keep
arriving (up to a bound) when sending it would spend the last message the rate allows, so a storm leaves in the
fewest messages and a flow just above the rate is not held back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec


class Pace(msgspec.Struct, frozen=True, kw_only=True):
    rate_per_s: float  # messages per second, at most
    burst: int = 1  # messages that may leave back to back after a quiet period
    quiet_s: float = 2.0  # during a storm, a partial message leaves once nothing new arrived for this long
    max_wait_s: float = 30.0  # ... or once its oldest alert waited this long


class Bucket(msgspec.Struct, frozen=True, kw_only=True):
    tokens: float
    at: float  # when `tokens` was counted
    paused_until: float = 0.0  # a 429's Retry-After: nothing leaves before


def full(pace: Pace, now: float) -> Bucket:
    return Bucket(tokens=float(pace.burst), at=now)


def refill(bucket: Bucket, pace: Pace, now: float) -> Bucket:
    if now <= bucket.at:
        return bucket
    tokens = min(float(pace.burst), bucket.tokens + (now - bucket.at) * pace.rate_per_s)
    return msgspec.structs.replace(bucket, tokens=tokens, at=now)


def available(bucket: Bucket, pace: Pace, now: float) -> int:
    """Messages that may leave now."""
    if now < bucket.paused_until:
        return 0
    return int(refill(bucket, pace, now).tokens + 1e-9)


def take(bucket: Bucket, pace: Pace, now: float, n: int) -> Bucket:
    current = refill(bucket, pace, now)
    return msgspec.structs.replace(current, tokens=current.tokens - n)


def pause(bucket: Bucket, now: float, wait_s: float, cap_s: float) -> Bucket:
    """After a 429: nothing leaves for `wait_s` (at most `cap_s`; a hostile or garbled value is bounded), then one
    message may, and what follows leaves at the rate, not in a burst."""
    wait = min(max(wait_s, 0.0), cap_s) if math.isfinite(wait_s) else cap_s
    until = max(bucket.paused_until, now + wait)
    return Bucket(tokens=1.0, at=until, paused_until=until)


def next_token_at(bucket: Bucket, pace: Pace, now: float) -> float:
    """When the next message may leave (now, when one may already)."""
    if now < bucket.paused_until:
        return bucket.paused_until
    current = refill(bucket, pace, now)
    if current.tokens >= 1.0 - 1e-9:
        return now
    return now + (1.0 - current.tokens) / pace.rate_per_s


def in_storm(pace: Pace, throttled: bool, last_sent: float, now: float) -> bool:
    """A storm: alerts waited for the rate at the last look, or a message left less than `quiet_s` ago (the
    destination is busy even if nothing waits this instant). Otherwise a new alert is the first of a quiet period."""
    return throttled or now - last_sent < pace.quiet_s


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    """One message-to-be, as split to fit: `oldest` is when its first alert arrived; `full` says the next alert in
    line did not fit in it."""

    oldest: float
    full: bool


class Leaving(msgspec.Struct, frozen=True, kw_only=True):
    resends: int  # how many groups decided before (a restart, a retry) leave now
    chunks: int  # how many of the waiting messages leave now, in order
    throttled: bool  # alerts still wait for the rate: the next partial message lingers
    wake_at: float | None  # when to look again, for the linger (None: when a token or an alert comes)


def what_leaves(
    pace: Pace,
    tokens: int,
    resends: int,
    waiting: Sequence[Waiting],
    throttled: bool,
    last_arrival: float,
    now: float,
) -> Leaving:
    """Groups decided before leave first (their members are already promised to them); then full messages; the
    last, partial one leaves at once in a quiet period, or when it would not take the last message the destination
    allows now; otherwise (a storm) once arrivals paused for `quiet_s` or its oldest alert waited `max_wait_s`."""
    resend = min(tokens, resends)
    tokens -= resend
    send = 0
    wake_at: float | None = None
    for chunk in waiting:
        if tokens <= 0:
            break
        if not chunk.full and throttled and tokens <= 1:
            settle_at = min(last_arrival + pace.quiet_s, chunk.oldest + pace.max_wait_s)
            if now < settle_at:
                wake_at = settle_at
                break
        send += 1
        tokens -= 1
    left = resends - resend + len(waiting) - send
    return Leaving(resends=resend, chunks=send, throttled=left > 0, wake_at=wake_at)
