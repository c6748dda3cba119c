"""The watcher against a real kube-apiserver + kwok and a real NATS: what runs becomes events, once."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import ConsumerSettings, NatsSettings, Settings, WatcherSettings
from podsweep.kube import Kube
from schemas import subjects
from schemas.events import ImageGone, ImageSeen, ScanCompleted, ScanFailed, ScanStarted
from services.dispatcher import jobspec
from services.watcher.main import main as watcher_main
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import (
    create_fake_node,
    create_namespace,
    expected_image_id,
    get_node,
    list_pods,
    wait_until,
)
from tests.harness.standin import StartStandin, scan_images
from tests.harness.streams import stored_messages

pytestmark = pytest.mark.kube


@dataclass
class Running:
    settings: Settings
    bus: busmod.Bus
    namespace: str
    scan_namespace: str
    nodes: list[str]
    task: asyncio.Task[None]
    stop: asyncio.Event
    seen: list[ImageSeen] = field(default_factory=list)
    gone: list[ImageGone] = field(default_factory=list)

    async def events(self) -> tuple[list[ImageSeen], list[ImageGone]]:
        """Every image.seen / image.gone the stream stored (duplicates dropped by msg id are not stored)."""
        out: dict[str, list[Any]] = {subjects.IMAGE_SEEN: [], subjects.IMAGE_GONE: []}
        for name, typ in ((subjects.IMAGE_SEEN, ImageSeen), (subjects.IMAGE_GONE, ImageGone)):
            for msg in await stored_messages(self.bus.js, self.bus.settings.stream, self.bus.subject(name)):
                out[name].append(msgspec.json.decode(msg.data, type=typ))
        return out[subjects.IMAGE_SEEN], out[subjects.IMAGE_GONE]

    async def wait_for(self, what: str, check: Any, timeout_s: float = 30) -> Any:
        async def poll() -> Any:
            seen, gone = await self.events()
            return check(seen, gone) or None

        return await wait_until(poll, timeout_s, what)


async def _ready_nodes(kube_api: Kube, count: int) -> list[str]:
    names = [f"w-{secrets.token_hex(3)}-{i}" for i in range(count)]
    for name in names:
        await create_fake_node(kube_api, name)

    async def ready() -> bool | None:
        return all([(await get_node(kube_api, n)).ready for n in names]) or None

    await wait_until(ready, 30, "nodes Ready")
    return names


@pytest.fixture
async def running(
    request: pytest.FixtureRequest,
    kube: KubeControlPlane,
    kube_api: Kube,
    kube_namespace: str,
    nats_settings: NatsSettings,
) -> AsyncIterator[Running]:
    """The watcher on this test's namespace; parametrize it indirectly with a resync interval to shorten that."""
    resync_interval_s = float(getattr(request, "param", 3600))
    scan_namespace = f"scans-{secrets.token_hex(3)}"
    await create_namespace(kube_api, scan_namespace)
    settings = Settings(
        cluster="test",
        kubeconfig=str(kube.kubeconfig),
        namespace=scan_namespace,
        nats=nats_settings,
        consumer=ConsumerSettings(max_deliver=3, backoff_s=[0.1]),
        watcher=WatcherSettings(include_namespaces=[kube_namespace], resync_interval_s=resync_interval_s),
    )
    bus = await busmod.connect(nats_settings, "test")
    await busmod.ensure_stream(bus)
    nodes = await _ready_nodes(kube_api, 2)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher_main(settings, stop))
    run = Running(settings, bus, kube_namespace, scan_namespace, nodes, task, stop)
    yield run
    stop.set()
    await asyncio.wait_for(task, 30)
    await bus.close()
    for node in nodes:
        with contextlib.suppress(Exception):
            await kube_api.request("DELETE", f"/api/v1/nodes/{node}")


def _pod(
    name: str, node: str, images: dict[str, str], init: dict[str, str] | None = None, **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {
            "nodeName": node,
            "initContainers": [{"name": n, "image": i} for n, i in (init or {}).items()],
            "containers": [{"name": n, "image": i} for n, i in images.items()],
        },
    }


def _deployment(name: str, node: str, image: str, replicas: int = 2) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "containers": [{"name": "app", "image": image}],
                },
            },
        },
    }


def _digest_of(image: str, container: str) -> str:
    return expected_image_id(image, container)


async def _sentinel(running: Running, kube_api: Kube, node: str) -> str:
    """Start a bare pod with an image of its own and wait for its image.seen: the watcher handles a namespace's pod
    events in order, so every pod change made before this one has been turned into events by then. Returns the
    sentinel's digest, for the caller to leave out."""
    name = f"sentinel-{secrets.token_hex(3)}"
    image = f"registry.test/{name}:1"
    await kube_api.request(
        "POST", f"/api/v1/namespaces/{running.namespace}/pods", body=_pod(name, node, {"mark": image})
    )
    await running.wait_for(f"the sentinel pod {name}", lambda s, g: [e for e in s if e.pod == name])
    return _digest_of(image, "mark")


async def test_pods_and_a_deployment_become_one_seen_per_digest_node_and_workload(
    running: Running, kube_api: Kube
) -> None:
    ns = running.namespace
    node_a, node_b = running.nodes
    path = f"/api/v1/namespaces/{ns}/pods"
    await kube_api.request(
        "POST", path, body=_pod("solo-a", node_a, {"app": "registry.test/app:1"}, {"setup": "registry.test/init:1"})
    )
    await kube_api.request("POST", path, body=_pod("solo-b", node_b, {"app": "registry.test/app:1"}))
    await kube_api.request("POST", path, body=_pod("twin-a", node_a, {"app": "registry.test/app:1"}))
    await kube_api.request(
        "POST", f"/apis/apps/v1/namespaces/{ns}/deployments", body=_deployment("web", node_b, "registry.test/web:2", 3)
    )
    app = _digest_of("registry.test/app:1", "app")
    init = _digest_of("registry.test/init:1", "setup")
    web = _digest_of("registry.test/web:2", "app")

    def complete(seen: list[ImageSeen], gone: list[ImageGone]) -> bool:
        return {(e.digest_ref, e.node) for e in seen} >= {(app, node_a), (app, node_b), (init, node_a), (web, node_b)}

    await running.wait_for("image.seen for every (digest, node)", complete)

    async def web_replicas_running() -> bool | None:
        pods = await list_pods(kube_api, ns, "app=web")
        return (len(pods) == 3 and all(p.image_ids() for p in pods)) or None

    await wait_until(web_replicas_running, 60, "the three web replicas running")
    mark = await _sentinel(running, kube_api, node_a)
    seen, gone = await running.events()
    seen = [e for e in seen if e.digest_ref != mark]
    # Three replicas of one Deployment are one sighting; two bare pods on one node are two workloads, and the
    # owners of each are told (the second seen of (app, node_a) is for the notifier, not the dispatcher).
    triples = [(e.digest_ref, e.node, e.workload.name) for e in seen]
    assert sorted(triples) == sorted(
        {
            (app, node_a, "solo-a"),
            (app, node_a, "twin-a"),
            (app, node_b, "solo-b"),
            (init, node_a, "solo-a"),
            (web, node_b, "web"),
        }
    ), "one per (digest, node, workload)"
    by_pair = {(e.digest_ref, e.node): e for e in seen}
    assert by_pair[(init, node_a)].container_kind == "init"
    assert by_pair[(web, node_b)].workload.kind == "Deployment"
    assert by_pair[(web, node_b)].workload.name == "web"
    assert by_pair[(app, node_b)].workload.kind == "Pod"
    assert gone == []

    # The last container of app on node_a stops only when both pods there are gone.
    await kube_api.request("DELETE", f"{path}/solo-a", params={"gracePeriodSeconds": 0})
    # solo-a alone ran init on node_a: its image.gone shows the watcher has handled the deletion.
    await running.wait_for("image.gone for init on node_a", lambda s, g: [e for e in g if e.digest_ref == init])
    assert [(e.digest_ref, e.node) for e in (await running.events())[1]] == [(init, node_a)]
    await kube_api.request("DELETE", f"{path}/twin-a", params={"gracePeriodSeconds": 0})
    await running.wait_for(
        "image.gone for app on node_a", lambda s, g: any((e.digest_ref, e.node) == (app, node_a) for e in g)
    )
    _, gone = await running.events()
    assert sorted((e.digest_ref, e.node) for e in gone) == sorted([(app, node_a), (init, node_a)])


async def test_hostile_annotations_are_validated_and_other_namespaces_ignored(
    running: Running, kube_api: Kube, kube_namespace: str
) -> None:
    other = f"other-{secrets.token_hex(3)}"
    await create_namespace(kube_api, other)
    node = running.nodes[0]
    await kube_api.request(
        "POST", f"/api/v1/namespaces/{other}/pods", body=_pod("outside", node, {"app": "registry.test/outside:1"})
    )
    annotations = {"podsweep.io/ignore-unfixed": "true", "podsweep.io/notify": "team-a; rm -rf /", "podsweep.io/x": "y"}
    await kube_api.request(
        "POST",
        f"/api/v1/namespaces/{kube_namespace}/pods",
        body=_pod("annotated", node, {"app": "registry.test/annotated:1"}, annotations=annotations),
    )
    seen = await running.wait_for("the annotated pod", lambda s, g: [e for e in s if e.pod == "annotated"])
    assert seen[0].options.ignore_unfixed is True
    assert seen[0].options.notify is None
    everything, _ = await running.events()
    assert all(e.namespace == kube_namespace for e in everything)


async def test_forced_relist_after_compaction_loses_nothing_and_repeats_nothing(
    running: Running, kube: KubeControlPlane, kube_api: Kube
) -> None:
    ns = running.namespace
    node = running.nodes[0]
    await kube_api.request(
        "POST", f"/api/v1/namespaces/{ns}/pods", body=_pod("before", node, {"app": "registry.test/a:1"})
    )
    await running.wait_for("before", lambda s, g: [e for e in s if e.pod == "before"])
    kube.compact_etcd()
    await asyncio.to_thread(kube.restart_apiserver)
    await kube_api.request(
        "POST", f"/api/v1/namespaces/{ns}/pods", body=_pod("after", node, {"app": "registry.test/b:1"})
    )
    await running.wait_for("after", lambda s, g: [e for e in s if e.pod == "after"], timeout_s=60)
    await kube_api.request("DELETE", f"/api/v1/namespaces/{ns}/pods/before", params={"gracePeriodSeconds": 0})
    await running.wait_for("gone of before", lambda s, g: g)
    seen, gone = await running.events()
    assert sorted(e.pod for e in seen) == ["after", "before"], "no duplicate image.seen after the relist"
    assert [e.digest_ref for e in gone] == [_digest_of("registry.test/a:1", "app")]


async def _scan_job(kube_api: Kube, namespace: str, node: str, digest_ref: str) -> str:
    scan_id = f"scan-{secrets.token_hex(6)}"
    scan = jobspec.validated_node_scan(
        scan_id=scan_id, digest_ref=digest_ref, node=node, raw_put_url="http://127.0.0.1:9/raw", sbom_put_url=None
    )
    options = jobspec.JobOptions(namespace=namespace, trivy_server="http://127.0.0.1:9", service_account=None)
    manifest = jobspec.build_node_scan_job(scan, options)
    await kube_api.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=manifest)
    return scan_id


async def _scan_events(running: Running, name: str, typ: type[Any]) -> list[Any]:
    bus = running.bus
    return [
        msgspec.json.decode(msg.data, type=typ)
        for msg in await stored_messages(bus.js, bus.settings.stream, bus.subject(name))
    ]


async def test_scan_job_that_succeeds_is_started_then_completed(
    running: Running, kube_api: Kube, kubelet_standin: StartStandin
) -> None:
    await kubelet_standin(namespace=running.scan_namespace, execute=False)
    digest_ref = "registry.test/app@sha256:" + "1" * 64
    scan_id = await _scan_job(kube_api, running.scan_namespace, running.nodes[0], digest_ref)

    async def completed() -> list[Any] | None:
        return [
            e for e in await _scan_events(running, subjects.SCAN_COMPLETED, ScanCompleted) if e.scan_id == scan_id
        ] or None

    await wait_until(completed, 60, "scan.completed")
    started = [e for e in await _scan_events(running, subjects.SCAN_STARTED, ScanStarted) if e.scan_id == scan_id]
    assert len(started) <= 1  # a pod that finishes before the watcher looks is reported completed only
    assert [e.scan_id for e in await _scan_events(running, subjects.SCAN_FAILED, ScanFailed)] == []


async def test_scan_job_whose_image_is_not_on_the_node_fails_with_err_image_never_pull(
    running: Running, kube_api: Kube, kubelet_standin: StartStandin, trivy_bin: Path
) -> None:
    await kubelet_standin(scan_images(trivy_bin), namespace=running.scan_namespace)
    digest_ref = "registry.test/missing@sha256:" + "2" * 64
    scan_id = await _scan_job(kube_api, running.scan_namespace, running.nodes[1], digest_ref)

    async def failed() -> list[ScanFailed] | None:
        return [
            e for e in await _scan_events(running, subjects.SCAN_FAILED, ScanFailed) if e.scan_id == scan_id
        ] or None

    events = await wait_until(failed, 60, "scan.failed")
    assert events[0].reason == "ErrImageNeverPull"
    assert events[0].node == running.nodes[1]


class _Uid(msgspec.Struct):
    uid: str


class _Created(msgspec.Struct):
    metadata: _Uid


async def _create(kube_api: Kube, path: str, manifest: dict[str, Any]) -> str:
    """POST an object and return its uid."""
    return msgspec.json.decode(await kube_api.request("POST", path, body=manifest), type=_Created).metadata.uid


def _seen_pairs(seen: list[ImageSeen]) -> list[tuple[str, str]]:
    return [(e.digest_ref, e.node) for e in seen]


async def test_ephemeral_container_added_to_a_running_pod_is_seen_as_ephemeral(
    running: Running, kube_api: Kube
) -> None:
    ns, node = running.namespace, running.nodes[0]
    await kube_api.request(
        "POST", f"/api/v1/namespaces/{ns}/pods", body=_pod("debug-me", node, {"app": "registry.test/app:3"})
    )
    await running.wait_for("the app container", lambda s, g: [e for e in s if e.pod == "debug-me"])
    patch = {"spec": {"ephemeralContainers": [{"name": "debugger", "image": "registry.test/debug:1"}]}}
    await kube_api.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/debug-me/ephemeralcontainers",
        body=patch,
        content_type="application/strategic-merge-patch+json",
    )
    found = await running.wait_for("the ephemeral container", lambda s, g: [e for e in s if e.container == "debugger"])
    assert found[0].container_kind == "ephemeral"
    assert found[0].digest_ref == _digest_of("registry.test/debug:1", "debugger")
    assert found[0].workload.kind == "Pod"
    mark = await _sentinel(running, kube_api, node)
    seen, gone = await running.events()
    seen = [e for e in seen if e.digest_ref != mark]
    assert sorted(_seen_pairs(seen)) == sorted(
        [(_digest_of("registry.test/app:3", "app"), node), (_digest_of("registry.test/debug:1", "debugger"), node)]
    ), "adding a container re-announces nothing that already ran"
    assert gone == []


async def test_job_created_for_a_cronjob_resolves_to_the_cronjob(running: Running, kube_api: Kube) -> None:
    ns, node = running.namespace, running.nodes[0]
    template = {
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{"name": "task", "image": "registry.test/nightly:1"}],
        }
    }
    cron_uid = await _create(
        kube_api,
        f"/apis/batch/v1/namespaces/{ns}/cronjobs",
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "nightly"},
            # Suspended: the only Job is the one made by hand below, as the CronJob controller would make it.
            "spec": {"schedule": "0 3 * * *", "suspend": True, "jobTemplate": {"spec": {"template": template}}},
        },
    )
    owner = {"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": cron_uid, "controller": True}
    await _create(
        kube_api,
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "nightly-29000000", "ownerReferences": [owner]},
            "spec": {"backoffLimit": 0, "template": template},
        },
    )
    found = await running.wait_for("the Job's pod", lambda s, g: [e for e in s if e.container == "task"], 60)
    assert found[0].pod.startswith("nightly-29000000-")
    assert (found[0].workload.kind, found[0].workload.name) == ("CronJob", "nightly")
    assert found[0].digest_ref == _digest_of("registry.test/nightly:1", "task")


async def test_deployment_rollout_gives_seen_for_the_new_digest_and_gone_for_the_old(
    running: Running, kube_api: Kube
) -> None:
    ns, node = running.namespace, running.nodes[1]
    deployments = f"/apis/apps/v1/namespaces/{ns}/deployments"
    await kube_api.request("POST", deployments, body=_deployment("roll", node, "registry.test/roll:1", 2))
    old = _digest_of("registry.test/roll:1", "app")
    new = _digest_of("registry.test/roll:2", "app")
    await running.wait_for("the first version", lambda s, g: [e for e in s if e.digest_ref == old], 60)
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "registry.test/roll:2"}]}}}}
    await kube_api.request(
        "PATCH", f"{deployments}/roll", body=patch, content_type="application/strategic-merge-patch+json"
    )
    await running.wait_for(
        "seen for the new digest and gone for the old",
        lambda s, g: any(e.digest_ref == new for e in s) and any(e.digest_ref == old for e in g),
        90,
    )
    seen, gone = await running.events()
    assert sorted(_seen_pairs(seen)) == sorted([(old, node), (new, node)]), "one seen per digest, not one per pod"
    assert [(e.digest_ref, e.node) for e in gone] == [(old, node)], "the new digest still runs"
    assert {(e.workload.kind, e.workload.name) for e in seen} == {("Deployment", "roll")}


@pytest.mark.parametrize("running", [10], indirect=True, ids=["resync-every-10s"])
async def test_resync_republishes_what_runs_once_per_slot(running: Running, kube_api: Kube) -> None:
    ns, node = running.namespace, running.nodes[0]
    await kube_api.request(
        "POST", f"/api/v1/namespaces/{ns}/pods", body=_pod("steady", node, {"app": "registry.test/steady:1"})
    )
    first = await running.wait_for("the first image.seen", lambda s, g: [e for e in s if not e.resync])
    resynced = await running.wait_for("a resync image.seen", lambda s, g: [e for e in s if e.resync], 30)
    assert (resynced[0].digest_ref, resynced[0].node) == (first[0].digest_ref, first[0].node)
    assert (resynced[0].pod, resynced[0].workload) == (first[0].pod, first[0].workload)
    assert resynced[0].observed_at.timestamp() % 10 == 0, "stamped with its slot, so a replica's copy is a duplicate"
    seen, _ = await running.events()
    slots = [e.observed_at for e in seen if e.resync]
    assert len(slots) == len(set(slots)), "one resync event per slot"
    assert len([e for e in seen if not e.resync]) == 1


@pytest.mark.parametrize(
    ("api_version", "kind", "name"),
    [
        ("example.com/v1", "Widget", "widget-1"),  # group not served: discovery says so
        ("argoproj.io/v1alpha1", "Rollout", "canary"),  # well-known plural, GET answers 404
    ],
    ids=["unknown-kind-needs-discovery", "known-plural-not-installed"],
)
async def test_owner_of_a_kind_the_cluster_does_not_serve_is_the_workload(
    running: Running, kube_api: Kube, api_version: str, kind: str, name: str
) -> None:
    ns, node = running.namespace, running.nodes[0]
    owner = {"apiVersion": api_version, "kind": kind, "name": name, "uid": str(uuid.uuid4()), "controller": True}
    pod = _pod("custom-owned", node, {"app": "registry.test/custom:1"}, ownerReferences=[owner])
    await kube_api.request("POST", f"/api/v1/namespaces/{ns}/pods", body=pod)
    found = await running.wait_for("the custom-owned pod", lambda s, g: [e for e in s if e.pod == "custom-owned"])
    assert (found[0].workload.kind, found[0].workload.name) == (kind, name)
