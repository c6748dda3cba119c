"""The search behind index.html: which vulnerability ids a digest is found by, index/search.json as the model builds
it, and the page that loads the search script (same origin, no inline code)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import storage
from schemas.events import Severity, SeverityCounts, Workload
from schemas.index import DigestSummary, SearchIndex, SearchWorkload
from schemas.report import Finding, Report
from schemas.state import DigestWorkloads, WorkloadRun
from services.parser import html, stored
from services.parser.index import IndexModel

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
HEX_A, HEX_B, HEX_C = "a" * 64, "b" * 64, "c" * 64


def _ref(hex_: str) -> str:
    return f"registry.example.com/app@sha256:{hex_}"


def _report(*findings: tuple[str, Severity]) -> Report:
    return Report(source_format="v2", findings=[Finding(id_, "pkg", "1", severity) for id_, severity in findings])


@pytest.mark.parametrize(
    ("findings", "limit", "ids"),
    [
        pytest.param([], 10, [], id="no-findings"),
        pytest.param([("CVE-2", "LOW"), ("CVE-1", "LOW")], 10, ["CVE-1", "CVE-2"], id="same-severity-by-id"),
        pytest.param([("CVE-9", "LOW"), ("CVE-1", "CRITICAL")], 10, ["CVE-1", "CVE-9"], id="worst-first"),
        pytest.param(
            [("CVE-5", "LOW"), ("CVE-5", "HIGH"), ("CVE-3", "MEDIUM")], 10, ["CVE-5", "CVE-3"], id="once-at-its-worst"
        ),
        pytest.param([("CVE-1", "LOW"), ("CVE-2", "HIGH"), ("CVE-3", "CRITICAL")], 2, ["CVE-3", "CVE-2"], id="cap"),
        pytest.param([("", "HIGH"), ("GHSA-x", "MEDIUM")], 10, ["GHSA-x"], id="empty-id-left-out"),
    ],
)
def test_vulnerability_ids_of_a_report(findings: list[tuple[str, Severity]], limit: int, ids: list[str]) -> None:
    assert stored.vulnerability_ids(_report(*findings), limit) == ids


def _summary(hex_: str, ids: list[str], critical: int = 0) -> DigestSummary:
    return DigestSummary(
        digest_ref=_ref(hex_),
        scan_id="psw-000000000001",
        finished_at=T0,
        stored_at=T0,
        counts=SeverityCounts(CRITICAL=critical),
        report_key=storage.latest_report_key(_ref(hex_)),
        history_key=storage.history_report_key(_ref(hex_), T0),
        vulnerability_ids=ids,
    )


def _runs(hex_: str, *runs: tuple[str, str]) -> DigestWorkloads:
    return DigestWorkloads(
        digest_ref=_ref(hex_),
        runs=[
            WorkloadRun(namespace=ns, workload=Workload("Deployment", name), image=f"registry.example.com/app:{name}")
            for ns, name in runs
        ],
    )


def _model() -> IndexModel:
    model = IndexModel()
    model.apply_summary(HEX_A, _summary(HEX_A, ["CVE-2024-1", "CVE-2024-2"], critical=1), 1)
    model.apply_summary(HEX_B, _summary(HEX_B, ["CVE-2024-2"]), 2)
    model.apply_workloads(HEX_A, _runs(HEX_A, ("shop", "api"), ("billing", "ledger")), 3)
    model.apply_workloads(HEX_C, _runs(HEX_C, ("shop", "web")), 4)  # seen, no report yet
    return model


def _ids(doc: SearchIndex) -> dict[str, list[str]]:
    """Each digest's ids, read through the table as the browser does."""
    return {d.digest: [doc.vulnerability_ids[n] for n in d.vulnerabilities] for d in doc.digests}


def test_search_index_lists_every_digest_with_its_workloads_and_each_id_once() -> None:
    doc = _model().search_index(T0)
    assert [d.digest for d in doc.digests] == [HEX_A, HEX_B, HEX_C]
    a, b, c = doc.digests
    assert a.workloads == [
        SearchWorkload("billing", "Deployment", "ledger"),
        SearchWorkload("shop", "Deployment", "api"),
    ]
    assert a.images == ["registry.example.com/app:api", "registry.example.com/app:ledger"]
    assert a.counts == SeverityCounts(CRITICAL=1)
    assert (b.workloads, b.images, b.counts) == ([], [], SeverityCounts()), "a report, no workload seen (yet)"
    assert c.counts is None, "no report yet: no digest page to link to"
    assert sorted(doc.vulnerability_ids) == ["CVE-2024-1", "CVE-2024-2"], "each id once"
    assert _ids(doc) == {HEX_A: ["CVE-2024-1", "CVE-2024-2"], HEX_B: ["CVE-2024-2"], HEX_C: []}
    again = msgspec.json.decode(msgspec.json.encode(doc), type=SearchIndex)
    assert again == doc, "what the indexer writes is what its schema reads"


def test_summary_json_leaves_the_ids_to_search_json() -> None:
    model = _model()
    index = model.summary_index(T0, model.revisions)
    assert all(d.report is None or d.report.vulnerability_ids == [] for d in index.digests.values())
    assert model.summaries[HEX_A].vulnerability_ids == ["CVE-2024-1", "CVE-2024-2"], "the model keeps them"


def test_a_change_reaches_the_next_search_document_and_only_that_digest_is_built_again() -> None:
    model = _model()
    before = model.search_index(T0)
    model.take_dirty()
    model.apply_summary(HEX_B, _summary(HEX_B, ["CVE-2025-7"]), 9)
    assert model.take_dirty()[0], "index.html, summary.json and search.json are written together"
    after = model.search_index(T0)
    assert _ids(after) == {HEX_A: ["CVE-2024-1", "CVE-2024-2"], HEX_B: ["CVE-2025-7"], HEX_C: []}
    assert after.digests[0] is before.digests[0] and after.digests[1] is not before.digests[1]
    model.apply_workloads(HEX_A, _runs(HEX_A, ("shop", "api")), 10)
    assert model.search_index(T0).digests[0].workloads == [SearchWorkload("shop", "Deployment", "api")]
    model.apply_summary(HEX_B, None, 11)
    assert [d.digest for d in model.search_index(T0).digests] == [HEX_A, HEX_C], "a deleted summary leaves it"


def _csp(page: str) -> str:
    found = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert found
    return found.group(1)


def test_index_page_loads_the_search_script_from_its_own_origin_and_nothing_inline() -> None:
    model = _model()
    page = html.index_page(model.summary_index(T0, model.revisions))
    assert re.findall(r"<script[^>]*>", page) == ['<script src="search.js" defer>'], "one script, a file"
    assert page.count("</script>") == 1 and '<script src="search.js" defer></script>' in page, "no inline code"
    csp = _csp(page)
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-eval" not in csp and "'unsafe-inline'" not in csp.split("script-src")[1]
    assert 'id="q"' in page and 'id="search-results"' in page


def test_other_pages_run_no_script_at_all() -> None:
    model = _model()
    namespace = model.namespace_index("shop", T0)
    assert namespace is not None
    report = _report(("CVE-2024-1", "CRITICAL"))
    for page in (html.namespace_page(namespace), html.digest_page(report, _summary(HEX_A, []), [], [])):
        assert "<script" not in page
        assert _csp(page) == "default-src 'none'; style-src 'unsafe-inline'"


def test_the_search_script_puts_text_in_the_page_never_markup() -> None:
    script = html.SEARCH_SCRIPT.decode()
    for unsafe in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "Function(",
        "setTimeout",
    ):
        assert unsafe not in script, unsafe
    assert "textContent" in script
