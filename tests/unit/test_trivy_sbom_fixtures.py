"""The parser against what real Trivy 0.76 wrote in the SBOM rescan end to end: the node scan's report, the SBOM
converted from it, and the report of the rescan of that SBOM under a DB with one more advisory."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from podsweep.reports import normalize, trivy
from services.parser import sbom

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trivy"
SBOM_FILES = sorted(FIXTURES.glob("*.cdx.json"))
NODE_SCAN = FIXTURES / "trivy-0.76-node-scan-combined.json"
SBOM_RESCAN = FIXTURES / "trivy-0.76-sbom-rescan-combined.json"
CONVERTED = FIXTURES / "trivy-0.76-combined.cdx.json"
# tests/fixtures/advisories/extra.json: the advisory that reached the Trivy server between the two scans.
NEW_ADVISORY = ("CVE-2020-28500", "lodash", "4.17.20")


def _bom(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


def test_the_end_to_end_fixtures_are_there() -> None:
    assert CONVERTED in SBOM_FILES
    assert NODE_SCAN.is_file() and SBOM_RESCAN.is_file()


@pytest.mark.parametrize("path", SBOM_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("upload", [bytes, gzip.compress], ids=["plain", "gzip-as-the-uploader-sends-it"])
def test_every_real_sbom_is_kept_with_the_trivy_version_that_wrote_it(path: Path, upload: Any) -> None:
    data = path.read_bytes()
    bom = _bom(path)
    info = sbom.check(upload(data), max_bytes=len(data))
    assert (info.spec_version, info.components) == (bom["specVersion"], len(bom["components"]))
    assert info.trivy_version == "0.76.0"


@pytest.mark.parametrize("path", SBOM_FILES, ids=lambda p: p.name)
def test_a_real_sbom_one_byte_over_the_cap_is_refused_as_oversized(path: Path) -> None:
    data = path.read_bytes()
    with pytest.raises(sbom.SbomError) as caught:
        sbom.check(gzip.compress(data), max_bytes=len(data) - 1)
    assert caught.value.kind == "oversized"


@pytest.mark.parametrize("path", SBOM_FILES, ids=lambda p: p.name)
def test_a_real_sbom_is_not_taken_for_a_findings_report(path: Path) -> None:
    with pytest.raises(trivy.ParseError) as caught:
        normalize.parse(path.read_bytes())
    assert caught.value.kind == "not-trivy"


def test_the_converted_sbom_lists_every_package_the_node_scan_found() -> None:
    """A rescan sees only what the SBOM lists: `trivy convert` must not drop a package of the filesystem walk."""
    walked = {
        p["Identifier"]["PURL"] for r in json.loads(NODE_SCAN.read_bytes())["Results"] for p in r.get("Packages", [])
    }
    listed = {c["purl"] for c in _bom(CONVERTED)["components"] if c["type"] == "library"}
    assert walked == listed
    assert len(walked) >= 12, "apk, npm, Python and Go packages"


def test_node_scan_and_sbom_rescan_differ_by_exactly_the_new_advisory() -> None:
    """The OS result is named for the scanned path (`/` vs the SBOM's file) in each mode; findings must still match,
    or every rescan would re-alert every OS finding."""
    node, rescan = normalize.parse(NODE_SCAN.read_bytes()), normalize.parse(SBOM_RESCAN.read_bytes())
    assert {f.target for f in node.findings} != {f.target for f in rescan.findings}, "the targets do differ"
    new, fixed = normalize.diff(node, rescan)
    assert [(f.id, f.package, f.installed_version) for f in new] == [NEW_ADVISORY]
    assert fixed == []
    assert rescan.counts.total() == node.counts.total() + 1
    assert (node.trivy_version, rescan.trivy_version) == ("0.76.0", "0.76.0")
    assert (node.artifact_type, rescan.artifact_type) == ("filesystem", "cyclonedx")


def test_an_sbom_nested_too_deep_is_refused_as_oversized() -> None:
    data = b'{"bomFormat": "CycloneDX", "specVersion": "1.6", "x": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    with pytest.raises(sbom.SbomError) as caught:
        sbom.check(data, max_bytes=1_000_000)
    assert caught.value.kind == "oversized"
    assert "nested deeper" in str(caught.value)
