"""End to end as deployed: every process configured from `kubectl kustomize deploy/overlays/dev`, nothing from code.

What runs, and where it comes from (tests/harness/deployed.py):
- nats-server: the nats StatefulSet's command on the rendered nats.conf and accounts.conf, its passwords from the
  rendered Secrets through the StatefulSet's secretKeyRef env;
- SeaweedFS: the dev seaweedfs StatefulSet's command with the rendered identities file, verbatim (one identity per
  service, limited to the actions and key prefixes that service needs);
- watcher, dispatcher, parser, notifier, admission: each its own `podsweep run <name>` process with exactly its
  Deployment's args and env, its mounted ConfigMap and Secrets written to files;
- the API identities: the rendered Namespace, ServiceAccounts, Roles, ClusterRoles and bindings applied to the
  harness apiserver; the watcher and dispatcher get a token for their own ServiceAccount from the TokenRequest API
  (never the admin's), the other services (automountServiceAccountToken: false) get none.

What is remapped, because a container's view cannot exist here, and nothing else:
- every mounted container path (/etc/podsweep, /var/run/secrets/podsweep/..., /etc/nats, /data, /tmp) becomes a
  directory of the test's own, in the env, the args and inside the mounted config files (policy.yaml's `file:`
  references, nats.conf's store_dir);
- the in-cluster Service addresses nats.podsweep.svc:4222 and seaweedfs.podsweep.svc:8333 become loopback ports;
- the in-cluster token mount (/var/run/secrets/kubernetes.io/serviceaccount) becomes KUBECONFIG pointing at a file
  that holds the TokenRequest token and the apiserver's CA;
- container ports every pod has to itself here share one host: the metrics port (9090) and the admission port
  (8443) become free ports (PODSWEEP_TELEMETRY_METRICS_PORT, PODSWEEP_ADMISSION_PORT, ADMISSION_HOST on loopback);
  nats-server's listen address and SeaweedFS's ports are command-line flags;
- Secret values that are placeholders (`REPLACE-ME-...`) get fresh values, the same in every pod that mounts them:
  the webhook URL points at the test's receiver and the admission TLS pair is a throwaway CA's; the dev overlay's
  published S3 keys are used as they are;
- POD_NAME (the downward API) is a made-up pod name.

The kubelet stand-in plays the scan pods (PUTs a real Trivy 0.76 report, and an SBOM, to the Job's presigned URLs,
which were signed with the dispatcher's own S3 key) and the webhook receiver checks every signature.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import pytest

from podsweep.config import S3Settings
from podsweep.embedded import free_port
from podsweep.kube import Kube, KubeError
from podsweep.objectstore import ObjectStore
from schemas import storage
from schemas.alerts import AlertPayload
from services.dispatcher.jobspec import RAW_URL_ENV, SBOM_URL_ENV
from tests.harness import deployed
from tests.harness.admission import make_tls
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import create_fake_node, create_namespace, expected_image_id
from tests.harness.receiver import Receiver
from tests.harness.standin import KubeletStandin, Pod

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
REPORT = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-alpine.json").read_bytes(), mtime=0)
SBOM = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-combined.cdx.json").read_bytes(), mtime=0)
OVERLAY = "overlays/dev"
SERVICES = ("watcher", "dispatcher", "parser", "notifier")
_DIGEST_IN_URL = re.compile(r"/raw/sha256/([0-9a-f]{64})/")


@dataclass
class DeployedWorld:
    kube: KubeControlPlane
    admin: Kube
    rendered: deployed.Rendered
    remap: deployed.Remap
    root: Path
    receiver: Receiver
    standin: KubeletStandin
    nodes: list[str]
    apps: str
    kubeconfigs: dict[str, Path]
    processes: dict[str, deployed.Process] = field(default_factory=dict)
    ports: dict[str, dict[str, str]] = field(default_factory=dict)
    puts: Counter[str] = field(default_factory=Counter)  # digest hex -> reports PUT by scan pods

    def config(self, service: str) -> deployed.ProcessConfig:
        return deployed.pod_process(self.rendered, "Deployment", service, self.root / service, self.remap)

    def start(self, service: str, extra_env: dict[str, str] | None = None) -> deployed.Process:
        """The service's Deployment as a process; only the remaps in this module's docstring are added."""
        config = self.config(service)
        env: dict[str, str] = {"PODSWEEP_TELEMETRY_METRICS_PORT": str(free_port())}
        if service == "admission":
            env |= {"PODSWEEP_ADMISSION_HOST": "127.0.0.1", "PODSWEEP_ADMISSION_PORT": str(free_port())}
        if config.token:
            env["KUBECONFIG"] = str(self.kubeconfigs[config.service_account])
        self.ports[service] = env
        process = deployed.start_service(config, env | (extra_env or {}), self.root / "logs" / f"{service}.log")
        self.processes[service] = process
        return process

    def s3(self, service: str) -> ObjectStore:
        """An S3 client holding that service's own rendered credential (nothing more)."""
        keys = self.remap.secret(self.rendered, f"s3-{service}")
        endpoint = self.remap.text("http://seaweedfs.podsweep.svc:8333", {})
        return ObjectStore(
            S3Settings(
                endpoint_url=endpoint,
                bucket="podsweep",
                access_key_id=keys["access-key-id"],
                secret_access_key=keys["secret-access-key"],
            )
        )

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{process.tail(2000)}" for name, process in self.processes.items())


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, world: DeployedWorld) -> None:
    """Wait for `check`; a service that exits on its own (refused by NATS, S3 or the API at start) fails at once."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        for name, process in world.processes.items():
            code = process.proc.poll()
            if code is not None and code != -9:
                raise AssertionError(f"{name} exited with {code}:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{world.tails()}")
        await asyncio.sleep(0.25)


async def play_scan_pod(pod: Pod, puts: Counter[str]) -> None:
    """What a scan pod's upload container does on a node: PUT the report (and the SBOM) to the presigned URLs."""
    env = {e.name: e.value for c in pod.spec.containers for e in c.env}
    async with httpx.AsyncClient(timeout=10) as client:
        for variable, body in ((RAW_URL_ENV, REPORT), (SBOM_URL_ENV, SBOM)):
            if variable in env:
                answer = await client.put(env[variable], content=body, headers={"Content-Type": "application/gzip"})
                answer.raise_for_status()
    found = _DIGEST_IN_URL.search(env[RAW_URL_ENV])
    assert found is not None, env[RAW_URL_ENV]
    puts[found.group(1)] += 1


async def delete_scan_jobs(admin: Kube, timeout_s: float = 60.0) -> None:
    """Remove this test's scan Jobs from the podsweep namespace and wait until none is listed."""
    selector = {"labelSelector": "app.kubernetes.io/managed-by=podsweep"}
    path = f"/apis/batch/v1/namespaces/{deployed.NAMESPACE}/jobs"
    await admin.request("DELETE", path, params={**selector, "propagationPolicy": "Background"})
    deadline = time.monotonic() + timeout_s
    while msgspec.json.decode(await admin.request("GET", path, params=selector))["items"]:
        assert time.monotonic() < deadline, "scan Jobs were still listed after their deletion"
        await asyncio.sleep(0.2)


@pytest.fixture
async def world(kube: KubeControlPlane, kube_api: Kube, tmp_path: Path) -> AsyncIterator[DeployedWorld]:
    rendered = deployed.kustomize(kube.kubectl, OVERLAY)
    kube.kubectl_run("apply", "-f", "-", stdin=rendered.rbac_yaml())
    await delete_scan_jobs(kube_api)  # what an earlier run in this control plane left behind
    hook_key = secrets.token_urlsafe(32)
    receiver = Receiver(hmac_key=hook_key)
    await receiver.start()
    tls = make_tls(tmp_path / "admission-ca")
    nats_port, s3_port = free_port(), free_port()
    remap = deployed.Remap(
        addresses={
            "nats.podsweep.svc:4222": f"127.0.0.1:{nats_port}",
            "seaweedfs.podsweep.svc:8333": f"127.0.0.1:{s3_port}",
        },
        secret_values={
            ("podsweep-webhooks", "hmac-key"): hook_key,
            ("podsweep-webhooks", "default-url"): f"{receiver.url}/hook",
            ("admission-tls", "tls.crt"): tls.cert_file.read_text(),
            ("admission-tls", "tls.key"): tls.key_file.read_text(),
        },
    )
    servers = [
        deployed.start_nats(rendered, tmp_path / "nats", remap, nats_port),
        deployed.start_seaweedfs(rendered, tmp_path / "seaweedfs", remap, s3_port),
    ]
    kubeconfigs: dict[str, Path] = {}
    for account in ("watcher", "dispatcher"):
        token = await deployed.service_account_token(kube_api, account)
        user = f"system:serviceaccount:{deployed.NAMESPACE}:{account}"
        kubeconfigs[account] = deployed.write_kubeconfig(
            tmp_path / "kubeconfigs" / account, kube.server, kube.ca_file, user, token
        )
    n = secrets.token_hex(3)
    apps = f"deployed-{n}"
    await create_namespace(kube_api, apps)
    nodes = [f"deployed-{n}-node-{i}" for i in range(4)]
    await asyncio.gather(*(create_fake_node(kube_api, name) for name in nodes))
    puts: Counter[str] = Counter()

    async def complete(pod: Pod) -> None:
        await play_scan_pod(pod, puts)

    standin = KubeletStandin(
        kube_api,
        tmp_path / "standin",
        namespace=deployed.NAMESPACE,
        execute=False,
        parallel_pods=16,
        on_complete=complete,
    )
    await standin.start()
    world = DeployedWorld(
        kube, kube_api, rendered, remap, tmp_path, receiver, standin, nodes, apps, kubeconfigs, puts=puts
    )
    try:
        yield world
    finally:
        for process in world.processes.values():
            process.stop()
        await standin.stop()
        await receiver.stop()
        for server in servers:
            server.stop(grace_s=2.0)
        try:
            await delete_scan_jobs(kube_api)
        finally:
            await kube_api.request("DELETE", f"/api/v1/namespaces/{apps}")


def alerts(world: DeployedWorld) -> dict[str, list[AlertPayload]]:
    """Accepted alerts by idempotency key, each checked against the webhook Secret's signing key."""
    by_key: dict[str, list[AlertPayload]] = {}
    for arrival in world.receiver.accepted("/hook"):
        assert arrival.verified, "a webhook arrived without a valid signature"
        by_key.setdefault(arrival.key, []).append(msgspec.json.decode(arrival.body, type=AlertPayload))
    return by_key


def bare_pod(name: str, image: str, node: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": image}]},
    }


# ---------------------------------------------------------------------------------------------------------------


async def test_the_rendered_dev_overlay_scans_stores_and_alerts_every_digest_once(world: DeployedWorld) -> None:
    for service in SERVICES:
        world.start(service)
    images = [f"registry.example.com/deployed/app-{i}:1.{i}" for i in range(4)]
    pods = [bare_pod(f"app-{i}", image, world.nodes[i % len(world.nodes)]) for i, image in enumerate(images)]
    # A second pod of the first image on the same node: one digest, one scan.
    pods.append(bare_pod("app-0-again", images[0], world.nodes[0]))
    for body in pods:
        await world.admin.request("POST", f"/api/v1/namespaces/{world.apps}/pods", body=body)
    refs = {expected_image_id(image, "app") for image in images}

    async def every_digest_alerted() -> bool:
        return {a[0].digest_ref for a in alerts(world).values()} >= refs

    await eventually(every_digest_alerted, 120, f"a signed alert for each of the {len(refs)} digests", world)

    mine = {ref.rsplit(":", 1)[1] for ref in refs}
    assert {d: c for d, c in world.puts.items() if d in mine} == dict.fromkeys(mine, 1), world.puts
    by_digest = Counter(a[0].digest_ref for a in alerts(world).values() if a[0].digest_ref in refs)
    assert by_digest == Counter(refs), by_digest
    # Stored: read back with the notifier's own read-only credential.
    notifier_s3 = world.s3("notifier")
    for ref in sorted(refs):
        report = msgspec.json.decode(await notifier_s3.get(storage.latest_report_key(ref)))
        assert report["digest_ref"] == ref
    for alert in (a[0] for a in alerts(world).values() if a[0].digest_ref in refs):
        assert (alert.namespace, alert.counts.CRITICAL >= 1) == (world.apps, True)


async def test_service_accounts_are_refused_what_rbac_does_not_grant(world: DeployedWorld) -> None:
    """The kubeconfigs the services get really are their ServiceAccounts: a call outside the rendered RBAC is a 403."""
    for account, method, path in (
        ("watcher", "POST", f"/apis/batch/v1/namespaces/{deployed.NAMESPACE}/jobs"),
        ("watcher", "GET", f"/api/v1/namespaces/{deployed.NAMESPACE}/secrets"),
        ("dispatcher", "GET", "/api/v1/pods"),
        ("dispatcher", "GET", f"/apis/batch/v1/namespaces/{world.apps}/jobs"),
    ):
        client = await Kube.connect(str(world.kubeconfigs[account]))
        try:
            with pytest.raises(KubeError) as refused:
                await client.request(method, path, body={} if method == "POST" else None)
            assert refused.value.status == 403, f"{account} {method} {path}: {refused.value}"
        finally:
            await client.close()
    # and the grants they do have answer (the same clients, a call inside the rules)
    for account, path in (
        ("watcher", "/api/v1/pods"),
        ("dispatcher", f"/apis/batch/v1/namespaces/{deployed.NAMESPACE}/jobs"),
    ):
        client = await Kube.connect(str(world.kubeconfigs[account]))
        try:
            await client.request("GET", path, params={"limit": 1})
        finally:
            await client.close()
