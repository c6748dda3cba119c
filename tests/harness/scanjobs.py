"""Plays the watcher's part for scan Jobs in dispatcher tests and benchmarks: watches one namespace's Jobs, records
the most active at once (globally and per node), and publishes scan.completed / scan.failed when a Job finishes.

Test code only. A Job counts as active from the first time it is seen until it is seen finished; its finish event is
published after that, so a dispatcher that frees slots only on those events can be held to its limits here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from podsweep import bus as busmod
from podsweep import logs
from podsweep.kube import Kube
from schemas import jobs, subjects
from schemas.events import FailureReason, ScanCompleted, ScanFailed

log = logs.get("tests.scanjobs")


class _Kube(msgspec.Struct, frozen=True, rename="camel"):
    pass


class JobMeta(_Kube, frozen=True):
    name: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class JobCondition(_Kube, frozen=True):
    type: str
    status: str
    reason: str = ""


class JobStatus(_Kube, frozen=True):
    conditions: list[JobCondition] = []


class Job(msgspec.Struct, frozen=True):
    metadata: JobMeta
    status: JobStatus = JobStatus()

    def finished(self) -> JobCondition | None:
        return next(
            (c for c in self.status.conditions if c.type in ("Complete", "Failed") and c.status == "True"), None
        )


class ListMeta(_Kube, frozen=True):
    resource_version: str = ""


class JobList(msgspec.Struct, frozen=True):
    metadata: ListMeta
    items: list[Job]


class JobEvent(msgspec.Struct, frozen=True):
    type: str
    object: Job | None = None


_list_decoder = msgspec.json.Decoder(JobList)
_event_decoder = msgspec.json.Decoder(JobEvent)


@dataclass(frozen=True)
class SeenJob:
    name: str
    scan_id: str
    digest_ref: str
    node: str | None
    mode: str
    raw_key: str
    sbom_key: str | None
    seen_at: float


# Decides how a finished Job is reported: None for scan.completed, a reason for scan.failed.
Verdict = Callable[[SeenJob], FailureReason | None]


@dataclass
class ScanJobObserver:
    client: Kube
    namespace: str
    bus: busmod.Bus
    cluster: str = "default"
    verdict: Verdict = lambda _job: None
    jobs: dict[str, SeenJob] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)  # job name -> "completed" or the failure reason
    active: set[str] = field(default_factory=set)
    active_per_node: Counter[str] = field(default_factory=Counter)
    max_active: int = 0
    max_active_per_node: int = 0
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="scan-job-observer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def jobs_for(self, digest_ref: str) -> list[SeenJob]:
        return sorted((j for j in self.jobs.values() if j.digest_ref == digest_ref), key=lambda j: j.seen_at)

    def digests_with_jobs(self) -> Counter[str]:
        return Counter(j.digest_ref for j in self.jobs.values())

    async def wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s ({len(self.jobs)} Jobs seen)")
            await asyncio.sleep(0.1)

    async def _watch(self) -> None:
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        selector: dict[str, str | int | bool] = {"labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}"}
        while True:
            try:
                listing = _list_decoder.decode(await self.client.get(path, selector))
                for job in listing.items:
                    await self._observe(job, deleted=False)
                params = {**selector, "resourceVersion": listing.metadata.resource_version, "timeoutSeconds": 60}
                async for line in self.client.watch(path, params, 70):
                    event = _event_decoder.decode(line)
                    if event.type == "ERROR" or event.object is None:
                        break
                    await self._observe(event.object, deleted=event.type == "DELETED")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a dropped watch: list again
                log.warning("job observer watch broke, listing again", error=str(error)[:200])
                await asyncio.sleep(0.2)

    async def _observe(self, job: Job, *, deleted: bool) -> None:
        name = job.metadata.name
        if name not in self.jobs:
            annotations = job.metadata.annotations
            seen = SeenJob(
                name=name,
                scan_id=job.metadata.labels.get(jobs.SCAN_ID_LABEL, name),
                digest_ref=annotations.get(jobs.DIGEST_REF_ANNOTATION, ""),
                node=annotations.get(jobs.NODE_ANNOTATION),
                mode=annotations.get(jobs.MODE_ANNOTATION, "node"),
                raw_key=annotations.get(jobs.RAW_KEY_ANNOTATION, ""),
                sbom_key=annotations.get(jobs.SBOM_KEY_ANNOTATION),
                seen_at=time.monotonic(),
            )
            self.jobs[name] = seen
            if name in self.finished:
                return
            self.active.add(name)
            if seen.node:
                self.active_per_node[seen.node] += 1
                self.max_active_per_node = max(self.max_active_per_node, self.active_per_node[seen.node])
            self.max_active = max(self.max_active, len(self.active))
        seen = self.jobs[name]
        condition = job.finished()
        if name not in self.active or (condition is None and not deleted):
            return
        self.active.discard(name)
        if seen.node:
            self.active_per_node[seen.node] -= 1
        if condition is None:  # deleted while it ran: nothing to report
            self.finished[name] = "deleted"
            return
        now = datetime.now(UTC)
        reason: FailureReason | None
        if condition.type == "Failed":
            reason = "DeadlineExceeded" if condition.reason == "DeadlineExceeded" else "ScanError"
        else:
            reason = self.verdict(seen)
        common = {
            "cluster": self.cluster,
            "scan_id": seen.scan_id,
            "digest_ref": seen.digest_ref,
            "mode": seen.mode,
            "node": seen.node,
            "job": name,
        }
        if reason is None:
            completed = msgspec.convert(
                {**common, "raw_key": seen.raw_key, "sbom_key": seen.sbom_key, "finished_at": now}, ScanCompleted
            )
            await self.bus.publish(subjects.SCAN_COMPLETED, completed, msg_id=f"completed:{name}")
            self.finished[name] = "completed"
        else:
            failed = msgspec.convert({**common, "reason": reason, "failed_at": now}, ScanFailed)
            await self.bus.publish(subjects.SCAN_FAILED, failed, msg_id=f"failed:{name}")
            self.finished[name] = reason
