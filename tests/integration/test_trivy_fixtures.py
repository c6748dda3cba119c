"""Real Trivy 0.76 finds exactly the fixture CVEs in every fixture tree: standalone, client/server and from SBOMs.

Offline throughout (see tests/harness/trivy.py). Set PODSWEEP_WRITE_TRIVY_FIXTURES=1 to rewrite
tests/fixtures/trivy/trivy-0.76-<kind>.json from the standalone scans.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from tests.harness.rootfs import EXPECTED_FINDINGS, EXTRA_FINDINGS, ExpectedFinding, FixtureKind, build_rootfs
from tests.harness.trivy import (
    BASE_ADVISORIES,
    EXTRA_ADVISORIES,
    ROOTFS_FLAGS,
    SBOM_SCAN_FLAGS,
    SBOM_WRITE_FLAGS,
    TrivyServer,
    build_db,
    scan_env,
)

_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trivy"
KINDS = list(FixtureKind)


class _Vulnerability(msgspec.Struct, frozen=True):
    VulnerabilityID: str
    PkgName: str
    InstalledVersion: str
    Severity: str
    FixedVersion: str = ""
    Status: str = ""


class _Result(msgspec.Struct, frozen=True):
    Target: str
    Type: str = ""
    Vulnerabilities: list[_Vulnerability] | None = None


class _TrivyReport(msgspec.Struct, frozen=True):
    SchemaVersion: int
    ArtifactName: str
    Results: list[_Result] = []


class _Component(msgspec.Struct, frozen=True):
    name: str
    purl: str = ""


class _CdxVulnerability(msgspec.Struct, frozen=True):
    id: str


class _CycloneDX(msgspec.Struct, frozen=True):
    bomFormat: str
    specVersion: str
    components: list[_Component] = []
    vulnerabilities: list[_CdxVulnerability] = []


_report_decoder = msgspec.json.Decoder(_TrivyReport)
_cdx_decoder = msgspec.json.Decoder(_CycloneDX)


def findings(report: bytes) -> frozenset[ExpectedFinding]:
    parsed = _report_decoder.decode(report)
    return frozenset(
        ExpectedFinding(v.PkgName, v.VulnerabilityID, v.InstalledVersion, v.FixedVersion, v.Severity, v.Status)
        for result in parsed.Results
        for v in result.Vulnerabilities or ()
    )


def run_trivy(trivy: Path, cwd: Path, *args: str, timeout_s: float = 60) -> None:
    """Run trivy from a dir of our own, so no trivy.yaml or .trivyignore of the caller's applies."""
    done = subprocess.run(
        [str(trivy), *args], cwd=cwd, env=scan_env(), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"trivy {' '.join(args)} failed ({done.returncode}): {done.stderr[-800:]}"


def image_dir(kind: FixtureKind, tmp_path: Path) -> Path:
    """A copy of the fixture tree named for its kind, so reports say `alpine`, not a cache path with a hash."""
    target = tmp_path / kind.value
    shutil.copytree(build_rootfs(kind), target, symlinks=True)
    return target


def scan_rootfs(trivy: Path, image: Path, cache_dir: Path, out: Path, *extra: str, fmt: str = "json") -> None:
    args = (f"--cache-dir={cache_dir}", *extra, f"--format={fmt}", f"--output={out}", image.name)
    run_trivy(trivy, image.parent, "rootfs", *ROOTFS_FLAGS, *args)


def write_sbom(trivy: Path, image: Path, out: Path) -> None:
    """A package-only CycloneDX SBOM; an empty cache dir proves it needs no DB."""
    args = (f"--cache-dir={image.parent / 'no-db'}", "--format=cyclonedx", f"--output={out}", image.name)
    run_trivy(trivy, image.parent, "rootfs", *SBOM_WRITE_FLAGS, *args)


def scan_sbom(trivy: Path, sbom: Path, cache_dir: Path, out: Path, *extra: str) -> None:
    args = (f"--cache-dir={cache_dir}", *extra, "--format=json", f"--output={out}", sbom.name)
    run_trivy(trivy, sbom.parent, "sbom", *SBOM_SCAN_FLAGS, *args)


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_standalone_rootfs_scan_reports_exactly_the_fixture_cves(
    kind: FixtureKind, trivy_bin: Path, trivy_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    scan_rootfs(trivy_bin, image_dir(kind, tmp_path), trivy_db, out)
    assert findings(out.read_bytes()) == EXPECTED_FINDINGS[kind]
    if os.environ.get("PODSWEEP_WRITE_TRIVY_FIXTURES") == "1":
        _FIXTURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, _FIXTURES / f"trivy-0.76-{kind.value}.json")


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_client_server_scan_reports_the_same_cves_as_standalone(
    kind: FixtureKind, trivy_bin: Path, trivy_server: TrivyServer, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    scan_rootfs(trivy_bin, image_dir(kind, tmp_path), tmp_path / "client-cache", out, "--server", trivy_server.url)
    assert findings(out.read_bytes()) == EXPECTED_FINDINGS[kind]


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_rescan_of_the_cyclonedx_sbom_reports_the_same_cves_without_the_filesystem(
    kind: FixtureKind, trivy_bin: Path, trivy_db: Path, tmp_path: Path
) -> None:
    image = image_dir(kind, tmp_path)
    sbom = tmp_path / "sbom.cdx.json"
    write_sbom(trivy_bin, image, sbom)
    assert _cdx_decoder.decode(sbom.read_bytes()).vulnerabilities == []
    shutil.rmtree(image)  # the rescan must need nothing but the SBOM
    out = tmp_path / "report.json"
    scan_sbom(trivy_bin, sbom, trivy_db, out)
    assert findings(out.read_bytes()) == EXPECTED_FINDINGS[kind]


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_rescan_of_the_sbom_through_the_server_reports_the_same_cves(
    kind: FixtureKind, trivy_bin: Path, trivy_server: TrivyServer, tmp_path: Path
) -> None:
    sbom = tmp_path / "sbom.cdx.json"
    write_sbom(trivy_bin, image_dir(kind, tmp_path), sbom)
    out = tmp_path / "report.json"
    scan_sbom(trivy_bin, sbom, tmp_path / "client-cache", out, "--server", trivy_server.url)
    assert findings(out.read_bytes()) == EXPECTED_FINDINGS[kind]


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_sbom_converted_from_the_json_report_lists_the_same_packages_and_rescans_alike(
    kind: FixtureKind, trivy_bin: Path, trivy_db: Path, tmp_path: Path
) -> None:
    """One filesystem walk gives both: `rootfs --format json --list-all-pkgs`, then `convert --format cyclonedx`."""
    image = image_dir(kind, tmp_path)
    report, native, converted = tmp_path / "walk.json", tmp_path / "native.cdx.json", tmp_path / "converted.cdx.json"
    scan_rootfs(trivy_bin, image, trivy_db, report, "--list-all-pkgs")
    write_sbom(trivy_bin, image, native)
    shutil.rmtree(image)
    run_trivy(trivy_bin, tmp_path, "convert", "--quiet", "-f", "cyclonedx", "-o", str(converted), report.name)
    converted_bom = _cdx_decoder.decode(converted.read_bytes())
    native_bom = _cdx_decoder.decode(native.read_bytes())
    assert converted_bom.specVersion == native_bom.specVersion
    assert {c.purl for c in converted_bom.components} == {c.purl for c in native_bom.components}
    rescan = tmp_path / "rescan.json"
    scan_sbom(trivy_bin, converted, trivy_db, rescan)
    assert findings(rescan.read_bytes()) == findings(report.read_bytes()) == EXPECTED_FINDINGS[kind]


def test_findings_embedded_in_an_sbom_are_ignored_by_the_rescan(
    trivy_bin: Path, trivy_db: Path, tmp_path: Path
) -> None:
    """An SBOM written with `--scanners vuln` under a newer DB carries its findings; the rescan uses only its DB."""
    kind = FixtureKind.NPM
    newer_db = build_db(tmp_path / "newer", (BASE_ADVISORIES, EXTRA_ADVISORIES))
    sbom = tmp_path / "sbom.cdx.json"
    scan_rootfs(trivy_bin, image_dir(kind, tmp_path), newer_db, sbom, fmt="cyclonedx")
    embedded = {v.id for v in _cdx_decoder.decode(sbom.read_bytes()).vulnerabilities}
    assert embedded == {f.vulnerability_id for f in EXPECTED_FINDINGS[kind] | EXTRA_FINDINGS[kind]}
    out = tmp_path / "report.json"
    scan_sbom(trivy_bin, sbom, trivy_db, out)
    assert findings(out.read_bytes()) == EXPECTED_FINDINGS[kind]


def test_advisory_added_to_the_db_appears_after_the_server_restarts_and_goes_with_it(
    trivy_bin: Path, trivy_server: TrivyServer, tmp_path: Path
) -> None:
    kind = FixtureKind.NPM
    sbom = tmp_path / "sbom.cdx.json"
    write_sbom(trivy_bin, image_dir(kind, tmp_path), sbom)

    def rescan(name: str) -> frozenset[ExpectedFinding]:
        scan_sbom(trivy_bin, sbom, tmp_path / "client-cache", tmp_path / name, "--server", trivy_server.url)
        return findings((tmp_path / name).read_bytes())

    assert rescan("before.json") == EXPECTED_FINDINGS[kind]
    try:
        trivy_server.restart(with_db=(BASE_ADVISORIES, EXTRA_ADVISORIES))
        assert rescan("with-extra.json") == EXPECTED_FINDINGS[kind] | EXTRA_FINDINGS[kind]
    finally:
        trivy_server.restart(with_db=(BASE_ADVISORIES,))
    assert rescan("base-again.json") == EXPECTED_FINDINGS[kind]


def test_scans_and_sbom_writes_finish_with_no_network_at_all(trivy_bin: Path, trivy_db: Path, tmp_path: Path) -> None:
    """In a network namespace of its own (loopback down), any download attempt would fail or hang; none happens."""
    image = image_dir(FixtureKind.COMBINED, tmp_path)
    sbom, walk, out = tmp_path / "sbom.cdx.json", tmp_path / "walk.json", tmp_path / "report.json"
    for args in (
        ["rootfs", *ROOTFS_FLAGS, "--cache-dir", str(trivy_db), "-f", "json", "-o", str(walk), image.name],
        ["rootfs", *SBOM_WRITE_FLAGS, "--cache-dir", "no-db", "-f", "cyclonedx", "-o", str(sbom), image.name],
        ["sbom", *SBOM_SCAN_FLAGS, "--cache-dir", str(trivy_db), "-f", "json", "-o", str(out), sbom.name],
    ):
        done = subprocess.run(
            ["unshare", "--net", "--map-root-user", str(trivy_bin), *args],
            cwd=tmp_path,
            env=scan_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"offline trivy {args[0]} failed: {done.stderr[-800:]}"
    expected = EXPECTED_FINDINGS[FixtureKind.COMBINED]
    assert findings(walk.read_bytes()) == findings(out.read_bytes()) == expected
