"""Proves the test control plane does what later suites rely on: kwok nodes, scheduled pods with imageIDs, Jobs, 410s."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import msgspec
import pytest

from podsweep.kube import Kube, KubeError
from tests.harness.kube import BINARIES, KubeControlPlane, KubeControlPlaneError
from tests.harness.kwok import (
    ObjectMeta,
    Pod,
    create_fake_node,
    expected_image_id,
    get_node,
    get_pod,
    image_id_annotation,
    list_pods,
    wait_until,
)

DIGEST = "sha256:" + "ab" * 32


class JobCondition(msgspec.Struct, frozen=True):
    type: str
    status: str


class JobStatus(msgspec.Struct, frozen=True):
    conditions: list[JobCondition] = []
    succeeded: int = 0


class Job(msgspec.Struct, frozen=True):
    status: JobStatus = JobStatus()


class Created(msgspec.Struct, frozen=True):
    metadata: ObjectMeta


class WatchStatus(msgspec.Struct, frozen=True):
    code: int = 0
    reason: str = ""


class WatchEvent(msgspec.Struct, frozen=True):
    type: str
    object: WatchStatus


_job_decoder = msgspec.json.Decoder(Job)
_watch_event_decoder = msgspec.json.Decoder(WatchEvent)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("image", "annotations", "expected"),
    [
        pytest.param(
            "registry.example.com/team/app:1.2",
            {},
            f"registry.example.com/team/app@sha256:{_sha('registry.example.com/team/app:1.2')}",
            id="tag-gives-stand-in-digest-of-the-image-string",
        ),
        pytest.param("busybox", {}, f"busybox@sha256:{_sha('busybox')}", id="bare-name-without-tag"),
        pytest.param(
            "localhost:5000/app",
            {},
            f"localhost:5000/app@sha256:{_sha('localhost:5000/app')}",
            id="registry-port-is-not-a-tag",
        ),
        pytest.param(
            "localhost:5000/app:v1",
            {},
            f"localhost:5000/app@sha256:{_sha('localhost:5000/app:v1')}",
            id="tag-after-registry-port-is-dropped",
        ),
        pytest.param(f"ghcr.io/o/app@{DIGEST}", {}, f"ghcr.io/o/app@{DIGEST}", id="digest-ref-is-kept"),
        pytest.param(f"ghcr.io/o/app:1@{DIGEST}", {}, f"ghcr.io/o/app@{DIGEST}", id="tag-and-digest-keeps-digest-only"),
        pytest.param(
            "nginx:1.27",
            {image_id_annotation("main"): "docker-pullable://nginx@" + DIGEST},
            "docker-pullable://nginx@" + DIGEST,
            id="annotation-wins-verbatim",
        ),
        pytest.param(
            "nginx:1.27",
            {image_id_annotation("other"): "x"},
            f"nginx@sha256:{_sha('nginx:1.27')}",
            id="annotation-for-another-container-is-ignored",
        ),
    ],
)
def test_expected_image_id_follows_the_stage_rules(image: str, annotations: dict[str, str], expected: str) -> None:
    assert expected_image_id(image, "main", annotations) == expected


async def _ready_fake_node(kube_api: Kube, label: str) -> str:
    name = f"kwok-{secrets.token_hex(4)}"
    await create_fake_node(kube_api, name, {"podsweep.test/node": label})

    async def ready() -> bool | None:
        return True if (await get_node(kube_api, name)).ready else None

    await wait_until(ready, 20, f"node {name} Ready")
    return name


@pytest.mark.kube
async def test_fake_node_becomes_ready_and_stays_kwok_managed(kube_api: Kube) -> None:
    name = await _ready_fake_node(kube_api, "ready")
    node = await get_node(kube_api, name)
    assert node.ready
    assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"


# Each container exercises one imageID rule of kwok-stages.yaml against the real kwok.
_DEPLOYMENT_CONTAINERS = [
    ("app", "registry.example.com/team/app:1.2"),
    ("pinned", f"registry.example.com/team/pinned:2@{DIGEST}"),
    ("sidecar", "busybox"),
]
_DEPLOYMENT_ANNOTATIONS = {image_id_annotation("sidecar"): f"docker.io/library/busybox@{DIGEST}"}


@pytest.mark.kube
async def test_deployment_pod_is_scheduled_onto_a_fake_node_and_runs_with_image_ids(
    kube_api: Kube, kube_namespace: str
) -> None:
    label = secrets.token_hex(4)
    node = await _ready_fake_node(kube_api, label)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": _DEPLOYMENT_ANNOTATIONS},
                "spec": {
                    "nodeSelector": {"podsweep.test/node": label},
                    "initContainers": [{"name": "migrate", "image": "registry.example.com/team/migrate:7"}],
                    "containers": [{"name": n, "image": image} for n, image in _DEPLOYMENT_CONTAINERS],
                },
            },
        },
    }
    await kube_api.request("POST", f"/apis/apps/v1/namespaces/{kube_namespace}/deployments", body=deployment)

    async def running_pod() -> Pod | None:
        pods = await list_pods(kube_api, kube_namespace, "app=web")
        return next((p for p in pods if p.status.phase == "Running"), None)

    pod = await wait_until(running_pod, 30, "a Running pod of Deployment web")

    assert pod.spec.node_name == node, "the scheduler placed the pod by its nodeSelector"
    assert pod.image_ids() == {
        "app": f"registry.example.com/team/app@sha256:{_sha('registry.example.com/team/app:1.2')}",
        "pinned": f"registry.example.com/team/pinned@{DIGEST}",
        "sidecar": f"docker.io/library/busybox@{DIGEST}",
        "migrate": f"registry.example.com/team/migrate@sha256:{_sha('registry.example.com/team/migrate:7')}",
    }
    for name, image in [*_DEPLOYMENT_CONTAINERS, ("migrate", "registry.example.com/team/migrate:7")]:
        assert pod.image_ids()[name] == expected_image_id(image, name, pod.metadata.annotations)


@pytest.mark.kube
async def test_ephemeral_container_added_to_a_running_pod_gets_an_image_id(kube_api: Kube, kube_namespace: str) -> None:
    node = await _ready_fake_node(kube_api, secrets.token_hex(4))
    pod_manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "target"},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    await kube_api.request("POST", f"/api/v1/namespaces/{kube_namespace}/pods", body=pod_manifest)

    async def running() -> Pod | None:
        pod = await get_pod(kube_api, kube_namespace, "target")
        return pod if pod.status.phase == "Running" else None

    await wait_until(running, 20, "pod target Running")
    for debugger in ("debug-1", "debug-2"):
        patch = {"spec": {"ephemeralContainers": [{"name": debugger, "image": f"registry.example.com/{debugger}:1"}]}}
        await kube_api.request(
            "PATCH",
            f"/api/v1/namespaces/{kube_namespace}/pods/target/ephemeralcontainers",
            body=patch,
            content_type="application/strategic-merge-patch+json",
        )

        async def reported(name: str = debugger) -> Pod | None:
            pod = await get_pod(kube_api, kube_namespace, "target")
            return pod if name in {s.name for s in pod.status.ephemeral_container_statuses} else None

        pod = await wait_until(reported, 20, f"status of ephemeral container {debugger}")
        assert pod.image_ids()[debugger] == expected_image_id(f"registry.example.com/{debugger}:1", debugger)

    assert sorted(s.name for s in pod.status.ephemeral_container_statuses) == ["debug-1", "debug-2"]
    assert pod.image_ids()["app"] == expected_image_id("registry.example.com/app:1", "app")


@pytest.mark.kube
@pytest.mark.kube
async def test_an_encoded_body_is_sent_as_it_is_with_auth_and_errors_like_any_call(
    kube_api: Kube, kube_namespace: str
) -> None:
    """The dispatcher POSTs its Jobs already encoded (msgspec): the same auth and the same KubeError as call_api."""
    path = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    body = msgspec.json.encode(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "encoded"}, "data": {"k": "v"}}
    )
    created = msgspec.json.decode(await kube_api.request("POST", path, params={"fieldManager": "podsweep"}, body=body))
    assert created["metadata"]["name"] == "encoded" and created["data"] == {"k": "v"}
    assert created["metadata"]["managedFields"][0]["manager"] == "podsweep", "query parameters are sent"
    with pytest.raises(KubeError) as again:
        await kube_api.request("POST", path, body=body)
    assert again.value.status == 409 and b"already exists" in again.value.body
    with pytest.raises(KubeError) as invalid:
        await kube_api.request("POST", path, body=b'{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}')
    assert invalid.value.status in (400, 422)


async def test_job_runs_to_complete_through_the_job_controller(kube_api: Kube, kube_namespace: str) -> None:
    node = await _ready_fake_node(kube_api, secrets.token_hex(4))
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "scan"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"job": "scan"}},
                "spec": {
                    "nodeName": node,
                    "restartPolicy": "Never",
                    "containers": [{"name": "trivy", "image": f"registry.example.com/trivy@{DIGEST}"}],
                },
            },
        },
    }
    await kube_api.request("POST", f"/apis/batch/v1/namespaces/{kube_namespace}/jobs", body=job)

    async def complete() -> Job | None:
        found = _job_decoder.decode(await kube_api.get(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/scan"))
        done = any(c.type == "Complete" and c.status == "True" for c in found.status.conditions)
        return found if done else None

    finished = await wait_until(complete, 30, "Job scan Complete")
    assert finished.status.succeeded == 1
    (pod,) = await list_pods(kube_api, kube_namespace, "job=scan")
    assert pod.status.phase == "Succeeded"
    assert pod.image_ids() == {"trivy": f"registry.example.com/trivy@{DIGEST}"}, "completion keeps the imageID"


@pytest.mark.kube
async def test_compaction_then_apiserver_restart_expires_old_resource_versions(
    kube: KubeControlPlane, kube_api: Kube, kube_namespace: str
) -> None:
    configmaps = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    created = await kube_api.request("POST", configmaps, body={"metadata": {"name": "first"}, "data": {}})
    old_version = msgspec.json.decode(created, type=Created).metadata.resource_version
    await kube_api.request("POST", configmaps, body={"metadata": {"name": "second"}, "data": {}})

    revision = kube.compact_etcd()
    assert revision > int(old_version)
    kube.restart_apiserver()

    client = await Kube.connect(str(kube.kubeconfig))  # the old client's connections died with the apiserver
    try:
        lines = [
            line async for line in client.watch(configmaps, {"resourceVersion": old_version, "timeoutSeconds": 2}, 10)
        ]
        names = await client.get(configmaps)
    finally:
        await client.close()
    assert [_watch_event_decoder.decode(line) for line in lines] == [
        WatchEvent(type="ERROR", object=WatchStatus(code=410, reason="Expired"))
    ]
    assert b'"second"' in names, "data survived the restart (same etcd)"


def _fake_bin_dir(tmp_path: Path, failing: str) -> Path:
    """Stand-in binaries: `failing` prints a complaint and exits 3, the others wait to be stopped."""
    for name in BINARIES:
        script = tmp_path / name
        body = f"echo '{name}: cannot start: disk on fire' >&2; exit 3" if name == failing else "exec sleep 60"
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return tmp_path


# etcd and the apiserver start first; the controllers and kwok only once /readyz answers, which these stand-ins
# never do, so a failure of one of the first two is what start() can meet here.
@pytest.mark.parametrize("failing", ["etcd", "kube-apiserver"])
def test_start_failure_names_the_process_quotes_its_log_and_stops_the_rest(tmp_path: Path, failing: str) -> None:
    (tmp_path / "bin").mkdir()
    plane = KubeControlPlane(bin_dir=_fake_bin_dir(tmp_path / "bin", failing), work_dir=tmp_path / "work")
    try:
        with pytest.raises(KubeControlPlaneError, match=rf"(?s){failing} exited with 3.*disk on fire"):
            plane.start(timeout_s=10)
        processes = list(plane.processes.values())
    finally:
        plane.stop()
    assert {p.name for p in processes} == {"etcd", "kube-apiserver"}, "nothing else starts before the API is ready"
    assert all(p.proc.poll() is not None for p in processes), "stop() leaves nothing running"
