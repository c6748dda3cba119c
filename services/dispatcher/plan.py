"""What to do about one digest: scan, rescan, retry elsewhere, wait, or give up. Pure: no I/O, no clock of its own.

Every function takes the digest's `DigestScanState` as read from KV (None when absent) and returns a `Decision`:
the NEW state document, or None when nothing changed, and at most one `ScanPlan` to carry out.

Claim protocol (two replicas and any restart agree on it):

1. Read the state and its KV revision; decide. A decision that plans a scan returns the state as `pending` with a
   new `scan_id` (a hash of the digest and `scan_seq`, which only ever grows), `attempts` + 1, the node, and
   `claim_expires_at` = now + `claim_ttl`.
2. Write it with compare-and-set on that revision (create-only when the key was absent). On conflict, do nothing
   else: read again and decide again; the other writer's claim is `pending` and unexpired, so no second plan comes.
3. Only the writer that won takes a limiter slot for `scan_id` (limits.try_acquire, its own CAS key) and creates
   the Job named `scan_id`. When the limiter refuses, the claim stays `pending` and the event is retried at the
   limiter's `retry_at`; every step is keyed by `scan_id`, so repeating one (a second slot, a 409 on create) is a
   no-op rather than a second scan.
4. After the Job exists, `on_created` turns `pending` into `running` with `claim_expires_at` = now + the Job
   deadline + grace (CAS again).
5. A claim whose `claim_expires_at` passed was abandoned (the replica died between steps, or the Job vanished
   without an event): a `pending` claim is resumed under the same `scan_id` (steps 3-4 are idempotent), a
   `running` one counts as a failure on its node and is retried like `scan.failed`.

`scan.completed` / `scan.failed` / `image.gone` for another `scan_id` than the state's are stale and change nothing.

Fleet (several clusters, one SCANS bucket): a digest has one state for the whole fleet, and a home cluster
(`state.cluster`, the first to write it): only the home's dispatcher claims it, on a node of its own, so a digest
is scanned once across the fleet. Another cluster's sightings only note a few of its nodes in `elsewhere` and decide
nothing ("elsewhere"). That cluster takes the digest over (becomes its home, its noted nodes the state's nodes) when
no claim is in flight and the home runs it on no node, or has not said it runs it for `home_stale` (its watcher and
dispatcher are gone: a cluster deleted, or cut off). An expired claim of the old home is then a failed attempt, and
the new home retries at once on its own nodes. `policy.cluster` is the deciding dispatcher's cluster. A state
written before fleets (`cluster` None) is the default cluster's to decide on, and the first cluster to see the digest
again becomes its home (an installation that named its one cluster adopts its states as its watcher resyncs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Literal

import msgspec

from schemas.events import (
    ImageGone,
    ImageOptions,
    ImageSeen,
    ReportQuarantined,
    ReportStored,
    ScanCompleted,
    ScanFailed,
    ScanMode,
    ScanStarted,
)
from schemas.refs import digest_hex
from schemas.state import DEFAULT_CLUSTER, DigestScanState, NodeFailure, NodeLeft
from services.dispatcher.limits import Limits
from services.dispatcher.nodes import pick_node

# Failures that prove the node does not hold the image any more: never retry there.
NO_OPTIONS = ImageOptions()
_NODE_LOST_IMAGE = frozenset({"ErrImageNeverPull", "NodeGone"})
# Failures that are the scan namespace's, not the node's: the API server refused the scan pod (every node alike).
# They neither steer the retry away from the node nor count towards `max_attempts`: the dispatcher holds all new Jobs
# instead (rejections.py) until a probe's pod is created, and then the digest's scan goes ahead.
NOT_THE_NODE = frozenset({"PodCreateRejected"})
# SBOM rescan failures that are the item's own (its `trivy sbom` failed): the SBOM is not used again, the digest
# falls back to a node scan. Other failures of a batch (deadline, eviction, another item failing first) keep it.
_SBOM_AT_FAULT = frozenset({"ScanError", "OOMKilled"})

Why = Literal[
    "first_scan",
    "rescan_due",
    "retry",
    "resume_claim",
    "claimed",  # another claim is in flight
    "not_due",
    "backoff",
    "nodes_full",
    "limited",  # the limiter (as this replica last saw it) has no global slot or creation left: claim nothing yet
    "no_node",
    "gave_up",
    "stale",
    "recorded",
    "elsewhere",  # another cluster is the digest's home: its dispatcher decides
]
# Nodes noted per other cluster (`elsewhere`): enough to take the digest over from; its sightings add more after.
ELSEWHERE_NODES_KEPT = 8


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """Rescan interval, retries and timeouts; validated when the dispatcher's config is loaded."""

    rescan_interval: timedelta = timedelta(hours=24)
    # Due times spread over [interval, interval * (1 + jitter_ratio)], a fixed phase per digest.
    jitter_ratio: float = 0.1
    claim_ttl: timedelta = timedelta(minutes=2)
    job_deadline: timedelta = timedelta(minutes=10)
    deadline_grace: timedelta = timedelta(minutes=2)
    max_attempts: int = 4
    backoff_base: timedelta = timedelta(seconds=30)
    backoff_max: timedelta = timedelta(minutes=30)
    # A node that failed this digest within this time is avoided while another node runs it.
    failure_memory: timedelta = timedelta(hours=1)
    # `last_seen_at` is rewritten at most this often (each write is a KV round trip).
    seen_refresh: timedelta = timedelta(minutes=10)
    max_nodes_tracked: int = 512
    # Rescan from a stored SBOM (issue 10) instead of a node when one exists, unless it predates this Trivy.
    sbom_rescans: bool = True
    sbom_min_trivy_version: str | None = None
    # Digests no node runs any more keep being rescanned from their SBOM this long after the last one stopped.
    rescan_gone_for: timedelta = timedelta(days=7)
    # The cluster this dispatcher claims for (its own API server's), and how long a digest's home may go without
    # saying it runs it (`last_seen_at`, refreshed by its watcher's resyncs) before another cluster takes it over.
    cluster: str = DEFAULT_CLUSTER
    home_stale: timedelta = timedelta(hours=3)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"dispatcher: max_attempts is {self.max_attempts} (must be at least 1)")
        if not 0 <= self.jitter_ratio <= 1:
            raise ValueError(f"dispatcher: jitter_ratio is {self.jitter_ratio} (must be between 0 and 1)")


class ScanPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A scan to carry out once the claim is written: the Job name is `scan_id`."""

    scan_id: str
    digest_ref: str
    mode: ScanMode
    node: str | None
    attempt: int
    options: ImageOptions = ImageOptions()


class Decision(msgspec.Struct, frozen=True):
    """The new state (None: write nothing), the scan to start (if any), why, and when to look again."""

    state: DigestScanState | None
    scan: ScanPlan | None
    why: Why
    recheck_at: datetime | None = None


SCAN_ID_PREFIX = "psw-"  # every scan id and every Job name podsweep makes (batches: "psw-b-")


def scan_id_for(digest_ref: str, seq: int) -> str:
    """The scan id and Job name of the seq-th claim on a digest: DNS-1123, from a hash, never from user text."""
    return SCAN_ID_PREFIX + hashlib.sha256(f"{digest_hex(digest_ref)}:{seq}".encode()).hexdigest()[:24]


def batch_id_for(scan_ids: list[str]) -> str:
    """The Job name of an SBOM rescan batch: a hash of its scan ids (order does not matter), so a retried
    creation of the same batch is a 409, not a second Job."""
    joined = "\n".join(sorted(scan_ids))
    return "psw-b-" + hashlib.sha256(joined.encode()).hexdigest()[:24]


def due_at(digest_ref: str, scanned_at: datetime, policy: Policy) -> datetime:
    """When a digest scanned at `scanned_at` comes due: the interval plus a jitter fixed by the digest itself.

    The digest is a uniformly distributed hash, so its leading bits give each digest its own phase: every
    replica computes the same instant, and digests first scanned together come due spread across the window.
    """
    phase = int(digest_hex(digest_ref)[:8], 16) / 0x1_0000_0000
    return scanned_at + policy.rescan_interval * (1 + policy.jitter_ratio * phase)


def backoff(attempts: int, policy: Policy) -> timedelta:
    """Delay before attempt `attempts + 1`: base, 2×base, 4×base … capped."""
    doublings = min(max(attempts - 1, 0), 32)
    delay: timedelta = policy.backoff_base * (1 << doublings)
    return min(delay, policy.backoff_max)


def _sbom_usable(state: DigestScanState, policy: Policy) -> bool:
    if not policy.sbom_rescans or state.sbom_key is None:
        return False
    if policy.sbom_min_trivy_version is None:
        return True
    return _version(state.sbom_trivy_version or "0") >= _version(policy.sbom_min_trivy_version)


def _still_covered(state: DigestScanState, now: datetime, policy: Policy) -> bool:
    """Whether a digest may be rescanned now: a node runs it, or it stopped running less than `rescan_gone_for`
    ago and has a usable SBOM (a scaled-to-zero workload stays covered without any node)."""
    if state.nodes_seen:
        return True
    if not _sbom_usable(state, policy):
        return False
    since = state.not_running_since or state.last_seen_at
    return since is not None and now - since < policy.rescan_gone_for


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.lstrip("v").split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _recent_failures(state: DigestScanState, now: datetime, policy: Policy) -> dict[str, datetime]:
    recent: dict[str, datetime] = {}
    for f in state.failures:
        if now - f.at < policy.failure_memory and f.reason not in NOT_THE_NODE:
            recent[f.node] = max(f.at, recent.get(f.node, f.at))
    return recent


def _claim(
    state: DigestScanState,
    now: datetime,
    policy: Policy,
    active_per_node: Mapping[str, int],
    limits: Limits,
    *,
    why: Why,
    new_cycle: bool,
    options: ImageOptions,
    keep: DigestScanState | None,
    room: bool,
) -> Decision:
    """Claim a new scan of `state`'s digest; or wait, writing `keep`: for a slot (`room` False) or a node."""
    if not room:
        return Decision(keep, None, "limited")
    attempts = 1 if new_cycle else state.attempts + 1
    if why in ("rescan_due", "retry") and _sbom_usable(state, policy):
        mode: ScanMode = "sbom"
        node = None
    else:
        mode = "node"
        node = pick_node(
            state.nodes_seen,
            active_per_node,
            _recent_failures(state, now, policy),
            limits,
            tie_break=digest_hex(state.digest_ref),
        )
        if node is None:
            return Decision(keep, None, "nodes_full", None)
    seq = state.scan_seq + 1
    scan_id = scan_id_for(state.digest_ref, seq)
    claimed = msgspec.structs.replace(
        state,
        status="pending",
        scan_seq=seq,
        scan_id=scan_id,
        node=node,
        attempts=attempts,
        failures=[] if new_cycle else state.failures,
        claim_expires_at=now + policy.claim_ttl,
        reason="",
    )
    plan = ScanPlan(
        scan_id=scan_id, digest_ref=state.digest_ref, mode=mode, node=node, attempt=attempts, options=options
    )
    return Decision(claimed, plan, why, claimed.claim_expires_at)


def _record_failure(
    state: DigestScanState, node: str | None, reason: str, message: str, now: datetime, policy: Policy
) -> DigestScanState:
    """The state after a failed attempt: waiting for a retry with backoff, given up, or not scanned (no node left)."""
    failures = state.failures
    nodes = state.nodes_seen
    if reason in NOT_THE_NODE:  # not an attempt of the scan itself (see NOT_THE_NODE)
        state = msgspec.structs.replace(state, attempts=max(state.attempts - 1, 0))
    if node is not None:
        failures = [*failures, NodeFailure(node=node, reason=reason[:256], at=now)][-policy.max_attempts * 2 :]
        if reason in _NODE_LOST_IMAGE:
            nodes = [n for n in nodes if n != node]
    where = f" on node {node}" if node and reason not in NOT_THE_NODE else ""
    detail = f"{reason}{where}" + (f": {message}" if message else "")
    base = msgspec.structs.replace(
        state,
        failures=failures,
        nodes_seen=nodes,
        claim_expires_at=None,
        # An SBOM rescan that failed by its own fault falls back to a node scan.
        sbom_key=None if node is None and reason in _SBOM_AT_FAULT else state.sbom_key,
    )
    if state.attempts >= policy.max_attempts:
        return msgspec.structs.replace(
            base,
            status="failed",
            next_due_at=now + policy.rescan_interval,
            reason=f"gave up after {state.attempts} attempts; last: {detail}"[:4096],
        )
    if not nodes and not _sbom_usable(base, policy):
        return msgspec.structs.replace(
            base,
            status="not_scanned",
            attempts=0,
            next_due_at=None,
            reason=f"no node runs this digest any more; last attempt failed with {detail}"[:4096],
        )
    if reason in NOT_THE_NODE:
        return msgspec.structs.replace(
            base,
            status="failed",
            next_due_at=now + policy.backoff_base,
            reason=f"{detail}; retrying once scan pods are accepted"[:4096],
        )
    return msgspec.structs.replace(
        base,
        status="failed",
        next_due_at=now + backoff(state.attempts, policy),
        reason=f"attempt {state.attempts} failed with {detail}; retrying"[:4096],
    )


def decide(
    state: DigestScanState,
    now: datetime,
    policy: Policy,
    active_per_node: Mapping[str, int],
    limits: Limits,
    *,
    options: ImageOptions = NO_OPTIONS,
    changed: bool = False,
    room: bool = True,
) -> Decision:
    """What to do now about a digest whose state is `state` (the periodic sweep calls this for every key).

    `changed` says `state` already differs from what is stored (the caller updated it), so it must be written
    even when no scan is planned. `room` False (no global slot or creation left) plans no scan: a claim that
    would only wait for a slot would expire while it waits, and be written again and again.
    """
    if (state.cluster or DEFAULT_CLUSTER) != policy.cluster:
        if not may_take_over(state, now, policy):
            return Decision(state if changed else None, None, "elsewhere")
        state, changed = take_over(state, now, policy), True
    keep = state if changed else None
    expires = state.claim_expires_at
    if state.status in ("pending", "running") and expires is not None and now < expires:
        return Decision(keep, None, "claimed", expires)
    resumable = state.status == "pending" and state.scan_id is not None and state.node in (*state.nodes_seen, None)
    if resumable and not room:
        return Decision(keep, None, "limited")
    if resumable and state.scan_id is not None:
        # An abandoned claim: resume it under the same scan id (slot and Job creation are idempotent by it).
        resumed = msgspec.structs.replace(state, claim_expires_at=now + policy.claim_ttl)
        plan = ScanPlan(
            scan_id=state.scan_id,
            digest_ref=state.digest_ref,
            mode="node" if state.node else "sbom",
            node=state.node,
            attempt=state.attempts,
            options=options,
        )
        return Decision(resumed, plan, "resume_claim", resumed.claim_expires_at)
    if state.status in ("pending", "running"):
        # A running Job outlived its deadline without an event, or a pending claim's node left.
        reason = "DeadlineExceeded" if state.status == "running" else "NodeGone"
        state = _record_failure(state, state.node, reason, "claim expired without a scan event", now, policy)
        keep = state
    if state.status == "done":
        due = state.next_due_at or (due_at(state.digest_ref, state.last_scan_at, policy) if state.last_scan_at else now)
        if now < due:
            return Decision(keep, None, "not_due", due)
        if not _still_covered(state, now, policy):
            return Decision(keep, None, "no_node", None)
        return _claim(
            state,
            now,
            policy,
            active_per_node,
            limits,
            why="rescan_due",
            new_cycle=True,
            options=options,
            keep=keep,
            room=room,
        )
    if state.status == "failed":
        gave_up = state.attempts >= policy.max_attempts
        if state.next_due_at is not None and now < state.next_due_at:
            return Decision(keep, None, "gave_up" if gave_up else "backoff", state.next_due_at)
        if not _still_covered(state, now, policy):
            return Decision(keep, None, "no_node", None)
        return _claim(
            state,
            now,
            policy,
            active_per_node,
            limits,
            why="retry",
            new_cycle=gave_up,
            options=options,
            keep=keep,
            room=room,
        )
    # not_scanned: scan as soon as a node runs the digest.
    if not state.nodes_seen:
        return Decision(keep, None, "no_node", None)
    return _claim(
        state,
        now,
        policy,
        active_per_node,
        limits,
        why="first_scan",
        new_cycle=True,
        options=options,
        keep=keep,
        room=room,
    )


# Decisions that a sighting adding a node (or refreshing `last_seen_at`) cannot change: such a sighting may be held
# and written together with the digest's next ones (sightings.py). A digest waiting for a node with room
# ("nodes_full") or for any node at all is not among them: a new node may let it start now.
HOLDABLE: frozenset[Why] = frozenset({"claimed", "not_due", "backoff", "gave_up", "limited", "elsewhere"})
NODES_LEFT_KEPT = 32


def may_take_over(state: DigestScanState, now: datetime, policy: Policy) -> bool:
    """Whether `policy.cluster` may become the home of a digest another cluster holds: it runs the digest on a node,
    no claim is in flight, and the home runs it nowhere or has not said so for `home_stale`."""
    if (state.cluster or DEFAULT_CLUSTER) == policy.cluster or not state.elsewhere.get(policy.cluster):
        return False
    expires = state.claim_expires_at
    if state.status in ("pending", "running") and expires is not None and now < expires:
        return False
    if not state.nodes_seen:
        return True
    return state.last_seen_at is None or now - state.last_seen_at >= policy.home_stale


def take_over(state: DigestScanState, now: datetime, policy: Policy) -> DigestScanState:
    """`policy.cluster` becomes the digest's home: its noted nodes are the nodes; the old home is forgotten (it runs
    the digest nowhere, or is gone; its next sighting notes it in `elsewhere` again). A claim the old home let expire
    is a failed attempt, retried now (here)."""
    others = {c: n for c, n in state.elsewhere.items() if c != policy.cluster}
    taken = msgspec.structs.replace(
        state,
        cluster=policy.cluster,
        nodes_seen=list(state.elsewhere[policy.cluster]),
        elsewhere=others,
        failures=[],
        nodes_left=[],
        last_seen_at=now,
        not_running_since=None,
    )
    if state.status not in ("pending", "running"):
        return taken
    detail = f"the claim of cluster {state.cluster} expired without a scan event; cluster {policy.cluster} took over"
    return msgspec.structs.replace(
        taken,
        status="failed",
        node=None,
        claim_expires_at=None,
        next_due_at=now,
        reason=detail[:4096],
    )


def _saw_elsewhere(state: DigestScanState, seen: ImageSeen) -> tuple[DigestScanState, bool]:
    """A sighting in a cluster that is not the digest's home: note the node (a few per cluster)."""
    nodes = state.elsewhere.get(seen.cluster, [])
    if seen.node in nodes:
        return state, False
    elsewhere = {**state.elsewhere, seen.cluster: [*nodes, seen.node][-ELSEWHERE_NODES_KEPT:]}
    return msgspec.structs.replace(state, elsewhere=elsewhere), True


def _saw(state: DigestScanState | None, seen: ImageSeen, now: datetime, policy: Policy) -> tuple[DigestScanState, bool]:
    """The state with `seen` recorded (its node, `last_seen_at`), and whether that changed it."""
    if state is None:
        state = DigestScanState(digest_ref=seen.digest_ref, status="not_scanned", cluster=seen.cluster)
        changed = True
    elif state.cluster is None:  # written before fleets: its home is the first cluster to see it now
        state = msgspec.structs.replace(state, cluster=seen.cluster)
        changed = True
    elif state.cluster != seen.cluster:
        return _saw_elsewhere(state, seen)
    else:
        changed = False
    left = next((n for n in state.nodes_left if n.node == seen.node), None)
    if left is not None and left.at >= seen.observed_at:
        return state, changed  # observed before the node's image.gone: it runs there no more
    if seen.node not in state.nodes_seen:
        nodes = [*state.nodes_seen, seen.node][-policy.max_nodes_tracked :]
        remaining = [n for n in state.nodes_left if n.node != seen.node]
        state = msgspec.structs.replace(
            state, nodes_seen=nodes, nodes_left=remaining, last_seen_at=now, not_running_since=None
        )
        changed = True
    elif state.last_seen_at is None or now - state.last_seen_at >= policy.seen_refresh:
        state = msgspec.structs.replace(state, last_seen_at=now)
        changed = True
    if state.status == "not_scanned" and state.reason:
        state = msgspec.structs.replace(state, reason="")
        changed = True
    return state, changed


def on_seen(
    state: DigestScanState | None,
    seen: ImageSeen,
    now: datetime,
    policy: Policy,
    active_per_node: Mapping[str, int],
    limits: Limits,
    *,
    room: bool = True,
) -> Decision:
    """A container runs the digest on `seen.node`: remember the node, then decide (`room`: see `decide`)."""
    return on_sightings(state, (seen,), now, policy, active_per_node, limits, room=room)


def on_sightings(
    state: DigestScanState | None,
    seen: Sequence[ImageSeen],
    now: datetime,
    policy: Policy,
    active_per_node: Mapping[str, int],
    limits: Limits,
    *,
    room: bool = True,
) -> Decision:
    """Several sightings of one digest, in the order they came: remember each node, then decide once."""
    changed = False
    for one in seen:
        state, saw_news = _saw(state, one, now, policy)
        changed = changed or saw_news
    if state is None:
        return Decision(None, None, "stale")  # no sightings
    options = seen[-1].options
    return decide(state, now, policy, active_per_node, limits, options=options, changed=changed, room=room)


def holdable(known: DigestScanState | None, decision: Decision) -> bool:
    """Whether a sighting whose decision on the digest's known state is `decision` may wait to be written with the
    digest's next sightings: nothing it decides starts a scan, and it only records a node (or refreshes
    `last_seen_at`) of a digest that already runs somewhere, or one that waits for a global slot whatever its
    nodes (even its first sighting: the digest is written and parked with its other sightings)."""
    if decision.state is None or decision.scan is not None or decision.why not in HOLDABLE:
        return False
    return decision.why == "limited" or (known is not None and bool(known.nodes_seen))


def on_gone(state: DigestScanState | None, gone: ImageGone, now: datetime, policy: Policy) -> Decision:
    """No container runs the digest on `gone.node` any more: forget the node; with none left, say why not scanned.

    The node is remembered as left (the last few), so a sighting observed earlier and written later does not
    bring it back."""
    if state is None:
        return Decision(None, None, "stale")
    if state.cluster is not None and gone.cluster != state.cluster:
        return _gone_elsewhere(state, gone)
    if gone.node not in state.nodes_seen:
        left = next((n for n in state.nodes_left if n.node == gone.node), None)
        if left is not None and left.at >= gone.observed_at:
            return Decision(None, None, "stale")
    nodes = [n for n in state.nodes_seen if n != gone.node]
    was_running = len(nodes) != len(state.nodes_seen)
    nodes_left = [*(n for n in state.nodes_left if n.node != gone.node), NodeLeft(node=gone.node, at=gone.observed_at)]
    state = msgspec.structs.replace(state, nodes_seen=nodes, nodes_left=nodes_left[-NODES_LEFT_KEPT:])
    if not was_running:
        return Decision(state, None, "recorded")
    if not nodes:
        state = msgspec.structs.replace(state, not_running_since=gone.observed_at, last_seen_at=gone.observed_at)
    if not nodes and _still_covered(state, now, policy) and state.status in ("done", "failed"):
        return Decision(state, None, "recorded", state.next_due_at)
    if not nodes and state.status in ("failed", "not_scanned") and state.attempts < policy.max_attempts:
        state = msgspec.structs.replace(
            state,
            status="not_scanned",
            attempts=0,
            next_due_at=None,
            reason=f"no node runs this digest any more (last on node {gone.node})",
        )
    return Decision(state, None, "recorded")


def _gone_elsewhere(state: DigestScanState, gone: ImageGone) -> Decision:
    """A cluster that is not the digest's home stopped running it on a node: forget the node there."""
    nodes = state.elsewhere.get(gone.cluster, [])
    if gone.node not in nodes:
        return Decision(None, None, "stale")
    kept = [n for n in nodes if n != gone.node]
    elsewhere = {c: n for c, n in state.elsewhere.items() if c != gone.cluster}
    if kept:
        elsewhere[gone.cluster] = kept
    return Decision(msgspec.structs.replace(state, elsewhere=elsewhere), None, "recorded")


def on_created(state: DigestScanState | None, scan_id: str, now: datetime, policy: Policy) -> DigestScanState | None:
    """The Job for `scan_id` exists: the claim is now `running` until the Job deadline plus grace."""
    if state is None or state.scan_id != scan_id or state.status != "pending":
        return None
    return msgspec.structs.replace(
        state, status="running", claim_expires_at=now + policy.job_deadline + policy.deadline_grace
    )


def on_sbom_stored(state: DigestScanState | None, stored: ReportStored) -> DigestScanState | None:
    """The state with the SBOM the parser kept for the digest (what its rescans read). None when the digest has no
    state, the event names no SBOM, or nothing changes."""
    if state is None or stored.sbom_key is None:
        return None
    if state.sbom_key == stored.sbom_key and state.sbom_trivy_version == stored.sbom_trivy_version:
        return None
    return msgspec.structs.replace(state, sbom_key=stored.sbom_key, sbom_trivy_version=stored.sbom_trivy_version)


def abandons(old: DigestScanState, decision: Decision) -> bool:
    """Whether the decision gives up the node scan `old` claimed (its claim expired without a scan event)."""
    new = decision.state
    return (
        old.status in ("pending", "running")
        and old.node is not None
        and new is not None
        and (new.scan_id != old.scan_id or new.status not in ("pending", "running"))
    )


def on_started(state: DigestScanState | None, started: ScanStarted, policy: Policy) -> DigestScanState | None:
    """The watcher saw the Job's pod start: the same as `on_created`, from the Job's own start time."""
    return on_created(state, started.scan_id, started.started_at, policy)


def on_completed(state: DigestScanState | None, done: ScanCompleted, policy: Policy) -> Decision:
    """The scan finished and uploaded: done, next due after the interval and this digest's jitter."""
    if state is None or state.scan_id != done.scan_id or state.status not in ("pending", "running"):
        return Decision(None, None, "stale")
    # `attempts` stays: a report the parser then finds missing or unreadable is a failed attempt of this cycle
    # (on_quarantined); the next rescan starts a new cycle from 1.
    finished = msgspec.structs.replace(
        state,
        status="done",
        failures=[],
        claim_expires_at=None,
        last_scan_at=done.finished_at,
        next_due_at=due_at(state.digest_ref, done.finished_at, policy),
        reason="",
    )
    return Decision(finished, None, "recorded", finished.next_due_at)


def on_failed(
    state: DigestScanState | None,
    failed: ScanFailed,
    now: datetime,
    policy: Policy,
    active_per_node: Mapping[str, int],
    limits: Limits,
    *,
    room: bool = True,
) -> Decision:
    """The scan failed: record it against its node, then retry elsewhere after backoff, or give up, or say why not."""
    if state is None or state.scan_id != failed.scan_id or state.status not in ("pending", "running"):
        return Decision(None, None, "stale")
    node = failed.node if failed.node is not None else state.node
    recorded = _record_failure(state, node, failed.reason, failed.message[:200], now, policy)
    return decide(recorded, now, policy, active_per_node, limits, changed=True, room=room)


def on_quarantined(
    state: DigestScanState | None,
    quarantined: ReportQuarantined,
    now: datetime,
    policy: Policy,
    active_per_node: Mapping[str, int],
    limits: Limits,
    *,
    room: bool = True,
) -> Decision:
    """The parser found no usable report for the scan (missing, unreadable): the scan failed after all. Recorded
    like a scan.failed (backoff, retry, the attempt limit), whether it comes before or after the scan.completed.

    Only the report counts: an SBOM that could not be used leaves the scan's report standing."""
    if quarantined.object != "report" or state is None or state.scan_id != quarantined.scan_id:
        return Decision(None, None, "stale")
    if state.status not in ("pending", "running", "done"):
        return Decision(None, None, "stale")
    reason = "ReportMissing" if quarantined.kind == "missing" else "ReportUnreadable"
    message = quarantined.reason if quarantined.kind == "missing" else f"{quarantined.kind}: {quarantined.reason}"
    recorded = _record_failure(state, state.node, reason, message[:200], now, policy)
    return decide(recorded, now, policy, active_per_node, limits, changed=True, room=room)


def confirm_batch_item(
    state: DigestScanState | None, scan_id: str, claimed_until: datetime | None, now: datetime, policy: Policy
) -> DigestScanState | None:
    """Renew this replica's claim on an SBOM rescan about to join a batch Job; None drops it from the batch.

    The claim must still be the one this replica wrote (same scan id, same expiry): a claim another replica
    resumed after it expired carries the same scan id but a new expiry, so two replicas never batch one digest.
    Written with compare-and-set like every claim.
    """
    if state is None or state.status != "pending" or state.scan_id != scan_id or state.node is not None:
        return None
    if state.claim_expires_at != claimed_until:
        return None
    return msgspec.structs.replace(state, claim_expires_at=now + policy.claim_ttl)


def rescannable_from_sbom(state: DigestScanState, now: datetime, policy: Policy) -> bool:
    """Whether a new vulnerability DB makes this digest due here: this cluster is its home (in a fleet each
    cluster's dispatcher hears of the update and makes its own digests due), it has a usable SBOM and is still
    covered (a node runs it, or it stopped less than `rescan_gone_for` ago). Digests without one keep their due
    time: a DB update never causes node scans (`podsweep rescan --all` does)."""
    home = (state.cluster or DEFAULT_CLUSTER) == policy.cluster
    return home and _sbom_usable(state, policy) and _still_covered(state, now, policy)


RescanAnswer = Literal["made_due", "in_flight", "not_covered"]


def make_due(state: DigestScanState, now: datetime, policy: Policy) -> tuple[DigestScanState | None, RescanAnswer]:
    """A forced rescan (`podsweep rescan`): move the digest's due time to now. Limits and claims still apply.

    A claim in flight already rescans it; a digest no node runs and with no SBOM that may still be used cannot be
    rescanned at all. A digest waiting in backoff or given up is made due too (an operator asked).
    """
    if state.status in ("pending", "running"):
        return None, "in_flight"
    if not _still_covered(state, now, policy):
        return None, "not_covered"
    if state.status == "not_scanned":
        return None, "made_due"  # scanned as soon as a node can take it
    if state.next_due_at is not None and state.next_due_at <= now:
        return None, "made_due"
    if state.status == "failed":
        return msgspec.structs.replace(state, next_due_at=now, attempts=0), "made_due"
    return msgspec.structs.replace(state, next_due_at=now), "made_due"
