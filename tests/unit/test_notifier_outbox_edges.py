"""The outbox's audit record, its fingerprint keys, and the stale-report guard at equal times."""

from __future__ import annotations

from datetime import date, timedelta

import msgspec

from services.notifier.decide import decide, fingerprint_key
from services.notifier.outbox import advance, audit, drop_stale, entries, fingerprint_keys
from tests.unit.test_notifier_outbox import API, DIGEST, POLICY, T0, WORKER, critical, event, fp, report, run


def _queued() -> list:  # type: ignore[type-arg]
    runs = [run()]
    decision = decide(event(), report(critical("CVE-2026-0001"), critical("CVE-2026-0002")), runs, POLICY, {}, T0)
    return entries(decision, event(), runs, POLICY, date(2026, 11, 23))


def test_the_audit_of_an_alert_says_what_went_where_about_whom() -> None:
    entry = next(e for e in _queued() if e.destination == "hook")
    sent = audit(entry, 3, "delivered", "", T0 + timedelta(seconds=5))
    assert (sent.alert_id, sent.cluster, sent.digest_ref, sent.namespace, sent.workload) == (
        entry.key,
        "c1",
        DIGEST,
        "payments",
        API,
    )
    assert (sent.destination, sent.attempts, sent.outcome, sent.error) == ("hook", 3, "delivered", "")
    assert sent.findings == ["CVE-2026-0001", "CVE-2026-0002"]
    assert sent.sent_at == T0 + timedelta(seconds=5)


def test_the_audit_of_an_upload_lists_no_findings_and_keeps_the_error_short() -> None:
    upload = next(e for e in _queued() if e.destination == "dojo")
    failed = audit(upload, 1, "failed", "x" * 5000, T0)
    assert failed.findings == [] and failed.outcome == "failed"
    assert failed.error == "x" * 4000


def test_fingerprint_keys_are_one_per_workload_sorted() -> None:
    runs = [run("payments", WORKER), run(), run(), run("a-team")]
    assert fingerprint_keys(event(), runs) == sorted(
        {
            fingerprint_key("c1", DIGEST, "payments", WORKER),
            fingerprint_key("c1", DIGEST, "payments", API),
            fingerprint_key("c1", DIGEST, "a-team", API),
        }
    )
    assert len(fingerprint_keys(event(), runs)) == 3


def test_a_report_stored_at_the_same_instant_as_the_fingerprint_is_not_stale() -> None:
    runs = [run()]
    same = {fingerprint_key("c1", DIGEST, "payments", API): fp(T0, "scan-0000")}
    decision = decide(event(), report(critical()), runs, POLICY, same, T0)
    assert decision.alerts and drop_stale(decision, same, event()) == decision


def test_a_fingerprint_without_a_time_never_makes_a_report_stale() -> None:
    runs = [run()]
    untimed = {fingerprint_key("c1", DIGEST, "payments", API): fp(None, "scan-0000")}
    decision = decide(event(), report(critical()), runs, POLICY, untimed, T0)
    assert drop_stale(decision, untimed, event()) == decision


def test_outbox_entries_are_version_one() -> None:
    queued = _queued()
    assert queued and {e.v for e in queued} == {1}
    assert b'"v":1' in msgspec.json.encode(queued[0])


def test_a_fingerprint_of_another_report_stored_at_the_same_instant_is_written() -> None:
    """Only a newer report blocks the write: one stored at the same instant with other findings replaces it."""
    current = fp(T0, "scan-0001", ("a",))
    new = fp(T0, "scan-0002", ("a", "b"))
    assert advance(current, new) == new


def test_an_upload_no_given_workload_is_routed_to_is_not_queued() -> None:
    """The workloads passed in decide who an upload is about; none routed to DefectDojo: nothing to say, no entry."""
    decision = decide(event(), report(critical()), [run()], POLICY, {}, T0)
    assert [u.destination for u in decision.uploads] == ["dojo"]
    queued = entries(decision, event(), [run("elsewhere")], POLICY, date(2026, 11, 23))
    assert [e.destination for e in queued] == ["hook", "chat"]
