"""The notifier shell's pure parts: outbox entries, the stale-report guard, requests per destination kind, and
the targets of `podsweep check`."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import msgspec
import pytest

from podsweep.policy import Policy, load_policy
from schemas.alerts import NotifyFingerprint
from schemas.events import ImageOptions, ReportStored, SeverityCounts, Workload
from schemas.index import IndexedDigest, NamespaceIndex, NamespaceWorkload, SummaryIndex, WorkloadImage
from schemas.report import Finding, Report
from schemas.state import DigestWorkloads, WorkloadRun
from services.notifier import signing, targets
from services.notifier.decide import decide, fingerprint_key
from services.notifier.destinations import EntryMismatch, http_request
from services.notifier.outbox import advance, drop_stale, entries, msg_id, routed_workload

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
DIGEST = "registry.example.com/team/app@sha256:" + "ab" * 32
API = Workload(kind="Deployment", name="api")
WORKER = Workload(kind="Deployment", name="worker")
POLICY = load_policy(
    """
version: 1
defaults: {threshold: {max_critical: 0}, destinations: [hook]}
destinations:
  - {name: hook, kind: webhook, url: "https://hooks.example.com/x", hmac_key: {env: HOOK_KEY}, timeout_s: 30}
  - {name: chat, kind: slack, url: {env: SLACK_URL}}
  - {name: teams, kind: teams, url: {env: TEAMS_URL}}
  - {name: dojo, kind: defectdojo, url: "https://dojo.example.com", token: {env: DOJO}, product: P, engagement: E}
rules:
  - name: payments
    match: {namespaces: [payments]}
    destinations: [hook, chat, dojo]
  - name: routed
    match: {routes: [team-a]}
    destinations: [teams]
"""
)


def run(namespace: str = "payments", workload: Workload = API, notify: str | None = None) -> WorkloadRun:
    return WorkloadRun(
        namespace=namespace,
        workload=workload,
        image="registry.example.com/team/app:1.4",
        options=ImageOptions(notify=notify),
        last_seen_at=T0,
    )


def critical(cve: str = "CVE-2026-0001") -> Finding:
    return Finding(id=cve, package="openssl", installed_version="1.0", severity="CRITICAL", fixed_version="1.1")


def event(scan_id: str = "scan-0001", stored_at: datetime = T0) -> ReportStored:
    return ReportStored(
        cluster="c1",
        scan_id=scan_id,
        digest_ref=DIGEST,
        report_key="reports/sha256/x/latest.json",
        history_key="reports/sha256/x/history/1.json",
        counts=SeverityCounts(CRITICAL=1),
        fixable=SeverityCounts(CRITICAL=1),
        stored_at=stored_at,
    )


def report(*findings: Finding) -> Report:
    return Report(digest_ref=DIGEST, scan_id="scan-0001", source_format="v2", findings=list(findings))


# ---------------------------------------------------------------------------------------------------------------
# Outbox entries


def test_every_alert_goes_to_every_destination_of_its_rule_and_uploads_name_a_routed_workload() -> None:
    runs = [run(), run("shop", WORKER, notify="team-a")]
    decision = decide(event(), report(critical()), runs, POLICY, {}, T0)
    queued = entries(decision, event(), runs, POLICY, date(2026, 11, 23))
    assert sorted((e.destination, e.workload.name, e.alert is not None) for e in queued) == [
        ("chat", "api", True),
        ("dojo", "api", False),
        ("hook", "api", True),
        ("teams", "worker", True),
    ]
    assert len({msg_id(e) for e in queued}) == len(queued)
    assert all(msg_id(e).startswith("outbox:") for e in queued)  # never collides with the audit ids


def test_the_same_report_decided_twice_enqueues_the_same_message_ids() -> None:
    runs = [run()]
    first = entries(decide(event(), report(critical()), runs, POLICY, {}, T0), event(), runs, POLICY, T0.date())
    later = T0 + timedelta(seconds=30)
    again = entries(decide(event(), report(critical()), runs, POLICY, {}, later), event(), runs, POLICY, T0.date())
    assert [msg_id(e) for e in first] == [msg_id(e) for e in again]


@pytest.mark.parametrize(
    ("runs", "destination", "owner"),
    [
        pytest.param([run()], "dojo", ("", "payments", API), id="rule-by-namespace"),
        pytest.param([run("shop", WORKER, notify="team-a")], "teams", ("", "shop", WORKER), id="rule-by-route"),
        pytest.param([run("shop", WORKER)], "dojo", None, id="no-workload-routed-there"),
        pytest.param([run("b", WORKER), run("a", API)], "hook", ("", "a", API), id="first-by-namespace"),
    ],
)
def test_routed_workload(runs: list[WorkloadRun], destination: str, owner: tuple[str, str, Workload] | None) -> None:
    assert routed_workload(POLICY, runs, destination) == owner


# ---------------------------------------------------------------------------------------------------------------
# Stale reports and the fingerprint compare-and-set


def fp(stored_at: datetime | None, scan_id: str = "scan-0001", findings: tuple[str, ...] = ()) -> NotifyFingerprint:
    return NotifyFingerprint(breach=bool(findings), findings=list(findings), scan_id=scan_id, stored_at=stored_at)


@pytest.mark.parametrize(
    ("current", "new", "written"),
    [
        pytest.param(None, fp(T0), True, id="first-fingerprint"),
        pytest.param(fp(T0), fp(T0 + timedelta(minutes=1), "scan-0002"), True, id="newer-report"),
        pytest.param(fp(T0 + timedelta(minutes=1)), fp(T0, "scan-0002"), False, id="older-report-never-rolls-back"),
        pytest.param(fp(None), fp(T0, "scan-0002"), True, id="stored-before-timestamps-existed"),
        pytest.param(fp(T0), fp(T0), False, id="identical-is-no-write"),
    ],
)
def test_advance(current: NotifyFingerprint | None, new: NotifyFingerprint, written: bool) -> None:
    assert (advance(current, new) is not None) == written


def test_an_older_report_is_dropped_for_workloads_a_newer_one_already_decided() -> None:
    runs = [run(), run("payments", WORKER)]
    newer = {fingerprint_key("c1", DIGEST, "payments", API): fp(T0 + timedelta(hours=1), "scan-0009")}
    late = event("scan-0001", stored_at=T0)
    decision = drop_stale(decide(late, report(critical()), runs, POLICY, newer, T0), newer, late)
    assert [a.payload.workload for a in decision.alerts] == [WORKER]
    assert list(decision.fingerprints) == [fingerprint_key("c1", DIGEST, "payments", WORKER)]
    assert decision.uploads == []  # DefectDojo would reopen what the newer report closed


def test_a_newer_report_passes_the_guard_unchanged() -> None:
    runs = [run()]
    older = {fingerprint_key("c1", DIGEST, "payments", API): fp(T0 - timedelta(hours=1), "scan-0000")}
    decision = decide(event(), report(critical()), runs, POLICY, older, T0)
    assert drop_stale(decision, older, event()) == decision


# ---------------------------------------------------------------------------------------------------------------
# Requests per destination kind


def queued_for(destination: str) -> list:  # type: ignore[type-arg]
    runs = [run(), run("shop", WORKER, notify="team-a")]
    decision = decide(event(), report(critical()), runs, POLICY, {}, T0)
    return [e for e in entries(decision, event(), runs, POLICY, date(2026, 11, 23)) if e.destination == destination]


def test_webhook_request_is_signed_over_the_exact_body() -> None:
    (entry,) = queued_for("hook")
    key = b"k" * 32
    request = http_request(entry, POLICY.destination("hook"), url="https://h/x", hmac_keys=[key], now_s=1_800_000_000,
                           timeout_cap_s=10)  # fmt: skip
    assert signing.verify([key], request.body, request.headers[signing.SIGNATURE_HEADER], 1_800_000_000)
    assert request.headers[signing.IDEMPOTENCY_HEADER] == entry.key
    assert request.timeout_s == 10  # capped below the outbox ack wait, though the policy says 30


@pytest.mark.parametrize(
    ("destination", "marker"),
    [pytest.param("chat", "blocks", id="slack"), pytest.param("teams", "attachments", id="teams")],
)
def test_chat_requests_carry_the_rendered_message(destination: str, marker: str) -> None:
    (entry,) = queued_for(destination)
    request = http_request(entry, POLICY.destination(destination), url="https://h/x", now_s=0, timeout_cap_s=60)
    assert marker in json.loads(request.body)
    assert signing.SIGNATURE_HEADER not in request.headers


def test_defectdojo_request_is_multipart_with_the_raw_report_and_token() -> None:
    (entry,) = queued_for("dojo")
    request = http_request(
        entry, POLICY.destination("dojo"), url="", token="t0k", raw_report=b"{}", now_s=0, timeout_cap_s=60
    )
    assert request.url == "https://dojo.example.com/api/v2/reimport-scan/"
    assert request.headers["Authorization"] == "Token t0k"
    assert request.fields["scan_type"] == ["Trivy Scan"] and request.fields["scan_date"] == ["2026-11-23"]
    assert request.file == b"{}" and request.file_field == "file"


@pytest.mark.parametrize(
    ("entry_of", "sent_to"),
    [pytest.param("dojo", "hook", id="upload-to-a-webhook"), pytest.param("hook", "dojo", id="alert-to-defectdojo")],
)
def test_an_entry_the_destination_kind_cannot_take_is_refused(entry_of: str, sent_to: str) -> None:
    (entry,) = queued_for(entry_of)
    with pytest.raises(EntryMismatch, match="takes"):
        http_request(entry, POLICY.destination(sent_to), url="https://h/x", hmac_keys=[b"k" * 32], now_s=0,
                     timeout_cap_s=60)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# check targets

DIGEST_B = "registry.example.com/team/db@sha256:" + "cd" * 32
DOCS = [
    DigestWorkloads(digest_ref=DIGEST, runs=[run(), run("shop", WORKER, notify="team-a")]),
    DigestWorkloads(
        digest_ref=DIGEST_B,
        runs=[WorkloadRun(namespace="shop", workload=Workload(kind="StatefulSet", name="db"), image="team/db:16")],
    ),
]


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        pytest.param("sha256:" + "ab" * 32, ("ab" * 32, "sha256:" + "ab" * 32), id="bare"),
        pytest.param(DIGEST, ("ab" * 32, DIGEST), id="digest-ref"),
        pytest.param("sha256:" + "AB" * 32, None, id="upper-case-hex"),
        pytest.param("app:1.4", None, id="a-tag-is-not-a-digest"),
        pytest.param("../x@sha256:" + "ab" * 32, None, id="hostile-repository"),
    ],
)
def test_parse_digest(value: str, parsed: tuple[str, str] | None) -> None:
    assert targets.parse_digest(value) == parsed


@pytest.mark.parametrize(
    ("image", "where"),
    [
        pytest.param("registry.example.com/team/app:1.4", ["payments/Deployment/api", "shop/Deployment/worker"],
                     id="as-written"),
        pytest.param("registry.example.com/team/app", ["payments/Deployment/api", "shop/Deployment/worker"],
                     id="repository-any-tag"),
        pytest.param("team/db", ["shop/StatefulSet/db"], id="short-name"),
        pytest.param("registry.example.com/team/app:2.0", [], id="other-tag"),
    ],
)  # fmt: skip
def test_for_image(image: str, where: list[str]) -> None:
    assert [t.where for t in targets.for_image(DOCS, image)] == where


def test_for_namespace_keeps_the_route_so_routed_rules_apply() -> None:
    (target,) = targets.for_namespace(DOCS, "shop")[:1]
    assert target.route == "team-a"
    assert targets.rule_of(POLICY, target).name == "routed"


def test_for_digest_without_known_workloads_checks_the_bare_digest() -> None:
    assert targets.for_digest("ef" * 32, "sha256:" + "ef" * 32, None) == [
        targets.Target(digest_hex="ef" * 32, image="sha256:" + "ef" * 32)
    ]


def test_ignore_unfixed_applies_when_every_pod_of_the_workload_asks() -> None:
    opted = msgspec.structs.replace(run(), options=ImageOptions(ignore_unfixed=True))
    (target,) = targets.for_digest("ab" * 32, DIGEST, DigestWorkloads(digest_ref=DIGEST, runs=[opted]))
    assert targets.rule_of(Policy(), target).ignore_unfixed


def test_index_targets_prefer_the_kv_and_fall_back_to_the_index() -> None:
    index = NamespaceIndex(
        namespace="shop",
        generated_at=T0,
        workloads=[
            NamespaceWorkload(workload=WORKER, images=[WorkloadImage(image="x:1", digest_ref=DIGEST)]),
            NamespaceWorkload(
                workload=Workload(kind="Job", name="once"),
                images=[WorkloadImage(image="y:1", digest_ref="registry.example.com/y@sha256:" + "0" * 64)],
            ),
        ],
    )
    hexes = targets.digests_for_namespace(index)
    found = targets.from_index(hexes, {"ab" * 32: DOCS[0]}, namespace_index=index)
    assert [(t.where, t.route) for t in found] == [("shop/Job/once", None), ("shop/Deployment/worker", "team-a")]
    summary = SummaryIndex(generated_at=T0, digests={"ab" * 32: IndexedDigest(digest_ref=DIGEST, images=["x:1"])})
    assert targets.digests_for_image(summary, "x") == ["ab" * 32]
