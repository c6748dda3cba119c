"""`podsweep up`'s progress lines (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from podsweep.progress import Sweep, line
from podsweep.status import ConsumerLag, StatusReport, summarize
from schemas.state import DigestScanState, NodeFailure

BROWSE = "podsweep report ls"


def report(digests: int, lag: int = 0, **states: int) -> StatusReport:
    return StatusReport(
        digests=digests,
        by_state=states,
        oldest_pending=None,
        oldest_pending_since=None,
        running_per_node={},
        consumers=[ConsumerLag("parser", pending=lag, in_flight=0, redelivered=0)],
        recent_failures=[],
    )


def test_progress_is_printed_once_per_change() -> None:
    text, last = line(report(10, pending=6, running=4), Sweep(), 3.0, BROWSE)
    assert text == "first sweep: 10 digests: 0 scanned, 4 scanning, 6 waiting, 0 failed; 0 events queued"
    again, same = line(report(10, pending=6, running=4), last, 5.0, BROWSE)
    assert again is None and same == last
    moved, _ = line(report(10, done=3, pending=3, running=4), last, 7.0, BROWSE)
    assert moved is not None and moved.startswith("first sweep: 10 digests: 3 scanned")


def test_first_sweep_ends_when_nothing_waits_and_no_event_is_queued() -> None:
    last = Sweep("x")
    queued, last = line(report(5, lag=2, done=4, failed=1), last, 30.0, BROWSE)
    assert queued is not None and not last.first_done, "events still queued: the parser has work"
    done, last = line(report(5, done=4, failed=1), last, 42.4, BROWSE)
    assert done is not None and done.startswith("first sweep done in 42s") and BROWSE in done and last.first_done
    later, _ = line(report(6, done=4, failed=1, pending=1), last, 60.0, BROWSE)
    assert later is not None and later.startswith("sweep: 6 digests")


def test_an_empty_cluster_never_claims_a_first_sweep() -> None:
    text, last = line(report(0), Sweep(), 1.0, BROWSE)
    assert text is not None and text.startswith("first sweep: 0 digests") and not last.first_done


def test_not_scanned_counts_as_failed() -> None:
    text, _ = line(report(3, done=1, failed=1, not_scanned=1, running=0), Sweep(first_done=True), 1.0, BROWSE)
    assert text == "sweep: 3 digests: 1 scanned, 0 scanning, 0 waiting, 2 failed; 0 events queued"


def test_the_line_says_why_digests_failed_as_status_counts_them() -> None:
    reading = msgspec.structs.replace(
        report(5, done=1, failed=4), failed_by_reason={"PodCreateRejected": 3, "ReportMissing": 1}
    )
    text, _ = line(reading, Sweep(first_done=True), 1.0, BROWSE)
    assert text == (
        "sweep: 5 digests: 1 scanned, 0 scanning, 0 waiting, 4 failed (PodCreateRejected 3, ReportMissing 1); "
        "0 events queued"
    )


def test_status_counts_failed_digests_by_their_last_reason_and_keeps_the_dispatchers_words() -> None:
    at = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    ref = "registry.example.com/app@sha256:"
    failure = NodeFailure(node="n1", reason="PodCreateRejected", at=at)
    states = [
        DigestScanState(digest_ref=ref + "1" * 64, status="failed", failures=[failure], reason="PodCreateRejected: x"),
        DigestScanState(digest_ref=ref + "2" * 64, status="failed", failures=[failure], reason="PodCreateRejected: y"),
        DigestScanState(digest_ref=ref + "3" * 64, status="not_scanned", reason="no node runs this digest any more"),
        DigestScanState(digest_ref=ref + "4" * 64, status="done"),
    ]
    summary = summarize(states, [])
    assert summary.failed_by_reason == {"PodCreateRejected": 2, "not_scanned": 1}
    assert {f.detail for f in summary.recent_failures} >= {"PodCreateRejected: x", "PodCreateRejected: y"}


def test_a_digest_that_runs_and_waits_for_its_first_claim_is_pending_not_failed() -> None:
    ref = "registry.example.com/app@sha256:" + "5" * 64
    waiting = DigestScanState(digest_ref=ref, status="not_scanned", nodes_seen=["n1"])
    summary = summarize([waiting], [])
    assert summary.by_state == {"pending": 1}
    assert summary.failed_by_reason == {} and summary.recent_failures == []
