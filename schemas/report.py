"""podsweep's normalized report: what the parser stores at reports/sha256/<hex>/latest.json.

Built from any Trivy JSON version; readers never need to know which Trivy wrote it. Only Trivy's masked secret
text is ever kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.events import Severity, SeverityCounts
from schemas.refs import DigestRef, ScanId

SourceFormat = Literal["v2", "legacy"]


class Finding(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One vulnerability in one package at one target (Trivy's Results[].Vulnerabilities[])."""

    id: str
    package: str
    installed_version: str
    fixed_version: str = ""
    severity: Severity
    status: str = ""  # Trivy's Status (fixed, affected, will_not_fix, ...); empty before Trivy 0.35
    fixable: bool = False
    cvss: float | None = None  # the best score over every source and CVSS version
    title: str = ""
    url: str = ""
    target: str = ""
    klass: str = msgspec.field(default="", name="class")  # os-pkgs, lang-pkgs
    pkg_type: str = ""  # apk, debian, pip, npm, gobinary, ...
    pkg_path: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity across scans: the same CVE in the same package version at the same path."""
        return (self.id, self.package, self.installed_version, self.pkg_path or self.target)


class Misconfiguration(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A failed misconfiguration check (passed ones are not kept)."""

    id: str
    title: str = ""
    severity: Severity
    target: str = ""
    message: str = ""
    resolution: str = ""
    url: str = ""


class SecretFinding(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A secret Trivy found. `match` is Trivy's masked text; the secret itself is never stored."""

    rule_id: str
    category: str = ""
    severity: Severity
    title: str = ""
    target: str = ""
    start_line: int = 0
    match: str = ""


class Report(msgspec.Struct, frozen=True, kw_only=True):
    v: int = 1
    digest_ref: DigestRef | None = None  # None when parsed from a local file with no digest
    scan_id: ScanId | None = None
    source_format: SourceFormat
    artifact: str = ""
    artifact_type: str = ""
    os_family: str = ""
    os_name: str = ""
    eosl: bool = False
    trivy_version: str = ""
    scanned_at: datetime | None = None
    findings: list[Finding] = []
    counts: SeverityCounts = SeverityCounts()
    fixable: SeverityCounts = SeverityCounts()
    misconfigurations: list[Misconfiguration] = []
    secrets: list[SecretFinding] = []
