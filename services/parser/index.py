"""The index model: digest summaries and workloads as they change in KV, and what part of index/ each change dirties.

Pure: no I/O, no clock (instants are arguments). The indexer feeds it KV entries and writes what it renders.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from schemas.events import SEVERITIES
from schemas.index import (
    DigestSummary,
    IndexedDigest,
    IndexRevisions,
    NamespaceIndex,
    NamespaceWorkload,
    ScanView,
    SearchDigest,
    SearchIndex,
    SearchWorkload,
    SummaryIndex,
    WorkloadImage,
)
from schemas.refs import split_digest_ref
from schemas.state import DigestScanState, DigestWorkloads

# One gauge sample: its labels and value.
Sample = tuple[dict[str, str], int]


class IndexModel:
    """Everything index/ shows, held in memory (about 1 KB per digest), with the set of pages a change dirtied."""

    def __init__(self) -> None:
        self.summaries: dict[str, DigestSummary] = {}
        self.workloads: dict[str, DigestWorkloads] = {}
        self.scans: dict[str, ScanView] = {}
        self.by_namespace: dict[str, set[str]] = defaultdict(set)
        self.dirty_namespaces: set[str] = set()
        self.summary_dirty = False
        self.revisions = IndexRevisions()
        # Each vulnerability id numbered once, and each digest's ids as those numbers: search.json's table and
        # references, kept up to date as summaries change so a flush does not renumber a million pairs.
        self.id_numbers: dict[str, int] = {}
        self.id_refs: dict[str, list[int]] = {}
        self._searchable: dict[str, SearchDigest] = {}  # built once per change of the digest, not at every flush

    def _numbered(self, ids: list[str]) -> list[int]:
        numbers = self.id_numbers
        return [numbers[i] if i in numbers else numbers.setdefault(i, len(numbers)) for i in ids]

    def _namespaces(self, hex_: str) -> set[str]:
        doc = self.workloads.get(hex_)
        return {run.namespace for run in doc.runs} if doc is not None else set()

    def apply_summary(self, hex_: str, doc: DigestSummary | None, revision: int, *, dirty: bool = True) -> None:
        """A summaries KV entry (None: deleted). `dirty=False` while loading what the stored index already shows."""
        if doc is None:
            self.summaries.pop(hex_, None)
            self.id_refs.pop(hex_, None)
        else:
            # Digests share most of their ids (one base image, many apps): one string each, not one per digest.
            ids = [sys.intern(id_) for id_ in doc.vulnerability_ids]
            self.summaries[hex_] = msgspec.structs.replace(doc, vulnerability_ids=ids) if ids else doc
            self.id_refs[hex_] = self._numbered(ids)
        self._searchable.pop(hex_, None)
        self.revisions = msgspec.structs.replace(self.revisions, summaries=max(self.revisions.summaries, revision))
        if dirty:
            self.summary_dirty = True
            self.dirty_namespaces |= self._namespaces(hex_)

    def apply_workloads(self, hex_: str, doc: DigestWorkloads | None, revision: int, *, dirty: bool = True) -> None:
        before = self._namespaces(hex_)
        if doc is None:
            self.workloads.pop(hex_, None)
        else:
            self.workloads[hex_] = doc
        after = self._namespaces(hex_)
        for ns in before - after:
            self.by_namespace[ns].discard(hex_)
            if not self.by_namespace[ns]:
                del self.by_namespace[ns]
        for ns in after:
            self.by_namespace[ns].add(hex_)
        self._searchable.pop(hex_, None)
        self.revisions = msgspec.structs.replace(self.revisions, workloads=max(self.revisions.workloads, revision))
        if dirty:
            self.summary_dirty = True
            self.dirty_namespaces |= before | after

    def apply_scan(self, hex_: str, doc: DigestScanState | None, revision: int, *, dirty: bool = True) -> None:
        """A scans KV entry (the dispatcher's state of a digest). Only a change of what the index shows (the status
        and its reason) dirties pages: most writes are claims and renewals."""
        view = ScanView(status=doc.status, reason=doc.reason) if doc is not None else None
        before = self.scans.get(hex_)
        if view is None:
            self.scans.pop(hex_, None)
        else:
            self.scans[hex_] = view
        self.revisions = msgspec.structs.replace(self.revisions, scans=max(self.revisions.scans, revision))
        if dirty and view != before:
            self.summary_dirty = True
            self.dirty_namespaces |= self._namespaces(hex_)

    def take_dirty(self) -> tuple[bool, set[str], IndexRevisions]:
        """What to write now, and the revisions it reflects; the model is clean afterwards."""
        out = (self.summary_dirty, self.dirty_namespaces, self.revisions)
        self.summary_dirty = False
        self.dirty_namespaces = set()
        return out

    def mark_dirty(self, summary: bool, namespaces: set[str]) -> None:
        """Put back what a failed flush did not write."""
        self.summary_dirty |= summary
        self.dirty_namespaces |= namespaces

    def summary_index(self, now: datetime, revisions: IndexRevisions) -> SummaryIndex:
        digests: dict[str, IndexedDigest] = {}
        for hex_ in sorted(self.summaries.keys() | self.workloads.keys()):
            doc = self.workloads.get(hex_)
            summary = self.summaries.get(hex_)
            ref = summary.digest_ref if summary is not None else doc.digest_ref if doc is not None else None
            if ref is None:
                continue
            runs = doc.runs if doc is not None else []
            digests[hex_] = IndexedDigest(
                digest_ref=ref,
                images=sorted({run.image for run in runs}),
                namespaces=sorted({run.namespace for run in runs}),
                report=_without_ids(summary),
                scan=self.scans.get(hex_),
                clusters=sorted({run.cluster for run in runs if run.cluster is not None}),
            )
        return SummaryIndex(generated_at=now, revisions=revisions, digests=digests)

    def search_index(self, now: datetime) -> SearchIndex:
        """index/search.json: every digest with what a search finds it by, its ids as numbers in the id table."""
        digests: list[SearchDigest] = []
        for hex_ in sorted(self.summaries.keys() | self.workloads.keys()):
            entry = self._searchable.get(hex_) or self._search_entry(hex_)
            if entry is not None:
                self._searchable[hex_] = entry
                digests.append(entry)
        return SearchIndex(generated_at=now, vulnerability_ids=list(self.id_numbers), digests=digests)

    def _search_entry(self, hex_: str) -> SearchDigest | None:
        doc = self.workloads.get(hex_)
        summary = self.summaries.get(hex_)
        ref = summary.digest_ref if summary is not None else doc.digest_ref if doc is not None else None
        if ref is None:
            return None
        runs = doc.runs if doc is not None else []
        return SearchDigest(
            digest=hex_,
            digest_ref=ref,
            images=sorted({run.image for run in runs}),
            workloads=[
                SearchWorkload(*w)
                for w in sorted({(run.namespace, run.workload.kind, run.workload.name) for run in runs})
            ],
            counts=summary.counts if summary is not None else None,
            vulnerabilities=self.id_refs.get(hex_, []),
        )

    def namespace_index(self, namespace: str, now: datetime) -> NamespaceIndex | None:
        """The namespace's workloads and their digests; None when no digest runs there any more."""
        hexes = self.by_namespace.get(namespace)
        if not hexes:
            return None
        by_workload: dict[tuple[str, str, str], NamespaceWorkload] = {}
        images: dict[tuple[str, str, str], list[WorkloadImage]] = defaultdict(list)
        for hex_ in sorted(hexes):
            doc = self.workloads[hex_]
            summary = self.summaries.get(hex_)
            for run in doc.runs:
                if run.namespace != namespace:
                    continue
                key = (run.cluster or "", run.workload.kind, run.workload.name)
                by_workload.setdefault(key, NamespaceWorkload(workload=run.workload, cluster=run.cluster))
                images[key].append(
                    WorkloadImage(
                        image=run.image,
                        digest_ref=doc.digest_ref,
                        last_seen_at=run.last_seen_at,
                        counts=summary.counts if summary is not None else None,
                        fixable=summary.fixable if summary is not None else None,
                        scanned_at=(summary.scanned_at or summary.finished_at) if summary is not None else None,
                        scan=self.scans.get(hex_),
                    )
                )
        workloads = [
            NamespaceWorkload(
                workload=w.workload,
                images=sorted(images[key], key=lambda i: (i.image, i.digest_ref)),
                cluster=w.cluster,
            )
            for key, w in sorted(
                by_workload.items(), key=lambda item: (item[0][0], item[0][1], natural_key(item[0][2]))
            )
        ]
        return NamespaceIndex(namespace=namespace, generated_at=now, workloads=workloads)


def _without_ids(summary: DigestSummary | None) -> DigestSummary | None:
    """summary.json leaves the vulnerability ids to search.json: the admission gate reads it whole at start."""
    if summary is None or not summary.vulnerability_ids:
        return summary
    return msgspec.structs.replace(summary, vulnerability_ids=[])


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Orders names as people count: svc-2 before svc-10. Runs of digits compare as numbers, the rest as text (a
    number before text at the same place, and the digits' text breaks ties between 01 and 1)."""
    return tuple(
        (0, int(part), part) if i % 2 else (1, 0, part) for i, part in enumerate(_DIGITS.split(text)) if part or not i
    )


def vulnerability_samples(summaries: dict[str, DigestSummary]) -> list[Sample]:
    """Findings by severity per image for Prometheus (`podsweep_image_vulnerabilities`), one series per digest and
    severity, as trivy-operator's and image-scanner's exporters do, plus a `fixable` label. Labels come only from
    validated digest refs, so a hostile name never becomes a label."""
    samples: list[Sample] = []
    for summary in summaries.values():
        repository, digest = split_digest_ref(summary.digest_ref)
        for severity in SEVERITIES:
            labels = {"repository": repository, "digest": digest, "severity": severity}
            samples.append(
                ({**labels, "fixable": "false"}, getattr(summary.counts, severity) - getattr(summary.fixable, severity))
            )
            samples.append(({**labels, "fixable": "true"}, getattr(summary.fixable, severity)))
    return samples


def namespace_vulnerability_samples(
    by_namespace: Mapping[str, Iterable[str]], summaries: Mapping[str, DigestSummary]
) -> list[Sample]:
    """Findings by severity per namespace (`podsweep_namespace_vulnerabilities`): for each namespace the index
    lists, the sum of the latest report's counts of every digest that runs there, each digest once however many
    workloads run it. Five series per namespace (zeros until a report is stored), so cardinality is bounded by the
    namespaces; a namespace the index no longer lists has no series at all, and Prometheus marks it stale."""
    samples: list[Sample] = []
    for namespace in sorted(by_namespace):
        totals = dict.fromkeys(SEVERITIES, 0)
        for hex_ in by_namespace[namespace]:
            summary = summaries.get(hex_)
            if summary is not None:
                for severity in SEVERITIES:
                    totals[severity] += getattr(summary.counts, severity)
        samples.extend(({"namespace": namespace, "severity": severity}, n) for severity, n in totals.items())
    return samples
