"""What the notifier sends and remembers: the versioned webhook payload and the per-workload dedup fingerprint.

Pure types, no I/O. The payload is a public contract (exported as JSON Schema); every text field in it is
bounded and free of control characters, because receivers render it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas.events import Severity, SeverityCounts, Workload
from schemas.refs import (
    ClusterName,
    DigestRef,
    ImageRef,
    K8sLabelName,
    ObjectKey,
    RouteName,
    ScanId,
    ShortText,
    Text,
)

# 128 bits of a SHA-256, hex: deterministic from (cluster, digest, scan, workload), so a redelivered event or a
# restarted notifier produces the same key and a receiver can drop the duplicate.
AlertKey = Annotated[str, msgspec.Meta(pattern=r"^[a-f0-9]{32}$", description="Idempotency key of one alert.")]
# 64 bits of a SHA-256 over a finding's identity (CVE, package, installed version, path).
FindingHash = Annotated[str, msgspec.Meta(pattern=r"^[a-f0-9]{16}$")]

ALERT_TYPE = "podsweep.breach"


class Threshold(msgspec.Struct, frozen=True, kw_only=True):
    """Breach when a severity's counted findings are more than its maximum; `null` means no limit."""

    max_critical: int | None = 0
    max_high: int | None = None
    max_medium: int | None = None
    max_low: int | None = None
    max_unknown: int | None = None

    def limit(self, severity: Severity) -> int | None:
        return {
            "CRITICAL": self.max_critical,
            "HIGH": self.max_high,
            "MEDIUM": self.max_medium,
            "LOW": self.max_low,
            "UNKNOWN": self.max_unknown,
        }[severity]


class SuppressionNote(msgspec.Struct, frozen=True, kw_only=True):
    """Who accepted a finding, why, and until when."""

    owner: ShortText
    reason: Text
    expires: datetime


class AlertFinding(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One counted finding as shown to people. `new` is relative to the last alert for this workload and digest."""

    id: ShortText
    package: ShortText
    installed_version: ShortText
    fixed_version: ShortText = ""
    severity: Severity
    cvss: float | None = None
    title: ShortText = ""
    url: ShortText = ""
    target: ShortText = ""
    new: bool = False
    # Set when this finding was suppressed and the suppression has expired: it counts again.
    expired_suppression: SuppressionNote | None = None


class AlertPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The generic webhook body (version 1): one workload running one digest breached its policy.

    `findings` lists the new findings first, then the others that count, each group worst first; at most
    `MAX_ALERT_FINDINGS` are listed and `omitted` says how many more counted.
    """

    v: int = 1
    type: Literal["podsweep.breach"] = "podsweep.breach"
    id: AlertKey
    cluster: ClusterName
    digest_ref: DigestRef
    image: ImageRef
    namespace: K8sLabelName
    workload: Workload
    route: RouteName | None = None
    rule: ShortText
    threshold: Threshold
    reasons: list[ShortText]
    counts: SeverityCounts
    new_count: int
    findings: list[AlertFinding]
    omitted: int = 0
    suppressed_count: int = 0
    expired_suppressions: int = 0
    scan_id: ScanId
    report_key: ObjectKey
    scanned_at: datetime | None = None
    created_at: datetime


MAX_ALERT_FINDINGS = 200


class NotifyFingerprint(msgspec.Struct, frozen=True, kw_only=True):
    """What the notifier last concluded for one workload running one digest (KV bucket `notify`).

    `findings` are the sorted hashes of the findings that counted; a later report alerts only when it breaches
    and either this one did not, or a finding counts that is not in this set.
    """

    v: int = 1
    breach: bool
    findings: list[FindingHash] = []
    scan_id: ScanId | None = None
    # `stored_at` of the report this was concluded from: an older report delivered late never overwrites it.
    stored_at: datetime | None = None


GROUP_TYPE = "podsweep.breach.group"


class GroupCve(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One CVE named in a grouped alert: its worst severity among the members, how many members it affects, and the
    key of its page in the bucket's static index (`index/cve/<id>.html`; empty for an id that cannot be a key)."""

    id: ShortText
    severity: Severity
    workloads: int
    page_key: ShortText = ""


class GroupMember(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One alerted workload in a grouped alert: who, which image, and the findings that made it breach (new first,
    at most `MAX_GROUP_MEMBER_CVES` ids; `more` counts the rest). `id` is the member's own alert key."""

    id: AlertKey
    namespace: K8sLabelName
    workload: Workload
    digest_ref: DigestRef
    image: ImageRef
    counts: SeverityCounts
    new_count: int = 0
    cves: list[ShortText] = []
    severities: list[Severity] = []  # the severity of each id in `cves`, in the same order
    more: int = 0
    scan_id: ScanId
    report_key: ObjectKey


MAX_GROUP_MEMBER_CVES = 10


class GroupPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The generic webhook body of a grouped alert (version 1): several workloads breached at once, more than the
    destination's rate allows to send one by one. `id` is the group's idempotency key, derived from its members'
    alert keys; every member appears in exactly one delivered group per destination."""

    v: int = 1
    type: Literal["podsweep.breach.group"] = "podsweep.breach.group"
    id: AlertKey
    cluster: ClusterName
    cves: list[GroupCve]
    members: list[GroupMember]
    created_at: datetime


class GroupRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A group decided for one destination (KV bucket `delivered`, key `<destination>.g.<id>`), written before its
    first POST so a restarted notifier resends exactly these members under the same key; `delivered` once a 2xx
    came back. A one-member group keeps no members (its outbox entry is the whole message)."""

    id: AlertKey
    cluster: ClusterName
    members: list[GroupMember] = []
    created_at: datetime
    delivered: bool = False


class GroupClaim(msgspec.Struct, frozen=True, kw_only=True):
    """Which group an alert belongs to for one destination (KV bucket `delivered`, key `<destination>.<alert id>`),
    written before the group's record and its POST: a redelivered alert with a claim is sent in that group only."""

    group: AlertKey
