"""Turns a decoded Trivy report into podsweep's Report, and compares two Reports of one digest.

Pure: no I/O, no clock. Every string taken from Trivy is bounded and stripped of control characters here, because
it came from a scanned image: the stored Report and the events built from it must always decode again.
"""

from __future__ import annotations

import re

from podsweep.reports import trivy
from schemas.events import SEVERITIES, FindingRef, Severity, SeverityCounts
from schemas.refs import DigestRef, ScanId
from schemas.report import Finding, FindingKey, Misconfiguration, Report, SecretFinding

SHORT_MAX = 256
TEXT_MAX = 4096

NOT_FIXABLE_STATUSES = frozenset({"will_not_fix", "fix_deferred", "end_of_life", "not_affected"})
"""Trivy statuses under which a FixedVersion does not mean an upgrade will fix the finding."""

FAILED_MISCONFIG_STATUSES = frozenset({"FAIL", ""})
"""An entry without Status is a failure: Trivy lists only failures unless asked for the others."""

_SEVERITY: dict[str, Severity] = {s: s for s in SEVERITIES}
_RANK: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}
# Deleting (not replacing) control characters keeps the visible text as Trivy printed it.
_SHORT_DROP: dict[int, None] = dict.fromkeys([*range(0x20), 0x7F])
_TEXT_DROP: dict[int, None] = dict.fromkeys([*range(0x09), *range(0x0B, 0x20), 0x7F])
# Maps every byte a ShortText forbids to _CONTROL, every other byte away from it.
_CONTROL = b"\x00"
_CONTROL_MAP = bytes(0 if byte < 0x20 or byte == 0x7F else 1 for byte in range(256))
# Legacy reports have no Metadata: the OS target reads "<artifact> (<family> <version>)".
_LEGACY_OS_TARGET = re.compile(r"^(?P<artifact>.*) \((?P<family>[a-z][a-z0-9._-]*) (?P<name>[^()]+)\)$")


def short_text(value: str) -> str:
    """A ShortText: at most 256 characters, none of U+0000-U+001F or U+007F."""
    if len(value) <= SHORT_MAX and value.isprintable():
        return value
    return value.translate(_SHORT_DROP)[:SHORT_MAX]


def text(value: str) -> str:
    """A Text: at most 4096 characters, none of U+0000-U+001F (but tab and newline) or U+007F."""
    if len(value) <= TEXT_MAX and value.isprintable():
        return value
    return value.translate(_TEXT_DROP)[:TEXT_MAX]


def severity(value: str) -> Severity:
    """Trivy's severity, or UNKNOWN for anything it is not (older Trivy wrote lower case in some sources)."""
    return _SEVERITY.get(value) or _SEVERITY.get(value.upper(), "UNKNOWN")


def best_cvss(cvss: dict[str, trivy.CVSS] | None) -> tuple[float | None, str]:
    """The highest base score over every source and CVSS version, with its vector. Scores outside 0-10 are
    ignored (they are not CVSS); on a tie the first source wins, and v4.0 before v3 before v2."""
    if not cvss:
        return None, ""
    best = -1.0
    vector = ""
    # Unrolled: this runs for every finding and is a visible share of normalize's time.
    for source in cvss.values():
        score = source.v40_score
        if score is not None and best < score <= 10.0:
            best, vector = score, source.v40_vector
        score = source.v3_score
        if score is not None and best < score <= 10.0:
            best, vector = score, source.v3_vector
        score = source.v2_score
        if score is not None and best < score <= 10.0:
            best, vector = score, source.v2_vector
    return (best, vector) if best >= 0.0 else (None, "")


def is_fixable(fixed_version: str, status: str) -> bool:
    return bool(fixed_version) and status not in NOT_FIXABLE_STATUSES


def fits(values: list[str], limit: int) -> bool:
    """Whether every value is at most `limit` characters with no character a Text/ShortText forbids.

    One pass over all of a report's strings at once: per-string checks cost more than the rest of normalize.
    UTF-8 never uses the bytes 0x00-0x1F and 0x7F inside a multi-byte character, so a byte scan is exact.
    """
    if not values:
        return True
    if max(map(len, values)) > limit:
        return False
    return _CONTROL not in "".join(values).encode("utf-8", "surrogatepass").translate(_CONTROL_MAP)


def _findings(results: list[trivy.Result]) -> tuple[list[Finding], bool]:
    """Every finding with Trivy's strings as they are, and whether all of those strings already fit their types."""
    findings: list[Finding] = []
    shorts: list[str] = []
    texts: list[str] = []
    for result in results:
        if not result.vulnerabilities:
            continue
        target, klass, pkg_type = result.target, result.klass, result.type
        texts.append(target)
        shorts += (klass, pkg_type)
        for vuln in result.vulnerabilities:
            score, vector = best_cvss(vuln.cvss)
            fixed, status = vuln.fixed_version, vuln.status
            layer = vuln.layer.diff_id if vuln.layer is not None else ""
            purl = vuln.pkg_identifier.purl if vuln.pkg_identifier is not None else ""
            # Positional: by keyword, building the Finding would cost as much as everything else here.
            finding = Finding(
                vuln.vulnerability_id,
                vuln.pkg_name,
                vuln.installed_version,
                _SEVERITY.get(vuln.severity) or severity(vuln.severity),
                fixed,
                status,
                bool(fixed) and status not in NOT_FIXABLE_STATUSES,
                score,
                vector,
                vuln.title,
                vuln.primary_url,
                target,
                klass,
                pkg_type,
                vuln.pkg_path,
                purl,
                layer,
            )
            findings.append(finding)
            shorts += (finding.id, finding.package, finding.installed_version, fixed, status, vector, layer)
            texts += (finding.title, finding.url, finding.pkg_path, purl)
    return findings, fits(shorts, SHORT_MAX) and fits(texts, TEXT_MAX)


def _cleaned(finding: Finding) -> Finding:
    """The slow path, for reports with an overlong or control-character string somewhere."""
    fixed, status = short_text(finding.fixed_version), short_text(finding.status)
    return Finding(
        id=short_text(finding.id),
        package=short_text(finding.package),
        installed_version=short_text(finding.installed_version),
        fixed_version=fixed,
        severity=finding.severity,
        status=status,
        fixable=is_fixable(fixed, status),
        cvss=finding.cvss,
        cvss_vector=short_text(finding.cvss_vector),
        title=text(finding.title),
        url=text(finding.url),
        target=text(finding.target),
        klass=short_text(finding.klass),
        pkg_type=short_text(finding.pkg_type),
        pkg_path=text(finding.pkg_path),
        purl=text(finding.purl),
        layer=short_text(finding.layer),
    )


def _misconfiguration(misconf: trivy.Misconfiguration, result: trivy.Result) -> Misconfiguration:
    return Misconfiguration(
        id=short_text(misconf.id or misconf.avd_id),
        title=text(misconf.title),
        severity=severity(misconf.severity),
        target=text(result.target),
        message=text(misconf.message),
        resolution=text(misconf.resolution),
        url=text(misconf.primary_url),
    )


def _secret(secret: trivy.Secret, result: trivy.Result) -> SecretFinding:
    return SecretFinding(
        rule_id=short_text(secret.rule_id),
        category=short_text(secret.category),
        severity=severity(secret.severity),
        title=text(secret.title),
        target=text(result.target),
        start_line=secret.start_line,
        match=short_text(secret.match),
    )


def _legacy_artifact(results: list[trivy.Result]) -> tuple[str, str, str]:
    """(artifact, OS family, OS name) recovered from a legacy report's OS target, or the first target."""
    for result in results:
        match = _LEGACY_OS_TARGET.match(result.target) if len(result.target) <= TEXT_MAX else None
        if match is not None and (not result.type or result.type == match["family"]):
            return match["artifact"], match["family"], match["name"]
    return (results[0].target if results else ""), "", ""


def normalize(
    trivy_report: trivy.TrivyReport, *, digest_ref: DigestRef | None = None, scan_id: ScanId | None = None
) -> Report:
    """podsweep's Report for one decoded Trivy report. Every vulnerability entry is kept, in Trivy's order."""
    results = trivy_report.results or []
    findings, clean = _findings(results)
    if not clean:
        findings = [_cleaned(f) for f in findings]
    counts = dict.fromkeys(SEVERITIES, 0)
    fixable = dict.fromkeys(SEVERITIES, 0)
    for finding in findings:
        counts[finding.severity] += 1
        if finding.fixable:
            fixable[finding.severity] += 1
    misconfigurations: list[Misconfiguration] = []
    secrets: list[SecretFinding] = []
    for result in results:
        misconfigurations.extend(
            _misconfiguration(m, result)
            for m in result.misconfigurations or ()
            if m.status in FAILED_MISCONFIG_STATUSES
        )
        secrets.extend(_secret(s, result) for s in result.secrets or ())

    if trivy_report.is_legacy:
        artifact, os_family, os_name = _legacy_artifact(results)
        eosl = False
    else:
        artifact = trivy_report.artifact_name
        os_info = trivy_report.metadata.os if trivy_report.metadata is not None else None
        os_family = os_info.family if os_info is not None else ""
        os_name = os_info.name if os_info is not None else ""
        eosl = os_info.eosl if os_info is not None else False

    return Report(
        digest_ref=digest_ref,
        scan_id=scan_id,
        source_format="legacy" if trivy_report.is_legacy else "v2",
        artifact=text(artifact),
        artifact_type=short_text(trivy_report.artifact_type),
        os_family=short_text(os_family),
        os_name=short_text(os_name),
        eosl=eosl,
        trivy_version=short_text(trivy_report.trivy.version) if trivy_report.trivy is not None else "",
        scanned_at=trivy_report.created_at,
        findings=findings,
        counts=SeverityCounts(**counts),
        fixable=SeverityCounts(**fixable),
        misconfigurations=misconfigurations,
        secrets=secrets,
    )


def parse(
    data: bytes,
    *,
    max_bytes: int = trivy.DEFAULT_MAX_BYTES,
    digest_ref: DigestRef | None = None,
    scan_id: ScanId | None = None,
) -> Report:
    """Decode and normalize an upload in one call; raises trivy.ParseError (the reason to quarantine it)."""
    return normalize(trivy.decode(data, max_bytes=max_bytes), digest_ref=digest_ref, scan_id=scan_id)


def finding_ref(finding: Finding) -> FindingRef:
    return FindingRef(
        id=finding.id,
        package=finding.package,
        installed_version=finding.installed_version,
        severity=finding.severity,
        fixed_version=finding.fixed_version,
    )


def _by_key(report: Report | None) -> dict[FindingKey, Finding]:
    """First finding per key: Trivy can list one package twice (two targets without a PkgPath)."""
    found: dict[FindingKey, Finding] = {}
    if report is not None:
        for finding in report.findings:
            found.setdefault(finding.key, finding)
    return found


def _order(finding: Finding) -> tuple[int, str, str, str, str]:
    return (_RANK[finding.severity], finding.id, finding.package, finding.installed_version, finding.pkg_path)


def diff(previous: Report | None, current: Report) -> tuple[list[FindingRef], list[FindingRef]]:
    """(new, fixed) since the previous report of the same digest, by Finding.key, most severe first.

    With no previous report everything is new (the event says first_report; the notifier decides what that means).
    A finding whose severity changed is neither new nor fixed.
    """
    before = _by_key(previous)
    now = _by_key(current)
    new = sorted((f for key, f in now.items() if key not in before), key=_order)
    fixed = sorted((f for key, f in before.items() if key not in now), key=_order)
    return [finding_ref(f) for f in new], [finding_ref(f) for f in fixed]
