"""The notifier's durable outbox: one JetStream subject per destination, one entry per alert (or report upload).

Pure: turns a Decision into entries, guards fingerprints against late older reports, and builds the audit record.
Never publishes, sends or reads the clock itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime

import msgspec

from podsweep.policy import Policy, rule_for
from schemas.alerts import AlertKey, AlertPayload, NotifyFingerprint
from schemas.events import AlertOutcome, AlertSent, ReportStored, Workload
from schemas.refs import ClusterName, DigestRef, K8sLabelName
from schemas.state import WorkloadRun
from services.notifier.decide import Decision, ReportUpload, fingerprint_key, run_cluster


class OutboxEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One message for one destination, on `<root>-outbox.<destination>`, msg id `outbox:<key>.<destination>`.

    Exactly one of `alert` (webhook, Slack, Teams: rendered for the destination's kind when sent) and `upload`
    (DefectDojo) is set. `namespace`/`workload` say who it is about (for an upload: the first workload routed to
    that destination). `reported_at` is the report's `stored_at`, for the delivery latency metric.
    """

    v: int = 1
    key: AlertKey
    destination: K8sLabelName
    cluster: ClusterName
    digest_ref: DigestRef
    namespace: K8sLabelName
    workload: Workload
    alert: AlertPayload | None = None
    upload: ReportUpload | None = None
    scan_date: date | None = None
    reported_at: datetime


def msg_id(entry: OutboxEntry) -> str:
    """The outbox dedup id: a redelivered report.stored enqueues the same alert once (within the window)."""
    return f"outbox:{entry.key}.{entry.destination}"


def entries(
    decision: Decision,
    event: ReportStored,
    runs: Sequence[WorkloadRun],
    policy: Policy,
    scan_date: date,
) -> list[OutboxEntry]:
    """Every alert times every destination it names, then every upload."""
    out = [
        OutboxEntry(
            key=alert.key,
            destination=destination,
            cluster=alert.payload.cluster,
            digest_ref=event.digest_ref,
            namespace=alert.payload.namespace,
            workload=alert.payload.workload,
            alert=alert.payload,
            reported_at=event.stored_at,
        )
        for alert in decision.alerts
        for destination in alert.destinations
    ]
    for upload in decision.uploads:
        owner = routed_workload(policy, runs, upload.destination, event.cluster)
        if owner is None:  # decide() only uploads for a routed workload; nothing to say who it is about otherwise
            continue
        cluster, namespace, workload = owner
        out.append(
            OutboxEntry(
                key=upload.key,
                destination=upload.destination,
                cluster=cluster,
                digest_ref=event.digest_ref,
                namespace=namespace,
                workload=workload,
                upload=upload,
                scan_date=scan_date,
                reported_at=event.stored_at,
            )
        )
    return out


def routed_workload(
    policy: Policy, runs: Sequence[WorkloadRun], destination: str, cluster: str = ""
) -> tuple[str, str, Workload] | None:
    """The first workload (by cluster, namespace, kind, name) whose rule sends to `destination`: its cluster
    (`cluster` for a run written before fleets), namespace and workload."""
    for run in sorted(
        runs, key=lambda r: (r.cluster or cluster, r.namespace, r.workload.kind, r.workload.name, r.image)
    ):
        group = [r for r in runs if (r.cluster, r.namespace, r.workload) == (run.cluster, run.namespace, run.workload)]
        route = next((r.options.notify for r in sorted(group, key=lambda r: r.image) if r.options.notify), None)
        if destination in rule_for(policy, run.namespace, run.workload, route).destinations:
            return run.cluster or cluster, run.namespace, run.workload
    return None


def fingerprint_keys(event: ReportStored, runs: Sequence[WorkloadRun]) -> list[str]:
    """The KV keys whose previous fingerprints `decide` needs for this report."""
    return sorted({fingerprint_key(run_cluster(event, r), event.digest_ref, r.namespace, r.workload) for r in runs})


def drop_stale(decision: Decision, previous: Mapping[str, NotifyFingerprint], event: ReportStored) -> Decision:
    """Without what a newer report already concluded: an older report that arrives late neither alerts a workload
    nor rolls its fingerprint back, and is not uploaded when any workload has seen a newer one."""

    def newer(key: str) -> bool:
        before = previous.get(key)
        return before is not None and before.stored_at is not None and before.stored_at > event.stored_at

    if not any(newer(key) for key in previous):
        return decision
    return Decision(
        alerts=[
            a
            for a in decision.alerts
            if not newer(fingerprint_key(a.payload.cluster, event.digest_ref, a.payload.namespace, a.payload.workload))
        ],
        uploads=[],
        fingerprints={k: fp for k, fp in decision.fingerprints.items() if not newer(k)},
    )


def advance(current: NotifyFingerprint | None, new: NotifyFingerprint) -> NotifyFingerprint | None:
    """The compare-and-set change for one fingerprint: written unless what is stored came from a newer report."""
    if (
        current is not None
        and current.stored_at is not None
        and new.stored_at is not None
        and current.stored_at > new.stored_at
    ):
        return None
    return None if current == new else new


def audit(entry: OutboxEntry, attempts: int, outcome: AlertOutcome, error: str, now: datetime) -> AlertSent:
    """`podsweep.alert.sent` / `alert.failed`: what went where, about whom, after how many attempts."""
    findings = [f.id for f in entry.alert.findings] if entry.alert is not None else []
    return AlertSent(
        alert_id=entry.key,
        cluster=entry.cluster,
        digest_ref=entry.digest_ref,
        namespace=entry.namespace,
        workload=entry.workload,
        destination=entry.destination,
        findings=findings,
        attempts=attempts,
        outcome=outcome,
        error=error[:4000],
        sent_at=now,
    )
