"""Documents in JetStream KV: shared state that must survive any process being killed."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.refs import DigestRef, NodeName, ScanId, ShortText, Text

ScanStatus = Literal["pending", "running", "done", "failed", "not_scanned"]


class NodeFailure(msgspec.Struct, frozen=True):
    node: NodeName
    reason: ShortText
    at: datetime


class DigestScanState(msgspec.Struct, frozen=True, kw_only=True):
    """Per-digest scan state, keyed by the digest's hex. Updated only by compare-and-set on the KV revision."""

    v: int = 1
    digest_ref: DigestRef
    status: ScanStatus = "pending"
    attempts: int = 0
    scan_id: ScanId | None = None
    node: NodeName | None = None
    nodes_seen: list[NodeName] = []
    failures: list[NodeFailure] = []
    last_scan_at: datetime | None = None
    next_due_at: datetime | None = None
    last_seen_at: datetime | None = None
    reason: Text = ""
    sbom_key: ShortText | None = None
    sbom_trivy_version: ShortText | None = None


# KV bucket names, relative to the configured prefix (`<kv_prefix>-<name>`).
SCANS_BUCKET = "scans"  # digest hex -> DigestScanState
LIMITS_BUCKET = "limits"  # the dispatcher's limiter state
NOTIFY_BUCKET = "notify"  # notifier fingerprints
WORKLOADS_BUCKET = "workloads"  # digest hex -> workloads that run it (learned from image.seen)
