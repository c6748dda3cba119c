"""Decoding the API server's bytes: list pages, watch lines (bookmarks, 410 errors), owners, discovery."""

from __future__ import annotations

import msgspec
import pytest

from services.watcher import kubeobjects

POD = (
    b'{"metadata":{"name":"web-1","generateName":"web-","namespace":"shop","uid":"u1","resourceVersion":"41",'
    b'"labels":{"app":"web"},"annotations":{"podsweep.io/notify":"ops"},'
    b'"ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"web-7d9f","uid":"rs1",'
    b'"controller":true,"blockOwnerDeletion":true}],'
    b'"managedFields":[{"manager":"kubelet","fieldsV1":{"f:status":{"f:phase":{}}}}]},'
    b'"spec":{"volumes":[{"name":"v","emptyDir":{}}],"initContainers":[{"name":"init","image":"busybox",'
    b'"restartPolicy":"Always"}],"containers":[{"name":"app","image":"nginx:1.27","env":[{"name":"A","value":"1"}]}],'
    b'"restartPolicy":"OnFailure","nodeName":"node-1","tolerations":[]},'
    b'"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}],"hostIP":"10.0.0.1",'
    b'"initContainerStatuses":[{"name":"init","state":{"running":{"startedAt":"2026-11-23T08:00:00Z"}},'
    b'"imageID":"docker.io/library/busybox@sha256:' + b"b" * 64 + b'"}],'
    b'"containerStatuses":[{"name":"app","state":{"waiting":{"reason":"CrashLoopBackOff","message":"back-off"}},'
    b'"lastState":{"terminated":{"exitCode":1}},"ready":false,"restartCount":4,"image":"docker.io/library/nginx:1.27",'
    b'"imageID":"docker.io/library/nginx@sha256:' + b"a" * 64 + b'","containerID":"containerd://x","started":false}]}}'
)


def test_a_pod_keeps_only_what_podsweep_uses() -> None:
    items, token, rv = kubeobjects.PODS.decode_page(
        b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42","continue":"tok"},"items":['
        + POD
        + b"]}"
    )
    assert (token, rv) == ("tok", "42")
    [pod] = items
    assert pod.metadata == kubeobjects.PodMeta(
        name="web-1",
        namespace="shop",
        uid="u1",
        resource_version="41",
        annotations={"podsweep.io/notify": "ops"},
        owner_references=(kubeobjects.OwnerReference("apps/v1", "ReplicaSet", "web-7d9f", "rs1", True),),
    )
    assert pod.spec == kubeobjects.PodSpec(
        init_containers=(kubeobjects.Container("init", "busybox"),),
        containers=(kubeobjects.Container("app", "nginx:1.27"),),
        restart_policy="OnFailure",
        node_name="node-1",
    )
    assert pod.status.phase == "Running"
    [app] = pod.status.container_statuses
    assert app.state == kubeobjects.ContainerState(waiting=kubeobjects.StateWaiting("CrashLoopBackOff", "back-off"))
    assert app.image_id == "docker.io/library/nginx@sha256:" + "a" * 64
    assert pod.status.init_container_statuses[0].state.running == kubeobjects.StateRunning()


def test_a_scan_pod_keeps_labels_and_conditions() -> None:
    [pod], _, _ = kubeobjects.SCAN_PODS.decode_page(b'{"metadata":{},"items":[' + POD + b"]}")
    assert pod.metadata.labels == {"app": "web"}
    assert pod.status.conditions == (kubeobjects.Condition("Ready", "True"),)


def test_last_page_has_no_continue_token() -> None:
    assert kubeobjects.PODS.decode_page(b'{"metadata":{"resourceVersion":"7"},"items":[]}') == ([], "", "7")


@pytest.mark.parametrize(
    ("line", "expected_type", "has_object", "rv", "code"),
    [
        pytest.param(b'{"type":"ADDED","object":' + POD + b"}", "ADDED", True, "41", 0, id="added"),
        pytest.param(b'{"type":"MODIFIED","object":' + POD + b"}", "MODIFIED", True, "41", 0, id="modified"),
        pytest.param(b'{"type":"DELETED","object":' + POD + b"}\n", "DELETED", True, "41", 0, id="deleted-newline"),
        pytest.param(
            b'{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"99",'
            b'"annotations":{"k8s.io/initial-events-end":"true"}},"spec":{"containers":null}}}',
            "BOOKMARK",
            False,
            "99",
            0,
            id="bookmark-only-moves-the-resource-version",
        ),
        pytest.param(
            b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
            b'"message":"too old resource version: 1 (42)","reason":"Expired","code":410}}',
            "ERROR",
            False,
            "",
            410,
            id="error-410-gone",
        ),
        pytest.param(
            b'{"type":"ERROR","object":{"kind":"Status","status":"Failure"}}',
            "ERROR",
            False,
            "",
            500,
            id="error-no-code",
        ),
    ],
)
def test_watch_lines(line: bytes, expected_type: str, has_object: bool, rv: str, code: int) -> None:
    kind, obj, line_rv, line_code = kubeobjects.PODS.decode_line(line)
    assert (kind, obj is not None, line_rv, line_code) == (expected_type, has_object, rv, code)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"items":{"a":1}}', id="items-not-a-list"),
        pytest.param(b'{"items":[{"metadata":{"annotations":{"a":1}}}]}', id="annotation-not-a-string"),
    ],
)
def test_malformed_pages_raise_a_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        kubeobjects.PODS.decode_page(data)


def test_job_status_times_and_conditions() -> None:
    line = (
        b'{"type":"MODIFIED","object":{"metadata":{"name":"j","resourceVersion":"5","labels":{"a":"b"}},'
        b'"spec":{"template":{}},"status":{"conditions":[{"type":"Complete","status":"True",'
        b'"lastTransitionTime":"2026-11-23T08:55:00Z"}],"startTime":"2026-11-23T08:50:00Z","succeeded":1}}}'
    )
    kind, job, rv, _ = kubeobjects.JOBS.decode_line(line)
    assert (kind, rv) == ("MODIFIED", "5")
    assert job is not None
    assert job.metadata.labels == {"a": "b"}
    assert job.status.succeeded == 1
    assert job.status.conditions[0].type == "Complete"
    assert job.status.start_time is not None
    assert job.status.start_time.isoformat() == "2026-11-23T08:50:00+00:00"


def test_owner_metadata_and_discovery() -> None:
    owner = kubeobjects.decode_owner(
        b'{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"name":"web-7d9f",'
        b'"namespace":"shop","uid":"rs1","ownerReferences":[{"apiVersion":"apps/v1","kind":"Deployment",'
        b'"name":"web","uid":"d1","controller":true}]}}'
    )
    assert owner.metadata.owner_references[0].kind == "Deployment"
    discovery = kubeobjects.decode_api_resources(
        b'{"kind":"APIResourceList","groupVersion":"argoproj.io/v1alpha1","resources":[{"name":"rollouts",'
        b'"singularName":"rollout","namespaced":true,"kind":"Rollout","verbs":["get"]}]}'
    )
    assert discovery.resources == [kubeobjects.APIResource("rollouts", "Rollout", True)]
