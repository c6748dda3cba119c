"""Objects tests need on the kwok control plane: fake nodes, namespaces, and the imageIDs kwok-stages.yaml reports.

Talks only to the control plane the `kube` fixture started, through podsweep's own API client. Pods get their
imageIDs from the Stage file; `expected_image_id` says what each container will report.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec

from podsweep.kube import Kube, KubeError

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
IMAGE_ID_ANNOTATION_PREFIX = "podsweep.test/image-id-"

T = TypeVar("T")


class Condition(msgspec.Struct, frozen=True):
    type: str
    status: str


class ContainerStatus(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    image: str
    image_id: str = msgspec.field(default="", name="imageID")  # "camel" would give imageId


class ObjectMeta(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    namespace: str = ""
    resource_version: str = ""
    annotations: dict[str, str] = {}
    labels: dict[str, str] = {}


class NodeStatus(msgspec.Struct, frozen=True):
    conditions: list[Condition] = []


class Node(msgspec.Struct, frozen=True):
    metadata: ObjectMeta
    status: NodeStatus = NodeStatus()

    @property
    def ready(self) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in self.status.conditions)


class PodSpec(msgspec.Struct, frozen=True, rename="camel"):
    node_name: str = ""


class PodStatus(msgspec.Struct, frozen=True, rename="camel"):
    phase: str = ""
    container_statuses: list[ContainerStatus] = []
    init_container_statuses: list[ContainerStatus] = []
    ephemeral_container_statuses: list[ContainerStatus] = []


class Pod(msgspec.Struct, frozen=True):
    metadata: ObjectMeta
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    def image_ids(self) -> dict[str, str]:
        """Container name -> imageID, over containers, init containers and ephemeral containers."""
        statuses = (
            self.status.container_statuses
            + self.status.init_container_statuses
            + self.status.ephemeral_container_statuses
        )
        return {s.name: s.image_id for s in statuses}


class PodList(msgspec.Struct, frozen=True):
    items: list[Pod]


_node_decoder = msgspec.json.Decoder(Node)
_pod_decoder = msgspec.json.Decoder(Pod)
_pod_list_decoder = msgspec.json.Decoder(PodList)


def image_id_annotation(container: str) -> str:
    """The pod annotation whose value kwok reports verbatim as that container's imageID."""
    return IMAGE_ID_ANNOTATION_PREFIX + container


def expected_image_id(image: str, container: str, annotations: Mapping[str, str] | None = None) -> str:
    """The imageID kwok-stages.yaml gives a container; keep in step with its template."""
    override = (annotations or {}).get(image_id_annotation(container))
    if override is not None:
        return override
    if "@" in image:
        return re.sub(r":[^:/@]*@", "@", image, count=1)
    repository = re.sub(r":[^:/]*$", "", image)
    return f"{repository}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"


def fake_node_manifest(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A Node kwok manages (annotated as fake), with no taints; kwok fills its status."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, **(labels or {})},
            "annotations": {FAKE_NODE_ANNOTATION: "fake"},
        },
        "spec": {},
    }


async def create_fake_node(client: Kube, name: str, labels: Mapping[str, str] | None = None) -> None:
    await client.request("POST", "/api/v1/nodes", body=fake_node_manifest(name, labels))


async def get_node(client: Kube, name: str) -> Node:
    return _node_decoder.decode(await client.get(f"/api/v1/nodes/{name}"))


async def get_pod(client: Kube, namespace: str, name: str) -> Pod:
    return _pod_decoder.decode(await client.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))


async def list_pods(client: Kube, namespace: str, label_selector: str = "") -> list[Pod]:
    params = {"labelSelector": label_selector} if label_selector else {}
    return _pod_list_decoder.decode(await client.get(f"/api/v1/namespaces/{namespace}/pods", params)).items


async def create_namespace(client: Kube, name: str, timeout_s: float = 30.0) -> None:
    """Create a namespace and wait for its default ServiceAccount, without which no pod is admitted."""
    await client.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )

    async def default_account() -> bool | None:
        try:
            await client.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return True

    await wait_until(default_account, timeout_s, f"ServiceAccount {name}/default (is kube-controller-manager running?)")


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Poll `check` until it returns something other than None; raise TimeoutError naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


def bare_pod(name: str, image: str, node: str) -> dict[str, object]:
    """A pod of one container `app`, bound to `node` (no scheduler, no owner)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": image}]},
    }


def pinned_deployment(name: str, image: str, node: str, container: str) -> dict[str, object]:
    """A Deployment of two replicas of one container, both scheduled onto `node`: one digest on one node, twice."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{"name": container, "image": image}],
                },
            },
        },
    }


async def create_scan_namespaces(client: Kube, jobs: str, *apps: str) -> None:
    """The namespace scan Jobs run in (with its `scan` ServiceAccount) and those the watched workloads run in."""
    for namespace in (jobs, *apps):
        await create_namespace(client, namespace)
    await client.request(
        "POST",
        f"/api/v1/namespaces/{jobs}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "scan"}},
    )
