"""`podsweep report …`: look at Trivy reports from a terminal or CI.

Reads only the file it is given; never talks to NATS, S3 or Kubernetes. Exit 2 means "not a Trivy report".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.events import SEVERITIES, SeverityCounts
from schemas.report import Report, SourceFormat
from services.parser import normalize, trivy

NOT_A_REPORT = 2
# The stored report has no C0 controls; C1 (U+0080-U+009F) is legal text there but some terminals act on it.
_C1 = dict.fromkeys(range(0x80, 0xA0))


def shown(value: str) -> str:
    """Text from a scanned image, safe to hand to rich: no markup, no C1 control characters."""
    return escape(value.translate(_C1))


report_app = typer.Typer(no_args_is_help=True, help="Read Trivy reports (local files here; stored ones later).")


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
        data = file.read_bytes()
    except OSError as exc:
        typer.echo(f"{file}: cannot read it ({exc.strerror or exc})", err=True)
        raise typer.Exit(NOT_A_REPORT) from None
    try:
        report = normalize.parse(data, max_bytes=max_bytes)
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
