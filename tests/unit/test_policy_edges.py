"""The policy's defaults and bounds as documented, the errors that name a bad value, the stable order of findings
and which lapsed suppression is named on a tie (bench/mutation.py found them unpinned)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from podsweep.policy import PolicyError, evaluate, load_policy, worst_first
from tests.unit.test_policy_evaluate import IMAGE, NOW, THRESHOLD, finding, report, suppression

DESTINATIONS = """destinations:
  - name: hook
    kind: webhook
    url: https://hooks.example.com/podsweep
    hmac_key: {env: HOOK_KEY}
  - name: chat
    kind: slack
    url: {env: SLACK_URL}
  - name: teams
    kind: teams
    url: {env: TEAMS_URL}
  - name: dojo
    kind: defectdojo
    url: https://dojo.example.com
    token: {env: DOJO_TOKEN}
    product: P
    engagement: E
"""


def test_destination_timeouts_default_to_10_seconds_and_60_for_defectdojo() -> None:
    policy = load_policy(DESTINATIONS)
    assert {d.name: d.timeout_s for d in policy.destinations} == {
        "hook": 10.0,
        "chat": 10.0,
        "teams": 10.0,
        "dojo": 60.0,
    }


@pytest.mark.parametrize(("length", "valid"), [(2048, True), (2049, False)])
def test_a_destination_url_is_at_most_2048_characters(length: int, valid: bool) -> None:
    base = "https://hooks.example.com/"
    url = base + "p" * (length - len(base))
    text = DESTINATIONS.replace("https://hooks.example.com/podsweep", url)
    if valid:
        assert load_policy(text).destinations[0].url == url
    else:
        with pytest.raises(PolicyError, match=r"destinations\[0\]\.url"):
            load_policy(text)


@pytest.mark.parametrize(("cvss", "valid"), [(0.0, True), (0.5, True), (10.0, True), (10.5, False), (-0.1, False)])
def test_min_cvss_is_a_cvss_score_from_0_to_10(cvss: float, valid: bool) -> None:
    text = f"rules:\n  - name: r\n    min_cvss: {cvss}\n"
    if valid:
        assert load_policy(text).rules[0].min_cvss == cvss
    else:
        with pytest.raises(PolicyError, match=r"rules\[0\]\.min_cvss"):
            load_policy(text)


def test_a_rule_naming_a_destination_when_none_is_defined_says_so() -> None:
    with pytest.raises(PolicyError, match=r"is not defined under `destinations` \(defined: none\)"):
        load_policy("defaults:\n  destinations: [pager]\n")


def test_a_bad_value_is_quoted_in_the_error_cut_to_80_characters() -> None:
    value = "x" * 100
    with pytest.raises(PolicyError) as caught:
        load_policy(f'defaults:\n  threshold: {{max_critical: "{value}"}}\n')
    assert f"got {json.dumps('x' * 80)}" in str(caught.value)


def test_findings_that_differ_only_in_where_they_were_found_sort_by_path_else_target() -> None:
    by_target = [finding(target="b-image", pkg_path=""), finding(target="a-image", pkg_path="")]
    assert [f.target for f in sorted(by_target, key=worst_first)] == ["a-image", "b-image"]
    by_path = [finding(target="a", pkg_path="z/app.jar"), finding(target="b", pkg_path="y/app.jar")]
    assert [f.pkg_path for f in sorted(by_path, key=worst_first)] == ["y/app.jar", "z/app.jar"]


def test_of_suppressions_that_lapsed_at_the_same_instant_the_first_listed_is_named() -> None:
    lapsed = NOW - timedelta(days=1)
    first = suppression(expires=lapsed, owner="alice@example.com", reason="first")
    second = suppression(expires=lapsed, owner="bob@example.com", reason="second")
    verdict = evaluate(THRESHOLD, [first, second], report(finding()), "x", IMAGE, NOW)
    assert [s.suppression.reason for s in verdict.expired] == ["first"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "destinations:\n  - name: hook\n    kind: webhook\n    url: https://h.example.com/x\n",
            "policy.yaml:2 destinations[0].hmac_key: required key is missing",
        ),
        (
            "version: 1\nsuppressions:\n  - id: CVE-1\n    owner: o\n    reason: r\n",
            "policy.yaml:3 suppressions[0].expires: required key is missing",
        ),
    ],
    ids=["destination-without-its-key", "suppression-without-expiry"],
)
def test_a_missing_key_is_named_at_the_line_of_the_entry_that_lacks_it(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text)
    assert str(caught.value) == message


def test_a_policy_without_a_version_is_version_1() -> None:
    assert load_policy("defaults: {threshold: {max_critical: 0}}\n").version == 1
