"""A fleet of two clusters, A and B, reporting into one NATS: each digest scanned once across the fleet, by its home
cluster on a node of its own; the other cluster notes its nodes and takes the digest over when the home runs it no
more, goes quiet, or lets a claim expire. Workloads, alerts and status keep each cluster's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from podsweep import natsaccess
from podsweep.status import summarize
from podsweep.workloads import adds_run, record_seen
from schemas.events import ImageGone, ImageSeen, ScanFailed, SeverityCounts, Workload
from schemas.index import DigestSummary
from schemas.state import DigestScanState, DigestWorkloads, WorkloadRun, leader_key, limiter_key
from services.dispatcher import plan
from services.dispatcher.limits import Limits
from services.dispatcher.plan import Decision, Policy, scan_id_for
from services.notifier.decide import decide as notify
from services.notifier.decide import fingerprint_key
from services.notifier.outbox import entries
from services.parser.stored import reached_msg_id, report_reached
from tests.unit.test_notifier_decide import CRIT, DIGEST_REF, NOW, event, report
from tests.unit.test_notifier_decide import POLICY as ALERT_POLICY

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HEX = "5" * 64
REF = f"registry.example.com/team/base@sha256:{HEX}"
POLICY = Policy(rescan_interval=timedelta(hours=24), home_stale=timedelta(hours=3))
A = msgspec.structs.replace(POLICY, cluster="a")
B = msgspec.structs.replace(POLICY, cluster="b")
LIMITS = Limits(max_active_per_node=2)
CLAIMED = scan_id_for(REF, 1)


def seen(cluster: str, node: str, at: datetime = T0, ref: str = REF) -> ImageSeen:
    return ImageSeen(
        cluster=cluster,
        digest_ref=ref,
        image="registry.example.com/team/base:1",
        node=node,
        namespace="shop",
        pod="api-1",
        container="api",
        container_kind="app",
        workload=Workload("Deployment", "api"),
        observed_at=at,
    )


def state(**fields: object) -> DigestScanState:
    """Home A, run on a1 there, scanned an hour ago and not due; B runs it on b1 (unless told otherwise)."""
    base: dict[str, object] = {
        "digest_ref": REF,
        "cluster": "a",
        "status": "done",
        "nodes_seen": ["a1"],
        "elsewhere": {"b": ["b1"]},
        "last_seen_at": T0 - timedelta(minutes=5),
        "last_scan_at": T0 - timedelta(hours=1),
        "next_due_at": T0 + timedelta(hours=23),
        "scan_seq": 1,
        "scan_id": CLAIMED,
    }
    return msgspec.convert({**base, **fields}, DigestScanState, from_attributes=True)


DUE = {"next_due_at": T0 - timedelta(seconds=1)}
EXPIRED_CLAIM = {
    "status": "running",
    "node": "a1",
    "attempts": 1,
    "claim_expires_at": T0 - timedelta(seconds=1),
    "next_due_at": None,
}
LIVE_CLAIM = {**EXPIRED_CLAIM, "claim_expires_at": T0 + timedelta(minutes=5)}


def test_the_first_cluster_to_see_a_digest_is_its_home_and_the_other_only_notes_its_node() -> None:
    first = plan.on_seen(None, seen("a", "a1"), T0, A, {}, LIMITS)
    assert first.why == "first_scan" and first.state is not None and first.scan is not None
    assert (first.state.cluster, first.scan.node) == ("a", "a1")
    # B lost the create race: it decides again on A's claim.
    second = plan.on_seen(first.state, seen("b", "b1"), T0, B, {}, LIMITS)
    assert second.scan is None and second.why == "elsewhere"
    assert second.state is not None and second.state.elsewhere == {"b": ["b1"]}
    assert (second.state.cluster, second.state.nodes_seen, second.state.scan_id) == ("a", ["a1"], CLAIMED)


@pytest.mark.parametrize(
    ("fields", "policy", "why", "home", "node"),
    [
        pytest.param({}, A, "not_due", "a", None, id="home-not-due"),
        pytest.param({}, B, "elsewhere", "a", None, id="other-cluster-while-home-runs-it"),
        pytest.param(DUE, A, "rescan_due", "a", "a1", id="home-rescans-on-its-node"),
        pytest.param(DUE, B, "elsewhere", "a", None, id="other-cluster-never-rescans-a-digest-home-runs"),
        pytest.param({**DUE, "nodes_seen": []}, B, "rescan_due", "b", "b1", id="home-runs-it-nowhere-b-takes-over"),
        pytest.param({"nodes_seen": []}, B, "not_due", "b", None, id="take-over-keeps-the-due-time"),
        pytest.param(
            {**DUE, "last_seen_at": T0 - timedelta(hours=3)}, B, "rescan_due", "b", "b1", id="home-quiet-b-takes-over"
        ),
        pytest.param(
            {**DUE, "last_seen_at": T0 - timedelta(hours=2, minutes=59)},
            B,
            "elsewhere",
            "a",
            None,
            id="home-quiet-not-long-enough",
        ),
        pytest.param(
            {**DUE, "nodes_seen": [], "elsewhere": {}}, B, "elsewhere", "a", None, id="b-runs-it-nowhere-either"
        ),
        pytest.param({**LIVE_CLAIM, "nodes_seen": []}, B, "elsewhere", "a", None, id="claim-in-flight-stays-home"),
        pytest.param(
            {**EXPIRED_CLAIM, "last_seen_at": T0 - timedelta(hours=4)},
            B,
            "retry",
            "b",
            "b1",
            id="dead-home-expired-claim-retried-in-b",
        ),
        pytest.param({**DUE, "elsewhere": {"b": ["b1"], "c": ["c1"]}}, B, "elsewhere", "a", None, id="three-clusters"),
    ],
)
def test_only_the_home_claims_and_another_cluster_takes_over_only_when_the_home_is_gone(
    fields: dict[str, object], policy: Policy, why: str, home: str, node: str | None
) -> None:
    d = plan.decide(state(**fields), T0, policy, {}, LIMITS)
    assert d.why == why
    after = d.state or state(**fields)
    assert after.cluster == home
    assert (d.scan.node if d.scan else None) == node
    if d.scan is not None:  # a claim is always for a node of the claiming cluster
        assert d.scan.node in after.nodes_seen and after.cluster == policy.cluster


def test_a_take_over_moves_the_home_and_forgets_the_old_homes_nodes() -> None:
    before = state(**DUE, nodes_seen=[], elsewhere={"b": ["b1", "b2"], "c": ["c1"]}, failures=[])
    d = plan.decide(before, T0, B, {}, LIMITS)
    assert d.state is not None and d.scan is not None
    assert (d.state.cluster, d.state.nodes_seen, d.state.elsewhere) == ("b", ["b1", "b2"], {"c": ["c1"]})
    assert d.state.scan_id == scan_id_for(REF, 2) and d.state.status == "pending"


def test_an_expired_claim_of_a_dead_home_is_a_failed_attempt_retried_under_a_new_scan_id_in_the_new_home() -> None:
    dead = state(**EXPIRED_CLAIM, last_seen_at=T0 - timedelta(hours=4))
    d = plan.decide(dead, T0, B, {}, LIMITS)
    assert d.state is not None and d.scan is not None
    assert d.state.scan_id == scan_id_for(REF, 2) != CLAIMED
    assert (d.state.node, d.state.attempts, d.state.failures) == ("b1", 2, [])
    # The old home's Job reporting late is stale: the new claim stands.
    late = plan.on_failed(d.state, _failed(CLAIMED), T0, B, {}, LIMITS)
    assert late == Decision(None, None, "stale")


def _failed(scan_id: str) -> ScanFailed:
    return ScanFailed(
        cluster="a", scan_id=scan_id, digest_ref=REF, node="a1", job=scan_id, reason="DeadlineExceeded", failed_at=T0
    )


@pytest.mark.parametrize(
    ("known", "sighting", "policy", "writes", "elsewhere", "nodes"),
    [
        pytest.param(state(), seen("b", "b1"), B, False, {"b": ["b1"]}, ["a1"], id="b-node-known"),
        pytest.param(state(), seen("b", "b2"), B, True, {"b": ["b1", "b2"]}, ["a1"], id="b-node-new"),
        pytest.param(state(), seen("c", "c1"), B, True, {"b": ["b1"], "c": ["c1"]}, ["a1"], id="third-cluster"),
        pytest.param(state(), seen("a", "a2"), A, True, {"b": ["b1"]}, ["a1", "a2"], id="home-node-new"),
        # The same node name in two clusters is two nodes.
        pytest.param(state(), seen("b", "a1"), B, True, {"b": ["b1", "a1"]}, ["a1"], id="same-name-other-cluster"),
    ],
)
def test_sightings_record_nodes_under_their_own_cluster(
    known: DigestScanState,
    sighting: ImageSeen,
    policy: Policy,
    writes: bool,
    elsewhere: dict[str, list[str]],
    nodes: list[str],
) -> None:
    d = plan.on_seen(known, sighting, T0, policy, {}, LIMITS)
    assert d.scan is None
    assert (d.state is not None) is writes
    after = d.state or known
    assert (after.elsewhere, after.nodes_seen, after.cluster) == (elsewhere, nodes, "a")


def test_another_clusters_sightings_are_held_like_those_of_a_claimed_digest() -> None:
    d = plan.on_seen(state(), seen("b", "b2"), T0, B, {}, LIMITS)
    assert d.why == "elsewhere" and plan.holdable(state(), d)


def test_the_nodes_noted_per_other_cluster_are_bounded() -> None:
    known: DigestScanState = state()
    for i in range(plan.ELSEWHERE_NODES_KEPT + 5):
        known = plan.on_seen(known, seen("b", f"b{i + 2}"), T0, B, {}, LIMITS).state or known
    assert len(known.elsewhere["b"]) == plan.ELSEWHERE_NODES_KEPT


@pytest.mark.parametrize(
    ("gone", "elsewhere", "nodes"),
    [
        pytest.param(ImageGone(cluster="b", digest_ref=REF, node="b1", observed_at=T0), {}, ["a1"], id="b-stops"),
        pytest.param(
            ImageGone(cluster="a", digest_ref=REF, node="a1", observed_at=T0), {"b": ["b1"]}, [], id="home-stops"
        ),
        pytest.param(
            ImageGone(cluster="b", digest_ref=REF, node="a1", observed_at=T0), {"b": ["b1"]}, ["a1"], id="name-clash"
        ),
    ],
)
def test_image_gone_forgets_the_node_of_its_own_cluster(
    gone: ImageGone, elsewhere: dict[str, list[str]], nodes: list[str]
) -> None:
    d = plan.on_gone(state(), gone, T0, POLICY)
    after = d.state or state()
    assert (after.elsewhere, after.nodes_seen) == (elsewhere, nodes)


def test_a_state_from_before_fleets_is_the_default_clusters_and_is_adopted_by_the_first_to_see_it() -> None:
    legacy = state(cluster=None, elsewhere={}, **DUE)
    assert plan.decide(legacy, T0, POLICY, {}, LIMITS).why == "rescan_due"  # the default cluster's dispatcher
    assert plan.decide(legacy, T0, B, {}, LIMITS).why == "elsewhere"  # never claimed for another's node
    adopted = plan.on_seen(legacy, seen("b", "a1"), T0, B, {}, LIMITS)  # a single-cluster install named "b"
    assert adopted.state is not None and adopted.state.cluster == "b" and adopted.why == "rescan_due"


def test_the_same_workload_name_in_two_clusters_is_two_runs_of_the_digest() -> None:
    doc = record_seen(None, seen("a", "a1"))
    doc = record_seen(doc, seen("b", "b1")) or doc
    assert doc is not None and sorted(r.cluster or "" for r in doc.runs) == ["a", "b"]
    assert record_seen(doc, seen("b", "b2")) is None  # the same run again: nothing to write
    legacy = msgspec.structs.replace(doc, runs=[msgspec.structs.replace(doc.runs[0], cluster=None)])
    rewritten = record_seen(legacy, seen("a", "a1"))
    assert rewritten is not None and [r.cluster for r in rewritten.runs] == ["a"]


def test_one_report_alerts_each_clusters_workload_naming_its_cluster() -> None:
    runs = [
        WorkloadRun(namespace="shop", workload=Workload("Deployment", "api"), image="r/api:1", cluster="a"),
        WorkloadRun(namespace="shop", workload=Workload("Deployment", "api"), image="r/api:1", cluster="b"),
        WorkloadRun(namespace="shop", workload=Workload("Deployment", "web"), image="r/api:1"),  # before fleets
    ]
    stored = event()  # scanned in cluster "prod"
    decision = notify(stored, report(CRIT), runs, ALERT_POLICY, {}, NOW)
    assert sorted((a.payload.cluster, a.payload.workload.name) for a in decision.alerts) == [
        ("a", "api"),
        ("b", "api"),
        ("prod", "web"),
    ]
    assert len({a.key for a in decision.alerts}) == 3
    assert set(decision.fingerprints) == {
        fingerprint_key(c, DIGEST_REF, "shop", Workload("Deployment", n))
        for c, n in (("a", "api"), ("b", "api"), ("prod", "web"))
    }
    queued = entries(decision, stored, runs, ALERT_POLICY, NOW.date())
    assert sorted(e.cluster for e in queued) == ["a", "b", "prod"]


def test_status_shows_the_fleet_and_one_cluster() -> None:
    other = "6" * 64
    states = [
        state(status="running", node="n1"),
        state(digest_ref=f"r/x@sha256:{other}", cluster="b", status="running", node="n1", elsewhere={}),
    ]
    fleet = summarize(states, [])
    assert fleet.by_cluster == {"a": 1, "b": 2}
    assert fleet.running_per_node == {"a/n1": 1, "b/n1": 1}
    only_b = summarize(states, [], cluster="b")
    assert (only_b.digests, only_b.cluster) == (2, "b")
    assert only_b.running_per_node == {"b/n1": 1}
    only_a = summarize(states, [], cluster="a")
    assert only_a.digests == 1 and only_a.running_per_node == {"a/n1": 1}


@pytest.mark.parametrize(
    ("cluster", "durable", "limiter", "lease"),
    [
        pytest.param("default", "dispatcher", "active", "leader", id="default-keeps-single-cluster-names"),
        pytest.param("eu-1", "dispatcher_eu-1", "active.eu-1", "leader.eu-1", id="named-cluster"),
    ],
)
def test_what_is_per_cluster_is_named_per_cluster(cluster: str, durable: str, limiter: str, lease: str) -> None:
    events = natsaccess.Durable("dispatcher", ("image.seen",), per_cluster=True)
    assert natsaccess.durable_name(events, cluster) == durable
    assert (limiter_key(cluster), leader_key(cluster)) == (limiter, lease)
    access = natsaccess.NatsAccess(service="dispatcher", durables=(events,))
    assert access.durable(durable) is events
    allowed = natsaccess.permissions(access, natsaccess.Names(clusters=("default", cluster))).publish
    assert f"$JS.API.CONSUMER.MSG.NEXT.PODSWEEP.{durable}" in allowed
    assert "$JS.API.CONSUMER.MSG.NEXT.PODSWEEP.*" not in allowed


@pytest.mark.parametrize(
    ("runs", "sighting", "adds"),
    [
        pytest.param([], seen("a", "a1"), True, id="first-workload"),
        pytest.param([("a", "api")], seen("a", "a2"), False, id="same-workload-another-node"),
        pytest.param([("a", "api")], seen("b", "b1"), True, id="same-workload-name-in-another-cluster"),
        pytest.param([(None, "api")], seen("b", "b1"), False, id="run-from-before-fleets-is-the-seers"),
        pytest.param([("a", "web")], seen("a", "a1"), True, id="another-workload"),
    ],
)
def test_a_workload_new_to_a_digest_is_one_of_its_cluster(
    runs: list[tuple[str | None, str]], sighting: ImageSeen, adds: bool
) -> None:
    doc = DigestWorkloads(
        digest_ref=REF,
        runs=[
            WorkloadRun(namespace="shop", workload=Workload("Deployment", name), image="r/x:1", cluster=cluster)
            for cluster, name in runs
        ],
    )
    assert adds_run(doc, sighting) is adds


def test_a_report_reaching_another_clusters_workload_is_the_summarys_report_naming_both_clusters() -> None:
    summary = DigestSummary(
        digest_ref=REF,
        scan_id=CLAIMED,
        finished_at=T0,
        stored_at=T0,
        report_key=f"reports/sha256/{HEX}/latest.json",
        history_key=f"reports/sha256/{HEX}/history/20261123t080000000000z.json",
        counts=SeverityCounts(CRITICAL=1),
        cluster="a",
    )
    reached = report_reached(summary, seen("b", "b1"), T0 + timedelta(hours=1))
    assert (reached.cluster, reached.reached_cluster, reached.scan_id) == ("a", "b", CLAIMED)
    assert (reached.report_key, reached.history_key, reached.counts) == (
        summary.report_key,
        summary.history_key,
        summary.counts,
    )
    again = report_reached(summary, seen("b", "b2"), T0 + timedelta(hours=2))
    assert reached_msg_id(again) == reached_msg_id(reached)  # the same workload: one event
    other = report_reached(summary, seen("c", "c1"), T0)
    assert reached_msg_id(other) != reached_msg_id(reached)
    # The notifier decides it like the report it is: the workload it reached is alerted, naming its cluster.
    runs = [WorkloadRun(namespace="shop", workload=Workload("Deployment", "api"), image="r/x:1", cluster="b")]
    decision = notify(reached, report(CRIT), runs, ALERT_POLICY, {}, NOW)
    assert [a.payload.cluster for a in decision.alerts] == ["b"]


def test_a_db_update_makes_a_digest_due_in_its_home_cluster_only() -> None:
    with_sbom = state(sbom_key=f"sbom/sha256/{HEX}/history/20261123t070000z.cdx.json", sbom_trivy_version="0.76.0")
    assert plan.rescannable_from_sbom(with_sbom, T0, A)
    assert not plan.rescannable_from_sbom(with_sbom, T0, B)  # B runs it too, but A's timers claim it
    assert not plan.rescannable_from_sbom(state(), T0, A)  # no SBOM: a DB update never causes a node scan
