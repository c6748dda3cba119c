"""SBOM rescans: batches gather and leave, forced rescans move due times, scaled-to-zero digests stay covered for a
while, and a failed batch blames only the item whose own container failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from schemas import jobs
from schemas.events import ImageGone, ScanFailed, Workload
from schemas.state import DigestScanState, DigestWorkloads, WorkloadRun
from services.dispatcher import plan, rescans
from services.dispatcher.batching import Gathered, Gathering
from services.dispatcher.limits import Limits
from services.dispatcher.plan import Policy, ScanPlan, scan_id_for
from services.watcher import jobstatus
from tests.unit.test_watcher_jobstatus import (
    BATCH_LABELS,
    REF_B,
    batch_item,
    cond,
    cs,
    job,
    scan_pod,
    terminated,
)
from tests.unit.test_watcher_jobstatus import REF as JOB_REF

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HEX = "4" * 64
REF = f"registry.example.com/team/app@sha256:{HEX}"
POLICY = Policy(rescan_interval=timedelta(hours=24), max_attempts=3, rescan_gone_for=timedelta(days=2))
LIMITS = Limits()
SBOM = "sbom/sha256/" + HEX + "/history/20261122t080000000000z.cdx.json"


def state(**fields: Any) -> DigestScanState:
    base: dict[str, Any] = {"digest_ref": REF, "nodes_seen": ["n1"], "last_seen_at": T0}
    return msgspec.convert({**base, **fields}, DigestScanState, from_attributes=True)


def done(**fields: Any) -> DigestScanState:
    defaults: dict[str, Any] = {
        "status": "done",
        "scan_seq": 1,
        "scan_id": scan_id_for(REF, 1),
        "last_scan_at": T0 - timedelta(days=2),
        "next_due_at": T0 - timedelta(minutes=1),
        "sbom_key": SBOM,
        "sbom_trivy_version": "0.76.0",
    }
    return state(**{**defaults, **fields})


# --- plan: what a due digest with an SBOM becomes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "why", "mode"),
    [
        pytest.param({}, "rescan_due", "sbom", id="running-digest-with-sbom-rescans-unpinned"),
        pytest.param({"sbom_key": None}, "rescan_due", "node", id="no-sbom-scans-on-a-node"),
        pytest.param(
            {"nodes_seen": [], "not_running_since": T0 - timedelta(days=1)},
            "rescan_due",
            "sbom",
            id="scaled-to-zero-inside-the-window-still-rescans",
        ),
        pytest.param(
            {"nodes_seen": [], "not_running_since": T0 - timedelta(days=3)},
            "no_node",
            None,
            id="scaled-to-zero-past-the-window-stops",
        ),
        pytest.param(
            {"nodes_seen": [], "not_running_since": None, "last_seen_at": T0 - timedelta(hours=1)},
            "rescan_due",
            "sbom",
            id="older-state-without-not-running-since-uses-last-seen",
        ),
        pytest.param(
            {"nodes_seen": [], "not_running_since": T0 - timedelta(hours=1), "sbom_key": None},
            "no_node",
            None,
            id="scaled-to-zero-without-sbom-cannot-rescan",
        ),
    ],
)
def test_due_digest_rescans_from_its_sbom_while_covered(fields: dict[str, Any], why: str, mode: str | None) -> None:
    decision = plan.decide(done(**fields), T0, POLICY, {}, LIMITS)
    assert decision.why == why
    assert (decision.scan.mode if decision.scan else None) == mode
    if mode == "sbom":
        assert decision.scan is not None and decision.scan.node is None
        assert decision.state is not None and decision.state.status == "pending" and decision.state.node is None


def test_last_node_gone_records_since_when_and_keeps_a_done_digest_due_for_rescans() -> None:
    gone = ImageGone(cluster="c", digest_ref=REF, node="n1", observed_at=T0)
    decision = plan.on_gone(done(next_due_at=T0 + timedelta(hours=3)), gone, T0, POLICY)
    assert decision.state is not None
    assert decision.state.not_running_since == T0
    assert decision.state.status == "done"
    assert decision.recheck_at == T0 + timedelta(hours=3)


def test_seen_again_clears_not_running_since() -> None:
    from tests.unit.test_dispatcher_plan import seen

    before = done(nodes_seen=[], not_running_since=T0 - timedelta(days=1), next_due_at=T0 + timedelta(hours=1))
    decision = plan.on_seen(before, msgspec.structs.replace(seen(ref=REF), node="n2"), T0, POLICY, {}, LIMITS)
    assert decision.state is not None
    assert decision.state.not_running_since is None
    assert decision.state.nodes_seen == ["n2"]


def _sbom_claim(**fields: Any) -> DigestScanState:
    return state(
        status="running",
        scan_seq=2,
        scan_id=scan_id_for(REF, 2),
        node=None,
        attempts=1,
        sbom_key=SBOM,
        claim_expires_at=T0 + timedelta(minutes=12),
        **fields,
    )


def _failed(reason: Any) -> ScanFailed:
    return ScanFailed(
        cluster="c",
        scan_id=scan_id_for(REF, 2),
        digest_ref=REF,
        mode="sbom",
        job="psw-b-0123456789abcdef01234567",
        reason=reason,
        failed_at=T0,
    )


@pytest.mark.parametrize(
    ("reason", "nodes", "sbom_kept", "why", "mode"),
    [
        pytest.param("ScanError", ["n1"], False, "backoff", None, id="own-trivy-failure-falls-back-to-a-node-scan"),
        pytest.param("BatchAborted", ["n1"], True, "backoff", None, id="another-items-failure-keeps-the-sbom"),
        pytest.param("DeadlineExceeded", [], True, "backoff", None, id="scaled-to-zero-batch-deadline-retries-sbom"),
        pytest.param("ScanError", [], False, "no_node", None, id="scaled-to-zero-with-a-bad-sbom-is-not-scanned"),
    ],
)
def test_failed_sbom_rescan_keeps_the_sbom_unless_its_own_container_failed(
    reason: str, nodes: list[str], sbom_kept: bool, why: str, mode: str | None
) -> None:
    before = _sbom_claim(nodes_seen=nodes, not_running_since=None if nodes else T0 - timedelta(hours=1))
    decision = plan.on_failed(before, _failed(reason), T0, POLICY, {}, LIMITS)
    assert decision.state is not None
    assert (decision.state.sbom_key is not None) == sbom_kept
    assert decision.why == why
    if why == "backoff":
        later = plan.decide(decision.state, T0 + timedelta(hours=1), POLICY, {}, LIMITS)
        assert later.scan is not None
        assert later.scan.mode == ("sbom" if sbom_kept else "node")


def test_node_fallback_after_a_bad_sbom_is_pinned_to_a_node_that_runs_the_digest() -> None:
    decision = plan.on_failed(_sbom_claim(nodes_seen=["n7"]), _failed("ScanError"), T0, POLICY, {}, LIMITS)
    assert decision.state is not None
    later = plan.decide(decision.state, T0 + timedelta(hours=1), POLICY, {}, LIMITS)
    assert later.scan is not None and later.scan.node == "n7"


# --- confirming a claim before it joins a batch -------------------------------------------------------------------


def _pending() -> DigestScanState:
    return msgspec.structs.replace(_sbom_claim(), status="pending", claim_expires_at=T0 + timedelta(minutes=2))


@pytest.mark.parametrize(
    ("current", "expected_expiry", "kept"),
    [
        pytest.param(_pending(), T0 + timedelta(minutes=2), True, id="own-live-claim-is-renewed"),
        pytest.param(_pending(), T0 + timedelta(minutes=1), False, id="claim-resumed-by-another-replica-is-dropped"),
        pytest.param(None, T0, False, id="deleted-state-is-dropped"),
        pytest.param(
            msgspec.structs.replace(_pending(), status="running"),
            T0 + timedelta(minutes=2),
            False,
            id="already-running",
        ),
        pytest.param(
            msgspec.structs.replace(_pending(), scan_id=scan_id_for(REF, 3)),
            T0 + timedelta(minutes=2),
            False,
            id="a-newer-claim-replaced-it",
        ),
    ],
)
def test_second_replica_never_batches_a_digest_claimed_by_another(
    current: DigestScanState | None, expected_expiry: datetime, kept: bool
) -> None:
    now = T0 + timedelta(seconds=30)
    renewed = plan.confirm_batch_item(current, scan_id_for(REF, 2), expected_expiry, now, POLICY)
    assert (renewed is not None) == kept
    if renewed is not None:
        assert renewed.claim_expires_at == now + POLICY.claim_ttl


# --- forced rescans ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "answer", "next_due"),
    [
        pytest.param(done(next_due_at=T0 + timedelta(hours=5)), "made_due", T0, id="done-becomes-due-now"),
        pytest.param(done(next_due_at=T0 - timedelta(hours=1)), "made_due", None, id="already-due-writes-nothing"),
        pytest.param(_sbom_claim(), "in_flight", None, id="a-running-scan-is-in-flight"),
        pytest.param(
            done(nodes_seen=[], not_running_since=T0 - timedelta(days=5), next_due_at=T0 + timedelta(hours=1)),
            "not_covered",
            None,
            id="gone-past-the-window-is-not-covered",
        ),
        pytest.param(
            done(status="failed", attempts=3, next_due_at=T0 + timedelta(hours=20)),
            "made_due",
            T0,
            id="given-up-digest-is-due-again",
        ),
    ],
)
def test_forced_rescan_only_moves_the_due_time(
    current: DigestScanState, answer: str, next_due: datetime | None
) -> None:
    new, got = plan.make_due(current, T0, POLICY)
    assert got == answer
    assert (new.next_due_at if new is not None else None) == next_due
    if new is not None:
        assert new.status == current.status, "a request never claims: the dispatcher's normal path does"


def _run(namespace: str) -> WorkloadRun:
    return WorkloadRun(namespace=namespace, workload=Workload(kind="Deployment", name="app"), image="r.example/app:1")


def test_namespace_selection_takes_every_digest_any_workload_there_ran() -> None:
    docs = [
        DigestWorkloads(digest_ref=REF, runs=[_run("team"), _run("other")]),
        DigestWorkloads(digest_ref=REF_B, runs=[_run("other")]),
        DigestWorkloads(digest_ref=JOB_REF, runs=[_run("team")]),
    ]
    assert rescans.keys_in_namespace(docs, "team") == sorted([HEX, JOB_REF.rsplit(":", 1)[1]])
    assert rescans.keys_in_namespace(docs, "nobody") == []


@pytest.mark.parametrize(
    ("digests", "namespace", "everything", "says"),
    [
        pytest.param([], None, False, "exactly one", id="nothing-named"),
        pytest.param([REF], "team", False, "exactly one", id="digest-and-namespace"),
        pytest.param(["nginx:latest"], None, False, "digests", id="a-tag-is-not-a-digest"),
        pytest.param([], "Team_1", False, "namespace", id="namespace-not-a-dns-label"),
    ],
)
def test_bad_rescan_requests_say_what_to_pass(
    digests: list[str], namespace: str | None, everything: bool, says: str
) -> None:
    with pytest.raises(rescans.BadRescanRequest, match=says):
        rescans.rescan_request(
            cluster="c",
            request_id="rq-0123456789ab",
            digests=digests,
            namespace=namespace,
            everything=everything,
            requested_by="cli",
            reason="",
            now=T0,
        )


# --- gathering batches ---------------------------------------------------------------------------------------------


def _item(n: int) -> Gathered:
    ref = f"registry.example.com/team/app@sha256:{n:064x}"
    scan = ScanPlan(scan_id=scan_id_for(ref, 1), digest_ref=ref, mode="sbom", node=None, attempt=1)
    return Gathered(f"{n:064x}", scan, T0)


def test_a_burst_leaves_as_full_batches_then_one_partial_after_the_window() -> None:
    gathering = Gathering(size=50, window_s=1.0)
    for n in range(120):
        gathering.add(_item(n), now=100.0)
    sizes = []
    while gathering.ready(100.0):
        sizes.append(len(gathering.take()))
    assert sizes == [50, 50], "full batches leave at once"
    assert not gathering.ready(100.5), "a partial batch waits for the window"
    assert gathering.ready(101.0)
    assert len(gathering.take()) == 20


def test_refused_batch_goes_back_in_front_and_waits_until_unblocked() -> None:
    gathering = Gathering(size=2, window_s=0.0)
    for n in range(3):
        gathering.add(_item(n), now=0.0)
    first = gathering.take()
    gathering.refused(first, now=1.0)
    assert not gathering.ready(5.0)
    gathering.blocked = False  # a slot was released
    assert gathering.ready(5.0)
    assert [i.key for i in gathering.take()] == [first[0].key, first[1].key]


def test_a_refused_batch_is_offered_again_once_the_refusal_wait_passed() -> None:
    gathering = Gathering(size=2, window_s=0.0, refused_wait_s=5.0)
    for n in range(2):
        gathering.add(_item(n), now=0.0)
    gathering.refused(gathering.take(), now=10.0)
    assert not gathering.ready(14.9), "no slot released and the wait not over"
    assert gathering.ready(15.0), "slots that expire free room without a release: look again"


def test_a_resumed_claim_replaces_the_gathered_one_under_the_same_key() -> None:
    gathering = Gathering(size=10, window_s=0.0)
    gathering.add(_item(1), now=0.0)
    fresher = msgspec.structs.replace(_item(1), claimed_until=T0 + timedelta(minutes=5))
    gathering.add(fresher, now=1.0)
    assert gathering.take() == [fresher]


# --- a failed batch Job, item by item -------------------------------------------------------------------------------


def _batch_job(failed: bool) -> Any:
    listing = [batch_item("s-aaaaaaaaaa", JOB_REF), batch_item("s-bbbbbbbbbb", REF_B), batch_item("s-cccccccccc", REF)]
    conditions = [cond("Failed", "BackoffLimitExceeded")] if failed else [cond("Complete")]
    return job(
        labels=BATCH_LABELS,
        annotations={jobs.MODE_ANNOTATION: "sbom", jobs.BATCH_ANNOTATION: msgspec.json.encode(listing).decode()},
        conditions=conditions,
    )


@pytest.mark.parametrize(
    ("init", "reasons"),
    [
        pytest.param(
            [cs("download", terminated(0)), cs("rescan-0", terminated(0)), cs("rescan-1", terminated(1))],
            ["BatchAborted", "ScanError", "BatchAborted"],
            id="second-items-trivy-failed-only-it-is-blamed",
        ),
        pytest.param(
            [cs("download", terminated(1))],
            ["BatchAborted", "BatchAborted", "BatchAborted"],
            id="download-failed-no-item-is-blamed",
        ),
    ],
)
def test_failed_batch_blames_only_the_item_whose_own_container_failed(
    init: list[dict[str, Any]], reasons: list[str]
) -> None:
    the_job = _batch_job(failed=True)
    scans = jobstatus.scan_jobs(the_job)
    assert isinstance(scans, tuple)
    current = jobstatus.outcome(the_job, [scan_pod(phase="Failed", init=init)])
    events = [jobstatus.scan_event(s, current, "c", T0) for s in scans]
    assert [e.reason if isinstance(e, ScanFailed) else None for e in events] == reasons


def test_completed_batch_completes_every_item_with_its_own_scan_id() -> None:
    the_job = _batch_job(failed=False)
    scans = jobstatus.scan_jobs(the_job)
    assert isinstance(scans, tuple)
    current = jobstatus.outcome(the_job, [])
    events = [jobstatus.scan_event(s, current, "c", T0) for s in scans]
    assert [(type(e).__name__, e.scan_id if e else None) for e in events] == [
        ("ScanCompleted", "s-aaaaaaaaaa"),
        ("ScanCompleted", "s-bbbbbbbbbb"),
        ("ScanCompleted", "s-cccccccccc"),
    ]
