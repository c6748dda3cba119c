"""A three-server nats-server cluster (JetStream, R3) on loopback, for tests that lose a server mid-run.

Each server has its own store directory, client, route and monitoring port, and the deployed `accounts.conf`
(deploy/base/nats/accounts.conf, one user per service, passwords from the environment as the StatefulSet passes
them) plus one user of the harness's own (`harness`, no permissions block) that only the test uses to look at the
cluster. `kill` is kill -9 of one server by its PID; `restart` starts it again on the same ports and store.
Decides nothing about podsweep; signals only the processes it started.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NatsClient

from podsweep.embedded import free_port, private_dir
from podsweep.natsaccess import password_variable
from podsweep.operatoraccess import OPERATOR
from tests.harness.deployed import REPO, binary

ACCOUNTS = REPO / "deploy" / "base" / "nats" / "accounts.conf"
LEAF_DIR = REPO / "deploy" / "nats-leaf"
SERVICES = ("watcher", "dispatcher", "parser", "notifier", "admission")
HARNESS_USER = "harness"
LEAF_USER = "leaf"  # deploy/nats-leaf/hub-leafnodes.conf
HUB_DOMAIN = "hub"  # the hub's JetStream domain, which deploy/nats-leaf/accounts.conf is written for
CLUSTER_NAME = "podsweep-test"


@dataclass
class ClusterServer:
    """One nats-server of the cluster: its name, ports and store, and its process while it runs."""

    name: str
    port: int
    route_port: int
    http_port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    leaf_port: int = 0  # where leaf servers connect (0: no leafnodes listener)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "nats.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def healthz(self, query: str = "") -> bool:
        """The server's own readiness: `/healthz` is 200 once JetStream is up and, without a query, once every
        stream and consumer it holds a replica of has caught up with its leader."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz{query}", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


@dataclass
class NatsCluster:
    servers: list[ClusterServer]
    passwords: dict[str, str]  # user -> password: every service's and the harness's
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (NatsSettings.url)."""
        return ",".join(s.url for s in self.servers)

    def server(self, name: str) -> ClusterServer:
        return next(s for s in self.servers if s.name == name)

    def tails(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail()}" for s in self.servers)

    def start(self, server: ClusterServer) -> None:
        argv = [binary("nats-server"), "-c", str(server.root / "nats.conf")]
        with server.log.open("ab") as out:
            server.proc = subprocess.Popen(
                argv, cwd=server.root, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def kill(self, name: str) -> None:
        """kill -9: no lame-duck mode, no leadership handed over, no store flushed."""
        server = self.server(name)
        assert server.proc is not None and server.running(), f"{name} is not running"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)

    def restart(self, name: str) -> None:
        server = self.server(name)
        assert not server.running(), f"{name} still runs"
        self.start(server)

    def stop(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
                try:
                    server.proc.wait(5)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait(5)

    async def wait_current(self, name: str, timeout_s: float = 60.0) -> None:
        """Until the server answers `/healthz` with 200: up, and every replica it holds caught up."""
        server = self.server(name)
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(server.healthz):
            if server.proc is not None and server.proc.poll() is not None:
                raise RuntimeError(f"nats {name} exited with {server.proc.returncode}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats {name} was not current within {timeout_s:.0f}s:\n{server.tail()}")
            await asyncio.sleep(0.2)

    async def connect(self) -> NatsClient:
        """A connection as the harness's own user (not a service's), to every server."""
        return await nats.connect(
            servers=[s.url for s in self.servers],
            user=HARNESS_USER,
            password=self.passwords[HARNESS_USER],
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
        )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until a meta leader is elected: `$JS.API.INFO` answers with the account's JetStream info (it answers
        503 or not at all while the cluster has no meta leader)."""
        for server in self.servers:
            await self.wait_current(server.name, timeout_s)
        nc = await self.connect()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    answer = await nc.request("$JS.API.INFO", b"", timeout=2)
                    if b'"error"' not in answer.data:
                        return
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no JetStream meta leader within {timeout_s:.0f}s:\n{self.tails()}")
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def leader(self, stream: str, timeout_s: float = 60.0) -> str:
        """The name of the server leading `stream` (a KV bucket's stream is `KV_<bucket>`), from `$JS.API.STREAM.INFO`
        (`cluster.leader`), once it has one and every replica is current."""
        nc = await self.connect()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                info = await _stream_info(nc, stream)
                if info is not None and info.cluster is not None and info.cluster.leader:
                    replicas = info.cluster.replicas or []
                    if len(replicas) + 1 == len(self.servers) and all(r.current for r in replicas):
                        return info.cluster.leader
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stream {stream} has no leader with current replicas:\n{self.tails()}")
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def new_leader(self, stream: str, other_than: str, timeout_s: float = 60.0) -> str:
        """The server leading `stream` once it is not `other_than` (a positive signal that leadership moved)."""
        nc = await self.connect()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                info = await _stream_info(nc, stream)
                if info is not None and info.cluster is not None and info.cluster.leader not in (None, other_than):
                    return info.cluster.leader
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stream {stream} is still led by {other_than}:\n{self.tails()}")
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def replicas(self, stream: str) -> int:
        nc = await self.connect()
        try:
            info = await _stream_info(nc, stream)
        finally:
            await nc.close()
        assert info is not None, f"no stream {stream}"
        return info.num_replicas


class _Peer(msgspec.Struct, frozen=True):
    name: str
    current: bool = False


class _Cluster(msgspec.Struct, frozen=True):
    leader: str | None = None
    replicas: list[_Peer] | None = None


class _Config(msgspec.Struct, frozen=True):
    num_replicas: int = 1


class _StreamInfo(msgspec.Struct, frozen=True):
    config: _Config
    cluster: _Cluster | None = None

    @property
    def num_replicas(self) -> int:
        return self.config.num_replicas


async def _stream_info(nc: NatsClient, stream: str) -> _StreamInfo | None:
    """`$JS.API.STREAM.INFO.<stream>`, or None while it cannot say (no answer, no leader, not found)."""
    try:
        answer = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    if b'"error"' in answer.data:
        return None
    return msgspec.json.decode(answer.data, type=_StreamInfo)


def _config(server: ClusterServer, peers: list[ClusterServer]) -> str:
    routes = ", ".join(f'"nats-route://127.0.0.1:{p.route_port}"' for p in peers)
    leafnodes = domain = ""
    if server.leaf_port:
        (server.root / "leafnodes.conf").write_text(
            (LEAF_DIR / "hub-leafnodes.conf").read_text().replace("0.0.0.0:7422", f"127.0.0.1:{server.leaf_port}")
        )
        leafnodes = "include ./leafnodes.conf\n"
    domain = f"  domain: {HUB_DOMAIN}\n" if server.leaf_port else ""
    return (
        f"server_name: {server.name}\n"
        f"listen: 127.0.0.1:{server.port}\n"
        f"http: 127.0.0.1:{server.http_port}\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(server.root / 'jetstream'))}\n"
        "  max_memory_store: 64MB\n"
        "  max_file_store: 1GB\n"
        f"{domain}"
        "}\n"
        "cluster {\n"
        f"  name: {CLUSTER_NAME}\n"
        f"  listen: 127.0.0.1:{server.route_port}\n"
        f"  routes: [{routes}]\n"
        "}\n"
        "include ./accounts.conf\n" + leafnodes
    )


def accounts_with_harness_user(password_env: str) -> str:
    """The deployed accounts.conf with one more user in the PODSWEEP account: the harness's, unrestricted, to look
    at streams and leaders. Every service's user and permissions stay exactly as generated."""
    text = ACCOUNTS.read_text()
    marker = "    users: [\n"
    assert text.count(marker) == 1, f"{ACCOUNTS}: expected one users list"
    user = f"      {{\n        user: {HARNESS_USER}\n        password: ${password_env}\n      }}\n"
    return text.replace(marker, marker + user)


async def start_cluster(root: Path, size: int = 3, timeout_s: float = 90.0, *, leafnodes: bool = False) -> NatsCluster:
    """`size` servers in one cluster on loopback, started together; returns once a meta leader answers. With
    `leafnodes`, each also takes leaf connections as deploy/nats-leaf/hub-leafnodes.conf says (`start_leaf`)."""
    root = private_dir(root)
    servers = [
        ClusterServer(
            f"n{i}",
            free_port(),
            free_port(),
            free_port(),
            private_dir(root / f"n{i}"),
            leaf_port=free_port() if leafnodes else 0,
        )
        for i in range(1, size + 1)
    ]
    users = (*SERVICES, OPERATOR.service, HARNESS_USER, LEAF_USER)
    passwords = {user: "k" + secrets.token_hex(24) for user in users}
    env = {password_variable(user): password for user, password in passwords.items()}
    for server in servers:
        (server.root / "nats.conf").write_text(_config(server, servers))
        (server.root / "accounts.conf").write_text(accounts_with_harness_user(password_variable(HARNESS_USER)))
    cluster = NatsCluster(servers, passwords, env)
    for server in servers:
        cluster.start(server)
    try:
        await cluster.wait_ready(timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def start_leaf(root: Path, hub: NatsCluster, name: str = "leaf-0", timeout_s: float = 60.0) -> ClusterServer:
    """A leaf server as deploy/nats-leaf/leaf.conf makes one (its listen and monitoring addresses on loopback), its
    remote.conf shaped as leaf-remote.conf pointing at every hub server; returns once its link to the hub is up."""
    server = ClusterServer(name, free_port(), 0, free_port(), private_dir(root))
    conf = (LEAF_DIR / "leaf.conf").read_text()
    conf = conf.replace("0.0.0.0:4222", f"127.0.0.1:{server.port}").replace(
        "0.0.0.0:8222", f"127.0.0.1:{server.http_port}"
    )
    (server.root / "nats.conf").write_text(conf)
    hubs = ", ".join(
        f'"nats-leaf://{LEAF_USER}:{hub.passwords[LEAF_USER]}@127.0.0.1:{s.leaf_port}"' for s in hub.servers
    )
    remote = (LEAF_DIR / "leaf-remote.conf").read_text()
    (server.root / "remote.conf").write_text(re.sub(r"urls: \[.*\]", f"urls: [{hubs}]", remote))
    (server.root / "accounts.conf").write_text((LEAF_DIR / "accounts.conf").read_text())
    _spawn(server, {**hub.env, "POD_NAME": name})
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(_leaf_linked, server):
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"leaf {name} exited with {server.proc.returncode}:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"leaf {name} did not connect to the hub within {timeout_s:.0f}s:\n{server.tail()}")
        await asyncio.sleep(0.2)
    return server


def _spawn(server: ClusterServer, env: dict[str, str]) -> None:
    with server.log.open("ab") as out:
        server.proc = subprocess.Popen(
            [binary("nats-server"), "-c", str(server.root / "nats.conf")],
            cwd=server.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


class _Leafz(msgspec.Struct, frozen=True):
    leafnodes: int = 0


def _leaf_linked(server: ClusterServer) -> bool:
    """Whether the leaf's monitoring endpoint counts a leafnode connection (its link to the hub)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/leafz", timeout=2) as answer:
            return msgspec.json.decode(answer.read(), type=_Leafz).leafnodes >= 1
    except (OSError, msgspec.DecodeError):
        return False
