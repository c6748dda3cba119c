"""How alerts for one destination leave together: group members, group keys, CVE pages, and the split of many members
into the fewest messages that fit a destination's limits.

Pure: no I/O, no clock. The shell decides when (pace.py) and renders with messages.py; this module decides who goes
with whom and under which idempotency key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from schemas import storage
from schemas.alerts import MAX_GROUP_MEMBER_CVES, AlertPayload, GroupCve, GroupMember
from schemas.events import SEVERITIES, Severity

_RANK: dict[str, int] = {s: len(SEVERITIES) - i for i, s in enumerate(SEVERITIES)}


def cve_page_key(cve_id: str) -> str:
    """The id's page in the static index (the parser writes it under the same key); empty for an id that is not of
    the strict pattern, which never reaches an object key."""
    try:
        return storage.cve_page_key(cve_id)
    except ValueError:
        return ""


def member(alert: AlertPayload) -> GroupMember:
    """What a grouped message says about one alert: the workload, its image and its breaching findings' ids."""
    ids: list[str] = []
    severities: list[Severity] = []
    for finding in alert.findings:
        if finding.id not in ids:
            ids.append(finding.id)
            severities.append(finding.severity)
    return GroupMember(
        id=alert.id,
        namespace=alert.namespace,
        workload=alert.workload,
        digest_ref=alert.digest_ref,
        image=alert.image,
        counts=alert.counts,
        new_count=alert.new_count,
        cves=ids[:MAX_GROUP_MEMBER_CVES],
        severities=severities[:MAX_GROUP_MEMBER_CVES],
        more=max(0, len(ids) - MAX_GROUP_MEMBER_CVES) + alert.omitted,
        scan_id=alert.scan_id,
        report_key=alert.report_key,
    )


def group_key(destination: str, member_keys: Sequence[str]) -> str:
    """The idempotency key of a group: a lone alert keeps its own key; a group's is derived from the destination
    and its sorted member keys, so the same members always give the same key (a resend after a restart)."""
    if len(member_keys) == 1:
        return member_keys[0]
    text = "\n".join(["group", destination, *sorted(member_keys)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cves(members: Sequence[GroupMember]) -> list[GroupCve]:
    """Every CVE the members name, worst first, then by how many members it affects, then by id."""
    worst: dict[str, Severity] = {}
    affected: dict[str, int] = {}
    for m in members:
        for cve, severity in zip(m.cves, m.severities, strict=False):
            before = worst.get(cve)
            if before is None or _RANK[severity] > _RANK[before]:
                worst[cve] = severity
            affected[cve] = affected.get(cve, 0) + 1
    order = sorted(worst, key=lambda c: (-_RANK[worst[c]], -affected[c], c))
    return [GroupCve(id=c, severity=worst[c], workloads=affected[c], page_key=cve_page_key(c)) for c in order]


def split(
    members: Sequence[GroupMember], fits: Callable[[Sequence[GroupMember]], bool], limit: int | None = None
) -> list[list[GroupMember]]:
    """Cut `members`, in order, into the fewest consecutive chunks for which `fits` holds (taking the longest prefix
    that fits each time is optimal when `fits` is monotone: a prefix of a fitting chunk fits); only the first
    `limit` chunks when given. A member that does not fit even alone still gets a chunk of its own: it leaves as a
    single alert, which has its own bounds."""
    chunks: list[list[GroupMember]] = []
    start = 0
    while start < len(members) and (limit is None or len(chunks) < limit):
        rest = len(members) - start
        # Exponential search for a length that does not fit, then binary search between the last two.
        good, step = 1, 1
        while good < rest:
            probe = min(rest, good + step)
            if not fits(members[start : start + probe]):
                bad = probe
                break
            good, step = probe, step * 2
        else:
            bad = rest + 1
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(members[start : start + mid]):
                good = mid
            else:
                bad = mid
        chunks.append(list(members[start : start + good]))
        start += good
    return chunks
