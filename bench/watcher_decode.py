"""Benchmark: decoding one raw PodList, by the watcher's own path, by kubernetes-asyncio models and by json.loads.

Generates a realistic list (labels, annotations, an init container and two app containers, managedFields, status
with conditions and container statuses) of N pods, decodes the same bytes three ways in one run, and prints one
JSON object as its last line. Not part of the test run.

    .venv/bin/python bench/watcher_decode.py --pods 10000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.watcher import kubeobjects, podstate

TEAMS = ["payments", "search", "checkout", "identity", "ml-serving", "platform", "observability", "ledger"]
IMAGES = [
    ("registry.example.com/{team}/api", "1.{n}.0"),
    ("ghcr.io/example/{team}-worker", "2024.{n}"),
    ("docker.io/library/nginx", "1.27.{n}"),
    ("quay.io/prometheus/node-exporter", "v1.8.{n}"),
]


def _sha(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _fields_v1_spec(containers: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "f:dnsPolicy": {},
        "f:enableServiceLinks": {},
        "f:restartPolicy": {},
        "f:schedulerName": {},
        "f:securityContext": {},
        "f:terminationGracePeriodSeconds": {},
        "f:volumes": {'k:{"name":"config"}': {".": {}, "f:configMap": {".": {}, "f:name": {}}, "f:name": {}}},
    }
    spec["f:containers"] = {
        f'k:{{"name":"{name}"}}': {
            ".": {},
            "f:env": {f'k:{{"name":"VAR_{i}"}}': {".": {}, "f:name": {}, "f:value": {}} for i in range(5)},
            "f:image": {},
            "f:imagePullPolicy": {},
            "f:name": {},
            "f:ports": {'k:{"containerPort":8080,"protocol":"TCP"}': {".": {}, "f:containerPort": {}, "f:name": {}}},
            "f:readinessProbe": {".": {}, "f:httpGet": {".": {}, "f:path": {}, "f:port": {}}},
            "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}}, "f:requests": {".": {}, "f:cpu": {}}},
            "f:terminationMessagePath": {},
            "f:terminationMessagePolicy": {},
            "f:volumeMounts": {'k:{"mountPath":"/etc/app"}': {".": {}, "f:mountPath": {}, "f:name": {}}},
        }
        for name in containers
    }
    return spec


def _container(name: str, image: str, i: int) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "args": ["--config=/etc/app/config.yaml", f"--shard={i % 16}", "--log-format=json"],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "env": [{"name": f"VAR_{k}", "value": f"value-{k}-{i % 7}"} for k in range(5)],
        "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "256Mi"}},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app"},
            {
                "name": "kube-api-access-x7k2p",
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            },
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
            "timeoutSeconds": 1,
            "periodSeconds": 10,
            "successThreshold": 1,
            "failureThreshold": 3,
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _status(name: str, image: str, digest: str, i: int, *, init: bool) -> dict[str, Any]:
    repo = image.rsplit(":", 1)[0]
    state: dict[str, Any] = (
        {
            "terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": "2026-11-20T10:00:01Z",
                "finishedAt": "2026-11-20T10:00:03Z",
                "containerID": f"containerd://{_sha('c', name, i)}",
            }
        }
        if init
        else {"running": {"startedAt": "2026-11-20T10:00:05Z"}}
    )
    return {
        "name": name,
        "state": state,
        "lastState": {},
        "ready": not init,
        "restartCount": i % 3,
        "image": image,
        "imageID": f"{repo}@sha256:{digest}",
        "containerID": f"containerd://{_sha('c', name, i)}",
        "started": not init,
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app"},
            {
                "name": "kube-api-access-x7k2p",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
                "recursiveReadOnly": "Disabled",
            },
        ],
    }


def make_pod(i: int) -> dict[str, Any]:
    team = TEAMS[i % len(TEAMS)]
    deployment = f"{team}-svc-{i % 50}"
    rs = f"{deployment}-{_sha('rs', deployment)[:10]}"
    name = f"{rs}-{_sha('pod', i)[:5]}"
    images = []
    for k, (repo, tag) in enumerate(IMAGES[:3]):
        image = f"{repo.format(team=team)}:{tag.format(n=(i + k) % 9)}"
        images.append((image, _sha(image)))
    init_image, init_digest = images[2]
    containers = [("app", *images[0]), ("worker", *images[1])]
    return {
        "metadata": {
            "name": name,
            "generateName": f"{rs}-",
            "namespace": team,
            "uid": str(uuid.UUID(_sha("uid", i)[:32])),
            "resourceVersion": str(100000 + i),
            "creationTimestamp": "2026-11-20T10:00:00Z",
            "labels": {
                "app.kubernetes.io/name": deployment,
                "app.kubernetes.io/part-of": team,
                "app.kubernetes.io/version": f"1.{i % 9}.0",
                "pod-template-hash": rs.rsplit("-", 1)[1],
                "team": team,
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "8080",
                "kubectl.kubernetes.io/restartedAt": "2026-11-19T08:00:00Z",
                "podsweep.io/ignore-unfixed": "true" if i % 4 == 0 else "false",
                "podsweep.io/notify": f"{team}-oncall",
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": rs,
                    "uid": str(uuid.UUID(_sha("rs-uid", rs)[:32])),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-20T10:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:generateName": {},
                            "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}},
                            "f:ownerReferences": {".": {}, f'k:{{"uid":"{_sha("rs-uid", rs)[:8]}"}}': {}},
                        },
                        "f:spec": _fields_v1_spec(["app", "worker"]),
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-20T10:00:06Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:status": {
                            "f:conditions": {
                                f'k:{{"type":"{t}"}}': {
                                    ".": {},
                                    "f:lastProbeTime": {},
                                    "f:lastTransitionTime": {},
                                    "f:status": {},
                                    "f:type": {},
                                }
                                for t in ("ContainersReady", "Initialized", "PodReadyToStartContainers", "Ready")
                            },
                            "f:containerStatuses": {},
                            "f:hostIP": {},
                            "f:phase": {},
                            "f:podIP": {},
                            "f:podIPs": {".": {}, 'k:{"ip":"10.244.1.5"}': {".": {}, "f:ip": {}}},
                            "f:startTime": {},
                        }
                    },
                    "subresource": "status",
                },
            ],
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": f"{deployment}-config", "defaultMode": 420}},
                {
                    "name": "kube-api-access-x7k2p",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {
                                "downwardAPI": {
                                    "items": [
                                        {
                                            "path": "namespace",
                                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                        }
                                    ]
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                },
            ],
            "initContainers": [_container("migrate", init_image, i)],
            "containers": [_container(n, image, i) for n, image, _ in containers],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": f"node-{i % 100:03d}",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": "2026-11-20T10:00:06Z"}
                for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "hostIP": f"10.0.{i % 100}.10",
            "hostIPs": [{"ip": f"10.0.{i % 100}.10"}],
            "podIP": f"10.244.{i % 250}.{i % 200 + 2}",
            "podIPs": [{"ip": f"10.244.{i % 250}.{i % 200 + 2}"}],
            "startTime": "2026-11-20T10:00:00Z",
            "initContainerStatuses": [_status("migrate", init_image, init_digest, i, init=True)],
            "containerStatuses": [_status(n, image, digest, i, init=False) for n, image, digest in containers],
            "qosClass": "Burstable",
        },
    }


def make_pod_list(n: int) -> bytes:
    return json.dumps(
        {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(100000 + n)},
            "items": [make_pod(i) for i in range(n)],
        },
        separators=(",", ":"),
    ).encode()


def timed(run: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def podsweep_decode(data: bytes) -> int:
    items, _, _ = kubeobjects.PODS.decode_page(data)
    return len(items)


def podsweep_decode_and_extract(data: bytes) -> int:
    """Decode plus the digests of every running container: what the watcher does per pod before any API call."""
    items, _, _ = kubeobjects.PODS.decode_page(data)
    return sum(len(podstate.images_of(pod).running) for pod in items)


async def measure(data: bytes, rounds: int) -> dict[str, float]:
    """Best time of each decoder. Rounds interleave them, so load from elsewhere on the machine hits all alike."""
    from kubernetes_asyncio.client import ApiClient

    api = ApiClient()

    def kubernetes_asyncio_decode() -> object:
        # What call_api does with a preloaded response: decode the bytes to text, then deserialize into models.
        response: Any = SimpleNamespace(data=data.decode("utf-8"))
        pods = api.deserialize(response, "V1PodList")
        assert len(pods.items) > 0
        return pods

    best = {"podsweep": float("inf"), "extract": float("inf"), "json": float("inf"), "kube": float("inf")}
    try:
        for _ in range(rounds):
            for _ in range(3):  # the fast decoders run several times per round: a slow one's round takes seconds
                best["podsweep"] = min(best["podsweep"], timed(lambda: podsweep_decode(data)))
                best["extract"] = min(best["extract"], timed(lambda: podsweep_decode_and_extract(data)))
            best["json"] = min(best["json"], timed(lambda: json.loads(data)))
            best["kube"] = min(best["kube"], timed(kubernetes_asyncio_decode))
    finally:
        await api.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many interleaved rounds")
    args = parser.parse_args()
    n = args.pods

    data = make_pod_list(n)
    assert podsweep_decode(data) == n
    print(f"pod list: {n} pods, {len(data) / 1e6:.1f} MB, {len(data) / n / 1024:.1f} KiB per pod", file=sys.stderr)

    best = asyncio.run(measure(data, args.rounds))
    print(f"podsweep decode + digests of every container: {n / best['extract']:,.0f} pods/s", file=sys.stderr)
    result = {
        "pods": n,
        "podsweep_pods_per_s": round(n / best["podsweep"]),
        "kubernetes_asyncio_pods_per_s": round(n / best["kube"]),
        "json_pods_per_s": round(n / best["json"]),
        "ratio": round(best["kube"] / best["podsweep"], 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
