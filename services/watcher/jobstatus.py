"""What a podsweep scan Job's state means: started, completed or failed (with a FailureReason), as events.

A node scan Job runs one scan; an SBOM rescan Job runs a batch: one failing item fails the Job (see
services/dispatcher/jobspec.py), and each item gets its own event. The item the `rescan` container's termination
message names (schemas.jobs.failed_rescan_item) gets that failure; the others get BatchAborted (their reports were
never uploaded, their SBOMs are not at fault).

A Job whose pod the API server refused to create (its FailedCreate event: a missing ServiceAccount, a quota, a Pod
Security level) has no pod at all and never gets one: it fails as PodCreateRejected with the API server's message.

Pure: the shell passes the Job, the pods it last saw for it, whether its node still exists (None: not known) and the
last FailedCreate message of this Job. Never trusts the
Job's labels or annotations without validating them: a Job in podsweep's namespace could have been made by anyone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal, TypedDict

import msgspec

from schemas import jobs, storage
from schemas.events import FailureReason, ScanCompleted, ScanFailed, ScanMode, ScanStarted
from schemas.refs import DigestRef, K8sName, NodeName, ObjectKey, ScanId
from services.watcher.kubeobjects import ContainerStatus, Job, ScanPod

Phase = Literal["pending", "started", "completed", "failed"]
_RANK: dict[Phase, int] = {"pending": 0, "started": 1, "completed": 2, "failed": 2}
_MAX_MESSAGE = 1024
PODLESS = "the Job made no pod and no FailedCreate event of it was seen (may the watcher read events there?)"
_MAX_BATCH = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# Pod DisruptionTarget condition reasons (Kubernetes >= 1.26) and pod status reasons, by what they mean for a scan.
_EVICTED = frozenset({"EvictionByEvictionAPI", "TerminationByKubelet", "PreemptionByScheduler", "Evicted"})
_NODE_GONE = frozenset({"DeletionByPodGC", "DeletionByTaintManager", "NodeLost"})


class ScanJob(msgspec.Struct, frozen=True, kw_only=True):
    """The identity of a scan, read from a Job's labels and annotations (schemas/jobs.py) and validated."""

    scan_id: ScanId
    digest_ref: DigestRef
    mode: ScanMode = "node"
    node: NodeName | None = None
    job: K8sName
    raw_key: ObjectKey
    sbom_key: ObjectKey | None = None
    item: int | None = None  # the position in an SBOM rescan batch (its container is `rescan-<item>`)


class NotAScanJob(msgspec.Struct, frozen=True):
    """A Job the watcher ignores; the reason names the label or annotation, never echoes its value."""

    reason: str


class Outcome(msgspec.Struct, frozen=True):
    phase: Phase
    reason: FailureReason | None = None
    message: str = ""
    at: datetime | None = None
    started_at: datetime | None = None  # the Job's startTime, so a completed scan's duration is known
    # For a failed SBOM rescan batch: the items whose own `rescan-<n>` container failed.
    failed_items: tuple[int, ...] = ()


class _BatchItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scan_id: ScanId
    digest_ref: DigestRef
    raw_key: ObjectKey


# Both ends are podsweep's (services/dispatcher/jobspec.py writes it): unknown fields are refused.
_batch = msgspec.json.Decoder(Annotated[list[_BatchItem], msgspec.Meta(min_length=1, max_length=_MAX_BATCH)])


def scan_jobs(job: Job) -> tuple[ScanJob, ...] | NotAScanJob:
    """The scans a Job runs: one for a node scan, one per item of an SBOM rescan batch (mode "sbom")."""
    meta = job.metadata
    if meta.labels.get(jobs.MANAGED_BY_LABEL) != jobs.MANAGED_BY_VALUE:
        return NotAScanJob(f"label {jobs.MANAGED_BY_LABEL} is not {jobs.MANAGED_BY_VALUE}")
    annotations = meta.annotations
    if annotations.get(jobs.MODE_ANNOTATION) == "sbom":
        return _batch_scans(job)
    fields: dict[str, str | None] = {
        "scan_id": meta.labels.get(jobs.SCAN_ID_LABEL),
        "digest_ref": annotations.get(jobs.DIGEST_REF_ANNOTATION),
        "mode": annotations.get(jobs.MODE_ANNOTATION, "node"),
        "node": annotations.get(jobs.NODE_ANNOTATION) or None,
        "job": meta.name,
        "raw_key": annotations.get(jobs.RAW_KEY_ANNOTATION),
        "sbom_key": annotations.get(jobs.SBOM_KEY_ANNOTATION) or None,
    }
    try:
        scan = msgspec.convert(fields, ScanJob)
    except msgspec.ValidationError as exc:
        return NotAScanJob(f"invalid scan Job metadata at {_where(exc)} (label {jobs.SCAN_ID_LABEL}, annotations)")
    if scan.node is None:
        return NotAScanJob(f"a node scan Job has no {jobs.NODE_ANNOTATION} annotation")
    problem = _key_problem(scan)
    return NotAScanJob(problem) if problem else (scan,)


def _batch_scans(job: Job) -> tuple[ScanJob, ...] | NotAScanJob:
    meta = job.metadata
    batch = meta.annotations.get(jobs.BATCH_ANNOTATION, "")
    try:
        msgspec.convert(meta.labels.get(jobs.SCAN_ID_LABEL), ScanId)
        msgspec.convert(meta.name, K8sName)
        items = _batch.decode(batch)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        return NotAScanJob(f"invalid SBOM rescan Job metadata at {_where(exc)} (annotation {jobs.BATCH_ANNOTATION})")
    scans = tuple(
        ScanJob(scan_id=i.scan_id, digest_ref=i.digest_ref, mode="sbom", job=meta.name, raw_key=i.raw_key, item=n)
        for n, i in enumerate(items)
    )
    for scan in scans:
        problem = _key_problem(scan)
        if problem:
            return NotAScanJob(problem)
    return scans


def _key_problem(scan: ScanJob) -> str:
    if scan.raw_key != storage.raw_key(scan.digest_ref, scan.scan_id):
        return f"raw key of scan {scan.scan_id} is not the key derived from its digest and scan id"
    if scan.sbom_key is not None and scan.sbom_key != storage.sbom_key(scan.digest_ref, scan.scan_id):
        return f"annotation {jobs.SBOM_KEY_ANNOTATION} is not the key derived from digest and scan id"
    return ""


def _where(exc: msgspec.DecodeError) -> str:
    # msgspec ends a validation message with the field ("- at `$.digest_ref`"); the rest may be a long regex.
    text = str(exc)
    return (text.rpartition(" - at ")[2] if " - at " in text else "the JSON")[:80]


def outcome(
    job: Job,
    pods: Sequence[ScanPod] = (),
    node_exists: bool | None = None,
    create_failure: str | None = None,
    podless_since: datetime | None = None,
) -> Outcome:
    """Where the scan is. A failure visible in a pod (ErrImageNeverPull never fails a pod by itself) counts at once.

    `node_exists` is False only on evidence that the node is gone (the shell saw it deleted, or asked); `None`
    when that is not known, which never fails a scan. `create_failure` is the message of the Job's last FailedCreate
    event: with no pod of the Job in sight, the scan fails with it. `podless_since`: the shell's instant before which
    a Job that started and still has no pod (and no FailedCreate seen: events expire, or may not be readable) fails
    the same way, without the API server's words."""
    if create_failure is None and podless_since is not None:
        started = job.status.start_time
        if started is not None and started <= podless_since and not pods:
            create_failure = PODLESS
    found = _job_outcome(job, pods, node_exists, create_failure)
    if found.phase == "failed" and job.metadata.annotations.get(jobs.MODE_ANNOTATION) == "sbom":
        return msgspec.structs.replace(found, failed_items=_failed_items(pods))
    return found


_RESCAN_CONTAINER = re.compile(r"^rescan-([0-9]{1,4})$")


def _failed_items(pods: Sequence[ScanPod]) -> tuple[int, ...]:
    """The batch items at fault: the one the `rescan` container's last item line names when it exited non-zero or
    was OOM-killed (its termination message is its log's tail), or, in Jobs made before one container ran every
    item, those whose own `rescan-<n>` init container did."""
    failed: set[int] = set()
    for pod in pods:
        for cs in pod.status.init_container_statuses + pod.status.container_statuses:
            terminated = cs.state.terminated
            if terminated is None or (terminated.exit_code == 0 and terminated.reason != "OOMKilled"):
                continue
            if cs.name == jobs.RESCAN_CONTAINER:
                item = jobs.failed_rescan_item(terminated.message, _MAX_BATCH)
                if item is not None:
                    failed.add(item)
            elif match := _RESCAN_CONTAINER.match(cs.name):
                failed.add(int(match[1]))
    return tuple(sorted(failed))


def _job_outcome(job: Job, pods: Sequence[ScanPod], node_exists: bool | None, create_failure: str | None) -> Outcome:
    status = job.status
    for condition in status.conditions:
        if condition.status == "True" and condition.type in ("Complete", "SuccessCriteriaMet"):
            at = status.completion_time or condition.last_transition_time
            return Outcome("completed", at=at, started_at=status.start_time)

    failed_condition = next(
        (c for c in status.conditions if c.status == "True" and c.type in ("Failed", "FailureTarget")), None
    )
    if create_failure is not None and not pods and status.active == 0 and status.succeeded == 0:
        # No pod was ever made: whatever else the Job says (a deadline passed meanwhile), this is why.
        at = failed_condition.last_transition_time if failed_condition else None
        return Outcome("failed", "PodCreateRejected", _clean(create_failure), at)
    from_pods = _failure_from_pods(pods)
    if from_pods is None and node_exists is False:
        from_pods = ("NodeGone", "the scan's node no longer exists")
    failed_at = failed_condition.last_transition_time if failed_condition else None

    if from_pods is not None and from_pods[0] in ("ErrImageNeverPull", "OOMKilled", "Evicted", "NodeGone"):
        return Outcome("failed", from_pods[0], _clean(from_pods[1]), failed_at)
    if failed_condition is not None and failed_condition.reason == "DeadlineExceeded":
        return Outcome("failed", "DeadlineExceeded", _clean(failed_condition.message), failed_at)
    if from_pods is not None and (failed_condition is not None or any(p.status.phase == "Failed" for p in pods)):
        return Outcome("failed", from_pods[0], _clean(from_pods[1]), failed_at)
    if failed_condition is not None:
        return Outcome("failed", "Unknown", _clean(f"{failed_condition.reason}: {failed_condition.message}"), failed_at)
    if any(p.status.phase == "Failed" for p in pods):
        return Outcome("failed", "Unknown", _clean(next(p.status.message for p in pods if p.status.phase == "Failed")))
    # The Job controller sets startTime before it tries to make the pod: a scan has started once a pod exists.
    if status.active > 0 or pods or status.succeeded > 0 or status.failed > 0:
        return Outcome("started", at=status.start_time)
    return Outcome("pending")


def _failure_from_pods(pods: Sequence[ScanPod]) -> tuple[FailureReason, str] | None:
    """The most telling failure among the Job's pods, most specific first."""
    found: dict[FailureReason, str] = {}
    for pod in pods:
        status = pod.status
        for kind, cs in _statuses(pod):
            state = cs.state
            if state.waiting is not None and state.waiting.reason == "ErrImageNeverPull":
                found.setdefault(
                    "ErrImageNeverPull", state.waiting.message or f"container {cs.name}: image not on node"
                )
            terminated = state.terminated
            if terminated is not None:
                if terminated.reason == "OOMKilled":
                    found.setdefault("OOMKilled", f"container {cs.name} was OOM-killed")
                elif terminated.exit_code != 0:
                    # The batch container scans (and transfers): its failure is a scan's, like an init container's.
                    scans = kind == "init" or cs.name == jobs.RESCAN_CONTAINER
                    reason: FailureReason = "ScanError" if scans else "UploadFailed"
                    found.setdefault(reason, f"container {cs.name} exited {terminated.exit_code}: {terminated.message}")
        disruption = next((c for c in status.conditions if c.type == "DisruptionTarget" and c.status == "True"), None)
        pod_reasons = {status.reason, disruption.reason if disruption else ""}
        if pod_reasons & _EVICTED:
            found.setdefault("Evicted", status.message or (disruption.message if disruption else "evicted"))
        if pod_reasons & _NODE_GONE:
            found.setdefault("NodeGone", (disruption.message if disruption else "") or status.message or "node gone")
    for reason in ("ErrImageNeverPull", "OOMKilled", "Evicted", "NodeGone", "ScanError", "UploadFailed"):
        if reason in found:
            return reason, found[reason]
    return None


def _statuses(pod: ScanPod) -> list[tuple[str, ContainerStatus]]:
    return [("init", cs) for cs in pod.status.init_container_statuses] + [
        ("app", cs) for cs in pod.status.container_statuses
    ]


def _clean(message: str) -> str:
    """Kubelet messages can quote user text: no control characters, bounded."""
    return _CONTROL.sub(" ", message)[:_MAX_MESSAGE]


ScanEvent = ScanStarted | ScanCompleted | ScanFailed


def transition(last: Phase | None, current: Outcome) -> bool:
    """Whether `current` is news after the phase last published for this Job (a Job first seen done skips started)."""
    return _RANK[current.phase] > _RANK[last or "pending"]


def scan_event(scan: ScanJob, current: Outcome, cluster: str, now: datetime) -> ScanEvent | None:
    """The event for an outcome (None while pending). Times come from the Job when it has them, else `now`."""
    at = current.at or now
    which = _ScanFields(
        cluster=cluster, scan_id=scan.scan_id, digest_ref=scan.digest_ref, mode=scan.mode, node=scan.node, job=scan.job
    )
    if current.phase == "started":
        return ScanStarted(**which, started_at=at)
    if current.phase == "completed":
        return ScanCompleted(
            **which, raw_key=scan.raw_key, sbom_key=scan.sbom_key, started_at=current.started_at, finished_at=at
        )
    if current.phase == "failed":
        reason, message = _item_failure(scan, current)
        return ScanFailed(**which, reason=reason, message=message, failed_at=at)
    return None


class _ScanFields(TypedDict):
    """The fields of schemas.events.ScanLifecycle, which every scan event carries."""

    cluster: str
    scan_id: ScanId
    digest_ref: DigestRef
    mode: ScanMode
    node: NodeName | None
    job: K8sName


def _item_failure(scan: ScanJob, current: Outcome) -> tuple[FailureReason, str]:
    """A batch item's own failure, or BatchAborted when another item (or the batch's download/upload) failed."""
    reason: FailureReason = current.reason or "Unknown"
    if scan.item is None or scan.item in current.failed_items:
        return reason, current.message
    if current.failed_items or reason in ("ScanError", "UploadFailed"):
        others = ", ".join(str(n) for n in current.failed_items) or "none"
        text = f"SBOM rescan batch {scan.job} failed (failed items: {others}); this item was not uploaded: "
        return "BatchAborted", _clean(text + current.message)
    return reason, current.message


def message_id(event: ScanEvent) -> str:
    """One message per scan and phase: a restarted watcher re-publishing it inside the duplicate window is dropped."""
    phase = {ScanStarted: "started", ScanCompleted: "completed", ScanFailed: "failed"}[type(event)]
    return f"scan-{event.scan_id}-{phase}"
