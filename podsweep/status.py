"""`podsweep status`: what podsweep is doing, read from JetStream (KV state and consumer info) only.

`summarize` is pure; `collect` does the reading. A fleet: every cluster's digests (by the cluster that runs them),
or one cluster's with `cluster` (the digests it is home to or runs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import get_args

import msgspec
import nats.js.errors

from podsweep import bus as busmod
from podsweep.natsaccess import durable_name
from podsweep.operatoraccess import OPERATOR
from schemas.state import (
    DEFAULT_CLUSTER,
    LIMITS_BUCKET,
    SCANS_BUCKET,
    DigestScanState,
    DispatcherLease,
    ScanStatus,
    leader_key,
)

_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


class ConsumerLag(msgspec.Struct, frozen=True):
    service: str
    pending: int  # not yet delivered
    in_flight: int  # delivered, not acked
    redelivered: int


class Failure(msgspec.Struct, frozen=True):
    digest_ref: str
    reason: str  # the last failure's reason (PodCreateRejected, ReportMissing, NodeGone, ...) or the state
    at: datetime | None
    detail: str = ""  # the dispatcher's own words: the reason with its message, and what happens next


class StatusReport(msgspec.Struct, frozen=True):
    digests: int
    by_state: dict[str, int]
    oldest_pending: str | None
    oldest_pending_since: datetime | None
    running_per_node: dict[str, int]
    consumers: list[ConsumerLag]
    recent_failures: list[Failure]
    dispatcher_leader: str = ""  # the lease holder ("" while none holds it)
    # Digests that failed or are not scanned, by their last failure's reason.
    failed_by_reason: dict[str, int] = {}
    # A fleet: digests each cluster runs (home or elsewhere), and the cluster shown (None: all of them).
    by_cluster: dict[str, int] = {}
    cluster: str | None = None


def home(state: DigestScanState) -> str:
    """The cluster whose dispatcher scans the digest (a state from before fleets: the default cluster)."""
    return state.cluster or DEFAULT_CLUSTER


def runs_in(state: DigestScanState) -> list[str]:
    """Every cluster known to run the digest: its home, then the others."""
    return [home(state), *(c for c in state.elsewhere if c != home(state))]


def summarize(
    states: list[DigestScanState],
    consumers: list[ConsumerLag],
    failures_shown: int = 10,
    lease: DispatcherLease | None = None,
    cluster: str | None = None,
) -> StatusReport:
    by_cluster = Counter(c for s in states for c in runs_in(s))
    if cluster is not None:
        states = [s for s in states if cluster in runs_in(s)]
    by_state = Counter(_status(s) for s in states)
    pending = [s for s in states if s.status == "pending"]
    oldest = min(pending, key=lambda s: s.last_seen_at or _LATEST, default=None)
    # Nodes are named with their cluster when the fleet has several (node names repeat across clusters).
    fleet = len(by_cluster) > 1
    running = Counter(
        f"{home(s)}/{s.node}" if fleet else s.node
        for s in states
        if s.status == "running" and s.node and (cluster is None or home(s) == cluster)
    )
    failed = sorted(
        (s for s in states if _status(s) in ("failed", "not_scanned") or s.failures),
        key=lambda s: s.failures[-1].at if s.failures else (s.last_seen_at or _EARLIEST),
        reverse=True,
    )
    by_reason = Counter(_reason(s) for s in states if _status(s) in ("failed", "not_scanned"))
    return StatusReport(
        digests=len(states),
        by_state=dict(sorted(by_state.items())),
        oldest_pending=oldest.digest_ref if oldest else None,
        oldest_pending_since=oldest.last_seen_at if oldest else None,
        running_per_node=dict(sorted(running.items())),
        consumers=consumers,
        recent_failures=[
            Failure(
                digest_ref=s.digest_ref,
                reason=_reason(s),
                at=s.failures[-1].at if s.failures else None,
                detail=s.reason,
            )
            for s in failed[:failures_shown]
        ],
        dispatcher_leader=lease.holder if lease is not None else "",
        failed_by_reason=dict(sorted(by_reason.items())),
        by_cluster=dict(sorted(by_cluster.items())),
        cluster=cluster,
    )


def count_by_state(states: Iterable[DigestScanState]) -> dict[str, int]:
    """Digests per state as `podsweep status` counts them, every state present (0 when none), for a gauge whose
    series should not come and go with the states that happen to be in use."""
    counts = dict.fromkeys(get_args(ScanStatus), 0)
    for state in states:
        counts[_status(state)] += 1
    return counts


def _status(state: DigestScanState) -> str:
    """The state as people count it: a digest that runs somewhere and was never claimed (it waits for a slot, or for
    scan pods to be accepted) is waiting, i.e. pending, not failed."""
    if state.status == "not_scanned" and state.nodes_seen and not state.reason and not state.failures:
        return "pending"
    return state.status


def _reason(state: DigestScanState) -> str:
    """The last failure's reason; without one (no node runs the digest any more), its state."""
    return state.failures[-1].reason if state.failures else state.status


async def collect(bus: busmod.Bus, cluster: str | None = None, own: str = DEFAULT_CLUSTER) -> StatusReport:
    """The status of the fleet, or of `cluster`; the dispatcher's consumer and lease are those of `cluster`, else of
    `own` (the cluster this command is configured for)."""
    try:
        kv = await bus.kv(SCANS_BUCKET)
    except busmod.MissingBucket:  # no dispatcher has run yet: nothing is known
        states: list[DigestScanState] = []
    else:
        states, _ = await busmod.kv_documents(kv, DigestScanState)  # not a GET per key: `podsweep up` asks every few s
    consumers = []
    for durable in OPERATOR.inspects:  # every service's durable, by the operator user's declaration
        try:
            info = await bus.consumer_info(durable_name(durable, cluster or own))
        except nats.js.errors.NotFoundError:  # a service that never ran has no consumer yet
            continue
        consumers.append(
            ConsumerLag(
                service=durable.name,
                pending=int(info.num_pending or 0),
                in_flight=int(info.num_ack_pending or 0),
                redelivered=int(info.num_redelivered or 0),
            )
        )
    try:
        lease, _ = await busmod.kv_read(await bus.kv(LIMITS_BUCKET), leader_key(cluster or own), DispatcherLease)
    except busmod.MissingBucket:
        lease = None
    return summarize(states, consumers, lease=lease, cluster=cluster)
