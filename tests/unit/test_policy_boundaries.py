"""Policy evaluation where the choice among several matching suppressions decides what an alert says."""

from __future__ import annotations

from datetime import timedelta

import pytest

from podsweep.policy import PolicyError, evaluate, load_policy
from tests.unit.test_policy_evaluate import IMAGE, NOW, THRESHOLD, finding, report, suppression


def test_of_several_expired_suppressions_the_most_recent_is_reported_whatever_their_order() -> None:
    oldest = suppression(expires=NOW - timedelta(days=30), owner="alice@example.com", reason="old")
    newest = suppression(expires=NOW - timedelta(days=1), owner="bob@example.com", reason="recent")
    middle = suppression(expires=NOW - timedelta(days=10), owner="carol@example.com", reason="middle")
    for order in ([oldest, newest, middle], [newest, middle, oldest], [middle, oldest, newest]):
        verdict = evaluate(THRESHOLD, order, report(finding()), "x", IMAGE, NOW)
        assert [(s.suppression.owner, s.suppression.reason) for s in verdict.expired] == [("bob@example.com", "recent")]


def test_a_suppression_that_expires_now_has_expired() -> None:
    verdict = evaluate(THRESHOLD, [suppression(expires=NOW)], report(finding()), "x", IMAGE, NOW)
    assert verdict.breach and [s.suppression.expires for s in verdict.expired] == [NOW]


@pytest.mark.parametrize(
    ("image", "pattern", "suppressed"),
    [
        pytest.param("alpine", "alpine", True, id="bare-name"),
        pytest.param("alpine:3.19", "alpine", True, id="name-and-tag"),
        pytest.param("registry.example.com:5000/team/app", "registry.example.com:5000/team/app", True, id="port"),
        pytest.param("registry.example.com:5000/team/app:1.4", "registry.example.com:5000/team/app", True, id="both"),
        pytest.param("alpine", "alpin", False, id="no-prefix-match"),
    ],
)
def test_a_suppression_by_image_matches_the_repository_of_a_tagged_or_bare_image(
    image: str, pattern: str, suppressed: bool
) -> None:
    verdict = evaluate(THRESHOLD, [suppression(image=pattern)], report(finding()), "x", image, NOW)
    assert bool(verdict.suppressed) is suppressed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "version: 1\ndefaults:\n  threshold: {max_critical: 0\n",
            "p.yaml:4 not valid YAML: expected ',' or '}'",
            id="yaml-error-names-its-line",
        ),
        pytest.param(
            'version: 1\ndefaults:\n  threshold: {max_critical: "0"}\n',
            'p.yaml:3 defaults.threshold.max_critical: expected int or null, got "0"',
            id="a-quoted-number-is-not-a-number",
        ),
        pytest.param(
            "version: 1\ndefaults:\n  threshold: {max_critical: {a: 1}}\n",
            "p.yaml:3 defaults.threshold.max_critical: expected int or null, got a mapping",
            id="a-mapping-where-a-number-goes",
        ),
        pytest.param(
            "version: 1\ndefaults:\n  threshold: {max_critical: 0}\n\n  bogus: 1\n",
            "p.yaml:5 defaults.bogus: unknown key",
            id="an-unknown-key-names-its-own-line",
        ),
    ],
)
def test_policy_errors_name_the_line_and_what_was_found(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as error:
        load_policy(text, "p.yaml")
    assert str(error.value).startswith(message)
