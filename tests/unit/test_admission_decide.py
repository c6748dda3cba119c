"""The admission decision: modes, tags, unknown images, suppressions, bypasses, templates and hostile input."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from podsweep.config import AdmissionBypass, AdmissionSettings, ConfigError, Settings, load_settings
from podsweep.policy import Policy, load_policy
from schemas.events import ReportStored, SeverityCounts, Workload
from schemas.report import Finding
from services.admission import review
from services.admission.decide import (
    BYPASS_EXPIRES,
    BYPASS_LABEL,
    BYPASS_OWNER,
    BYPASS_REASON,
    MAX_WARNINGS,
    WARNING_CHARS,
    Decision,
    GateRules,
    VerdictCache,
    decide,
    rules_from,
)
from services.admission.view import View, compact
from tests.harness.admission import deployment, pod, seen
from tests.harness.admission import review as review_body

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
REPO = "registry.example.com/team/app"
BAD = f"{REPO}@sha256:{'b' * 64}"
CLEAN = f"{REPO}@sha256:{'c' * 64}"
UNSCANNED = f"{REPO}@sha256:{'d' * 64}"
NEVER = f"{REPO}@sha256:{'e' * 64}"
CVE = "CVE-2026-1111"


def critical(vuln: str = CVE, package: str = "openssl") -> Finding:
    return Finding(
        id=vuln,
        package=package,
        installed_version="3.0.1",
        severity="CRITICAL",
        fixed_version="3.0.9",
        fixable=True,
        cvss=9.8,
    )


def stored(ref: str, counts: SeverityCounts, scan_id: str = "scan-0001", at: datetime = NOW) -> ReportStored:
    return ReportStored(
        cluster="default",
        scan_id=scan_id,
        digest_ref=ref,
        report_key="reports/x.json",
        history_key="reports/h.json",
        counts=counts,
        fixable=counts,
        stored_at=at - timedelta(hours=1),
    )


def make_view() -> View:
    view = View()
    view.apply_report(stored(BAD, SeverityCounts(CRITICAL=1)))
    view.apply_findings("b" * 64, "scan-0001", compact([critical()]))
    view.apply_report(stored(CLEAN, SeverityCounts()))
    view.apply_seen(seen(f"{REPO}:1.0", BAD, NOW - timedelta(hours=2)))
    view.apply_seen(seen(f"{REPO}:2.0", CLEAN, NOW - timedelta(hours=2)))
    view.apply_seen(seen(f"{REPO}:new", UNSCANNED, NOW - timedelta(hours=2)))
    return view


RULES = GateRules(cluster="default", default_mode="warn", modes=(("prod-*", "enforce"), ("sandbox", "off")))
POLICY = Policy()


def request(obj: dict[str, Any], namespace: str = "prod-a", **kw: Any) -> review.AdmissionRequest:
    return review.decode(json.dumps(review_body(obj, namespace, **kw)).encode())


def run(
    obj: dict[str, Any],
    namespace: str = "prod-a",
    *,
    rules: GateRules = RULES,
    policy: Policy = POLICY,
    view: View | None = None,
    cache: VerdictCache | None = None,
    **kw: Any,
) -> Decision:
    return decide(request(obj, namespace, **kw), view or make_view(), policy, rules, NOW, cache)


# ---------------------------------------------------------------------------------------------------------------


def test_enforce_denies_a_breaching_digest_naming_image_counts_findings_and_the_way_out() -> None:
    decision = run(pod("web", {"app": BAD}))
    assert not decision.response.allowed
    assert decision.response.status is not None and decision.response.status.code == 403
    message = decision.response.status.message
    for part in (BAD, "1 CRITICAL (more than 0)", CVE, "openssl 3.0.1", "fixed in 3.0.9", "suppression"):
        assert part in message
    assert decision.audit is not None and decision.audit.verdict == "deny" and not decision.audit.allowed
    assert decision.audit.images[0].findings == [CVE]
    assert decision.audit.user == "alice@example.com"


@pytest.mark.parametrize(
    ("namespace", "outcome", "allowed", "audited"),
    [
        ("prod-a", "deny", False, True),
        ("team-a", "warn", True, True),
        ("sandbox", "off", True, False),
        ("kube-system", "exempt", True, False),
        ("podsweep", "exempt", True, False),
    ],
    ids=["enforce-glob", "default-warn", "off", "kube-system-exempt", "podsweep-exempt"],
)
def test_mode_follows_the_namespace(namespace: str, outcome: str, allowed: bool, audited: bool) -> None:
    decision = run(pod("web", {"app": BAD}), namespace)
    assert (decision.outcome, decision.response.allowed, decision.audit is not None) == (outcome, allowed, audited)


def test_warn_mode_admits_with_warnings_that_name_the_findings() -> None:
    decision = run(pod("web", {"app": BAD}), "team-a")
    assert decision.response.allowed and decision.response.status is None
    assert any(CVE in w and "1 CRITICAL" in w for w in decision.response.warnings)


def test_a_clean_image_is_a_plain_allow_without_audit() -> None:
    decision = run(pod("web", {"app": CLEAN}))
    assert decision.response.allowed and decision.outcome == "allow"
    assert decision.audit is None and decision.response.warnings == []


def test_a_tag_resolves_through_the_last_digest_seen_running_it_and_says_tags_move() -> None:
    decision = run(pod("web", {"app": f"{REPO}:1.0"}))
    assert not decision.response.allowed
    assert decision.response.status is not None
    assert "tags move" in decision.response.status.message and "sha256:bbbbbbbbbbb" in decision.response.status.message
    assert decision.audit is not None
    assert decision.audit.images[0].resolution == "tag" and decision.audit.images[0].digest_ref == BAD


def test_a_tag_that_moved_to_a_clean_digest_is_admitted() -> None:
    view = make_view()
    view.apply_seen(seen(f"{REPO}:1.0", CLEAN, NOW - timedelta(minutes=5)))
    view.apply_seen(seen(f"{REPO}:1.0", BAD, NOW - timedelta(hours=3)))  # an older sighting arriving late
    assert run(pod("web", {"app": f"{REPO}:1.0"}), view=view).outcome == "allow"


@pytest.mark.parametrize(
    ("image", "unknown_images", "namespace", "allowed", "rescans"),
    [
        ("registry.example.com/other:1", "warn", "prod-a", True, ()),
        (NEVER, "warn", "prod-a", True, ()),
        (f"{REPO}:new", "warn", "prod-a", True, (UNSCANNED,)),
        (UNSCANNED, "warn", "team-a", True, (UNSCANNED,)),
        ("registry.example.com/other:1", "deny", "prod-a", False, ()),
        (f"{REPO}:new", "deny", "prod-a", False, (UNSCANNED,)),
        ("registry.example.com/other:1", "deny", "team-a", True, ()),
    ],
    ids=[
        "never-seen-tag-warns",
        "never-seen-digest-warns-without-scan-request",
        "known-unscanned-tag-requests-a-scan",
        "known-unscanned-digest-requests-a-scan",
        "strict-denies-unknown-in-enforce",
        "strict-denies-unscanned-but-still-requests",
        "strict-only-applies-in-enforce",
    ],
)
def test_an_unknown_image_follows_the_configured_mode(
    image: str, unknown_images: str, namespace: str, allowed: bool, rescans: tuple[str, ...]
) -> None:
    rules = replace(RULES, unknown_images=unknown_images)
    decision = run(pod("web", {"app": image}), namespace, rules=rules)
    assert decision.response.allowed is allowed
    assert decision.rescans == rescans
    assert decision.audit is not None and decision.audit.verdict == ("unknown" if allowed else "deny")
    if allowed:
        assert any("no report" in w for w in decision.response.warnings)


def test_a_dry_run_asks_for_no_scan() -> None:
    assert run(pod("web", {"app": UNSCANNED}), dry_run=True).rescans == ()


SUPPRESSING = load_policy(
    f"""
suppressions:
  - id: {CVE}
    image: "{REPO}"
    owner: sec-team@example.com
    reason: not reachable from the network, fix in next sprint
    expires: 2026-12-31
""",
)
EXPIRED = load_policy(
    f"""
suppressions:
  - id: {CVE}
    owner: sec-team@example.com
    reason: was accepted until the fix
    expires: 2026-11-01
""",
)


def test_a_suppression_lets_it_in_and_the_audit_names_owner_and_reason() -> None:
    decision = run(pod("web", {"app": BAD}), policy=SUPPRESSING)
    assert decision.response.allowed
    assert decision.audit is not None and decision.audit.verdict == "suppressed"
    notes = decision.audit.images[0].suppressions
    assert [(n.owner, n.reason) for n in notes] == [
        ("sec-team@example.com", "not reachable from the network, fix in next sprint")
    ]
    assert any("suppressed by sec-team@example.com" in w for w in decision.response.warnings)


def test_an_expired_suppression_denies_again() -> None:
    assert not run(pod("web", {"app": BAD}), policy=EXPIRED).response.allowed


def test_a_rule_for_the_namespace_sets_the_threshold() -> None:
    lenient = load_policy(
        "rules:\n  - name: legacy\n    match: {namespaces: [prod-legacy]}\n    threshold: {max_critical: 5}\n"
    )
    assert run(pod("web", {"app": BAD}), "prod-legacy", policy=lenient).outcome == "allow"
    assert run(pod("web", {"app": BAD}), "prod-a", policy=lenient).outcome == "deny"


HELM = AdmissionBypass(
    selector={"app.kubernetes.io/instance": "payments"},
    owner="platform@example.com",
    reason="release 4.2 ships before the base image fix; INC-1234",
    expires=NOW + timedelta(days=3),
)


@pytest.mark.parametrize(
    ("bypass", "labels", "verdict"),
    [
        (HELM, {"app.kubernetes.io/instance": "payments"}, "bypass"),
        (HELM, {"app.kubernetes.io/instance": "orders"}, "deny"),
        (
            msgspec.structs.replace(HELM, expires=NOW - timedelta(seconds=1)),
            {"app.kubernetes.io/instance": "payments"},
            "deny",
        ),
        (msgspec.structs.replace(HELM, namespaces=["prod-b"]), {"app.kubernetes.io/instance": "payments"}, "deny"),
    ],
    ids=["selector-matches", "other-release", "expired", "other-namespace"],
)
def test_a_configured_bypass_selects_by_label(bypass: AdmissionBypass, labels: dict[str, str], verdict: str) -> None:
    rules = replace(RULES, bypasses=(bypass,))
    decision = run(pod("web", {"app": BAD}, labels=labels), rules=rules)
    assert decision.outcome == verdict
    if verdict == "bypass":
        assert decision.response.allowed
        assert decision.audit is not None and decision.audit.bypass is not None
        assert decision.audit.bypass.owner == "platform@example.com"
        assert "INC-1234" in decision.audit.bypass.reason


def _annotated(owner: str = "dev@example.com", reason: str = "hotfix", expires: str = "2026-11-25") -> dict[str, Any]:
    return pod(
        "web",
        {"app": BAD},
        labels={BYPASS_LABEL: "true"},
        annotations={BYPASS_OWNER: owner, BYPASS_REASON: reason, BYPASS_EXPIRES: expires},
    )


@pytest.mark.parametrize(
    ("obj", "honoured_in", "verdict", "note"),
    [
        (_annotated(), ("prod-*",), "bypass", ""),
        (_annotated(expires="2026-11-24T08:00:00+02:00"), ("prod-*",), "bypass", ""),
        (_annotated(), (), "deny", "not honoured in namespace prod-a"),
        (_annotated(expires="2027-06-01"), ("prod-*",), "deny", "more than 30 days away"),
        (_annotated(expires="2026-11-01"), ("prod-*",), "deny", "expired"),
        (_annotated(expires="tomorrow"), ("prod-*",), "deny", "must be a date"),
        (_annotated(expires="2026-11-25T00:00:00"), ("prod-*",), "deny", "must be a date"),
        (_annotated(owner=""), ("prod-*",), "deny", "bypass-owner must be"),
        (_annotated(owner="x" * 129), ("prod-*",), "deny", "bypass-owner must be"),
        (_annotated(reason="a\x1b[31mred"), ("prod-*",), "deny", "bypass-reason must be"),
    ],
    ids=[
        "valid",
        "offset-time",
        "namespace-not-allowed",
        "too-far",
        "expired",
        "not-a-date",
        "naive-time",
        "no-owner",
        "owner-too-long",
        "control-characters",
    ],
)
def test_an_annotation_bypass_is_validated(
    obj: dict[str, Any], honoured_in: tuple[str, ...], verdict: str, note: str
) -> None:
    rules = replace(RULES, annotation_bypass_namespaces=honoured_in)
    decision = run(obj, rules=rules)
    assert decision.outcome == verdict
    if note:
        assert any(note in w for w in decision.response.warnings), decision.response.warnings


def test_a_deployment_template_is_judged_at_apply() -> None:
    decision = run(deployment("api", {"app": BAD}))
    assert not decision.response.allowed
    assert decision.audit is not None and decision.audit.workload == Workload(kind="Deployment", name="api")


def test_templates_are_skipped_when_not_checked() -> None:
    assert run(deployment("api", {"app": BAD}), rules=replace(RULES, check_templates=False)).outcome == "skipped"


def test_a_cronjob_job_template_is_judged() -> None:
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {
            "schedule": "@daily",
            "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "job", "image": BAD}]}}}},
        },
    }
    assert run(cron).outcome == "deny"


@pytest.mark.parametrize(
    ("old_image", "new_image", "outcome"),
    [(BAD, BAD, "allow"), (CLEAN, BAD, "deny"), (BAD, CLEAN, "allow")],
    ids=["scale-keeps-the-image", "update-brings-a-bad-image", "update-fixes-it"],
)
def test_an_update_is_judged_on_the_images_it_brings(old_image: str, new_image: str, outcome: str) -> None:
    decision = run(deployment("api", {"app": new_image}), operation="UPDATE", old=deployment("api", {"app": old_image}))
    assert decision.outcome == outcome


@pytest.mark.parametrize(
    ("obj", "operation", "outcome"),
    [
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}, "CREATE", "skipped"),
        (pod("web", {"app": BAD}), "DELETE", "skipped"),
        (pod("web", {}), "CREATE", "allow"),
    ],
    ids=["unknown-kind", "delete", "no-containers"],
)
def test_what_the_gate_does_not_judge_is_allowed_with_a_reason(
    obj: dict[str, Any], operation: str, outcome: str
) -> None:
    decision = run(obj, operation=operation)
    assert decision.response.allowed and decision.outcome == outcome


@pytest.mark.parametrize(
    "image",
    [
        "Registry.Example.com/UPPER:1",
        "a" * 5000,
        "repo:tag\n",
        "../../etc/passwd",
        "repo@sha256:" + "z" * 64,
        "\x1b[2Jclear",
        "",
        "日本/イメージ:1",
    ],
    ids=["upper-case", "huge", "newline", "path", "bad-digest", "escape", "empty", "unicode"],
)
def test_odd_image_references_are_unknown_and_bounded(image: str) -> None:
    decision = run(pod("web", {"app": image}), "team-a")
    assert decision.response.allowed and decision.outcome == "unknown"
    assert decision.audit is not None and decision.audit.images[0].digest_ref is None
    assert all(len(w) <= WARNING_CHARS and "\x1b" not in w and "\n" not in w for w in decision.response.warnings)
    msgspec.json.decode(msgspec.json.encode(decision.audit), type=type(decision.audit))  # the audit validates


def test_many_containers_give_bounded_warnings() -> None:
    images = {f"c{i}": f"registry.example.com/other{i}:1" for i in range(40)}
    decision = run(pod("web", images), "team-a")
    assert len(decision.response.warnings) <= MAX_WARNINGS
    assert decision.audit is not None and len(decision.audit.images) == 40


def test_counts_decide_until_findings_are_loaded() -> None:
    view = make_view()
    view.apply_report(stored(BAD, SeverityCounts(CRITICAL=2), scan_id="scan-0002", at=NOW + timedelta(minutes=1)))
    decision = run(pod("web", {"app": BAD}), view=view)
    assert decision.response.status is not None and "counts only" in decision.response.status.message


def test_a_replicaset_pod_belongs_to_its_deployment() -> None:
    obj = pod("api-7d9f8-abcde", {"app": BAD}, labels={"pod-template-hash": "7d9f8"})
    obj["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "name": "api-7d9f8", "controller": True}]
    decision = run(obj)
    assert decision.audit is not None and decision.audit.workload == Workload(kind="Deployment", name="api")


def test_a_generate_name_pod_is_audited_without_a_name() -> None:
    obj = pod("", {"app": BAD})
    obj["metadata"]["generateName"] = "worker-"
    decision = run(obj)
    assert decision.audit is not None and decision.audit.name is None
    assert decision.audit.workload == Workload(kind="Pod", name="worker")


def test_rules_come_from_settings_with_podsweep_namespace_exempt() -> None:
    settings = Settings(
        namespace="scanner",
        admission=AdmissionSettings(namespace_modes=["prod-*=enforce", "dev=off"], default_mode="warn"),
    )
    rules = rules_from(settings)
    assert [rules.mode_for(ns) for ns in ("prod-x", "dev", "other")] == ["enforce", "off", "warn"]
    assert rules.exempted("scanner") and rules.exempted("kube-system") and not rules.exempted("prod-x")


def test_a_cached_verdict_equals_a_fresh_one_until_a_suppression_expires_or_the_policy_changes() -> None:
    cache = VerdictCache()
    view = make_view()
    soon = load_policy(
        f"suppressions:\n  - id: {CVE}\n    owner: o@example.com\n    reason: r\n    expires: 2026-11-24\n"
    )
    first = run(pod("web", {"app": BAD}), policy=soon, view=view, cache=cache)
    again = run(pod("web", {"app": BAD}), policy=soon, view=view, cache=cache)
    assert first.outcome == again.outcome == "suppressed" and len(cache.entries) == 1
    later = decide(request(pod("web", {"app": BAD})), view, soon, RULES, NOW + timedelta(days=2), cache)
    assert later.outcome == "deny"  # the suppression expired: the memo is not used past it
    assert run(pod("web", {"app": BAD}), policy=POLICY, view=view, cache=cache).outcome == "deny"


def test_a_new_report_is_never_judged_from_the_memo_of_the_old_one() -> None:
    cache = VerdictCache()
    view = make_view()
    assert run(pod("web", {"app": BAD}), view=view, cache=cache).outcome == "deny"
    view.apply_report(stored(BAD, SeverityCounts(), scan_id="scan-0002", at=NOW + timedelta(minutes=1)))
    assert run(pod("web", {"app": BAD}), view=view, cache=cache).outcome == "allow"


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"namespace_modes": ["prod-*=block"]}, "must be 'glob=off|warn|enforce'"),
        ({"namespace_modes": ["PROD=enforce"]}, "must be 'glob=off|warn|enforce'"),
        ({"cert_file": "/tls.crt"}, "given together"),
        ({"exempt_namespaces": ["kube system"]}, "not a namespace glob"),
        ({"port": 0}, "between 1 and 65535"),
        (
            {"bypasses": [{"selector": {}, "owner": "o", "reason": "r", "expires": "2026-12-01T00:00:00Z"}]},
            "selector must name",
        ),
        (
            {"bypasses": [{"selector": {"a": "b"}, "owner": "", "reason": "r", "expires": "2026-12-01T00:00:00Z"}]},
            "owner",
        ),
        (
            {"bypasses": [{"selector": {"a": "b"}, "owner": "o", "reason": "r", "expires": "2026-12-01T00:00:00"}]},
            "zone",
        ),
        ({"max_body_mb": 0.5}, "must be between 1 and 1024"),
        ({"read_timeout_s": 0}, "must be > 0"),
    ],
    ids=[
        "unknown-mode",
        "upper-case-glob",
        "cert-without-key",
        "space",
        "port",
        "empty-selector",
        "no-owner",
        "naive",
        "body-limit-too-small",
        "no-read-deadline",
    ],
)
def test_admission_settings_are_refused_naming_the_key(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings(environ={}, overrides={"admission": settings})
    assert "admission." in str(caught.value)


def _debugged(image: str) -> dict[str, Any]:
    obj = pod("web", {"app": CLEAN})
    obj["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": image}]
    return obj


@pytest.mark.parametrize(
    ("obj", "old", "sub_resource", "outcome"),
    [
        (pod("web", {"app": BAD}), pod("web", {"app": CLEAN}), "", "deny"),
        (pod("web", {"app": CLEAN}), pod("web", {"app": BAD}), "", "allow"),
        (pod("web", {"app": BAD}, labels={"x": "y"}), pod("web", {"app": BAD}), "", "allow"),
        (_debugged(BAD), pod("web", {"app": CLEAN}), "ephemeralcontainers", "deny"),
        (_debugged(CLEAN), pod("web", {"app": CLEAN}), "ephemeralcontainers", "allow"),
        (pod("web", {"app": BAD}), pod("web", {"app": CLEAN}), "status", "skipped"),
    ],
    ids=[
        "set-image-to-a-bad-one",
        "set-image-to-a-clean-one",
        "relabel-keeps-the-image",
        "debug-container-with-a-bad-image",
        "debug-container-with-a-clean-image",
        "status-is-not-judged",
    ],
)
def test_a_pod_update_is_judged_on_the_images_it_brings(
    obj: dict[str, Any], old: dict[str, Any], sub_resource: str, outcome: str
) -> None:
    body = review_body(obj, "prod-a", operation="UPDATE", old=old)
    body["request"]["subResource"] = sub_resource
    decision = decide(review.decode(json.dumps(body).encode()), make_view(), POLICY, RULES, NOW)
    assert decision.outcome == outcome
    if outcome == "deny":
        assert decision.audit is not None and decision.audit.operation == "UPDATE"


def test_the_audit_says_the_requester_is_what_the_request_claims() -> None:
    body = review_body(pod("web", {"app": BAD}), "prod-a")
    body["request"]["userInfo"] = {
        "username": "mallory\nadmin",
        "uid": "1234",
        "groups": ["system:authenticated", *(f"g{n}" for n in range(40))],
    }
    decision = decide(review.decode(json.dumps(body).encode()), make_view(), POLICY, RULES, NOW)
    assert decision.audit is not None and decision.audit.requester is not None
    requester = decision.audit.requester
    assert requester.source == "request.userInfo"
    assert (requester.username, requester.uid) == ("mallory?admin", "1234")
    assert requester.groups[0] == "system:authenticated" and len(requester.groups) == 32
    encoded = msgspec.json.decode(msgspec.json.encode(decision.audit))
    assert encoded["requester"]["source"] == "request.userInfo"
