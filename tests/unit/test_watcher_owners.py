"""The owner walk: pod → … → top-level workload, with the lookups the shell would make."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

from schemas.events import Workload
from services.watcher import kubeobjects, owners
from services.watcher.owners import OwnerLookup, Resolved


def ref(kind: str, name: str, api_version: str = "apps/v1", controller: bool = True, uid: str = "") -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid or f"uid-{kind}-{name}",
        "controller": controller,
    }


def refs(*items: dict[str, Any]) -> list[kubeobjects.OwnerReference]:
    return msgspec.convert(list(items), list[kubeobjects.OwnerReference])


def owner(kind: str, name: str, *owner_refs: dict[str, Any], api_version: str = "apps/v1") -> bytes:
    return msgspec.json.encode(
        {
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": "shop",
                "uid": f"uid-{kind}-{name}",
                "managedFields": [{"manager": "x"}],
                "ownerReferences": list(owner_refs),
            },
        }
    )


CLUSTER: dict[tuple[str, str, str, str], bytes] = {
    ("apps", "ReplicaSet", "shop", "web-7d9f"): owner("ReplicaSet", "web-7d9f", ref("Deployment", "web")),
    ("apps", "Deployment", "shop", "web"): owner("Deployment", "web"),
    ("batch", "Job", "shop", "backup-2911"): owner(
        "Job", "backup-2911", ref("CronJob", "backup", "batch/v1"), api_version="batch/v1"
    ),
    ("batch", "CronJob", "shop", "backup"): owner("CronJob", "backup", api_version="batch/v1"),
    ("apps", "StatefulSet", "shop", "db"): owner("StatefulSet", "db"),
    ("apps", "DaemonSet", "shop", "agent"): owner("DaemonSet", "agent"),
    ("apps", "ReplicaSet", "shop", "canary-5c4"): owner(
        "ReplicaSet", "canary-5c4", ref("Rollout", "canary", "argoproj.io/v1alpha1")
    ),
    ("argoproj.io", "Rollout", "shop", "canary"): owner("Rollout", "canary", api_version="argoproj.io/v1alpha1"),
    ("example.com", "Widget", "shop", "w1"): owner(
        "Widget", "w1", ref("WidgetSet", "ws", "example.com/v1"), api_version="example.com/v1"
    ),
    ("example.com", "WidgetSet", "shop", "ws"): owner("WidgetSet", "ws", api_version="example.com/v1"),
    # An operator's Deployment owned by its custom resource.
    ("apps", "ReplicaSet", "shop", "op-1"): owner("ReplicaSet", "op-1", ref("Deployment", "op")),
    ("apps", "Deployment", "shop", "op"): owner("Deployment", "op", ref("Database", "main", "db.example.com/v1")),
    ("db.example.com", "Database", "shop", "main"): owner("Database", "main", api_version="db.example.com/v1"),
    # A cycle (never made by a controller, but the API server does not forbid it).
    ("apps", "ReplicaSet", "shop", "loop-a"): owner("ReplicaSet", "loop-a", ref("ReplicaSet", "loop-b")),
    ("apps", "ReplicaSet", "shop", "loop-b"): owner("ReplicaSet", "loop-b", ref("ReplicaSet", "loop-a")),
}
DISCOVERY = {
    "/apis/example.com/v1": msgspec.json.encode(
        {
            "groupVersion": "example.com/v1",
            "resources": [
                {"name": "widgets", "kind": "Widget", "namespaced": True},
                {"name": "widgets/status", "kind": "Widget", "namespaced": True},
                {"name": "widgetsets", "kind": "WidgetSet", "namespaced": True},
            ],
        }
    ),
    "/apis/db.example.com/v1": msgspec.json.encode(
        {
            "groupVersion": "db.example.com/v1",
            "resources": [{"name": "databases", "kind": "Database", "namespaced": True}],
        }
    ),
}


def walk(
    owner_refs: list[kubeobjects.OwnerReference],
    cluster: Mapping[tuple[str, str, str, str], bytes] = CLUSTER,
) -> tuple[Resolved, list[str]]:
    """What the shell does: GET each lookup (metadata only), discovery for unknown kinds; returns the calls made."""
    calls: list[str] = []
    step = owners.start("shop", "web-7d9f-abcde", owner_refs)
    while isinstance(step, OwnerLookup):
        if step.plural is None:
            calls.append(step.discovery_path())
            discovery = DISCOVERY.get(step.discovery_path())
            step = owners.with_plural(
                step, kubeobjects.decode_api_resources(discovery) if discovery else kubeobjects.APIResourceList()
            )
            continue
        calls.append(step.path())
        found = cluster.get(step.cache_key())
        step = owners.advance(step, kubeobjects.decode_owner(found) if found else None)
    return step, calls


@pytest.mark.parametrize(
    ("owner_refs", "workload", "calls"),
    [
        pytest.param(
            [ref("ReplicaSet", "web-7d9f")],
            Workload("Deployment", "web"),
            ["/apis/apps/v1/namespaces/shop/replicasets/web-7d9f", "/apis/apps/v1/namespaces/shop/deployments/web"],
            id="deployment",
        ),
        pytest.param(
            [ref("Job", "backup-2911", "batch/v1")],
            Workload("CronJob", "backup"),
            ["/apis/batch/v1/namespaces/shop/jobs/backup-2911", "/apis/batch/v1/namespaces/shop/cronjobs/backup"],
            id="cronjob",
        ),
        pytest.param(
            [ref("StatefulSet", "db")],
            Workload("StatefulSet", "db"),
            ["/apis/apps/v1/namespaces/shop/statefulsets/db"],
            id="statefulset",
        ),
        pytest.param(
            [ref("DaemonSet", "agent")],
            Workload("DaemonSet", "agent"),
            ["/apis/apps/v1/namespaces/shop/daemonsets/agent"],
            id="daemonset",
        ),
        pytest.param(
            [ref("ReplicaSet", "canary-5c4")],
            Workload("Rollout", "canary"),
            [
                "/apis/apps/v1/namespaces/shop/replicasets/canary-5c4",
                "/apis/argoproj.io/v1alpha1/namespaces/shop/rollouts/canary",
            ],
            id="argo-rollout",
        ),
        pytest.param(
            [ref("Widget", "w1", "example.com/v1")],
            Workload("WidgetSet", "ws"),
            [
                "/apis/example.com/v1",
                "/apis/example.com/v1/namespaces/shop/widgets/w1",
                "/apis/example.com/v1",
                "/apis/example.com/v1/namespaces/shop/widgetsets/ws",
            ],
            id="custom-kinds-through-discovery",
        ),
        pytest.param(
            [ref("ReplicaSet", "op-1")],
            Workload("Database", "main"),
            [
                "/apis/apps/v1/namespaces/shop/replicasets/op-1",
                "/apis/apps/v1/namespaces/shop/deployments/op",
                "/apis/db.example.com/v1",
                "/apis/db.example.com/v1/namespaces/shop/databases/main",
            ],
            id="operator-owned-deployment",
        ),
        pytest.param([], Workload("Pod", "web-7d9f-abcde"), [], id="bare-pod-is-its-own-workload"),
        pytest.param(
            [ref("ReplicaSet", "web-7d9f", controller=False)],
            Workload("Pod", "web-7d9f-abcde"),
            [],
            id="non-controller-reference-is-not-followed",
        ),
        pytest.param(
            [ref("ConfigMap", "cfg", "v1", controller=False), ref("StatefulSet", "db")],
            Workload("StatefulSet", "db"),
            ["/apis/apps/v1/namespaces/shop/statefulsets/db"],
            id="controller-among-several-references",
        ),
        pytest.param(
            [ref("Node", "node-1", "v1")],
            Workload("Pod", "web-7d9f-abcde"),
            [],
            id="static-mirror-pod-is-its-own-workload",
        ),
        pytest.param(
            [ref("ReplicaSet", "deleted-rs")],
            Workload("ReplicaSet", "deleted-rs"),
            ["/apis/apps/v1/namespaces/shop/replicasets/deleted-rs"],
            id="owner-not-found-stops-at-the-reference",
        ),
        pytest.param(
            [ref("Gadget", "g1", "unserved.example.com/v1")],
            Workload("Gadget", "g1"),
            ["/apis/unserved.example.com/v1"],
            id="kind-not-served-stops-at-the-reference",
        ),
        pytest.param(
            [ref("ReplicaSet", "web-7d9f", uid="some-other-uid")],
            Workload("ReplicaSet", "web-7d9f"),
            ["/apis/apps/v1/namespaces/shop/replicasets/web-7d9f"],
            id="recreated-owner-with-another-uid-is-not-followed",
        ),
        pytest.param(
            [ref("ReplicaSet", "loop-a")],
            Workload("ReplicaSet", "loop-b"),
            ["/apis/apps/v1/namespaces/shop/replicasets/loop-a", "/apis/apps/v1/namespaces/shop/replicasets/loop-b"],
            id="owner-cycle-stops",
        ),
    ],
)
def test_owner_walk_finds_the_top_level_workload(
    owner_refs: list[dict[str, Any]], workload: Workload, calls: list[str]
) -> None:
    resolved, made = walk(refs(*owner_refs))
    assert resolved.workload == workload
    assert made == calls


def test_walk_stops_at_the_depth_limit() -> None:
    chain = {
        ("apps", "ReplicaSet", "shop", f"rs-{i}"): owner("ReplicaSet", f"rs-{i}", ref("ReplicaSet", f"rs-{i + 1}"))
        for i in range(20)
    }
    resolved, made = walk(refs(ref("ReplicaSet", "rs-0")), chain)
    assert len(made) == owners.MAX_DEPTH
    assert resolved == Resolved(Workload("ReplicaSet", f"rs-{owners.MAX_DEPTH - 1}"), "depth limit")


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(ref("ReplicaSet", "../../secrets/x"), id="path-traversal-name"),
        pytest.param(ref("ReplicaSet", "web?watch=1"), id="query-in-name"),
        pytest.param(ref("Replica/Set", "web"), id="slash-in-kind"),
        pytest.param(ref("ReplicaSet", "web", api_version="apps/../v1"), id="traversal-in-version"),
        pytest.param(ref("ReplicaSet", "web", api_version="evil.com:8080/v1"), id="port-in-group"),
        pytest.param(ref("ReplicaSet", "a" * 300), id="oversized-name"),
        pytest.param(ref("ReplicaSet", "web\n"), id="trailing-newline"),
    ],
)
def test_hostile_owner_references_never_reach_a_path(hostile: dict[str, Any]) -> None:
    step = owners.start("shop", "web-1", refs(hostile))
    assert step == Resolved(Workload("Pod", "web-1"), "invalid owner reference")


def test_an_unknown_kind_must_be_discovered_before_its_path_is_built() -> None:
    step = owners.start("shop", "p", refs(ref("Widget", "w1", "example.com/v1")))
    assert isinstance(step, OwnerLookup)
    with pytest.raises(ValueError, match="needs discovery"):
        step.path()


def test_discovery_with_a_hostile_plural_resolves_to_the_reference() -> None:
    step = owners.start("shop", "p", refs(ref("Widget", "w1", "example.com/v1")))
    assert isinstance(step, OwnerLookup)
    discovery = kubeobjects.APIResourceList(resources=[kubeobjects.APIResource("../pods", "Widget", True)])
    assert owners.with_plural(step, discovery) == Resolved(Workload("Widget", "w1"), "kind not served")


def test_core_group_owner_uses_the_legacy_api_path() -> None:
    step = owners.start("shop", "p", refs(ref("ReplicationController", "old", "v1")))
    assert isinstance(step, OwnerLookup)
    assert step.path() == "/api/v1/namespaces/shop/replicationcontrollers/old"


def test_pods_of_one_replicaset_share_one_cache_key() -> None:
    a = owners.start("shop", "web-1", refs(ref("ReplicaSet", "web-7d9f")))
    b = owners.start("shop", "web-2", refs(ref("ReplicaSet", "web-7d9f")))
    assert isinstance(a, OwnerLookup)
    assert isinstance(b, OwnerLookup)
    assert a.cache_key() == b.cache_key()
