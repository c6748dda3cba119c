"""Whether new scan Jobs may be created while the API server refuses scan pods. Pure: the clock is an argument.

A scan pod refused at creation (PodCreateRejected: the `scan` ServiceAccount is missing, a ResourceQuota or a Pod
Security level forbids it) is refused on every node alike, so retrying elsewhere only piles up Jobs. After a
rejection nothing new starts until a backoff passes; then one Job probes. Its pod starting clears the hold; its
rejection doubles the backoff. Other failures of the probe let the next Job probe.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec


class Hold(msgspec.Struct, frozen=True, kw_only=True):
    """Scan pods are being refused: `until` nothing starts, then one probe (`probe`: its scan id once created)."""

    message: str
    since: datetime
    until: datetime
    rejections: int = 1
    probe: str | None = None


def rejected(
    hold: Hold | None, scan_id: str, message: str, now: datetime, base: timedelta, cap: timedelta
) -> Hold | None:
    """The hold after `scan_id`'s pod was refused with `message`. None when the refusal changes nothing: only the
    first refusal and the probe's count (the Jobs created before the hold began are refused one by one after it)."""
    if hold is None:
        return Hold(message=message, since=now, until=now + base)
    if hold.probe != scan_id:
        return None
    count = hold.rejections + 1
    delay = min(base * (1 << min(count - 1, 20)), cap)
    return Hold(message=message, since=hold.since, until=now + delay, rejections=count)


def allowance(hold: Hold | None, now: datetime) -> int | None:
    """How many new scan Jobs may start now: None without a hold (only the limits apply), 0 while it lasts or its
    probe is out, 1 for the probe."""
    if hold is None:
        return None
    if now < hold.until or hold.probe is not None:
        return 0
    return 1


def probing(hold: Hold | None, scan_id: str, now: datetime) -> Hold | None:
    """The hold once `scan_id` was created as its probe (None: no hold, or not a probe)."""
    if hold is None or hold.probe is not None or now < hold.until:
        return None
    return msgspec.structs.replace(hold, probe=scan_id)


def failed_otherwise(hold: Hold | None, scan_id: str) -> Hold | None:
    """The probe failed for another reason (its node, its image): the next scan may probe. None: nothing changes."""
    if hold is None or hold.probe != scan_id:
        return None
    return msgspec.structs.replace(hold, probe=None)
