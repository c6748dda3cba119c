"""`podsweep report parse FILE [--json]` as a person or a CI script meets it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from podsweep.reports import localfile, trivy
from services.parser.cli import NOT_A_REPORT, report_app
from tests.unit.test_trivy_parse import FIXTURES, LARGE, NOT_REPORTS, REPORT_FILES, walk

# Mounted the way podsweep's own CLI mounts it, so the command line under test is the real one.
app = typer.Typer()
app.add_typer(report_app, name="report")
runner = CliRunner()


def last_json_line(output: str) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(output.strip().splitlines()[-1])
    return parsed


@pytest.mark.parametrize("path", REPORT_FILES, ids=lambda p: p.stem)
def test_json_summary_counts_what_a_json_walk_counts(path: Path) -> None:
    result = runner.invoke(app, ["report", "parse", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = last_json_line(result.stdout)
    assert list(summary) == ["schema", "artifact", "findings", "by_severity", "misconfigurations", "secrets"]
    expected = walk(path.read_bytes())
    assert summary["schema"] == expected["schema"]
    assert summary["findings"] == expected["findings"]
    assert summary["by_severity"] == expected["by_severity"]
    assert list(summary["by_severity"]) == ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]  # type: ignore[call-overload]
    assert summary["misconfigurations"] == expected["misconfigurations"]
    assert summary["secrets"] == expected["secrets"]


def test_json_summary_names_the_artifact() -> None:
    result = runner.invoke(app, ["report", "parse", str(LARGE), "--json"])
    assert last_json_line(result.stdout)["artifact"] == "myapp:latest"


def test_gzipped_report_is_read(tmp_path: Path) -> None:
    packed = tmp_path / "report.json.gz"
    packed.write_bytes(gzip.compress(LARGE.read_bytes()))
    result = runner.invoke(app, ["report", "parse", str(packed), "--json"])
    assert result.exit_code == 0
    assert last_json_line(result.stdout)["findings"] == walk(LARGE.read_bytes())["findings"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "empty"),
        (b"not json at all", "malformed"),
        (b'{"SchemaVersion": 2, "Results": [{"Target": "x", "Vulnerabilities": [', "cut off"),
        (b'{"bomFormat": "CycloneDX"}', "not a Trivy report"),
        (b'{"SchemaVersion": 2, "Results": "oops"}', "$.Results"),
        (b'{"SchemaVersion": 2, "X": ' + b"[" * 1_000 + b"]" * 1_000 + b"}", "nested deeper"),
        (gzip.compress(b'{"SchemaVersion": 2}') + gzip.compress(b'{"SchemaVersion": 2}'), "trailing"),
    ],
    ids=["empty-file", "not-json", "truncated", "cyclonedx-sbom", "wrong-type", "nested-1000-deep", "two-members"],
)
def test_a_file_that_is_not_a_trivy_report_exits_2_with_one_line(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "upload.json"
    path.write_bytes(content)
    result = runner.invoke(app, ["report", "parse", str(path), "--json"])
    assert result.exit_code == NOT_A_REPORT == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert says in lines[0] and str(path) in lines[0]


def test_a_trivy_k8s_report_exits_2() -> None:
    for path in NOT_REPORTS:
        result = runner.invoke(app, ["report", "parse", str(path)])
        assert result.exit_code == 2
        assert "not a Trivy report" in result.stderr


def test_a_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = runner.invoke(app, ["report", "parse", str(missing)])
    assert result.exit_code == 2
    assert str(missing) in result.stderr and "cannot read" in result.stderr


def test_a_report_over_the_cap_exits_2() -> None:
    result = runner.invoke(app, ["report", "parse", str(LARGE), "--max-bytes", "1000"])
    assert result.exit_code == 2
    assert "oversized" in result.stderr


def test_a_report_streamed_through_a_pipe_stops_being_read_one_byte_past_the_cap(tmp_path: Path) -> None:
    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    written = 0
    chunk = b" " * 65536

    def feed() -> None:
        nonlocal written
        with contextlib.suppress(BrokenPipeError), fifo.open("wb") as pipe:
            for _ in range(1_000):  # 64 MiB on offer, far past the cap
                pipe.write(chunk)
                written += len(chunk)

    writer = threading.Thread(target=feed)
    writer.start()
    with pytest.raises(trivy.ParseError) as caught:
        localfile.read_capped(fifo, 1_000_000)
    writer.join()
    assert caught.value.kind == "oversized"
    assert written < 4_000_000, "the reader stopped at the cap and closed the pipe"


def test_human_output_shows_counts_and_the_worst_findings() -> None:
    result = runner.invoke(app, ["report", "parse", str(FIXTURES / "v2-alpine-39-eosl.json")])
    assert result.exit_code == 0
    assert "testdata/fixtures/images/alpine-39.tar.gz" in result.stdout
    assert "end of support" in result.stdout
    assert "CVE-2019-14697" in result.stdout  # musl, CRITICAL
    assert "CRITICAL" in result.stdout and "fixable" in result.stdout


def test_human_output_prints_hostile_text_literally_never_as_markup(tmp_path: Path) -> None:
    document = {
        "SchemaVersion": 2,
        "ArtifactName": "[blink]evil[/blink]\u009b31m",
        "Results": [
            {
                "Target": "t",
                "Vulnerabilities": [
                    {"VulnerabilityID": "CVE-1", "PkgName": "[red]pkg[/red]", "Severity": "HIGH"},
                ],
            }
        ],
    }
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(document))
    result = runner.invoke(app, ["report", "parse", str(path)])
    assert result.exit_code == 0
    assert "[blink]evil[/blink]31m" in result.stdout
    assert "\x9b" not in result.stdout
    assert "[red]pkg[/red]" in result.stdout
