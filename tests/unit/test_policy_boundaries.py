"""Policy evaluation where the choice among several matching suppressions decides what an alert says."""

from __future__ import annotations

from datetime import timedelta

from podsweep.policy import evaluate
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
