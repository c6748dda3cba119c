"""`podsweep check --fail-on`: exit 0 when nothing at or above the severity remains, 1 with the rows when it does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from podsweep.policy import PolicyRule, Suppression
from schemas.events import Severity
from schemas.report import Finding, Report
from services.notifier.check import check

NOW = datetime(2026, 11, 23, tzinfo=UTC)
IMAGE = "registry.example.com/shop/api:1.4"


def finding(vuln: str, severity: Severity, fixable: bool = True, cvss: float | None = None) -> Finding:
    return Finding(
        id=vuln,
        package="zlib",
        installed_version="1.2.13",
        fixed_version="1.3" if fixable else "",
        severity=severity,
        fixable=fixable,
        cvss=cvss,
    )


REPORT = Report(
    source_format="v2",
    findings=[
        finding("CVE-L", "LOW"),
        finding("CVE-H", "HIGH", cvss=7.5),
        finding("CVE-M", "MEDIUM"),
        finding("CVE-C", "CRITICAL", fixable=False),
    ],
)


def suppress(vuln: str, days: int = 30, **extra: Any) -> Suppression:
    values = {"id": vuln, "owner": "ci@example.com", "reason": "accepted", "expires": NOW + timedelta(days=days)}
    return msgspec.convert(values | extra, Suppression)


@pytest.mark.parametrize(
    ("fail_on", "rule", "suppressions", "exit_code", "ids"),
    [
        pytest.param("CRITICAL", PolicyRule(), [], 1, ["CVE-C"], id="critical-present"),
        pytest.param("HIGH", PolicyRule(), [], 1, ["CVE-C", "CVE-H"], id="at-or-above-worst-first"),
        pytest.param("UNKNOWN", PolicyRule(), [], 1, ["CVE-C", "CVE-H", "CVE-M", "CVE-L"], id="everything"),
        pytest.param("CRITICAL", PolicyRule(ignore_unfixed=True), [], 0, [], id="ignore-unfixed-passes"),
        pytest.param("CRITICAL", PolicyRule(fixable_only=True), [], 0, [], id="fixable-only-passes"),
        pytest.param("CRITICAL", PolicyRule(), [suppress("CVE-C")], 0, [], id="suppressed-passes"),
        pytest.param("CRITICAL", PolicyRule(), [suppress("CVE-C", days=-1)], 1, ["CVE-C"], id="expired-fails"),
        pytest.param("HIGH", PolicyRule(min_cvss=8.0), [suppress("CVE-C")], 0, [], id="min-cvss-filters-high"),
        pytest.param(
            "CRITICAL", PolicyRule(), [suppress("CVE-C", namespace="other")], 1, ["CVE-C"], id="other-namespace"
        ),
    ],
)
def test_check_exit_code_and_rows(
    fail_on: Severity, rule: PolicyRule, suppressions: list[Suppression], exit_code: int, ids: list[str]
) -> None:
    result = check(REPORT, fail_on, rule, suppressions, "shop", IMAGE, NOW)
    assert (result.exit_code, [r.id for r in result.rows]) == (exit_code, ids)


def test_threshold_does_not_apply_fail_on_does() -> None:
    """A policy that tolerates 5 HIGH still fails `--fail-on HIGH`: the CI gate is stricter by choice."""
    lenient = msgspec.structs.replace(
        PolicyRule(), threshold=msgspec.structs.replace(PolicyRule().threshold, max_critical=9)
    )
    assert check(REPORT, "HIGH", lenient, [], None, IMAGE, NOW).exit_code == 1


def test_rows_say_which_suppression_expired_and_count_what_was_left_out() -> None:
    result = check(REPORT, "MEDIUM", PolicyRule(ignore_unfixed=True), [suppress("CVE-H", days=-2)], None, IMAGE, NOW)
    assert [(r.id, r.note) for r in result.rows] == [
        ("CVE-H", "suppression by ci@example.com expired 2026-11-21"),
        ("CVE-M", ""),
    ]
    assert (result.suppressed, result.not_counted) == (0, 1)


def test_a_clean_report_passes() -> None:
    result = check(Report(source_format="legacy"), "LOW", PolicyRule(), [], None, IMAGE, NOW)
    assert (result.exit_code, result.rows) == (0, [])
