"""Keeps index/ in the bucket in step with the summaries and workloads KV buckets, writing only what changed.

Watches both buckets (so every parser replica's writes are seen), and the dispatcher's scans bucket (read only) so a
digest without a report shows the state `podsweep status` counts and why its last scan failed; marks the pages a change touches, and writes
them at most every `index_flush_s` and once more on stop. index/summary.json is written last and records the KV
revisions it reflects: a restarted parser re-indexes only entries newer than that. It reads a report only for a
digest stored before the inverted index existed (no postings): it builds them once from the stored report and SBOM.
Never decides what a report says; never writes KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep import aio, logs
from podsweep.objectstore import ObjectStore, ObjectTooLarge
from schemas import storage
from schemas.index import (
    CveShard,
    DigestPostings,
    DigestRuns,
    DigestRunsShard,
    DigestSummary,
    IndexRevisions,
    PackageShard,
    PackageVersion,
)
from schemas.refs import digest_hex
from schemas.report import Report
from schemas.state import DigestScanState, DigestWorkloads
from services.parser import html, sbom, vulnindex
from services.parser.index import IndexModel, namespace_vulnerability_samples, vulnerability_samples
from services.parser.vulnindex import VulnIndex

log = logs.get("podsweep.parser.index")
tracer = trace.get_tracer("podsweep.parser")
meter = metrics.get_meter("podsweep.parser")
flush_seconds = meter.create_histogram("podsweep_index_flush_seconds", unit="s", description="Index writes")
pages_written = meter.create_counter("podsweep_index_objects_written", description="index/ objects written")

_indexers: list[Indexer] = []  # the running one reports; a test process may have had several


def _observe_vulnerabilities(_: CallbackOptions) -> list[Observation]:
    if not _indexers:
        return []
    return [Observation(value, labels) for labels, value in vulnerability_samples(_indexers[-1].model.summaries)]


def _observe_namespace_vulnerabilities(_: CallbackOptions) -> list[Observation]:
    if not _indexers:
        return []
    model = _indexers[-1].model
    return [
        Observation(n, labels) for labels, n in namespace_vulnerability_samples(model.by_namespace, model.summaries)
    ]


meter.create_observable_gauge(
    "podsweep_image_vulnerabilities",
    [_observe_vulnerabilities],
    description="Findings in the latest report of each image digest, by severity and whether a fix exists",
)
meter.create_observable_gauge(
    "podsweep_namespace_vulnerabilities",
    [_observe_namespace_vulnerabilities],
    description="Findings in the latest reports of the digests that run in each namespace, by severity",
)

_DELETED = frozenset({"DEL", "PURGE"})
T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)
_encoder = msgspec.json.Encoder()
_summary_decoder = msgspec.json.Decoder(DigestSummary)
_workloads_decoder = msgspec.json.Decoder(DigestWorkloads)
_scans_decoder = msgspec.json.Decoder(DigestScanState)
_postings_decoder = msgspec.json.Decoder(DigestPostings)
_report_decoder = msgspec.json.Decoder(Report)
HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
MAX_SUMMARY_BYTES = 256 * 1024 * 1024
MAX_SHARD_BYTES = 64 * 1024 * 1024
# Objects read or written at once: the store's calls run in worker threads, a few at a time.
CONCURRENCY = 16


class _Checkpoint(msgspec.Struct, frozen=True):
    """Only the revisions of index/summary.json (the decoder skips the digests without building them)."""

    revisions: IndexRevisions = IndexRevisions()


class Indexer:
    def __init__(
        self,
        store: ObjectStore,
        summaries: KeyValue,
        workloads: KeyValue,
        flush_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        scans: KeyValue | None = None,
        max_report_bytes: int = 64 * 1024 * 1024,
        max_sbom_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.max_report_bytes, self.max_sbom_bytes = max_report_bytes, max_sbom_bytes
        self.kv = {"summaries": summaries, "workloads": workloads}
        if scans is not None:
            self.kv["scans"] = scans
        self.flush_s = flush_s
        self.clock = clock
        self.model = IndexModel()
        self.vulns = VulnIndex()
        self.pending_postings: set[str] = set()  # digests whose summary names a scan the inverted index lacks
        self._unreadable_shards = 0
        self._stored_runs: dict[str, DigestRuns] = {}  # what the digest shards said at start
        self._loading = True  # a deleted summary is handled once everything is loaded
        self.changed = asyncio.Event()
        self._watchers: list[KeyValue.KeyWatcher] = []
        self._pumps: list[asyncio.Task[None]] = []
        _indexers.append(self)

    # -- loading ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load both buckets (only entries newer than the stored index are dirty), then follow their changes."""
        data = await self.store.get_if_exists(storage.SUMMARY_KEY, MAX_SUMMARY_BYTES)
        checkpoint: IndexRevisions | None = None
        if data is not None:
            try:
                checkpoint = msgspec.json.decode(data, type=_Checkpoint).revisions
            except msgspec.DecodeError as exc:
                log.warning("stored index unreadable, rebuilding it", key=storage.SUMMARY_KEY, error=str(exc)[:200])
        await self._load_vulns()
        for name in self.kv:
            watcher = await self.kv[name].watchall()
            self._watchers.append(watcher)
            after = getattr(checkpoint, name) if checkpoint is not None else -1
            loaded = 0
            async for entry in watcher:
                if entry is None:  # the end of the current values
                    break
                self._apply(name, entry, dirty=(entry.revision or 0) > after)
                loaded += 1
            log.info("index loaded", bucket=name, entries=loaded, after_revision=after)
            self._pumps.append(asyncio.create_task(self._pump(name, watcher)))
        if checkpoint is None:
            self.model.mark_dirty(True, set(self.model.by_namespace))
        self.vulns.settle(self._stored_runs)
        self._stored_runs = {}
        self._loading = False
        for hex_ in set(self.vulns.scan_of) - set(self.model.summaries):  # deleted while no parser ran
            self.vulns.apply_postings(hex_, None)
        if self.model.summary_dirty or self.model.dirty_namespaces or self.pending_postings or self._vulns_dirty():
            self.changed.set()

    async def _load_vulns(self) -> None:
        """The stored inverted index: a restart re-reads only the postings of digests whose summary moved on."""
        started = time.perf_counter()
        digests = await self._read_shards("index/by-digest/", DigestRunsShard)
        cves = await self._read_shards("index/by-cve/", CveShard)
        packages = await self._read_shards("index/by-package/", PackageShard)
        if self._unreadable_shards:  # what it held is unknown: read every digest's postings again
            log.warning("cve index rebuilt from every digest's postings", unreadable_shards=self._unreadable_shards)
            digests, cves, packages = [], [], []
        self.vulns.load(cves, packages, digests)
        self._stored_runs = {hex_: runs for shard in digests for hex_, runs in shard.digests.items()}
        log.info(
            "cve index loaded",
            digests=len(self.vulns.scan_of),
            cves=len(self.vulns.cves),
            packages=len(self.vulns.packages),
            seconds=round(time.perf_counter() - started, 3),
        )

    async def _read_shards(self, prefix: str, typ: type[S]) -> list[S]:
        async def read(key: str) -> S | None:
            data = await self.store.get_if_exists(key, MAX_SHARD_BYTES)
            try:
                return msgspec.json.decode(data, type=typ) if data is not None else None
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("index shard unreadable", key=key, error=str(exc)[:200])
                self._unreadable_shards += 1
                return None

        found = await _bounded([read(key) for key in await self.store.list_keys(prefix)])
        return [doc for doc in found if doc is not None]

    def _vulns_dirty(self) -> bool:
        v = self.vulns
        return bool(v.dirty_cve_shards or v.dirty_package_shards or v.dirty_digest_shards or v.dirty_pages)

    def _apply(self, name: str, entry: KeyValue.Entry, *, dirty: bool) -> None:
        revision = entry.revision or 0
        deleted = entry.operation in _DELETED or not entry.value
        try:
            if name == "summaries":
                summary = None if deleted else _summary_decoder.decode(entry.value or b"")
                self.model.apply_summary(entry.key, summary, revision, dirty=dirty)
                if summary is None:
                    self.pending_postings.discard(entry.key)
                    if not self._loading:
                        self.vulns.apply_postings(entry.key, None)
                elif summary.scan_id != self.vulns.scan_of.get(entry.key):
                    self.pending_postings.add(entry.key)
            elif name == "workloads":
                doc = None if deleted else _workloads_decoder.decode(entry.value or b"")
                self.model.apply_workloads(entry.key, doc, revision, dirty=dirty)
                self.vulns.apply_workloads(entry.key, doc)
            else:
                state = None if deleted else _scans_decoder.decode(entry.value or b"")
                self.model.apply_scan(entry.key, state, revision, dirty=dirty)
                if state is None:
                    self.vulns.apply_running(entry.key, [], None)
                else:
                    self.vulns.apply_running(entry.key, state.nodes_seen, state.not_running_since)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("kv entry skipped by the index", bucket=name, key=entry.key[:80], error=str(exc)[:200])

    async def _pump(self, name: str, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._apply(name, entry, dirty=True)
                self.changed.set()

    # -- writing ------------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Flush whenever something changed, at most every flush_s, until `stop`; the caller flushes last."""
        last = 0.0
        while not stop.is_set():
            await aio.wait_first((stop, self.changed))
            if stop.is_set():
                return
            wait = last + self.flush_s - time.monotonic()
            if wait > 0 and await aio.sleep_unless(stop, wait):
                return
            last = time.monotonic()
            await self.flush()

    async def caught_up(self, timeout_s: float = 5.0) -> None:
        """Wait until the watchers have applied every KV write made so far (before the last flush on stop)."""
        deadline = time.monotonic() + timeout_s
        for name, kv in self.kv.items():
            last_seq = (await kv.status()).stream_info.state.last_seq
            while getattr(self.model.revisions, name) < last_seq and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the watcher callbacks run on this loop; polling a counter is enough

    async def _read_postings(self) -> None:
        """The postings of every digest whose summary named a new scan (the handler wrote them before it)."""
        pending, self.pending_postings = self.pending_postings, set()

        async def read(hex_: str) -> None:
            key = storage.postings_key(f"x@sha256:{hex_}")
            try:
                data = await self.store.get_if_exists(key, MAX_SHARD_BYTES)
                summary = self.model.summaries.get(hex_)
                if data is None and summary is not None:
                    doc = await self._backfill(summary)
                else:
                    doc = _postings_decoder.decode(data) if data is not None else None
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("postings unreadable, digest left out of the cve index", key=key, error=str(exc)[:200])
                return
            except Exception:
                self.pending_postings.add(hex_)  # the store failed: the next flush reads it again
                raise
            if doc is not None and hex_ in self.model.summaries:
                self.vulns.apply_postings(hex_, doc)

        await _bounded([read(hex_) for hex_ in sorted(pending)])

    async def _backfill(self, summary: DigestSummary) -> DigestPostings | None:
        """The postings of a digest whose latest report was stored before the inverted index existed, built once
        from that report (its history copy) and the digest's SBOM, and stored unless the handler stored newer ones
        first."""
        key = storage.postings_key(summary.digest_ref)
        try:  # what cannot be read now will not be readable later: the digest waits for its next report
            data = await self.store.get_if_exists(summary.history_key, self.max_report_bytes)
            report = _report_decoder.decode(data) if data is not None else None
        except (ObjectTooLarge, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("stored report unreadable: digest left out of the cve index until its next report",
                        report=summary.history_key, error=str(exc)[:200])  # fmt: skip
            return None
        if report is None:
            log.warning("no postings and no report: digest left out of the cve index", report=summary.history_key)
            return None
        doc = await postings_for(  # the packages from the digest's latest SBOM: the same digest has the same files
            self.store, report, summary.digest_ref, summary.scan_id, summary.finished_at, None, self.max_sbom_bytes
        )
        if not await self.store.put_new(key, _encoder.encode(doc)):  # the handler stored newer ones meanwhile
            self.pending_postings.add(digest_hex(summary.digest_ref))  # the next flush reads those
            return None
        log.info("postings built for a digest stored before the cve index", digest=summary.digest_ref, key=key)
        return doc

    async def _write_vulns(self, cve: set[str], package: set[str], digest: set[str], pages: set[str]) -> int:
        """The dirty shards, then the CVE pages (a page of an id no digest has any more is deleted)."""
        now = self.clock()

        async def shard(key: str, doc: msgspec.Struct, empty: bool) -> None:
            if empty:
                await self.store.delete(key)
            else:
                await self.store.put(key, _encoder.encode(doc))

        async def page(cve_id: str) -> None:
            key = storage.cve_page_key(cve_id)
            answer = self.vulns.lookup_cve(cve_id)
            if not answer.affected:
                await self.store.delete(key)
            else:
                await self.store.put(key, html.cve_page(answer, now).encode(), HTML)

        writes = []
        for s in sorted(digest):
            runs = self.vulns.digest_shard(s)
            writes.append(shard(storage.digest_shard_key(s), runs, not runs.digests))
        for s in sorted(cve):
            doc = self.vulns.cve_shard(s)
            writes.append(shard(storage.cve_shard_key(s), doc, not doc.cves))
        for s in sorted(package):
            pdoc = self.vulns.package_shard(s)
            writes.append(shard(storage.package_shard_key(s), pdoc, not pdoc.packages))
        await _bounded(writes)  # shards before pages: a page links nothing the shards do not hold
        await _bounded([page(cve_id) for cve_id in sorted(pages)])
        return len(writes) + len(pages)

    async def flush(self) -> None:
        """Write the inverted index's dirty shards and CVE pages, the dirty namespace pages, then index.html, then
        summary.json (whose revisions mark them done)."""
        self.changed.clear()
        try:
            await self._read_postings()
        except Exception as exc:
            self.changed.set()
            log.warning("postings read failed, will retry", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        summary_dirty, namespaces, revisions = self.model.take_dirty()
        vulns = self.vulns.take_dirty()
        if not summary_dirty and not namespaces and not any(vulns):
            return
        started = time.perf_counter()
        written = 0
        try:
            with tracer.start_as_current_span("index flush") as span:
                span.set_attribute("podsweep.index.namespaces", len(namespaces))
                written += await self._write_vulns(*vulns)
                now = self.clock()
                for ns in sorted(namespaces):
                    doc = self.model.namespace_index(ns, now)
                    if doc is None:
                        await self.store.delete(storage.namespace_index_key(ns))
                        await self.store.delete(storage.namespace_page_key(ns))
                        continue
                    await self.store.put(storage.namespace_index_key(ns), _encoder.encode(doc))
                    await self.store.put(storage.namespace_page_key(ns), html.namespace_page(doc).encode(), HTML)
                    written += 2
                index = self.model.summary_index(now, revisions)
                # The search box's script and document before the page that loads them.
                await self.store.put(storage.SEARCH_SCRIPT_KEY, html.SEARCH_SCRIPT, JAVASCRIPT)
                await self.store.put(storage.SEARCH_KEY, _encoder.encode(self.model.search_index(now)))
                await self.store.put(storage.INDEX_HTML_KEY, html.index_page(index).encode(), HTML)
                await self.store.put(storage.SUMMARY_KEY, _encoder.encode(index))
                written += 4
        except Exception as exc:
            self.model.mark_dirty(True, namespaces)
            self.vulns.mark_dirty(*vulns)
            self.changed.set()
            log.warning("index flush failed, will retry", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        elapsed = time.perf_counter() - started
        flush_seconds.record(elapsed)
        pages_written.add(written)
        log.info(
            "index written",
            namespaces=len(namespaces),
            digests=len(index.digests),
            cve_shards=len(vulns[0]),
            package_shards=len(vulns[1]),
            cve_pages=len(vulns[3]),
            seconds=round(elapsed, 3),
        )

    async def close(self) -> None:
        if self in _indexers:
            _indexers.remove(self)
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


async def postings_for(
    store: ObjectStore,
    report: Report,
    digest_ref: str,
    scan_id: str,
    finished_at: datetime,
    packages: list[PackageVersion] | None,
    max_sbom_bytes: int,
) -> DigestPostings:
    """What a report puts in the inverted index. Without an SBOM from its scan, the packages come from the digest's
    stored one: the same digest has the same files."""
    if packages is None:
        try:
            data = await store.get_if_exists(storage.latest_sbom_key(digest_ref), max_sbom_bytes)
            packages = sbom.check(data, max_bytes=max_sbom_bytes).packages if data is not None else None
        except (ObjectTooLarge, sbom.SbomError):
            packages = None  # it was checked when kept (a cap lowered since): the findings' packages stay
    doc, skipped = vulnindex.postings_of(report, digest_ref, scan_id, finished_at, packages)
    if skipped:
        log.warning("findings left out of the CVE index: not vulnerability ids", digest=digest_ref, count=skipped)
    return doc


async def _bounded(calls: list[Coroutine[Any, Any, T]], limit: int = CONCURRENCY) -> list[T]:
    """Run store calls `limit` at a time, in order of the list; the first failure propagates."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))
