"""The notifier's decision where one rule could hide another: DefectDojo's test title among several workloads, and
the redelivery guard when the verdict would change between deliveries (bench/mutation.py found them unpinned)."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from podsweep.policy import Suppression
from services.notifier.decide import Decision, decide
from tests.unit.test_notifier_decide import API, NOW, POLICY, WORKER, event, finding, report, run

CRIT = finding("CVE-1")


@pytest.mark.parametrize("order", [1, -1], ids=["listed-first", "listed-last"])
def test_defectdojo_test_title_is_the_smallest_image_of_the_workloads_routed_there(order: int) -> None:
    runs = [
        run(API, image="registry.example.com/shop/api:2.0", notify="team"),
        run(WORKER, image="registry.example.com/shop/api:1.9", notify="team"),
        run(API, namespace="other", image="registry.example.com/shop/api:0.1"),  # not routed to dojo
    ][::order]
    decision = decide(event(), report(CRIT), runs, POLICY, {}, NOW)
    assert [(u.destination, u.test_title) for u in decision.uploads] == [("dojo", "registry.example.com/shop/api:1.9")]


def test_a_report_redelivered_after_its_suppression_lapsed_is_not_decided_again() -> None:
    """The first delivery was judged while the suppression held (no breach) and its fingerprint stored; the same
    report delivered again after the suppression expired changes nothing: the next report will say it."""
    entry = {"id": "CVE-1", "owner": "bob", "reason": "accepted", "expires": NOW + timedelta(hours=1)}
    policy = msgspec.structs.replace(POLICY, suppressions=[msgspec.convert(entry, Suppression)])
    first = decide(event(), report(CRIT), [run()], policy, {}, NOW)
    assert first.alerts == [] and len(first.fingerprints) == 1
    again = decide(event(), report(CRIT), [run()], policy, first.fingerprints, NOW + timedelta(hours=2))
    assert again == Decision()
    later_report = decide(
        event("scan-0002"), report(CRIT), [run()], policy, first.fingerprints, NOW + timedelta(hours=2)
    )
    assert len(later_report.alerts) == 1 and later_report.alerts[0].payload.expired_suppressions == 1
