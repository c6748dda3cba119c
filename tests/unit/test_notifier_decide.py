"""When the notifier alerts: a breach that is new for a workload and digest, once, with the new findings first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from podsweep.policy import Policy, RuleSettings, Suppression, load_policy
from schemas.alerts import MAX_ALERT_FINDINGS, AlertPayload, NotifyFingerprint
from schemas.events import ImageOptions, ReportStored, Severity, SeverityCounts, Workload
from schemas.report import Finding, Report
from services.notifier.decide import Decision, WorkloadRun, decide, fingerprint_key, image_without_digest

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HEX = "cd" * 32
DIGEST_REF = f"registry.example.com/shop/api@sha256:{HEX}"
API = Workload("Deployment", "api")
WORKER = Workload("Deployment", "worker")

POLICY = load_policy(
    """
defaults:
  threshold: {max_critical: 0, max_high: 2}
  destinations: [security]
destinations:
  - {name: security, kind: webhook, url: "https://hooks.example.com/x", hmac_key: {env: KEY}}
  - {name: team, kind: slack, url: {env: SLACK}}
  - {name: dojo, kind: defectdojo, url: "https://dojo.example.com", token: {env: DOJO}, product: Shop,
     engagement: Runtime}
rules:
  - name: quiet
    match: {namespaces: [sandbox]}
    destinations: []
  - name: team-route
    match: {routes: [team]}
    destinations: [team, dojo]
""",
    "test",
)


def finding(vuln: str, severity: Severity = "CRITICAL", fixable: bool = True, **extra: Any) -> Finding:
    return Finding(
        id=vuln,
        package="openssl",
        installed_version="3.0.1",
        fixed_version="3.0.9" if fixable else "",
        severity=severity,
        fixable=fixable,
        **extra,
    )


def report(*findings: Finding) -> Report:
    return Report(source_format="v2", digest_ref=DIGEST_REF, findings=list(findings))


def event(scan_id: str = "scan-0001") -> ReportStored:
    return ReportStored(
        cluster="prod",
        scan_id=scan_id,
        digest_ref=DIGEST_REF,
        report_key=f"reports/sha256/{HEX}/latest.json",
        history_key=f"reports/sha256/{HEX}/history/20261123t120000000000z.json",
        counts=SeverityCounts(),
        fixable=SeverityCounts(),
        stored_at=NOW,
    )


def run(
    workload: Workload = API,
    namespace: str = "shop",
    image: str = "registry.example.com/shop/api:1.4",
    **options: Any,
) -> WorkloadRun:
    return WorkloadRun(namespace=namespace, workload=workload, image=image, options=ImageOptions(**options))


def key(workload: Workload = API, namespace: str = "shop") -> str:
    return fingerprint_key("prod", DIGEST_REF, namespace, workload)


def once(
    found: list[Finding],
    previous: dict[str, NotifyFingerprint] | None = None,
    runs: list[WorkloadRun] | None = None,
    scan_id: str = "scan-0001",
    policy: Policy = POLICY,
) -> Decision:
    return decide(event(scan_id), report(*found), runs or [run()], policy, previous or {}, NOW)


def remembered(decision: Decision, previous: dict[str, NotifyFingerprint] | None = None) -> dict[str, Any]:
    """What the shell's KV holds after storing a decision's fingerprints."""
    return {**(previous or {}), **decision.fingerprints}


CRIT = finding("CVE-1")
HIGHS = [finding(f"CVE-H{i}", "HIGH") for i in range(3)]


def test_first_breach_alerts_once_with_every_finding_new() -> None:
    decision = once([CRIT])
    assert len(decision.alerts) == 1
    payload = decision.alerts[0].payload
    assert decision.alerts[0].destinations == ["security"]
    assert (payload.new_count, [f.id for f in payload.findings], payload.findings[0].new) == (1, ["CVE-1"], True)
    assert payload.reasons == ["1 CRITICAL (more than 0)"]
    assert decision.fingerprints[key()].breach


def test_a_rescan_with_nothing_new_stays_quiet_and_writes_nothing() -> None:
    first = once([CRIT, HIGHS[0]])
    again = once([HIGHS[0], CRIT], remembered(first), scan_id="scan-0002")
    assert again.alerts == [] and again.fingerprints == {}


@pytest.mark.parametrize(
    ("before", "after", "alerts", "new"),
    [
        pytest.param([CRIT], [CRIT, finding("CVE-2")], True, ["CVE-2"], id="new-finding-while-in-breach"),
        pytest.param(HIGHS[:2], HIGHS, True, ["CVE-H2"], id="threshold-newly-crossed"),
        pytest.param([CRIT, finding("CVE-2")], [CRIT], False, [], id="a-fix-alone-is-not-news"),
        pytest.param([CRIT], [], False, [], id="breach-resolved"),
        pytest.param([finding("CVE-M", "MEDIUM")], [finding("CVE-M", "MEDIUM")], False, [], id="never-in-breach"),
        pytest.param([CRIT], [finding("CVE-1", "CRITICAL", pkg_path="x")], True, ["CVE-1"], id="same-cve-other-path"),
    ],
)
def test_only_a_breach_that_is_new_for_the_workload_alerts(
    before: list[Finding], after: list[Finding], alerts: bool, new: list[str]
) -> None:
    first = once(before)
    second = once(after, remembered(first), scan_id="scan-0002")
    assert bool(second.alerts) is alerts
    if alerts:
        payload = second.alerts[0].payload
        assert [f.id for f in payload.findings if f.new] == new
        assert payload.new_count == len(new)


def test_new_findings_are_listed_first_then_the_rest_worst_first() -> None:
    first = once([finding("CVE-OLD", "CRITICAL")])
    second = once(
        [finding("CVE-OLD", "CRITICAL"), finding("CVE-NEW", "HIGH"), finding("CVE-NEW2", "CRITICAL")],
        remembered(first),
        scan_id="scan-0002",
    )
    findings = second.alerts[0].payload.findings
    assert [(f.id, f.new) for f in findings] == [("CVE-NEW2", True), ("CVE-NEW", True), ("CVE-OLD", False)]


def test_breach_fixed_then_back_alerts_again() -> None:
    state = remembered(once([CRIT]))
    state = remembered(once([], state, scan_id="scan-0002"), state)
    back = once([CRIT], state, scan_id="scan-0003")
    assert len(back.alerts) == 1


def test_a_stricter_policy_alerts_on_findings_that_did_not_breach_before() -> None:
    state = remembered(once(HIGHS[:2]))
    strict = msgspec.structs.replace(
        POLICY, defaults=msgspec.convert({"threshold": {"max_high": 0}, "destinations": ["security"]}, RuleSettings)
    )
    decision = once(HIGHS[:2], state, scan_id="scan-0002", policy=strict)
    assert len(decision.alerts) == 1
    assert decision.alerts[0].payload.new_count == 0  # nothing new in the image: the threshold moved


def test_a_redelivered_event_after_its_fingerprint_was_stored_does_nothing() -> None:
    first = once([CRIT])
    assert once([CRIT], remembered(first)) == Decision()


def test_deciding_the_same_event_twice_gives_the_same_alert_key() -> None:
    """The shell crashed after sending, before storing the fingerprint: deciding the event again later (nothing
    remembered) gives the receiver the same key, and another scan of the digest another key."""
    later = decide(event(), report(CRIT), [run()], POLICY, {}, NOW + timedelta(minutes=5))
    assert later.alerts[0].key == once([CRIT]).alerts[0].key
    assert once([CRIT]).alerts[0].key != once([CRIT], scan_id="scan-0002").alerts[0].key


def test_one_message_per_workload_however_many_pods() -> None:
    runs = [run(), run(image=f"registry.example.com/shop/api@sha256:{HEX}"), run(WORKER), run(namespace="shop-eu")]
    decision = once([CRIT], runs=runs)
    identities = [(a.payload.namespace, a.payload.workload.name) for a in decision.alerts]
    assert identities == [("shop", "api"), ("shop", "worker"), ("shop-eu", "api")]
    assert len({a.key for a in decision.alerts}) == 3
    assert decision.alerts[0].payload.image == "registry.example.com/shop/api:1.4"


def test_an_expired_suppression_realerts_and_says_so() -> None:
    def with_suppression(expires: datetime) -> Policy:
        entry = {"id": "CVE-1", "owner": "bob", "reason": "accepted", "expires": expires}
        return msgspec.structs.replace(POLICY, suppressions=[msgspec.convert(entry, Suppression)])

    quiet = once([CRIT], policy=with_suppression(NOW + timedelta(days=1)))
    assert quiet.alerts == []
    loud = once([CRIT], remembered(quiet), scan_id="scan-0002", policy=with_suppression(NOW - timedelta(days=1)))
    payload = loud.alerts[0].payload
    assert payload.expired_suppressions == 1
    assert payload.findings[0].expired_suppression is not None
    assert payload.findings[0].expired_suppression.owner == "bob"


def test_a_rule_without_destinations_remembers_but_sends_nothing() -> None:
    decision = once([CRIT], runs=[run(namespace="sandbox")])
    assert decision.alerts == [] and decision.uploads == []
    assert decision.fingerprints[key(namespace="sandbox")].breach


@pytest.mark.parametrize(
    ("annotations", "alerts"),
    [
        pytest.param([True], False, id="every-pod-ignores-unfixed"),
        pytest.param([True, False], True, id="one-pod-does-not"),
        pytest.param([False], True, id="default-counts-unfixed"),
    ],
)
def test_ignore_unfixed_annotation_applies_when_every_pod_asks(annotations: list[bool], alerts: bool) -> None:
    runs = [run(image=f"registry.example.com/shop/api:{i}", ignore_unfixed=v) for i, v in enumerate(annotations)]
    assert bool(once([finding("CVE-U", fixable=False)], runs=runs).alerts) is alerts


def test_the_notify_route_picks_the_rule_and_defectdojo_gets_an_upload() -> None:
    decision = once([finding("CVE-M", "MEDIUM")], runs=[run(notify="team")])
    assert decision.alerts == []  # no breach: no message...
    [upload] = decision.uploads  # ...but DefectDojo gets every report of a routed digest
    assert (upload.destination, upload.test_title) == ("dojo", "registry.example.com/shop/api:1.4")
    assert upload.raw_key == f"raw/sha256/{HEX}/scan-0001.json"
    breach = once([CRIT], runs=[run(notify="team")])
    assert breach.alerts[0].destinations == ["team"]
    assert breach.alerts[0].payload.route == "team"


@pytest.mark.parametrize(
    ("image", "title"),
    [
        pytest.param(f"r.example.com/a/b:1.2@sha256:{HEX}", "r.example.com/a/b:1.2", id="tag-and-digest"),
        pytest.param(f"r.example.com/a/b@sha256:{HEX}", "r.example.com/a/b", id="digest-only"),
        pytest.param("localhost:5000/b:3", "localhost:5000/b:3", id="tag-only-with-port"),
    ],
)
def test_defectdojo_test_title_is_the_image_without_its_digest(image: str, title: str) -> None:
    assert image_without_digest(image) == title


def test_hostile_scanner_text_becomes_a_valid_payload() -> None:
    hostile = finding("CVE-1", title="line1\nline2\x1b[31m" + "x" * 400, url="javascript:alert(1)")
    payload = once([hostile]).alerts[0].payload
    decoded = msgspec.json.decode(msgspec.json.encode(payload), type=AlertPayload)  # the schema's own constraints
    assert "\n" not in decoded.findings[0].title and "\x1b" not in decoded.findings[0].title
    assert len(decoded.findings[0].title) <= 256
    assert decoded.findings[0].url == ""


def test_a_huge_report_lists_a_bounded_number_and_counts_the_rest() -> None:
    many = [finding(f"CVE-{i:05d}") for i in range(MAX_ALERT_FINDINGS + 7)]
    payload = once(many).alerts[0].payload
    assert (len(payload.findings), payload.omitted, payload.counts.CRITICAL) == (MAX_ALERT_FINDINGS, 7, len(many))
