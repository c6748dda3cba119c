"""The browsable index the parser keeps under index/ in the report bucket, and the per-digest summary behind it.

Read by `podsweep report ls/show`, the admission gate at start, and anyone with read access to the bucket.
Derived only: every fact here is also in the stored reports and the workloads KV, so the index can be rebuilt.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas.events import ScanMode, Severity, SeverityCounts, Workload
from schemas.refs import (
    ClusterName,
    DigestRef,
    ImageRef,
    K8sLabelName,
    K8sName,
    KindName,
    NodeName,
    ObjectKey,
    ScanId,
    ShortText,
    Text,
    VulnId,
)
from schemas.state import ScanStatus, WorkloadRun


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
    # The report's vulnerability ids (CVE, GHSA, ...), worst first, at most MAX_SEARCH_IDS: what index/search.json
    # finds the digest by. Left out of index/summary.json (kept small for the admission gate's start).
    vulnerability_ids: list[ShortText] = []


MAX_SEARCH_IDS = 2000
"""Vulnerability ids kept per digest for the search (a KV value stays well under NATS's 1 MB message limit)."""


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


class SearchWorkload(msgspec.Struct, frozen=True):
    namespace: K8sLabelName
    kind: KindName
    name: K8sName


class SearchDigest(msgspec.Struct, frozen=True, kw_only=True):
    """One digest as the search finds it: by image, namespace, workload, digest or vulnerability id (its latest
    report's, as positions in SearchIndex.vulnerability_ids); `counts` None means no report yet (and no page under
    index/digests/)."""

    digest: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    digest_ref: DigestRef
    images: list[ImageRef] = []
    workloads: list[SearchWorkload] = []
    counts: SeverityCounts | None = None
    vulnerabilities: list[int] = []


class SearchIndex(msgspec.Struct, frozen=True, kw_only=True):
    """index/search.json: what index.html's search box (index/search.js) filters in the browser, no server needed.

    `vulnerability_ids` is a table that holds each id once (digests built on one base image share most of theirs);
    a digest names its ids by their positions in it. The table may hold ids no digest has any more.
    """

    v: int = 1
    generated_at: datetime
    vulnerability_ids: list[ShortText] = []
    digests: list[SearchDigest] = []


# -- the inverted index (docs/reports.md): vulnerability id / package name -> digests -> who runs them ------------


class PackageVersion(msgspec.Struct, frozen=True, omit_defaults=True):
    """A package a digest contains (from its CycloneDX SBOM, else from its findings). `name` as the SBOM names it,
    with its group (`org.apache.logging.log4j:log4j-core`, `@babel/core`) where it has one; `purl_type` from the
    package URL (apk, deb, npm, pypi, golang, maven, ...)."""

    name: ShortText
    version: ShortText = ""
    purl_type: ShortText = ""


class PostedVuln(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One vulnerable package of a digest's latest report, as the inverted index keeps it."""

    id: VulnId
    package: ShortText
    installed_version: ShortText
    fixed_version: ShortText = ""
    severity: Severity
    pkg_type: ShortText = ""
    title: Text = ""
    url: Text = ""


class DigestPostings(msgspec.Struct, frozen=True, kw_only=True):
    """index/postings/<hex>.json: what a digest's latest report and SBOM put in the inverted index. Written by the
    parser's handler before the summary in KV; the indexer reads it when that summary changes."""

    v: int = 1
    digest_ref: DigestRef
    scan_id: ScanId
    finished_at: datetime
    sbom: bool = False  # the packages come from an SBOM (else from the findings only)
    vulns: list[PostedVuln] = []
    packages: list[PackageVersion] = []


class VulnHit(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A vulnerability in one package version of one digest, and since when (the scan that first reported it)."""

    package: ShortText
    installed_version: ShortText
    fixed_version: ShortText = ""
    severity: Severity
    pkg_type: ShortText = ""
    since: datetime


class CveDigests(msgspec.Struct, frozen=True, kw_only=True):
    title: Text = ""
    url: Text = ""
    digests: dict[str, list[VulnHit]] = {}  # digest hex -> hits


class CveShard(msgspec.Struct, frozen=True, kw_only=True):
    """index/by-cve/<shard>.json: the vulnerability ids whose SHA-256 starts with `shard`, and the digests with each."""

    v: int = 1
    shard: ShortText
    cves: dict[str, CveDigests] = {}


class PackageShard(msgspec.Struct, frozen=True, kw_only=True):
    """index/by-package/<shard>.json: package names (lower case) -> digest hex -> the versions it contains."""

    v: int = 1
    shard: ShortText
    packages: dict[str, dict[str, list[PackageVersion]]] = {}


class DigestRuns(msgspec.Struct, frozen=True, kw_only=True):
    """Who runs a digest (the workloads KV), on which nodes now (the dispatcher's scan state), and which scan the
    digest's postings came from."""

    digest_ref: DigestRef
    scan_id: ScanId | None = None
    runs: list[WorkloadRun] = []
    nodes: list[NodeName] = []
    not_running_since: datetime | None = None


class DigestRunsShard(msgspec.Struct, frozen=True, kw_only=True):
    """index/by-digest/<2 hex>.json: the digests in the inverted index whose hex starts with `shard`."""

    v: int = 1
    shard: ShortText
    digests: dict[str, DigestRuns] = {}


class Affected(msgspec.Struct, frozen=True, kw_only=True):
    """One workload (or a digest no known workload runs) that has the vulnerability or the package."""

    digest_ref: DigestRef
    cluster: ClusterName | None = None
    namespace: K8sLabelName | None = None
    workload: Workload | None = None
    containers: list[K8sLabelName] = []
    image: ImageRef | None = None
    nodes: list[NodeName] = []  # the nodes that run the digest now
    not_running_since: datetime | None = None
    package: ShortText
    installed_version: ShortText
    fixed_version: ShortText = ""
    severity: Severity | None = None
    since: datetime | None = None  # the first stored scan of this digest that reported it
    purl_type: ShortText = ""


class CveAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What `podsweep cve --json` prints: who runs the vulnerability (or the package)."""

    v: int = 1
    kind: Literal["cve", "package"]
    query: ShortText
    title: Text = ""
    url: Text = ""
    digests: int = 0
    affected: list[Affected] = []
