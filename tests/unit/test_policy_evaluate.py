"""Which rule applies, what counts, what is suppressed, and what the notifier remembers (the fingerprint)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from podsweep.policy import (
    PolicyRule,
    Suppression,
    evaluate,
    fingerprint,
    load_policy,
    rule_for,
)
from schemas.alerts import Threshold
from schemas.events import Severity, Workload
from schemas.report import Finding, Report

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HEX = "ab" * 32
IMAGE = f"registry.example.com/payments/api@sha256:{HEX}"


def finding(
    vuln: str = "CVE-2026-0001",
    severity: Severity = "CRITICAL",
    package: str = "openssl",
    fixable: bool = True,
    cvss: float | None = 9.8,
    **extra: Any,
) -> Finding:
    return Finding(
        id=vuln,
        package=package,
        installed_version="3.0.1",
        fixed_version="3.0.9" if fixable else "",
        severity=severity,
        fixable=fixable,
        cvss=cvss,
        **extra,
    )


def report(*findings: Finding) -> Report:
    return Report(source_format="v2", digest_ref=IMAGE, findings=list(findings))


def suppression(**fields: Any) -> Suppression:
    values: dict[str, Any] = {
        "id": "CVE-2026-0001",
        "owner": "alice@example.com",
        "reason": "accepted",
        "expires": NOW + timedelta(days=30),
    } | fields
    return msgspec.convert(values, Suppression)


RULES = load_policy(
    """
defaults:
  threshold: {max_critical: 0, max_high: 5}
  destinations: [security]
destinations:
  - {name: security, kind: slack, url: {env: SEC}}
  - {name: payments, kind: slack, url: {env: PAY}}
rules:
  - name: payments-api
    match: {namespaces: ["payments-*"], workloads: ["Deployment/api-*"]}
    threshold: {max_high: 0}
    destinations: [payments]
  - name: payments-any
    match: {namespaces: ["payments-*"]}
    fixable_only: true
  - name: batch-route
    match: {routes: ["batch*"]}
    threshold: {max_critical: null, max_high: null, max_medium: 10}
  - name: named-worker
    match: {workloads: ["worker-?"]}
    min_cvss: 7.0
"""
)


@pytest.mark.parametrize(
    ("namespace", "workload", "route", "rule"),
    [
        pytest.param("payments-prod", Workload("Deployment", "api-v2"), None, "payments-api", id="kind-and-name-glob"),
        pytest.param("payments-prod", Workload("StatefulSet", "api-v2"), None, "payments-any", id="kind-must-match"),
        pytest.param("payments-prod", None, None, "payments-any", id="no-workload-skips-workload-rules"),
        pytest.param("default", Workload("Deployment", "api-v2"), None, "defaults", id="namespace-must-match-too"),
        pytest.param("default", Workload("CronJob", "nightly"), "batch-eu", "batch-route", id="route-glob"),
        pytest.param("default", Workload("CronJob", "nightly"), None, "defaults", id="no-route-no-route-rule"),
        pytest.param("payments-prod", Workload("Job", "x"), "batch", "payments-any", id="first-match-wins"),
        pytest.param("default", Workload("Deployment", "worker-1"), None, "named-worker", id="name-only-glob-any-kind"),
        pytest.param("default", Workload("Deployment", "worker-10"), None, "defaults", id="question-mark-is-one-char"),
        pytest.param(None, Workload("Deployment", "api-v2"), None, "defaults", id="local-report-has-no-namespace"),
    ],
)
def test_the_first_matching_rule_applies(
    namespace: str | None, workload: Workload | None, route: str | None, rule: str
) -> None:
    assert rule_for(RULES, namespace, workload, route).name == rule


@pytest.mark.parametrize(
    ("namespace", "workload", "route", "expected"),
    [
        pytest.param(
            "payments-prod",
            Workload("Deployment", "api-v1"),
            None,
            PolicyRule(name="payments-api", threshold=Threshold(max_critical=0, max_high=0), destinations=["payments"]),
            id="rule-overrides-one-severity-inherits-the-other",
        ),
        pytest.param(
            "payments-prod",
            Workload("Job", "x"),
            None,
            PolicyRule(
                name="payments-any",
                threshold=Threshold(max_critical=0, max_high=5),
                fixable_only=True,
                destinations=["security"],
            ),
            id="rule-without-threshold-inherits-defaults",
        ),
        pytest.param(
            "default",
            Workload("Job", "x"),
            "batch",
            PolicyRule(
                name="batch-route",
                threshold=Threshold(max_critical=None, max_high=None, max_medium=10),
                destinations=["security"],
            ),
            id="null-means-no-limit",
        ),
    ],
)
def test_rules_inherit_from_defaults_setting_by_setting(
    namespace: str, workload: Workload, route: str | None, expected: PolicyRule
) -> None:
    assert rule_for(RULES, namespace, workload, route) == expected


def test_without_a_policy_one_critical_is_a_breach() -> None:
    rule = rule_for(load_policy(""), "default", None, None)
    assert evaluate(rule, [], report(finding()), "default", IMAGE, NOW).breach
    assert not evaluate(rule, [], report(finding(severity="HIGH")), "default", IMAGE, NOW).breach


THRESHOLD = PolicyRule(threshold=Threshold(max_critical=0, max_high=5))


@pytest.mark.parametrize(
    ("findings", "breach", "reasons"),
    [
        pytest.param([], False, [], id="clean-image"),
        pytest.param([finding(severity="HIGH", vuln=f"CVE-{i}") for i in range(5)], False, [], id="exactly-at-limit"),
        pytest.param(
            [finding(severity="HIGH", vuln=f"CVE-{i}") for i in range(6)],
            True,
            ["6 HIGH (more than 5)"],
            id="one-over-the-high-limit",
        ),
        pytest.param([finding()], True, ["1 CRITICAL (more than 0)"], id="one-critical"),
        pytest.param(
            [finding(), *(finding(severity="HIGH", vuln=f"CVE-{i}") for i in range(6))],
            True,
            ["1 CRITICAL (more than 0)", "6 HIGH (more than 5)"],
            id="both-limits-named",
        ),
        pytest.param([finding(severity="MEDIUM", vuln=f"CVE-{i}") for i in range(50)], False, [], id="no-medium-limit"),
    ],
)
def test_a_breach_is_more_than_the_limit(findings: list[Finding], breach: bool, reasons: list[str]) -> None:
    verdict = evaluate(THRESHOLD, [], report(*findings), "default", IMAGE, NOW)
    assert (verdict.breach, verdict.reasons) == (breach, reasons)


@pytest.mark.parametrize(
    ("rule", "item", "where"),
    [
        pytest.param(PolicyRule(), finding(fixable=False), "counted", id="unfixed-counts-by-default"),
        pytest.param(
            PolicyRule(fixable_only=True), finding(fixable=False), "uncounted", id="fixable-only-shows-unfixed"
        ),
        pytest.param(PolicyRule(fixable_only=True), finding(fixable=True), "counted", id="fixable-only-counts-fixable"),
        pytest.param(PolicyRule(ignore_unfixed=True), finding(fixable=False), "ignored", id="ignore-unfixed-drops-it"),
        pytest.param(
            PolicyRule(ignore_unfixed=True), finding(fixable=True), "counted", id="ignore-unfixed-keeps-fixable"
        ),
        pytest.param(PolicyRule(min_cvss=7.0), finding(cvss=6.9), "uncounted", id="below-min-cvss"),
        pytest.param(PolicyRule(min_cvss=7.0), finding(cvss=7.0), "counted", id="at-min-cvss"),
        pytest.param(PolicyRule(min_cvss=7.0), finding(cvss=None), "counted", id="unknown-cvss-is-not-low"),
    ],
)
def test_filters_decide_what_counts(rule: PolicyRule, item: Finding, where: str) -> None:
    verdict = evaluate(rule, [], report(item), "default", IMAGE, NOW)
    placed = {
        "counted": verdict.counted,
        "uncounted": verdict.uncounted,
        "ignored": [item] * verdict.ignored_unfixed,
    }
    assert placed[where] == [item]
    assert sum(len(v) for v in placed.values()) == 1
    assert verdict.breach == (where == "counted")


@pytest.mark.parametrize(
    ("fields", "namespace", "suppressed"),
    [
        pytest.param({}, "payments-prod", True, id="id-alone-everywhere"),
        pytest.param({"id": "cve-2026-0001"}, "payments-prod", True, id="id-case-insensitive"),
        pytest.param({"id": "CVE-2026-0002"}, "payments-prod", False, id="other-cve"),
        pytest.param({"package": "openssl"}, "payments-prod", True, id="same-package"),
        pytest.param({"package": "libssl*"}, "payments-prod", False, id="other-package"),
        pytest.param({"namespace": "payments-*"}, "payments-prod", True, id="namespace-glob"),
        pytest.param({"namespace": "payments-dev"}, "payments-prod", False, id="other-namespace"),
        pytest.param({"namespace": "payments-prod"}, None, False, id="namespace-narrowed-but-none-given"),
        pytest.param({"image": "registry.example.com/payments/*"}, "x", True, id="repository-glob"),
        pytest.param({"image": "registry.example.com/payments/api"}, "x", True, id="exact-repository"),
        pytest.param({"image": "docker.io/*"}, "x", False, id="other-registry"),
        pytest.param({"image": f"*@sha256:{HEX[:8]}*"}, "x", True, id="digest-glob"),
        pytest.param({"image": "*@sha256:0000*"}, "x", False, id="other-digest"),
        pytest.param({"expires": NOW}, "x", False, id="expires-exactly-now"),
        pytest.param({"expires": NOW + timedelta(seconds=1)}, "x", True, id="expires-in-a-second"),
    ],
)
def test_suppressions_narrow_by_package_image_and_namespace(
    fields: dict[str, Any], namespace: str | None, suppressed: bool
) -> None:
    verdict = evaluate(THRESHOLD, [suppression(**fields)], report(finding()), namespace, IMAGE, NOW)
    assert [s.finding.id for s in verdict.suppressed] == (["CVE-2026-0001"] if suppressed else [])
    assert verdict.breach is not suppressed


def test_a_suppressed_finding_says_who_and_why() -> None:
    verdict = evaluate(THRESHOLD, [suppression(reason="mesh TLS")], report(finding()), "x", IMAGE, NOW)
    assert verdict.suppressed[0].suppression.owner == "alice@example.com"
    assert verdict.suppressed[0].suppression.reason == "mesh TLS"
    assert verdict.counts.CRITICAL == 0


def test_an_expired_suppression_counts_again_and_says_so() -> None:
    lapsed = suppression(expires=NOW - timedelta(days=1), owner="bob")
    verdict = evaluate(THRESHOLD, [lapsed], report(finding()), "x", IMAGE, NOW)
    assert verdict.breach
    assert [f.id for f in verdict.counted] == ["CVE-2026-0001"]
    assert [(s.finding.id, s.suppression.owner) for s in verdict.expired] == [("CVE-2026-0001", "bob")]


def test_an_active_suppression_wins_over_an_expired_one() -> None:
    both = [suppression(expires=NOW - timedelta(days=1)), suppression(owner="carol")]
    verdict = evaluate(THRESHOLD, both, report(finding()), "x", IMAGE, NOW)
    assert not verdict.breach and verdict.expired == []
    assert verdict.suppressed[0].suppression.owner == "carol"


def test_an_expired_suppression_on_a_finding_that_does_not_count_is_not_announced() -> None:
    lapsed = suppression(expires=NOW - timedelta(days=1))
    verdict = evaluate(PolicyRule(min_cvss=9.9), [lapsed], report(finding(cvss=5.0)), "x", IMAGE, NOW)
    assert verdict.expired == [] and verdict.uncounted != []


def test_counted_findings_are_worst_first_whatever_the_report_order() -> None:
    items = [
        finding("CVE-B", "HIGH", cvss=7.5),
        finding("CVE-A", "CRITICAL", cvss=None),
        finding("CVE-C", "CRITICAL", cvss=9.1),
        finding("CVE-D", "HIGH", cvss=8.0),
    ]
    verdict = evaluate(PolicyRule(), [], report(*items), "x", IMAGE, NOW)
    assert [f.id for f in verdict.counted] == ["CVE-C", "CVE-A", "CVE-D", "CVE-B"]


def test_fingerprint_ignores_report_order_and_display_fields() -> None:
    a, b = finding("CVE-1"), finding("CVE-2", "HIGH")
    first = fingerprint(evaluate(THRESHOLD, [], report(a, b), "x", IMAGE, NOW), "scan-0001")
    reworded = msgspec.structs.replace(b, title="new title", url="https://example.com", cvss=5.0)
    second = fingerprint(evaluate(THRESHOLD, [], report(reworded, a), "x", IMAGE, NOW), "scan-0002")
    assert (first.breach, first.findings) == (second.breach, second.findings)
    assert len(first.findings) == 2


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"installed_version": "3.0.2"}, id="other-installed-version"),
        pytest.param({"package": "libssl3"}, id="other-package"),
        pytest.param({"pkg_path": "usr/lib/app.jar"}, id="other-path"),
        pytest.param({"id": "CVE-2026-9999"}, id="other-cve"),
    ],
)
def test_fingerprint_changes_when_a_finding_identity_changes(changed: dict[str, Any]) -> None:
    base = finding()
    before = fingerprint(evaluate(THRESHOLD, [], report(base), "x", IMAGE, NOW))
    after = fingerprint(evaluate(THRESHOLD, [], report(msgspec.structs.replace(base, **changed)), "x", IMAGE, NOW))
    assert before.findings != after.findings


def test_fingerprint_is_stable_across_processes() -> None:
    """A stored fingerprint must match after a restart or upgrade: SHA-256 of "id\\x1fpackage\\x1fversion\\x1fpath"."""
    verdict = evaluate(THRESHOLD, [], report(finding()), "x", IMAGE, NOW)
    assert fingerprint(verdict).findings == ["97d27c7a3c4a662b"]
