"""The parser's pure core against real Trivy reports: decode, normalize, diff."""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from podsweep.reports import normalize, trivy
from schemas.events import SEVERITIES, FindingRef
from schemas.report import Report

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trivy"
# CycloneDX SBOMs (`*.cdx.json`) are not reports: tests/unit/test_trivy_sbom_fixtures.py reads them.
REPORT_FILES = sorted(
    p for p in FIXTURES.glob("*.json") if not p.name.startswith("not-report") and not p.name.endswith(".cdx.json")
)
NOT_REPORTS = sorted(FIXTURES.glob("not-report*.json"))
LARGE = FIXTURES / "v2-alpine-image-trivy-0.64-large.json"
PREVIOUS = FIXTURES / "v2-alpine-image-trivy-0.64-previous.json"

VALIDATED_REPORT = msgspec.json.Decoder(Report)


def walk(data: bytes) -> dict[str, Any]:
    """What a reader of Trivy's JSON counts, with json.loads and nothing of podsweep's."""
    doc = json.loads(data)
    results = doc if isinstance(doc, list) else (doc or {}).get("Results") or []
    vulns = [v for r in results for v in r.get("Vulnerabilities") or []]
    return {
        "schema": "legacy" if doc is None or isinstance(doc, list) else "v2",
        "findings": len(vulns),
        "by_severity": {s: sum(1 for v in vulns if v.get("Severity", "UNKNOWN") == s) for s in SEVERITIES},
        "misconfigurations": sum(
            1 for r in results for m in r.get("Misconfigurations") or [] if m.get("Status", "FAIL") == "FAIL"
        ),
        "secrets": sum(len(r.get("Secrets") or []) for r in results),
        "keys": {
            (
                v["VulnerabilityID"],
                v["PkgName"],
                v["InstalledVersion"],
                v.get("PkgPath") or ("os-pkgs" if r.get("Class") == "os-pkgs" else r["Target"]),
            )
            for r in results
            for v in r.get("Vulnerabilities") or []
        },
    }


def parse_json(document: object, **kwargs: Any) -> Report:
    return normalize.parse(json.dumps(document).encode(), **kwargs)


def one_vuln_report(vuln: dict[str, Any], target: str = "img (alpine 3.19.1)") -> dict[str, Any]:
    entry = {"VulnerabilityID": "CVE-2024-0001", "PkgName": "musl", "InstalledVersion": "1.2.4-r2", **vuln}
    return {"SchemaVersion": 2, "Results": [{"Target": target, "Class": "os-pkgs", "Vulnerabilities": [entry]}]}


@pytest.mark.parametrize("path", REPORT_FILES, ids=lambda p: p.stem)
def test_every_real_report_parses_with_the_counts_a_json_walk_finds(path: Path) -> None:
    data = path.read_bytes()
    expected = walk(data)
    report = normalize.parse(data)
    assert report.source_format == expected["schema"]
    assert len(report.findings) == expected["findings"]
    assert msgspec.structs.asdict(report.counts) == expected["by_severity"]
    assert report.counts.total() == len(report.findings)
    assert len(report.misconfigurations) == expected["misconfigurations"]
    assert len(report.secrets) == expected["secrets"]
    assert {f.key for f in report.findings} == expected["keys"]


@pytest.mark.parametrize("path", REPORT_FILES, ids=lambda p: p.stem)
def test_stored_report_decodes_again_under_its_own_constraints(path: Path) -> None:
    report = normalize.parse(path.read_bytes())
    assert VALIDATED_REPORT.decode(msgspec.json.encode(report)) == report


def test_the_real_reports_cover_every_case_the_parser_must_read() -> None:
    reports = {p.stem: normalize.parse(p.read_bytes()) for p in REPORT_FILES}
    assert LARGE.stat().st_size > 1_000_000 and len(reports[LARGE.stem].findings) >= 300
    assert reports["legacy-null"].source_format == "legacy" and reports["legacy-null"].findings == []
    assert reports["legacy-centos-7-trivy-0.19.2"].source_format == "legacy"
    assert reports["v2-zero-vulns"].counts.total() == 0 and reports["v2-zero-vulns"].os_family == "alpine"
    assert reports["v2-misconfig-dockerfile"].findings == [] and reports["v2-misconfig-dockerfile"].misconfigurations
    assert reports["v2-secrets-repository"].secrets
    assert all(f.status == "" for f in reports["v2-centos-7-trivy-0.20.0-pre-status"].findings)
    assert any(f.cvss_vector.startswith("CVSS:4.0/") for f in reports["v2-cvss-v4"].findings)


@pytest.mark.parametrize(
    ("name", "field", "expected"),
    [
        ("v2-alpine-39-eosl", "eosl", True),
        ("v2-alpine-39-eosl", "trivy_version", "dev"),
        ("v2-alpine-39-eosl", "os_name", "3.9.4"),
        ("v2-alpine-image-trivy-0.64-large", "artifact", "myapp:latest"),
        ("v2-alpine-image-trivy-0.64-large", "artifact_type", "container_image"),
        ("v2-repository-packages-cvss-v4", "trivy_version", "0.69.3"),
        ("legacy-centos-7-trivy-0.19.2", "artifact", "testdata/fixtures/images/centos-7.tar.gz"),
        ("legacy-centos-7-trivy-0.19.2", "os_family", "centos"),
        ("legacy-centos-7-trivy-0.19.2", "os_name", "7.6.1810"),
        ("v2-centos-7-trivy-0.20.0-pre-status", "scanned_at", None),
    ],
    ids=lambda v: str(v),
)
def test_report_metadata_comes_from_wherever_that_trivy_version_wrote_it(
    name: str, field: str, expected: object
) -> None:
    report = normalize.parse((FIXTURES / f"{name}.json").read_bytes())
    assert getattr(report, field) == expected


def test_legacy_and_first_v2_release_of_the_same_scan_normalize_to_the_same_findings() -> None:
    legacy = normalize.parse((FIXTURES / "legacy-centos-7-trivy-0.19.2.json").read_bytes())
    v2 = normalize.parse((FIXTURES / "v2-centos-7-trivy-0.20.0-pre-status.json").read_bytes())
    assert legacy.findings == v2.findings
    assert (legacy.counts, legacy.fixable) == (v2.counts, v2.fixable)


def test_secrets_keep_only_trivys_masked_match() -> None:
    data = (FIXTURES / "v2-secrets-repository.json").read_bytes()
    report = normalize.parse(data)
    assert [s.match for s in report.secrets] == [
        s["Match"] for r in json.loads(data)["Results"] for s in r.get("Secrets", [])
    ]
    assert all("*" in s.match for s in report.secrets)
    # The context lines Trivy prints around a secret are never stored.
    assert b"#!/bin/sh" in data and b"#!/bin/sh" not in msgspec.json.encode(report)


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda d: d.replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(gzip.compress, id="gzip"),
        pytest.param(lambda d: gzip.compress(d.replace(b"\n", b"\r\n")), id="gzip-crlf"),
        pytest.param(lambda d: codecs.BOM_UTF8 + d, id="utf8-bom"),
        pytest.param(lambda d: d.decode().encode("utf-16"), id="utf16-powershell"),
    ],
)
@pytest.mark.parametrize(
    "path", [LARGE, FIXTURES / "legacy-null.json", FIXTURES / "legacy-many-vulns.json"], ids=lambda p: p.stem
)
def test_line_endings_compression_and_encoding_do_not_change_the_report(path: Path, transform: Any) -> None:
    data = path.read_bytes()
    assert normalize.parse(transform(data)) == normalize.parse(data)


# --- normalize, one rule at a time ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fixable"),
    [
        ({"FixedVersion": "1.2.4-r3", "Status": "fixed"}, True),
        ({"FixedVersion": "1.2.4-r3"}, True),  # before Trivy had Status
        ({"FixedVersion": "1.2.4-r3", "Status": "affected"}, True),
        ({"Status": "affected"}, False),
        ({}, False),
        ({"FixedVersion": "1.2.4-r3", "Status": "will_not_fix"}, False),
        ({"FixedVersion": "1.2.4-r3", "Status": "fix_deferred"}, False),
        ({"FixedVersion": "1.2.4-r3", "Status": "end_of_life"}, False),
        ({"FixedVersion": "1.2.4-r3", "Status": "not_affected"}, False),
        ({"FixedVersion": "\x00\x1b"}, False),
    ],
    ids=[
        "fixed",
        "fixed-version-before-status-existed",
        "affected-with-fix",
        "affected-no-fix",
        "nothing-known",
        "will-not-fix",
        "fix-deferred",
        "end-of-life",
        "not-affected",
        "fixed-version-of-only-control-characters-is-no-fix",
    ],
)
def test_fixable_means_a_fixed_version_the_vendor_will_ship(fields: dict[str, str], fixable: bool) -> None:
    report = parse_json(one_vuln_report({"Severity": "HIGH", **fields}))
    assert report.findings[0].fixable is fixable
    assert report.fixable.total() == (1 if fixable else 0)
    assert report.counts.HIGH == 1


@pytest.mark.parametrize(
    ("cvss", "score", "vector"),
    [
        (None, None, ""),
        ({}, None, ""),
        ({"nvd": {"V2Score": 5.0, "V2Vector": "AV:N/AC:L/Au:N/C:P/I:N/A:N"}}, 5.0, "AV:N/AC:L/Au:N/C:P/I:N/A:N"),
        ({"nvd": {"V2Score": 9.3, "V2Vector": "v2", "V3Score": 7.5, "V3Vector": "v3"}}, 9.3, "v2"),
        ({"nvd": {"V3Score": 5.5, "V3Vector": "n"}, "redhat": {"V3Score": 7.8, "V3Vector": "r"}}, 7.8, "r"),
        (
            {"nvd": {"V3Score": 5.9, "V3Vector": "v3"}, "ghsa": {"V40Score": 8.9, "V40Vector": "CVSS:4.0/x"}},
            8.9,
            "CVSS:4.0/x",
        ),
        ({"ghsa": {"V40Score": 7.0, "V40Vector": "v4", "V3Score": 7.0, "V3Vector": "v3"}}, 7.0, "v4"),
        ({"nvd": {"V3Score": 7.0, "V3Vector": "first"}, "ghsa": {"V3Score": 7.0, "V3Vector": "second"}}, 7.0, "first"),
        ({"bogus": {"V3Score": 11.0, "V3Vector": "x"}, "nvd": {"V3Score": 4.0, "V3Vector": "ok"}}, 4.0, "ok"),
        ({"bogus": {"V3Score": -1, "V3Vector": "x"}}, None, ""),
        ({"nvd": {"V3Score": 0, "V3Vector": "zero"}}, 0.0, "zero"),
        ({"nvd": {"V3Score": 9}}, 9.0, ""),
    ],
    ids=[
        "no-cvss",
        "empty-cvss",
        "v2-only",
        "v2-higher-than-v3",
        "highest-source-wins",
        "v4-highest",
        "tie-prefers-v4",
        "tie-prefers-first-source",
        "out-of-range-ignored",
        "negative-ignored",
        "zero-is-a-score",
        "integer-score-without-vector",
    ],
)
def test_cvss_is_the_highest_score_over_sources_and_versions(
    cvss: dict[str, Any] | None, score: float | None, vector: str
) -> None:
    finding = parse_json(one_vuln_report({"Severity": "HIGH", "CVSS": cvss})).findings[0]
    assert (finding.cvss, finding.cvss_vector) == (score, vector)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("CRITICAL", "CRITICAL"),
        ("high", "HIGH"),
        ("Medium", "MEDIUM"),
        ("bogus", "UNKNOWN"),
        ("", "UNKNOWN"),
        (None, "UNKNOWN"),
    ],
    ids=["critical", "lower-case", "mixed-case", "not-a-severity", "empty", "missing"],
)
def test_severity_is_one_of_podsweeps_five(given: str | None, expected: str) -> None:
    vuln = {} if given is None else {"Severity": given}
    report = parse_json(one_vuln_report(vuln))
    assert report.findings[0].severity == expected
    assert getattr(report.counts, expected) == 1


@pytest.mark.parametrize(
    ("field", "hostile", "stored"),
    [
        ("PkgName", "musl\x1b[31m\x00", "musl[31m"),
        ("PkgName", "p" * 300, "p" * 256),
        ("Title", "line one\nline two\x07", "line one\nline two"),
        ("Title", "t" * 5000, "t" * 4096),
        ("VulnerabilityID", "CVE-2024-0001\r\n", "CVE-2024-0001"),
        ("InstalledVersion", "1.0\u2028", "1.0\u2028"),
        ("Title", "café ñandú 中文", "café ñandú 中文"),
        ("Title", "c1 \x9b control", "c1 \x9b control"),
        ("PrimaryURL", "https://x/\x7f", "https://x/"),
    ],
    ids=[
        "terminal-escape-in-package",
        "overlong-package",
        "bell-in-title-newline-kept",
        "overlong-title",
        "crlf-in-id",
        "unicode-line-separator-is-not-a-control-character",
        "non-ascii-text-is-kept-as-is",
        "c1-controls-are-allowed-by-the-schema",
        "delete-in-url",
    ],
)
def test_hostile_strings_are_cleaned_so_the_report_always_decodes_again(field: str, hostile: str, stored: str) -> None:
    report = parse_json(one_vuln_report({"Severity": "LOW", field: hostile}))
    assert VALIDATED_REPORT.decode(msgspec.json.encode(report)) == report
    attribute = {
        "PkgName": "package",
        "Title": "title",
        "VulnerabilityID": "id",
        "InstalledVersion": "installed_version",
        "PrimaryURL": "url",
    }[field]
    assert getattr(report.findings[0], attribute) == stored
    new, _ = normalize.diff(None, report)
    assert msgspec.json.decode(msgspec.json.encode(new), type=list[FindingRef]) == new


def test_hostile_target_and_artifact_are_cleaned() -> None:
    document = one_vuln_report({"Severity": "LOW"}, target="a\x00b" * 3000)
    document["ArtifactName"] = "img\x1b]0;pwned\x07"
    report = parse_json(document)
    assert report.artifact == "img]0;pwned"
    assert report.findings[0].target == ("ab" * 3000)[:4096]
    assert VALIDATED_REPORT.decode(msgspec.json.encode(report)) == report


@pytest.mark.parametrize(
    ("status", "kept"),
    [("FAIL", True), (None, True), ("PASS", False), ("EXCEPTION", False)],
    ids=["fail", "no-status-means-failure", "pass", "exception"],
)
def test_only_failed_misconfigurations_are_kept(status: str | None, kept: bool) -> None:
    misconf: dict[str, Any] = {"ID": "DS002", "AVDID": "AVD-DS-0002", "Title": "root user", "Severity": "HIGH"}
    if status is not None:
        misconf["Status"] = status
    document = {"SchemaVersion": 2, "Results": [{"Target": "Dockerfile", "Misconfigurations": [misconf]}]}
    report = parse_json(document)
    assert [m.id for m in report.misconfigurations] == (["DS002"] if kept else [])


def test_misconfiguration_without_id_falls_back_to_avd_id() -> None:
    misconf = {"AVDID": "AVD-DS-0002", "Severity": "HIGH", "Status": "FAIL"}
    document = {"SchemaVersion": 2, "Results": [{"Target": "Dockerfile", "Misconfigurations": [misconf]}]}
    assert parse_json(document).misconfigurations[0].id == "AVD-DS-0002"


@pytest.mark.parametrize(
    ("targets", "artifact", "family", "name"),
    [
        ([("img:1 (alpine 3.19.1)", "alpine")], "img:1", "alpine", "3.19.1"),
        ([("app/package-lock.json", "npm"), ("img (debian 12.5)", "debian")], "img", "debian", "12.5"),
        ([("app/package-lock.json", "npm")], "app/package-lock.json", "", ""),
        ([("weird (not an os)", "npm")], "weird (not an os)", "", ""),
        ([], "", "", ""),
    ],
    ids=["os-target", "os-target-after-a-lock-file", "no-os-target", "parens-that-are-not-the-os", "empty-array"],
)
def test_legacy_reports_recover_artifact_and_os_from_the_os_target(
    targets: list[tuple[str, str]], artifact: str, family: str, name: str
) -> None:
    report = parse_json([{"Target": target, "Type": kind} for target, kind in targets])
    assert report.source_format == "legacy"
    assert (report.artifact, report.os_family, report.os_name) == (artifact, family, name)


def test_digest_and_scan_id_are_carried_into_the_report() -> None:
    digest_ref = "registry.example.com/team/app@sha256:" + "a" * 64
    report = normalize.parse(LARGE.read_bytes(), digest_ref=digest_ref, scan_id="scan-0123456789")
    assert (report.digest_ref, report.scan_id) == (digest_ref, "scan-0123456789")


# --- what the parser refuses, and says why -------------------------------------------------------------------------

_GZIPPED = gzip.compress(b'{"SchemaVersion": 2}')


@pytest.mark.parametrize(
    ("data", "kind", "says"),
    [
        (b"", "not-json", "empty"),
        (b"<html>502 Bad Gateway</html>", "not-json", "malformed"),
        (b'{"SchemaVersion": 2, "Results": [', "truncated", "cut off"),
        (b'{"SchemaVersion": 2} trailing', "not-json", "trailing"),
        (b"42", "not-trivy", "not a Trivy report"),
        (b'"null"', "not-trivy", "not a Trivy report"),
        (b'{"bomFormat": "CycloneDX", "specVersion": "1.5"}', "not-trivy", "SchemaVersion"),
        (b'{"SchemaVersion": 3, "Results": []}', "unsupported", "SchemaVersion 3"),
        (b'{"SchemaVersion": "2"}', "wrong-type", "$.SchemaVersion"),
        (b'{"SchemaVersion": 2, "Results": {}}', "wrong-type", "$.Results"),
        (b'{"SchemaVersion": 2, "Results": [{"Class": "os-pkgs"}]}', "wrong-type", "Target"),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Vulnerabilities": [{"VulnerabilityID": "C",'
            b' "Severity": 4}]}]}',
            "wrong-type",
            "$.Results[0].Vulnerabilities[0].Severity",
        ),
        (b'{"SchemaVersion": 2, "CreatedAt": "yesterday"}', "wrong-type", "$.CreatedAt"),
        (b"[1, 2]", "wrong-type", "$[0]"),
        (b"\x1f\x8b\x08\x00garbage", "truncated", "cut off"),
        (_GZIPPED[:-8] + b"\x00\x00\x00\x00" + _GZIPPED[-4:], "bad-gzip", "corrupt"),
        (gzip.compress(b'{"SchemaVersion": 2}')[:-12], "truncated", "cut off"),
        (codecs.BOM_UTF16_LE + b"\x00\xd8", "not-json", "UTF-16"),
        (b'{"SchemaVersion": 2, "ArtifactName": "\xff\xfe"}', "not-json", "UTF-8"),
    ],
    ids=[
        "empty",
        "html-error-page",
        "truncated-json",
        "trailing-garbage",
        "a-number",
        "a-string",
        "cyclonedx",
        "future-schema",
        "schema-version-as-string",
        "results-not-a-list",
        "result-without-target",
        "severity-as-number",
        "created-at-not-a-time",
        "legacy-array-of-numbers",
        "gzip-header-then-garbage",
        "gzip-checksum-wrong",
        "truncated-gzip",
        "broken-utf16",
        "invalid-utf8-in-a-string",
    ],
)
def test_bad_uploads_raise_parse_error_naming_the_problem(data: bytes, kind: str, says: str) -> None:
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(data)
    assert caught.value.kind == kind
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_trivy_k8s_cluster_report_is_not_an_artifact_report() -> None:
    for path in NOT_REPORTS:
        with pytest.raises(trivy.ParseError) as caught:
            normalize.parse(path.read_bytes())
        assert caught.value.kind == "not-trivy"


@pytest.mark.parametrize(
    ("data", "cap"),
    [
        (LARGE.read_bytes(), 1_000_000),
        (gzip.compress(LARGE.read_bytes()), 1_000_000),
        (gzip.compress(b" " * 50_000_000 + b"null"), 10_000_000),
    ],
    ids=["plain-over-cap", "gzip-inflates-over-cap", "gzip-bomb"],
)
def test_oversized_reports_are_refused_before_they_are_decoded(data: bytes, cap: int) -> None:
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(data, max_bytes=cap)
    assert caught.value.kind == "oversized"
    assert str(cap) in str(caught.value)


def test_a_report_exactly_at_the_cap_is_read() -> None:
    data = LARGE.read_bytes()
    assert len(normalize.parse(data, max_bytes=len(data)).findings) == walk(data)["findings"]
    assert normalize.parse(gzip.compress(data), max_bytes=len(data)) == normalize.parse(data)


def _members(*parts: bytes) -> bytes:
    """One gzip stream of several members, as `cat a.gz b.gz` or pigz writes it."""
    return b"".join(gzip.compress(part, mtime=0) for part in parts)


def test_every_gzip_member_is_read() -> None:
    data = LARGE.read_bytes()
    half = len(data) // 2
    assert normalize.parse(_members(data[:half], data[half:])) == normalize.parse(data)
    assert normalize.parse(_members(b"", data, b"")) == normalize.parse(data)


def test_a_clean_member_followed_by_a_critical_one_is_never_read_as_clean() -> None:
    critical = (FIXTURES / "trivy-0.76-alpine.json").read_bytes()
    assert normalize.parse(critical).counts.CRITICAL > 0
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(_members(b'{"SchemaVersion": 2}', critical))
    assert caught.value.kind == "not-json"


def test_bytes_after_the_last_gzip_member_make_the_stream_corrupt() -> None:
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(gzip.compress(b'{"SchemaVersion": 2}') + b"\x00" * 16)
    assert (caught.value.kind, "after the gzip stream" in str(caught.value)) == ("bad-gzip", True)


def test_the_inflation_cap_counts_every_member() -> None:
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(_members(b" " * 600, b" " * 600 + b"null"), max_bytes=1000)
    assert caught.value.kind == "oversized"


@pytest.mark.parametrize("depth", [1_000, 5_000, 200_000])
@pytest.mark.parametrize(
    "where",
    [
        pytest.param('{{"SchemaVersion": 2, "Extra": {}}}', id="skipped-field"),
        pytest.param('{{"SchemaVersion": 2, "Results": [{{"Target": "t", "Packages": {}}}]}}', id="skipped-in-result"),
    ],
)
@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ('{"a": ', "}")], ids=["arrays", "objects"])
def test_a_report_nested_too_deep_is_refused_as_oversized_with_a_reason(
    depth: int, where: str, opener: str, closer: str
) -> None:
    data = where.format(opener * depth + "1" + closer * depth).encode()
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(data)
    assert caught.value.kind == "oversized"
    assert "nested deeper" in caught.value.reason


# --- diff ------------------------------------------------------------------------------------------------------------


def test_diff_of_two_real_scans_matches_a_json_walk() -> None:
    before_data, after_data = PREVIOUS.read_bytes(), LARGE.read_bytes()
    new, fixed = normalize.diff(normalize.parse(before_data), normalize.parse(after_data))
    before_keys, after_keys = walk(before_data)["keys"], walk(after_data)["keys"]
    assert len(new) == len(after_keys - before_keys) > 0
    assert len(fixed) == len(before_keys - after_keys)
    assert {(r.id, r.package, r.installed_version) for r in new} == {k[:3] for k in after_keys - before_keys}


def test_first_report_makes_every_distinct_finding_new() -> None:
    report = normalize.parse(LARGE.read_bytes())
    new, fixed = normalize.diff(None, report)
    assert fixed == []
    assert len(new) == len({f.key for f in report.findings})


def test_same_report_twice_has_nothing_new_or_fixed() -> None:
    report = normalize.parse(LARGE.read_bytes())
    assert normalize.diff(report, normalize.parse(LARGE.read_bytes())) == ([], [])


def _report(*vulns: dict[str, Any]) -> Report:
    entries = [{"VulnerabilityID": "CVE-1", "PkgName": "p", "InstalledVersion": "1", **v} for v in vulns]
    return parse_json({"SchemaVersion": 2, "Results": [{"Target": "img", "Vulnerabilities": entries}]})


@pytest.mark.parametrize(
    ("before", "after", "new_ids", "fixed_ids"),
    [
        ([{}], [{}, {"VulnerabilityID": "CVE-2"}], ["CVE-2"], []),
        ([{}, {"VulnerabilityID": "CVE-2"}], [{}], [], ["CVE-2"]),
        ([{"Severity": "LOW"}], [{"Severity": "CRITICAL"}], [], []),
        ([{}], [{"InstalledVersion": "2"}], ["CVE-1"], ["CVE-1"]),
        ([{}], [{"PkgPath": "usr/lib/other.jar"}], ["CVE-1"], ["CVE-1"]),
        ([{}], [{}, {}], [], []),
        (
            [],
            [{"Severity": "LOW", "VulnerabilityID": "CVE-A"}, {"Severity": "CRITICAL", "VulnerabilityID": "CVE-B"}],
            ["CVE-B", "CVE-A"],
            [],
        ),
    ],
    ids=[
        "new-cve",
        "fixed-cve",
        "severity-change-is-neither",
        "upgrade-fixes-old-version-and-may-add-new",
        "same-cve-other-path-is-another-finding",
        "duplicate-entries-count-once",
        "most-severe-first",
    ],
)
def test_diff_keys_findings_by_cve_package_version_and_path(
    before: list[dict[str, Any]], after: list[dict[str, Any]], new_ids: list[str], fixed_ids: list[str]
) -> None:
    new, fixed = normalize.diff(_report(*before), _report(*after))
    assert [r.id for r in new] == new_ids
    assert [r.id for r in fixed] == fixed_ids
