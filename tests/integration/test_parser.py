"""The parser shell against a real nats-server and a real SeaweedFS: stored reports, history, diff, quarantine,
SBOMs, the workloads KV and the index/ pages (opened in headless Chromium when it is installed)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import ConsumerSettings, NatsSettings, ParserSettings, S3Settings, Settings
from podsweep.objectstore import ObjectStore
from podsweep.reports import normalize
from schemas import storage, subjects
from schemas.events import ImageSeen, ReportQuarantined, ReportStored, ScanCompleted, Workload
from schemas.index import DigestSummary, NamespaceIndex, SummaryIndex
from schemas.report import Report
from schemas.state import SCANS_BUCKET, SUMMARIES_BUCKET, WORKLOADS_BUCKET, DigestScanState, DigestWorkloads
from services.parser.main import main
from tests.harness.replicas import in_process

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trivy"
PREVIOUS = (FIXTURES / "v2-alpine-image-trivy-0.64-previous.json").read_bytes()
LARGE = (FIXTURES / "v2-alpine-image-trivy-0.64-large.json").read_bytes()
SMALL = (FIXTURES / "trivy-0.76-alpine.json").read_bytes()
# A report whose text tries to inject markup into the pages (titles and targets come from scanned images).
HOSTILE = SMALL.replace(b'"Title": "', b'"Title": "<script>alert(1)</script><img src=x onerror=alert(2)> ', 1)
FAST = ConsumerSettings(max_deliver=5, backoff_s=[0.05, 0.1], ack_wait_s=10, batch=16, concurrency=4)
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
T = TypeVar("T")


def digest_ref(n: int, repo: str = "registry.example.com/team/app") -> str:
    return f"{repo}@sha256:{hashlib.sha256(str(n).encode()).hexdigest()}"


def scan_id(n: int) -> str:
    return f"psw-{n:024x}"


def completed(ref: str, sid: str, at: datetime = T0, *, sbom: bool = False) -> ScanCompleted:
    return ScanCompleted(
        cluster="test",
        scan_id=sid,
        digest_ref=ref,
        node="node-1",
        job=sid,
        raw_key=storage.raw_key(ref, sid),
        sbom_key=storage.sbom_key(ref, sid) if sbom else None,
        finished_at=at,
    )


def seen(ref: str, namespace: str, workload: str, image: str) -> ImageSeen:
    return ImageSeen(
        cluster="test",
        digest_ref=ref,
        image=image,
        node="node-1",
        namespace=namespace,
        pod=f"{workload}-abc",
        container="app",
        container_kind="app",
        workload=Workload(kind="Deployment", name=workload),
        observed_at=T0,
    )


def make_settings(nats: NatsSettings, s3: S3Settings, **parser: Any) -> Settings:
    options = {"index_flush_s": 0.2, "missing_retries": 2, "missing_retry_s": 0.05, **parser}
    return Settings(nats=nats, s3=s3, consumer=FAST, parser=ParserSettings(**options))


class Harness:
    """The parser running as a task, a bus to publish with, the store, and every event it published."""

    def __init__(self, settings: Settings, bus: busmod.Bus, store: ObjectStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.stored: list[ReportStored] = []
        self.quarantined: list[ReportQuarantined] = []
        self.raw_stored: list[bytes] = []

    async def upload(self, ref: str, sid: str, body: bytes, *, sbom: bytes | None = None) -> None:
        await self.store.put(storage.raw_key(ref, sid), body, "application/gzip")
        if sbom is not None:
            await self.store.put(storage.sbom_key(ref, sid), sbom, "application/gzip")

    async def publish(self, event: msgspec.Struct, subject: str, msg_id: str) -> None:
        await self.bus.publish(subject, event, msg_id=msg_id)

    async def complete(self, event: ScanCompleted, msg_id: str | None = None) -> None:
        await self.publish(event, subjects.SCAN_COMPLETED, msg_id or f"completed:{event.scan_id}")

    async def get_json(self, key: str, typ: type[T]) -> T:
        return msgspec.json.decode(await self.store.get(key), type=typ)


async def eventually(check: Callable[[], Awaitable[T | None]], within: float = 15.0) -> T:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Harness]:
    bus = await busmod.connect(settings.nats, "test")
    await busmod.ensure_stream(bus)
    store = ObjectStore(settings.s3)
    await store.ensure_bucket()
    harness = Harness(settings, bus, store)
    stored_decoder = msgspec.json.Decoder(ReportStored)
    quarantined_decoder = msgspec.json.Decoder(ReportQuarantined)

    async def on_stored(msg: Any) -> None:
        harness.raw_stored.append(msg.data)
        harness.stored.append(stored_decoder.decode(msg.data))

    async def on_quarantined(msg: Any) -> None:
        harness.quarantined.append(quarantined_decoder.decode(msg.data))

    await bus.nc.subscribe(bus.subject(subjects.REPORT_STORED), cb=on_stored)
    await bus.nc.subscribe(bus.subject(subjects.REPORT_QUARANTINED), cb=on_quarantined)
    try:
        async with in_process(main, settings=settings):
            yield harness
    finally:
        await bus.close()


async def stream_count(bus: busmod.Bus, name: str) -> int:
    info = await bus.js.stream_info(bus.settings.stream, subjects_filter=bus.subject(name))
    return sum((info.state.subjects or {}).values())


# ---------------------------------------------------------------------------------------------------------------


async def test_second_scan_stores_history_and_publishes_the_real_diff(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    ref = digest_ref(1)
    first, second = completed(ref, scan_id(1), T0), completed(ref, scan_id(2), T0 + timedelta(hours=24))
    async with running(make_settings(nats_settings, s3_settings)) as h:
        await h.publish(seen(ref, "shop", "api", "registry.example.com/team/app:1.0"), subjects.IMAGE_SEEN, "s1")
        await h.upload(ref, first.scan_id, PREVIOUS)
        await h.complete(first)
        await eventually(lambda: _async(len(h.stored) == 1))
        await h.upload(ref, second.scan_id, gzip.compress(LARGE))  # what scan pods upload
        await h.complete(second)
        await eventually(lambda: _async(len(h.stored) == 2))

        previous, current = normalize.parse(PREVIOUS), normalize.parse(LARGE)
        new, fixed = normalize.diff(previous, current)
        one, two = h.stored
        assert one.first_report and len(one.new) == len(previous.findings) - _duplicates(previous)
        assert not two.first_report
        assert (two.new, two.fixed) == (new, fixed)
        # The real pair: 2 findings new, none fixed. Its OS target was renamed between the scans
        # ("go-app-vulnerable:latest (alpine 3.19.1)" -> "myapp:latest (alpine 3.19.1)"); OS findings are keyed by
        # class, not by the artifact's name, so the rename is not 300 findings fixed and 300 new.
        assert len(two.new) == 2 and not two.fixed, (len(two.new), len(two.fixed))
        assert two.counts == current.counts and two.fixable == current.fixable

        latest = await h.get_json(two.report_key, Report)
        assert latest.scan_id == second.scan_id and latest.counts == current.counts
        history = sorted(await h.store.list_keys(f"reports/sha256/{ref.split(':')[1]}/history/"))
        assert history == sorted([one.history_key, two.history_key])
        assert (await h.get_json(one.history_key, Report)).scan_id == first.scan_id

        async def indexed() -> SummaryIndex | None:
            data = await h.store.get_if_exists(storage.SUMMARY_KEY)
            index = msgspec.json.decode(data, type=SummaryIndex) if data else None
            entry = index.digests.get(ref.split(":")[1]) if index else None
            return index if entry and entry.report and entry.report.scan_id == second.scan_id else None

        index = await eventually(indexed)
        entry = index.digests[ref.split(":")[1]]
        assert entry.namespaces == ["shop"] and entry.images == ["registry.example.com/team/app:1.0"]
        assert entry.report is not None and entry.report.counts == current.counts
        page = (await h.store.get(storage.digest_page_key(ref))).decode()
        assert "CVE-" in page and "<script" not in page
        assert (await h.store.get(storage.INDEX_HTML_KEY)).decode().count(f"digests/{ref.split(':')[1]}.html") == 1


def _duplicates(report: Report) -> int:
    return len(report.findings) - len({f.key for f in report.findings})


async def _async(value: T) -> T:
    return value


BAD_UPLOADS = [
    pytest.param(LARGE[: len(LARGE) // 2], "truncated", True, id="truncated-json"),
    pytest.param(gzip.compress(LARGE)[:5000], "truncated", True, id="truncated-gzip"),
    pytest.param(b"<html>502 Bad Gateway</html>", "not-json", True, id="not-json"),
    pytest.param(b'{"SchemaVersion": 2, "Results": "nope"}', "wrong-type", True, id="wrong-type"),
    pytest.param(b'{"bomFormat": "CycloneDX"}', "not-trivy", True, id="not-trivy"),
    pytest.param(LARGE, "oversized", True, id="oversized"),
    pytest.param(b'{"SchemaVersion": 2, "X": ' + b"[" * 5000 + b"]" * 5000 + b"}", "oversized", True, id="too-deep"),
    pytest.param(gzip.compress(b'{"SchemaVersion": 2}') + gzip.compress(SMALL), "not-json", True, id="two-members"),
    pytest.param(None, "missing", False, id="missing-upload"),
]


@pytest.mark.parametrize(("body", "kind", "kept"), BAD_UPLOADS)
async def test_bad_upload_is_quarantined_with_its_reason_and_the_consumer_keeps_going(
    nats_settings: NatsSettings, s3_settings: S3Settings, body: bytes | None, kind: str, kept: bool
) -> None:
    bad_ref, good_ref = digest_ref(10), digest_ref(11)
    bad, good = completed(bad_ref, scan_id(10)), completed(good_ref, scan_id(11))
    # 1 MB: the large fixture (1.4 MB) is over it; the small good one is not.
    async with running(make_settings(nats_settings, s3_settings, max_report_mb=1.0)) as h:
        if body is not None:
            await h.upload(bad_ref, bad.scan_id, body)
        await h.complete(bad)
        await h.upload(good_ref, good.scan_id, SMALL)
        await h.complete(good)
        await eventually(lambda: _async(len(h.quarantined) == 1 and len(h.stored) == 1))

        (q,) = h.quarantined
        assert (q.object, q.kind, q.scan_id, q.source_key) == ("report", kind, bad.scan_id, bad.raw_key)
        error = (await h.store.get(q.error_key)).decode()
        assert f"kind: {kind}" in error and bad.raw_key in error
        if kept:
            assert q.quarantine_key == storage.quarantine_key(bad.scan_id)
            assert await h.store.get(q.quarantine_key) == body, "the upload is kept byte for byte"
        else:
            assert q.quarantine_key is None
        assert await h.store.get_if_exists(storage.latest_report_key(bad_ref)) is None
        assert h.stored[0].digest_ref == good_ref
        # No dead letter: a bad upload is an outcome, not a failure of the consumer.
        assert await stream_count(h.bus, f"{subjects.DEAD}.parser") == 0


async def test_redelivered_completion_publishes_the_same_report_stored_once_per_window(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    ref = digest_ref(20)
    event = completed(ref, scan_id(20))
    short_window = msgspec.structs.replace(nats_settings, duplicate_window_s=1.0)
    async with running(make_settings(short_window, s3_settings)) as h:
        await h.upload(ref, event.scan_id, SMALL)
        await h.complete(event, "delivery-1")
        await eventually(lambda: _async(len(h.stored) == 1))
        await h.complete(event, "delivery-2")  # the watcher saw the Job again: a second message, same scan
        await eventually(lambda: _consumer_idle(h))  # handled and acked: what it publishes was stored before
        assert await stream_count(h.bus, subjects.REPORT_STORED) == 1, "inside the window: stored once"

        await asyncio.sleep(1.2)  # past the duplicate window: the re-published event is the same bytes
        await h.complete(event, "delivery-3")
        await eventually(lambda: _async(len(h.raw_stored) == 2))
        assert h.raw_stored[0] == h.raw_stored[1]
        history = await h.store.list_keys(f"reports/sha256/{ref.split(':')[1]}/history/")
        assert len(history) == 1


async def _consumer_idle(h: Harness) -> bool:
    info = await h.bus.js.consumer_info(h.bus.settings.stream, "parser")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def _index_caught_up(h: Harness) -> bool:
    """The parser acked every event published so far, and index/summary.json records KV revisions at or past the
    last write to each bucket it indexes (the indexer writes the pages of a flush before summary.json)."""
    if not await _consumer_idle(h):
        return False
    data = await h.store.get_if_exists(storage.SUMMARY_KEY)
    if data is None:
        return False
    revisions = msgspec.json.decode(data, type=SummaryIndex).revisions
    for bucket, done in ((SUMMARIES_BUCKET, revisions.summaries), (WORKLOADS_BUCKET, revisions.workloads)):
        last = (await (await h.bus.kv(bucket)).status()).stream_info.state.last_seq
        if done < last:
            return False
    return True


async def test_image_seen_fills_digest_workloads_and_the_namespace_index(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    ref, other = digest_ref(30), digest_ref(31, "docker.io/library/redis")
    async with running(make_settings(nats_settings, s3_settings)) as h:
        await h.publish(seen(ref, "shop", "api", "registry.example.com/team/app:2"), subjects.IMAGE_SEEN, "a")
        await h.publish(seen(ref, "billing", "worker", "registry.example.com/team/app:2"), subjects.IMAGE_SEEN, "b")
        await h.publish(seen(other, "shop", "cache", "redis:7"), subjects.IMAGE_SEEN, "c")
        kv = await h.bus.kv(WORKLOADS_BUCKET)

        async def both_runs() -> DigestWorkloads | None:
            doc, _ = await busmod.kv_read(kv, ref.split(":")[1], DigestWorkloads)
            return doc if doc is not None and len(doc.runs) == 2 else None

        doc = await eventually(both_runs)
        assert {r.namespace for r in doc.runs} == {"shop", "billing"}

        async def shop_index() -> NamespaceIndex | None:
            data = await h.store.get_if_exists(storage.namespace_index_key("shop"))
            index = msgspec.json.decode(data, type=NamespaceIndex) if data else None
            return index if index and len(index.workloads) == 2 else None

        shop = await eventually(shop_index)
        assert [(w.workload.name, [i.image for i in w.images]) for w in shop.workloads] == [
            ("api", ["registry.example.com/team/app:2"]),
            ("cache", ["redis:7"]),
        ]
        assert all(i.counts is None for w in shop.workloads for i in w.images), "not scanned yet"

        await h.upload(ref, scan_id(30), SMALL)
        await h.complete(completed(ref, scan_id(30)))

        async def counted() -> NamespaceIndex | None:
            data = await h.store.get_if_exists(storage.namespace_index_key("billing"))
            index = msgspec.json.decode(data, type=NamespaceIndex) if data else None
            return index if index and index.workloads[0].images[0].counts is not None else None

        billing = await eventually(counted)
        assert billing.workloads[0].images[0].counts == normalize.parse(SMALL).counts
        link = f"../digests/{ref.split(':')[1]}.html"

        async def page_links_the_report() -> str | None:  # the page is written just after the index
            page = (await h.store.get(storage.namespace_page_key("billing"))).decode()
            return page if link in page else None

        page = await eventually(page_links_the_report)
        assert "Deployment/worker" in page


@pytest.fixture(scope="module")
def real_sbom(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A CycloneDX SBOM written by the real Trivy of the dev extra (no vulnerability DB needed)."""
    trivy = shutil.which("trivy") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "trivy")
    root = tmp_path_factory.mktemp("rootfs")
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text('NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.19.1\n')
    (root / "lib" / "apk" / "db").mkdir(parents=True)
    (root / "lib" / "apk" / "db" / "installed").write_text("P:musl\nV:1.2.4-r2\nA:x86_64\n\n")
    out = subprocess.run(
        [trivy, "rootfs", "--format", "cyclonedx", "--offline-scan", "--skip-db-update", "--quiet",
         "--cache-dir", str(tmp_path_factory.mktemp("cache")), str(root)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out.stdout


async def _scan_state(h: Harness, ref: str) -> DigestScanState | None:
    kv = await h.bus.kv(SCANS_BUCKET)
    return (await busmod.kv_read(kv, ref.split(":")[1], DigestScanState))[0]


async def test_sbom_is_stored_and_named_in_report_stored_leaving_the_scan_state_to_the_dispatcher(
    nats_settings: NatsSettings, s3_settings: S3Settings, real_sbom: bytes
) -> None:
    ref = digest_ref(40)
    event = completed(ref, scan_id(40), sbom=True)
    async with running(make_settings(nats_settings, s3_settings)) as h:
        scans = await h.bus.kv(SCANS_BUCKET)
        dispatcher_state = DigestScanState(digest_ref=ref, status="running", scan_id=event.scan_id, attempts=1)
        await scans.create(ref.split(":")[1], msgspec.json.encode(dispatcher_state))
        await h.upload(ref, event.scan_id, gzip.compress(SMALL), sbom=gzip.compress(real_sbom))
        await h.complete(event)
        await eventually(lambda: _async(len(h.stored) == 1))

        history_key = storage.history_sbom_key(ref, event.finished_at)
        assert gzip.decompress(await h.store.get(history_key)) == real_sbom
        assert gzip.decompress(await h.store.get(storage.latest_sbom_key(ref))) == real_sbom
        (out,) = h.stored
        assert (out.sbom_key, out.sbom_trivy_version) == (history_key, "0.76.0")
        assert await _scan_state(h, ref) == dispatcher_state, "the parser only reads scan states"
        kv = await h.bus.kv(SUMMARIES_BUCKET)
        summary, _ = await busmod.kv_read(kv, ref.split(":")[1], DigestSummary)
        assert summary is not None and summary.sbom_key == history_key
        assert h.quarantined == []


@pytest.mark.parametrize(
    ("sbom_body", "kind"),
    [
        pytest.param(SMALL, "not-cyclonedx", id="a-trivy-report-not-an-sbom"),
        pytest.param(b'{"bomFormat": "CycloneDX", "specVersion": "1.6"}', "not-cyclonedx", id="no-components"),
        pytest.param(b'{"bomFormat": "SPDX", "specVersion": "1.6", "components": []}', "not-cyclonedx", id="spdx"),
        pytest.param(b'{"bomFormat": "CycloneDX", "specVersion": "1.6", "compo', "truncated", id="truncated"),
        pytest.param(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 20, "bad-gzip", id="bad-gzip"),
        pytest.param(
            b'{"bomFormat": "CycloneDX", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "oversized", id="too-deep"
        ),
    ],
)
async def test_bad_sbom_is_quarantined_and_the_report_is_still_stored(
    nats_settings: NatsSettings, s3_settings: S3Settings, sbom_body: bytes, kind: str
) -> None:
    ref = digest_ref(50)
    event = completed(ref, scan_id(50), sbom=True)
    async with running(make_settings(nats_settings, s3_settings)) as h:
        scans = await h.bus.kv(SCANS_BUCKET)
        await scans.create(ref.split(":")[1], msgspec.json.encode(DigestScanState(digest_ref=ref, status="running")))
        await h.upload(ref, event.scan_id, SMALL, sbom=sbom_body)
        await h.complete(event)
        await eventually(lambda: _async(len(h.stored) == 1 and len(h.quarantined) == 1))
        (q,) = h.quarantined
        assert (q.object, q.kind, q.source_key) == ("sbom", kind, event.sbom_key)
        assert q.quarantine_key == storage.quarantine_sbom_key(event.scan_id)
        assert await h.store.get(q.quarantine_key) == sbom_body
        assert "kind: " + kind in (await h.store.get(storage.quarantine_sbom_error_key(event.scan_id))).decode()
        assert h.stored[0].sbom_key is None, "no usable SBOM: the digest falls back to node scans"
        state = await _scan_state(h, ref)
        assert state is not None and state.sbom_key is None
        assert await h.store.get_if_exists(storage.latest_sbom_key(ref)) is None


async def test_restarted_parser_rebuilds_nothing_and_indexes_what_changed_while_it_was_down(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    ref, later = digest_ref(60), digest_ref(61)
    settings = make_settings(nats_settings, s3_settings)
    async with running(settings) as h:
        await h.upload(ref, scan_id(60), SMALL)
        await h.complete(completed(ref, scan_id(60)))
        await eventually(lambda: _async(len(h.stored) == 1))
    # Written while no parser runs (e.g. by another replica): the next start indexes it.
    bus = await busmod.connect(settings.nats, "other-replica")
    kv = await bus.kv(SUMMARIES_BUCKET)
    base, _ = await busmod.kv_read(kv, ref.split(":")[1], DigestSummary)
    assert base is not None
    await kv.put(later.split(":")[1], msgspec.json.encode(msgspec.structs.replace(base, digest_ref=later)))
    await bus.close()
    async with running(settings) as h:
        before = await h.store.get(storage.SUMMARY_KEY)

        async def reindexed() -> SummaryIndex | None:
            index = msgspec.json.decode(await h.store.get(storage.SUMMARY_KEY), type=SummaryIndex)
            return index if len(index.digests) == 2 else None

        index = await eventually(reindexed)
        assert msgspec.json.decode(before, type=SummaryIndex).revisions.summaries < index.revisions.summaries


# ---------------------------------------------------------------------------------------------------------------
# The HTML index in a real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


HREF_RE = re.compile(r'href="([^"]+)"')


async def test_html_index_renders_in_headless_chromium_and_every_relative_link_resolves(
    nats_settings: NatsSettings, s3_settings: S3Settings, tmp_path: Path
) -> None:
    chromium = _chromium()
    assert chromium, "chromium is not installed: scripts/test.sh installs it (apt-get install -y chromium)"
    hostile = digest_ref(71, "registry.example.com/evil")
    async with running(make_settings(nats_settings, s3_settings)) as h:
        for n, (ns, body) in enumerate([("shop", LARGE), ("billing", HOSTILE), ("shop", PREVIOUS)], start=70):
            ref = hostile if n == 71 else digest_ref(n)
            await h.publish(seen(ref, ns, f"app-{n}", ref.split("@")[0] + ":v1"), subjects.IMAGE_SEEN, f"s{n}")
            await h.upload(ref, scan_id(n), body)
            await h.complete(completed(ref, scan_id(n)))
        await eventually(lambda: _async(len(h.stored) == 3))

        async def all_indexed() -> bool:
            data = await h.store.get_if_exists(storage.SUMMARY_KEY)
            index = msgspec.json.decode(data, type=SummaryIndex) if data else None
            return bool(index) and all(e.report is not None for e in index.digests.values()) and len(index.digests) == 3

        await eventually(all_indexed)
        await eventually(lambda: _index_caught_up(h))  # every event handled, and index/ reflects every KV write
        site = tmp_path / "site"
        for key in await h.store.list_keys("index/"):
            path = site / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(await h.store.get(key))

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/index/"
    try:
        # Every relative link on every page resolves (external CVE links are not followed).
        pages = list(site.rglob("*.html"))
        cve_pages = [p for p in pages if p.parent.name == "cve"]  # one per vulnerability id (test_cve_index.py)
        assert len(pages) - len(cve_pages) == 1 + 2 + 3 and cve_pages, [str(p.relative_to(site)) for p in pages]
        checked = 0
        for page in pages:
            page_url = base + str(page.relative_to(site / "index"))
            for href in HREF_RE.findall(page.read_text()):
                if href.startswith(("http://", "https://")):
                    continue
                url = urllib.parse.urljoin(page_url, href)
                with urllib.request.urlopen(url, timeout=5) as response:  # noqa: ASYNC210
                    assert response.status == 200, url
                checked += 1
        assert checked >= 3 + 2 + 3

        shot = tmp_path / "index.png"
        with tempfile.TemporaryDirectory() as profile:
            proc = await asyncio.create_subprocess_exec(
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                f"--screenshot={shot}", "--window-size=1400,900", "--dump-dom", base + "index.html",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            dom, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0
        text = dom.decode()
        assert "<table>" in text and "Namespaces" in text and "registry.example.com/evil:v1" in text
        assert re.findall(r"<script[^>]*>", text) == ['<script src="search.js" defer="">'], "the search's file only"
        assert shot.stat().st_size > 10_000, "a screenshot of a page with tables, not a blank one"

        # The hostile title is shown as text: no element was made from it.
        digest_url = base + f"digests/{hostile.split(':')[1]}.html"
        with tempfile.TemporaryDirectory() as profile:
            proc = await asyncio.create_subprocess_exec(
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--dump-dom", digest_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            dom, _ = await asyncio.wait_for(proc.communicate(), 120)
        page = dom.decode()
        assert "alert(1)" in page and "&lt;script&gt;" in page
        assert "<script" not in page and "<img" not in page
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# podsweep report ls / show against the stored index


def _cli_env(s3: S3Settings) -> dict[str, str]:
    return {
        "PODSWEEP_S3_ENDPOINT_URL": s3.endpoint_url,
        "PODSWEEP_S3_BUCKET": s3.bucket,
        "PODSWEEP_S3_ACCESS_KEY_ID": s3.access_key_id,
        "PODSWEEP_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
        "COLUMNS": "250",  # rich wraps to the terminal; the assertions look for whole names
    }


async def test_report_ls_and_show_read_what_the_parser_stored(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    from typer.testing import CliRunner

    from services.parser.cli import report_app

    ref = digest_ref(80)
    image = "registry.example.com/team/app:3.1"
    async with running(make_settings(nats_settings, s3_settings)) as h:
        await h.publish(seen(ref, "payments", "ledger", image), subjects.IMAGE_SEEN, "s80")
        await h.upload(ref, scan_id(80), LARGE)
        await h.complete(completed(ref, scan_id(80)))
        await eventually(lambda: _async(len(h.stored) == 1))

        async def listed() -> bool:
            data = await h.store.get_if_exists(storage.SUMMARY_KEY)
            index = msgspec.json.decode(data, type=SummaryIndex) if data else None
            entry = index.digests.get(ref.split(":")[1]) if index else None
            return bool(entry and entry.report and entry.namespaces == ["payments"])

        await eventually(listed)

    runner = CliRunner()
    env = _cli_env(s3_settings)

    def run(*args: str) -> Any:
        return runner.invoke(report_app, list(args), env=env)

    current = normalize.parse(LARGE)
    ls = await asyncio.to_thread(run, "ls")
    assert ls.exit_code == 0, ls.output
    assert "payments" in ls.output and str(current.counts.CRITICAL) in ls.output
    ns = await asyncio.to_thread(run, "ls", "--namespace", "payments")
    assert ns.exit_code == 0 and "Deployment/ledger" in ns.output and image in ns.output
    every = await asyncio.to_thread(run, "ls", "--digests", "--json")
    assert msgspec.json.decode(every.output, type=SummaryIndex).digests[ref.split(":")[1]].images == [image]

    by_image = await asyncio.to_thread(run, "show", image, "--severity", "critical", "--json")
    assert by_image.exit_code == 0, by_image.output
    shown = msgspec.json.decode(by_image.output, type=Report)
    assert shown.scan_id == scan_id(80)
    assert len(shown.findings) == current.counts.CRITICAL and {f.severity for f in shown.findings} == {"CRITICAL"}
    by_digest = await asyncio.to_thread(run, "show", ref, "--severity", "CRITICAL,HIGH")
    assert by_digest.exit_code == 0 and f"{current.counts.CRITICAL + current.counts.HIGH} findings" in by_digest.output

    missing = await asyncio.to_thread(run, "show", "sha256:" + "0" * 64)
    assert missing.exit_code == 1 and "no stored report" in missing.output
    unknown = await asyncio.to_thread(run, "show", "nginx:latest")
    assert unknown.exit_code == 1
    bad = await asyncio.to_thread(run, "show", ref, "--severity", "BAD")
    assert bad.exit_code == 2
