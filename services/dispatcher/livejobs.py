"""The scan Jobs that exist when a dispatcher starts leading: which still count against the limits, which to delete.

The limiter's document can lag the cluster (a restart after the NATS store was lost, a replica killed between the
Job's creation and its slot's release): every unfinished Job is counted again, so the limits hold for the Jobs that
are really there. A node scan Job whose scan is no longer the digest's claim is deleted. Pure: the shell lists the
Jobs and reads the states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import msgspec

from schemas import jobs
from schemas.refs import DigestRef
from schemas.state import DigestScanState, LimiterState, Slot
from services.dispatcher.plan import SCAN_ID_PREFIX


class _Meta(msgspec.Struct, frozen=True, rename="camel"):
    name: str = ""
    creation_timestamp: datetime | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class _Condition(msgspec.Struct, frozen=True):
    type: str = ""
    status: str = ""


class _Status(msgspec.Struct, frozen=True):
    conditions: list[_Condition] = []


class ExistingJob(msgspec.Struct, frozen=True):
    """The parts of a scan Job this module reads."""

    metadata: _Meta = _Meta()
    status: _Status = _Status()


class _JobList(msgspec.Struct, frozen=True):
    items: list[ExistingJob] | None = None
    metadata: dict[str, str | int] = {}


_list = msgspec.json.Decoder(_JobList)
_FINISHED = frozenset({"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"})


def decode_page(data: bytes) -> tuple[list[ExistingJob], str]:
    """(Jobs, continue token) of one list page."""
    page = _list.decode(data)
    token = page.metadata.get("continue", "")
    return page.items or [], str(token)


class Reconciled(msgspec.Struct, frozen=True):
    count: list[Slot]  # unfinished Jobs to count against the limits
    delete: list[str]  # unfinished node scan Jobs no claim wants any more


def finished(job: ExistingJob) -> bool:
    return any(c.status == "True" and c.type in _FINISHED for c in job.status.conditions)


def digest_of(job: ExistingJob) -> str | None:
    """The digest a node scan Job scans (validated), or None for a batch or a Job whose annotation is not a digest."""
    annotations = job.metadata.annotations
    if annotations.get(jobs.MODE_ANNOTATION, "node") != "node":
        return None
    try:
        return msgspec.convert(annotations.get(jobs.DIGEST_REF_ANNOTATION), DigestRef)
    except msgspec.ValidationError:
        return None


def reconcile(
    found: Sequence[ExistingJob], states: Mapping[str, DigestScanState | None], now: datetime, lifetime: timedelta
) -> Reconciled:
    """`states`: each node scan Job's digest ref -> its scan state. A slot lasts `lifetime` from the Job's creation
    (the Job's deadline plus grace), as if it had been taken then."""
    count: list[Slot] = []
    delete: list[str] = []
    for job in found:
        name = job.metadata.name
        if finished(job) or not name.startswith(SCAN_ID_PREFIX):
            continue
        ref = digest_of(job)
        if ref is not None:
            state = states.get(ref)
            scan_id = job.metadata.labels.get(jobs.SCAN_ID_LABEL)
            if state is None or state.scan_id != scan_id or state.status not in ("pending", "running"):
                delete.append(name)
                continue
        node = job.metadata.annotations.get(jobs.NODE_ANNOTATION) if ref is not None else None
        deadline = (job.metadata.creation_timestamp or now) + lifetime
        if deadline > now:
            count.append(Slot(scan_id=name[:63], node=node[:253] if node else None, deadline=deadline))
    return Reconciled(count, delete)


def adopt(state: LimiterState, slots: Sequence[Slot]) -> LimiterState | None:
    """The limiter with a slot for each Job it does not count yet (whatever the limits: the Jobs exist); None when
    it counts them all. Adopted slots are not creations: the per-minute window is about what podsweep does now."""
    held = {s.scan_id for s in state.slots}
    missing = [s for s in slots if s.scan_id not in held]
    if not missing:
        return None
    return msgspec.structs.replace(state, slots=[*state.slots, *missing])
