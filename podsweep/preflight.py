"""`podsweep up`'s check, before its first scan, that what scan Jobs need exists: their namespace, the ServiceAccount
they run as, and the permission to create and delete Jobs there. What is missing and may be created is created (as
deploy/base makes it); anything else stops `up` with a message that says what to apply.

`advice` is pure; `prepare` asks the API server (GETs, SelfSubjectAccessReviews, and the creations it decides on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from podsweep import logs
from podsweep.kube import Kube, KubeError
from schemas.refs import K8sLabelName, K8sName

log = logs.get("podsweep.preflight")

# As deploy/base/namespace.yaml labels it: scan pods run as root with DAC_OVERRIDE, which "baseline" admits.
NAMESPACE_LABELS = {
    "pod-security.kubernetes.io/enforce": "baseline",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/audit": "restricted",
}
# (verb, resource, group) the dispatcher needs in the scan namespace.
JOB_VERBS = (("create", "jobs", "batch"), ("delete", "jobs", "batch"), ("list", "jobs", "batch"))


class NotReady(Exception):
    """What scans need is missing and podsweep may not create it; the message says what to apply."""


class Missing(msgspec.Struct, frozen=True):
    """What the check found missing and could not create, and the permissions the current user lacks there."""

    namespace: str | None = None  # how it is missing: "does not exist" or "could not be read"
    service_account: str | None = None
    service_account_state: str = "does not exist"
    denied: tuple[str, ...] = ()  # "create jobs.batch", ...


def advice(namespace: str, missing: Missing) -> str | None:
    """The message that stops `up`, or None when scans can run."""
    lines: list[str] = []
    if missing.namespace is not None:
        lines.append(
            f"the namespace {namespace!r} {missing.namespace} and this user may not create it: apply "
            f"deploy/base/namespace.yaml (with namespace {namespace}), or `kubectl create namespace {namespace}`"
        )
    if missing.service_account is not None:
        lines.append(
            f"the ServiceAccount {missing.service_account!r} scan Jobs run as {missing.service_account_state} in "
            f"{namespace!r} and "
            f"this user may not create it: apply deploy/base/serviceaccounts.yaml, or "
            f"`kubectl -n {namespace} create serviceaccount {missing.service_account}`"
        )
    if missing.denied:
        lines.append(
            f"this user may not {', '.join(missing.denied)} in {namespace!r}: apply deploy/base/rbac-dispatcher.yaml "
            "for the identity `up` runs as, or run `up` with a kubeconfig that may"
        )
    if not lines:
        return None
    return (
        "scans cannot run: "
        + "; ".join(lines)
        + " (or set `namespace` / dispatcher.service_account to ones that exist)"
    )


async def prepare(kube: Kube, namespace: str, service_account: str) -> list[str]:
    """Check and create what scans need; returns what was created. Raises NotReady with `advice`'s message."""
    for key, value, kind in (
        ("namespace", namespace, K8sLabelName),
        ("dispatcher.service_account", service_account, K8sName),
    ):
        if key == "namespace" or value:
            try:
                msgspec.convert(value, kind)
            except msgspec.ValidationError:
                raise NotReady(f"config: {key} {value[:80]!r} is not a Kubernetes name") from None
    created: list[str] = []
    missing_namespace: str | None = None
    missing_account: str | None = None
    account_state = "does not exist"
    found = await _exists(kube, f"/api/v1/namespaces/{namespace}")
    if found is not True:
        namespace_body = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": NAMESPACE_LABELS},
        }
        if await _create(kube, "/api/v1/namespaces", namespace_body):
            created.append(f"namespace {namespace}")
        else:
            missing_namespace = "does not exist" if found is False else "could not be read"
    if service_account and missing_namespace is None:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        account = await _exists(kube, f"{path}/{service_account}")
        if account is not True:
            body: dict[str, object] = {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {
                    "name": service_account,
                    "labels": {"app.kubernetes.io/managed-by": "podsweep", "app.kubernetes.io/component": "scan"},
                },
                "automountServiceAccountToken": False,
            }
            if await _create(kube, path, body):
                created.append(f"serviceaccount {namespace}/{service_account}")
            else:
                missing_account = service_account
                account_state = "does not exist" if account is False else "could not be read"
    denied = await _denied(kube, namespace, JOB_VERBS)
    message = advice(namespace, Missing(missing_namespace, missing_account, account_state, denied))
    if message is not None:
        raise NotReady(message)
    for what in created:
        log.info("created what scans need", what=what)
    return created


async def _exists(kube: Kube, path: str) -> bool | None:
    """True, False, or None when this user may not look (the creation that follows says whether it may make it)."""
    try:
        await kube.get(path)
    except KubeError as exc:
        if exc.status == 404:
            return False
        if exc.status in (401, 403):
            return None
        raise
    return True


async def _create(kube: Kube, path: str, body: Mapping[str, object]) -> bool:
    """POST; True when it exists afterwards (created, or created meanwhile), False when this user may not."""
    try:
        await kube.request("POST", path, body=body)
    except KubeError as exc:
        if exc.status == 409:
            return True
        if exc.status in (401, 403):
            return False
        raise
    return True


async def _denied(kube: Kube, namespace: str, verbs: Sequence[tuple[str, str, str]]) -> tuple[str, ...]:
    """The (verb resource.group) this user may not do in the namespace, by SelfSubjectAccessReview."""
    denied: list[str] = []
    for verb, resource, group in verbs:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource, "group": group}
            },
        }
        answer = msgspec.json.decode(
            await kube.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=review),
            type=_Review,
        )
        if not answer.status.allowed:
            denied.append(f"{verb} {resource}.{group}")
    return tuple(denied)


class _ReviewStatus(msgspec.Struct, frozen=True):
    allowed: bool = False


class _Review(msgspec.Struct, frozen=True):
    status: _ReviewStatus = _ReviewStatus()
