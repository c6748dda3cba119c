"""The browsable index the parser keeps under index/ in the report bucket, and the per-digest summary behind it.

Read by `podsweep report ls/show`, the admission gate at start, and anyone with read access to the bucket.
Derived only: every fact here is also in the stored reports and the workloads KV, so the index can be rebuilt.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from schemas.events import ScanMode, SeverityCounts, Workload
from schemas.refs import ClusterName, DigestRef, ImageRef, K8sLabelName, ObjectKey, ScanId, ShortText, Text
from schemas.state import ScanStatus


class DigestSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The latest stored report of one digest, in a few hundred bytes: the KV SUMMARIES_BUCKET value (keyed by
    digest hex), so a restarted parser rebuilds its index without reading a single report."""

    v: int = 1
    digest_ref: DigestRef
    scan_id: ScanId
    mode: ScanMode = "node"
    finished_at: datetime  # when the scan finished (orders the scans of one digest)
    stored_at: datetime
    scanned_at: datetime | None = None  # Trivy's CreatedAt, when it wrote one
    artifact: Text = ""
    os: ShortText = ""
    eosl: bool = False
    trivy_version: ShortText = ""
    counts: SeverityCounts = SeverityCounts()
    fixable: SeverityCounts = SeverityCounts()
    misconfigurations: int = 0
    secrets: int = 0
    report_key: ObjectKey
    history_key: ObjectKey
    sbom_key: ObjectKey | None = None  # the stored SBOM of this scan, when it had a valid one
    cluster: ClusterName | None = None  # the cluster the scan ran in (None: stored before fleets)


class IndexRevisions(msgspec.Struct, frozen=True):
    """The KV revisions (stream sequences) the index reflects: a restart re-indexes only what came after."""

    summaries: int = 0
    workloads: int = 0
    scans: int = 0


class ScanView(msgspec.Struct, frozen=True, kw_only=True):
    """A digest's scan state as the dispatcher last wrote it (what `podsweep status` counts): the index says the same
    of a digest without a report, and why its last scan failed."""

    status: ScanStatus
    reason: Text = ""


class IndexedDigest(msgspec.Struct, frozen=True, kw_only=True):
    """One digest in index/summary.json: who runs it and its latest report (None until the first one is stored)."""

    digest_ref: DigestRef
    images: list[ImageRef] = []
    namespaces: list[K8sLabelName] = []
    report: DigestSummary | None = None
    scan: ScanView | None = None
    clusters: list[ClusterName] = []  # the clusters its workloads run in (a run from before fleets names none)


class SummaryIndex(msgspec.Struct, frozen=True, kw_only=True):
    """index/summary.json: every digest podsweep knows, keyed by its 64 hex characters."""

    v: int = 1
    generated_at: datetime
    revisions: IndexRevisions = IndexRevisions()
    digests: dict[str, IndexedDigest] = {}


class WorkloadImage(msgspec.Struct, frozen=True, kw_only=True):
    """One image a workload runs, by digest, with the counts of that digest's latest report (None: not yet)."""

    image: ImageRef
    digest_ref: DigestRef
    last_seen_at: datetime | None = None
    counts: SeverityCounts | None = None
    fixable: SeverityCounts | None = None
    scanned_at: datetime | None = None
    scan: ScanView | None = None


class NamespaceWorkload(msgspec.Struct, frozen=True, kw_only=True):
    """One workload of the namespace in one cluster (a namespace of the same name in two clusters lists both)."""

    workload: Workload
    images: list[WorkloadImage] = []
    cluster: ClusterName | None = None  # None: learned before fleets


class NamespaceIndex(msgspec.Struct, frozen=True, kw_only=True):
    """index/namespaces/<ns>.json: workloads → digests → counts, learned from `image.seen`."""

    v: int = 1
    namespace: K8sLabelName
    generated_at: datetime
    workloads: list[NamespaceWorkload] = []
