"""`podsweep check --fail-on SEVERITY`: does anything at or above a severity remain after policy and suppressions?

Pure: the CLI reads the report (exit 2 when it cannot), picks the rule, and prints the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import msgspec

from podsweep.policy import PolicyRule, Suppression, evaluate, finding_hash, severity_at_least
from schemas.events import Severity
from schemas.report import Report


class CheckRow(msgspec.Struct, frozen=True, kw_only=True):
    severity: Severity
    id: str
    package: str
    installed_version: str
    fixed_version: str = ""
    cvss: float | None = None
    note: str = ""  # e.g. that a suppression expired


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """Exit 0 when nothing at or above `fail_on` remains, 1 when `rows` lists what does."""

    exit_code: Literal[0, 1]
    rows: list[CheckRow]
    suppressed: int = 0
    not_counted: int = 0


def check(
    report: Report,
    fail_on: Severity,
    rule: PolicyRule,
    suppressions: Sequence[Suppression],
    namespace: str | None,
    image: str,
    now: datetime,
) -> CheckResult:
    """The policy's filters (ignore-unfixed, fixable-only, min CVSS) and suppressions apply; its threshold does not:
    `fail_on` is the threshold here."""
    verdict = evaluate(rule, suppressions, report, namespace, image, now)
    expired = {finding_hash(s.finding): s.suppression for s in verdict.expired}
    rows = []
    for finding in verdict.counted:
        if not severity_at_least(finding.severity, fail_on):
            continue
        lapsed = expired.get(finding_hash(finding))
        note = f"suppression by {lapsed.owner} expired {lapsed.expires:%Y-%m-%d}" if lapsed else ""
        rows.append(
            CheckRow(
                severity=finding.severity,
                id=finding.id,
                package=finding.package,
                installed_version=finding.installed_version,
                fixed_version=finding.fixed_version,
                cvss=finding.cvss,
                note=note,
            )
        )
    return CheckResult(
        exit_code=1 if rows else 0,
        rows=rows,
        suppressed=len(verdict.suppressed),
        not_counted=len(verdict.uncounted) + verdict.ignored_unfixed,
    )
