"""The admission decision's bounds on other people's text and its guards (bench/mutation.py found them unpinned):
every length limit at its edge, the object's name and workload, the verdict cache across a new report."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from schemas.events import SeverityCounts, Workload
from services.admission import review
from services.admission.decide import (
    BYPASS_EXPIRES,
    BYPASS_LABEL,
    BYPASS_OWNER,
    BYPASS_REASON,
    MESSAGE_CHARS,
    WARNING_CHARS,
    VerdictCache,
    decide,
)
from services.admission.view import compact
from tests.harness.admission import pod
from tests.harness.admission import review as review_body
from tests.unit.test_admission_decide import BAD, NOW, POLICY, REPO, RULES, critical, make_view, run, stored


def _decide_body(body: dict[str, Any], namespace: str = "prod-a") -> Any:
    return decide(review.decode(json.dumps(body).encode()), make_view(), POLICY, RULES, NOW)


def test_the_limits_are_the_documented_ones() -> None:
    assert (WARNING_CHARS, MESSAGE_CHARS) == (240, 2000)


def test_a_namespace_that_is_not_a_namespace_name_is_skipped_and_allowed() -> None:
    decision = run(pod("web", {"app": BAD}), "Not_A_Namespace")
    assert decision.response.allowed and decision.outcome == "skipped" and decision.audit is None
    assert "is not a namespace name" in decision.log_reason


def test_audit_fields_from_the_request_are_cut_to_their_bounds() -> None:
    body = review_body(pod("web", {"c" * 300: BAD}), "prod-a")
    body["request"]["userInfo"]["username"] = "n" * 300
    decision = _decide_body(body)
    assert decision.audit is not None
    assert len(decision.audit.user) == 200
    assert len(decision.audit.images[0].container) == 200


def test_a_bare_pod_is_its_own_workload_and_is_named_in_the_message() -> None:
    decision = run(pod("web", {"app": BAD}))
    assert decision.audit is not None and decision.audit.workload == Workload(kind="Pod", name="web")
    assert decision.response.status is not None and "Pod web in namespace prod-a" in decision.response.status.message


def test_a_pod_without_a_name_is_named_by_its_workload_in_the_message() -> None:
    obj = pod("", {"app": BAD})
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "batch-"
    decision = run(obj)
    assert decision.response.status is not None
    assert "Pod batch in namespace prod-a" in decision.response.status.message


@pytest.mark.parametrize(("length", "kept"), [(253, True), (254, False)])
def test_an_object_name_is_kept_up_to_253_characters(length: int, kept: bool) -> None:
    labels = ["a" * 63] * 4
    name = ".".join(labels)[:length]  # 255 characters of valid DNS subdomain, cut to `length`
    name = name.rstrip(".") + "a" * (length - len(name.rstrip(".")))
    assert len(name) == length
    decision = run(pod(name, {"app": BAD}))
    assert decision.audit is not None
    assert (decision.audit.name == name) is kept


def test_every_warning_is_cut_to_warning_chars() -> None:
    long_tag = f"{REPO}:" + "t" * 120
    view = make_view()
    from tests.harness.admission import seen

    view.apply_seen(seen(long_tag, BAD, NOW))
    decision = decide(
        review.decode(json.dumps(review_body(pod("web", {"app": long_tag}), "team-a")).encode()),
        view,
        POLICY,
        RULES,
        NOW,
    )
    assert decision.response.allowed and decision.response.warnings
    assert max(len(w) for w in decision.response.warnings) == WARNING_CHARS


def test_the_denial_message_is_cut_to_message_chars() -> None:
    view = make_view()
    images = {}
    for n in range(30):
        ref = f"{REPO}@sha256:{n:064x}"
        view.apply_report(stored(ref, SeverityCounts(CRITICAL=3)))
        view.apply_findings(f"{n:064x}", "scan-0001", compact([critical(f"CVE-2026-{n:04d}{k}") for k in range(3)]))
        images[f"c{n}"] = ref
    decision = decide(
        review.decode(json.dumps(review_body(pod("web", images), "prod-a")).encode()), view, POLICY, RULES, NOW
    )
    assert decision.response.status is not None
    assert len(decision.response.status.message) == MESSAGE_CHARS


def test_a_cached_verdict_is_not_used_once_the_digest_has_a_new_report() -> None:
    view = make_view()
    cache = VerdictCache()
    assert run(pod("web", {"app": BAD}), view=view, cache=cache).outcome == "deny"
    view.apply_report(stored(BAD, SeverityCounts(), scan_id="scan-0002", at=NOW + (NOW - NOW)))
    view.apply_findings("b" * 64, "scan-0002", compact([]))
    assert run(pod("web", {"app": BAD}), view=view, cache=cache).outcome == "allow"


def _annotated(owner: str = "dev@example.com", reason: str = "hotfix", expires: str = "2026-11-25") -> dict[str, Any]:
    return pod(
        "web",
        {"app": BAD},
        labels={BYPASS_LABEL: "true"},
        annotations={BYPASS_OWNER: owner, BYPASS_REASON: reason, BYPASS_EXPIRES: expires},
    )


@pytest.mark.parametrize(
    ("obj", "verdict"),
    [
        pytest.param(_annotated(owner="a"), "bypass", id="one-character-owner"),
        pytest.param(_annotated(owner="o" * 128), "bypass", id="owner-of-128"),
        pytest.param(_annotated(reason="r" * 1024), "bypass", id="reason-of-1024"),
        pytest.param(_annotated(reason="r" * 1025), "deny", id="reason-of-1025"),
        pytest.param(_annotated(reason=""), "deny", id="no-reason"),
        pytest.param(_annotated(expires="2026-11-25T00:00:00." + "0" * 19 + "Z"), "bypass", id="expiry-of-40"),
        pytest.param(_annotated(expires="2026-11-25T00:00:00." + "0" * 20 + "Z"), "deny", id="expiry-of-41"),
    ],
)
def test_annotation_bypass_fields_at_their_bounds(obj: dict[str, Any], verdict: str) -> None:
    rules = replace(RULES, annotation_bypass_namespaces=("prod-*",))
    assert run(obj, rules=rules).outcome == verdict


def test_one_cache_serves_several_namespaces_and_images() -> None:
    cache = VerdictCache()
    view = make_view()
    for namespace in ("prod-a", "prod-b", "prod-a", "team-a"):
        outcome = run(pod("web", {"app": BAD}), namespace, view=view, cache=cache).outcome
        assert outcome == ("warn" if namespace == "team-a" else "deny")
    assert run(pod("web", {"app": f"{REPO}:2.0"}), "prod-a", view=view, cache=cache).outcome == "allow"
