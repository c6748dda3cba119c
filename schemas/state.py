"""Documents in JetStream KV: shared state that must survive any process being killed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas.events import ImageOptions, Workload
from schemas.refs import ClusterName, DigestRef, ImageRef, K8sLabelName, NodeName, ObjectKey, ScanId, ShortText, Text

ScanStatus = Literal["pending", "running", "done", "failed", "not_scanned"]


class NodeFailure(msgspec.Struct, frozen=True):
    node: NodeName
    reason: ShortText
    at: datetime


class NodeLeft(msgspec.Struct, frozen=True):
    """The digest stopped running on `node` at `at` (image.gone): a sighting observed before then is not news."""

    node: NodeName
    at: datetime


DEFAULT_CLUSTER = "default"  # the cluster name of an installation that names none (and of documents from before)


class DigestScanState(msgspec.Struct, frozen=True, kw_only=True):
    """Per-digest scan state, keyed by the digest's hex: one per digest for the whole fleet. Updated only by
    compare-and-set on the KV revision.

    `node`, `nodes_seen`, `failures` and `nodes_left` name nodes of `cluster` (the digest's home: the cluster whose
    dispatcher claims its scans); `elsewhere` holds the nodes other clusters run it on, from which one takes the
    digest over when its home runs it no more or stops saying so (services/dispatcher/plan.py).
    """

    v: int = 1
    digest_ref: DigestRef
    cluster: ClusterName | None = None  # None: written before fleets (its home is the first cluster to decide)
    status: ScanStatus = "pending"
    attempts: int = 0
    scan_id: ScanId | None = None
    node: NodeName | None = None
    nodes_seen: list[NodeName] = []
    failures: list[NodeFailure] = []
    # Nodes the digest left lately: sightings are written up to seconds after they were observed (several at
    # once), and one can arrive after the node's image.gone; it must not put the node back.
    nodes_left: list[NodeLeft] = []
    last_scan_at: datetime | None = None
    next_due_at: datetime | None = None
    last_seen_at: datetime | None = None
    # When the last node running this digest stopped it (None while any node runs it): SBOM rescans continue for
    # the configured time after this instant, and reports say since when the digest has not run.
    not_running_since: datetime | None = None
    reason: Text = ""
    sbom_key: ObjectKey | None = None  # presigned for rescans: a key of the storage layout, never free text
    sbom_trivy_version: ShortText | None = None
    # Claims ever made for this digest (never reset): scan ids and Job names derive from it, so a rescan never
    # collides with a finished Job of an earlier scan that still exists.
    scan_seq: int = 0
    # A pending or running claim is abandoned after this instant (dispatcher killed, Job lost) and may be resumed.
    claim_expires_at: datetime | None = None
    # Other clusters that run the digest: a few of their nodes each (enough to take the digest over from).
    elsewhere: dict[ClusterName, list[NodeName]] = {}


# A slot's id and node are only compared and counted, never sent anywhere, so they are bounded but not pattern-checked:
# every replica decodes the limiter on every change, and checking 100 slots' patterns was three quarters of that.
SlotId = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
SlotNode = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]


class Slot(msgspec.Struct, frozen=True):
    """One scan Job counted against the limits until it finishes or its deadline passes."""

    scan_id: SlotId
    node: SlotNode | None
    deadline: datetime


class LimiterState(msgspec.Struct, frozen=True, kw_only=True):
    """The dispatcher's limits, one KV key shared by every replica and updated only by compare-and-set."""

    v: int = 1
    slots: list[Slot] = []
    # Creation instants inside the last minute (older ones are pruned on every update).
    created: list[datetime] = []


LIMITER_KEY = "active"  # the limiter's key in LIMITS_BUCKET (of the default cluster: see limiter_key)


def limiter_key(cluster: str) -> str:
    """The limiter's key of one cluster's dispatcher: limits are per cluster (nodes belong to one). The default
    cluster keeps the key a single-cluster installation always had."""
    return LIMITER_KEY if cluster == DEFAULT_CLUSTER else f"{LIMITER_KEY}.{cluster}"


class DispatcherLease(msgspec.Struct, frozen=True, kw_only=True):
    """Which dispatcher replica consumes events (the others stand by), under LEADER_KEY in LIMITS_BUCKET.

    The holder renews it (a new revision) every `ttl_s / 3`. A standby takes it over when it is released (`holder`
    empty), or when its revision has not changed for `ttl_s` by the standby's own clock, so clocks need not agree.
    """

    v: int = 1
    holder: ShortText  # "<pod or host name>:<pid>"; empty once released
    acquired_at: datetime
    renewed_at: datetime
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=3600)]


LEADER_KEY = "leader"


def leader_key(cluster: str) -> str:
    """The lease of one cluster's dispatcher replicas (one leader per cluster; see limiter_key for the default)."""
    return LEADER_KEY if cluster == DEFAULT_CLUSTER else f"{LEADER_KEY}.{cluster}"


class VulnDbSeen(msgspec.Struct, frozen=True, kw_only=True):
    """The newest vulnerability DB the dispatcher saw the Trivy server serve, under VULNDB_KEY in LIMITS_BUCKET: a
    restart or a new leader compares with it, so one DB update triggers one rescan."""

    v: int = 1
    updated_at: datetime
    schema_version: int
    seen_at: datetime


VULNDB_KEY = "vulndb"


class WorkloadRun(msgspec.Struct, frozen=True, kw_only=True):
    """A workload that runs a digest, learned from `podsweep.image.seen` (one per workload and image as written)."""

    namespace: K8sLabelName
    workload: Workload
    image: ImageRef
    options: ImageOptions = ImageOptions()
    last_seen_at: datetime | None = None
    cluster: ClusterName | None = None  # the workload's cluster (None: written before fleets, by its only cluster)
    containers: list[K8sLabelName] = []  # the containers that run this image in the workload's pods


class DigestWorkloads(msgspec.Struct, frozen=True, kw_only=True):
    """Who runs a digest, in every cluster of the fleet, keyed by digest hex in WORKLOADS_BUCKET. Written by the
    parser; read by the notifier."""

    v: int = 1
    digest_ref: DigestRef
    runs: list[WorkloadRun] = []


# KV bucket names, relative to the configured prefix (`<kv_prefix>-<name>`).
SCANS_BUCKET = "scans"  # digest hex -> DigestScanState
LIMITS_BUCKET = "limits"  # the dispatcher's limiter state
NOTIFY_BUCKET = "notify"  # notifier fingerprints
DELIVERED_BUCKET = "delivered"  # "<destination>.<alert key>" -> delivered marker (notifier outbox, with a TTL)
WORKLOADS_BUCKET = "workloads"  # digest hex -> workloads that run it (learned from image.seen)
SUMMARIES_BUCKET = "summaries"  # digest hex -> DigestSummary (schemas/index.py), written by the parser
