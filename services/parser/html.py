"""Static HTML pages of the index: index.html, one page per namespace and per digest, browsable from the bucket.

Pure: strings in, a page out. Relative links only, and every value is escaped: image names, titles and URLs came
from scanned images and the pod specs of people who may be hostile. A link target is built only from a validated
namespace or digest hex, or is an http(s) URL from a report. No inline JavaScript: index.html loads one script file,
index/search.js (SEARCH_SCRIPT), from its own origin for the search box; the other pages run none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from schemas import storage
from schemas.events import SEVERITIES, SeverityCounts
from schemas.index import CveAnswer, DigestSummary, NamespaceIndex, ScanView, SummaryIndex
from schemas.refs import digest_hex, vuln_id
from schemas.report import Report

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.CRITICAL{color:#fff;background:#b00020}.HIGH{background:#f4a261}.MEDIUM{background:#ffe08a}
.muted{color:#777}code{font-size:12px}
"""


SEARCH_SCRIPT = (Path(__file__).parent / "search.js").read_bytes()
"""index/search.js, written beside the pages: filters index/search.json in the browser (text only, never markup)."""
_CSP = "default-src 'none'; style-src 'unsafe-inline'"
# The search script is a file of the same origin ('self'), not inline code: no 'unsafe-inline' or 'unsafe-eval'
# for scripts, and fetches only to the same origin (search.json).
_SEARCH_CSP = f"{_CSP}; script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'"
_SEARCH_BOX = (
    '<div id="search" hidden><label for="q">Search by image, namespace, workload, digest or vulnerability id</label> '
    '<input id="q" type="search" size="50" autocomplete="off" spellcheck="false">'
    '<p id="search-status" class="muted"></p><ol id="search-results"></ol></div>'
    '<p id="search-off" class="muted">Search works when these pages are served over HTTP(S) (a copy on disk: run '
    "<code>python3 -m http.server</code> in the copy's directory and open index.html through it)</p>"
)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(at: datetime | None) -> str:
    """An instant in UTC, as labelled (a time with another offset is converted; one without any is taken as UTC)."""
    if at is None:
        return "-"
    return (at.astimezone(UTC) if at.tzinfo is not None else at).strftime("%Y-%m-%d %H:%M UTC")


def _short_image(image: str) -> str:
    """An image as its spec wrote it, with a digest shortened to 12 hex digits: 64 of them made the tables wider
    than a screen (the whole one is on hover and on the digest's own page)."""
    repo, at, digest = image.partition("@")
    algorithm, colon, hex_ = digest.partition(":")
    if at and colon and len(hex_) > 12:
        return f"{repo}@{algorithm}:{hex_[:12]}\u2026"
    return image


def _image_cell(images: list[str]) -> str:
    text = ", ".join(_short_image(i) for i in images)
    full = ", ".join(images)
    return f'<td title="{_e(full)}">{_e(text)}</td>' if text != full else f"<td>{_e(full)}</td>"


def _page(title: str, body: Iterable[str], up: str | None, *, search: bool = False) -> str:
    nav = f'<p><a href="{up}">&larr; all digests and namespaces</a></p>' if up else ""
    script = '<script src="search.js" defer></script>' if search else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_SEARCH_CSP if search else _CSP}">{script}'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{nav}<h1>{_e(title)}</h1>"
        + (_SEARCH_BOX if search else "")
        + "".join(body)
        + "</body></html>\n"
    )


def scan_state_text(scan: ScanView | None) -> str:
    """What a digest without a report is doing, in the words `podsweep status` counts it by, with the reason."""
    if scan is None:
        return "not scanned yet"
    said = {
        "pending": "waiting to be scanned",
        "running": "scanning",
        "done": "scanned, report not stored yet",
        "failed": "scan failed",
        "not_scanned": "not scanned",
    }[scan.status]
    if scan.status == "not_scanned" and not scan.reason:
        return "waiting to be scanned"  # runs somewhere, not claimed yet (as `podsweep status` counts it: pending)
    return f"{said}: {scan.reason}" if scan.reason and scan.status in ("failed", "not_scanned") else said


def _count_cells(
    counts: SeverityCounts | None, fixable: SeverityCounts | None = None, scan: ScanView | None = None
) -> str:
    if counts is None:
        return f'<td class="muted" colspan="6">{_e(scan_state_text(scan))}</td>'
    cells = []
    for severity in SEVERITIES:
        n = getattr(counts, severity)
        cls = f"n {severity}" if n and severity in ("CRITICAL", "HIGH") else "n"
        cells.append(f'<td class="{cls}">{n}</td>')
    cells.append(f'<td class="n">{fixable.total() if fixable is not None else "-"}</td>')
    return "".join(cells)


_COUNT_HEADERS = "".join(f"<th>{s.lower()}</th>" for s in SEVERITIES) + "<th>fixable</th>"


def _worst_first(summary: DigestSummary | None) -> tuple[int, ...]:
    if summary is None:
        return (1,)
    c = summary.counts
    return (0, -c.CRITICAL, -c.HIGH, -c.MEDIUM, -c.LOW, -c.UNKNOWN)


def index_page(index: SummaryIndex) -> str:
    """index/index.html: namespaces with their totals, then every digest, worst first."""
    totals: dict[str, list[int]] = {}
    for entry in index.digests.values():
        for ns in entry.namespaces:
            row = totals.setdefault(ns, [0] * (len(SEVERITIES) + 1))
            row[0] += 1
            if entry.report is not None:
                for i, severity in enumerate(SEVERITIES, 1):
                    row[i] += getattr(entry.report.counts, severity)
    body = [f'<p class="muted">{len(index.digests)} digests, generated {_when(index.generated_at)}</p>']
    body.append("<h2>Namespaces</h2><table><tr><th>namespace</th><th>digests</th>")
    body.append("".join(f"<th>{s.lower()}</th>" for s in SEVERITIES) + "</tr>")
    for ns, row in sorted(totals.items()):
        cells = "".join(f'<td class="n">{n}</td>' for n in row)
        body.append(f'<tr><td><a href="namespaces/{_e(ns)}.html">{_e(ns)}</a></td>{cells}</tr>')
    body.append("</table>")
    body.append(f"<h2>Digests</h2><table><tr><th>image</th><th>digest</th>{_COUNT_HEADERS}")
    body.append("<th>scanned</th><th>namespaces</th><th>clusters</th></tr>")
    entries = sorted(index.digests.items(), key=lambda item: (_worst_first(item[1].report), item[0]))
    for hex_, entry in entries:
        report = entry.report
        images = entry.images or [(report.artifact if report is not None else "") or entry.digest_ref]
        image_cell = _image_cell(images)
        digest_cell = (
            f'<a href="digests/{_e(hex_)}.html"><code>{_e(hex_[:12])}</code></a>'
            if report is not None
            else f"<code>{_e(hex_[:12])}</code>"
        )
        body.append(
            f"<tr>{image_cell}<td>{digest_cell}</td>"
            f"{_count_cells(report.counts if report else None, report.fixable if report else None, entry.scan)}"
            f"<td>{_when(report.scanned_at or report.finished_at) if report else '-'}</td>"
            f"<td>{_e(', '.join(entry.namespaces))}</td><td>{_e(', '.join(entry.clusters))}</td></tr>"
        )
    body.append("</table>")
    return _page("podsweep: vulnerabilities running in the fleet", body, None, search=True)


def namespace_page(index: NamespaceIndex) -> str:
    """index/namespaces/<ns>.html: the namespace's workloads and the digests they run."""
    body = [
        "<table><tr><th>cluster</th><th>workload</th><th>image</th><th>digest</th>"
        f"{_COUNT_HEADERS}<th>scanned</th></tr>"
    ]
    for workload in index.workloads:
        for image in workload.images:
            hex_ = digest_hex(image.digest_ref)
            digest_cell = (
                f'<a href="../digests/{_e(hex_)}.html"><code>{_e(hex_[:12])}</code></a>'
                if image.counts is not None
                else f"<code>{_e(hex_[:12])}</code>"
            )
            body.append(
                f"<tr><td>{_e(workload.cluster or '-')}</td>"
                f"<td>{_e(workload.workload.kind)}/{_e(workload.workload.name)}</td>{_image_cell([image.image])}"
                f"<td>{digest_cell}</td>{_count_cells(image.counts, image.fixable, image.scan)}<td>{_when(image.scanned_at)}</td></tr>"
            )
    body.append("</table>")
    return _page(f"namespace {index.namespace}", body, "../index.html")


def _link(url: str, label: str) -> str:
    if url.startswith(("https://", "http://")) and len(url) <= 2048:
        return f'<a href="{_e(url)}" rel="noreferrer noopener">{_e(label)}</a>'
    return _e(label)


def _not_running_row(report: Report) -> list[str]:
    """A digest no node runs any more is still rescanned from its SBOM for a while: its page says since when, so
    nobody takes its findings for something running now."""
    if report.not_running_since is None:
        return []
    since = _when(report.not_running_since)
    return [f'<tr><th>running</th><td class="muted">not running since {since}</td></tr>']


def digest_page(
    report: Report, summary: DigestSummary, images: list[str], namespaces: list[str], clusters: Sequence[str] = ()
) -> str:
    """index/digests/<hex>.html: the latest report of one digest, every finding, worst first. `clusters`: where its
    workloads run (the fleet's; the scan ran in `summary.cluster`)."""
    scanned_in = f" in cluster {_e(summary.cluster)}" if summary.cluster else ""
    body = [
        "<table>",
        f"<tr><th>digest</th><td><code>{_e(summary.digest_ref)}</code></td></tr>",
        f"<tr><th>images</th><td>{_e(', '.join(images) or '-')}</td></tr>",
        f"<tr><th>namespaces</th><td>{_e(', '.join(namespaces) or '-')}</td></tr>",
        f"<tr><th>clusters</th><td>{_e(', '.join(clusters) or '-')}</td></tr>",
        f"<tr><th>artifact</th><td>{_e(report.artifact or '-')}</td></tr>",
        f"<tr><th>os</th><td>{_e(summary.os or '-')}{' (end of support)' if report.eosl else ''}</td></tr>",
        f"<tr><th>scanned</th><td>{_when(report.scanned_at or summary.finished_at)} by trivy "
        f"{_e(report.trivy_version or '?')} (scan {_e(summary.scan_id)}, {_e(summary.mode)}){scanned_in}</td></tr>",
        f"<tr><th>misconfigurations / secrets</th><td>{summary.misconfigurations} / {summary.secrets}</td></tr>",
        *_not_running_row(report),
        "</table>",
        f"<h2>Counts</h2><table><tr>{_COUNT_HEADERS}</tr><tr>{_count_cells(report.counts, report.fixable)}</tr></table>",
        "<h2>Findings</h2><table><tr><th>id</th><th>severity</th><th>package</th><th>installed</th><th>fixed</th>"
        "<th>cvss</th><th>title</th><th>target</th></tr>",
    ]
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    for f in sorted(report.findings, key=lambda f: (rank[f.severity], f.id, f.package)):
        cvss = f"{f.cvss:.1f}" if f.cvss is not None else ""
        body.append(
            f'<tr><td>{_cve_link(f.id, f.url)}</td><td class="{f.severity}">{f.severity}</td><td>{_e(f.package)}</td>'
            f"<td>{_e(f.installed_version)}</td><td>{_e(f.fixed_version)}</td><td>{cvss}</td>"
            f"<td>{_e(f.title)}</td><td>{_e(f.target)}</td></tr>"
        )
    body.append("</table>")
    name = images[0] if images else report.artifact or summary.digest_ref
    return _page(f"{name}", body, "../index.html")


def _cve_link(cve_id: str, url: str) -> str:
    """A finding's id on a digest page: its page in index/cve/ (who else runs it) when the id is a vulnerability id,
    and the advisory beside it."""
    if vuln_id(cve_id) != cve_id:
        return _link(url, cve_id)
    advisory = f' <span class="muted">({_link(url, "advisory")})</span>' if url else ""
    return f'<a href="../cve/{_e(storage.cve_page_name(cve_id))}">{_e(cve_id)}</a>{advisory}'


def cve_page(answer: CveAnswer, now: datetime) -> str:
    """index/cve/<id>.html: every workload that runs a digest with the vulnerability, running ones first."""
    digests = sorted({row.digest_ref for row in answer.affected})
    body = [
        f"<p>{_e(answer.title)}</p>" if answer.title else "",
        f"<p>{_link(answer.url, answer.url)}</p>" if answer.url else "",
        f'<p class="muted">{len(digests)} digests, {len(answer.affected)} rows, generated {_when(now)}</p>',
        "<table><tr><th>cluster</th><th>namespace</th><th>workload</th><th>containers</th><th>image</th>"
        "<th>digest</th><th>nodes</th><th>package</th><th>installed</th><th>fixed</th><th>severity</th>"
        "<th>since</th></tr>",
    ]
    for row in answer.affected:
        hex_ = digest_hex(row.digest_ref)
        workload = f"{row.workload.kind}/{row.workload.name}" if row.workload is not None else "-"
        namespace = (
            f'<a href="../namespaces/{_e(row.namespace)}.html">{_e(row.namespace)}</a>' if row.namespace else "-"
        )
        nodes = (
            f'<span class="muted">not running since {_when(row.not_running_since)}</span>'
            if row.not_running_since is not None
            else _e(", ".join(row.nodes) or "-")
        )
        severity = row.severity or ""
        body.append(
            f"<tr><td>{_e(row.cluster or '-')}</td><td>{namespace}</td><td>{_e(workload)}</td>"
            f"<td>{_e(', '.join(row.containers) or '-')}</td>{_image_cell([row.image or row.digest_ref])}"
            f'<td><a href="../digests/{_e(hex_)}.html"><code>{_e(hex_[:12])}</code></a></td><td>{nodes}</td>'
            f"<td>{_e(row.package)}</td><td>{_e(row.installed_version)}</td><td>{_e(row.fixed_version or '-')}</td>"
            f'<td class="{_e(severity)}">{_e(severity)}</td><td>{_when(row.since)}</td></tr>'
        )
    body.append("</table>")
    return _page(answer.query, body, "../index.html")
