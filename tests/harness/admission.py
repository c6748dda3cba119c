"""Test and benchmark material for the admission gate: AdmissionReview bodies, pod specs and a throwaway TLS CA.

Builds plain JSON the way the apiserver sends it; decides nothing.
"""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from schemas.events import ImageSeen, Workload
from tests.harness.certs import throwaway_ca


def seen(image: str, ref: str, at: datetime.datetime, namespace: str = "team-a") -> ImageSeen:
    """The watcher's sighting of `image` as written running as digest `ref` (what maps a tag to its digest)."""
    return ImageSeen(
        cluster="default",
        digest_ref=ref,
        image=image,
        node="node-1",
        namespace=namespace,
        pod="p",
        container="app",
        container_kind="app",
        workload=Workload(kind="Deployment", name="app"),
        observed_at=at,
    )


def pod(
    name: str,
    images: dict[str, str],
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": c, "image": i} for c, i in images.items()]}
    if node is not None:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": spec,
    }


def deployment(name: str, images: dict[str, str], *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    selector = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**selector, **(labels or {})}},
                "spec": {"containers": [{"name": c, "image": i} for c, i in images.items()]},
            },
        },
    }


def review(
    obj: dict[str, Any],
    namespace: str,
    *,
    operation: str = "CREATE",
    old: dict[str, Any] | None = None,
    uid: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """An admission/v1 AdmissionReview request for `obj`, as the apiserver would send it."""
    kind = obj.get("kind", "Pod")
    group, _, version = obj.get("apiVersion", "v1").rpartition("/")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "namespace": namespace,
            "name": obj.get("metadata", {}).get("name", ""),
            "operation": operation,
            "userInfo": {"username": "alice@example.com", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


@dataclass(frozen=True)
class Tls:
    """A CA and a serving pair for 127.0.0.1, written as PEM files."""

    ca_pem: bytes
    cert_file: Path
    key_file: Path


def make_tls(directory: Path, common_name: str = "podsweep-admission") -> Tls:
    directory.mkdir(parents=True, exist_ok=True)
    ca = throwaway_ca(f"{common_name}-ca")
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert, key = ca.issue(common_name, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    cert_file = directory / "tls.crt"
    key_file = directory / "tls.key"
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    return Tls(ca.pem, cert_file, key_file)
