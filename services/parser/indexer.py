"""Keeps index/ in the bucket in step with the summaries and workloads KV buckets, writing only what changed.

Watches both buckets (so every parser replica's writes are seen), and the dispatcher's scans bucket (read only) so a
digest without a report shows the state `podsweep status` counts and why its last scan failed; marks the pages a change touches, and writes
them at most every `index_flush_s` and once more on stop. index/summary.json is written last and records the KV
revisions it reflects: a restarted parser re-indexes only entries newer than that, and never reads a report.
Never decides what a report says; never writes KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep import aio, logs
from podsweep.objectstore import ObjectStore
from schemas import storage
from schemas.index import DigestSummary, IndexRevisions
from schemas.state import DigestScanState, DigestWorkloads
from services.parser import html
from services.parser.index import IndexModel, namespace_vulnerability_samples, vulnerability_samples

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
_encoder = msgspec.json.Encoder()
_summary_decoder = msgspec.json.Decoder(DigestSummary)
_workloads_decoder = msgspec.json.Decoder(DigestWorkloads)
_scans_decoder = msgspec.json.Decoder(DigestScanState)
HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
MAX_SUMMARY_BYTES = 256 * 1024 * 1024


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
    ) -> None:
        self.store = store
        self.kv = {"summaries": summaries, "workloads": workloads}
        if scans is not None:
            self.kv["scans"] = scans
        self.flush_s = flush_s
        self.clock = clock
        self.model = IndexModel()
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
        if self.model.summary_dirty or self.model.dirty_namespaces:
            self.changed.set()

    def _apply(self, name: str, entry: KeyValue.Entry, *, dirty: bool) -> None:
        revision = entry.revision or 0
        deleted = entry.operation in _DELETED or not entry.value
        try:
            if name == "summaries":
                summary = None if deleted else _summary_decoder.decode(entry.value or b"")
                self.model.apply_summary(entry.key, summary, revision, dirty=dirty)
            elif name == "workloads":
                doc = None if deleted else _workloads_decoder.decode(entry.value or b"")
                self.model.apply_workloads(entry.key, doc, revision, dirty=dirty)
            else:
                state = None if deleted else _scans_decoder.decode(entry.value or b"")
                self.model.apply_scan(entry.key, state, revision, dirty=dirty)
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

    async def flush(self) -> None:
        """Write the dirty namespace pages, then index.html, then summary.json (whose revisions mark them done)."""
        self.changed.clear()
        summary_dirty, namespaces, revisions = self.model.take_dirty()
        if not summary_dirty and not namespaces:
            return
        started = time.perf_counter()
        written = 0
        try:
            with tracer.start_as_current_span("index flush") as span:
                span.set_attribute("podsweep.index.namespaces", len(namespaces))
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
            self.changed.set()
            log.warning("index flush failed, will retry", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        elapsed = time.perf_counter() - started
        flush_seconds.record(elapsed)
        pages_written.add(written)
        log.info("index written", namespaces=len(namespaces), digests=len(index.digests), seconds=round(elapsed, 3))

    async def close(self) -> None:
        if self in _indexers:
            _indexers.remove(self)
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
