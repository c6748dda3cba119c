"""The index model: digest summaries and workloads as they change in KV, and what part of index/ each change dirties.

Pure: no I/O, no clock (instants are arguments). The indexer feeds it KV entries and writes what it renders.
"""

from __future__ import annotations

import re
from collections import defaultdict
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

    def _namespaces(self, hex_: str) -> set[str]:
        doc = self.workloads.get(hex_)
        return {run.namespace for run in doc.runs} if doc is not None else set()

    def apply_summary(self, hex_: str, doc: DigestSummary | None, revision: int, *, dirty: bool = True) -> None:
        """A summaries KV entry (None: deleted). `dirty=False` while loading what the stored index already shows."""
        if doc is None:
            self.summaries.pop(hex_, None)
        else:
            self.summaries[hex_] = doc
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
                report=summary,
                scan=self.scans.get(hex_),
                clusters=sorted({run.cluster for run in runs if run.cluster is not None}),
            )
        return SummaryIndex(generated_at=now, revisions=revisions, digests=digests)

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
