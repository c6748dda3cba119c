"""The digest page says when no node runs a digest any more (its report came from an SBOM rescan)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import storage
from schemas.events import SeverityCounts, Workload
from schemas.index import DigestSummary
from schemas.report import Finding, Report
from schemas.state import DigestScanState, DigestWorkloads, WorkloadRun
from services.parser import html
from services.parser.index import IndexModel

REF = "registry.example.com/app@sha256:" + "b" * 64
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
FINDING = Finding("CVE-2020-28500", "lodash", "4.17.20", "MEDIUM")


def _summary() -> DigestSummary:
    return DigestSummary(
        digest_ref=REF,
        scan_id="psw-000000000009",
        mode="sbom",
        finished_at=T0,
        stored_at=T0,
        counts=SeverityCounts(MEDIUM=1),
        report_key=storage.latest_report_key(REF),
        history_key=storage.history_report_key(REF, T0),
    )


def _page(not_running_since: datetime | None) -> str:
    report = Report(
        source_format="v2",
        findings=[FINDING],
        counts=SeverityCounts(MEDIUM=1),
        not_running_since=not_running_since,
    )
    return html.digest_page(report, _summary(), ["registry.example.com/app:1"], ["shop"])


@pytest.mark.parametrize(
    ("since", "shown"),
    [
        pytest.param(
            datetime(2026, 11, 20, 17, 45, 12, tzinfo=UTC), "not running since 2026-11-20 17:45 UTC", id="utc"
        ),
        pytest.param(
            datetime.fromisoformat("2026-11-21T01:30:00+02:00"),
            "not running since 2026-11-20 23:30 UTC",
            id="other-offset-shown-in-utc",
        ),
        pytest.param(
            datetime(2026, 11, 20, 8, 0), "not running since 2026-11-20 08:00 UTC", id="no-offset-taken-as-utc"
        ),
    ],
)
def test_digest_page_says_since_when_no_node_runs_the_digest(since: datetime, shown: str) -> None:
    page = _page(since)
    assert shown in page
    assert page.index(shown) < page.index("<h2>Counts</h2>"), "said in the digest's header table, above the counts"
    assert "lodash" in page, "its findings are still listed"


def test_digest_page_of_a_running_digest_says_nothing_about_running() -> None:
    page = _page(None)
    assert "not running" not in page
    assert "<th>running</th>" not in page


def _workloads_index(names: list[str]) -> IndexModel:
    model = IndexModel()
    runs = [
        WorkloadRun(
            namespace="shop", workload=Workload("Deployment", name), image=f"registry.example.com/app@{HEX_REF}"
        )
        for name in names
    ]
    model.apply_workloads("b" * 64, DigestWorkloads(digest_ref=REF, runs=runs), 1)
    return model


HEX_REF = "sha256:" + "b" * 64


def test_namespace_page_sorts_workloads_as_people_count() -> None:
    model = _workloads_index(["svc-10", "svc-2", "svc-1", "svc-11", "api"])
    doc = model.namespace_index("shop", T0)
    assert doc is not None
    assert [w.workload.name for w in doc.workloads] == ["api", "svc-1", "svc-2", "svc-10", "svc-11"]
    page = html.namespace_page(doc)
    assert page.index("Deployment/svc-2<") < page.index("Deployment/svc-10<")


def test_tables_show_short_digests_and_the_digest_page_the_whole_one() -> None:
    doc = _workloads_index(["svc-1"]).namespace_index("shop", T0)
    assert doc is not None
    page = html.namespace_page(doc)
    assert "b" * 13 not in page.replace(f'title="registry.example.com/app@{HEX_REF}"', ""), "only the hover has it"
    assert "registry.example.com/app@sha256:bbbbbbbbbbbb\u2026" in page
    assert REF in _page(None), "the digest page shows the whole digest"


@pytest.mark.parametrize(
    ("scan", "shown"),
    [
        pytest.param(None, "not scanned yet", id="never-claimed"),
        pytest.param(DigestScanState(digest_ref=REF, status="running"), "scanning", id="running"),
        pytest.param(DigestScanState(digest_ref=REF, status="pending"), "waiting to be scanned", id="pending"),
        pytest.param(
            DigestScanState(digest_ref=REF, status="not_scanned", nodes_seen=["n1"]),
            "waiting to be scanned",
            id="runs-and-waits-for-its-first-claim",
        ),
        pytest.param(
            DigestScanState(
                digest_ref=REF, status="failed", reason="attempt 1 failed with ReportMissing on node n1: no object"
            ),
            "scan failed: attempt 1 failed with ReportMissing on node n1: no object",
            id="failed-with-its-reason",
        ),
    ],
)
def test_a_digest_without_a_report_shows_the_scan_state_status_counts(scan: DigestScanState | None, shown: str) -> None:
    model = _workloads_index(["svc-1"])
    model.take_dirty()
    model.apply_scan("b" * 64, scan, 7)
    summary_dirty, namespaces, revisions = model.take_dirty()
    assert (summary_dirty, namespaces) == (scan is not None, {"shop"} if scan is not None else set())
    assert revisions.scans == 7
    doc = model.namespace_index("shop", T0)
    assert doc is not None
    assert f'<td class="muted" colspan="6">{shown}</td>' in html.namespace_page(doc)
    assert f'<td class="muted" colspan="6">{shown}</td>' in html.index_page(model.summary_index(T0, revisions))


def test_scan_writes_that_change_nothing_shown_dirty_nothing() -> None:
    model = _workloads_index(["svc-1"])
    model.apply_scan("b" * 64, DigestScanState(digest_ref=REF, status="running", attempts=1), 1)
    model.take_dirty()
    model.apply_scan("b" * 64, DigestScanState(digest_ref=REF, status="running", attempts=1, scan_seq=9), 2)
    assert model.take_dirty()[:2] == (False, set())
