"""The parts of Kubernetes objects the watcher reads, decoded straight from the API server's bytes.

Holds only fields podsweep uses; everything else (managedFields, env, volumes, ...) is skipped by the decoder.
Never validates user text here: names, images and annotations are checked where they are used.
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

import msgspec

T = TypeVar("T")


# gc=False: these Structs are decoded, read and dropped; they never form reference cycles, and leaving them out
# of the cycle collector makes decoding a 50k-pod list faster and keeps GC pauses short.
class _Kube(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    pass


class OwnerReference(_Kube, frozen=True, gc=False):
    api_version: str = ""
    kind: str = ""
    name: str = ""
    uid: str = ""
    controller: bool = False


# Field order follows the API server's (Go struct order): msgspec matches fields fastest when the order agrees.
# Tuples, not lists: immutable like the Structs, and faster to decode (no resizing, untracked by GC).
class PodMeta(_Kube, frozen=True, gc=False):
    """A pod's metadata. No labels: podsweep never reads a workload pod's labels, and 50k pods of them cost time."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    # Only its presence matters (the object is being deleted); kept as text to skip parsing a timestamp per pod.
    deletion_timestamp: str | None = None
    annotations: dict[str, str] = {}
    owner_references: tuple[OwnerReference, ...] = ()


class ObjectMeta(_Kube, frozen=True, gc=False):
    """Metadata of podsweep's own Jobs and their pods, where labels carry the scan id."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    deletion_timestamp: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    owner_references: tuple[OwnerReference, ...] = ()


class Container(_Kube, frozen=True, gc=False):
    name: str = ""
    image: str = ""


class PodSpec(_Kube, frozen=True, gc=False):
    init_containers: tuple[Container, ...] = ()
    containers: tuple[Container, ...] = ()
    ephemeral_containers: tuple[Container, ...] = ()
    restart_policy: str = "Always"
    node_name: str = ""


class StateWaiting(_Kube, frozen=True, gc=False):
    reason: str = ""
    message: str = ""


class StateRunning(_Kube, frozen=True, gc=False):
    pass


class StateTerminated(_Kube, frozen=True, gc=False):
    exit_code: int = 0
    reason: str = ""
    message: str = ""


class ContainerState(_Kube, frozen=True, gc=False):
    waiting: StateWaiting | None = None
    running: StateRunning | None = None
    terminated: StateTerminated | None = None


class ContainerStatus(_Kube, frozen=True, gc=False):
    name: str = ""
    state: ContainerState = ContainerState()
    image_id: str = msgspec.field(default="", name="imageID")


class Condition(_Kube, frozen=True, gc=False):
    """A pod condition (DisruptionTarget says why a scan pod was killed)."""

    type: str = ""
    status: str = ""
    reason: str = ""
    message: str = ""


class PodStatus(_Kube, frozen=True, gc=False):
    phase: str = ""
    message: str = ""
    reason: str = ""  # "Evicted", "NodeLost", ... on a failed pod
    init_container_statuses: tuple[ContainerStatus, ...] = ()
    container_statuses: tuple[ContainerStatus, ...] = ()
    ephemeral_container_statuses: tuple[ContainerStatus, ...] = ()


class Pod(_Kube, frozen=True, gc=False):
    """A workload pod: what runs where."""

    metadata: PodMeta = PodMeta()
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()


class ScanPodStatus(_Kube, frozen=True, gc=False):
    phase: str = ""
    conditions: tuple[Condition, ...] = ()
    message: str = ""
    reason: str = ""
    init_container_statuses: tuple[ContainerStatus, ...] = ()
    container_statuses: tuple[ContainerStatus, ...] = ()


class ScanPod(_Kube, frozen=True, gc=False):
    """A pod of a podsweep scan Job: why it failed matters, so conditions and labels are kept."""

    metadata: ObjectMeta = ObjectMeta()
    spec: PodSpec = PodSpec()
    status: ScanPodStatus = ScanPodStatus()


class JobCondition(_Kube, frozen=True, gc=False):
    type: str = ""
    status: str = ""
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None


class JobStatus(_Kube, frozen=True, gc=False):
    conditions: list[JobCondition] = []
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: datetime | None = None
    completion_time: datetime | None = None


class Job(_Kube, frozen=True, gc=False):
    metadata: ObjectMeta = ObjectMeta()
    status: JobStatus = JobStatus()


class ObjectReference(_Kube, frozen=True, gc=False):
    kind: str = ""
    name: str = ""
    uid: str = ""


class KubeEvent(_Kube, frozen=True, gc=False):
    """A core/v1 Event in podsweep's namespace: a Job's FailedCreate says why its pod could not be created."""

    metadata: ObjectMeta = ObjectMeta()
    involved_object: ObjectReference = ObjectReference()
    reason: str = ""
    message: str = ""


class OwnerMeta(_Kube, frozen=True, gc=False):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    owner_references: tuple[OwnerReference, ...] = ()


class PartialObjectMetadata(_Kube, frozen=True, gc=False):
    """What a metadata-only GET of an owner returns (Accept: ...;as=PartialObjectMetadata;g=meta.k8s.io;v=v1)."""

    api_version: str = ""
    kind: str = ""
    metadata: OwnerMeta = OwnerMeta()


class ListMeta(_Kube, frozen=True, gc=False):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class ObjectList(_Kube, Generic[T], frozen=True, gc=False):
    """The shape every list shares: PodList, JobList, PartialObjectMetadataList."""

    metadata: ListMeta = ListMeta()
    items: list[T] | None = None  # `null` in an empty PartialObjectMetadataList


class Status(_Kube, frozen=True, gc=False):
    """The object of a watch ERROR event (code 410: the requested history was compacted, relist)."""

    status: str = ""
    message: str = ""
    reason: str = ""
    code: int = 0


class WatchEvent(_Kube, frozen=True, gc=False):
    """One watch line. The object is decoded in a second step because its type depends on `type`."""

    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"null")


class APIResource(_Kube, frozen=True, gc=False):
    name: str = ""  # the plural, e.g. "rollouts"; subresources look like "rollouts/status"
    kind: str = ""
    namespaced: bool = False


class APIResourceList(_Kube, frozen=True, gc=False):
    """Discovery for one group/version (GET /apis/<group>/<version>): how the shell finds an unknown kind's plural."""

    group_version: str = ""
    resources: list[APIResource] = []


class _ResourceVersionOnly(_Kube, frozen=True, gc=False):
    metadata: ListMeta = ListMeta()


_watch_events = msgspec.json.Decoder(WatchEvent)
_status = msgspec.json.Decoder(Status)
_resource_version = msgspec.json.Decoder(_ResourceVersionOnly)
_api_resources = msgspec.json.Decoder(APIResourceList)
_owner = msgspec.json.Decoder(PartialObjectMetadata)


class Codec(Generic[T]):
    """Decodes one resource's list pages and watch lines; the shape services/watcher/reflector.py consumes."""

    __slots__ = ("_item", "_list")

    def __init__(self, item: type[T]) -> None:
        self._list = msgspec.json.Decoder(ObjectList[item])  # type: ignore[valid-type]
        self._item = msgspec.json.Decoder(item)

    def decode_page(self, data: bytes) -> tuple[list[T], str, str]:
        """(items, continue token, resourceVersion) of one list page."""
        page: ObjectList[T] = self._list.decode(data)
        return page.items or [], page.metadata.continue_, page.metadata.resource_version

    def decode_line(self, line: bytes) -> tuple[str, T | None, str, int]:
        """(type, object or None, resourceVersion or "", error code or 0) of one watch line."""
        event = _watch_events.decode(line)
        if event.type == "ERROR":
            status = _status.decode(event.object)
            return event.type, None, "", status.code or 500
        if event.type == "BOOKMARK":
            # A bookmark carries only metadata.resourceVersion; decoding it as T would invent an empty object.
            return event.type, None, _resource_version.decode(event.object).metadata.resource_version, 0
        obj = self._item.decode(event.object)
        return event.type, obj, _resource_version_of(obj), 0


def _resource_version_of(obj: object) -> str:
    metadata = getattr(obj, "metadata", None)
    return str(getattr(metadata, "resource_version", "") or "")


PodList = ObjectList[Pod]
JobList = ObjectList[Job]
PartialObjectMetadataList = ObjectList[PartialObjectMetadata]

PODS: Codec[Pod] = Codec(Pod)
SCAN_PODS: Codec[ScanPod] = Codec(ScanPod)
JOBS: Codec[Job] = Codec(Job)
OWNERS: Codec[PartialObjectMetadata] = Codec(PartialObjectMetadata)


def decode_owner(data: bytes) -> PartialObjectMetadata:
    """One metadata-only GET of an owner object."""
    return _owner.decode(data)


def decode_api_resources(data: bytes) -> APIResourceList:
    """A discovery document for one group/version."""
    return _api_resources.decode(data)
