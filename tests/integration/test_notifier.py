"""The notifier shell against a real nats-server, a real SeaweedFS and real aiohttp receivers on loopback.

Receivers verify the HMAC signature of every generic webhook and record each request; a request whose client
had gone (timed out, killed) by the time the receiver answered is recorded as aborted, never as accepted, so
"accepted twice" means the notifier really delivered an alert twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats.js.errors
import pytest

from podsweep import bus as busmod
from podsweep.config import ConsumerSettings, NatsSettings, NotifierSettings, S3Settings, Settings
from podsweep.objectstore import ObjectStore
from schemas import storage, subjects
from schemas.alerts import AlertFinding, AlertPayload, GroupPayload, NotifyFingerprint, Threshold
from schemas.events import SEVERITIES, AlertSent, DeadLetter, ReportStored, SeverityCounts, Workload
from schemas.report import Finding, Report
from schemas.state import NOTIFY_BUCKET, WORKLOADS_BUCKET, DigestWorkloads, WorkloadRun
from services.notifier import grouping, messages
from services.notifier.decide import fingerprint_key
from services.notifier.main import main
from tests.harness.receiver import Arrival, Receiver, dojo_contract
from tests.harness.replicas import in_process
from tests.harness.streams import stored_messages

REPO = Path(__file__).resolve().parents[2]
HOOK_KEY = "k" * 32
DOJO_TOKEN = "dojo-token-0123456789"
FAST = ConsumerSettings(max_deliver=5, backoff_s=[0.05, 0.1], ack_wait_s=5, batch=16, concurrency=4)
WORKLOAD = Workload(kind="Deployment", name="api")
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def digest(n: int = 0) -> str:
    return f"registry.example.com/team/app@sha256:{n:064x}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(hmac_key=HOOK_KEY, dojo_token=DOJO_TOKEN)
    await r.start()
    yield r
    await r.stop()


# ---------------------------------------------------------------------------------------------------------------
# Reports, workloads, the policy and the service


def finding(cve: str, severity: str = "CRITICAL", fixed: str = "1.2.4", package: str = "openssl") -> Finding:
    return Finding(
        id=cve,
        package=package,
        installed_version="1.2.3",
        severity=severity,  # type: ignore[arg-type]
        fixed_version=fixed,
        fixable=bool(fixed),
        cvss=9.8,
        title=f"{cve} in {package}",
        url=f"https://avd.aquasec.com/nvd/{cve.lower()}",
        target="app (alpine 3.19)",
    )


def make_report(digest_ref: str, scan_id: str, findings: list[Finding], at: datetime = T0) -> Report:
    tally = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        tally[f.severity] += 1
    return Report(
        digest_ref=digest_ref,
        scan_id=scan_id,
        source_format="v2",
        artifact="app",
        scanned_at=at,
        findings=findings,
        counts=SeverityCounts(**tally),
    )


@dataclass
class World:
    settings: Settings
    bus: busmod.Bus
    store: ObjectStore
    policy_path: Path

    async def runs(self, digest_ref: str, *runs: WorkloadRun) -> None:
        kv = await self.bus.kv(WORKLOADS_BUCKET)
        doc = DigestWorkloads(digest_ref=digest_ref, runs=list(runs))
        await kv.put(digest_ref.rsplit(":", 1)[1], msgspec.json.encode(doc))

    async def report(self, report: Report, stored_at: datetime | None = None, publish: bool = True) -> ReportStored:
        """Store a report the way the parser does (raw, history, latest) and publish report.stored."""
        assert report.digest_ref is not None and report.scan_id is not None
        stored_at = stored_at or datetime.now(UTC)
        history = storage.history_report_key(report.digest_ref, stored_at)
        latest = storage.latest_report_key(report.digest_ref)
        raw = json.dumps({"SchemaVersion": 2, "ArtifactName": "app", "Results": []}).encode()
        await self.store.put(storage.raw_key(report.digest_ref, report.scan_id), raw)
        await self.store.put(history, msgspec.json.encode(report))
        await self.store.put(latest, msgspec.json.encode(report))
        event = ReportStored(
            cluster="c1",
            scan_id=report.scan_id,
            digest_ref=report.digest_ref,
            report_key=latest,
            history_key=history,
            counts=report.counts,
            fixable=report.fixable,
            stored_at=stored_at,
        )
        if publish:
            await self.bus.publish(subjects.REPORT_STORED, event, msg_id=f"report:{report.scan_id}")
        return event

    async def handled(self, event: ReportStored) -> None:
        """Wait until the notifier has acked this report.stored (its consumer's ack floor reaches the event), and every
        outbox entry enqueued so far has been settled by its destination's consumer (none pending, none in flight)."""
        stream = self.bus.settings.stream
        last = await self.bus.js.get_last_msg(stream, self.bus.subject(subjects.REPORT_STORED))
        assert last.headers is not None and last.headers.get("Nats-Msg-Id") == f"report:{event.scan_id}", (
            "another report.stored was published after this one"
        )

        async def acked() -> bool:
            info = await self.bus.js.consumer_info(stream, "notifier")
            return info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= (last.seq or 0)

        await until(acked, what=f"the notifier's ack of report.stored {event.scan_id}")
        await self.outbox_settled()

    async def outbox_settled(self) -> int:
        """Wait until every destination's outbox consumer has nothing pending and nothing in flight; return how many
        entries the outbox has stored in all."""

        async def settled() -> bool:
            consumers = await self.bus.js.consumers_info(self.bus.outbox.name)
            return all((c.num_pending, c.num_ack_pending) == (0, 0) for c in consumers)

        await until(settled, what="every outbox entry settled")
        return int((await self.bus.js.stream_info(self.bus.outbox.name)).state.last_seq)

    async def deliveries(self, durable: str = "notifier") -> int:
        """How many messages the consumer has handed out, redeliveries included (its delivered consumer sequence);
        `durable` names the notifier's report.stored consumer or a destination's outbox consumer."""
        stream = self.bus.settings.stream if durable == "notifier" else self.bus.outbox.name
        try:
            info = await self.bus.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.delivered.consumer_seq or 0) if info.delivered is not None else 0

    async def deliveries_ready(self) -> int:
        """1 once the notifier's report.stored consumer exists (it is created after the policy's first load)."""
        try:
            await self.bus.js.consumer_info(self.bus.settings.stream, "notifier")
        except nats.js.errors.NotFoundError:
            return 0
        return 1

    async def audit(self, name: str) -> list[AlertSent]:
        return [msgspec.json.decode(d, type=AlertSent) for d in await read_subject(self.bus, name)]

    async def dead(self) -> list[DeadLetter]:
        return [msgspec.json.decode(d, type=DeadLetter) for d in await read_subject(self.bus, "dead.notifier")]


def run(image: str = "registry.example.com/team/app:1.4", namespace: str = "payments") -> WorkloadRun:
    return WorkloadRun(namespace=namespace, workload=WORKLOAD, image=image, last_seen_at=T0)


async def read_subject(bus: busmod.Bus, name: str) -> list[bytes]:
    return [msg.data for msg in await stored_messages(bus.js, bus.settings.stream, bus.subject(name))]


def policy_yaml(destinations: str, extra: str = "", destination_names: str = "") -> str:
    names = destination_names or ", ".join(
        line.split("name:")[1].split(",")[0].strip() for line in destinations.splitlines() if "name:" in line
    )
    return f"version: 1\ndefaults:\n  threshold: {{max_critical: 0}}\n  destinations: [{names}]\ndestinations:\n{destinations}\n{extra}"


def webhook(name: str, url: str, timeout_s: float = 2.0) -> str:
    return f'  - {{name: {name}, kind: webhook, url: "{url}", hmac_key: {{env: PODSWEEP_TEST_HOOK_KEY}}, timeout_s: {timeout_s}}}\n'


def notifier_settings(policy: Path, **changes: object) -> NotifierSettings:
    base: dict[str, object] = {
        "policy_file": str(policy),
        "policy_poll_s": 0.2,
        "workloads_wait_deliveries": 2,
        "workloads_wait_s": 0.2,
        "outbox_ack_wait_s": 8.0,
        "retry_base_s": 0.1,
        "retry_cap_s": 0.3,
        "retry_max_attempts": 6,
    }
    base.update(changes)
    return msgspec.convert(base, NotifierSettings)


@pytest.fixture
async def world(
    nats_settings: NatsSettings, s3_settings: S3Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    monkeypatch.setenv("PODSWEEP_TEST_HOOK_KEY", HOOK_KEY)
    monkeypatch.setenv("PODSWEEP_TEST_DOJO_TOKEN", DOJO_TOKEN)
    policy = tmp_path / "policy.yaml"
    settings = Settings(
        cluster="c1", nats=nats_settings, s3=s3_settings, consumer=FAST, notifier=notifier_settings(policy)
    )
    bus = await busmod.connect(nats_settings, "test")
    await busmod.ensure_stream(bus)
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    yield World(settings=settings, bus=bus, store=store, policy_path=policy)
    await bus.close()


async def eventually(check: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def has(count: Awaitable[int], at_least: int) -> bool:
    return await count >= at_least


_captured: list[str] = []


async def logged(capsys: pytest.CaptureFixture[str], text: str) -> bool:
    """Whether the services in this process have logged `text` (their structured lines go to the captured stderr)."""
    out, err = capsys.readouterr()
    _captured.append(out + err)
    return any(text in chunk for chunk in _captured)


async def until(check: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


def payload(arrival: Arrival) -> AlertPayload:
    return msgspec.json.decode(arrival.body, type=AlertPayload)


def alert_ids(arrivals: list[Arrival]) -> list[str]:
    """The alert ids that generic webhook messages carry: a lone alert's own, or each member's of a group."""
    out: list[str] = []
    for a in arrivals:
        if json.loads(a.body).get("type") == "podsweep.breach.group":
            out += [m.id for m in msgspec.json.decode(a.body, type=GroupPayload).members]
        else:
            out.append(payload(a).id)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Delivery


async def test_breach_reaches_webhook_slack_and_teams_once_each_signed(world: World, receiver: Receiver) -> None:
    world.policy_path.write_text(
        policy_yaml(
            webhook("hook", f"{receiver.url}/hook")
            + "  - {name: chat, kind: slack, url: {env: PODSWEEP_TEST_SLACK_URL}}\n"
            + "  - {name: teams, kind: teams, url: {env: PODSWEEP_TEST_TEAMS_URL}}\n"
        )
    )
    os.environ["PODSWEEP_TEST_SLACK_URL"] = f"{receiver.url}/slack"
    os.environ["PODSWEEP_TEST_TEAMS_URL"] = f"{receiver.url}/teams"
    try:
        await world.runs(digest(1), run())
        async with in_process(main, settings=world.settings):
            event = await world.report(make_report(digest(1), "scan-0001", [finding("CVE-2026-0001")]))
            await eventually(lambda: len(receiver.accepted()) == 3, what="three deliveries")
            await world.handled(event)
    finally:
        del os.environ["PODSWEEP_TEST_SLACK_URL"], os.environ["PODSWEEP_TEST_TEAMS_URL"]
    by_path = {a.path: a for a in receiver.accepted()}
    assert sorted(by_path) == ["/hook", "/slack", "/teams"]
    assert by_path["/hook"].verified
    body = payload(by_path["/hook"])
    assert body.workload == WORKLOAD and body.new_count == 1 and body.findings[0].id == "CVE-2026-0001"
    assert {a.key for a in receiver.arrivals} == {body.id}
    assert "CVE-2026-0001" in by_path["/slack"].body.decode()
    assert (
        json.loads(by_path["/teams"].body)["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"
    )
    sent = await world.audit(subjects.ALERT_SENT)
    assert sorted(s.destination for s in sent) == ["chat", "hook", "teams"]
    assert all(s.outcome == "delivered" and s.attempts == 1 and s.findings == ["CVE-2026-0001"] for s in sent)


@pytest.mark.parametrize(
    ("plan", "attempts"),
    [
        pytest.param([500, 500], 3, id="500-twice-then-recovers"),
        pytest.param([503, 502, 504], 4, id="every-retryable-5xx"),
        pytest.param([("hang", 3.0)], 2, id="hangs-past-the-timeout"),
    ],
)
async def test_failing_receiver_gets_the_alert_once_it_recovers(
    world: World, receiver: Receiver, plan: list[object], attempts: int
) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook", timeout_s=0.5)))
    receiver.plan["/hook"] = list(plan)
    await world.runs(digest(2), run())
    async with in_process(main, settings=world.settings):
        event = await world.report(make_report(digest(2), "scan-0002", [finding("CVE-2026-0002")]))
        await eventually(lambda: len(receiver.accepted()) == 1, what="the delivery after recovery")
        await world.handled(event)
    assert len(receiver.arrivals) == attempts
    assert len({a.key for a in receiver.arrivals}) == 1
    sent = await world.audit(subjects.ALERT_SENT)
    assert [(s.outcome, s.attempts) for s in sent] == [("delivered", attempts)]


async def test_429_retry_after_is_waited_out_instead_of_the_short_backoff(world: World, receiver: Receiver) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    receiver.plan["/hook"] = [("retry-after", 429, 2)]
    await world.runs(digest(3), run())
    async with in_process(main, settings=world.settings):
        await world.report(make_report(digest(3), "scan-0003", [finding("CVE-2026-0003")]))
        await eventually(lambda: len(receiver.accepted()) == 1, what="the delivery after Retry-After")
    first, second = receiver.arrivals
    assert second.at - first.at >= 1.9  # the backoff alone would have retried within 0.3 s


async def test_receiver_down_for_a_while_gets_the_alert_when_it_comes_up(world: World) -> None:
    receiver = Receiver(hmac_key=HOOK_KEY, dojo_token=DOJO_TOKEN)
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    settings = msgspec.structs.replace(
        world.settings, notifier=notifier_settings(world.policy_path, retry_max_attempts=30)
    )
    await world.runs(digest(4), run())
    async with in_process(main, settings=settings):
        await world.report(make_report(digest(4), "scan-0004", [finding("CVE-2026-0004")]))
        await until(lambda: has(world.deliveries("hook"), 3), what="three refused attempts")
        await receiver.start()
        try:
            await eventually(lambda: len(receiver.accepted()) == 1, what="the delivery once the receiver is up")
        finally:
            await receiver.stop()
    sent = await world.audit(subjects.ALERT_SENT)
    assert len(sent) == 1 and sent[0].attempts > 2


@pytest.mark.parametrize(
    ("plan", "attempts", "reason"),
    [
        pytest.param([404], 1, "HTTP 404 is permanent", id="permanent-404-gives-up-at-once"),
        pytest.param([500] * 6, 6, "after 6 attempts", id="last-attempt-gives-up"),
        pytest.param([("retry-after", 429, 7200)], 1, "more than max_retry_after_s", id="retry-after-too-long"),
    ],
)
async def test_undeliverable_alert_is_recorded_failed_and_dead_lettered(
    world: World, receiver: Receiver, plan: list[object], attempts: int, reason: str
) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    receiver.plan["/hook"] = list(plan)
    await world.runs(digest(5), run())
    async with in_process(main, settings=world.settings):
        await world.report(make_report(digest(5), "scan-0005", [finding("CVE-2026-0005")]))
        await eventually(lambda: len(receiver.arrivals) == attempts, what="every attempt")
        failed: list[AlertSent] = []
        for _ in range(50):
            failed = await world.audit(subjects.ALERT_FAILED)
            if failed:
                break
        assert len(failed) == 1
    assert failed[0].outcome == "failed" and failed[0].attempts == attempts and reason in failed[0].error
    assert HOOK_KEY not in failed[0].error and receiver.url not in failed[0].error
    letters = await world.dead()
    assert len(letters) == 1 and letters[0].subject.endswith("outbox.hook")
    assert await world.audit(subjects.ALERT_SENT) == []


async def test_a_hanging_receiver_delays_no_other_destination(world: World, receiver: Receiver) -> None:
    world.policy_path.write_text(
        policy_yaml(webhook("slow", f"{receiver.url}/slow", timeout_s=20) + webhook("fast", f"{receiver.url}/fast"))
    )
    settings = msgspec.structs.replace(
        world.settings, notifier=notifier_settings(world.policy_path, outbox_ack_wait_s=30, outbox_concurrency=1)
    )
    receiver.plan["/slow"] = [("hold",)]  # answers only once the test releases it
    for n in range(3):
        await world.runs(digest(10 + n), run())
    async with in_process(main, settings=settings):
        for n in range(3):
            await world.report(make_report(digest(10 + n), f"scan-001{n}", [finding("CVE-2026-0010")]))
        await eventually(lambda: len(alert_ids(receiver.accepted("/fast"))) == 3, what="the fast destination")
        # Every fast delivery was answered while the slow destination's first request was still held.
        assert [a.status for a in receiver.arrivals if a.path == "/slow"] == [0]
        receiver.release.set()
        await eventually(lambda: len(alert_ids(receiver.accepted("/slow"))) == 3, what="the slow destination")
    # One message in flight at a time (outbox_concurrency 1), each alert alone: a generic webhook groups only when
    # its destination says group_alerts.
    assert sorted(alert_ids(receiver.accepted("/slow"))) == sorted(alert_ids(receiver.accepted("/fast")))
    assert len(receiver.accepted("/slow")) == 3


# ---------------------------------------------------------------------------------------------------------------
# When to alert


async def test_second_report_with_no_new_findings_sends_nothing(world: World, receiver: Receiver) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    await world.runs(digest(6), run())
    async with in_process(main, settings=world.settings):
        await world.report(make_report(digest(6), "scan-0061", [finding("CVE-2026-0006")]))
        await eventually(lambda: len(receiver.accepted()) == 1, what="the first alert")
        await world.report(make_report(digest(6), "scan-0062", [finding("CVE-2026-0006")]))
        newest = await world.report(make_report(digest(6), "scan-0063", [finding("CVE-2026-0007")]))  # new
        await eventually(lambda: len(receiver.accepted()) == 2, what="the alert about the new finding")
        await world.handled(newest)
        assert await world.outbox_settled() == 2, "the report without anything new was enqueued"
    assert len(receiver.arrivals) == 2
    second = payload(receiver.arrivals[1])
    assert (second.scan_id, second.new_count, second.findings[0].id) == ("scan-0063", 1, "CVE-2026-0007")


async def test_expired_suppression_alerts_again_and_says_so(world: World, receiver: Receiver) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=6)  # room to judge the first report before it lapses
    suppression = (
        "suppressions:\n"
        "  - id: CVE-2026-0008\n"
        "    owner: alice@example.com\n"
        "    reason: not reachable\n"
        f"    expires: {expires.isoformat()}\n"
    )
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook"), suppression))
    await world.runs(digest(7), run())
    async with in_process(main, settings=world.settings):
        suppressed = await world.report(make_report(digest(7), "scan-0071", [finding("CVE-2026-0008")]))
        await world.handled(suppressed)
        assert await world.outbox_settled() == 0 and receiver.arrivals == []  # suppressed: no breach
        await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
        await world.report(make_report(digest(7), "scan-0072", [finding("CVE-2026-0008")]))
        await eventually(lambda: len(receiver.accepted()) == 1, what="the alert after the suppression expired")
    body = payload(receiver.arrivals[0])
    assert body.expired_suppressions == 1
    note = body.findings[0].expired_suppression
    assert note is not None and note.owner == "alice@example.com" and note.reason == "not reachable"


async def test_report_waits_for_its_workloads_then_alerts(world: World, receiver: Receiver) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    settings = msgspec.structs.replace(
        world.settings, notifier=notifier_settings(world.policy_path, workloads_wait_deliveries=4, workloads_wait_s=0.5)
    )
    async with in_process(main, settings=settings):
        await world.report(make_report(digest(8), "scan-0008", [finding("CVE-2026-0009")]))
        await until(
            lambda: has(world.deliveries(), 2), what="the report handed out again while its workloads are unknown"
        )
        await world.runs(digest(8), run())  # image.seen reached the parser after the report
        await eventually(lambda: len(receiver.accepted()) == 1, what="the alert once the workload is known")
    assert payload(receiver.arrivals[0]).workload == WORKLOAD


async def test_an_older_report_arriving_late_neither_alerts_nor_rolls_back(world: World, receiver: Receiver) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    await world.runs(digest(9), run())
    now = datetime.now(UTC)
    newer = await world.report(make_report(digest(9), "scan-0092", [finding("CVE-2026-0011")]), stored_at=now)
    async with in_process(main, settings=world.settings):
        await eventually(lambda: len(receiver.accepted()) == 1, what="the alert of the newer report")
        older = await world.report(
            make_report(digest(9), "scan-0091", [finding("CVE-2026-0012")]), stored_at=now - timedelta(minutes=5)
        )
        await world.handled(older)
        assert await world.outbox_settled() == 1, "the older report was enqueued"
    assert len(receiver.arrivals) == 1
    kv = await world.bus.kv(NOTIFY_BUCKET)
    fp, _ = await busmod.kv_read(kv, fingerprint_key("c1", digest(9), "payments", WORKLOAD), NotifyFingerprint)
    assert fp is not None and fp.scan_id == newer.scan_id


async def test_invalid_policy_reload_keeps_the_previous_policy(
    world: World, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook")))
    await world.runs(digest(11), run())
    async with in_process(main, settings=world.settings):
        await until(lambda: has(world.deliveries_ready(), 1), what="the notifier consuming")
        world.policy_path.write_text("version: 1\nrules:\n  - threshold: {max_high: five}\n")
        await until(lambda: logged(capsys, "policy reload refused"), what="the refused reload logged")
        await world.report(make_report(digest(11), "scan-0111", [finding("CVE-2026-0013")]))
        await eventually(lambda: len(receiver.accepted()) == 1, what="the alert under the previous policy")


# ---------------------------------------------------------------------------------------------------------------
# DefectDojo


@pytest.mark.parametrize("reimport", [pytest.param(True, id="reimport-scan"), pytest.param(False, id="import-scan")])
async def test_defectdojo_sink_follows_the_import_scan_contract(
    world: World, receiver: Receiver, reimport: bool
) -> None:
    """DefectDojo itself cannot run here (a Django app with PostgreSQL, Redis and Celery workers): the receiver
    checks each request against DefectDojo's documented API v2 import-scan/reimport-scan contract instead
    (`dojo_contract`), and answers 201 as DefectDojo does, or 400 with the problems."""
    endpoint = "/api/v2/reimport-scan/" if reimport else "/api/v2/import-scan/"
    receiver.plan[endpoint] = ["dojo"]
    world.policy_path.write_text(
        policy_yaml(
            f'  - {{name: dojo, kind: defectdojo, url: "{receiver.url}", token: {{env: PODSWEEP_TEST_DOJO_TOKEN}},'
            f" product: Payments, engagement: Runtime images, reimport: {str(reimport).lower()}, tags: [prod]}}\n"
        )
    )
    await world.runs(digest(12), run("registry.example.com/team/app:1.4@sha256:" + f"{12:064x}"))
    async with in_process(main, settings=world.settings):
        event = await world.report(make_report(digest(12), "scan-0012", []))  # no breach: uploaded all the same
        await eventually(lambda: len(receiver.arrivals) == 1, what="the upload")
        await world.handled(event)
    assert len(receiver.arrivals) == 1
    arrival = receiver.arrivals[0]
    assert (arrival.path, arrival.status) == (endpoint, 201), dojo_contract(arrival.path, arrival, DOJO_TOKEN)
    assert arrival.form["test_title"] == ["registry.example.com/team/app:1.4"]
    assert arrival.form["tags"] == ["podsweep", "prod"]
    assert arrival.form["version"] == [f"sha256:{12:064x}"]
    raw = await world.store.get(storage.raw_key(event.digest_ref, event.scan_id))
    assert arrival.file == raw
    sent = await world.audit(subjects.ALERT_SENT)
    assert [(s.destination, s.outcome, s.findings) for s in sent] == [("dojo", "delivered", [])]


async def test_defectdojo_with_a_wrong_token_fails_at_once(world: World, receiver: Receiver) -> None:
    receiver.plan["/api/v2/reimport-scan/"] = ["dojo"]
    world.policy_path.write_text(
        policy_yaml(
            f'  - {{name: dojo, kind: defectdojo, url: "{receiver.url}", token: {{env: PODSWEEP_TEST_HOOK_KEY}},'
            " product: Payments, engagement: Runtime images}\n"
        )
    )
    await world.runs(digest(13), run())
    async with in_process(main, settings=world.settings):
        refused = await world.report(make_report(digest(13), "scan-0013", [finding("CVE-2026-0014")]))
        await eventually(lambda: len(receiver.arrivals) == 1, what="the refused upload")
        await world.handled(refused)
    assert len(receiver.arrivals) == 1, "a 401 was retried"
    failed = await world.audit(subjects.ALERT_FAILED)
    assert len(failed) == 1 and "HTTP 401 is permanent" in failed[0].error and HOOK_KEY not in failed[0].error


# ---------------------------------------------------------------------------------------------------------------
# kill -9


def _env(world: World) -> dict[str, str]:
    s = world.settings
    env = {
        **os.environ,
        "PODSWEEP_CLUSTER": "c1",
        "PODSWEEP_LOG_FORMAT": "json",
        "PODSWEEP_NATS_URL": s.nats.url,
        "PODSWEEP_NATS_USER": s.nats.user,
        "PODSWEEP_NATS_PASSWORD": s.nats.password,
        "PODSWEEP_NATS_SUBJECT_ROOT": s.nats.subject_root,
        "PODSWEEP_NATS_STREAM": s.nats.stream,
        "PODSWEEP_NATS_KV_PREFIX": s.nats.kv_prefix,
        "PODSWEEP_NATS_DUPLICATE_WINDOW_S": "60",
        "PODSWEEP_S3_ENDPOINT_URL": s.s3.endpoint_url,
        "PODSWEEP_S3_BUCKET": s.s3.bucket,
        "PODSWEEP_S3_ACCESS_KEY_ID": s.s3.access_key_id,
        "PODSWEEP_S3_SECRET_ACCESS_KEY": s.s3.secret_access_key,
        "PODSWEEP_CONSUMER_ACK_WAIT_S": "3",
        "PODSWEEP_CONSUMER_BACKOFF_S": "0.05,0.1",
        "PODSWEEP_NOTIFIER_POLICY_FILE": str(world.policy_path),
        "PODSWEEP_NOTIFIER_OUTBOX_ACK_WAIT_S": "6",
        "PODSWEEP_NOTIFIER_OUTBOX_CONCURRENCY": "2",
        "PODSWEEP_NOTIFIER_RETRY_BASE_S": "0.1",
        "PODSWEEP_NOTIFIER_RETRY_CAP_S": "0.3",
        "PODSWEEP_NOTIFIER_WORKLOADS_WAIT_S": "0.2",
    }
    return env


async def start_notifier(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """`python -m podsweep run notifier`, configured by environment only, as a Deployment runs it."""
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "podsweep", "run", "notifier", cwd=REPO, env=env, stdout=out, stderr=out
        )


async def test_notifier_killed_mid_delivery_loses_nothing_and_sends_each_alert_under_one_key(
    world: World, receiver: Receiver, tmp_path: Path
) -> None:
    world.policy_path.write_text(policy_yaml(webhook("hook", f"{receiver.url}/hook", timeout_s=10)))
    receiver.delay_s = 0.3  # each delivery stays in flight at the receiver for a while
    count = 20
    for n in range(count):
        await world.runs(digest(100 + n), run())
    for n in range(count):
        await world.report(make_report(digest(100 + n), f"scan-{100 + n:04d}", [finding("CVE-2026-0100")]))
    env = _env(world)
    first = await start_notifier(env, tmp_path / "notifier-1.log")
    try:
        await eventually(lambda: len(receiver.accepted()) >= 1, within=120, what="a first delivery")
        killed = asyncio.Event()

        killed_at = 0.0

        def kill_on_arrival(arrival: Arrival) -> None:  # the process dies while this request is in flight
            nonlocal killed_at
            if not killed.is_set():
                first.send_signal(signal.SIGKILL)
                killed_at = arrival.at
                killed.set()

        receiver.on_arrival = kill_on_arrival
        await asyncio.wait_for(killed.wait(), 60)
    finally:
        receiver.on_arrival = None
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        await first.wait()
    # The receiver records the interrupted request once it has answered it (delay_s after it arrived).
    await eventually(lambda: any(a.aborted for a in receiver.arrivals), what="the kill interrupting a delivery")
    receiver.delay_s = 0.0
    second = await start_notifier(env, tmp_path / "notifier-2.log")
    try:
        await eventually(lambda: len(alert_ids(receiver.accepted())) >= count, within=60, what="every alert")
        assert await world.outbox_settled() == count, "an alert was enqueued twice"
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(second.wait(), 20)
        except TimeoutError:
            second.kill()
            await second.wait()
    # At least once, one key per alert: a message the receiver answered just before the kill, whose answer the first
    # notifier never recorded, is sent again under the same key with the same body (receivers drop it by its key;
    # docs/webhooks.md). Nothing else may come twice, and no alert under two keys.
    by_key: dict[str, list[Arrival]] = {}
    for a in receiver.accepted():
        by_key.setdefault(a.key, []).append(a)
    for key, copies in by_key.items():
        if len(copies) > 1:
            assert len(copies) == 2 and copies[0].body == copies[1].body, f"key {key} sent differently"
            assert copies[0].at <= killed_at + 1.0 < copies[1].at, f"key {key} accepted twice, not around the kill"
    ids = alert_ids([copies[0] for copies in by_key.values()])
    assert len(set(ids)) == count and len(ids) == count, "an alert was accepted twice"
    assert all(a.verified for a in receiver.arrivals)
    assert second.returncode == 0
    logs = (tmp_path / "notifier-1.log").read_text() + (tmp_path / "notifier-2.log").read_text()
    assert "alert delivered" in logs and HOOK_KEY not in logs


# ---------------------------------------------------------------------------------------------------------------
# Alert storms: many workloads breach at once, more than a destination's rate allows one by one

STORM_CVE = "CVE-2026-2000"
STORM_PAGE = f"index/cve/{STORM_CVE}.html"
SLACK_RATE = (1.0, "1")  # the Slack-like receiver: one message per second, else 429 with Retry-After: 1
# The storm's reports reach the notifier with pauses of seconds on a busy shared machine; a partial message waits
# out more than those pauses, so what the test counts is the grouping, not the machine's hiccups.
STORM_LINGER = {"group_quiet_s": 8.0, "group_max_wait_s": 60.0}
HOOK_MAX_BYTES = 131_072
_name_re = re.compile(r"app-\d{5}")


def storm_policy(receiver: Receiver, rules: str = "") -> str:
    return policy_yaml(
        "  - {name: chat, kind: slack, url: {env: PODSWEEP_TEST_SLACK_URL}, rate_per_s: 1, burst: 1}\n"
        f'  - {{name: hook, kind: webhook, url: "{receiver.url}/hook", hmac_key: {{env: PODSWEEP_TEST_HOOK_KEY}},'
        f" rate_per_s: 2, burst: 1, group_alerts: true, max_body_bytes: {HOOK_MAX_BYTES}}}\n",
        rules,
    )


async def storm(world: World, first: int, digests: int, workloads: int) -> dict[str, str]:
    """`workloads` workloads (namespaces team-0 and team-1, alternately) over `digests` digests, each report
    breaching with STORM_CVE: reports in S3 and runs in KV as the parser leaves them, then every report.stored
    published at once. Returns workload name → namespace."""
    kv = await world.bus.kv(WORKLOADS_BUCKET)
    by_digest: dict[int, list[WorkloadRun]] = {}
    names: dict[str, str] = {}
    for w in range(workloads):
        name, namespace = f"app-{first + w:05d}", f"team-{w % 2}"
        names[name] = namespace
        run_ = WorkloadRun(
            namespace=namespace, workload=Workload(kind="Deployment", name=name), image="r.example.com/app:1.4"
        )
        by_digest.setdefault(w % digests, []).append(run_)
    limit = asyncio.Semaphore(16)
    stored_at = datetime.now(UTC)

    async def one(d: int) -> busmod.Outgoing:
        async with limit:
            ref = digest(first + d)
            report = make_report(ref, f"storm-{first + d:05d}", [finding(STORM_CVE)])
            history = storage.history_report_key(ref, stored_at)
            await world.store.put(history, msgspec.json.encode(report))
            await kv.put(ref.rsplit(":", 1)[1], msgspec.json.encode(DigestWorkloads(digest_ref=ref, runs=by_digest[d])))
            event = ReportStored(
                cluster="c1",
                scan_id=f"storm-{first + d:05d}",
                digest_ref=ref,
                report_key=storage.latest_report_key(ref),
                history_key=history,
                counts=report.counts,
                fixable=report.fixable,
                stored_at=stored_at,
            )
            return busmod.Outgoing(subjects.REPORT_STORED, event, f"report:{event.scan_id}")

    events = await asyncio.gather(*(one(d) for d in range(digests)))
    await world.bus.publish_many(events)
    return names


def named(arrivals: list[Arrival]) -> list[str]:
    """Every workload name the messages carry, once per mention (a workload named twice shows up twice)."""
    out: list[str] = []
    for a in arrivals:
        body = json.loads(a.body)
        if "blocks" in body:  # Slack: a workload is named in one section (a group's lines, a lone alert's summary)
            out += [m for b in body["blocks"] if b["type"] == "section" for m in _name_re.findall(b["text"]["text"])]
        elif body.get("type") == "podsweep.breach.group":
            group = msgspec.json.decode(a.body, type=GroupPayload)
            assert group.id == a.key and group.cves[0].page_key == STORM_PAGE
            out += [m.workload.name for m in group.members]
        else:
            alone = msgspec.json.decode(a.body, type=AlertPayload)
            assert alone.id == a.key
            out.append(alone.workload.name)
    return out


def fewest_slack_messages(workloads: int) -> tuple[int, int]:
    """The fewest Slack messages that can name `workloads` workloads (bounds from below and above): Slack's limits
    (50 blocks, 3,000 characters per section, 40,000 characters in all) over one line per workload, after the fixed
    parts of a message (header, CVE list, fallback text, context: measured on a message of one workload)."""
    member = grouping.member(alert_payload("team-0", "app-00000"))
    one = messages.slack_group_message("0" * 32, "c1", [member], T0)
    line = one.blocks[3].text.text  # type: ignore[union-attr]
    fixed = messages.slack_chars(one) - len(line)
    by_chars_hi = (messages.SLACK_MAX_CHARS - fixed) // len(line)  # newlines not counted: at most this many
    by_chars_lo = (messages.SLACK_MAX_CHARS - fixed - 8) // (len(line) + 1)  # with them, and a longer headline
    by_blocks = (messages.SLACK_MAX_BLOCKS - 4) * ((2900 + 1) // (len(line) + 1))
    return -(-workloads // min(by_chars_hi, by_blocks)), -(-workloads // min(by_chars_lo, by_blocks))


def fewest_webhook_messages(workloads: int) -> tuple[int, int]:
    """The same for the generic webhook: max_body_bytes over the members' JSON, after the fixed part of a body."""
    member = grouping.member(alert_payload("team-0", "app-00000"))
    size = len(msgspec.json.encode(member))
    fixed = len(messages.group_webhook_body("0" * 32, "c1", [member], T0)) - size
    hi = (HOOK_MAX_BYTES - fixed) // size
    lo = (HOOK_MAX_BYTES - fixed - 16 - 8) // (size + 1)
    return -(-workloads // hi), -(-workloads // lo)


def alert_payload(namespace: str, name: str) -> AlertPayload:
    ref = digest(10_000)
    return AlertPayload(
        id="0" * 32,
        cluster="c1",
        digest_ref=ref,
        image="r.example.com/app:1.4",
        namespace=namespace,
        workload=Workload(kind="Deployment", name=name),
        rule="defaults",
        threshold=Threshold(max_critical=0),
        reasons=["1 CRITICAL (more than 0)"],
        counts=SeverityCounts(CRITICAL=1),
        new_count=1,
        findings=[AlertFinding(id=STORM_CVE, package="openssl", installed_version="1.2.3", severity="CRITICAL")],
        scan_id="storm-10000",
        report_key=storage.latest_report_key(ref),
        created_at=T0,
    )


def shape(receiver: Receiver, path: str) -> list[tuple[int, int, float]]:
    """(status, workloads named, seconds since the first) of each request on `path`: what a failed count shows."""
    arrivals = [a for a in receiver.arrivals if a.path == path]
    return [(a.status, len(named([a])), round(a.at - arrivals[0].at, 2)) for a in arrivals]


def check_storm(receiver: Receiver, names: dict[str, str], path: str, resent: bool = False) -> list[Arrival]:
    """Every workload exactly once over the accepted messages on `path`; one idempotency key per message. With
    `resent`, a message accepted again under the same key (a kill after the receiver's answer and before the
    delivered marker: at-least-once) counts once, and must name exactly the same workloads."""
    accepted = receiver.accepted(path)
    if resent:
        by_key: dict[str, list[Arrival]] = {}
        for a in accepted:
            by_key.setdefault(a.key, []).append(a)
        for key, copies in by_key.items():
            assert len({tuple(sorted(named([c]))) for c in copies}) == 1, f"{path}: key {key} named other workloads"
        accepted = [copies[0] for copies in by_key.values()]
    mentioned = named(accepted)
    assert sorted(mentioned) == sorted(names), f"{path}: workloads missing or named twice"
    assert len({a.key for a in accepted}) == len(accepted), f"{path}: an idempotency key was accepted twice"
    return accepted


async def test_a_storm_leaves_grouped_in_the_fewest_messages_each_workload_once(
    world: World, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 workloads over 300 digests breach at once. The Slack-like receiver answers 429 + Retry-After beyond one
    message per second. The first message of a quiet period leaves at once with what has arrived, so the count is
    the fewest the limits allow, or one more (that first message may be partly filled)."""
    monkeypatch.setenv("PODSWEEP_TEST_SLACK_URL", f"{receiver.url}/slack")
    receiver.rate_limit["/slack"] = SLACK_RATE
    world.policy_path.write_text(storm_policy(receiver))
    settings = msgspec.structs.replace(world.settings, notifier=notifier_settings(world.policy_path, **STORM_LINGER))
    async with in_process(main, settings=settings):
        await until(lambda: has(world.deliveries_ready(), 1), what="the notifier consuming")
        names = await storm(world, 20_000, 300, 2000)
        await eventually(lambda: len(named(receiver.accepted("/slack"))) >= 2000, within=120, what="the Slack storm")
        await eventually(lambda: len(named(receiver.accepted("/hook"))) >= 2000, within=60, what="the webhook storm")
        await world.outbox_settled()
    slack = check_storm(receiver, names, "/slack")
    hook = check_storm(receiver, names, "/hook")
    assert all(a.verified for a in hook), "a grouped webhook body was not signed"
    assert all(STORM_PAGE in a.body.decode() for a in slack if len(named([a])) > 1), "a group without the CVE page"
    lo, hi = fewest_slack_messages(2000)
    assert lo <= len(slack) <= hi + 1, (lo, hi, shape(receiver, "/slack"))
    lo, hi = fewest_webhook_messages(2000)
    assert lo <= len(hook) <= hi + 1, (lo, hi, shape(receiver, "/hook"), shape(receiver, "/slack"))
    sent = await world.audit(subjects.ALERT_SENT)
    assert sorted((s.destination, s.workload.name) for s in sent) == sorted(
        (d, n) for d in ("chat", "hook") for n in names
    )


async def test_each_destination_hears_only_of_its_own_workloads_in_a_storm(
    world: World, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODSWEEP_TEST_SLACK_URL", f"{receiver.url}/slack")
    rules = (
        "rules:\n"
        "  - {name: a, match: {namespaces: [team-0]}, destinations: [chat]}\n"
        "  - {name: b, match: {namespaces: [team-1]}, destinations: [hook]}\n"
    )
    world.policy_path.write_text(storm_policy(receiver, rules))
    async with in_process(main, settings=world.settings):
        await until(lambda: has(world.deliveries_ready(), 1), what="the notifier consuming")
        names = await storm(world, 30_000, 10, 40)
        await eventually(lambda: len(named(receiver.accepted())) >= 40, what="every workload at its destination")
        await world.outbox_settled()
    assert sorted(named(receiver.accepted("/slack"))) == sorted(n for n, ns in names.items() if ns == "team-0")
    assert sorted(named(receiver.accepted("/hook"))) == sorted(n for n, ns in names.items() if ns == "team-1")


async def test_notifier_killed_mid_storm_still_names_each_workload_once(
    world: World, receiver: Receiver, tmp_path: Path
) -> None:
    """kill -9 while a grouped message is in flight. Its group was recorded before the POST, so the next process
    resends exactly those members under the same key; the others are grouped afresh. Each process's first message
    leaves at once, so the count may exceed the fewest by two, never more."""
    receiver.rate_limit["/slack"] = SLACK_RATE
    receiver.delay_s = 0.3  # each delivery stays in flight at the receiver for a while
    world.policy_path.write_text(storm_policy(receiver))
    env = {
        **_env(world),
        "PODSWEEP_TEST_SLACK_URL": f"{receiver.url}/slack",
        "PODSWEEP_TEST_HOOK_KEY": HOOK_KEY,
        **{f"PODSWEEP_NOTIFIER_{k.upper()}": str(v) for k, v in STORM_LINGER.items()},
    }
    names = await storm(world, 40_000, 300, 2000)
    first = await start_notifier(env, tmp_path / "notifier-1.log")
    try:
        killed = asyncio.Event()

        def kill_on_second_group(arrival: Arrival) -> None:
            grouped = len(_name_re.findall(arrival.body.decode())) > 1
            if grouped and arrival.path == "/slack" and len(receiver.accepted("/slack")) >= 1 and not killed.is_set():
                first.send_signal(signal.SIGKILL)
                killed.set()

        receiver.on_arrival = kill_on_second_group
        await asyncio.wait_for(killed.wait(), 120)
    finally:
        receiver.on_arrival = None
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        await first.wait()
    await eventually(lambda: any(a.aborted for a in receiver.arrivals), what="the kill interrupting a delivery")
    receiver.delay_s = 0.0
    second = await start_notifier(env, tmp_path / "notifier-2.log")
    try:
        await eventually(lambda: len(named(receiver.accepted("/slack"))) >= 2000, within=120, what="the Slack storm")
        await eventually(lambda: len(named(receiver.accepted("/hook"))) >= 2000, within=60, what="the webhook storm")
        await world.outbox_settled()
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(second.wait(), 20)
        except TimeoutError:
            second.kill()
            await second.wait()
    slack = check_storm(receiver, names, "/slack", resent=True)
    hook = check_storm(receiver, names, "/hook", resent=True)
    interrupted = [a for a in receiver.arrivals if a.aborted and a.path == "/slack"]
    assert interrupted and interrupted[0].key in {a.key for a in slack}, "the interrupted group was not resent as is"
    assert all(a.verified for a in hook)
    assert len(slack) <= fewest_slack_messages(2000)[1] + 2
    assert len(hook) <= fewest_webhook_messages(2000)[1] + 2
    assert second.returncode == 0
