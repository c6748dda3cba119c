"""The plan's boundaries and guards, each pinned by a case that fails when it moves (bench/mutation.py found them)."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from schemas.events import ImageGone, ScanCompleted
from schemas.state import DigestScanState, NodeFailure
from services.dispatcher import plan
from services.dispatcher.plan import Decision, due_at, scan_id_for
from tests.unit.test_dispatcher_plan import HEX, LIMITS, POLICY, REF, T0, failed_event, running, seen, state

SBOM_KEY = f"sbom/sha256/{HEX}/psw-000000000000000000000001.cdx.json"


def gone(node: str) -> ImageGone:
    return ImageGone(cluster="prod", digest_ref=REF, node=node, observed_at=T0)


def test_an_abandoned_claim_whose_node_left_is_not_resumed_there_but_failed_as_node_gone() -> None:
    abandoned = state(
        status="pending",
        scan_seq=1,
        scan_id=scan_id_for(REF, 1),
        node="n1",
        nodes_seen=["n2"],
        attempts=1,
        claim_expires_at=T0 - timedelta(seconds=1),
    )
    d = plan.decide(abandoned, T0, POLICY, {}, LIMITS)
    assert d.why == "backoff" and d.scan is None
    assert d.state is not None and d.state.status == "failed"
    assert d.state.failures == [NodeFailure(node="n1", reason="NodeGone", at=T0)]
    assert d.state.next_due_at == T0 + POLICY.backoff_base


def test_an_abandoned_claim_on_a_node_that_still_runs_the_digest_is_resumed_under_its_scan_id() -> None:
    abandoned = state(
        status="pending",
        scan_seq=1,
        scan_id=scan_id_for(REF, 1),
        node="n1",
        nodes_seen=["n2", "n1"],
        attempts=1,
        claim_expires_at=T0,
    )
    d = plan.decide(abandoned, T0, POLICY, {}, LIMITS)
    assert d.why == "resume_claim"
    assert d.scan is not None and (d.scan.scan_id, d.scan.node, d.scan.attempt) == (scan_id_for(REF, 1), "n1", 1)
    assert d.state is not None and d.state.claim_expires_at == T0 + POLICY.claim_ttl


def test_a_claim_is_in_flight_until_the_instant_it_expires() -> None:
    claim = running("n1", claim_expires_at=T0 + timedelta(seconds=1))
    assert plan.decide(claim, T0, POLICY, {}, LIMITS).why == "claimed"
    assert plan.decide(claim, T0 + timedelta(seconds=1), POLICY, {}, LIMITS).why != "claimed"


@pytest.mark.parametrize(
    ("offset", "why"),
    [
        pytest.param(timedelta(microseconds=-1), "not_due", id="just-before-due"),
        pytest.param(timedelta(0), "rescan_due", id="at-the-due-instant"),
    ],
)
def test_a_done_digest_comes_due_at_its_due_instant(offset: timedelta, why: str) -> None:
    done = state(status="done", last_scan_at=T0 - timedelta(hours=30), next_due_at=T0)
    d = plan.decide(done, T0 + offset, POLICY, {}, LIMITS)
    assert d.why == why
    assert (d.scan is not None) == (why == "rescan_due")
    if why == "not_due":
        assert d.recheck_at == T0


def test_a_done_digest_without_a_stored_due_time_is_due_one_jittered_interval_after_its_scan() -> None:
    done = state(status="done", last_scan_at=T0, next_due_at=None)
    due = due_at(REF, T0, POLICY)
    assert plan.decide(done, due - timedelta(microseconds=1), POLICY, {}, LIMITS) == Decision(
        None, None, "not_due", due
    )
    assert plan.decide(done, due, POLICY, {}, LIMITS).why == "rescan_due"


@pytest.mark.parametrize(
    ("offset", "why"),
    [
        pytest.param(timedelta(microseconds=-1), "backoff", id="just-before-the-retry"),
        pytest.param(timedelta(0), "retry", id="at-the-retry-instant"),
    ],
)
def test_a_failed_digest_is_retried_at_its_due_instant(offset: timedelta, why: str) -> None:
    failed = state(status="failed", attempts=1, next_due_at=T0, scan_seq=1, scan_id=scan_id_for(REF, 1))
    d = plan.decide(failed, T0 + offset, POLICY, {}, LIMITS)
    assert d.why == why
    if why == "retry":
        assert d.scan is not None and d.scan.attempt == 2 and d.state is not None and d.state.attempts == 2


def test_a_given_up_digest_waits_then_starts_a_new_cycle_from_attempt_one() -> None:
    gave_up = state(status="failed", attempts=POLICY.max_attempts, next_due_at=T0, scan_seq=3)
    assert plan.decide(gave_up, T0 - timedelta(seconds=1), POLICY, {}, LIMITS).why == "gave_up"
    d = plan.decide(gave_up, T0, POLICY, {}, LIMITS)
    assert d.why == "retry" and d.scan is not None and d.scan.attempt == 1


@pytest.mark.parametrize("status", ["done", "failed", "not_scanned"])
def test_a_completion_of_a_scan_that_is_no_longer_in_flight_changes_nothing(status: str) -> None:
    sid = scan_id_for(REF, 1)
    current = state(status=status, scan_seq=1, scan_id=sid, last_scan_at=T0, next_due_at=T0 + timedelta(hours=24))
    done = ScanCompleted(
        cluster="prod",
        scan_id=sid,
        digest_ref=REF,
        job=sid,
        raw_key=f"raw/sha256/{HEX}/{sid}.json",
        finished_at=T0 + timedelta(hours=1),
    )
    assert plan.on_completed(current, done, POLICY) == Decision(None, None, "stale")


@pytest.mark.parametrize(
    ("sbom_version", "mode"),
    [
        pytest.param("0.76.0", "sbom", id="exactly-the-minimum-is-usable"),
        pytest.param("v0.76.0", "sbom", id="a-leading-v-is-ignored"),
        pytest.param("0.75.99", "node", id="just-below-the-minimum"),
        pytest.param("0.76", "node", id="a-shorter-version-is-older"),
    ],
)
def test_the_sbom_minimum_trivy_version_is_inclusive(sbom_version: str, mode: str) -> None:
    current = state(status="done", last_scan_at=T0, next_due_at=T0, sbom_key=SBOM_KEY, sbom_trivy_version=sbom_version)
    policy = msgspec.structs.replace(POLICY, sbom_min_trivy_version="0.76.0")
    d = plan.decide(current, T0, policy, {}, LIMITS)
    assert d.scan is not None and d.scan.mode == mode


@pytest.mark.parametrize(
    ("stopped_ago", "answer"),
    [
        pytest.param(timedelta(days=7) - timedelta(microseconds=1), "made_due", id="just-inside-the-window"),
        pytest.param(timedelta(days=7), "not_covered", id="at-the-end-of-the-window"),
    ],
)
def test_a_digest_no_node_runs_is_rescanned_from_its_sbom_only_within_the_window(
    stopped_ago: timedelta, answer: str
) -> None:
    gone = state(
        status="done",
        nodes_seen=[],
        not_running_since=T0 - stopped_ago,
        last_scan_at=T0 - timedelta(days=1),
        next_due_at=T0 + timedelta(hours=1),
        sbom_key=SBOM_KEY,
    )
    policy = msgspec.structs.replace(POLICY, rescan_gone_for=timedelta(days=7))
    assert plan.make_due(gone, T0, policy)[1] == answer
    d = plan.decide(msgspec.structs.replace(gone, next_due_at=T0), T0, policy, {}, LIMITS)
    assert d.why == ("rescan_due" if answer == "made_due" else "no_node")


def test_without_sbom_rescans_a_digest_no_node_runs_is_not_covered() -> None:
    gone = state(status="done", nodes_seen=[], not_running_since=T0, next_due_at=T0 + timedelta(hours=1))
    assert plan.make_due(gone, T0, POLICY)[1] == "not_covered"
    with_sbom = msgspec.structs.replace(gone, sbom_key=SBOM_KEY)
    assert plan.make_due(with_sbom, T0, msgspec.structs.replace(POLICY, sbom_rescans=False))[1] == "not_covered"


def test_a_forced_rescan_of_a_failed_digest_starts_its_attempts_again() -> None:
    failed = state(status="failed", attempts=POLICY.max_attempts, next_due_at=T0 + timedelta(hours=20))
    new, answer = plan.make_due(failed, T0, POLICY)
    assert answer == "made_due"
    assert new is not None and (new.next_due_at, new.attempts, new.status) == (T0, 0, "failed")


def test_a_forced_rescan_of_a_done_digest_keeps_its_attempts() -> None:
    done = state(status="done", attempts=2, last_scan_at=T0, next_due_at=T0 + timedelta(hours=20))
    new, _ = plan.make_due(done, T0, POLICY)
    assert new is not None and (new.next_due_at, new.attempts) == (T0, 2)


def test_a_forced_rescan_of_a_digest_already_due_writes_nothing() -> None:
    for due in (T0, T0 - timedelta(seconds=1)):
        assert plan.make_due(state(status="done", next_due_at=due), T0, POLICY) == (None, "made_due")


@pytest.mark.parametrize(
    ("known", "held"),
    [
        pytest.param(state(status="done", nodes_seen=["n1"]), True, id="runs-somewhere-already"),
        pytest.param(state(status="done", nodes_seen=[]), False, id="runs-nowhere-yet"),
        pytest.param(None, False, id="unknown-digest"),
    ],
)
def test_a_sighting_is_held_only_for_a_digest_known_to_run_somewhere(known: DigestScanState | None, held: bool) -> None:
    decision = Decision(state(status="done"), None, "not_due")
    assert plan.holdable(known, decision) is held


def test_a_sighting_that_writes_nothing_or_plans_a_scan_is_never_held() -> None:
    known = state(status="done", nodes_seen=["n1"])
    assert not plan.holdable(known, Decision(None, None, "not_due"))
    claim = plan.on_seen(None, seen("n1"), T0, POLICY, {}, LIMITS)
    assert claim.scan is not None and not plan.holdable(known, claim)
    assert not plan.holdable(known, Decision(state(status="done"), None, "nodes_full"))


def test_the_policy_defaults_are_the_documented_ones() -> None:
    assert plan.Policy() == plan.Policy(
        rescan_interval=timedelta(hours=24),
        jitter_ratio=0.1,
        claim_ttl=timedelta(minutes=2),
        job_deadline=timedelta(minutes=10),
        deadline_grace=timedelta(minutes=2),
        max_attempts=4,
        backoff_base=timedelta(seconds=30),
        backoff_max=timedelta(minutes=30),
        failure_memory=timedelta(hours=1),
        seen_refresh=timedelta(minutes=10),
        max_nodes_tracked=512,
        sbom_rescans=True,
        sbom_min_trivy_version=None,
        rescan_gone_for=timedelta(days=7),
        cluster="default",
        home_stale=timedelta(hours=3),
    )


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        pytest.param({"jitter_ratio": 1.5}, "jitter_ratio is 1.5", id="jitter-above-one"),
        pytest.param({"jitter_ratio": -0.1}, "jitter_ratio is -0.1", id="negative-jitter"),
        pytest.param({"max_attempts": 0}, "max_attempts is 0", id="no-attempt"),
    ],
)
def test_a_policy_out_of_range_is_refused_naming_the_setting(fields: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        plan.Policy(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("edge", [0.0, 1.0])
def test_a_jitter_ratio_at_its_bounds_is_accepted(edge: float) -> None:
    assert plan.Policy(jitter_ratio=edge).jitter_ratio == edge


def test_a_failed_digest_due_again_that_no_node_runs_any_more_is_not_retried() -> None:
    failed = state(status="failed", attempts=1, nodes_seen=[], next_due_at=T0, scan_seq=1)
    assert plan.decide(failed, T0, POLICY, {}, LIMITS) == Decision(None, None, "no_node", None)


def test_a_sighting_clears_the_reason_a_digest_was_not_scanned_and_only_that() -> None:
    not_scanned = state(status="not_scanned", nodes_seen=[], reason="no node runs this digest any more")
    d = plan.on_seen(not_scanned, seen("n1"), T0, POLICY, {}, LIMITS)
    assert d.state is not None and d.state.reason == ""
    failed = state(status="failed", attempts=1, next_due_at=T0 + timedelta(minutes=1), reason="attempt 1 failed")
    d = plan.on_seen(failed, seen("n1"), T0, POLICY, {}, LIMITS)
    assert d.state is None or d.state.reason == "attempt 1 failed"


@pytest.mark.parametrize(
    ("attempts", "status"),
    [
        pytest.param(POLICY.max_attempts - 1, "not_scanned", id="still-trying-becomes-not-scanned"),
        pytest.param(POLICY.max_attempts, "failed", id="given-up-stays-given-up"),
    ],
)
def test_the_last_node_leaving_a_failed_digest(attempts: int, status: str) -> None:
    failed = state(status="failed", attempts=attempts, nodes_seen=["n1"], next_due_at=T0 + timedelta(minutes=1))
    d = plan.on_gone(failed, gone("n1"), T0, POLICY)
    assert d.state is not None and d.state.status == status
    assert d.state.attempts == (0 if status == "not_scanned" else attempts)


def test_a_failure_that_leaves_no_node_ends_not_scanned_with_no_attempts_counted() -> None:
    claim = running("n1", attempts=2, nodes_seen=["n1"])
    failed = plan.on_failed(claim, failed_event(claim, "ErrImageNeverPull"), T0, POLICY, {}, LIMITS)
    assert failed.state is not None
    assert (failed.state.status, failed.state.attempts, failed.state.next_due_at) == ("not_scanned", 0, None)
    assert failed.state.reason.startswith("no node runs this digest any more")
