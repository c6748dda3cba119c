"""Events on the PODSWEEP stream: the contract between services and with subscribers outside podsweep.

Every event carries `v` (its version). Consumers ignore unknown fields; a removed field's name is never reused.
Fields that later reach a Job spec or an object key are validated by their types (see schemas.refs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.refs import (
    ClusterName,
    DigestRef,
    ImageRef,
    K8sLabelName,
    K8sName,
    KindName,
    NodeName,
    ObjectKey,
    RouteName,
    ScanId,
    ShortText,
    Text,
)

Severity = Literal["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]
SEVERITIES: tuple[Severity, ...] = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
ContainerKind = Literal["init", "app", "ephemeral"]
ScanMode = Literal["node", "sbom"]
FailureReason = Literal[
    "ErrImageNeverPull",  # the image is not on the node any more
    "DeadlineExceeded",  # activeDeadlineSeconds passed
    "OOMKilled",
    "NodeGone",  # the node was deleted or became unreachable
    "Evicted",
    "UploadFailed",  # the uploader could not PUT the report
    "ScanError",  # trivy exited non-zero
    "BatchAborted",  # another item of the same SBOM rescan batch failed first; this one's result was not uploaded
    # The API server refused to create the scan pod (its FailedCreate event: a missing ServiceAccount, a
    # ResourceQuota, a LimitRange, a Pod Security level, an admission webhook); the message is the API server's own.
    # A property of the scan namespace, not of the node: every node fails the same way.
    "PodCreateRejected",
    "Unknown",
]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every event. `v` is bumped when a field changes meaning."""

    v: int = 1


class Workload(msgspec.Struct, frozen=True):
    """The top-level owner of a pod (Deployment, StatefulSet, CronJob, a custom kind, or the Pod itself)."""

    kind: KindName
    name: K8sName


class ImageOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Options a workload chose through podsweep.io/* pod annotations, already validated by the watcher."""

    ignore_unfixed: bool = False
    notify: RouteName | None = None


class ImageSeen(Event, frozen=True, kw_only=True):
    """A container started running an image digest on a node (or the watcher's periodic resync saw it again)."""

    cluster: ClusterName
    digest_ref: DigestRef
    image: ImageRef
    node: NodeName
    namespace: K8sLabelName
    pod: K8sName
    container: K8sLabelName
    container_kind: ContainerKind
    workload: Workload
    options: ImageOptions = ImageOptions()
    observed_at: datetime
    resync: bool = False


class ImageGone(Event, frozen=True, kw_only=True):
    """The last container running a digest on a node stopped."""

    cluster: ClusterName
    digest_ref: DigestRef
    node: NodeName
    observed_at: datetime


class ScanLifecycle(Event, frozen=True, kw_only=True):
    """What every scan lifecycle event (scan.started, scan.completed, scan.failed) says: which scan, of which
    digest, in which Job, on which node. Not published itself."""

    cluster: ClusterName
    scan_id: ScanId
    digest_ref: DigestRef
    mode: ScanMode = "node"
    node: NodeName | None = None
    job: K8sName


class ScanStarted(ScanLifecycle, frozen=True, kw_only=True):
    started_at: datetime


class ScanCompleted(ScanLifecycle, frozen=True, kw_only=True):
    raw_key: ObjectKey
    sbom_key: ObjectKey | None = None
    started_at: datetime | None = None  # the Job's start (absent from watchers before this field)
    finished_at: datetime


class ScanFailed(ScanLifecycle, frozen=True, kw_only=True):
    reason: FailureReason
    message: Text = ""
    failed_at: datetime


class SeverityCounts(msgspec.Struct, frozen=True):
    CRITICAL: int = 0
    HIGH: int = 0
    MEDIUM: int = 0
    LOW: int = 0
    UNKNOWN: int = 0

    def total(self) -> int:
        return self.CRITICAL + self.HIGH + self.MEDIUM + self.LOW + self.UNKNOWN


class FindingRef(msgspec.Struct, frozen=True):
    """Enough of a finding to name it in a diff or an alert: the full finding lives in the stored report."""

    id: ShortText
    package: ShortText
    installed_version: ShortText
    severity: Severity
    fixed_version: ShortText = ""


class ReportStored(Event, frozen=True, kw_only=True):
    """The parser stored a normalized report; `new` and `fixed` are relative to the previous report."""

    cluster: ClusterName
    scan_id: ScanId
    digest_ref: DigestRef
    mode: ScanMode = "node"
    report_key: ObjectKey
    history_key: ObjectKey
    counts: SeverityCounts
    fixable: SeverityCounts
    new: list[FindingRef] = []
    fixed: list[FindingRef] = []
    first_report: bool = False
    stored_at: datetime
    # Set when no node ran the digest any more at the time of this scan (an SBOM rescan of a scaled-to-zero image).
    not_running_since: datetime | None = None
    # The SBOM this scan uploaded, as the parser validated and kept it (history key), and the Trivy version that made
    # it: the dispatcher records them in the digest's scan state (the next rescans read it). None: no usable SBOM.
    sbom_key: ObjectKey | None = None
    sbom_trivy_version: ShortText | None = None


class ReportReached(ReportStored, frozen=True, kw_only=True):
    """A stored report now reaches a workload that was not known to run its digest when it was stored: another
    cluster of the fleet runs the digest (scanned once, in `cluster`), or a workload started running it later.

    The fields are those of the report's summary (`new` and `fixed` are empty); the notifier decides it like a
    report.stored, for every workload of the digest, and alerts those its fingerprints say have not had it."""

    reached_cluster: ClusterName  # the cluster of the workload it reached
    reached_namespace: K8sLabelName
    reached_workload: Workload
    reached_at: datetime


QuarantineKind = Literal[
    "oversized",  # over the configured cap (before or after gunzip), or JSON nested too deep to decode
    "not-json",
    "truncated",
    "wrong-type",  # JSON, but a field has the wrong type
    "not-trivy",  # JSON, but not a Trivy artifact report
    "unsupported",  # a Trivy SchemaVersion podsweep does not read
    "bad-gzip",
    "missing",  # no object under the key the scan was to upload to
    "not-cyclonedx",  # an SBOM upload that is not CycloneDX JSON
]
QuarantinedObject = Literal["report", "sbom"]


class ReportQuarantined(Event, frozen=True, kw_only=True):
    """The parser could not use an upload: its bytes are under `quarantine_key`, the reason under `error_key`.

    `quarantine_key` is None when there was nothing to keep (the upload is missing). For an SBOM the digest then
    has no usable SBOM from this scan; the report of the same scan is stored (or quarantined) on its own.
    """

    cluster: ClusterName
    scan_id: ScanId
    digest_ref: DigestRef
    mode: ScanMode = "node"
    object: QuarantinedObject
    kind: QuarantineKind
    reason: Text
    source_key: ObjectKey
    quarantine_key: ObjectKey | None = None
    error_key: ObjectKey
    quarantined_at: datetime


AlertOutcome = Literal["delivered", "failed"]


class AlertSent(Event, frozen=True, kw_only=True):
    """Audit of one alert: what was sent, to which destination, about which workload and digest."""

    alert_id: ShortText
    cluster: ClusterName
    digest_ref: DigestRef
    namespace: K8sLabelName
    workload: Workload
    destination: K8sLabelName
    findings: list[ShortText]
    attempts: int
    outcome: AlertOutcome = "delivered"
    error: Text = ""
    sent_at: datetime
    group: ShortText | None = None  # the grouped message that carried it (its idempotency key), if any


class DeadLetter(Event, frozen=True, kw_only=True):
    """A message a service could never process, kept whole with the reason, on <root>.dead.<service>."""

    service: ShortText
    subject: ShortText
    stream_seq: int
    deliveries: int
    error: Text
    payload: bytes
    failed_at: datetime


class RescanRequested(Event, frozen=True, kw_only=True):
    """Asks the dispatcher to make digests due now. An event on the stream (so it survives a dispatcher restart),
    answered by `rescan.accepted` with the same request_id. The dispatcher still applies its limits; this only moves
    the due time. Sent by `podsweep rescan` (for example from a CronJob after the Trivy DB updated) and by the admission
    gate for a digest it has no report for."""

    cluster: ClusterName
    request_id: ScanId
    digests: list[DigestRef] = []
    namespace: K8sLabelName | None = None  # every digest seen running in this namespace
    all: bool = False  # every digest the dispatcher knows
    requested_by: ShortText  # "cli", "admission", or a user-supplied name
    reason: Text = ""
    requested_at: datetime


class DbUpdated(Event, frozen=True, kw_only=True):
    """The Trivy server's vulnerability DB changed to a newer one: every digest with a usable SBOM is rescanned from it.
    Published by the leading dispatcher, which polls the server's `/version`; its message id is derived from the new
    DB's `updated_at`, so a second replica or a restart noticing the same DB publishes it once."""

    cluster: ClusterName
    previous_updated_at: datetime | None = None  # the DB seen before (None: none recorded)
    previous_schema_version: int | None = None
    updated_at: datetime  # the DB's own UpdatedAt, as the server reports it
    schema_version: int  # the DB's schema version ("VulnerabilityDB.Version")
    trivy_version: ShortText = ""  # the server's Trivy version
    detected_at: datetime


class RescanAccepted(Event, frozen=True, kw_only=True):
    """The dispatcher's answer to a RescanRequested: how many digests it made due, and which it has never seen."""

    cluster: ClusterName
    request_id: ScanId
    due: int
    unknown: list[DigestRef] = []
