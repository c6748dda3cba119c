"""What the parser records for one scan: the report.stored event (naming the SBOM kept), the digest's summary, quarantine
records; and report.reached when a workload starts running a digest whose report is stored.

Pure: no I/O and no clock (instants are arguments). main.py decides nothing that is not decided here.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

import msgspec

from podsweep.reports import normalize
from schemas import storage
from schemas.events import (
    SEVERITIES,
    ImageSeen,
    QuarantinedObject,
    QuarantineKind,
    ReportQuarantined,
    ReportReached,
    ReportStored,
    ScanCompleted,
)
from schemas.index import MAX_SEARCH_IDS, DigestSummary, PackageVersion
from schemas.report import Report

Step = Literal["store", "done", "stale"]


def step_for(summary: DigestSummary | None, event: ScanCompleted) -> Step:
    """`done`: this scan is already stored (a redelivery: re-publish its event only). `stale`: a newer scan of the
    digest is already stored (keep this one in history only). `store`: store it as the digest's latest."""
    if summary is None:
        return "store"
    if summary.scan_id == event.scan_id:
        return "done"
    return "stale" if summary.finished_at > event.finished_at else "store"


def stored_msg_id(scan_id: str) -> str:
    return f"report.stored:{scan_id}"


def quarantined_msg_id(scan_id: str, what: QuarantinedObject) -> str:
    return f"report.quarantined:{what}:{scan_id}"


class KeptSbom(msgspec.Struct, frozen=True):
    """The scan's SBOM as the parser kept it: its history key and the Trivy version that made it."""

    key: str
    trivy_version: str | None
    packages: list[PackageVersion] = []  # its library components


def report_stored(
    event: ScanCompleted, report: Report, previous: Report | None, stored_at: datetime, sbom: KeptSbom | None = None
) -> ReportStored:
    """The event; it names the SBOM kept (the dispatcher records it in the digest's scan state, which only it writes)."""
    new, fixed = normalize.diff(previous, report)
    return ReportStored(
        cluster=event.cluster,
        scan_id=event.scan_id,
        digest_ref=event.digest_ref,
        mode=event.mode,
        report_key=storage.latest_report_key(event.digest_ref),
        history_key=storage.history_report_key(event.digest_ref, event.finished_at),
        counts=report.counts,
        fixable=report.fixable,
        new=new,
        fixed=fixed,
        first_report=previous is None,
        stored_at=stored_at,
        not_running_since=report.not_running_since,
        sbom_key=sbom.key if sbom is not None else None,
        sbom_trivy_version=sbom.trivy_version if sbom is not None else None,
    )


def digest_summary(event: ScanCompleted, report: Report, stored: ReportStored, sbom_key: str | None) -> DigestSummary:
    return DigestSummary(
        digest_ref=event.digest_ref,
        scan_id=event.scan_id,
        mode=event.mode,
        finished_at=event.finished_at,
        stored_at=stored.stored_at,
        scanned_at=report.scanned_at,
        artifact=report.artifact,
        os=normalize.short_text(f"{report.os_family} {report.os_name}".strip()),
        eosl=report.eosl,
        trivy_version=report.trivy_version,
        counts=report.counts,
        fixable=report.fixable,
        misconfigurations=len(report.misconfigurations),
        secrets=len(report.secrets),
        report_key=stored.report_key,
        history_key=stored.history_key,
        sbom_key=sbom_key,
        vulnerability_ids=vulnerability_ids(report),
        cluster=event.cluster,
    )


def vulnerability_ids(report: Report, limit: int = MAX_SEARCH_IDS) -> list[str]:
    """Each vulnerability id of the report once, worst severity first (then by id), at most `limit`: a report
    past the limit is still found by its worst ones."""
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    worst: dict[str, int] = {}
    for finding in report.findings:
        r = rank[finding.severity]
        if finding.id and r < worst.get(finding.id, len(rank)):
            worst[finding.id] = r
    return sorted(worst, key=lambda id_: (worst[id_], id_))[:limit]


def report_reached(summary: DigestSummary, seen: ImageSeen, now: datetime) -> ReportReached:
    """The digest's latest report, from its summary, for a workload that started running it after it was stored."""
    return ReportReached(
        cluster=summary.cluster or seen.cluster,
        scan_id=summary.scan_id,
        digest_ref=summary.digest_ref,
        mode=summary.mode,
        report_key=summary.report_key,
        history_key=summary.history_key,
        counts=summary.counts,
        fixable=summary.fixable,
        stored_at=summary.stored_at,
        sbom_key=summary.sbom_key,
        reached_cluster=seen.cluster,
        reached_namespace=seen.namespace,
        reached_workload=seen.workload,
        reached_at=now,
    )


def reached_msg_id(reached: ReportReached) -> str:
    """One report.reached per report and workload (a redelivered sighting publishes the same id)."""
    who = f"{reached.reached_cluster}/{reached.reached_namespace}/{reached.reached_workload.kind}/"
    who += reached.reached_workload.name
    return f"reached:{reached.scan_id}:{hashlib.sha256(who.encode()).hexdigest()[:24]}"


def newer_summary(current: DigestSummary | None, candidate: DigestSummary) -> DigestSummary | None:
    """The KV change for a digest's summary: write `candidate` unless it equals, or is older than, what is there."""
    if current is None:
        return candidate
    if current == candidate or current.finished_at > candidate.finished_at:
        return None
    return candidate


def quarantined(
    event: ScanCompleted,
    *,
    what: QuarantinedObject,
    kind: QuarantineKind,
    reason: str,
    kept: bool,
    at: datetime,
) -> ReportQuarantined:
    """The failure event; `kept` says whether the upload's bytes were copied to quarantine (not when missing)."""
    if what == "report":
        source, copy, error = event.raw_key, storage.quarantine_key(event.scan_id), storage.quarantine_error_key
    else:
        source = event.sbom_key or storage.sbom_key(event.digest_ref, event.scan_id)
        copy, error = storage.quarantine_sbom_key(event.scan_id), storage.quarantine_sbom_error_key
    return ReportQuarantined(
        cluster=event.cluster,
        scan_id=event.scan_id,
        digest_ref=event.digest_ref,
        mode=event.mode,
        object=what,
        kind=kind,
        reason=normalize.text(reason),
        source_key=source,
        quarantine_key=copy if kept else None,
        error_key=error(event.scan_id),
        quarantined_at=at,
    )


def error_text(q: ReportQuarantined) -> str:
    """The .error.txt beside a quarantined upload: enough for a person to act without the event."""
    lines = [
        f"{q.object} of scan {q.scan_id} for {q.digest_ref} was quarantined",
        f"kind: {q.kind}",
        f"reason: {q.reason}",
        f"uploaded to: {q.source_key}",
        f"copied to: {q.quarantine_key or '(nothing to copy: no object was uploaded)'}",
        f"quarantined at: {q.quarantined_at.isoformat()}",
    ]
    return "\n".join(lines) + "\n"
