"""A failed SBOM rescan batch, judged by the watcher: which item is blamed (its own container exited non-zero or
was OOM-killed), which are told the batch aborted; and the Job conditions that decide completed, failed or started."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from schemas import jobs
from schemas.events import ScanFailed
from services.watcher import jobstatus, kubeobjects
from tests.unit.test_watcher_jobstatus import (
    BATCH_LABELS,
    FINISHED,
    REF,
    REF_B,
    STARTED,
    batch_item,
    cond,
    cs,
    job,
    job_raw,
    scan_pod,
    terminated,
)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def _lines(item: int, last: str = "failed") -> str:
    """The tail of a `podsweep sbom-rescan` log: every item before `item` started, then `item` in state `last`."""
    lines = [msgspec.json.encode({"event": jobs.RESCAN_ITEM_EVENT, "item": n, "state": "running"}) for n in range(item)]
    lines.append(msgspec.json.encode({"event": jobs.RESCAN_ITEM_EVENT, "item": item, "state": last, "level": "x"}))
    return "\n".join(line.decode() for line in lines) + "\n"


def _batch_job(conditions: list[dict[str, Any]], mode: str = "sbom") -> kubeobjects.Job:
    listing = [batch_item("s-aaaaaaaaaa", REF), batch_item("s-bbbbbbbbbb", REF_B), batch_item("s-cccccccccc", REF)]
    return job(
        labels=BATCH_LABELS,
        annotations={jobs.MODE_ANNOTATION: mode, jobs.BATCH_ANNOTATION: msgspec.json.encode(listing).decode()},
        conditions=conditions,
    )


def _reasons(init: list[dict[str, Any]], app: list[dict[str, Any]] | None = None) -> list[str | None]:
    the_job = _batch_job([cond("Failed", "BackoffLimitExceeded")])
    scans = jobstatus.scan_jobs(the_job)
    assert isinstance(scans, tuple)
    current = jobstatus.outcome(the_job, [scan_pod(phase="Failed", init=init, app=app)])
    events = [jobstatus.scan_event(s, current, "c", T0) for s in scans]
    return [e.reason if isinstance(e, ScanFailed) else None for e in events]


@pytest.mark.parametrize(
    ("init", "reasons"),
    [
        pytest.param(
            [cs("download", terminated(0)), cs("rescan-0", terminated(0)), cs("rescan-1", terminated(1))],
            ["BatchAborted", "ScanError", "BatchAborted"],
            id="only-the-item-whose-trivy-failed",
        ),
        pytest.param(
            [cs("download", terminated(0)), cs("rescan-0", terminated(0, reason="OOMKilled"))],
            ["OOMKilled", "BatchAborted", "BatchAborted"],
            id="an-item-oom-killed-with-exit-zero",
        ),
        pytest.param(
            [cs("download", terminated(0)), cs("rescan-0", terminated(1)), cs("rescan-2", terminated(1))],
            ["ScanError", "BatchAborted", "ScanError"],
            id="two-items-failed",
        ),
        pytest.param([cs("download", terminated(1))], ["BatchAborted"] * 3, id="the-download-failed"),
    ],
)
def test_a_failed_batch_blames_only_the_items_whose_own_container_failed(
    init: list[dict[str, Any]], reasons: list[str]
) -> None:
    assert _reasons(init) == reasons


@pytest.mark.parametrize(
    ("app", "reasons"),
    [
        pytest.param(
            [cs("rescan", terminated(1, message=_lines(1)))],
            ["BatchAborted", "ScanError", "BatchAborted"],
            id="one-container-names-the-item-that-failed",
        ),
        pytest.param(
            [cs("rescan", terminated(137, reason="OOMKilled", message=_lines(2, last="running")))],
            ["BatchAborted", "BatchAborted", "OOMKilled"],
            id="one-container-killed-while-on-an-item",
        ),
        pytest.param(
            [cs("rescan", terminated(1, message=_lines(7)))],
            ["BatchAborted"] * 3,
            id="an-item-outside-the-batch-is-not-believed",
        ),
        pytest.param(
            [cs("rescan", terminated(1, message='{"event": "sbom rescan item", "item": 0, "state": "failed"'))],
            ["BatchAborted"] * 3,
            id="a-cut-line-names-nothing",
        ),
        pytest.param(
            [cs("rescan", terminated(1, message=_lines(2, last="done")))],
            ["BatchAborted"] * 3,
            id="done-names-nothing",
        ),
        pytest.param(
            [cs("rescan", terminated(1, message="upload failed\n"))],
            ["BatchAborted"] * 3,
            id="a-transfer-failed-names-nothing",
        ),
    ],
)
def test_the_batch_container_names_the_item_it_failed_on(app: list[dict[str, Any]], reasons: list[str]) -> None:
    assert _reasons([cs("install-trivy", terminated(0))], app) == reasons


def test_a_failed_node_scan_names_no_batch_items() -> None:
    the_job = _batch_job([cond("Failed", "BackoffLimitExceeded")], mode="node")
    current = jobstatus.outcome(the_job, [scan_pod(phase="Failed", init=[cs("rescan-0", terminated(1))])])
    assert current.phase == "failed" and current.failed_items == ()


def test_a_failed_batch_lists_its_failed_items() -> None:
    the_job = _batch_job([cond("Failed", "BackoffLimitExceeded")])
    init = [
        cs("rescan-2", terminated(1)),
        cs("rescan-0", terminated(0, reason="OOMKilled")),
        cs("rescan-1", terminated(0)),
    ]
    assert jobstatus.outcome(the_job, [scan_pod(phase="Failed", init=init)]).failed_items == (0, 2)


def test_a_completed_job_without_a_completion_time_completes_at_its_condition() -> None:
    raw = job_raw(conditions=[cond("Complete")])
    del raw["status"]["completionTime"]
    current = jobstatus.outcome(msgspec.convert(raw, kubeobjects.Job), [])
    assert (current.phase, current.at) == ("completed", FINISHED)
    with_time = jobstatus.outcome(job(conditions=[cond("Complete")]), [])
    assert (with_time.phase, with_time.at, with_time.started_at) == ("completed", FINISHED, STARTED)


def test_a_failed_condition_that_is_not_true_fails_nothing() -> None:
    current = jobstatus.outcome(job(conditions=[cond("Failed", "BackoffLimitExceeded", status="False")], active=1), [])
    assert current.phase == "started"


def test_a_job_whose_only_pod_already_failed_has_started() -> None:
    raw = job_raw()
    raw["status"]["failed"] = 1
    assert jobstatus.outcome(msgspec.convert(raw, kubeobjects.Job), []).phase == "started"
    assert jobstatus.outcome(job(), []).phase == "pending"


@pytest.mark.parametrize("field", ["active", "succeeded", "failed"])
def test_one_pod_counted_by_the_job_controller_means_started(field: str) -> None:
    raw = job_raw()
    raw["status"][field] = 1
    assert jobstatus.outcome(msgspec.convert(raw, kubeobjects.Job), []).phase == "started"
