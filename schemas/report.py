"""podsweep's normalized report: what the parser stores at reports/sha256/<hex>/latest.json.

Built from any Trivy JSON version; readers never need to know which Trivy wrote it. Every string came from a scanned
image (hostile), so each is bounded and free of control characters (the parser cleans them); only Trivy's masked
secret text is ever kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.events import Severity, SeverityCounts
from schemas.refs import DigestRef, ScanId, ShortText, Text

SourceFormat = Literal["v2", "legacy"]
"""`v2`: Trivy's SchemaVersion 2 object (Trivy 0.20+). `legacy`: the bare array (or `null`) older Trivy wrote."""

FindingKey = tuple[str, str, str, str]


class Finding(msgspec.Struct, frozen=True, omit_defaults=True):
    """One vulnerability in one package at one target (one entry of Trivy's Results[].Vulnerabilities[]).

    `fixable`: a fixed version exists and the vendor has not said it will not ship it (Status is not will_not_fix,
    fix_deferred, end_of_life or not_affected). `cvss`: the highest base score over every source and CVSS version
    (v2, v3, v4.0); `cvss_vector` is the vector that score came from.

    Not kw_only: the parser builds hundreds per report positionally (several times faster than by keyword), so
    add new fields at the end only. Everyone else should construct it by keyword.
    """

    id: ShortText
    package: ShortText
    installed_version: ShortText
    severity: Severity
    fixed_version: ShortText = ""
    status: ShortText = ""  # Trivy's Status (fixed, affected, will_not_fix, ...); empty before Trivy 0.35
    fixable: bool = False
    cvss: float | None = None
    cvss_vector: ShortText = ""
    title: Text = ""
    url: Text = ""
    target: Text = ""
    klass: ShortText = msgspec.field(default="", name="class")  # os-pkgs, lang-pkgs
    pkg_type: ShortText = ""  # apk, debian, pip, npm, gobinary, ...
    pkg_path: Text = ""
    purl: Text = ""  # package URL (PkgIdentifier.PURL), from newer Trivy only
    layer: ShortText = ""  # DiffID of the layer that added the package, when Trivy knew it

    @property
    def key(self) -> FindingKey:
        """Identity across scans: the same CVE in the same package version at the same path.

        An OS package has no path, and its target names the scanned artifact ("/ (alpine 3.19)" on a node,
        "<file>.cdx.json (alpine 3.19)" from an SBOM): the image has one OS, so the class stands for the place and
        a node scan and an SBOM rescan of the same digest agree.
        """
        place = self.pkg_path or ("os-pkgs" if self.klass == "os-pkgs" else self.target)
        return (self.id, self.package, self.installed_version, place)


class Misconfiguration(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A failed misconfiguration check (passed and excepted ones are not kept)."""

    id: ShortText
    title: Text = ""
    severity: Severity
    target: Text = ""
    message: Text = ""
    resolution: Text = ""
    url: Text = ""


class SecretFinding(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A secret Trivy found. `match` is Trivy's masked line; the secret itself is never stored."""

    rule_id: ShortText
    category: ShortText = ""
    severity: Severity
    title: Text = ""
    target: Text = ""
    start_line: int = 0
    match: ShortText = ""


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """One scan of one digest. `findings` keeps every Trivy entry in Trivy's order (no de-duplication), so
    `counts.total() == len(findings)`; `fixable` counts the fixable ones by severity."""

    v: int = 1
    digest_ref: DigestRef | None = None  # None when parsed from a local file with no digest
    scan_id: ScanId | None = None
    source_format: SourceFormat
    artifact: Text = ""
    artifact_type: ShortText = ""
    os_family: ShortText = ""
    os_name: ShortText = ""
    eosl: bool = False
    trivy_version: ShortText = ""  # empty when the Trivy that wrote the report did not say (older ones)
    scanned_at: datetime | None = None  # Trivy's CreatedAt; None from the older Trivy that did not write it
    findings: list[Finding] = []
    counts: SeverityCounts = SeverityCounts()
    fixable: SeverityCounts = SeverityCounts()
    misconfigurations: list[Misconfiguration] = []
    secrets: list[SecretFinding] = []
    # Set by the parser when no node ran the digest any more at the time of this scan (rescanned from its SBOM).
    not_running_since: datetime | None = None
