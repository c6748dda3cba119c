"""The CVE pages of the static index, and the links to them from the digest pages."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.events import Workload
from schemas.index import Affected, CveAnswer, DigestSummary
from schemas.report import Finding, Report
from services.parser import html

T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)
REF = "registry.example.com/app@sha256:" + "a" * 64
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def _answer(**row: object) -> CveAnswer:
    base: dict[str, object] = {
        "digest_ref": REF,
        "cluster": "prod",
        "namespace": "shop",
        "workload": Workload("Deployment", "web"),
        "containers": ["app"],
        "image": "registry.example.com/app:1",
        "nodes": ["node-1"],
        "package": "liblzma5",
        "installed_version": "5.6.0-0.2",
        "fixed_version": "5.6.1",
        "severity": "CRITICAL",
        "since": T0,
    }
    return CveAnswer(kind="cve", query="CVE-2024-3094", title="xz backdoor", affected=[Affected(**{**base, **row})])  # type: ignore[arg-type]


def test_cve_page_lists_the_workload_and_links_its_namespace_and_digest_pages() -> None:
    page = html.cve_page(_answer(), T0)
    assert "<title>CVE-2024-3094</title>" in page and "xz backdoor" in page
    assert '<a href="../namespaces/shop.html">shop</a>' in page
    assert f'<a href="../digests/{"a" * 64}.html">' in page and '<a href="../index.html">' in page
    assert "Deployment/web" in page and "node-1" in page and "5.6.1" in page and "2026-12-01 09:00 UTC" in page
    assert "default-src 'none'" in page and "<script" not in page


def test_cve_page_escapes_what_came_from_reports() -> None:
    page = html.cve_page(_answer(package=HOSTILE, installed_version=HOSTILE, fixed_version=HOSTILE), T0)
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page


def test_cve_page_says_when_a_digest_stopped_running() -> None:
    page = html.cve_page(_answer(nodes=[], not_running_since=T0), T0)
    assert "not running since 2026-12-01 09:00 UTC" in page


def _digest_page(*findings: Finding) -> str:
    summary = DigestSummary(
        digest_ref=REF,
        scan_id="psw-00000001",
        finished_at=T0,
        stored_at=T0,
        report_key="reports/sha256/x/latest.json",
        history_key="reports/sha256/x/history/1.json",
    )
    return html.digest_page(Report(source_format="v2", findings=list(findings)), summary, [], [])


def test_digest_page_links_each_vulnerability_id_to_its_cve_page_and_the_advisory_beside_it() -> None:
    page = _digest_page(
        Finding(id="CVE-2024-3094", package="p", installed_version="1", severity="HIGH", url="https://avd/x"),
        Finding(id="RHSA-2023:1234", package="p", installed_version="1", severity="LOW"),
    )
    assert '<a href="../cve/CVE-2024-3094.html">CVE-2024-3094</a>' in page
    assert '<a href="https://avd/x" rel="noreferrer noopener">advisory</a>' in page
    assert '<a href="../cve/RHSA-2023_1234.html">RHSA-2023:1234</a>' in page


def test_an_id_that_is_not_a_vulnerability_id_links_nowhere_in_the_index() -> None:
    page = _digest_page(Finding(id="../../raw/x", package="p", installed_version="1", severity="HIGH"))
    assert "../cve/" not in page and "../../raw/x" in page
