"""Job outcomes at their edges: a failed pod that says nothing else, a disruption condition that is not true, a batch
whose own metadata is invalid, and a batch that failed outside any item (bench/mutation.py found them unpinned)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas import jobs
from schemas.events import ScanFailed
from services.watcher import jobstatus
from services.watcher.jobstatus import NotAScanJob
from tests.unit.test_watcher_jobstatus import (
    BATCH_LABELS,
    NOW,
    REF,
    REF_B,
    batch_item,
    cond,
    cs,
    job,
    scan_pod,
    terminated,
)


def test_a_job_whose_pod_failed_without_details_fails_with_the_pods_message() -> None:
    current = jobstatus.outcome(job(), [scan_pod(phase="Failed", message="the kubelet gave up")])
    assert (current.phase, current.reason, current.message) == ("failed", "Unknown", "the kubelet gave up")


def test_a_disruption_condition_that_is_not_true_does_not_make_the_node_gone() -> None:
    pod = scan_pod(
        phase="Failed",
        app=[cs("upload", terminated(2, message="upload refused"))],
        conditions=[cond("DisruptionTarget", "DeletionByTaintManager", "taint", status="False")],
    )
    current = jobstatus.outcome(job(conditions=[cond("Failed", "BackoffLimitExceeded")]), [pod])
    assert current.reason == "UploadFailed"
    true_one = scan_pod(
        phase="Failed", conditions=[cond("DisruptionTarget", "DeletionByTaintManager", "node is being drained")]
    )
    assert jobstatus.outcome(job(conditions=[cond("Failed", "BackoffLimitExceeded")]), [true_one]).reason == "NodeGone"


def _batch(labels: dict[str, str], name: str = "podsweep-scan-0123456789") -> Any:
    listing = [batch_item("s-aaaaaaaaaa", REF)]
    the_job = job(
        labels=labels,
        annotations={jobs.MODE_ANNOTATION: "sbom", jobs.BATCH_ANNOTATION: msgspec.json.encode(listing).decode()},
    )
    return msgspec.structs.replace(the_job, metadata=msgspec.structs.replace(the_job.metadata, name=name))


@pytest.mark.parametrize(
    ("labels", "name"),
    [
        pytest.param({**BATCH_LABELS, jobs.SCAN_ID_LABEL: "Not_A_Scan_Id"}, "podsweep-scan-0123456789", id="bad-label"),
        pytest.param(BATCH_LABELS, "Bad_Job_Name", id="bad-name"),
    ],
)
def test_a_batch_job_with_an_invalid_scan_id_label_or_name_is_not_a_scan_job(labels: dict[str, str], name: str) -> None:
    result = jobstatus.scan_jobs(_batch(labels, name))
    assert isinstance(result, NotAScanJob) and "invalid SBOM rescan Job metadata" in result.reason


def test_a_batch_that_failed_before_any_item_tells_each_item_none_failed() -> None:
    listing = [batch_item("s-aaaaaaaaaa", REF), batch_item("s-bbbbbbbbbb", REF_B)]
    the_job = job(
        labels=BATCH_LABELS,
        annotations={jobs.MODE_ANNOTATION: "sbom", jobs.BATCH_ANNOTATION: msgspec.json.encode(listing).decode()},
        conditions=[cond("Failed", "BackoffLimitExceeded")],
    )
    scans = jobstatus.scan_jobs(the_job)
    assert isinstance(scans, tuple)
    current = jobstatus.outcome(the_job, [scan_pod(phase="Failed", init=[cs("download", terminated(1))])])
    events = [jobstatus.scan_event(s, current, "c", NOW) for s in scans]
    assert all(isinstance(e, ScanFailed) and e.reason == "BatchAborted" for e in events)
    assert all("(failed items: none)" in e.message for e in events if isinstance(e, ScanFailed))
