"""More of the plan's edges: events without a state, failure texts at their bounds, the node a failure is charged
to, a new cycle's attempt count, the refresh of `last_seen_at`, the failure memory, version comparison of an SBOM's
Trivy, the due-time phase and the nodes remembered as left (bench/mutation.py found them unpinned)."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from schemas.events import ImageGone
from schemas.state import NodeFailure
from services.dispatcher import plan
from services.dispatcher.plan import NODES_LEFT_KEPT, Policy, due_at
from tests.unit.test_dispatcher_plan import HEX, LIMITS, POLICY, REF, T0, failed_event, running, seen, state

SBOM_KEY = f"sbom/sha256/{HEX}/psw-000000000000000000000001.cdx.json"


def test_events_about_a_digest_without_state_are_stale() -> None:
    assert plan.on_sightings(None, (), T0, POLICY, {}, LIMITS) == plan.Decision(None, None, "stale")
    gone = ImageGone(cluster="prod", digest_ref=REF, node="n1", observed_at=T0)
    assert plan.on_gone(None, gone, T0, POLICY) == plan.Decision(None, None, "stale")


def test_a_forced_rescan_of_a_digest_never_scanned_writes_nothing() -> None:
    """It is scanned as soon as a node can take it: there is no due time to move."""
    assert plan.make_due(state(status="not_scanned"), T0, POLICY) == (None, "made_due")


def test_a_failure_is_charged_to_the_node_the_event_names() -> None:
    claim = running("n1", nodes_seen=["n1", "n2"])
    event = msgspec.structs.replace(failed_event(claim), node="n2")
    d = plan.on_failed(claim, event, T0, POLICY, {}, LIMITS)
    assert d.state is not None and [f.node for f in d.state.failures] == ["n2"]
    unnamed = msgspec.structs.replace(failed_event(claim), node=None)
    d = plan.on_failed(claim, unnamed, T0, POLICY, {}, LIMITS)
    assert d.state is not None and [f.node for f in d.state.failures] == ["n1"]


def test_a_failure_message_is_kept_to_200_characters_and_a_reason_to_256() -> None:
    claim = running("n1")
    event = msgspec.structs.replace(failed_event(claim), message="m" * 500)
    d = plan.on_failed(claim, event, T0, POLICY, {}, LIMITS)
    assert d.state is not None
    assert "m" * 200 in d.state.reason and "m" * 201 not in d.state.reason
    long_reason = "R" * 300
    recorded = plan._record_failure(claim, "n1", long_reason, "", T0, POLICY)
    assert recorded.failures[-1] == NodeFailure(node="n1", reason="R" * 256, at=T0)


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(state(status="done", last_scan_at=T0 - timedelta(days=2), next_due_at=T0), id="rescan"),
        pytest.param(state(status="not_scanned"), id="first-scan"),
    ],
)
def test_a_new_cycle_starts_at_attempt_one_with_no_failures(before: object) -> None:
    worn = msgspec.structs.replace(
        before,  # type: ignore[type-var]
        attempts=2,
        failures=[NodeFailure(node="n9", reason="OOMKilled", at=T0 - timedelta(days=1))],
    )
    d = plan.decide(worn, T0, POLICY, {}, LIMITS)
    assert d.scan is not None and d.scan.attempt == 1
    assert d.state is not None and d.state.attempts == 1 and d.state.failures == []


@pytest.mark.parametrize(
    ("since", "refreshed"),
    [(POLICY.seen_refresh - timedelta(microseconds=1), False), (POLICY.seen_refresh, True)],
    ids=["just-before", "at-the-refresh"],
)
def test_last_seen_at_is_rewritten_once_seen_refresh_has_passed(since: timedelta, refreshed: bool) -> None:
    done = state(status="done", last_scan_at=T0, next_due_at=T0 + timedelta(days=1), last_seen_at=T0)
    d = plan.on_seen(done, seen("n1"), T0 + since, POLICY, {}, LIMITS)
    assert (d.state is not None and d.state.last_seen_at == T0 + since) is refreshed


@pytest.mark.parametrize(
    ("age", "avoided"),
    [(POLICY.failure_memory - timedelta(microseconds=1), True), (POLICY.failure_memory, False)],
    ids=["still-remembered", "forgotten-at-the-instant"],
)
def test_a_node_that_failed_is_avoided_for_failure_memory(age: timedelta, avoided: bool) -> None:
    failing = state(
        status="failed",
        attempts=1,
        nodes_seen=["n1", "n2"],
        failures=[NodeFailure(node="n1", reason="OOMKilled", at=T0 - age)],
        next_due_at=T0,
    )
    d = plan.decide(failing, T0, POLICY, {"n2": 1}, LIMITS)  # n1 is idle: chosen unless its failure is remembered
    assert d.scan is not None
    assert d.scan.node == ("n2" if avoided else "n1")


@pytest.mark.parametrize(
    ("made_by", "usable"),
    [("0.50.1", True), ("0.50.dev", False), ("v0.51", True), ("0.50", False)],
    ids=["same", "a-text-part-counts-as-zero", "v-prefix-and-newer", "shorter-is-older"],
)
def test_an_sbom_is_used_only_when_made_by_at_least_the_minimum_trivy(made_by: str, usable: bool) -> None:
    policy = msgspec.structs.replace(POLICY, sbom_min_trivy_version="0.50.1")
    done = state(
        status="done",
        nodes_seen=[],
        last_scan_at=T0 - timedelta(days=2),
        next_due_at=T0,
        sbom_key=SBOM_KEY,
        sbom_trivy_version=made_by,
        not_running_since=T0 - timedelta(hours=1),
    )
    d = plan.decide(done, T0, policy, {}, LIMITS)
    assert (d.why == "rescan_due") is usable
    assert (d.why == "no_node") is not usable


def test_the_due_phase_of_a_digest_is_its_first_32_bits_over_two_to_the_32() -> None:
    """The digest 0x80000000… is due exactly half-way into the jitter window."""
    policy = Policy(rescan_interval=timedelta(days=30), jitter_ratio=1.0)
    ref = "registry.example.com/team/app@sha256:8" + "0" * 63
    assert due_at(ref, T0, policy) == T0 + timedelta(days=45)


def test_the_last_32_nodes_left_are_remembered() -> None:
    nodes = [f"n{i}" for i in range(40)]
    current = state(status="done", nodes_seen=nodes, last_scan_at=T0, next_due_at=T0 + timedelta(days=1))
    for node in nodes:
        gone = ImageGone(cluster="prod", digest_ref=REF, node=node, observed_at=T0)
        d = plan.on_gone(current, gone, T0, POLICY)
        assert d.state is not None
        current = d.state
    assert NODES_LEFT_KEPT == 32
    assert [n.node for n in current.nodes_left] == nodes[-32:]


def test_a_policy_allows_a_single_attempt_and_refuses_none() -> None:
    assert Policy(max_attempts=1).max_attempts == 1
    with pytest.raises(ValueError, match="max_attempts is 0"):
        Policy(max_attempts=0)


def test_a_rejected_pod_on_the_first_attempt_leaves_no_attempt_counted() -> None:
    """PodCreateRejected is not an attempt of the scan itself: the count goes back to 0, never below."""
    claim = running("n1", attempts=1)
    recorded = plan._record_failure(claim, "n1", "PodCreateRejected", "quota", T0, POLICY)
    assert recorded.attempts == 0
    zero = running("n1", attempts=0)
    assert plan._record_failure(zero, "n1", "PodCreateRejected", "quota", T0, POLICY).attempts == 0
