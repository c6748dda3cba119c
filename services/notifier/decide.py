"""When to alert: from one stored report and the workloads that run its digest, the alerts and uploads to send.

Pure: no NATS, no KV, no clock. The shell passes the previous fingerprints in and stores the returned ones, so a
restart or a redelivered event never alerts twice and a rescan that finds nothing new stays quiet.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import datetime

import msgspec

from podsweep.policy import (
    DefectDojoDestination,
    Policy,
    PolicyRule,
    Verdict,
    evaluate,
    finding_hash,
    fingerprint,
    rule_for,
)
from schemas.alerts import MAX_ALERT_FINDINGS, AlertFinding, AlertKey, AlertPayload, NotifyFingerprint
from schemas.events import ReportStored, Workload
from schemas.refs import DigestRef, K8sLabelName, ObjectKey, ScanId, digest_hex
from schemas.report import Finding, Report
from schemas.state import WorkloadRun
from schemas.storage import raw_key


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One message about one workload and one report, for every destination its rule names."""

    key: AlertKey
    destinations: list[K8sLabelName]
    payload: AlertPayload


class ReportUpload(msgspec.Struct, frozen=True, kw_only=True):
    """One report for one DefectDojo destination: the raw Trivy JSON, (re)imported under `test_title`."""

    key: AlertKey
    destination: K8sLabelName
    digest_ref: DigestRef
    scan_id: ScanId
    raw_key: ObjectKey
    test_title: str


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the shell does for one `report.stored`: enqueue alerts and uploads, then store `fingerprints`
    (only those that changed) under their KV keys."""

    alerts: list[Alert] = []
    uploads: list[ReportUpload] = []
    fingerprints: dict[str, NotifyFingerprint] = {}


def fingerprint_key(cluster: str, digest_ref: str, namespace: str, workload: Workload) -> str:
    """KV key of one workload running one digest: only characters NATS KV keys allow, from validated names."""
    return f"{cluster}.{digest_hex(digest_ref)}.{namespace}.{workload.kind}.{workload.name}"


def alert_key(event: ReportStored, cluster: str, namespace: str, workload: Workload) -> str:
    """One alert per workload (of its cluster) per report: the same event decided twice yields the same key."""
    return _key("alert", cluster, event.digest_ref, event.scan_id, namespace, workload.kind, workload.name)


def run_cluster(event: ReportStored, run: WorkloadRun) -> str:
    """The cluster a workload runs in: the report is the fleet's (scanned once, in one cluster), its workloads each
    their own cluster's; a run written before fleets is of the cluster that reported it."""
    return run.cluster or event.cluster


def decide(
    event: ReportStored,
    report: Report,
    runs: Sequence[WorkloadRun],
    policy: Policy,
    previous: Mapping[str, NotifyFingerprint],
    now: datetime,
) -> Decision:
    """Alert a workload only on a breach that is new for it and this digest: it did not breach before, or a finding
    now counts that did not count at the last report (new in the image, an expired suppression, a policy change).

    DefectDojo destinations get every report of a digest a routed workload runs, breach or not: DefectDojo keeps
    the history and closes fixed findings itself.
    """
    alerts: list[Alert] = []
    uploads: dict[str, tuple[DefectDojoDestination, str]] = {}
    fingerprints: dict[str, NotifyFingerprint] = {}
    for (cluster, namespace, kind, name), group in _by_workload(event, runs):
        workload = Workload(kind=kind, name=name)
        image = min(run.image for run in group)
        route = next((run.options.notify for run in group if run.options.notify), None)
        rule = rule_for(policy, namespace, workload, route)
        if not rule.ignore_unfixed and all(run.options.ignore_unfixed for run in group):
            # Every pod of the workload asked for it through podsweep.io/ignore-unfixed.
            rule = msgspec.structs.replace(rule, ignore_unfixed=True)
        alert_to: list[str] = []
        for dest_name in rule.destinations:
            dest = policy.destination(dest_name)
            if isinstance(dest, DefectDojoDestination):
                title = image_without_digest(image)
                if dest_name not in uploads or title < uploads[dest_name][1]:
                    uploads[dest_name] = (dest, title)
            else:
                alert_to.append(dest_name)
        key = fingerprint_key(cluster, event.digest_ref, namespace, workload)
        before = previous.get(key)
        if before is not None and before.scan_id == event.scan_id:
            continue  # this report was decided already (a redelivery after the fingerprint was stored)
        verdict = evaluate(rule, policy.suppressions, report, namespace, event.digest_ref, now)
        after = fingerprint(verdict, event.scan_id)
        if before is None or (before.breach, before.findings) != (after.breach, after.findings):
            fingerprints[key] = after
        if not verdict.breach or not alert_to:
            continue
        known = set(before.findings) if before is not None else set()
        new = [f for f in verdict.counted if finding_hash(f) not in known]
        if before is not None and before.breach and not new:
            continue  # still in breach, nothing new: stay quiet on rescans
        payload = build_payload(event, report, verdict, rule, cluster, namespace, workload, image, route, new, now)
        alerts.append(Alert(key=payload.id, destinations=alert_to, payload=payload))
    return Decision(
        alerts=alerts,
        uploads=[
            ReportUpload(
                key=_key("defectdojo", name, event.digest_ref, event.scan_id),
                destination=name,
                digest_ref=event.digest_ref,
                scan_id=event.scan_id,
                raw_key=raw_key(event.digest_ref, event.scan_id),
                test_title=title,
            )
            for name, (_, title) in sorted(uploads.items())
        ],
        fingerprints=fingerprints,
    )


def build_payload(
    event: ReportStored,
    report: Report,
    verdict: Verdict,
    rule: PolicyRule,
    cluster: str,
    namespace: str,
    workload: Workload,
    image: str,
    route: str | None,
    new: Sequence[Finding],
    now: datetime,
) -> AlertPayload:
    """The webhook payload: new findings first, then the others that count, each group worst first."""
    new_hashes = {finding_hash(f) for f in new}
    expired = {finding_hash(s.finding): s.suppression for s in verdict.expired}
    ordered = list(new) + [f for f in verdict.counted if finding_hash(f) not in new_hashes]
    shown = [
        AlertFinding(
            id=_short(f.id),
            package=_short(f.package),
            installed_version=_short(f.installed_version),
            fixed_version=_short(f.fixed_version),
            severity=f.severity,
            cvss=f.cvss,
            title=_short(f.title),
            url=f.url if _SAFE_URL_RE.match(f.url) else "",
            target=_short(f.pkg_path or f.target),
            new=finding_hash(f) in new_hashes,
            expired_suppression=expired.get(finding_hash(f)),
        )
        for f in ordered[:MAX_ALERT_FINDINGS]
    ]
    return AlertPayload(
        id=alert_key(event, cluster, namespace, workload),
        cluster=cluster,
        digest_ref=event.digest_ref,
        image=image,
        namespace=namespace,
        workload=workload,
        route=route,
        rule=_short(rule.name),
        threshold=rule.threshold,
        reasons=verdict.reasons,
        counts=verdict.counts,
        new_count=len(new),
        findings=shown,
        omitted=max(0, len(ordered) - MAX_ALERT_FINDINGS),
        suppressed_count=len(verdict.suppressed),
        expired_suppressions=len(verdict.expired),
        scan_id=event.scan_id,
        report_key=event.report_key,
        scanned_at=report.scanned_at,
        created_at=now,
    )


def image_without_digest(image: str) -> str:
    """`repo:tag@sha256:…` → `repo:tag`; `repo@sha256:…` → `repo` (DefectDojo's test title, stable across builds)."""
    return image.split("@", 1)[0]


def _by_workload(
    event: ReportStored, runs: Sequence[WorkloadRun]
) -> list[tuple[tuple[str, str, str, str], list[WorkloadRun]]]:
    groups: dict[tuple[str, str, str, str], list[WorkloadRun]] = {}
    for run in runs:
        key = (run_cluster(event, run), run.namespace, run.workload.kind, run.workload.name)
        groups.setdefault(key, []).append(run)
    return sorted((k, sorted(v, key=lambda r: (r.image, r.options.notify or ""))) for k, v in groups.items())


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_SAFE_URL_RE = re.compile(r"^https?://[^\s\x00-\x1f\x7f<>|]{1,248}$")


def _short(text: str) -> str:
    """Scanner text as a ShortText: control characters become spaces, at most 256 characters."""
    cleaned = _CONTROL_RE.sub(" ", text)
    return cleaned if len(cleaned) <= 256 else cleaned[:255] + "…"
