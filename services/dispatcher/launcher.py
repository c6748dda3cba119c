"""Creates scan Jobs (one per node scan, one per SBOM rescan batch) and deletes those given up on; while the API
server refuses scan pods it holds creations (rejections.py says how many may start).

Decides no scan (plan.py does) and builds no Job itself (jobspec.py does). Its only I/O is the API request and the
URL signer it is given, so tests drive it with stand-ins. It never writes scan states or the limiter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from podsweep import logs, telemetry
from podsweep.config import ParserSettings
from podsweep.kube import KubeError
from schemas import jobs, storage
from schemas.events import ScanFailed
from schemas.state import DigestScanState
from schemas.storage import StorageKey
from services.dispatcher import jobspec, plan, rejections
from services.dispatcher.batching import Gathered
from services.dispatcher.plan import ScanPlan
from services.dispatcher.settings import Configured

log = logs.get("podsweep.dispatcher")
tracer = trace.get_tracer("podsweep.dispatcher")
meter = metrics.get_meter("podsweep.dispatcher")
jobs_created = meter.create_counter("podsweep_dispatcher_jobs_created", description="Scan Jobs created, by mode")
jobs_deleted = meter.create_counter(
    "podsweep_dispatcher_jobs_deleted", description="Scan Jobs deleted after their scan failed or was abandoned"
)

# created; exists (a repeated step: 409); refused (the API will refuse this Job every time: the scan failed)
Created = Literal["created", "exists", "refused"]


class Request(Protocol):
    async def __call__(self, method: str, path: str, *, body: bytes) -> Any: ...


class Signer(Protocol):
    def presign_upload(self, key: StorageKey, expires_s: int, max_bytes: int) -> str: ...

    def presign_get(self, key: StorageKey, expires_s: int) -> str: ...


class Launcher:
    """The scan Jobs of one namespace, and the hold on creating them while their pods are refused."""

    def __init__(self, cfg: Configured, parser: ParserSettings, request: Request, signer: Signer) -> None:
        self.cfg = cfg
        self.parser = parser
        self.request = request
        self.signer = signer
        self.jobs_path = f"/apis/batch/v1/namespaces/{cfg.jobs.namespace}/jobs"
        self.hold: rejections.Hold | None = None  # while the API server refuses scan pods (PodCreateRejected)

    # -- the Jobs --------------------------------------------------------------------------------------------------

    def node_scan(self, scan: ScanPlan) -> jobspec.Manifest:
        """The Job for a claimed node scan, with upload URLs for its keys, bounded in size, that last its deadline."""
        if scan.mode == "sbom" or scan.node is None:
            raise ValueError("a node scan was planned without a node")
        raw_url = self._upload_url(storage.raw_key(scan.digest_ref, scan.scan_id), self.parser.max_report_mb)
        sbom_key = storage.sbom_key(scan.digest_ref, scan.scan_id)
        sbom_url = self._upload_url(sbom_key, self.parser.max_sbom_mb) if self.cfg.jobs.sbom else None
        node_scan = jobspec.validated_node_scan(
            scan_id=scan.scan_id,
            digest_ref=scan.digest_ref,
            node=scan.node,
            raw_put_url=raw_url,
            sbom_put_url=sbom_url,
            ignore_unfixed=scan.options.ignore_unfixed,
        )
        return jobspec.build_node_scan_job(node_scan, self.cfg.jobs)

    def sbom_rescan(self, batch_id: str, confirmed: Sequence[tuple[Gathered, DigestScanState]]) -> jobspec.Manifest:
        """The rescan Job: per digest a presigned GET of its stored SBOM and a presigned PUT for its report."""
        expires = self._url_lifetime_s()
        items = [
            {
                "scan_id": item.scan.scan_id,
                "digest_ref": item.scan.digest_ref,
                "sbom_get_url": self.signer.presign_get(storage.checked_key(state.sbom_key or ""), expires),
                "raw_put_url": self._upload_url(
                    storage.raw_key(item.scan.digest_ref, item.scan.scan_id), self.parser.max_report_mb
                ),
            }
            for item, state in confirmed
        ]
        batch = msgspec.convert({"batch_id": batch_id, "items": items}, jobspec.SbomRescan)
        return jobspec.build_sbom_rescan_job(batch, self.cfg.jobs)

    def _url_lifetime_s(self) -> int:
        return jobspec.url_lifetime_s(self.cfg.jobs, self.cfg.policy.deadline_grace)

    def _upload_url(self, key: StorageKey, max_mb: float) -> str:
        return self.signer.presign_upload(key, self._url_lifetime_s(), int(max_mb * 1024 * 1024))

    async def create(
        self,
        manifest: jobspec.Manifest,
        *,
        slot_id: str,
        mode: str,
        now: datetime,
        span_name: str,
        attributes: Mapping[str, str | int] | None = None,
    ) -> tuple[Created, int]:
        """POST the Job (with the current trace on it) and the HTTP status. 409 means it exists already (a repeated
        step); a 4xx the API will answer every time (invalid, forbidden, no namespace) is `refused`. A transient
        failure (5xx, 408, 429) raises KubeError."""
        with tracer.start_as_current_span(span_name, kind=SpanKind.CLIENT) as span:
            for name, value in (attributes or {}).items():
                span.set_attribute(name, value)
            carried = telemetry.traceparent()  # the watcher's scan.* events continue this trace from it
            if carried is not None:
                manifest["metadata"]["annotations"][jobs.TRACEPARENT_ANNOTATION] = carried
            try:
                await self.request("POST", self.jobs_path, body=msgspec.json.encode(manifest))
            except KubeError as exc:
                if exc.status == 409:
                    span.set_attribute("podsweep.job_existed", True)
                    return "exists", exc.status
                span.set_status(Status(StatusCode.ERROR, f"HTTP {exc.status}"))
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    return "refused", exc.status
                raise
        jobs_created.add(1, {"mode": mode})
        self.hold = rejections.probing(self.hold, slot_id, now) or self.hold
        return "created", 201

    async def delete(self, name: str) -> bool:
        """Delete a scan Job and (in the background, by the garbage collector) its pods; True once it is gone (or
        was). False when this dispatcher may not delete Jobs (said once per Job, with what to apply)."""
        if not name.startswith(plan.SCAN_ID_PREFIX):  # only names podsweep gives its Jobs, whatever an event says
            return True
        try:
            await self.request(
                "DELETE", f"{self.jobs_path}/{name}", body=msgspec.json.encode({"propagationPolicy": "Background"})
            )
        except KubeError as exc:
            if exc.status == 404:
                return True
            if exc.status in (401, 403):
                log.warning(
                    "scan Job not deleted: this dispatcher may not delete Jobs",
                    job=name,
                    namespace=self.cfg.jobs.namespace,
                    what_to_do="grant delete on jobs.batch there (deploy/base/rbac-dispatcher.yaml)",
                )
                return False
            raise
        jobs_deleted.add(1)
        log.info("scan Job deleted", job=name)
        return True

    # -- the hold while scan pods are refused ----------------------------------------------------------------------

    def allowance(self, now: datetime) -> int | None:
        """How many new Jobs may start now (None: only the limits say)."""
        return rejections.allowance(self.hold, now)

    def pods_refused(self, failed: ScanFailed, now: datetime) -> None:
        policy = self.cfg.policy
        hold = rejections.rejected(
            self.hold, failed.scan_id, failed.message, now, policy.backoff_base, policy.backoff_max
        )
        if hold is None:
            return
        first = self.hold is None
        self.hold = hold
        if first:  # said once; a refused probe only moves the next one
            log.warning(
                "scan pods are refused by the API server: no new scan Jobs until one is accepted",
                namespace=self.cfg.jobs.namespace,
                message=failed.message[:500],
                what_to_do="apply what the message names (deploy/base: the scan ServiceAccount, the namespace's "
                "quota or Pod Security labels); podsweep tries one scan Job at a time meanwhile",
            )
        else:
            log.info("scan pods still refused", rejections=hold.rejections, next_probe=hold.until.isoformat())

    def failed_otherwise(self, scan_id: str) -> None:
        """A scan failed for another reason than its pod refused: if it was the probe, the next Job probes."""
        self.hold = rejections.failed_otherwise(self.hold, scan_id) or self.hold

    def pods_accepted(self) -> bool:
        """A scan pod was created: a hold on creations ends. True when one did (Jobs may start again)."""
        if self.hold is None:
            return False
        log.warning("scan pods are accepted again: scan Jobs resume", refused_since=self.hold.since.isoformat())
        self.hold = None
        return True
