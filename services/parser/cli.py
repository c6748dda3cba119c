"""`podsweep report …`: look at Trivy reports from a terminal or CI.

`parse` reads only the file it is given. `ls` and `show` read the stored index and reports from S3 (never NATS or
Kubernetes, never a write). Exit 2 means "not a Trivy report" or unusable configuration; 1 means "not found".
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from podsweep import discovery
from podsweep.config import ConfigError, Settings
from podsweep.objectstore import ObjectStore
from podsweep.reports import localfile, normalize, trivy
from schemas import storage
from schemas.events import SEVERITIES, Severity, SeverityCounts
from schemas.index import IndexedDigest, NamespaceIndex, SummaryIndex
from schemas.refs import DIGEST_REF_RE, DNS_LABEL_PATTERN
from schemas.report import Report, SourceFormat
from services.parser.richtext import shown

NOT_A_REPORT = 2


report_app = typer.Typer(no_args_is_help=True, help="Read Trivy reports: a local file, or the ones podsweep stored.")


class ParseSummary(msgspec.Struct, frozen=True):
    """The last line of `podsweep report parse --json`: counts a script can compare with its own."""

    schema: SourceFormat
    artifact: str
    findings: int  # every entry of every Results[].Vulnerabilities, no de-duplication
    by_severity: SeverityCounts
    misconfigurations: int  # failed ones
    secrets: int


def summarize(report: Report) -> ParseSummary:
    return ParseSummary(
        schema=report.source_format,
        artifact=report.artifact,
        findings=len(report.findings),
        by_severity=report.counts,
        misconfigurations=len(report.misconfigurations),
        secrets=len(report.secrets),
    )


def _summary_table(report: Report) -> Table:
    table = Table(title="findings by severity", title_justify="left")
    table.add_column("severity")
    table.add_column("findings", justify="right")
    table.add_column("fixable", justify="right")
    for severity in SEVERITIES:
        table.add_row(severity, str(getattr(report.counts, severity)), str(getattr(report.fixable, severity)))
    table.add_row("total", str(report.counts.total()), str(report.fixable.total()), style="bold")
    return table


def _worst_table(report: Report, limit: int) -> Table | None:
    worst = [f for f in report.findings if f.severity in ("CRITICAL", "HIGH")][:limit]
    if not worst:
        return None
    table = Table(title=f"critical and high (first {len(worst)})", title_justify="left")
    table.add_column("id", no_wrap=True)
    for column in ("severity", "package", "installed", "fixed", "cvss", "target"):
        table.add_column(column)
    for f in worst:
        cvss = f"{f.cvss:.1f}" if f.cvss is not None else ""
        # Everything but the severity came from the scanned image: never let rich read it as markup.
        cells = (f.id, f.severity, f.package, f.installed_version, f.fixed_version, cvss, f.target)
        table.add_row(*(shown(cell) for cell in cells))
    return table


@report_app.command("parse")
def parse_command(
    file: Annotated[Path, typer.Argument(help="A Trivy JSON report (any version; gzip and CRLF are fine).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="Refuse reports larger than this (after gunzip).")
    ] = trivy.DEFAULT_MAX_BYTES,
    top: Annotated[int, typer.Option("--top", min=0, help="How many critical/high findings to list.")] = 20,
) -> None:
    """Parse a local Trivy JSON report and print its summary. Exit 2 if it is not a Trivy report."""
    try:
        data = localfile.read_capped(file, max_bytes)
    except OSError as exc:
        typer.echo(f"{file}: cannot read it ({exc.strerror or exc})", err=True)
        raise typer.Exit(NOT_A_REPORT) from None
    except trivy.ParseError as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(NOT_A_REPORT) from None
    try:
        report = normalize.parse(data, max_bytes=max_bytes)
        del data  # the report holds what is shown; the upload's bytes need not stay alive with it
    except trivy.ParseError as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(NOT_A_REPORT) from None

    if as_json:
        typer.echo(msgspec.json.encode(summarize(report)).decode())
        return
    console = Console(soft_wrap=True)
    os_text = shown(f"{report.os_family} {report.os_name}".strip() or "-")
    console.print(
        f"[bold]{shown(report.artifact or file.name)}[/bold]  format {report.source_format}  os {os_text}"
        + ("  [red]end of support[/red]" if report.eosl else "")
        + (f"  trivy {shown(report.trivy_version)}" if report.trivy_version else "")
        + (f"  scanned {report.scanned_at.isoformat()}" if report.scanned_at else ""),
        markup=True,
        highlight=False,
    )
    console.print(_summary_table(report))
    worst = _worst_table(report, top)
    if worst is not None:
        console.print(worst)
    console.print(f"misconfigurations (failed): {len(report.misconfigurations)}  secrets: {len(report.secrets)}")


# -- stored reports (S3) --------------------------------------------------------------------------------------------

NOT_FOUND = 1
BAD_INPUT = 2
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="A TOML or YAML settings file (also PODSWEEP_CONFIG).")
]
_HEX_RE = re.compile(r"^(?:sha256:)?(?P<hex>[a-f0-9]{64})(?!\n)$")
_NAMESPACE_RE = re.compile(DNS_LABEL_PATTERN)
_MAX_INDEX_BYTES = 256 * 1024 * 1024
T = TypeVar("T")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _store(config: Path | None) -> tuple[Settings, ObjectStore]:
    try:
        settings = discovery.load_for_cli(config)
    except ConfigError as exc:
        raise _fail(str(exc), BAD_INPUT) from None
    if not settings.s3.endpoint_url and not settings.s3.access_key_id:
        typer.echo(
            "note: no S3 endpoint or credentials configured and no running `podsweep up` here; using the AWS defaults",
            err=True,
        )
    return settings, ObjectStore(settings.s3)


def _read(store: ObjectStore, key: str, typ: type[T], max_bytes: int) -> T | None:
    """One stored document, decoded; None when absent. Raises typer.Exit naming the key when unreadable."""
    try:
        data = asyncio.run(store.get_if_exists(key, max_bytes))
    except Exception as exc:  # the S3 client's errors are many; every one is fatal to a read-only command
        raise _fail(f"s3: cannot read {key} from bucket {store.bucket}: {exc}", BAD_INPUT) from None
    if data is None:
        return None
    try:
        return msgspec.json.decode(data, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _fail(f"{key} in bucket {store.bucket} is not a podsweep document ({exc})", BAD_INPUT) from None


def _summary(store: ObjectStore) -> SummaryIndex:
    index = _read(store, storage.SUMMARY_KEY, SummaryIndex, _MAX_INDEX_BYTES)
    if index is None:
        raise _fail(f"no index in bucket {store.bucket} yet ({storage.SUMMARY_KEY}): is the parser running?", NOT_FOUND)
    return index


def _count_cells(counts: SeverityCounts | None) -> list[str]:
    if counts is None:
        return ["-"] * len(SEVERITIES)
    return [str(getattr(counts, s)) for s in SEVERITIES]


def _worst(entry: IndexedDigest) -> tuple[int, ...]:
    if entry.report is None:
        return (1,)
    c = entry.report.counts
    return (0, -c.CRITICAL, -c.HIGH, -c.MEDIUM, -c.LOW, -c.UNKNOWN)


@report_app.command("ls")
def ls_command(
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="List this namespace's workloads and digests.")
    ] = None,
    digests: Annotated[bool, typer.Option("--digests", help="List every digest, worst first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored index document as JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Namespaces (or one namespace's workloads, or every digest) with their vulnerability counts."""
    _, store = _store(config)
    console = Console(soft_wrap=True)
    if namespace is not None:
        if not _NAMESPACE_RE.match(namespace) or len(namespace) > 63:
            raise _fail(f"namespace {namespace[:80]!r} is not a Kubernetes namespace name", BAD_INPUT)
        doc = _read(store, storage.namespace_index_key(namespace), NamespaceIndex, _MAX_INDEX_BYTES)
        if doc is None:
            raise _fail(f"no digest is known to run in namespace {namespace}", NOT_FOUND)
        if as_json:
            typer.echo(msgspec.json.encode(doc).decode())
            return
        table = Table(title=f"namespace {namespace}", title_justify="left")
        for column in ("workload", "image", "digest", *(s.lower() for s in SEVERITIES), "fixable"):
            table.add_column(column, justify="right" if column not in ("workload", "image", "digest") else "left")
        for workload in doc.workloads:
            for image in workload.images:
                fixable = str(image.fixable.total()) if image.fixable is not None else "-"
                table.add_row(
                    shown(f"{workload.workload.kind}/{workload.workload.name}"),
                    shown(image.image),
                    image.digest_ref.split("@sha256:")[1][:12],
                    *_count_cells(image.counts),
                    fixable,
                )
        console.print(table)
        return

    index = _summary(store)
    if as_json:
        typer.echo(msgspec.json.encode(index).decode())
        return
    if digests:
        table = Table(title=f"{len(index.digests)} digests", title_justify="left")
        for column in ("image", "digest", *(s.lower() for s in SEVERITIES), "fixable", "namespaces"):
            table.add_column(column)
        for hex_, entry in sorted(index.digests.items(), key=lambda item: (_worst(item[1]), item[0])):
            report = entry.report
            label = ", ".join(entry.images) or (report.artifact if report else "") or entry.digest_ref
            table.add_row(
                shown(label),
                hex_[:12],
                *_count_cells(report.counts if report else None),
                str(report.fixable.total()) if report else "-",
                shown(", ".join(entry.namespaces)),
            )
        console.print(table)
        return
    totals: dict[str, list[int]] = {}
    for entry in index.digests.values():
        for ns in entry.namespaces:
            row = totals.setdefault(ns, [0] * (len(SEVERITIES) + 2))
            row[0] += 1
            if entry.report is not None:
                row[1] += 1
                for i, severity in enumerate(SEVERITIES, 2):
                    row[i] += getattr(entry.report.counts, severity)
    table = Table(title=f"{len(totals)} namespaces, {len(index.digests)} digests", title_justify="left")
    for column in ("namespace", "digests", "scanned", *(s.lower() for s in SEVERITIES)):
        table.add_column(column, justify="left" if column == "namespace" else "right")
    for ns, row in sorted(totals.items()):
        table.add_row(ns, *(str(n) for n in row))
    console.print(table)


def _resolve(index: SummaryIndex | None, target: str) -> tuple[str, list[str]]:
    """(digest hex, other candidates) for a digest ref, sha256:<hex>, <hex>, or an image as written in pod specs."""
    match = DIGEST_REF_RE.fullmatch(target)
    if match is not None:
        return match["digest"].removeprefix("sha256:"), []
    bare = _HEX_RE.fullmatch(target)
    if bare is not None:
        return bare["hex"], []
    if index is None:
        raise _fail(f"{target[:120]!r} is not a digest, and there is no index to look images up in", NOT_FOUND)
    found = sorted(hex_ for hex_, entry in index.digests.items() if target in entry.images)
    if not found:
        raise _fail(f"no running image {target[:200]!r} is known (try `podsweep report ls --digests`)", NOT_FOUND)
    return found[0], found[1:]


@report_app.command("show")
def show_command(
    target: Annotated[str, typer.Argument(help="A digest (repo@sha256:…, sha256:…, or the hex) or an image.")],
    severity: Annotated[
        str | None, typer.Option("--severity", "-s", help="Only these severities, comma-separated (CRITICAL,HIGH).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored report (filtered) as JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """The latest stored report of a digest: its findings, worst first."""
    wanted: set[Severity] = set(SEVERITIES)
    if severity is not None:
        names = {part.strip().upper() for part in severity.split(",") if part.strip()}
        unknown = names - set(SEVERITIES)
        if unknown or not names:
            raise _fail(f"--severity {severity!r}: choose from {','.join(SEVERITIES)}", BAD_INPUT)
        wanted = {s for s in SEVERITIES if s in names}
    _, store = _store(config)
    needs_index = DIGEST_REF_RE.fullmatch(target) is None and _HEX_RE.fullmatch(target) is None
    index = _summary(store) if needs_index else None
    hex_, others = _resolve(index, target)
    report = _read(store, storage.latest_report_key(f"x@sha256:{hex_}"), Report, _MAX_INDEX_BYTES)
    if report is None:
        raise _fail(f"no stored report for sha256:{hex_} (not scanned yet, or quarantined)", NOT_FOUND)
    findings = [f for f in report.findings if f.severity in wanted]
    if as_json:
        typer.echo(msgspec.json.encode(msgspec.structs.replace(report, findings=findings)).decode())
        return
    console = Console(soft_wrap=True)
    console.print(
        f"[bold]{shown(report.digest_ref or report.artifact)}[/bold]  scan {shown(report.scan_id or '-')}"
        + (f"  scanned {report.scanned_at.isoformat()}" if report.scanned_at else ""),
        highlight=False,
    )
    if others:
        console.print(f"{len(others)} more digests run this image: " + ", ".join(h[:12] for h in others))
    console.print(_summary_table(report))
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    table = Table(title=f"{len(findings)} findings", title_justify="left")
    for column in ("id", "severity", "package", "installed", "fixed", "cvss", "title"):
        table.add_column(column, no_wrap=column == "id")
    for f in sorted(findings, key=lambda f: (rank[f.severity], f.id, f.package)):
        cvss = f"{f.cvss:.1f}" if f.cvss is not None else ""
        cells = (f.id, f.severity, f.package, f.installed_version, f.fixed_version, cvss, f.title[:120])
        table.add_row(*(shown(cell) for cell in cells))
    console.print(table)
