"""What runs where: minimal per-pod state and the diff that turns pod changes into image.seen / image.gone.

Pure: no I/O, no clock (callers pass `now`); functions change only the Index they are given. The Index counts
containers per (digest ref, node), so one image.seen goes out when a count leaves 0 and one image.gone when it
returns to 0, however many pods, restarts, relists or rollouts happen in between. It also counts per (digest ref,
node, workload): a second workload starting a digest on a node that already runs it gets its own image.seen (its
owners must learn of it), though the (digest, node) count never left 0.

Decisions written down:
- An app container holds its digest while it runs, waits to restart, or has terminated and will be restarted
  (restartPolicy Always, or OnFailure after a failure): a crash loop never flaps gone/seen.
- An init container holds its digest for the pod's whole life once it has an imageID: short init containers are
  often over before the watcher sees them run, and their image is part of what runs on the node.
- A pod in phase Succeeded/Failed holds nothing. Deletion counts when the pod is gone (DELETED), not when
  deletionTimestamp is set: the containers run until their grace period ends.
- A container that started and stopped between two observations (a fast Job pod first seen Succeeded) is reported
  as a seen immediately followed by a gone, unless another container already holds that digest on that node, so no
  digest that ran is missed.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Hashable, Iterable
from datetime import datetime
from functools import lru_cache
from typing import TypeVar

import msgspec

from schemas.events import ContainerKind, ImageGone, ImageOptions, ImageSeen, Workload
from schemas.refs import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN
from services.watcher import digests
from services.watcher.kubeobjects import Container, ContainerStatus, Pod

H = TypeVar("H", bound=Hashable)

_LABEL_RE = re.compile(DNS_LABEL_PATTERN)
_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_NODE_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(?!\n)$")
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class RunningImage(msgspec.Struct, frozen=True, gc=False):
    """One container's image on a pod; equal instances are shared across replicas through the Interner."""

    digest_ref: str
    container: str
    kind: ContainerKind
    image: str


class PodState(msgspec.Struct, frozen=True, gc=False):
    """All the watcher keeps per pod (about 300 bytes when strings are interned)."""

    uid: str
    namespace: str
    name: str
    node: str
    workload: Workload
    options: ImageOptions
    running: tuple[RunningImage, ...] = ()
    # Images that ran in this pod and stopped for good; only used to report containers that ran between observations.
    finished: tuple[RunningImage, ...] = ()


class Skipped(msgspec.Struct, frozen=True, gc=False):
    """A container the watcher will not report; the shell logs it once. `reason` never echoes hostile text."""

    container: str
    reason: str


class ContainerImages(msgspec.Struct, frozen=True, gc=False):
    running: tuple[RunningImage, ...] = ()
    finished: tuple[RunningImage, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    def has_images(self) -> bool:
        """True when the pod has something to report (and its workload is worth resolving)."""
        return bool(self.running or self.finished)


NOTHING = ContainerImages()


class Interner:
    """One shared instance per distinct value: 50k replicas of a few hundred workloads cost a few hundred copies."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[Hashable, Hashable] = {}

    def __call__(self, value: H) -> H:
        return self._values.setdefault(value, value)  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()


def _holds(status: ContainerStatus, kind: ContainerKind, restarts: bool) -> bool:
    """Whether a container with an imageID keeps its digest on the node (see the module docstring)."""
    state = status.state
    if kind == "init":
        return True
    if state.running is not None or state.waiting is not None:
        return True
    if state.terminated is not None:
        return restarts and kind == "app"
    return False


def images_of(pod: Pod) -> ContainerImages:
    """The digests a pod's containers hold, those that ran and stopped, and the containers skipped with a reason."""
    status = pod.status
    if not pod.spec.node_name or not (
        status.container_statuses or status.init_container_statuses or status.ephemeral_container_statuses
    ):
        return NOTHING
    terminal = status.phase in _TERMINAL_PHASES
    policy = pod.spec.restart_policy
    running: list[RunningImage] = []
    finished: list[RunningImage] = []
    skipped: list[Skipped] = []
    groups: tuple[tuple[ContainerKind, tuple[ContainerStatus, ...], tuple[Container, ...]], ...] = (
        ("init", status.init_container_statuses, pod.spec.init_containers),
        ("app", status.container_statuses, pod.spec.containers),
        ("ephemeral", status.ephemeral_container_statuses, pod.spec.ephemeral_containers),
    )
    for kind, statuses, specs in groups:
        for cs in statuses:
            if not cs.image_id:
                continue  # not started yet: reported when the runtime knows its image
            image = _container_image(cs.image_id, _spec_image(specs, cs.name), cs.name, kind)
            if isinstance(image, Skipped):
                skipped.append(image)
                continue
            restarts = policy == "Always" or (
                policy == "OnFailure" and cs.state.terminated is not None and cs.state.terminated.exit_code != 0
            )
            if not terminal and _holds(cs, kind, restarts):
                running.append(image)
            else:
                finished.append(image)
    if not running and not finished and not skipped:
        return NOTHING
    return ContainerImages(tuple(running), tuple(finished), tuple(skipped))


# Longer inputs are not cached: hostile values must not pin memory (annotations.py does the same).
_CACHEABLE = 1024


def _container_image(image_id: str, spec_image: str, name: str, kind: ContainerKind) -> RunningImage | Skipped:
    """One container's RunningImage, or why it is skipped; the replicas of a workload share one instance."""
    if len(image_id) + len(spec_image) + len(name) > _CACHEABLE:
        return _container_image_uncached(image_id, spec_image, name, kind)
    return _container_image_cached(image_id, spec_image, name, kind)


def _container_image_uncached(image_id: str, spec_image: str, name: str, kind: ContainerKind) -> RunningImage | Skipped:
    parsed = digests.parse_image_id(image_id, spec_image)
    if not isinstance(parsed, digests.ImageDigest):
        return Skipped(_safe_name(name), parsed.reason)
    if _LABEL_RE.match(name) is None or len(name) > 63:
        return Skipped(_safe_name(name), "container name is not a DNS label")
    return RunningImage(parsed.digest_ref, sys.intern(name), kind, digests.display_image(spec_image, parsed.digest_ref))


_container_image_cached = lru_cache(maxsize=65536)(_container_image_uncached)


def _spec_image(specs: tuple[Container, ...], name: str) -> str:
    for container in specs:
        if container.name == name:
            return container.image
    return ""


def _safe_name(name: str) -> str:
    return ascii(name[:63])[1:-1]


def pod_state(
    pod: Pod, images: ContainerImages, workload: Workload, options: ImageOptions, intern: Interner
) -> PodState | Skipped:
    """The state kept for a pod, or why the whole pod is skipped (names the API server should never have allowed)."""
    meta = pod.metadata
    namespace = _valid_namespace(meta.namespace) if len(meta.namespace) <= 63 else None
    if namespace is None:
        return Skipped("", "namespace is not a DNS label")
    if _SUBDOMAIN_RE.match(meta.name) is None or len(meta.name) > 253:
        return Skipped("", "pod name is not a DNS subdomain")
    node: str | None = pod.spec.node_name
    if node:
        node = _valid_node(node) if len(node) <= 253 else None
    if node is None:
        return Skipped("", "node name is not a valid node name")
    return PodState(
        meta.uid,
        namespace,
        meta.name,
        node,
        intern(workload),
        intern(options),
        tuple(intern(i) for i in images.running),
        tuple(intern(i) for i in images.finished),
    )


@lru_cache(maxsize=8192)
def _valid_namespace(namespace: str) -> str | None:
    """The interned namespace when it is a DNS label (at most 63 characters: the caller checks), else None."""
    return sys.intern(namespace) if _LABEL_RE.match(namespace) is not None else None


@lru_cache(maxsize=65536)
def _valid_node(node: str) -> str | None:
    """The interned node name when it is valid (at most 253 characters: the caller checks), else None."""
    return sys.intern(node) if _NODE_RE.match(node) is not None else None


Key = tuple[str, str]  # (digest_ref, node)
# (digest_ref, node, namespace, workload): a second workload starting a digest on a node that already runs it is
# news for its owners (the notifier routes by workload), though not for the dispatcher.
WorkloadKey = tuple[str, str, str, Workload]


class Index:
    """The pods the watcher knows (by uid, including pods that hold nothing) and the holders per (digest, node) and
    per (digest, node, workload)."""

    __slots__ = ("cluster", "counts", "intern", "pods", "workload_counts")

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.pods: dict[str, PodState] = {}
        self.counts: dict[Key, int] = {}
        self.workload_counts: dict[WorkloadKey, int] = {}
        self.intern = Interner()

    def workload_of(self, uid: str) -> tuple[Workload, ImageOptions] | None:
        """What the shell resolved for this pod before, so a status update costs no owner lookup."""
        state = self.pods.get(uid)
        return None if state is None else (state.workload, state.options)


Event = ImageSeen | ImageGone


class _Batch:
    """Applies many pod changes, then emits only the net change per (digest, node): no storm on relist.

    `announce` emits early the seen of a (digest, node) that no pod held when the batch began and one holds now;
    `events` then leaves it out (or, should the count drop back to 0 within the batch, emits its gone).
    """

    __slots__ = (
        "_announced",
        "_before",
        "_first_holder",
        "_flashes",
        "_fresh",
        "_index",
        "_workload_before",
        "_workload_holder",
    )

    def __init__(self, index: Index) -> None:
        self._index = index
        self._before: dict[Key, int] = {}
        self._first_holder: dict[Key, tuple[PodState, RunningImage]] = {}
        self._flashes: dict[Key, tuple[PodState, RunningImage]] = {}
        self._fresh: list[Key] = []  # keys added since the last announce, held by nobody when the batch began
        self._announced: set[Key] = set()
        self._workload_before: dict[WorkloadKey, int] = {}
        self._workload_holder: dict[WorkloadKey, tuple[PodState, RunningImage]] = {}

    def _touch(self, key: Key) -> None:
        if key not in self._before:
            self._before[key] = self._index.counts.get(key, 0)

    def add(self, state: PodState) -> None:
        counts = self._index.counts
        workload_counts = self._index.workload_counts
        before = self._before
        for image in state.running:
            key = (image.digest_ref, state.node)
            if key not in before:
                before[key] = counts.get(key, 0)
            count = counts.get(key, 0)
            counts[key] = count + 1
            if key not in self._first_holder:
                self._first_holder[key] = (state, image)
                if before[key] == 0:
                    self._fresh.append(key)
            wkey = (image.digest_ref, state.node, state.namespace, state.workload)
            held = workload_counts.get(wkey, 0)
            self._workload_before.setdefault(wkey, held)
            self._workload_holder.setdefault(wkey, (state, image))
            workload_counts[wkey] = held + 1

    def remove(self, state: PodState) -> None:
        counts = self._index.counts
        workload_counts = self._index.workload_counts
        for image in state.running:
            key = (image.digest_ref, state.node)
            self._touch(key)
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)
            wkey = (image.digest_ref, state.node, state.namespace, state.workload)
            held = workload_counts.get(wkey, 0)
            self._workload_before.setdefault(wkey, held)
            if held > 1:
                workload_counts[wkey] = held - 1
            else:
                workload_counts.pop(wkey, None)

    def flash(self, state: PodState, previous: PodState | None) -> None:
        """Images that ran between two observations of this pod and were never reported from it."""
        if not state.finished:
            return
        known = set() if previous is None else {*previous.running, *previous.finished}
        for image in state.finished:
            if image not in known:
                key = (image.digest_ref, state.node)
                self._touch(key)
                self._flashes.setdefault(key, (state, image))

    def announce(self, now: datetime) -> list[ImageSeen]:
        """The seen events that are already certain: a key nobody held before the batch and somebody holds now."""
        counts = self._index.counts
        cluster = self._index.cluster
        out: list[ImageSeen] = []
        for key in self._fresh:
            if key not in self._announced and counts.get(key, 0) > 0:
                self._announced.add(key)
                out.append(_seen(cluster, *self._first_holder[key], now))
        self._fresh.clear()
        return out

    def events(self, now: datetime) -> list[Event]:
        """Seen before gone: a consumer never briefly believes a node runs nothing during a rollout."""
        counts = self._index.counts
        cluster = self._index.cluster
        seen: list[Event] = []
        gone: list[Event] = []
        for key, before in self._before.items():
            after = counts.get(key, 0)
            if key in self._announced:
                if after == 0:  # announced, then dropped again within the batch
                    gone.append(_gone(cluster, key, now))
            elif before == 0 and after > 0:
                seen.append(_seen(cluster, *self._first_holder[key], now))
            elif before > 0 and after == 0:
                gone.append(_gone(cluster, key, now))
            elif before == 0 and after == 0 and key in self._flashes:
                seen.append(_seen(cluster, *self._flashes[key], now))
                gone.append(_gone(cluster, key, now))
        return seen + self._joined(now) + gone

    def _joined(self, now: datetime) -> list[Event]:
        """A seen for each workload that started holding a digest on a node another workload already ran it on (the
        (digest, node) seen above names one workload; its owners are not the only ones)."""
        counts = self._index.workload_counts
        out: list[Event] = []
        for wkey, before in self._workload_before.items():
            if before or not counts.get(wkey):
                continue
            state, image = self._workload_holder[wkey]
            first = self._first_holder.get((wkey[0], wkey[1]))
            key_is_news = self._before.get((wkey[0], wkey[1])) == 0
            if key_is_news and first is not None and (first[0].namespace, first[0].workload) == (wkey[2], wkey[3]):
                continue  # the (digest, node) seen already names this workload
            out.append(_seen(self._index.cluster, state, image, now))
        return out


def _seen(cluster: str, state: PodState, image: RunningImage, now: datetime, resync: bool = False) -> ImageSeen:
    return ImageSeen(
        cluster=cluster,
        digest_ref=image.digest_ref,
        image=image.image,
        node=state.node,
        namespace=state.namespace,
        pod=state.name,
        container=image.container,
        container_kind=image.kind,
        workload=state.workload,
        options=state.options,
        observed_at=now,
        resync=resync,
    )


def _gone(cluster: str, key: Key, now: datetime) -> ImageGone:
    return ImageGone(cluster=cluster, digest_ref=key[0], node=key[1], observed_at=now)


def observe(index: Index, state: PodState, now: datetime) -> list[Event]:
    """A pod was added or changed (watch ADDED/MODIFIED)."""
    previous = index.pods.get(state.uid)
    if previous is not None and previous.running == state.running and previous.finished == state.finished:
        if (previous.namespace, previous.workload) != (state.namespace, state.workload):
            moved = _Batch(index)  # its per-workload counts move with it (nothing to emit: what runs is the same)
            moved.remove(previous)
            moved.add(state)
        if previous != state:
            index.pods[state.uid] = state  # workload or options changed: keep the newest, nothing to emit
        return []
    batch = _Batch(index)
    if previous is not None:
        batch.remove(previous)
    batch.add(state)
    batch.flash(state, previous)
    index.pods[state.uid] = state
    return batch.events(now)


def forget(index: Index, uid: str, now: datetime, last: PodState | None = None) -> list[Event]:
    """A pod was deleted (watch DELETED). `last` is its final state, to report what ran since it was last seen."""
    previous = index.pods.pop(uid, None)
    batch = _Batch(index)
    if previous is not None:
        batch.remove(previous)
    if last is not None:
        batch.flash(_stopped(last), previous)
    return batch.events(now)


def _stopped(state: PodState) -> PodState:
    return msgspec.structs.replace(state, running=(), finished=(*state.running, *state.finished))


class Relist:
    """A complete (re)list applied page by page, converging the index on it.

    `page` applies one page and returns the image.seen events that are already certain: a (digest, node) no pod held
    before the list and a listed pod holds now stays held whatever the later pages say (only pods the index knew can
    be found missing), so the first sync publishes while the API server still sends pages. `finish` returns the rest
    of the net change: pods the index knows but the list lacks were deleted while the watch was down, and their
    digests go unless a listed pod still holds them on that node; and what ran and stopped between observations.
    """

    __slots__ = ("_batch", "_index", "_listed")

    def __init__(self, index: Index) -> None:
        self._index = index
        self._batch = _Batch(index)
        self._listed: set[str] = set()

    def page(self, listed: Iterable[PodState], now: datetime) -> list[ImageSeen]:
        pods = self._index.pods
        batch = self._batch
        for state in listed:
            self._listed.add(state.uid)
            previous = pods.get(state.uid)
            if previous is not None and previous.running == state.running and previous.finished == state.finished:
                if previous != state:
                    pods[state.uid] = state
                continue
            if previous is not None:
                batch.remove(previous)
            batch.add(state)
            batch.flash(state, previous)
            pods[state.uid] = state
        return batch.announce(now)

    def finish(self, now: datetime) -> list[Event]:
        pods = self._index.pods
        for uid in [uid for uid in pods if uid not in self._listed]:
            self._batch.remove(pods.pop(uid))
        return self._batch.events(now)


def reconcile(index: Index, listed: Iterable[PodState], now: datetime) -> list[Event]:
    """A complete (re)list in one piece (see Relist): emits only what changed since the index last saw each pod."""
    relist = Relist(index)
    events: list[Event] = [*relist.page(listed, now)]
    return events + relist.finish(now)


def resync(index: Index, now: datetime) -> list[ImageSeen]:
    """One image.seen (resync=True) per (digest, node, workload) that runs now, and the interning table rebuilt.

    Pass `now` rounded down to the resync interval: message ids derive from the event, so a restarted watcher's
    resync within the duplicate window is stored once.
    """
    out: list[ImageSeen] = []
    emitted: set[WorkloadKey] = set()
    intern = index.intern
    intern.clear()  # forget values no pod uses any more; re-register the live ones
    for state in index.pods.values():
        intern(state.workload)
        intern(state.options)
        for finished in state.finished:
            intern(finished)
        for image in state.running:
            intern(image)
            wkey = (image.digest_ref, state.node, state.namespace, state.workload)
            if wkey not in emitted:
                emitted.add(wkey)
                out.append(_seen(index.cluster, state, image, now, resync=True))
    return out


def message_id(event: ImageSeen | ImageGone) -> str:
    """The Nats-Msg-Id of an event: the same event re-published (a retry, a resync slot) is stored once."""
    kind = "seen" if isinstance(event, ImageSeen) else "gone"
    return f"{kind}-{hashlib.sha256(msgspec.json.encode(event)).hexdigest()[:40]}"
