"""Which workloads run a digest: a pure update of the DigestWorkloads KV document from `image.seen` events.

One document per digest for the whole fleet: a run is one workload of one cluster, so the same digest run in two
clusters keeps both clusters' workloads.

The parser writes it (for the per-namespace index); the notifier and admission read it. Writes are rare on
purpose: a resync that only confirms what is known changes nothing until the last-seen time is an hour old.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from schemas.events import ImageSeen
from schemas.state import DigestWorkloads, WorkloadRun

MAX_RUNS = 256  # a digest run by more workloads keeps the most recently seen ones
MAX_CONTAINERS = 16  # container names kept per workload and image
REFRESH = timedelta(hours=1)


def _identity(run: WorkloadRun, cluster: str | None) -> tuple[str, str, str, str, str]:
    """A run is one workload of one cluster running the image; a run written before fleets (no cluster) is taken to
    be of the cluster that sees it now (it is rewritten with that cluster)."""
    return (run.cluster or cluster or "", run.namespace, run.workload.kind, run.workload.name, run.image)


def record_seen(doc: DigestWorkloads | None, seen: ImageSeen) -> DigestWorkloads | None:
    """The document with this sighting recorded, or None when nothing worth writing changed."""
    run = WorkloadRun(
        namespace=seen.namespace,
        workload=seen.workload,
        image=seen.image,
        options=seen.options,
        last_seen_at=seen.observed_at,
        cluster=seen.cluster,
        containers=[seen.container],
    )
    runs = list(doc.runs) if doc else []
    for i, known in enumerate(runs):
        if _identity(known, seen.cluster) != _identity(run, seen.cluster):
            continue
        known_container = seen.container in known.containers
        fresh = known.last_seen_at is not None and seen.observed_at - known.last_seen_at < REFRESH
        if (
            known.cluster is not None
            and known.options == run.options
            and known_container
            and (fresh or (known.last_seen_at or seen.observed_at) > seen.observed_at)
        ):
            return None
        containers = sorted({*known.containers, seen.container})[:MAX_CONTAINERS]
        latest = max(known.last_seen_at or seen.observed_at, seen.observed_at)  # an older sighting adds a container
        runs[i] = run = msgspec.structs.replace(run, containers=containers, last_seen_at=latest)
        break
    else:
        runs.append(run)
    runs.sort(key=lambda r: r.last_seen_at or datetime.min.replace(tzinfo=seen.observed_at.tzinfo), reverse=True)
    return DigestWorkloads(digest_ref=seen.digest_ref, runs=runs[:MAX_RUNS])


def adds_run(doc: DigestWorkloads | None, seen: ImageSeen) -> bool:
    """Whether `seen` is a workload (of its cluster) not recorded as running the digest: its report, if there is
    one, has not been decided for it yet."""
    runs = doc.runs if doc is not None else []
    wanted = (seen.cluster, seen.namespace, seen.workload.kind, seen.workload.name)
    return not any((r.cluster or seen.cluster, r.namespace, r.workload.kind, r.workload.name) == wanted for r in runs)


def forget_older_than(doc: DigestWorkloads, cutoff: datetime) -> DigestWorkloads | None:
    """Drop runs not seen since `cutoff` (a workload deleted long ago); None when nothing was dropped."""
    kept = [r for r in doc.runs if r.last_seen_at is None or r.last_seen_at >= cutoff]
    return None if len(kept) == len(doc.runs) else msgspec.structs.replace(doc, runs=kept)
