"""A podsweep scan Job's state → scan.started / completed / failed with a reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from schemas import jobs, storage
from schemas.events import ScanCompleted, ScanFailed, ScanStarted
from services.watcher import jobstatus, kubeobjects
from services.watcher.jobstatus import NotAScanJob, Outcome, ScanJob

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
STARTED = datetime(2026, 11, 23, 8, 50, tzinfo=UTC)
FINISHED = datetime(2026, 11, 23, 8, 55, tzinfo=UTC)
REF = "ghcr.io/org/app@sha256:" + "a" * 64
SCAN_ID = "s-0123456789abcdef"


def job_raw(
    *,
    conditions: list[dict[str, Any]] | None = None,
    active: int = 0,
    start_time: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": conditions or [], "active": active}
    if start_time:
        status["startTime"] = STARTED.isoformat()
    if any(c["type"] == "Complete" for c in conditions or []):
        status["completionTime"] = FINISHED.isoformat()
    return {
        "metadata": {
            "name": "podsweep-scan-0123456789",
            "namespace": "podsweep",
            "uid": "job-uid",
            "labels": {jobs.MANAGED_BY_LABEL: jobs.MANAGED_BY_VALUE, jobs.SCAN_ID_LABEL: SCAN_ID}
            if labels is None
            else labels,
            "annotations": {
                jobs.DIGEST_REF_ANNOTATION: REF,
                jobs.RAW_KEY_ANNOTATION: storage.raw_key(REF, SCAN_ID),
                jobs.SBOM_KEY_ANNOTATION: storage.sbom_key(REF, SCAN_ID),
                jobs.MODE_ANNOTATION: "node",
                jobs.NODE_ANNOTATION: "node-1",
            }
            if annotations is None
            else annotations,
        },
        "status": status,
    }


def job(**kwargs: Any) -> kubeobjects.Job:
    return msgspec.json.decode(msgspec.json.encode(job_raw(**kwargs)), type=kubeobjects.Job)


def cond(type_: str, reason: str = "", message: str = "", status: str = "True") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": FINISHED.isoformat(),
    }


def scan_pod(
    *,
    phase: str = "Running",
    init: list[dict[str, Any]] | None = None,
    app: list[dict[str, Any]] | None = None,
    reason: str = "",
    message: str = "",
    conditions: list[dict[str, Any]] | None = None,
) -> kubeobjects.ScanPod:
    raw = {
        "metadata": {"name": "podsweep-scan-0123456789-x", "labels": {"job-name": "podsweep-scan-0123456789"}},
        "spec": {"nodeName": "node-1", "restartPolicy": "Never"},
        "status": {
            "phase": phase,
            "reason": reason,
            "message": message,
            "conditions": conditions or [],
            "initContainerStatuses": init or [],
            "containerStatuses": app or [],
        },
    }
    return msgspec.json.decode(msgspec.json.encode(raw), type=kubeobjects.ScanPod)


def cs(name: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "state": state, "imageID": ""}


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"waiting": {"reason": reason, "message": message}}


def terminated(exit_code: int, reason: str = "Error", message: str = "") -> dict[str, Any]:
    return {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}


def test_a_podsweep_job_yields_its_validated_scan_identity() -> None:
    assert jobstatus.scan_jobs(job()) == (
        ScanJob(
            scan_id=SCAN_ID,
            digest_ref=REF,
            mode="node",
            node="node-1",
            job="podsweep-scan-0123456789",
            raw_key=storage.raw_key(REF, SCAN_ID),
            sbom_key=storage.sbom_key(REF, SCAN_ID),
        ),
    )


def _annotations(**changes: str | None) -> dict[str, str]:
    base = {
        jobs.DIGEST_REF_ANNOTATION: REF,
        jobs.RAW_KEY_ANNOTATION: storage.raw_key(REF, SCAN_ID),
        jobs.MODE_ANNOTATION: "node",
        jobs.NODE_ANNOTATION: "node-1",
    }
    for key, value in changes.items():
        name = {"digest": jobs.DIGEST_REF_ANNOTATION, "raw": jobs.RAW_KEY_ANNOTATION}.get(key, f"podsweep.io/{key}")
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


@pytest.mark.parametrize(
    ("labels", "annotations", "reason"),
    [
        pytest.param({}, _annotations(), "label app.kubernetes.io/managed-by", id="not-managed-by-podsweep"),
        pytest.param(
            {jobs.MANAGED_BY_LABEL: "someone-else", jobs.SCAN_ID_LABEL: SCAN_ID},
            _annotations(),
            "label app.kubernetes.io/managed-by",
            id="managed-by-someone-else",
        ),
        pytest.param({jobs.MANAGED_BY_LABEL: "podsweep"}, _annotations(), "$.scan_id", id="missing-scan-id"),
        pytest.param(
            {jobs.MANAGED_BY_LABEL: "podsweep", jobs.SCAN_ID_LABEL: SCAN_ID},
            _annotations(digest="evil;reboot@sha256:x"),
            "$.digest_ref",
            id="hostile-digest-ref",
        ),
        pytest.param(
            {jobs.MANAGED_BY_LABEL: "podsweep", jobs.SCAN_ID_LABEL: SCAN_ID},
            _annotations(raw="raw/sha256/../../etc/passwd"),
            "$.raw_key",
            id="traversal-in-raw-key",
        ),
        pytest.param(
            {jobs.MANAGED_BY_LABEL: "podsweep", jobs.SCAN_ID_LABEL: SCAN_ID},
            _annotations(raw=f"raw/sha256/{'b' * 64}/{SCAN_ID}.json"),
            "raw key of scan",
            id="raw-key-of-another-digest",
        ),
        pytest.param(
            {jobs.MANAGED_BY_LABEL: "podsweep", jobs.SCAN_ID_LABEL: SCAN_ID},
            _annotations(mode="shell"),
            "$.mode",
            id="unknown-mode",
        ),
        pytest.param(
            {jobs.MANAGED_BY_LABEL: "podsweep", jobs.SCAN_ID_LABEL: SCAN_ID},
            _annotations(node=None),
            "a node scan Job has no",
            id="node-scan-without-node",
        ),
    ],
)
def test_jobs_with_missing_or_hostile_metadata_are_ignored(
    labels: dict[str, str], annotations: dict[str, str], reason: str
) -> None:
    result = jobstatus.scan_jobs(job(labels=labels, annotations=annotations))
    assert isinstance(result, NotAScanJob)
    assert reason in result.reason
    assert "reboot" not in result.reason


@pytest.mark.parametrize(
    ("the_job", "pods", "node_exists", "expected"),
    [
        pytest.param(job(start_time=False), [], None, Outcome("pending"), id="not-started"),
        pytest.param(job(active=1), [], None, Outcome("started", at=STARTED), id="active"),
        pytest.param(job(), [], None, Outcome("pending"), id="start-time-without-a-pod-is-not-started"),
        pytest.param(job(), [scan_pod(phase="Pending")], None, Outcome("started", at=STARTED), id="a-pod-exists"),
        pytest.param(
            job(), [], False, Outcome("failed", "NodeGone", "the scan's node no longer exists"), id="node-gone"
        ),
        pytest.param(job(), [], None, Outcome("pending"), id="node-not-known-is-not-gone"),
        pytest.param(
            job(conditions=[cond("Complete")]),
            [],
            None,
            Outcome("completed", at=FINISHED, started_at=STARTED),
            id="complete",
        ),
        pytest.param(
            job(conditions=[cond("SuccessCriteriaMet"), cond("Complete", status="False")]),
            [],
            None,
            Outcome("completed", at=FINISHED, started_at=STARTED),
            id="success-criteria-met",
        ),
        pytest.param(
            job(active=1),
            [scan_pod(phase="Pending", init=[cs("scan", waiting("ErrImageNeverPull", "image not present"))])],
            None,
            Outcome("failed", "ErrImageNeverPull", "image not present"),
            id="err-image-never-pull-fails-before-the-job-does",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
            [scan_pod(phase="Failed", init=[cs("scan", waiting("ErrImageNeverPull"))])],
            None,
            Outcome("failed", "ErrImageNeverPull", "container scan: image not on node", FINISHED),
            id="never-pull-is-more-telling-than-the-deadline",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
            [scan_pod(phase="Failed", init=[cs("scan", terminated(143, "Error"))])],
            None,
            Outcome("failed", "DeadlineExceeded", "Job was active longer than specified deadline", FINISHED),
            id="deadline-kill-is-a-deadline-not-a-scan-error",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")]),
            [scan_pod(phase="Failed", init=[cs("scan", terminated(137, "OOMKilled"))])],
            None,
            Outcome("failed", "OOMKilled", "container scan was OOM-killed", FINISHED),
            id="oom-killed",
        ),
        pytest.param(
            job(active=1),
            [scan_pod(phase="Failed", reason="Evicted", message="The node was low on resource: ephemeral-storage.")],
            None,
            Outcome("failed", "Evicted", "The node was low on resource: ephemeral-storage."),
            id="evicted-by-kubelet",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")]),
            [
                scan_pod(
                    phase="Failed",
                    conditions=[cond("DisruptionTarget", "EvictionByEvictionAPI", "Eviction API: evicting")],
                )
            ],
            None,
            Outcome("failed", "Evicted", "Eviction API: evicting", FINISHED),
            id="evicted-by-eviction-api",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")]),
            [
                scan_pod(
                    phase="Failed",
                    conditions=[cond("DisruptionTarget", "DeletionByPodGC", "PodGC: node no longer exists")],
                )
            ],
            None,
            Outcome("failed", "NodeGone", "PodGC: node no longer exists", FINISHED),
            id="node-deleted-pod-gc",
        ),
        pytest.param(
            job(active=1), [], False, Outcome("failed", "NodeGone", "the scan's node no longer exists"), id="node-gone"
        ),
        pytest.param(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")]),
            [scan_pod(phase="Failed", init=[cs("scan", terminated(1, "Error", "FATAL scan error"))])],
            None,
            Outcome("failed", "ScanError", "container scan exited 1: FATAL scan error", FINISHED),
            id="trivy-failed",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")]),
            [
                scan_pod(
                    phase="Failed", init=[cs("scan", terminated(0, "Completed"))], app=[cs("upload", terminated(22))]
                )
            ],
            None,
            Outcome("failed", "UploadFailed", "container upload exited 22: ", FINISHED),
            id="upload-failed",
        ),
        pytest.param(
            job(active=1),
            [scan_pod(phase="Failed", init=[cs("scan", terminated(2, "Error", "bad\x1b[31m\nline"))])],
            None,
            Outcome("failed", "ScanError", "container scan exited 2: bad [31m\nline"),
            id="failed-pod-before-the-job-notices-and-control-characters-cleaned",
        ),
        pytest.param(
            job(conditions=[cond("Failed", "PodFailurePolicy", "rule 0 matched")]),
            [],
            None,
            Outcome("failed", "Unknown", "PodFailurePolicy: rule 0 matched", FINISHED),
            id="unrecognised-failure",
        ),
        pytest.param(
            job(active=1),
            [scan_pod(phase="Running", app=[cs("upload", terminated(1))])],
            None,
            Outcome("started", at=STARTED),
            id="container-failure-in-a-running-pod-waits-for-the-job",
        ),
    ],
)
def test_job_outcome(
    the_job: kubeobjects.Job, pods: list[kubeobjects.ScanPod], node_exists: bool | None, expected: Outcome
) -> None:
    assert jobstatus.outcome(the_job, pods, node_exists) == expected


SA_MISSING = (
    'Error creating: pods "psw-0-abcde" is forbidden: error looking up service account podsweep/scan: '
    'serviceaccount "scan" not found'
)


@pytest.mark.parametrize(
    ("the_job", "pods", "create_failure", "expected"),
    [
        pytest.param(
            job(), [], SA_MISSING, Outcome("failed", "PodCreateRejected", SA_MISSING), id="no-pod-and-failed-create"
        ),
        pytest.param(
            job(conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
            [],
            SA_MISSING,
            Outcome("failed", "PodCreateRejected", SA_MISSING, FINISHED),
            id="deadline-of-a-job-that-never-had-a-pod-says-why",
        ),
        pytest.param(
            job(active=1), [], SA_MISSING, Outcome("started", at=STARTED), id="a-later-pod-was-created-after-all"
        ),
        pytest.param(job(), [scan_pod(phase="Pending")], SA_MISSING, Outcome("started", at=STARTED), id="a-pod-exists"),
        pytest.param(
            job(conditions=[cond("Complete")]),
            [],
            SA_MISSING,
            Outcome("completed", at=FINISHED, started_at=STARTED),
            id="completed-wins",
        ),
        pytest.param(
            job(),
            [],
            "quota \x1b[31m" + "q" * 5000,
            Outcome("failed", "PodCreateRejected", ("quota  [31m" + "q" * 5000)[:1024]),
            id="message-cleaned-and-bounded",
        ),
    ],
)
def test_a_job_whose_pod_was_refused_fails_with_the_api_servers_reason(
    the_job: kubeobjects.Job, pods: list[kubeobjects.ScanPod], create_failure: str, expected: Outcome
) -> None:
    assert jobstatus.outcome(the_job, pods, True, create_failure) == expected


@pytest.mark.parametrize(
    ("the_job", "pods", "podless_since", "expected"),
    [
        pytest.param(
            job(),
            [],
            STARTED,
            Outcome("failed", "PodCreateRejected", jobstatus.PODLESS),
            id="started-long-enough-ago-and-no-pod",
        ),
        pytest.param(job(), [], STARTED - timedelta(seconds=1), Outcome("pending"), id="not-long-enough"),
        pytest.param(
            job(), [scan_pod(phase="Pending")], NOW, Outcome("started", at=STARTED), id="a-pod-exists-however-late"
        ),
        pytest.param(job(start_time=False), [], NOW, Outcome("pending"), id="never-started"),
    ],
)
def test_a_job_without_a_pod_for_long_fails_even_without_its_event(
    the_job: kubeobjects.Job, pods: list[kubeobjects.ScanPod], podless_since: datetime, expected: Outcome
) -> None:
    assert jobstatus.outcome(the_job, pods, True, None, podless_since) == expected


def test_messages_are_bounded() -> None:
    pod = scan_pod(phase="Failed", reason="Evicted", message="x" * 100_000)
    result = jobstatus.outcome(job(active=1), [pod])
    assert len(result.message) == 1024


@pytest.mark.parametrize(
    ("last", "phase", "news"),
    [
        pytest.param(None, "pending", False, id="pending-is-never-news"),
        pytest.param(None, "started", True, id="first-start"),
        pytest.param("started", "started", False, id="start-repeated"),
        pytest.param("started", "completed", True, id="completion"),
        pytest.param(None, "failed", True, id="first-seen-failed-skips-started"),
        pytest.param("completed", "failed", False, id="terminal-is-final"),
        pytest.param("failed", "started", False, id="never-goes-back"),
    ],
)
def test_each_phase_is_published_once(last: jobstatus.Phase | None, phase: jobstatus.Phase, news: bool) -> None:
    assert jobstatus.transition(last, Outcome(phase)) is news


def test_events_for_each_phase_validate_against_the_contract() -> None:
    scans = jobstatus.scan_jobs(job())
    assert not isinstance(scans, NotAScanJob)
    [scan] = scans
    started = jobstatus.scan_event(scan, Outcome("started", at=STARTED), "prod", NOW)
    completed = jobstatus.scan_event(scan, Outcome("completed", started_at=STARTED), "prod", NOW)
    failed = jobstatus.scan_event(scan, Outcome("failed", "OOMKilled", "container scan was OOM-killed"), "prod", NOW)
    assert jobstatus.scan_event(scan, Outcome("pending"), "prod", NOW) is None
    assert isinstance(started, ScanStarted)
    assert started.started_at == STARTED
    assert isinstance(completed, ScanCompleted)
    assert (completed.started_at, completed.finished_at) == (STARTED, NOW)
    assert completed.raw_key == storage.raw_key(REF, SCAN_ID)
    assert isinstance(failed, ScanFailed)
    assert failed.reason == "OOMKilled"
    for event in (started, completed, failed):
        assert msgspec.json.decode(msgspec.json.encode(event), type=type(event)) == event
    assert [jobstatus.message_id(e) for e in (started, completed, failed)] == [
        f"scan-{SCAN_ID}-started",
        f"scan-{SCAN_ID}-completed",
        f"scan-{SCAN_ID}-failed",
    ]


REF_B = "docker.io/library/nginx@sha256:" + "b" * 64
BATCH_LABELS = {jobs.MANAGED_BY_LABEL: jobs.MANAGED_BY_VALUE, jobs.SCAN_ID_LABEL: "b-0123456789"}


def batch_item(scan_id: str, ref: str, raw_key: str | None = None) -> dict[str, str]:
    return {"scan_id": scan_id, "digest_ref": ref, "raw_key": raw_key or storage.raw_key(ref, scan_id)}


def test_an_sbom_rescan_batch_yields_one_scan_per_item() -> None:
    listing = [batch_item("s-aaaaaaaaaa", REF), batch_item("s-bbbbbbbbbb", REF_B)]
    the_job = job(
        labels=BATCH_LABELS,
        annotations={jobs.MODE_ANNOTATION: "sbom", jobs.BATCH_ANNOTATION: msgspec.json.encode(listing).decode()},
    )
    scans = jobstatus.scan_jobs(the_job)
    assert not isinstance(scans, NotAScanJob)
    assert [(s.scan_id, s.digest_ref, s.mode, s.node) for s in scans] == [
        ("s-aaaaaaaaaa", REF, "sbom", None),
        ("s-bbbbbbbbbb", REF_B, "sbom", None),
    ]
    failed = [jobstatus.scan_event(s, Outcome("failed", "ScanError", "x"), "prod", NOW) for s in scans]
    assert [jobstatus.message_id(e) for e in failed if e is not None] == [
        "scan-s-aaaaaaaaaa-failed",
        "scan-s-bbbbbbbbbb-failed",
    ]


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param("", id="missing"),
        pytest.param("[]", id="empty"),
        pytest.param("not json", id="not-json"),
        pytest.param(
            msgspec.json.encode([batch_item("s-aaaaaaaaaa", "evil;reboot@sha256:x", "raw/x")]).decode(), id="hostile"
        ),
        pytest.param(
            msgspec.json.encode([{**batch_item("s-aaaaaaaaaa", REF), "extra": "1"}]).decode(), id="unknown-field"
        ),
        pytest.param(
            msgspec.json.encode([batch_item("s-aaaaaaaaaa", REF, storage.raw_key(REF_B, "s-aaaaaaaaaa"))]).decode(),
            id="raw-key-of-another-digest",
        ),
        pytest.param(msgspec.json.encode([batch_item(f"s-{i:010d}", REF) for i in range(1001)]).decode(), id="huge"),
    ],
)
def test_sbom_batches_with_bad_listings_are_ignored(batch: str) -> None:
    the_job = job(labels=BATCH_LABELS, annotations={jobs.MODE_ANNOTATION: "sbom", jobs.BATCH_ANNOTATION: batch})
    result = jobstatus.scan_jobs(the_job)
    assert isinstance(result, NotAScanJob)
    assert "reboot" not in result.reason
