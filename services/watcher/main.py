"""The watcher: podsweep's only reader of the Kubernetes API. Pods become image.seen / image.gone; podsweep's own
scan Jobs become scan.started / scan.completed / scan.failed.

A thin shell: services/watcher/reflector.py lists and watches, the pure modules (podstate, owners, annotations,
jobstatus) decide, this module resolves owners with cached metadata-only GETs and publishes. Never writes to
Kubernetes, never touches S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import msgspec
from opentelemetry import metrics, trace

from podsweep import aio, logs, runtime, telemetry
from podsweep import bus as busmod
from podsweep.config import Settings, WatcherSettings
from podsweep.health import HEALTH
from podsweep.kube import METADATA, METADATA_LIST, METADATA_WATCH, Kube, KubeError
from podsweep.natsaccess import NatsAccess
from podsweep.service import Service, open_service
from schemas import jobs, subjects
from schemas.events import ImageGone, ImageSeen, ScanCompleted, ScanFailed, ScanStarted, Workload
from services.watcher import annotations as podannotations
from services.watcher import jobstatus, owners, podstate
from services.watcher.kubeobjects import (
    APIResourceList,
    Codec,
    Job,
    KubeEvent,
    PartialObjectMetadata,
    Pod,
    ScanPod,
    decode_api_resources,
    decode_owner,
)
from services.watcher.reflector import Changed, ListDone, ListPage, ListStarted, Observation, reflect

T = TypeVar("T")
SERVICE = "watcher"
# What it does on NATS (podsweep/natsaccess.py): deploy/base/nats/accounts.conf is generated from this.
NATS = NatsAccess(
    service=SERVICE,
    publishes=(
        subjects.IMAGE_SEEN,
        subjects.IMAGE_GONE,
        subjects.SCAN_STARTED,
        subjects.SCAN_COMPLETED,
        subjects.SCAN_FAILED,
    ),
)
log = logs.get("podsweep.watcher")
tracer = trace.get_tracer("podsweep.watcher")
meter = metrics.get_meter("podsweep.watcher")
owner_lookups = meter.create_counter("podsweep_watcher_owner_lookups", description="Owner metadata GETs (cache misses)")

# Kinds whose metadata is listed at each pod (re)list, so the owner walk of 50k pods costs a few dozen list pages,
# not one GET per distinct owner. Other kinds are GET on demand.
PREFETCH = (
    ("apps", "v1", "replicasets"),
    ("batch", "v1", "jobs"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("apps", "v1", "daemonsets"),
    ("batch", "v1", "cronjobs"),
)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# The Job controller's event when the API server refuses a Job's pod (admission: ServiceAccount, quota, Pod Security).
FAILED_CREATE: dict[str, str | int | bool] = {"fieldSelector": "involvedObject.kind=Job,reason=FailedCreate"}
# A scan Job that started this long ago and has no pod fails as PodCreateRejected even without its FailedCreate event
# (events expire after an hour, and a watcher without RBAC on events never sees one); looked at this often.
PODLESS_AFTER = timedelta(minutes=2)
PODLESS_CHECK_S = 30.0

_pod_codec: Codec[Pod] = Codec(Pod)
_job_codec: Codec[Job] = Codec(Job)
_scan_pod_codec: Codec[ScanPod] = Codec(ScanPod)
_meta_codec: Codec[PartialObjectMetadata] = Codec(PartialObjectMetadata)
_event_codec: Codec[KubeEvent] = Codec(KubeEvent)


def _now() -> datetime:
    return datetime.now(UTC)


def _subject(event: ImageSeen | ImageGone) -> str:
    return subjects.IMAGE_SEEN if isinstance(event, ImageSeen) else subjects.IMAGE_GONE


# A pod's namespace and its controller reference (apiVersion, kind, name, uid).
ControllerKey = tuple[str, str, str, str, str]


def _workload_key(pod: Pod) -> ControllerKey | None:
    """The key of the pod's controller reference in Owners.workloads; None for a pod without a controller."""
    ref = owners.controller_of(pod.metadata.owner_references)
    return None if ref is None else (pod.metadata.namespace, ref.api_version, ref.kind, ref.name, ref.uid)


class Owners:
    """Owner metadata by (group, plural, namespace, name), filled by prefetched lists and cached GETs; and each
    controller reference's walk result, so the replicas of one workload cost one walk."""

    def __init__(self, kube: Kube, concurrency: int) -> None:
        self.kube = kube
        self.cache: dict[tuple[str, str, str, str], PartialObjectMetadata | None] = {}
        # None: the walk stops at the pod itself (controlled by a Node, invalid reference), whatever its name.
        self.workloads: dict[ControllerKey, Workload | None] = {}
        # One GET per owner even when a page's pods (500 replicas of one Deployment) miss the cache at once.
        self.in_flight: dict[tuple[str, str, str, str], asyncio.Future[PartialObjectMetadata | None]] = {}
        self.discovery: dict[str, APIResourceList] = {}
        self.limit = asyncio.Semaphore(concurrency)

    async def prefetch(self) -> None:
        self.workloads.clear()  # walked again from the fresh lists: an owner may have changed since
        for group, version, plural in PREFETCH:
            path = f"/apis/{group}/{version}/{plural}"
            token = ""
            listed: set[tuple[str, str, str, str]] = set()
            try:
                while True:
                    params: dict[str, str | int | bool] = {"limit": 500}
                    if token:
                        params["continue"] = token
                    items, token, _ = _meta_codec.decode_page(await self.kube.get(path, params, accept=METADATA_LIST))
                    for item in items:
                        key = (group, plural, item.metadata.namespace, item.metadata.name)
                        self.cache[key] = item
                        listed.add(key)
                    if not token:
                        break
            except KubeError as exc:  # forbidden or not served: the walk falls back to GETs
                log.info("owner prefetch skipped", resource=plural, status=exc.status)
                continue
            # A complete list is the whole kind: owners deleted since the last one (or not found then) are dropped.
            for key in [k for k in self.cache if k[0] == group and k[1] == plural and k not in listed]:
                del self.cache[key]

    def known(self, pod: Pod) -> Workload | None:
        """The pod's workload when no API call is needed (no controller, or its controller already walked)."""
        key = _workload_key(pod)
        if key is None:
            return Workload("Pod", pod.metadata.name)
        if key not in self.workloads:
            return None
        return self.workloads[key] or Workload("Pod", pod.metadata.name)

    async def workload(self, pod: Pod) -> Workload:
        meta = pod.metadata
        step = owners.start(meta.namespace, meta.name, meta.owner_references)
        key = _workload_key(pod)
        if isinstance(step, owners.Resolved):
            if key is not None:
                self.workloads[key] = None
            return step.workload
        while isinstance(step, owners.OwnerLookup):
            if step.plural is None:
                step = owners.with_plural(step, await self._discover(step))
                continue
            found = await self._get(step, refresh=False)
            if found is not None and owners.is_stale(step, found):
                found = await self._get(step, refresh=True)
            step = owners.advance(step, found)
        if key is not None:
            self.workloads[key] = step.workload
        return step.workload

    async def _get(self, lookup: owners.OwnerLookup, refresh: bool) -> PartialObjectMetadata | None:
        key = (lookup.group, lookup.plural or "", lookup.namespace, lookup.name)
        if not refresh and key in self.cache:
            return self.cache[key]
        pending = self.in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)  # a refresh already under way counts as one too
        future: asyncio.Future[PartialObjectMetadata | None] = asyncio.get_running_loop().create_future()
        self.in_flight[key] = future
        try:
            async with self.limit:
                owner_lookups.add(1, {"kind": lookup.kind})
                try:
                    found = decode_owner(await self.kube.get(lookup.path(), accept=METADATA))
                except KubeError as exc:
                    if exc.status not in (403, 404):
                        raise
                    found = None
            self.cache[key] = found
            future.set_result(found)
            return found
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it as unhandled
            raise
        finally:
            del self.in_flight[key]

    async def _discover(self, lookup: owners.OwnerLookup) -> APIResourceList:
        path = lookup.discovery_path()
        if path not in self.discovery:
            try:
                self.discovery[path] = decode_api_resources(await self.kube.get(path))
            except KubeError:
                self.discovery[path] = APIResourceList()
        return self.discovery[path]


class Watcher:
    def __init__(self, service: Service, kube: Kube) -> None:
        settings = service.settings
        self.service = service
        self.settings = settings.watcher
        self.kube = kube
        self.index = podstate.Index(settings.cluster)
        self.owners = Owners(kube, self.settings.owner_lookup_concurrency)
        self.filter = podannotations.filter_from(self.settings.include_namespaces, self.settings.exclude_namespaces)
        self.scan_namespace = settings.namespace
        self.job_phase: dict[str, jobstatus.Phase] = {}
        self.jobs: dict[str, Job] = {}
        self.scan_pods: dict[str, dict[str, ScanPod]] = {}  # job name -> pod name -> pod
        # Nodes known to exist, and nodes known to be gone (seen deleted, or missing from a complete list). A node in
        # neither (one that joined after the last list, before its watch event came) is asked for: a scan is judged
        # "node gone" only on evidence, never because a cache has not caught up.
        self.nodes: set[str] = set()
        self.gone_nodes: set[str] = set()
        self.listing_jobs: dict[str, Job] = {}
        # The last FailedCreate of each scan Job (by name): (the Job's uid, the API server's message).
        self.create_failures: dict[str, tuple[str, str]] = {}
        self.listing_failures: dict[str, tuple[str, str]] = {}
        self.relist: podstate.Relist | None = None
        # In the current relist: events published, seconds turning pods into state, seconds publishing.
        self.relist_events = 0
        self.relist_cost = [0.0, 0.0]
        self.unsent: list[busmod.Outgoing] = []
        self.listing_nodes: set[str] = set()
        self.warned: set[str] = set()
        meter.create_observable_gauge(
            "podsweep_watcher_pods_tracked",
            callbacks=[lambda _: [metrics.Observation(len(self.index.pods))]],
            description="Pods the watcher holds state for",
        )

    # -- publishing ---------------------------------------------------------------------------------------------
    async def publish(self, events: Sequence[ImageSeen | ImageGone]) -> None:
        """Publish in one batch (one span, a window of acks in flight). The index already counts these events, so
        what NATS did not acknowledge is kept and sent first next time: a relist would not produce it again."""
        batch = [*self.unsent, *(busmod.Outgoing(_subject(e), e, podstate.message_id(e)) for e in events)]
        self.unsent = []
        try:
            await self.service.bus.publish_many(batch)
        except busmod.PublishFailed as exc:
            self.unsent = list(exc.unsent)
            raise

    # -- pods ---------------------------------------------------------------------------------------------------
    async def states_of(self, pods: Sequence[Pod]) -> list[podstate.PodState]:
        """The state of each pod in scope. Workloads already known cost nothing; the rest are walked concurrently,
        one walk per distinct owner."""
        selected = [
            pod
            for pod in pods
            if self.filter.selects(pod.metadata.namespace)
            and not podannotations.is_own_scan_pod(
                pod.metadata.namespace, pod.metadata.annotations, self.scan_namespace
            )
        ]
        workloads: list[Workload | None] = []
        for pod in selected:
            known = self.index.workload_of(pod.metadata.uid)
            workloads.append(known[0] if known is not None else self.owners.known(pod))
        missing = [i for i, known_workload in enumerate(workloads) if known_workload is None]
        if missing:
            walked = await asyncio.gather(*(self.owners.workload(selected[i]) for i in missing))
            for i, found in zip(missing, walked, strict=True):
                workloads[i] = found
        states = []
        for pod, workload in zip(selected, workloads, strict=True):
            state = None if workload is None else self.state_from(pod, workload)
            if state is not None:
                states.append(state)
        return states

    async def state_of(self, pod: Pod) -> podstate.PodState | None:
        states = await self.states_of((pod,))
        return states[0] if states else None

    def state_from(self, pod: Pod, workload: Workload) -> podstate.PodState | None:
        meta = pod.metadata
        options, rejections = podannotations.options_from(meta.annotations)
        if rejections and meta.uid not in self.index.pods:
            for rejection in rejections:
                log.info(
                    "annotation ignored",
                    namespace=meta.namespace,
                    pod=meta.name,
                    key=rejection.key,
                    why=rejection.reason,
                    value=rejection.preview,
                )
        # Resolved once per pod (cached per owner), also before it has images: the first state is what is kept.
        state = podstate.pod_state(pod, podstate.images_of(pod), workload, options, self.index.intern)
        if isinstance(state, podstate.Skipped):
            if meta.uid not in self.warned:
                self.warned.add(meta.uid)
                log.warning("pod skipped", uid=meta.uid, why=state.reason)
            return None
        return state

    async def on_pods(self, observation: Observation[Pod]) -> None:
        if isinstance(observation, ListStarted):
            # A list that failed half-way left its pages applied and their events published: the new one converges
            # from there.
            self.relist = podstate.Relist(self.index)
            self.relist_events, self.relist_cost = 0, [0.0, 0.0]
            await self.owners.prefetch()
        elif isinstance(observation, ListPage):
            assert self.relist is not None, "a list page arrived before its ListStarted"
            began = time.perf_counter()
            states = await self.states_of(observation.items)
            seen = self.relist.page(states, _now())
            published_at = time.perf_counter()
            await self.publish(seen)
            self.relist_events += len(seen)
            self.relist_cost[0] += published_at - began
            self.relist_cost[1] += time.perf_counter() - published_at
        elif isinstance(observation, ListDone):
            assert self.relist is not None, "a list ended before its ListStarted"
            began = time.perf_counter()
            events = self.relist.finish(_now())
            self.relist = None
            await self.publish(events)
            HEALTH.set("watcher:pods-listed", True)
            log.info(
                "pods reconciled",
                pods=len(self.index.pods),
                events=self.relist_events + len(events),
                api_calls=self.kube.calls,
                states_s=round(self.relist_cost[0], 2),
                publish_s=round(self.relist_cost[1] + time.perf_counter() - began, 2),
            )
        elif isinstance(observation, Changed):
            pod = observation.obj
            if observation.type == "DELETED":
                last = await self.state_of(pod)
                await self.publish(podstate.forget(self.index, pod.metadata.uid, _now(), last))
                return
            state = await self.state_of(pod)
            if state is None:
                if pod.metadata.uid in self.index.pods:  # moved out of scope (e.g. a filter) - treat as gone
                    await self.publish(podstate.forget(self.index, pod.metadata.uid, _now()))
                return
            await self.publish(podstate.observe(self.index, state, _now()))

    # -- scan Jobs ----------------------------------------------------------------------------------------------
    async def evaluate(self, name: str) -> None:
        job = self.jobs.get(name)
        if job is None:
            return
        scans = jobstatus.scan_jobs(job)
        if isinstance(scans, jobstatus.NotAScanJob):
            if job.metadata.uid not in self.warned:
                self.warned.add(job.metadata.uid)
                log.warning("job ignored", job=name, why=scans.reason)
            return
        pods = list(self.scan_pods.get(name, {}).values())
        node = scans[0].node
        node_exists = None if node is None else await self.node_exists(node)
        failure = self.create_failures.get(name)
        create_failure = failure[1] if failure is not None and failure[0] == job.metadata.uid else None
        current = jobstatus.outcome(job, pods, node_exists, create_failure, _now() - PODLESS_AFTER)
        if not jobstatus.transition(self.job_phase.get(name), current):
            return
        parent = telemetry.from_traceparent(job.metadata.annotations.get(jobs.TRACEPARENT_ANNOTATION))
        for scan in scans:  # one for a node scan, one per digest of an SBOM rescan batch
            event = jobstatus.scan_event(scan, current, self.service.settings.cluster, _now())
            if event is None:
                continue
            subject = {ScanStarted: subjects.SCAN_STARTED, ScanCompleted: subjects.SCAN_COMPLETED}.get(
                type(event), subjects.SCAN_FAILED
            )
            with tracer.start_as_current_span(f"scan Job {current.phase}", context=parent):
                await self.service.bus.publish(subject, event, msg_id=jobstatus.message_id(event))
            log.info(
                "scan " + current.phase,
                scan_id=scan.scan_id,
                digest=scan.digest_ref,
                node=scan.node,
                reason=event.reason if isinstance(event, ScanFailed) else None,
            )
        self.job_phase[name] = current.phase

    async def on_jobs(self, observation: Observation[Job]) -> None:
        if isinstance(observation, ListStarted):
            self.listing_jobs = {}
        elif isinstance(observation, ListPage):
            for job in observation.items:
                self.listing_jobs[job.metadata.name] = job
        elif isinstance(observation, ListDone):
            # The list is the whole set: Jobs deleted while the watch was down are forgotten too.
            self.jobs, self.listing_jobs = self.listing_jobs, {}
            for name in [n for n in self.job_phase if n not in self.jobs]:
                del self.job_phase[name]
            for name in list(self.jobs):
                await self.evaluate(name)
        elif isinstance(observation, Changed):
            name = observation.obj.metadata.name
            if observation.type == "DELETED":
                self.jobs.pop(name, None)
                self.job_phase.pop(name, None)
                self.create_failures.pop(name, None)
                return
            self.jobs[name] = observation.obj
            await self.evaluate(name)

    async def on_scan_pods(self, observation: Observation[ScanPod]) -> None:
        pods: Sequence[ScanPod] = ()
        if isinstance(observation, ListStarted):
            self.scan_pods = {}
        elif isinstance(observation, ListPage):
            pods = observation.items
        elif isinstance(observation, Changed):
            pods = (observation.obj,)
        for pod in pods:
            job = pod.metadata.labels.get(JOB_NAME_LABEL) or pod.metadata.labels.get("job-name", "")
            if not job:
                continue
            by_name = self.scan_pods.setdefault(job, {})
            if isinstance(observation, Changed) and observation.type == "DELETED":
                by_name.pop(pod.metadata.name, None)
            else:
                by_name[pod.metadata.name] = pod
            if isinstance(observation, Changed):
                await self.evaluate(job)

    async def on_nodes(self, observation: Observation[PartialObjectMetadata]) -> None:
        if isinstance(observation, ListStarted):
            self.listing_nodes = set()
        elif isinstance(observation, ListPage):
            self.listing_nodes.update(n.metadata.name for n in observation.items)
        elif isinstance(observation, ListDone):
            # A complete list is evidence both ways: what it lacks is gone, what it holds exists.
            vanished = self.nodes - self.listing_nodes
            self.gone_nodes = (self.gone_nodes | vanished) - self.listing_nodes
            self.nodes, self.listing_nodes = self.listing_nodes, set()
            if vanished:
                for job in list(self.jobs):
                    await self.evaluate(job)
        elif isinstance(observation, Changed):
            name = observation.obj.metadata.name
            if observation.type == "DELETED":
                self.nodes.discard(name)
                self.gone_nodes.add(name)
                for job in list(self.jobs):  # a scan pinned there can never finish
                    await self.evaluate(job)
            else:
                self.nodes.add(name)
                self.gone_nodes.discard(name)

    async def node_exists(self, name: str) -> bool | None:
        """Whether the node exists: from the node watch, else asked (a node that joined a moment ago). None when
        the API server cannot say, which fails no scan."""
        if name in self.nodes:
            return True
        if name in self.gone_nodes:
            return False
        try:
            decode_owner(await self.kube.get(f"/api/v1/nodes/{name}", accept=METADATA))
        except KubeError as exc:
            if exc.status != 404:
                log.warning("node lookup failed", node=name, status=exc.status)
                return None
            self.gone_nodes.add(name)
            return False
        self.nodes.add(name)
        return True

    async def on_scan_events(self, observation: Observation[KubeEvent]) -> None:
        """FailedCreate events of scan Jobs (the API server's reason a scan pod could not be created)."""
        events: Sequence[KubeEvent] = ()
        if isinstance(observation, ListStarted):
            self.listing_failures = {}
        elif isinstance(observation, ListPage):
            for event in observation.items:
                self._note_create_failure(self.listing_failures, event)
        elif isinstance(observation, ListDone):
            self.create_failures, self.listing_failures = self.listing_failures, {}
            events = ()
            for name in list(self.create_failures):
                await self.evaluate(name)
        elif isinstance(observation, Changed) and observation.type != "DELETED":
            events = (observation.obj,)
        for event in events:
            if self._note_create_failure(self.create_failures, event):
                await self.evaluate(event.involved_object.name)

    @staticmethod
    def _note_create_failure(into: dict[str, tuple[str, str]], event: KubeEvent) -> bool:
        ref = event.involved_object
        if event.reason != "FailedCreate" or ref.kind != "Job" or not ref.name or not event.message:
            return False
        into[ref.name] = (ref.uid, event.message)
        return True

    async def podless_forever(self) -> None:
        """Look again at scan Jobs not started yet: one that made no pod for PODLESS_AFTER fails (jobstatus.py)."""
        while True:
            await asyncio.sleep(PODLESS_CHECK_S)
            try:
                for name in [n for n in self.jobs if self.job_phase.get(n, "pending") == "pending"]:
                    await self.evaluate(name)
            except (busmod.Conflict, ConnectionError, TimeoutError, KubeError) as exc:  # the next look tries again
                log.warning("pod-less Jobs not looked at", error=f"{type(exc).__name__}: {exc}"[:300])

    # -- resync -------------------------------------------------------------------------------------------------
    async def resync_forever(self) -> None:
        interval = self.service.settings.watcher.resync_interval_s
        while True:
            now = _now().timestamp()
            slot = now - now % interval  # the same instant for every replica and restart in this slot
            await asyncio.sleep(slot + interval - now)
            if not HEALTH.ready.get("watcher:pods-listed"):
                continue
            events = podstate.resync(self.index, datetime.fromtimestamp(slot + interval, UTC))
            await self.publish(events)
            log.info("resync published", events=len(events))


async def _follow(
    kube: Kube,
    path: str,
    codec: Codec[T],
    handle: Callable[[Observation[T]], Awaitable[None]],
    settings: WatcherSettings,
    params: Mapping[str, str | int | bool] | None = None,
    accept: str = "application/json",
    watch_accept: str | None = None,
) -> None:
    """Feed a reflector into a handler; a failure is logged and the resource relisted, never fatal."""
    while True:
        try:
            async for observation in reflect(
                kube,
                path,
                codec,
                params=params,
                page_size=settings.page_size,
                watch_timeout_s=settings.watch_timeout_s,
                accept=accept,
                watch_accept=watch_accept,
            ):
                await handle(observation)
        except asyncio.CancelledError:
            raise
        except (busmod.Conflict, ConnectionError, TimeoutError, KubeError, msgspec.DecodeError) as exc:
            log.warning("resource loop restarting", resource=path, error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(1.0)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    HEALTH.set("watcher:pods-listed", False)
    async with open_service(SERVICE, settings, access=NATS) as service:
        kube = await Kube.connect(runtime.kubeconfig_path(settings))
        watcher = Watcher(service, kube)
        ws = settings.watcher
        pod_params: dict[str, str | int | bool] = {"labelSelector": ws.label_selector} if ws.label_selector else {}
        scans = f"/namespaces/{settings.namespace}"
        scan_selector: dict[str, str | int | bool] = {
            "labelSelector": f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}"
        }
        follows = [
            _follow(kube, "/api/v1/pods", _pod_codec, watcher.on_pods, ws, pod_params),
            _follow(kube, f"/apis/batch/v1{scans}/jobs", _job_codec, watcher.on_jobs, ws, scan_selector),
            _follow(kube, f"/api/v1{scans}/pods", _scan_pod_codec, watcher.on_scan_pods, ws, scan_selector),
            _follow(
                kube,
                "/api/v1/nodes",
                _meta_codec,
                watcher.on_nodes,
                ws,
                accept=METADATA_LIST,
                watch_accept=METADATA_WATCH,
            ),
            _follow(kube, f"/api/v1{scans}/events", _event_codec, watcher.on_scan_events, ws, FAILED_CREATE),
        ]
        tasks = [asyncio.create_task(follow) for follow in follows]
        tasks.append(asyncio.create_task(watcher.resync_forever(), name="watcher-resync"))
        tasks.append(asyncio.create_task(watcher.podless_forever(), name="watcher-podless"))
        log.info("watcher started", cluster=settings.cluster, scan_namespace=settings.namespace)
        try:
            await aio.wait_first((stop, *tasks))
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await kube.close()
            HEALTH.set("watcher:pods-listed", False)
