"""The admission decision at its edges: what each length bound cuts, the guards before judging, the workload a pod
belongs to, the verdict memo across policies and its size, and the bypasses at their expiry instants
(bench/mutation.py found these unpinned)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from podsweep.config import AdmissionBypass
from podsweep.policy import load_policy
from schemas.events import SeverityCounts, Workload
from schemas.refs import MAX_DIGEST_REF
from schemas.report import Finding
from services.admission import review
from services.admission.decide import (
    BYPASS_EXPIRES,
    BYPASS_LABEL,
    BYPASS_OWNER,
    BYPASS_REASON,
    Decision,
    VerdictCache,
    decide,
    shown,
)
from services.admission.view import compact
from tests.harness.admission import deployment, pod
from tests.harness.admission import review as review_body
from tests.unit.test_admission_decide import BAD, CLEAN, CVE, NOW, POLICY, REPO, RULES, critical, make_view, run, stored


def _decide_body(body: dict[str, Any], *, view: Any = None, rules: Any = RULES) -> Decision:
    return decide(review.decode(json.dumps(body).encode()), view or make_view(), POLICY, rules, NOW)


def _with_findings(ref: str, findings: list[Finding], counts: SeverityCounts | None = None) -> Any:
    view = make_view()
    view.apply_report(stored(ref, counts or SeverityCounts(CRITICAL=len(findings))))
    view.apply_findings(ref.rsplit(":", 1)[1], "scan-0001", compact(findings))
    return view


# --- text bounds ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("a" * 200, 200, "a" * 200), ("a" * 201, 200, "a" * 199 + "…"), ("x\x1by", 200, "x?y"), ("abc", 2, "a…")],
    ids=["at-the-limit-kept", "one-over-cut", "control-replaced", "short-limit"],
)
def test_shown_keeps_text_up_to_its_limit_and_cuts_with_an_ellipsis(text: str, limit: int, expected: str) -> None:
    assert shown(text, limit) == expected


def _skipped_reason(**request: Any) -> str:
    body = review_body(pod("web", {"app": BAD}), "prod-a")
    body["request"].update(request)
    decision = _decide_body(body)
    assert decision.response.allowed and decision.outcome == "skipped" and decision.audit is None
    return decision.log_reason


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"namespace": "N" * 100}, f"namespace {'N' * 79 + '…'!r} is not a namespace name"),
        ({"operation": "O" * 50}, f"operation {'O' * 19 + '…'!r} is not judged"),
        ({"kind": {"group": "", "version": "v1", "kind": "K" * 100}}, f"kind {'K' * 59 + '…'!r} is not judged"),
        ({"subResource": "s" * 60}, f"subresource {'s' * 39 + '…'!r} is not judged"),
    ],
    ids=["namespace-80", "operation-20", "kind-60", "subresource-40"],
)
def test_what_is_not_judged_is_logged_with_the_value_cut_to_its_bound(
    request_fields: dict[str, Any], reason: str
) -> None:
    assert _skipped_reason(**request_fields) == reason


@pytest.mark.parametrize(("length", "judged"), [(63, True), (64, False)])
def test_a_namespace_name_is_judged_up_to_63_characters(length: int, judged: bool) -> None:
    namespace = "prod-" + "a" * (length - 5)
    decision = _decide_body(review_body(pod("web", {"app": BAD}), namespace))
    assert (decision.outcome == "deny") is judged
    assert (decision.outcome == "skipped") is not judged


def test_the_requester_fields_are_cut_to_200_characters_each() -> None:
    body = review_body(pod("web", {"app": BAD}), "prod-a")
    body["request"]["userInfo"] = {"username": "u" * 300, "uid": "i" * 300, "groups": ["g" * 300]}
    decision = _decide_body(body)
    assert decision.audit is not None and decision.audit.requester is not None
    requester = decision.audit.requester
    assert (requester.username, requester.uid, requester.groups) == (
        "u" * 199 + "…",
        "i" * 199 + "…",
        ["g" * 199 + "…"],
    )


def test_at_most_eight_warnings_are_returned() -> None:
    images = {f"c{i}": f"registry.example.com/other{i}:1" for i in range(12)}
    decision = run(pod("web", images), "team-a")
    assert len(decision.response.warnings) == 8


def test_the_audit_reason_is_cut_to_4000_characters() -> None:
    view = make_view()
    images = {}
    for n in range(40):
        ref = f"{REPO}@sha256:{n:064x}"
        view.apply_report(stored(ref, SeverityCounts(CRITICAL=3)))
        view.apply_findings(f"{n:064x}", "scan-0001", compact([critical(f"CVE-2026-{n:04d}{k}") for k in range(3)]))
        images[f"c{n}"] = ref
    decision = _decide_body(review_body(pod("web", images), "prod-a"), view=view)
    assert decision.audit is not None and len(decision.audit.reason) == 4000 and decision.audit.reason.endswith("…")


def test_three_top_findings_are_named_and_recorded() -> None:
    findings = [critical(f"CVE-2026-000{k}") for k in range(5)]
    decision = run(pod("web", {"app": BAD}), view=_with_findings(BAD, findings))
    assert decision.audit is not None and len(decision.audit.images[0].findings) == 3
    assert decision.response.status is not None
    message = decision.response.status.message
    assert sum(f"CVE-2026-000{k} (CRITICAL" in message for k in range(5)) == 3


def test_the_top_findings_text_is_cut_to_600_characters() -> None:
    findings = [critical(f"CVE-2026-000{k}", package=f"p{k}" + "q" * 250) for k in range(3)]
    decision = run(pod("web", {"app": BAD}), view=_with_findings(BAD, findings))
    assert decision.response.status is not None
    message = decision.response.status.message
    top = message.split("; top: ", 1)[1].split(". To admit it", 1)[0]
    assert len(top) == 600 and top.endswith("…")


def test_a_finding_id_is_recorded_cut_to_200_characters() -> None:
    long_id = "CVE-" + "9" * 300
    decision = run(pod("web", {"app": BAD}), view=_with_findings(BAD, [critical(long_id)]))
    assert decision.audit is not None and decision.audit.images[0].findings == [long_id[:199] + "…"]


def test_the_suppressed_ids_named_are_cut_to_120_characters() -> None:
    ids = [f"CVE-2026-{k:05d}" for k in range(20)]
    entries = "".join(f"  - id: {i}\n    owner: o@example.com\n    reason: r\n    expires: 2026-12-31\n" for i in ids)
    policy = load_policy("suppressions:\n" + entries)
    view = _with_findings(BAD, [critical(i) for i in ids])
    decision = run(pod("web", {"app": BAD}), view=view, policy=policy)
    assert decision.outcome == "suppressed"
    warning = decision.audit.reason if decision.audit is not None else ""
    named = warning.split(") but ", 1)[1].split(" are suppressed by", 1)[0]
    assert named == ", ".join(sorted(ids))[:120]


# --- images --------------------------------------------------------------------------------------------------------


def _image_of(length: int) -> str:
    """A valid image reference of `length` characters: repo:128-character tag@digest."""
    suffix = ":" + "t" * 128 + "@sha256:" + "f" * 64
    head = "registry.example.com/"
    return head + "a" * (length - len(head) - len(suffix)) + suffix


@pytest.mark.parametrize(("length", "looked_up"), [(MAX_DIGEST_REF + 129, True), (MAX_DIGEST_REF + 130, False)])
def test_an_image_reference_is_looked_up_up_to_its_bound(length: int, looked_up: bool) -> None:
    image = _image_of(length)
    assert len(image) == length
    decision = run(pod("web", {"app": image}), "team-a")
    assert decision.audit is not None
    said = decision.audit.reason
    assert ("is not an image reference podsweep can look up" in said) is not looked_up
    assert ("has never been seen running" in said) is looked_up


@pytest.mark.parametrize(
    "image", ["../../etc/passwd", "repo@sha256:" + "z" * 64, "repo:tag\n"], ids=["path", "bad-digest", "newline"]
)
def test_a_short_image_that_is_no_reference_is_said_to_be_one(image: str) -> None:
    decision = run(pod("web", {"app": image}), "team-a")
    assert decision.audit is not None
    assert "is not an image reference podsweep can look up (repo[:tag][@sha256:…])." in decision.audit.reason


def test_an_unknown_image_is_named_plainly() -> None:
    image = "registry.example.com/never:1"
    decision = run(pod("web", {"app": image}), "team-a")
    assert decision.audit is not None
    assert f"image {image} has never been seen running in this cluster" in decision.audit.reason


def test_an_image_is_named_cut_to_160_characters() -> None:
    image = "registry.example.com/" + "a" * 200 + ":1"
    decision = run(pod("web", {"app": image}), "team-a")
    assert decision.audit is not None
    assert f"image {image[:159]}… has never been seen running" in decision.audit.reason


def test_a_tag_names_the_digest_it_resolved_to_and_when_that_was_seen() -> None:
    decision = run(pod("web", {"app": f"{REPO}:1.0"}))
    assert decision.response.status is not None
    message = decision.response.status.message
    seen_at = (NOW - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%MZ")
    assert f"(tag → sha256:{'b' * 12}…, the digest last seen running it at {seen_at};" in message


# --- the object ----------------------------------------------------------------------------------------------------


def test_a_request_without_an_object_is_allowed_with_a_reason() -> None:
    body = review_body(pod("web", {"app": BAD}), "prod-a")
    body["request"]["object"] = None
    decision = _decide_body(body)
    assert decision.response.allowed and decision.outcome == "skipped"
    assert decision.log_reason == "the request carries no object"


def test_an_update_without_the_old_object_judges_every_image() -> None:
    body = review_body(pod("web", {"app": BAD}), "prod-a", operation="UPDATE")
    body["request"]["oldObject"] = None
    assert _decide_body(body).outcome == "deny"


def test_the_object_name_comes_from_its_metadata_when_the_request_has_none() -> None:
    body = review_body(pod("web", {"app": BAD}), "prod-a")
    body["request"]["name"] = ""
    decision = _decide_body(body)
    assert decision.audit is not None and decision.audit.name == "web"


def _owned(owner: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    obj = pod("api-7d9f8-abcde", {"app": BAD}, labels=labels)
    obj["metadata"]["ownerReferences"] = [owner]
    return obj


@pytest.mark.parametrize(
    ("obj", "workload"),
    [
        pytest.param(_owned({"kind": "Job", "name": "nightly", "controller": True}), ("Job", "nightly"), id="job"),
        pytest.param(
            _owned({"kind": "ConfigMap", "name": "cfg", "controller": False}),
            ("Pod", "api-7d9f8-abcde"),
            id="not-the-controller",
        ),
        pytest.param(
            _owned({"kind": "Bad Kind", "name": "x", "controller": True}), ("Pod", "api-7d9f8-abcde"), id="bad-kind"
        ),
        pytest.param(
            _owned({"kind": "Job", "name": "Bad_Name", "controller": True}), ("Pod", "api-7d9f8-abcde"), id="bad-name"
        ),
        pytest.param(
            _owned({"kind": "ReplicaSet", "name": "api-other", "controller": True}, {"pod-template-hash": "7d9f8"}),
            ("ReplicaSet", "api-other"),
            id="replicaset-not-named-by-the-hash",
        ),
        pytest.param(
            _owned({"kind": "ReplicaSet", "name": "api-7d9f8", "controller": True}),
            ("ReplicaSet", "api-7d9f8"),
            id="replicaset-without-a-hash-label",
        ),
        pytest.param(
            _owned({"kind": "StatefulSet", "name": "db-7d9f8", "controller": True}, {"pod-template-hash": "7d9f8"}),
            ("StatefulSet", "db-7d9f8"),
            id="only-a-replicaset-loses-the-hash",
        ),
    ],
)
def test_a_pod_belongs_to_its_controller_when_that_reference_is_valid(
    obj: dict[str, Any], workload: tuple[str, str]
) -> None:
    decision = run(obj)
    assert decision.audit is not None
    assert decision.audit.workload == Workload(kind=workload[0], name=workload[1])


def test_a_generate_name_that_is_not_a_name_gives_an_unnamed_workload() -> None:
    obj = pod("", {"app": BAD})
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "Bad_Base-"
    decision = run(obj)
    assert decision.audit is not None and decision.audit.workload == Workload(kind="Pod", name="unnamed")


def test_a_template_label_selects_a_configured_bypass_for_the_workload() -> None:
    """The pods will carry the template's labels, so a bypass selecting them admits the Deployment too."""
    bypass = AdmissionBypass(selector={"tier": "legacy"}, owner="o@example.com", reason="r", expires=NOW + timedelta(1))
    obj = deployment("api", {"app": BAD})
    obj["spec"]["template"]["metadata"]["labels"]["tier"] = "legacy"
    assert run(obj, rules=replace(RULES, bypasses=(bypass,))).outcome == "bypass"
    assert run(obj).outcome == "deny"


def test_a_deployment_without_a_template_has_nothing_to_judge() -> None:
    obj = deployment("api", {"app": BAD})
    del obj["spec"]["template"]
    decision = run(obj)
    assert decision.response.allowed and decision.outcome == "allow"


# --- the verdict memo ------------------------------------------------------------------------------------------------


SOON = load_policy(f"suppressions:\n  - id: {CVE}\n    owner: o@example.com\n    reason: r\n    expires: 2026-11-24\n")


def test_a_verdict_memoised_under_one_policy_is_never_used_under_another() -> None:
    cache = VerdictCache()
    view = make_view()
    other = f"{REPO}@sha256:{'9' * 64}"
    view.apply_report(stored(other, SeverityCounts()))
    assert run(pod("web", {"app": BAD}), policy=SOON, view=view, cache=cache).outcome == "suppressed"
    assert run(pod("web", {"app": other}), policy=POLICY, view=view, cache=cache).outcome == "allow"
    assert run(pod("web", {"app": BAD}), policy=POLICY, view=view, cache=cache).outcome == "deny"
    assert run(pod("web", {"app": BAD}), policy=SOON, view=view, cache=cache).outcome == "suppressed"


def test_a_memoised_suppression_is_not_used_at_the_instant_it_expires() -> None:
    cache = VerdictCache()
    view = make_view()
    expiry = SOON.suppressions[0].expires
    body = json.dumps(review_body(pod("w", {"app": BAD}), "prod-a")).encode()
    before = decide(review.decode(body), view, SOON, RULES, expiry - timedelta(seconds=1), cache)
    assert before.outcome == "suppressed"
    assert decide(review.decode(body), view, SOON, RULES, expiry, cache).outcome == "deny"


def test_the_memo_holds_at_most_its_size() -> None:
    cache = VerdictCache(size=2)
    view = make_view()
    refs = [f"{REPO}@sha256:{n:064x}" for n in range(5)]
    for ref in refs:
        view.apply_report(stored(ref, SeverityCounts()))
        view.apply_findings(ref.rsplit(":", 1)[1], "scan-0001", compact([]))
    for ref in refs:
        assert run(pod("web", {"app": ref}), view=view, cache=cache).outcome == "allow"
        assert 1 <= len(cache.entries) <= 2


# --- counts only -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "counts", "fixable", "outcome"),
    [
        ("threshold: {max_high: 2}", SeverityCounts(HIGH=2), SeverityCounts(HIGH=2), "allow"),
        ("threshold: {max_high: 2}", SeverityCounts(HIGH=3), SeverityCounts(HIGH=3), "deny"),
        ("fixable_only: true", SeverityCounts(CRITICAL=2), SeverityCounts(), "allow"),
        ("ignore_unfixed: true", SeverityCounts(CRITICAL=2), SeverityCounts(), "allow"),
        ("fixable_only: false", SeverityCounts(CRITICAL=2), SeverityCounts(), "deny"),
    ],
    ids=["at-the-limit", "over-the-limit", "fixable-only", "ignore-unfixed", "every-finding"],
)
def test_counts_alone_judge_against_the_threshold_until_findings_load(
    rule: str, counts: SeverityCounts, fixable: SeverityCounts, outcome: str
) -> None:
    policy = load_policy(f"rules:\n  - name: r\n    match: {{namespaces: [prod-a]}}\n    {rule}\n")
    view = make_view()
    ref = f"{REPO}@sha256:{'7' * 64}"
    event = stored(ref, counts)
    view.apply_report(replace_fixable(event, fixable))
    assert run(pod("web", {"app": ref}), view=view, policy=policy).outcome == outcome


def replace_fixable(event: Any, fixable: SeverityCounts) -> Any:
    return msgspec.structs.replace(event, fixable=fixable)


# --- bypasses --------------------------------------------------------------------------------------------------------


def test_a_configured_bypass_ends_at_its_expiry_instant() -> None:
    bypass = AdmissionBypass(selector={"a": "b"}, owner="o@example.com", reason="r", expires=NOW)
    rules = replace(RULES, bypasses=(bypass,))
    assert run(pod("web", {"app": BAD}, labels={"a": "b"}), rules=rules).outcome == "deny"
    later = replace(RULES, bypasses=(replace_expiry(bypass, NOW + timedelta(seconds=1)),))
    assert run(pod("web", {"app": BAD}, labels={"a": "b"}), rules=later).outcome == "bypass"


def replace_expiry(bypass: AdmissionBypass, expires: Any) -> AdmissionBypass:
    return msgspec.structs.replace(bypass, expires=expires)


def test_a_configured_bypass_reason_is_cut_in_the_message_and_kept_in_the_note() -> None:
    reason = "r" * 1000
    bypass = AdmissionBypass(selector={"a": "b"}, owner="o@example.com", reason=reason, expires=NOW + timedelta(1))
    decision = run(pod("web", {"app": BAD}, labels={"a": "b"}), rules=replace(RULES, bypasses=(bypass,)))
    assert decision.audit is not None and decision.audit.bypass is not None
    assert decision.audit.reason.endswith(": " + "r" * 299 + "…")
    assert decision.audit.bypass.reason == reason


def _annotated(expires: str, reason: str = "hotfix") -> dict[str, Any]:
    return pod(
        "web",
        {"app": BAD},
        labels={BYPASS_LABEL: "true"},
        annotations={BYPASS_OWNER: "dev@example.com", BYPASS_REASON: reason, BYPASS_EXPIRES: expires},
    )


ANNOTATED = replace(RULES, annotation_bypass_namespaces=("prod-*",))


@pytest.mark.parametrize(
    ("obj", "outcome", "note"),
    [
        pytest.param(_annotated("2026-11-23T12:00:00Z"), "deny", "the bypass expired at", id="expires-now"),
        pytest.param(_annotated("2026-11-23T12:00:01Z"), "bypass", "", id="expires-in-a-second"),
        pytest.param(_annotated("2026-12-23T12:00:00Z"), "bypass", "", id="expires-at-the-longest"),
        pytest.param(_annotated("2026-12-23T12:00:01Z"), "deny", "is more than 30 days away", id="a-second-too-far"),
        pytest.param(_annotated("2026-11-25", reason="x"), "bypass", "", id="one-character-reason"),
    ],
)
def test_an_annotation_bypass_at_its_bounds(obj: dict[str, Any], outcome: str, note: str) -> None:
    decision = run(obj, rules=ANNOTATED)
    assert decision.outcome == outcome
    if note:
        assert any(note in w for w in decision.response.warnings), decision.response.warnings


def test_without_the_bypass_label_no_bypass_is_mentioned() -> None:
    decision = run(pod("web", {"app": BAD}), "team-a")
    assert decision.outcome == "warn"
    assert not any("bypass" in w for w in decision.response.warnings), decision.response.warnings


def test_a_bypass_label_where_annotations_are_not_honoured_is_said_to_be_ignored() -> None:
    decision = run(_annotated("2026-11-25"), "team-a", rules=ANNOTATED)
    assert decision.outcome == "warn"
    assert any(f"label {BYPASS_LABEL} ignored" in w for w in decision.response.warnings)


def test_a_clean_image_alone_is_allowed_even_with_a_suppressing_policy() -> None:
    assert run(pod("web", {"app": CLEAN}), view=make_view()).outcome == "allow"
