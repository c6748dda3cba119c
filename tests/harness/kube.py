"""A real Kubernetes control plane for tests: etcd, kube-apiserver, controller-manager, scheduler and kwok on loopback.

Starts and stops only its own processes, by PID, in a temp dir of its own; never touches the user's kubeconfig or any
cluster it did not start. The `kube` fixture is session-scoped: start it once, give each test its own namespace.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import ipaddress
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from podsweep.embedded import ManagedProcess, free_port
from podsweep.kube import Kube
from tests.harness.kwok import FAKE_NODE_ANNOTATION, create_namespace

HARNESS_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = HARNESS_DIR / "kubebins" / "build.sh"
KWOK_STAGES = HARNESS_DIR / "kwok-stages.yaml"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"
# kube-apiserver had not exited 15 s after SIGTERM (docs/testing.md); nothing here needs a clean shutdown.
STOP_GRACE_S = 2.0


class KubeControlPlaneError(RuntimeError):
    """A control-plane process could not be built or started; the message names it and ends with its log's tail."""


def locate_binaries(build_script: Path = BUILD_SCRIPT) -> Path:
    """The directory holding the binaries: build.sh prints it, building first if any is missing (needs Go)."""
    result = subprocess.run(["bash", str(build_script)], capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise KubeControlPlaneError(
            f"{build_script} failed with {result.returncode}; run it by hand to see why "
            f"(it needs Go >= 1.26 for a cold build):\n{_last_lines(result.stderr)}"
        )
    bin_dir = Path(lines[-1])
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise KubeControlPlaneError(f"{build_script} printed {bin_dir} but it lacks {', '.join(missing)}")
    return bin_dir


@dataclass
class KubeControlPlane:
    """The processes, ports, credentials and files of one control plane. `start()` returns once it serves."""

    bin_dir: Path
    work_dir: Path
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    kwok_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    startup_s: float = 0.0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.work_dir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.work_dir / "pki" / "ca.crt"

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start etcd and the API server, and once the API is ready the controllers and kwok, then wait for them.

        The controller-manager gives the API server only 10 s to become healthy and then exits, which a loaded
        machine overruns (seen at a load average of 20 on 2 cores), so it starts after /readyz answers."""
        began = time.monotonic()
        self._write_credentials()
        self._spawn("etcd", self._etcd_argv())
        self._spawn("kube-apiserver", self._apiserver_argv())
        deadline = began + timeout_s
        self._wait_for("kube-apiserver", "/readyz", deadline)
        self._spawn("kube-controller-manager", self._controller_manager_argv())
        self._spawn("kube-scheduler", self._scheduler_argv())
        self._spawn("kwok", self._kwok_argv())
        # The default ServiceAccount exists once the controller-manager runs; pods cannot be admitted without it.
        self._wait_for("kube-controller-manager", "/api/v1/namespaces/default/serviceaccounts/default", deadline)
        self._wait_for_kwok(deadline)
        self.startup_s = time.monotonic() - began

    def stop(self) -> None:
        """SIGTERM every process, then SIGKILL whatever still runs after STOP_GRACE_S."""
        _stop_all(list(self.processes.values()))
        self.processes.clear()

    def restart_apiserver(self, timeout_s: float = 60.0) -> None:
        """Stop kube-apiserver and start it again on the same port with the same etcd (watches break, data stays)."""
        old = self.processes.pop("kube-apiserver")
        _stop_all([old])
        self._spawn("kube-apiserver", self._apiserver_argv())
        self._wait_for("kube-apiserver", "/readyz", time.monotonic() + timeout_s)

    def compact_etcd(self) -> int:
        """Compact etcd to its current revision and return it: resourceVersions older than that are gone.

        The apiserver's watch cache still answers for the versions it holds in memory; to get 410 Gone for a version
        the cache had seen, call restart_apiserver() afterwards (the cache then starts at the current revision).
        """
        revision = int(self._etcd_post("/v3/kv/range", {"key": _b64(b"\x00"), "limit": 1})["header"]["revision"])
        self._etcd_post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def api_get(self, path: str) -> bytes:
        """A GET as the admin, for readiness checks and tests that need no client."""
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=5, context=self._ssl_context()) as response:
            body: bytes = response.read()
            return body

    def kubectl_run(self, *args: str, stdin: str | None = None) -> str:
        """Run kubectl against this control plane; raise with its stderr when it fails."""
        result = subprocess.run(
            [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise KubeControlPlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    # -- processes -----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes[name] = ManagedProcess(name=name, proc=proc, log=log, grace_s=STOP_GRACE_S)
        _started.append(self.processes[name])

    def _check_alive(self) -> None:
        for process in self.processes.values():
            if process.proc.poll() is not None:
                raise KubeControlPlaneError(
                    f"{process.name} exited with {process.proc.returncode} (log {process.log}):\n{_tail(process.log)}"
                )

    def _wait_for(self, name: str, path: str, deadline: float) -> None:
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.api_get(path)
                return
            except (OSError, urllib.error.URLError) as error:
                last_error = str(error)
            time.sleep(0.1)
        process = self.processes[name]
        raise KubeControlPlaneError(
            f"{name} not ready: GET {path} still failed ({last_error}) at the deadline (log {process.log}):\n"
            f"{_tail(process.log)}"
        )

    def _wait_for_kwok(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.kwok_port}/healthz"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        log = self.processes["kwok"].log
        raise KubeControlPlaneError(f"kwok did not answer {url} in time (log {log}):\n{_tail(log)}")

    def _etcd_post(self, path: str, body: dict[str, object]) -> dict[str, dict[str, str]]:
        request = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, dict[str, str]] = json.loads(response.read())
            return answer

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- command lines -------------------------------------------------------------------------------------------

    def _etcd_argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [
            str(self.bin_dir / "etcd"),
            "--name=podsweep-test",
            f"--data-dir={self.work_dir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=podsweep-test={peer}",
            "--unsafe-no-fsync",  # test data: durability costs seconds on a busy disk and buys nothing here
            "--log-level=warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        pki = self.work_dir / "pki"
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--endpoint-reconciler-type=none",  # one apiserver on loopback: no kubernetes Endpoints to keep
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_argv(self) -> list[str]:
        pki = self.work_dir / "pki"
        return [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            # nodeipam wants a cluster CIDR; the legacy token controller wants a signing key: neither is needed here.
            "--controllers=*,-nodeipam,-serviceaccount-token",
            "--leader-elect=false",
            "--secure-port=0",
            f"--root-ca-file={self.ca_file}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--v=1",
        ]

    def _scheduler_argv(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ]

    def _kwok_argv(self) -> list[str]:
        return [
            str(self.bin_dir / "kwok"),
            f"--kubeconfig={self.kubeconfig}",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            f"--config={KWOK_STAGES}",
            f"--cidr={POD_CIDR}",
            f"--server-address=127.0.0.1:{self.kwok_port}",
        ]

    # -- credentials ---------------------------------------------------------------------------------------------

    def _write_credentials(self) -> None:
        pki = self.work_dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = _make_ca()
        server_key, server_cert = _make_serving_cert(ca_key, ca_cert)
        sa_key = ec.generate_private_key(ec.SECP256R1())
        _write(pki / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(pki / "apiserver.crt", server_cert.public_bytes(serialization.Encoding.PEM))
        _write(pki / "apiserver.key", _private_pem(server_key))
        _write(pki / "sa.key", _private_pem(sa_key))
        _write(
            pki / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        _write(pki / "tokens.csv", f'{self.token},podsweep-test-admin,podsweep-test-admin,"system:masters"\n'.encode())
        _write(self.kubeconfig, self._kubeconfig_text().encode())

    def _kubeconfig_text(self) -> str:
        # JSON is YAML, so the file needs no YAML writer.
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "podsweep-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "podsweep-test-admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": "podsweep-test", "context": {"cluster": "podsweep-test", "user": "podsweep-test-admin"}}
            ],
            "current-context": "podsweep-test",
        }
        return json.dumps(document, indent=2)


# Every process any control plane started in this interpreter, so an interrupted session still kills them at exit.
_started: list[ManagedProcess] = []


def _stop_all(processes: list[ManagedProcess]) -> None:
    running = [p for p in processes if p.proc.poll() is None]
    for process in running:
        process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in running:
        try:
            process.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait(5)


atexit.register(lambda: _stop_all(_started))


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "podsweep-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_serving_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),  # the `kubernetes` Service's IP in SERVICE_CIDR
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return _last_lines(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log)"


def _last_lines(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeControlPlane]:
    """One control plane per test session; tests take their own namespaces instead of resetting it."""
    plane = KubeControlPlane(bin_dir=locate_binaries(), work_dir=Path(tmp_path_factory.mktemp("kube")))
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


@pytest_asyncio.fixture
async def kube_api(kube: KubeControlPlane) -> AsyncIterator[Kube]:
    """podsweep's own API client, logged in as the control plane's admin."""
    client = await Kube.connect(str(kube.kubeconfig))
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture
async def kube_namespace(kube_api: Kube) -> AsyncIterator[str]:
    """A fresh namespace for one test (pods can be admitted at once); deleted afterwards without waiting."""
    name = f"t-{secrets.token_hex(4)}"
    await create_namespace(kube_api, name)
    yield name
    await kube_api.request("DELETE", f"/api/v1/namespaces/{name}")
