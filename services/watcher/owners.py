"""The owner walk: from a pod's ownerReferences up to its top-level workload, one metadata-only GET at a time.

Pure: decides the next lookup and the answer; the shell does the GETs (cached by `cache_key`, counted) and the
discovery of unknown kinds. Never builds a path from a name or kind it has not validated.

Rules: follow the reference with `controller: true` (a pod has at most one) up to MAX_DEPTH objects. The last
object with no controller is the workload; a pod with none is its own workload. A mirror pod (controller Node) is
a static pod: its own workload. When an owner cannot be read (deleted, forbidden, kind not served, uid changed),
the reference itself is the workload: its kind and name are known, only what is above it is not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from schemas.events import Workload
from schemas.refs import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN
from services.watcher.kubeobjects import APIResourceList, OwnerReference, PartialObjectMetadata

MAX_DEPTH = 5

# (API group, kind) → plural, for kinds whose owner chains are common enough to skip discovery.
WELL_KNOWN_PLURALS: dict[tuple[str, str], str] = {
    ("apps", "ReplicaSet"): "replicasets",
    ("apps", "Deployment"): "deployments",
    ("apps", "StatefulSet"): "statefulsets",
    ("apps", "DaemonSet"): "daemonsets",
    ("batch", "Job"): "jobs",
    ("batch", "CronJob"): "cronjobs",
    ("", "ReplicationController"): "replicationcontrollers",
    ("argoproj.io", "Rollout"): "rollouts",
    ("argoproj.io", "Workflow"): "workflows",
}
# Owners that are not workloads: a pod they control is its own workload.
_NOT_WORKLOADS = frozenset({("", "Node")})

_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_LABEL_RE = re.compile(DNS_LABEL_PATTERN)
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}(?!\n)$")
_VERSION_RE = re.compile(r"^v[0-9]+(?:(?:alpha|beta)[0-9]+)?(?!\n)$")
_PLURAL_RE = re.compile(r"^[a-z][a-z0-9]{0,62}(?!\n)$")


class OwnerLookup(msgspec.Struct, frozen=True):
    """One metadata-only GET the shell makes next. Every field is validated: safe to put in a URL path."""

    group: str  # "" for the core API
    version: str
    kind: str
    namespace: str
    name: str
    uid: str
    plural: str | None  # None: unknown kind, resolve it with discovery (`discovery_path`, then `with_plural`)
    depth: int = 1
    visited: tuple[str, ...] = ()  # uids on the way, to stop on a cycle

    def cache_key(self) -> tuple[str, str, str, str]:
        """What the shell caches a fetched owner by (the uid is checked on every use, so a recreated owner shows)."""
        return (self.group, self.kind, self.namespace, self.name)

    def path(self) -> str:
        """The GET path; only for a lookup whose plural is known."""
        if self.plural is None:
            raise ValueError(f"owner lookup: kind {self.kind} of group {self.group!r} needs discovery first")
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{prefix}/namespaces/{self.namespace}/{self.plural}/{self.name}"

    def discovery_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


class Resolved(msgspec.Struct, frozen=True):
    """The top-level workload, and why the walk stopped there (for a debug log and a metric label)."""

    workload: Workload
    reason: str


Step = OwnerLookup | Resolved


def controller_of(refs: Sequence[OwnerReference]) -> OwnerReference | None:
    for ref in refs:
        if ref.controller:
            return ref
    return None


def start(namespace: str, pod_name: str, owner_references: Sequence[OwnerReference]) -> Step:
    """The first step of a pod's walk."""
    if len(namespace) > 63 or _LABEL_RE.match(namespace) is None:
        return Resolved(Workload("Pod", pod_name), "invalid namespace")
    return _follow(Workload("Pod", pod_name), namespace, owner_references, depth=1, visited=())


def advance(lookup: OwnerLookup, found: PartialObjectMetadata | None) -> Step:
    """The step after a GET: `found` is None when the owner could not be read (404, 403, ...)."""
    if found is None:
        return Resolved(Workload(lookup.kind, lookup.name), "owner unavailable")
    if is_stale(lookup, found):
        return Resolved(Workload(lookup.kind, lookup.name), "owner uid changed")
    if lookup.depth >= MAX_DEPTH:
        return Resolved(Workload(lookup.kind, lookup.name), "depth limit")
    return _follow(
        Workload(lookup.kind, lookup.name),
        lookup.namespace,
        found.metadata.owner_references,
        depth=lookup.depth + 1,
        visited=(*lookup.visited, lookup.uid),
    )


def is_stale(lookup: OwnerLookup, found: PartialObjectMetadata) -> bool:
    """A cached owner whose uid differs from the reference: the shell should GET it again once before advancing."""
    return bool(lookup.uid) and found.metadata.uid != lookup.uid


def with_plural(lookup: OwnerLookup, discovery: APIResourceList) -> Step:
    """The lookup with its plural from a discovery document, or the owner itself when the kind is not served."""
    for resource in discovery.resources:
        if resource.kind == lookup.kind and "/" not in resource.name and resource.namespaced:
            if _PLURAL_RE.match(resource.name) is None:
                break
            return msgspec.structs.replace(lookup, plural=resource.name)
    return Resolved(Workload(lookup.kind, lookup.name), "kind not served")


def _follow(
    current: Workload, namespace: str, refs: Sequence[OwnerReference], *, depth: int, visited: tuple[str, ...]
) -> Step:
    ref = controller_of(refs)
    if ref is None:
        return Resolved(current, "no controller")
    group, _, version = ref.api_version.rpartition("/")
    if (group, ref.kind) in _NOT_WORKLOADS:
        return Resolved(current, f"controlled by {ref.kind}")
    if not _valid_ref(group, version, ref):
        return Resolved(current, "invalid owner reference")
    if ref.uid and ref.uid in visited:
        return Resolved(current, "owner cycle")
    return OwnerLookup(
        group=group,
        version=version,
        kind=ref.kind,
        namespace=namespace,
        name=ref.name,
        uid=ref.uid,
        plural=WELL_KNOWN_PLURALS.get((group, ref.kind)),
        depth=depth,
        visited=visited,
    )


def _valid_ref(group: str, version: str, ref: OwnerReference) -> bool:
    return (
        (not group or (len(group) <= 253 and _SUBDOMAIN_RE.match(group) is not None))
        and _VERSION_RE.match(version) is not None
        and _KIND_RE.match(ref.kind) is not None
        and len(ref.name) <= 253
        and _SUBDOMAIN_RE.match(ref.name) is not None
        and len(ref.uid) <= 64
    )
