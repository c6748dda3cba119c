"""The parser shell's pure decisions: which step a completion takes, SBOM checks, index dirtiness, HTML escaping."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta

import pytest

from schemas import storage
from schemas.events import ScanCompleted, SeverityCounts, Workload
from schemas.index import DigestSummary
from schemas.report import Finding, Report
from schemas.state import DigestWorkloads, WorkloadRun
from services.parser import html, sbom, stored
from services.parser.index import IndexModel

HEX = "a" * 64
REF = f"registry.example.com/app@sha256:{HEX}"
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def completion(scan_id: str = "psw-000000000002", at: datetime = T0) -> ScanCompleted:
    return ScanCompleted(
        cluster="c",
        scan_id=scan_id,
        digest_ref=REF,
        job=scan_id,
        raw_key=storage.raw_key(REF, scan_id),
        finished_at=at,
    )


def summary(scan_id: str = "psw-000000000001", at: datetime = T0, critical: int = 0) -> DigestSummary:
    return DigestSummary(
        digest_ref=REF,
        scan_id=scan_id,
        finished_at=at,
        stored_at=at,
        counts=SeverityCounts(CRITICAL=critical),
        report_key=storage.latest_report_key(REF),
        history_key=storage.history_report_key(REF, at),
    )


@pytest.mark.parametrize(
    ("current", "event", "step"),
    [
        pytest.param(None, completion(), "store", id="first-report"),
        pytest.param(summary("psw-000000000002"), completion(), "done", id="redelivery-of-the-stored-scan"),
        pytest.param(summary(at=T0 - timedelta(hours=1)), completion(), "store", id="newer-scan"),
        pytest.param(summary(at=T0 + timedelta(hours=1)), completion(), "stale", id="older-scan-arrives-late"),
        pytest.param(summary(at=T0), completion(), "store", id="same-instant-other-scan-is-stored"),
    ],
)
def test_step_for_a_completion(current: DigestSummary | None, event: ScanCompleted, step: str) -> None:
    assert stored.step_for(current, event) == step


@pytest.mark.parametrize(
    ("current", "candidate", "written"),
    [
        pytest.param(None, summary(), True, id="absent"),
        pytest.param(summary(), summary(), False, id="identical"),
        pytest.param(summary(at=T0 + timedelta(hours=1)), summary(at=T0), False, id="never-replaces-a-newer-scan"),
        pytest.param(summary(at=T0), summary("psw-000000000003", T0 + timedelta(hours=1)), True, id="newer"),
    ],
)
def test_newer_summary_is_the_only_one_written(
    current: DigestSummary | None, candidate: DigestSummary, written: bool
) -> None:
    assert (stored.newer_summary(current, candidate) is not None) == written


def test_report_stored_names_the_sbom_kept_and_nothing_without_one() -> None:
    report = Report(source_format="v2")
    kept = stored.KeptSbom("sbom/sha256/x/history/1.cdx.json", "0.76.0")
    event = stored.report_stored(completion(), report, None, T0, kept)
    assert (event.sbom_key, event.sbom_trivy_version) == (kept.key, "0.76.0")
    bare = stored.report_stored(completion(), report, None, T0)
    assert (bare.sbom_key, bare.sbom_trivy_version) == (None, None)


def test_first_report_has_every_finding_new() -> None:
    finding = Finding("CVE-1", "musl", "1.2.4", "HIGH")
    report = Report(source_format="v2", findings=[finding], counts=SeverityCounts(HIGH=1))
    event = stored.report_stored(completion(), report, None, T0)
    assert event.first_report and [f.id for f in event.new] == ["CVE-1"] and event.fixed == []
    assert event.history_key == storage.history_report_key(REF, T0), "derived from the scan, not the clock"


BOM = b'{"bomFormat":"CycloneDX","specVersion":"1.6","components":[{"type":"library","name":"musl"}],'
TOOLS = b'"metadata":{"tools":{"components":[{"type":"application","name":"trivy","version":"0.76.0"}]}}}'
LEGACY_TOOLS = b'"metadata":{"tools":[{"vendor":"aquasecurity","name":"trivy","version":"0.40.0"}]}}'


@pytest.mark.parametrize(
    ("data", "version"),
    [
        pytest.param(BOM + TOOLS, "0.76.0", id="cyclonedx-1.5-tools-as-components"),
        pytest.param(BOM + LEGACY_TOOLS, "0.40.0", id="cyclonedx-1.4-tools-array"),
        pytest.param(gzip.compress(BOM + TOOLS), "0.76.0", id="gzip"),
        pytest.param(BOM[:-1] + b"}", "", id="no-tools"),
    ],
)
def test_sbom_check_accepts_cyclonedx_and_finds_the_trivy_version(data: bytes, version: str) -> None:
    info = sbom.check(data, max_bytes=1 << 20)
    assert (info.components, info.trivy_version) == (1, version)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        pytest.param(b'{"bomFormat":"CycloneDX","specVersion":"1.6"}', "not-cyclonedx", id="no-components"),
        pytest.param(b'{"bomFormat":"CycloneDX","specVersion":"2.0","components":[]}', "not-cyclonedx", id="spec-2"),
        pytest.param(b'{"spdxVersion":"SPDX-2.3"}', "not-cyclonedx", id="spdx"),
        pytest.param(b'{"bomFormat":"CycloneDX",', "truncated", id="truncated"),
        pytest.param(b"", "not-json", id="empty"),
        pytest.param(b"x" * 2048, "oversized", id="over-the-cap"),
        pytest.param(gzip.compress(b" " * 4096), "oversized", id="inflates-over-the-cap"),
    ],
)
def test_sbom_check_refuses_what_is_not_a_usable_sbom(data: bytes, kind: str) -> None:
    with pytest.raises(sbom.SbomError) as caught:
        sbom.check(data, max_bytes=1024)
    assert caught.value.kind == kind


def _runs(*namespaces: str) -> DigestWorkloads:
    return DigestWorkloads(
        digest_ref=REF,
        runs=[
            WorkloadRun(namespace=ns, workload=Workload(kind="Deployment", name="api"), image="app:1")
            for ns in namespaces
        ],
    )


def test_index_marks_dirty_only_the_namespaces_a_change_touches() -> None:
    model = IndexModel()
    model.apply_workloads(HEX, _runs("shop", "billing"), 5, dirty=False)
    assert model.take_dirty()[:2] == (False, set()), "loading what the stored index already shows writes nothing"
    model.apply_workloads(HEX, _runs("shop"), 6)
    assert model.take_dirty() == (True, {"shop", "billing"}, model.revisions), "the namespace it left is rewritten"
    assert model.namespace_index("billing", T0) is None
    model.apply_summary(HEX, summary(critical=2), 9)
    dirty, namespaces, revisions = model.take_dirty()
    assert (dirty, namespaces, revisions.summaries, revisions.workloads) == (True, {"shop"}, 9, 6)
    shop = model.namespace_index("shop", T0)
    assert shop is not None and shop.workloads[0].images[0].counts == SeverityCounts(CRITICAL=2)


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("<script>alert(1)</script>", id="script-tag"),
        pytest.param('"><img src=x onerror=alert(1)>', id="attribute-break-out"),
    ],
)
def test_digest_page_escapes_text_from_the_scanned_image(hostile: str) -> None:
    finding = Finding("CVE-1", hostile, "1", "HIGH", title=hostile, url="javascript:alert(1)", target=hostile)
    report = Report(source_format="v2", artifact=hostile, findings=[finding], counts=SeverityCounts(HIGH=1))
    page = html.digest_page(report, summary(), [], [])
    assert "<script" not in page and "<img" not in page, "markup from the image is text, not elements"
    assert 'href="javascript' not in page, "only http(s) URLs become links"
