"""Decisions per digest: scan once, rescan when due (with jitter), retry elsewhere with backoff, give up, say why."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from schemas.events import (
    ImageGone,
    ImageSeen,
    ReportQuarantined,
    ReportStored,
    ScanCompleted,
    ScanFailed,
    ScanStarted,
    SeverityCounts,
    Workload,
)
from schemas.state import DigestScanState, NodeFailure
from services.dispatcher import plan
from services.dispatcher.limits import Limits
from services.dispatcher.plan import Policy, due_at, scan_id_for

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HEX = "3" * 64
REF = f"registry.example.com/team/app@sha256:{HEX}"
POLICY = Policy(
    rescan_interval=timedelta(hours=24),
    jitter_ratio=0.1,
    max_attempts=3,
    backoff_base=timedelta(seconds=30),
    backoff_max=timedelta(minutes=5),
    cluster="prod",
)
LIMITS = Limits(max_active_per_node=2)
DECODE_STATE = msgspec.json.Decoder(DigestScanState)


def seen(node: str = "n1", ref: str = REF) -> ImageSeen:
    return ImageSeen(
        cluster="prod",
        digest_ref=ref,
        image="registry.example.com/team/app:1.0",
        node=node,
        namespace="team",
        pod="app-7d9f-x2x",
        container="app",
        container_kind="app",
        workload=Workload(kind="Deployment", name="app"),
        observed_at=T0,
    )


def state(**fields: object) -> DigestScanState:
    base: dict[str, object] = {"digest_ref": REF, "cluster": "prod", "nodes_seen": ["n1"], "last_seen_at": T0}
    return msgspec.convert({**base, **fields}, DigestScanState, from_attributes=True)


def running(node: str = "n1", attempts: int = 1, seq: int = 1, **fields: object) -> DigestScanState:
    defaults: dict[str, object] = {"claim_expires_at": T0 + timedelta(minutes=12)}
    return state(
        status="running",
        scan_seq=seq,
        scan_id=scan_id_for(REF, seq),
        node=node,
        attempts=attempts,
        **{**defaults, **fields},
    )


def failed_event(st: DigestScanState, reason: str = "ErrImageNeverPull", node: str | None = None) -> ScanFailed:
    return ScanFailed(
        cluster="prod",
        scan_id=st.scan_id or "",
        digest_ref=REF,
        node=node or st.node,
        job=st.scan_id or "",
        reason=reason,  # type: ignore[arg-type]
        failed_at=T0,
    )


def test_a_digest_never_scanned_is_claimed_on_the_node_that_runs_it() -> None:
    d = plan.on_seen(None, seen("n7"), T0, POLICY, {}, LIMITS)
    assert d.why == "first_scan"
    assert d.scan is not None and d.state is not None
    assert (d.scan.node, d.scan.mode, d.scan.attempt) == ("n7", "node", 1)
    assert d.scan.scan_id == scan_id_for(REF, 1) == d.state.scan_id
    assert d.state.status == "pending"
    assert d.state.claim_expires_at == T0 + POLICY.claim_ttl
    assert d.state.nodes_seen == ["n7"]


def test_second_replica_never_claims_a_claimed_digest() -> None:
    """Both replicas decide on the same read; the CAS lets one write; the loser re-reads and plans nothing."""
    store: dict[str, tuple[int, bytes]] = {}

    def cas(key: str, expected_rev: int, value: DigestScanState) -> bool:
        rev = store.get(key, (0, b""))[0]
        if rev != expected_rev:
            return False
        store[key] = (rev + 1, msgspec.json.encode(value))
        return True

    a = plan.on_seen(None, seen("n1"), T0, POLICY, {}, LIMITS)
    b = plan.on_seen(None, seen("n2"), T0, POLICY, {}, LIMITS)
    assert a.state is not None and b.state is not None
    assert cas(HEX, 0, a.state)
    assert not cas(HEX, 0, b.state)
    rev, raw = store[HEX]
    retry = plan.on_seen(DECODE_STATE.decode(raw), seen("n2"), T0 + timedelta(seconds=1), POLICY, {}, LIMITS)
    assert retry.scan is None
    assert retry.why == "claimed"
    assert retry.state is not None and retry.state.nodes_seen == ["n1", "n2"]  # the node is remembered
    assert retry.state.scan_id == a.state.scan_id
    assert cas(HEX, rev, retry.state)


@pytest.mark.parametrize(
    ("current", "at", "why", "writes"),
    [
        pytest.param(
            state(
                status="done",
                last_scan_at=T0,
                next_due_at=due_at(REF, T0, POLICY),
                last_seen_at=T0 + timedelta(hours=22, minutes=55),
            ),
            T0 + timedelta(hours=23),
            "not_due",
            False,
            id="scanned-less-than-the-interval-ago",
        ),
        pytest.param(
            state(status="done", last_scan_at=T0, next_due_at=T0 + timedelta(hours=25)),
            T0 + timedelta(hours=24, minutes=30),
            "not_due",
            True,  # last_seen_at is older than seen_refresh
            id="interval-passed-but-jitter-not-yet",
        ),
        pytest.param(
            running(claim_expires_at=T0 + timedelta(minutes=5)),
            T0 + timedelta(minutes=1),
            "claimed",
            False,
            id="scan-in-flight",
        ),
        pytest.param(
            state(status="failed", attempts=1, scan_id=scan_id_for(REF, 1), next_due_at=T0 + timedelta(seconds=30)),
            T0 + timedelta(seconds=10),
            "backoff",
            False,
            id="retry-waits-for-its-backoff",
        ),
    ],
)
def test_nothing_is_planned(current: DigestScanState, at: datetime, why: str, writes: bool) -> None:
    d = plan.on_seen(current, seen("n1"), at, POLICY, {}, LIMITS)
    assert d.scan is None
    assert d.why == why
    assert (d.state is not None) == writes


def test_a_due_digest_is_rescanned_under_a_new_scan_id() -> None:
    current = state(status="done", scan_seq=4, scan_id=scan_id_for(REF, 4), last_scan_at=T0, next_due_at=T0)
    d = plan.on_seen(current, seen("n1"), T0 + timedelta(seconds=1), POLICY, {}, LIMITS)
    assert d.why == "rescan_due"
    assert d.scan is not None and d.state is not None
    assert d.scan.scan_id == scan_id_for(REF, 5) != current.scan_id
    assert (d.state.attempts, d.state.scan_seq, d.scan.mode) == (1, 5, "node")


@pytest.mark.parametrize(
    ("sbom_version", "min_version", "nodes", "mode"),
    [
        pytest.param("0.76.0", None, ["n1"], "sbom", id="sbom-exists-rescan-needs-no-node"),
        pytest.param("0.76.0", None, [], "sbom", id="sbom-rescan-of-a-digest-no-longer-running"),
        pytest.param("0.70.1", "0.76.0", ["n1"], "node", id="sbom-from-an-older-trivy-means-node-scan"),
        pytest.param("0.76.2", "0.76.0", ["n1"], "sbom", id="sbom-from-a-newer-trivy-is-usable"),
    ],
)
def test_rescan_mode(sbom_version: str, min_version: str | None, nodes: list[str], mode: str) -> None:
    current = state(
        status="done",
        nodes_seen=nodes,
        last_scan_at=T0,
        next_due_at=T0,
        sbom_key=f"sbom/sha256/{HEX}/psw-000000000000000000000001.cdx.json",
        sbom_trivy_version=sbom_version,
    )
    policy = msgspec.structs.replace(POLICY, sbom_min_trivy_version=min_version)
    d = plan.decide(current, T0 + timedelta(seconds=1), policy, {}, LIMITS)
    assert d.scan is not None
    assert d.scan.mode == mode
    assert (d.scan.node is None) == (mode == "sbom")


def test_due_times_are_jittered_by_digest_within_the_window_and_the_same_on_every_replica() -> None:
    refs = [f"r/app@sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(2000)]
    dues = [due_at(r, T0, POLICY) for r in refs]
    assert dues == [due_at(r, T0, POLICY) for r in refs]
    lo, hi = T0 + POLICY.rescan_interval, T0 + POLICY.rescan_interval * 1.1
    assert all(lo <= d <= hi for d in dues)
    buckets = {int((d - lo) / (hi - lo) * 10) for d in dues}
    assert buckets >= set(range(10))  # spread over the whole window, not bunched


@pytest.mark.parametrize(
    ("reason", "nodes_after", "next_node"),
    [
        pytest.param("ErrImageNeverPull", ["n2"], "n2", id="image-not-on-node-forgets-the-node"),
        pytest.param("NodeGone", ["n2"], "n2", id="node-gone-forgets-the-node"),
        pytest.param("DeadlineExceeded", ["n1", "n2"], "n2", id="deadline-keeps-node-but-retries-elsewhere"),
        pytest.param("OOMKilled", ["n1", "n2"], "n2", id="oom-retries-elsewhere"),
    ],
)
def test_a_failed_scan_is_retried_on_another_node_after_backoff(
    reason: str, nodes_after: list[str], next_node: str
) -> None:
    current = running("n1", nodes_seen=["n1", "n2"])
    d = plan.on_failed(current, failed_event(current, reason), T0, POLICY, {}, LIMITS)
    assert d.why == "backoff"
    assert d.scan is None and d.state is not None
    assert d.state.status == "failed"
    assert d.state.nodes_seen == nodes_after
    assert d.state.next_due_at == T0 + timedelta(seconds=30) == d.recheck_at
    assert reason in d.state.reason
    retry = plan.decide(d.state, T0 + timedelta(seconds=31), POLICY, {}, LIMITS)
    assert retry.why == "retry"
    assert retry.scan is not None and retry.state is not None
    assert (retry.scan.node, retry.scan.attempt) == (next_node, 2)
    assert retry.scan.scan_id == scan_id_for(REF, 2)


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [
        pytest.param(1, timedelta(seconds=30), id="first-retry-waits-the-base"),
        pytest.param(2, timedelta(seconds=60), id="second-doubles"),
        pytest.param(3, timedelta(seconds=120), id="third-doubles-again"),
        pytest.param(5, timedelta(minutes=5), id="capped-at-backoff-max"),
        pytest.param(200, timedelta(minutes=5), id="huge-attempt-count-does-not-overflow"),
    ],
)
def test_backoff(attempts: int, delay: timedelta) -> None:
    assert plan.backoff(attempts, POLICY) == delay


def test_after_the_last_attempt_the_digest_is_given_up_until_the_next_interval() -> None:
    current = running("n1", attempts=3, nodes_seen=["n1", "n2"])
    d = plan.on_failed(current, failed_event(current, "ScanError"), T0, POLICY, {}, LIMITS)
    assert d.why == "gave_up"
    assert d.state is not None and d.scan is None
    assert d.state.status == "failed"
    assert d.state.reason.startswith("gave up after 3 attempts; last: ScanError on node n1")
    assert d.state.next_due_at == T0 + POLICY.rescan_interval
    later = plan.decide(d.state, T0 + POLICY.rescan_interval, POLICY, {}, LIMITS)
    assert later.scan is not None and later.scan.attempt == 1  # a new cycle, not attempt 4


def test_when_no_node_runs_the_digest_any_more_it_is_not_scanned_with_the_reason() -> None:
    current = running("n1")
    d = plan.on_failed(current, failed_event(current, "ErrImageNeverPull"), T0, POLICY, {}, LIMITS)
    assert d.why == "no_node"
    assert d.state is not None and d.scan is None
    assert d.state.status == "not_scanned"
    assert d.state.reason == "no node runs this digest any more; last attempt failed with ErrImageNeverPull on node n1"
    back = plan.on_seen(d.state, seen("n3"), T0 + timedelta(minutes=1), POLICY, {}, LIMITS)
    assert back.scan is not None and back.scan.node == "n3" and back.scan.attempt == 1


@pytest.mark.parametrize(
    ("current", "status_after", "reason_after"),
    [
        pytest.param(
            state(status="failed", attempts=1, next_due_at=T0 + timedelta(seconds=30)),
            "not_scanned",
            "no node runs this digest any more (last on node n1)",
            id="waiting-retry-loses-its-last-node",
        ),
        pytest.param(
            state(status="done", last_scan_at=T0), "done", "", id="scanned-digest-stays-done-when-scaled-to-zero"
        ),
    ],
)
def test_image_gone(current: DigestScanState, status_after: str, reason_after: str) -> None:
    gone = ImageGone(cluster="prod", digest_ref=REF, node="n1", observed_at=T0)
    d = plan.on_gone(current, gone, T0, POLICY)
    assert d.state is not None
    assert d.state.nodes_seen == []
    assert (d.state.status, d.state.reason) == (status_after, reason_after)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param("completed", id="completion-of-an-older-scan"),
        pytest.param("failed", id="failure-of-an-older-scan"),
    ],
)
def test_events_for_another_scan_id_change_nothing(event: str) -> None:
    current = running(seq=2)
    old = scan_id_for(REF, 1)
    if event == "completed":
        done = ScanCompleted(
            cluster="prod", scan_id=old, digest_ref=REF, job=old, raw_key=f"raw/sha256/{HEX}/{old}.json", finished_at=T0
        )
        d = plan.on_completed(current, done, POLICY)
    else:
        ev = ScanFailed(cluster="prod", scan_id=old, digest_ref=REF, job=old, reason="ScanError", failed_at=T0)
        d = plan.on_failed(current, ev, T0, POLICY, {}, LIMITS)
    assert (d.state, d.scan, d.why) == (None, None, "stale")


def test_completion_marks_done_and_schedules_the_jittered_rescan() -> None:
    current = running(attempts=2, failures=[NodeFailure(node="n9", reason="OOMKilled", at=T0)])
    sid = current.scan_id or ""
    done = ScanCompleted(
        cluster="prod", scan_id=sid, digest_ref=REF, job=sid, raw_key=f"raw/sha256/{HEX}/{sid}.json", finished_at=T0
    )
    d = plan.on_completed(current, done, POLICY)
    assert d.state is not None
    # attempts stay: a report found missing afterwards is a failed attempt of the same cycle
    assert (d.state.status, d.state.attempts, d.state.failures) == ("done", 2, [])
    assert d.state.last_scan_at == T0
    assert d.state.next_due_at == due_at(REF, T0, POLICY)


def test_created_job_turns_the_claim_running_until_its_deadline() -> None:
    pending = plan.on_seen(None, seen(), T0, POLICY, {}, LIMITS).state
    assert pending is not None and pending.scan_id is not None
    now = T0 + timedelta(seconds=2)
    new = plan.on_created(pending, pending.scan_id, now, POLICY)
    assert new is not None
    assert new.status == "running"
    assert new.claim_expires_at == now + POLICY.job_deadline + POLICY.deadline_grace
    assert plan.on_created(new, pending.scan_id, now, POLICY) is None  # idempotent


def test_an_abandoned_pending_claim_is_resumed_under_the_same_scan_id() -> None:
    pending = plan.on_seen(None, seen(), T0, POLICY, {}, LIMITS).state
    assert pending is not None
    later = T0 + POLICY.claim_ttl + timedelta(seconds=1)
    d = plan.decide(pending, later, POLICY, {}, LIMITS)
    assert d.why == "resume_claim"
    assert d.scan is not None and d.state is not None
    assert d.scan.scan_id == pending.scan_id
    assert d.state.scan_seq == pending.scan_seq
    assert d.state.claim_expires_at == later + POLICY.claim_ttl


def test_a_running_scan_that_outlived_its_deadline_counts_as_a_failure_and_retries() -> None:
    current = running("n1", nodes_seen=["n1", "n2"])
    assert current.claim_expires_at is not None
    d = plan.decide(current, current.claim_expires_at + timedelta(seconds=1), POLICY, {}, LIMITS)
    assert d.why == "backoff"
    assert d.state is not None
    assert d.state.status == "failed"
    assert d.state.failures[-1].node == "n1"
    assert "DeadlineExceeded" in d.state.reason


def test_busy_nodes_leave_the_digest_unclaimed() -> None:
    d = plan.on_seen(None, seen("n1"), T0, POLICY, {"n1": 2}, LIMITS)
    assert d.why == "nodes_full"
    assert d.scan is None
    assert d.state is not None and d.state.status == "not_scanned"  # the node is recorded, nothing claimed


def test_a_node_seen_again_within_the_refresh_writes_nothing() -> None:
    current = state(status="done", last_scan_at=T0, next_due_at=T0 + timedelta(days=1), last_seen_at=T0)
    d = plan.on_seen(current, seen("n1"), T0 + timedelta(minutes=1), POLICY, {}, LIMITS)
    assert (d.state, d.scan) == (None, None)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        pytest.param(["psw-1", "psw-2"], ["psw-2", "psw-1"], True, id="order-does-not-matter"),
        pytest.param(["psw-1", "psw-2"], ["psw-1", "psw-3"], False, id="another-member-another-batch"),
        pytest.param(["psw-1"], ["psw-1", "psw-1"], False, id="multiset-not-set"),
    ],
)
def test_batch_ids(a: list[str], b: list[str], same: bool) -> None:
    assert (plan.batch_id_for(a) == plan.batch_id_for(b)) == same
    assert re.fullmatch(r"psw-b-[0-9a-f]{24}", plan.batch_id_for(a))


@pytest.mark.parametrize("seq", [1, 2, 1000])
def test_scan_ids_are_dns_labels_distinct_per_claim(seq: int) -> None:
    sid = scan_id_for(REF, seq)
    assert re.fullmatch(r"psw-[0-9a-f]{24}", sid)
    assert sid != scan_id_for(REF, seq + 1)
    assert sid == scan_id_for(REF.replace("registry.example.com/team/app", "other/repo"), seq)  # keyed by digest


def test_scan_started_event_confirms_the_claim_like_a_created_job() -> None:
    pending = plan.on_seen(None, seen(), T0, POLICY, {}, LIMITS).state
    assert pending is not None and pending.scan_id is not None
    started = ScanStarted(
        cluster="prod", scan_id=pending.scan_id, digest_ref=REF, node="n1", job=pending.scan_id, started_at=T0
    )
    new = plan.on_started(pending, started, POLICY)
    assert new is not None and new.status == "running"
    other = msgspec.structs.replace(started, scan_id=scan_id_for(REF, 99))
    assert plan.on_started(pending, other, POLICY) is None


@pytest.mark.parametrize(
    ("current", "at", "writes"),
    [
        (None, T0, True),
        (state(status="not_scanned"), T0, False),
        (state(status="done", last_scan_at=T0 - timedelta(days=3), next_due_at=T0 - timedelta(hours=1)), T0, False),
        (state(status="failed", attempts=1, node="n2", next_due_at=T0 - timedelta(seconds=1)), T0, False),
        (
            state(status="pending", scan_seq=1, scan_id=scan_id_for(REF, 1), node="n1", claim_expires_at=T0),
            T0 + timedelta(seconds=1),
            False,
        ),
    ],
    ids=["never_seen", "never_scanned", "rescan_due", "retry_after_backoff", "abandoned_claim"],
)
def test_without_room_in_the_limiter_nothing_is_claimed_and_the_digest_waits(
    current: DigestScanState | None, at: datetime, writes: bool
) -> None:
    """A claim made only to wait for a slot would expire while waiting and be rewritten by every sweep."""
    d = plan.on_seen(current, seen("n1"), at, POLICY, {}, LIMITS, room=False)
    assert d.scan is None
    assert d.why == "limited"
    assert (d.state is not None) is writes
    if d.state is not None:
        assert d.state.status == "not_scanned" and d.state.scan_id is None
    with_room = plan.on_seen(current, seen("n1"), at, POLICY, {}, LIMITS, room=True)
    assert with_room.scan is not None  # the same digest is claimed as soon as there is room


def test_a_failure_without_room_records_the_failure_and_claims_no_retry() -> None:
    current = running(node="n1", attempts=1, nodes_seen=["n1", "n2"])
    failed = failed_event(current, reason="DeadlineExceeded")
    d = plan.on_failed(current, failed, T0, Policy(backoff_base=timedelta(0), cluster="prod"), {}, LIMITS, room=False)
    assert d.scan is None and d.why == "limited"
    assert d.state is not None and d.state.status == "failed" and d.state.attempts == 1


def _at(seen_event: ImageSeen, observed_at: datetime) -> ImageSeen:
    return msgspec.structs.replace(seen_event, observed_at=observed_at)


def test_sightings_written_together_record_every_node_once_and_decide_once() -> None:
    parked = state(status="not_scanned", nodes_seen=["n1"])
    batch = [seen("n2"), seen("n3"), seen("n2"), seen("n1")]
    d = plan.on_sightings(parked, batch, T0, POLICY, {}, LIMITS, room=False)
    assert d.state is not None and d.state.nodes_seen == ["n1", "n2", "n3"]
    assert (d.why, d.scan) == ("limited", None)
    one_by_one = parked
    for event in batch:
        one_by_one = plan.on_seen(one_by_one, event, T0, POLICY, {}, LIMITS, room=False).state or one_by_one
    assert one_by_one == d.state


@pytest.mark.parametrize(
    ("current", "room", "holdable"),
    [
        pytest.param(running("n1"), True, True, id="claimed-digest-on-another-node"),
        pytest.param(
            state(status="done", last_scan_at=T0, next_due_at=T0 + timedelta(hours=24)), True, True, id="done"
        ),
        pytest.param(state(status="not_scanned"), False, True, id="waiting-for-a-global-slot"),
        pytest.param(state(status="not_scanned"), True, False, id="would-start-a-scan-now"),
        pytest.param(state(status="not_scanned", nodes_seen=[]), True, False, id="no-node-yet-would-start"),
        pytest.param(state(status="not_scanned", nodes_seen=[]), False, True, id="no-node-yet-no-global-slot"),
        pytest.param(None, True, False, id="first-sighting-would-start"),
        pytest.param(None, False, True, id="first-sighting-no-global-slot"),
    ],
)
def test_a_sighting_is_held_only_when_it_can_change_no_decision(
    current: DigestScanState | None, room: bool, holdable: bool
) -> None:
    d = plan.on_seen(current, seen("n2"), T0, POLICY, {}, LIMITS, room=room)
    assert plan.holdable(current, d) is holdable


def test_a_sighting_on_full_nodes_is_not_held_a_new_node_may_have_room() -> None:
    current = state(status="not_scanned", nodes_seen=["n1"])
    d = plan.on_seen(current, seen("n1"), T0 + timedelta(hours=1), POLICY, {"n1": 2}, LIMITS)
    assert d.why == "nodes_full"
    assert not plan.holdable(current, d)


def test_a_sighting_observed_before_its_nodes_image_gone_does_not_bring_the_node_back() -> None:
    current = running("n1", nodes_seen=["n1", "n2"])
    gone = ImageGone(cluster="prod", digest_ref=REF, node="n2", observed_at=T0 + timedelta(seconds=5))
    after_gone = plan.on_gone(current, gone, T0 + timedelta(seconds=6), POLICY).state
    assert after_gone is not None and after_gone.nodes_seen == ["n1"]
    late = plan.on_sightings(after_gone, [_at(seen("n2"), T0)], T0 + timedelta(seconds=7), POLICY, {}, LIMITS)
    assert late.state is None  # nothing to write
    back = plan.on_sightings(
        after_gone, [_at(seen("n2"), T0 + timedelta(seconds=9))], T0 + timedelta(seconds=9), POLICY, {}, LIMITS
    )
    assert back.state is not None and back.state.nodes_seen == ["n1", "n2"] and back.state.nodes_left == []


def test_an_image_gone_for_a_node_not_recorded_yet_is_remembered_once() -> None:
    current = running("n1")
    gone = ImageGone(cluster="prod", digest_ref=REF, node="n9", observed_at=T0)
    first = plan.on_gone(current, gone, T0, POLICY)
    assert first.state is not None and [n.node for n in first.state.nodes_left] == ["n9"]
    assert first.state.nodes_seen == ["n1"] and first.state.status == "running"
    assert plan.on_gone(first.state, gone, T0, POLICY).why == "stale"
    assert plan.on_sightings(first.state, [seen("n9")], T0, POLICY, {}, LIMITS).state is None


def test_nodes_left_are_bounded() -> None:
    current = running("n1")
    for i in range(plan.NODES_LEFT_KEPT + 10):
        gone = ImageGone(cluster="prod", digest_ref=REF, node=f"x{i}", observed_at=T0)
        current = plan.on_gone(current, gone, T0, POLICY).state or current
    assert len(current.nodes_left) == plan.NODES_LEFT_KEPT
    assert current.nodes_left[-1].node == f"x{plan.NODES_LEFT_KEPT + 9}"


# -- scan pods refused by the API server, reports that never arrived --------------------------------------------------

REFUSED = (
    'Error creating: pods "x" is forbidden: error looking up service account ps/scan: serviceaccount "scan" not found'
)


def test_a_refused_scan_pod_is_not_the_nodes_fault_and_not_an_attempt() -> None:
    current = running(node="n1", attempts=3, nodes_seen=["n1", "n2"])  # the last attempt max_attempts allows
    failed = msgspec.structs.replace(failed_event(current, reason="PodCreateRejected"), message=REFUSED)
    d = plan.on_failed(current, failed, T0, POLICY, {}, LIMITS)
    assert d.state is not None
    assert d.state.status == "failed", "not given up: the attempt limit is for the scan's own failures"
    assert d.state.attempts == 2
    assert d.state.nodes_seen == ["n1", "n2"], "the node keeps the image"
    assert d.state.next_due_at == T0 + POLICY.backoff_base
    assert d.state.reason.startswith("PodCreateRejected: " + REFUSED)
    assert "on node" not in d.state.reason
    # After the backoff, the retry does not avoid n1 for it (n1 is the less loaded node).
    later = plan.decide(d.state, T0 + POLICY.backoff_base, POLICY, {"n2": 1}, LIMITS)
    assert later.scan is not None and later.scan.node == "n1"


def _quarantined(st: DigestScanState, kind: str = "missing", what: str = "report") -> ReportQuarantined:
    sid = st.scan_id or ""
    return ReportQuarantined(
        cluster="prod",
        scan_id=sid,
        digest_ref=REF,
        object=what,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        reason=f"no object at raw/sha256/{HEX}/{sid}.json" if kind == "missing" else "line 1: not JSON",
        source_key=f"raw/sha256/{HEX}/{sid}.json",
        error_key=f"quarantine/{sid}.error.txt",
        quarantined_at=T0,
    )


def _completed(st: DigestScanState) -> DigestScanState:
    sid = st.scan_id or ""
    done = ScanCompleted(
        cluster="prod", scan_id=sid, digest_ref=REF, job=sid, raw_key=f"raw/sha256/{HEX}/{sid}.json", finished_at=T0
    )
    d = plan.on_completed(st, done, POLICY)
    assert d.state is not None
    return d.state


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        pytest.param("missing", "ReportMissing", id="nothing-uploaded"),
        pytest.param("not-json", "ReportUnreadable", id="unreadable"),
    ],
)
def test_a_completed_scan_without_a_usable_report_is_a_failed_attempt_retried_with_backoff(
    kind: str, reason: str
) -> None:
    done = _completed(running(node="n1", attempts=1))
    d = plan.on_quarantined(done, _quarantined(done, kind), T0, POLICY, {}, LIMITS)
    assert d.scan is None and d.why == "backoff"
    assert d.state is not None and d.state.status == "failed"
    assert d.state.reason.startswith(f"attempt 1 failed with {reason} on node n1: ")
    assert d.state.next_due_at == T0 + plan.backoff(1, POLICY)


def test_reports_missing_every_time_give_up_after_max_attempts() -> None:
    current: DigestScanState = running(node="n1", attempts=1)
    at = T0
    for _ in range(POLICY.max_attempts):
        done = _completed(current)
        d = plan.on_quarantined(done, _quarantined(done), at, POLICY, {}, LIMITS)
        assert d.state is not None
        if d.state.attempts >= POLICY.max_attempts:
            break
        at = d.state.next_due_at or at
        retry = plan.decide(d.state, at, POLICY, {}, LIMITS)
        assert retry.scan is not None and retry.state is not None
        current = msgspec.structs.replace(retry.state, status="running")
    assert d.state.reason.startswith(f"gave up after {POLICY.max_attempts} attempts; last: ReportMissing")


@pytest.mark.parametrize(
    ("st", "quarantined", "why"),
    [
        pytest.param(running(), _quarantined(running(), what="sbom"), "stale", id="an-sbom-leaves-the-report-standing"),
        pytest.param(running(seq=2), _quarantined(running(seq=1)), "stale", id="another-scan"),
        pytest.param(None, _quarantined(running()), "stale", id="unknown-digest"),
    ],
)
def test_quarantines_that_change_nothing(st: DigestScanState | None, quarantined: ReportQuarantined, why: str) -> None:
    d = plan.on_quarantined(st, quarantined, T0, POLICY, {}, LIMITS)
    assert (d.state, d.scan, d.why) == (None, None, why)


def test_a_quarantine_before_the_completion_fails_the_scan_and_the_late_completion_is_stale() -> None:
    current = running(node="n1", attempts=1)
    d = plan.on_quarantined(current, _quarantined(current), T0, POLICY, {}, LIMITS)
    assert d.state is not None and d.state.status == "failed"
    sid = current.scan_id or ""
    late = ScanCompleted(
        cluster="prod", scan_id=sid, digest_ref=REF, job=sid, raw_key=f"raw/sha256/{HEX}/{sid}.json", finished_at=T0
    )
    assert plan.on_completed(d.state, late, POLICY).why == "stale"


# --- the SBOM the parser kept, and claims given up ------------------------------------------------------------------

SBOM_KEY = f"sbom/sha256/{HEX}/history/20261123T080000Z.cdx.json"


def _stored(sbom_key: str | None, version: str | None = "0.76.0") -> ReportStored:
    return ReportStored(
        cluster="c",
        scan_id="psw-000000000002",
        digest_ref=REF,
        report_key=f"reports/sha256/{HEX}/latest.json",
        history_key=f"reports/sha256/{HEX}/history/1.json",
        counts=SeverityCounts(),
        fixable=SeverityCounts(),
        stored_at=T0,
        sbom_key=sbom_key,
        sbom_trivy_version=version,
    )


def test_the_sbom_the_parser_kept_changes_only_the_sbom_fields_and_never_creates_state() -> None:
    state = DigestScanState(digest_ref=REF, status="running", attempts=2, scan_id="psw-000000000002")
    updated = plan.on_sbom_stored(state, _stored(SBOM_KEY))
    assert updated is not None and (updated.sbom_key, updated.sbom_trivy_version) == (SBOM_KEY, "0.76.0")
    assert msgspec.structs.replace(updated, sbom_key=None, sbom_trivy_version=None) == state
    assert plan.on_sbom_stored(updated, _stored(SBOM_KEY)) is None, "already recorded: nothing to write"
    assert plan.on_sbom_stored(None, _stored(SBOM_KEY)) is None, "the dispatcher creates states from sightings only"
    assert plan.on_sbom_stored(state, _stored(None)) is None, "no usable SBOM: nothing recorded"
    newer = plan.on_sbom_stored(updated, _stored(SBOM_KEY.replace("080000", "090000"), None))
    assert newer is not None and (newer.sbom_key, newer.sbom_trivy_version) == (
        SBOM_KEY.replace("080000", "090000"),
        None,
    )


@pytest.mark.parametrize(
    ("before", "after", "abandoned"),
    [
        pytest.param(
            ("pending", "n1", "psw-00000001"), ("pending", "n2", "psw-00000002"), True, id="claimed-again-elsewhere"
        ),
        pytest.param(("running", "n1", "psw-00000001"), ("failed", None, "psw-00000001"), True, id="running-given-up"),
        pytest.param(
            ("pending", "n1", "psw-00000001"), ("running", "n1", "psw-00000001"), False, id="same-scan-goes-on"
        ),
        pytest.param(
            ("pending", None, "psw-00000001"), ("failed", None, "psw-00000001"), False, id="sbom-claim-has-no-node-job"
        ),
        pytest.param(("done", "n1", "psw-00000001"), ("pending", "n1", "psw-00000002"), False, id="finished-scan"),
    ],
)
def test_a_decision_abandons_only_a_node_scan_it_replaces_or_ends(
    before: tuple[str, str | None, str], after: tuple[str, str | None, str], abandoned: bool
) -> None:
    def state(status: str, node: str | None, scan_id: str) -> DigestScanState:
        return msgspec.convert({"digest_ref": REF, "status": status, "node": node, "scan_id": scan_id}, DigestScanState)

    decision = plan.Decision(state(*after), None, "claim")
    assert plan.abandons(state(*before), decision) is abandoned
    assert plan.abandons(state(*before), plan.Decision(None, None, "not_due")) is False, "nothing written"
