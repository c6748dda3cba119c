"""End to end as deployed: every process configured from `kubectl kustomize deploy/overlays/dev` (and prod, and the
Helm chart's `helm template` with ci/dev-values.yaml), nothing from code.

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
import json
import re
import secrets
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import pytest

from podsweep import bus as busmod
from podsweep.config import load_settings
from podsweep.embedded import free_port
from podsweep.kube import Kube, KubeError
from podsweep.objectstore import ObjectStore
from schemas import storage, subjects
from schemas.events import ReportStored
from services.admission import main as admission
from services.dispatcher.jobspec import RAW_URL_ENV, SBOM_URL_ENV
from tests.harness import deployed, metricnames, replicas
from tests.harness.admission import make_tls
from tests.harness.admission import review as admission_review
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import bare_pod, create_fake_node, create_namespace, expected_image_id, pinned_deployment
from tests.harness.prometheus import start_prometheus
from tests.harness.receiver import Receiver, signed_alerts
from tests.harness.scanpod import send_uploads, upload_key
from tests.harness.standin import KubeletStandin, Pod
from tests.harness.toolbins import locate_tool

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
REPORT = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-alpine.json").read_bytes(), mtime=0)
SBOM = gzip.compress((REPO / "tests/fixtures/trivy/trivy-0.76-combined.cdx.json").read_bytes(), mtime=0)
OVERLAY = "overlays/dev"
PROD_S3 = "https://s3.example.invalid"  # overlays/prod/services-tls.yaml: the endpoint to replace
SERVICES = ("watcher", "dispatcher", "parser", "notifier", "admission")
DASHBOARD = REPO / "deploy" / "grafana" / "podsweep.json"
RULES = REPO / "deploy" / "prometheus" / "podsweep-rules.yaml"
_DIGEST_IN_KEY = re.compile(r"raw/sha256/([0-9a-f]{64})/")


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
    admission_ca: bytes
    processes: dict[str, replicas.Replica] = field(default_factory=dict)
    ports: dict[str, dict[str, str]] = field(default_factory=dict)
    puts: Counter[str] = field(default_factory=Counter)  # digest hex -> reports PUT by scan pods

    def config(self, service: str) -> deployed.ProcessConfig:
        return deployed.pod_process(self.rendered, "Deployment", service, self.root / "configs" / service, self.remap)

    def start(self, service: str, extra_env: dict[str, str] | None = None, replica: int = 0) -> replicas.Replica:
        """The service's Deployment as a process (`replica` > 0: another pod of it, `<service>-<replica>`); only the
        remaps in this module's docstring are added."""
        name = f"{service}-{replica}" if replica else service
        config = deployed.pod_process(self.rendered, "Deployment", service, self.root / name, self.remap)
        env: dict[str, str] = {"PODSWEEP_TELEMETRY_METRICS_PORT": str(free_port())}
        if service == "admission":
            env |= {"PODSWEEP_ADMISSION_HOST": "127.0.0.1", "PODSWEEP_ADMISSION_PORT": str(free_port())}
        if config.token:
            env["KUBECONFIG"] = str(self.kubeconfigs[config.service_account])
        self.ports[name] = env
        process = deployed.start_service(config, env | (extra_env or {}), self.root / "logs" / f"{name}.log")
        self.processes[name] = process
        return process

    def start_every_replica(self, service: str) -> None:
        """As many processes as the rendered Deployment has replicas (prod: two dispatchers, one leading)."""
        for replica in range(self.rendered.workload("Deployment", service).spec.replicas):
            self.start(service, replica=replica)

    def s3(self, service: str) -> ObjectStore:
        """An S3 client with that service's own settings and key, loaded as the service loads them."""
        return ObjectStore(load_settings(environ=self.config(service).env).s3)

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


def operator_command(world: DeployedWorld, *args: str) -> subprocess.CompletedProcess[str]:
    """`podsweep <args>` as docs/deploy.md's operator Job runs it: the podsweep-config ConfigMap (and, in prod, the
    nats-client-tls Secret) a service pod mounts, the operator user and its Secret's password; no S3 key, no token."""
    dispatcher = world.config("dispatcher")
    env = {k: v for k, v in dispatcher.env.items() if k.startswith("PODSWEEP_") and "_S3_" not in k}
    env.pop("PODSWEEP_NATS_PASSWORD_FILE")
    env |= {
        "PODSWEEP_NATS_USER": "operator",
        "PODSWEEP_NATS_PASSWORD": world.remap.secret(world.rendered, "nats-operator")["password"],
    }
    return subprocess.run(
        [sys.executable, "-m", "podsweep", *args],
        env={**deployed.base_environment(world.root / "operator"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def play_scan_pod(pod: Pod, puts: Counter[str]) -> None:
    """What a scan pod's upload container does on a node: send the report (and the SBOM) to the upload URLs."""
    await send_uploads(pod, {RAW_URL_ENV: REPORT, SBOM_URL_ENV: SBOM})
    key = upload_key(pod, RAW_URL_ENV)
    found = _DIGEST_IN_KEY.match(key)
    assert found is not None, key
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


async def service_kubeconfigs(kube: KubeControlPlane, admin: Kube, directory: Path) -> dict[str, Path]:
    """A kubeconfig per ServiceAccount whose pods get a token, holding a TokenRequest token for it (not the admin's)."""
    kubeconfigs: dict[str, Path] = {}
    for account in ("watcher", "dispatcher"):
        token = await deployed.service_account_token(admin, account)
        user = f"system:serviceaccount:{deployed.NAMESPACE}:{account}"
        kubeconfigs[account] = deployed.write_kubeconfig(directory / account, kube.server, kube.ca_file, user, token)
    return kubeconfigs


@pytest.fixture
async def world(
    kube: KubeControlPlane, kube_api: Kube, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[DeployedWorld]:
    overlay: str = getattr(request, "param", OVERLAY)
    if overlay.startswith("helm:"):  # the Helm chart with its equivalent of the dev overlay (bundled SeaweedFS)
        rendered = dev = deployed.helm_template(Path(overlay.removeprefix("helm:")), tmp_path / "helm")
    else:
        rendered = deployed.kustomize(kube.kubectl, overlay)
        dev = rendered if overlay == OVERLAY else deployed.kustomize(kube.kubectl, OVERLAY)
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
            PROD_S3: f"http://127.0.0.1:{s3_port}",  # prod's external S3: the dev overlay's SeaweedFS stands in
        },
        secret_values={
            ("podsweep-webhooks", "hmac-key"): hook_key,
            ("podsweep-webhooks", "default-url"): f"{receiver.url}/hook",
            ("admission-tls", "tls.crt"): tls.cert_file.read_text(),
            ("admission-tls", "tls.key"): tls.key_file.read_text(),
            **deployed.nats_tls_values(),
        },
    )
    if rendered is not dev:
        remap.secret_values[("seaweedfs-identities", "s3.json")] = deployed.s3_identities_for(dev, rendered, remap)
    servers = [
        deployed.start_nats(rendered, tmp_path / "nats", remap, nats_port),
        deployed.start_seaweedfs(dev, tmp_path / "seaweedfs", remap, s3_port),
    ]
    kubeconfigs = await service_kubeconfigs(kube, kube_api, tmp_path / "kubeconfigs")
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
        kube, kube_api, rendered, remap, tmp_path, receiver, standin, nodes, apps, kubeconfigs, tls.ca_pem, puts=puts
    )
    try:
        yield world
    finally:
        for process in world.processes.values():
            process.stop(grace_s=10.0)
        await standin.stop()
        await receiver.stop()
        for server in servers:
            server.stop(grace_s=2.0)
        try:
            await delete_scan_jobs(kube_api)
        finally:
            await kube_api.request("DELETE", f"/api/v1/namespaces/{apps}")


class AdmissionAnswer(msgspec.Struct, frozen=True):
    allowed: bool
    warnings: list[str] = []


class AdmissionReviewAnswer(msgspec.Struct, frozen=True):
    response: AdmissionAnswer


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", ["overlays/dev", "overlays/prod", "helm:dev-values.yaml"], indirect=True)
async def test_the_rendered_overlay_scans_stores_and_alerts_every_digest_once(world: DeployedWorld) -> None:
    for service in SERVICES:
        world.start_every_replica(service)
    images = [f"registry.example.com/deployed/app-{i}:1.{i}" for i in range(4)]
    # The first image as a Deployment's two replicas on one node (one digest, one scan, one alert); the others bare.
    web = pinned_deployment("web", images[0], world.nodes[0], container="app")
    await world.admin.request("POST", f"/apis/apps/v1/namespaces/{world.apps}/deployments", body=web)
    for i, image in enumerate(images[1:], start=1):
        body = bare_pod(f"app-{i}", image, world.nodes[i % len(world.nodes)])
        await world.admin.request("POST", f"/api/v1/namespaces/{world.apps}/pods", body=body)
    refs = {expected_image_id(image, "app") for image in images}

    async def every_digest_alerted() -> bool:
        return {a[0].digest_ref for a in signed_alerts(world.receiver).values()} >= refs

    await eventually(every_digest_alerted, 120, f"a signed alert for each of the {len(refs)} digests", world)

    mine = {ref.rsplit(":", 1)[1] for ref in refs}
    assert {d: c for d, c in world.puts.items() if d in mine} == dict.fromkeys(mine, 1), world.puts
    by_digest = Counter(a[0].digest_ref for a in signed_alerts(world.receiver).values() if a[0].digest_ref in refs)
    assert by_digest == Counter(refs), [
        (k, [(a.digest_ref[-8:], a.namespace, a.workload, a.rule, a.scan_id, a.new_count, a.reasons) for a in v])
        for k, v in signed_alerts(world.receiver).items()
    ]
    # Stored: read back with the notifier's own read-only credential.
    notifier_s3 = world.s3("notifier")
    for ref in sorted(refs):
        report = msgspec.json.decode(await notifier_s3.get(storage.latest_report_key(ref)))
        assert report["digest_ref"] == ref
    for alert in (a[0] for a in signed_alerts(world.receiver).values() if a[0].digest_ref in refs):
        assert (alert.namespace, alert.counts.CRITICAL >= 1) == (world.apps, True)

    # The admission gate (its own NATS user and read-only S3 key) answers from the same findings: warn by default.
    review = admission_review(bare_pod("new-app", images[1], world.nodes[1]), world.apps)
    context = ssl.create_default_context(cadata=world.admission_ca.decode())
    url = f"https://127.0.0.1:{world.ports['admission']['PODSWEEP_ADMISSION_PORT']}/validate"
    answer = AdmissionAnswer(allowed=False)

    async def warned() -> bool:
        nonlocal answer
        async with httpx.AsyncClient(verify=context, timeout=10) as client:
            body = (await client.post(url, json=review)).raise_for_status().content
        answer = msgspec.json.decode(body, type=AdmissionReviewAnswer).response
        return any("CRITICAL" in w for w in answer.warnings)

    await eventually(warned, 60, "the admission gate's warning about the scanned image's findings", world)
    assert answer.allowed is True, answer

    # An operator's `podsweep rescan --all` (the DB-claim CronJob's), as the operator NATS user with the rendered
    # nats-operator Secret's password and the podsweep-config ConfigMap: the real dispatcher answers.
    answered = await asyncio.to_thread(operator_command, world, "rescan", "--all", "--requested-by", "cronjob")
    assert answered.returncode == 0, answered.stderr + answered.stdout
    assert f": {len(refs)} digest(s) due now" in answered.stdout, answered.stdout
    status = await asyncio.to_thread(operator_command, world, "status", "--json")
    assert status.returncode == 0, status.stderr + status.stdout
    shown = json.loads(status.stdout.strip().splitlines()[-1])
    assert shown["digests"] == len(refs) and "dispatcher" in [c["service"] for c in shown["consumers"]], shown


async def test_service_accounts_are_refused_what_the_rendered_rbac_does_not_grant(
    kube: KubeControlPlane, kube_api: Kube, tmp_path: Path
) -> None:
    """The kubeconfigs the services get really are their ServiceAccounts: outside the rendered RBAC a call is a 403,
    inside it the call is made (a Job created in a server-side dry run)."""
    kube.kubectl_run("apply", "-f", "-", stdin=deployed.kustomize(kube.kubectl, OVERLAY).rbac_yaml())
    kubeconfigs = await service_kubeconfigs(kube, kube_api, tmp_path)
    jobs = f"/apis/batch/v1/namespaces/{deployed.NAMESPACE}/jobs"
    job: dict[str, object] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "rbac-probe-"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": "scan",
                    "containers": [{"name": "probe", "image": "registry.example.com/probe:1"}],
                }
            }
        },
    }
    calls: list[tuple[str, str, str, dict[str, object] | None, int | None]] = [
        ("watcher", "POST", jobs, job, 403),
        ("watcher", "GET", f"/api/v1/namespaces/{deployed.NAMESPACE}/secrets", None, 403),
        ("watcher", "GET", "/api/v1/pods", None, None),
        ("watcher", "GET", jobs, None, None),
        ("dispatcher", "GET", "/api/v1/pods", None, 403),
        ("dispatcher", "GET", jobs, None, None),  # list: the live Jobs counted when a replica starts leading
        ("dispatcher", "GET", f"{jobs}/any-job", None, 403),  # never a Job read back
        ("dispatcher", "GET", "/apis/batch/v1/namespaces/default/jobs", None, 403),
        ("dispatcher", "POST", "/apis/batch/v1/namespaces/default/jobs", job, 403),
        ("dispatcher", "POST", jobs, job, None),
    ]
    for account, method, path, body, refused in calls:
        client = await Kube.connect(str(kubeconfigs[account]))
        params: dict[str, str | int | bool] = {"dryRun": "All"} if method == "POST" else {"limit": 1}
        try:
            if refused is None:
                await client.request(method, path, params=params, body=body)
            else:
                with pytest.raises(KubeError) as error:
                    await client.request(method, path, params=params, body=body)
                assert error.value.status == refused, f"{account} {method} {path}: {error.value}"
        finally:
            await client.close()


# Timing only, for the kill -9 run: how soon a restarted service takes over (lease, claims) and retries. Credentials,
# users, buckets, namespaces and everything else stay as rendered.
QUICK_TAKEOVER = {
    "PODSWEEP_CONSUMER_MAX_DELIVER": "30",
    "PODSWEEP_CONSUMER_BACKOFF_S": "0.2,0.5,1.0",
    "PODSWEEP_CONSUMER_ACK_WAIT_S": "5",
    "PODSWEEP_DISPATCHER_SWEEP_INTERVAL_S": "2",
    "PODSWEEP_DISPATCHER_CLAIM_TTL_S": "10",
    "PODSWEEP_DISPATCHER_LEADER_LEASE_S": "3",
    "PODSWEEP_DISPATCHER_BACKOFF_BASE_S": "0.5",
    "PODSWEEP_DISPATCHER_BACKOFF_MAX_S": "2",
    "PODSWEEP_DISPATCHER_MAX_ACTIVE": "60",
    "PODSWEEP_DISPATCHER_MAX_ACTIVE_PER_NODE": "15",
    "PODSWEEP_DISPATCHER_MAX_CREATED_PER_MINUTE": "6000",
    "PODSWEEP_NOTIFIER_WORKLOADS_WAIT_DELIVERIES": "5",
    "PODSWEEP_NOTIFIER_WORKLOADS_WAIT_S": "0.5",
    "PODSWEEP_NOTIFIER_RETRY_BASE_S": "0.2",
    "PODSWEEP_NOTIFIER_RETRY_CAP_S": "1",
    "PODSWEEP_NOTIFIER_OUTBOX_ACK_WAIT_S": "8",
}


async def test_kill_9_of_each_service_under_the_deployed_credentials_loses_and_duplicates_nothing(
    world: DeployedWorld,
) -> None:
    for service in SERVICES[:4]:
        world.start(service, QUICK_TAKEOVER)
    count = 80
    images = [f"registry.example.com/deployed-kill/app-{i}:1.{i}" for i in range(count)]
    refs = {expected_image_id(image, "app") for image in images}
    mine = {ref.rsplit(":", 1)[1] for ref in refs}

    async def create(i: int) -> None:
        body = bare_pod(f"app-{i}", images[i], world.nodes[i % len(world.nodes)])
        await world.admin.request("POST", f"/api/v1/namespaces/{world.apps}/pods", body=body)

    await asyncio.gather(*(create(i) for i in range(count)))

    def scanned() -> int:
        return len(mine & set(world.puts))

    def alerted() -> int:
        return len({a[0].digest_ref for a in signed_alerts(world.receiver).values()} & refs)

    kills = (("watcher", scanned, 5), ("dispatcher", scanned, 20), ("parser", scanned, 40), ("notifier", alerted, 30))
    for service, progress, at in kills:

        async def reached(progress: Callable[[], int] = progress, at: int = at) -> bool:
            return progress() >= at

        await eventually(reached, 180, f"progress {at} before killing the {service}", world)
        assert progress() < count, f"the run finished before the {service} could be killed in flight"
        world.processes[service].kill()
        world.start(service, QUICK_TAKEOVER)

    async def every_digest_alerted() -> bool:
        return alerted() == count

    await eventually(every_digest_alerted, 300, f"an alert for each of the {count} digests", world)

    # Nothing lost: a stored report per digest. Nothing duplicated: one scan pod per digest, one alert per digest.
    notifier_s3 = world.s3("notifier")
    for ref in sorted(refs):
        assert await notifier_s3.get_if_exists(storage.latest_report_key(ref)) is not None, ref
    assert {d: c for d, c in world.puts.items() if d in mine} == dict.fromkeys(mine, 1), world.puts.most_common(3)
    by_digest = Counter(a[0].digest_ref for a in signed_alerts(world.receiver).values() if a[0].digest_ref in refs)
    assert by_digest == Counter(refs), by_digest.most_common(3)
    stored = Counter(e.digest_ref for e in await read_stored(world) if e.digest_ref in refs)
    assert stored == Counter(refs), "report.stored must be once per digest"


async def read_stored(world: DeployedWorld) -> list[ReportStored]:
    """Every report.stored, read as the admission gate reads it: its own NATS user and inbox prefix, an ordered
    consumer on its replay stream, up to as many as the stream holds on the subject when the read starts (its user
    may ask for stream info, not read single messages)."""
    config = world.config("admission")
    settings = load_settings(environ=config.env).nats
    bus = await busmod.connect(settings, "admission", admission.NATS)
    replay = await admission.open_replay(bus)
    subject = bus.subject(subjects.REPORT_STORED)
    out: list[ReportStored] = []
    try:
        info = await bus.js.stream_info(replay.name, subjects_filter=subject)
        held = (info.state.subjects or {}).get(subject, 0)
        sub = await bus.js.subscribe(subject, ordered_consumer=True, stream=replay.name)
        try:
            while len(out) < held:
                out.append(msgspec.json.decode((await sub.next_msg(timeout=30)).data, type=ReportStored))
        finally:
            await sub.unsubscribe()
    finally:
        await bus.close()
    return out


# Dashboard queries (panel title, refId) with nothing to show in a healthy run: no scan waits for a limit, is retried or
# fails, no event is dead-lettered, no upload quarantined, and no dispatcher reports a Trivy server's DB age here
# (no Trivy server runs). Their counters appear on /metrics only once counted.
QUIET = {
    ("Waits for a limit and retries", "A"),
    ("Waits for a limit and retries", "B"),
    ("Scan failures by reason (1 h)", "A"),
    ("Dead letters per service (1 h)", "A"),
    ("Uploads quarantined (1 h)", "A"),
    ("Vulnerability DB age", "A"),
}
_METRIC = re.compile(r"\bpodsweep_[a-z0-9_]+\b")


def dashboard_queries() -> list[tuple[str, str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["refId"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


async def test_a_real_prometheus_scraping_every_service_answers_every_panel_and_rule(
    world: DeployedWorld, tmp_path: Path
) -> None:
    """Prometheus scrapes every process (two admission gates; two dispatchers, one leading) and evaluates the rule
    file while two digests go through, one after the other: a rate needs a counter seen before it grows, as on a live
    system."""
    for service in SERVICES:
        world.start_every_replica(service)
    world.start("dispatcher", replica=1)  # the dev overlay runs one; a standby shows that only the leader counts
    pods = {name: f"127.0.0.1:{env['PODSWEEP_TELEMETRY_METRICS_PORT']}" for name, env in world.ports.items()}
    prometheus = start_prometheus(locate_tool("prometheus"), tmp_path / "prometheus", pods, [RULES])
    try:
        await prometheus.targets_up(len(pods))
        started = time.time()
        context = ssl.create_default_context(cadata=world.admission_ca.decode())
        url = f"https://127.0.0.1:{world.ports['admission']['PODSWEEP_ADMISSION_PORT']}/validate"
        critical = 0.0
        for i in range(2):
            image = f"registry.example.com/scraped/app-{i}:1.{i}"
            ref = expected_image_id(image, "app")
            pod = bare_pod(f"app-{i}", image, world.nodes[i])
            await world.admin.request("POST", f"/api/v1/namespaces/{world.apps}/pods", body=pod)

            async def alerted(ref: str = ref) -> bool:
                return any(a[0].digest_ref == ref for a in signed_alerts(world.receiver).values())

            await eventually(alerted, 120, f"the alert for {ref}", world)
            critical += sum(
                a[0].counts.CRITICAL for a in signed_alerts(world.receiver).values() if a[0].digest_ref == ref
            )
            review = admission_review(bare_pod(f"new-app-{i}", image, world.nodes[i]), world.apps)

            async def warned(review: dict[str, object] = review) -> bool:
                async with httpx.AsyncClient(verify=context, timeout=10) as client:
                    body = (await client.post(url, json=review)).raise_for_status().content
                answer = msgspec.json.decode(body, type=AdmissionReviewAnswer).response
                return any("CRITICAL" in w for w in answer.warnings)

            await eventually(warned, 60, "the admission gate's warning", world)

            # Before the second digest: Prometheus has scraped what the first one left (its findings per namespace).
            query = f'max(podsweep_namespace_vulnerabilities{{namespace="{world.apps}", severity="CRITICAL"}})'

            async def scraped(query: str = query, want: float = critical) -> bool:
                result = (await prometheus.api("query", query=query))["result"]
                return bool(result) and float(result[0]["value"][1]) == want

            await eventually(scraped, 30, f"{critical} CRITICAL findings in {world.apps} on Prometheus", world)

        # Every panel's query over the run, as Grafana asks for it (a range query), until each has data: the last
        # counters grow a scrape or two after the alert that the loop above waited for.
        exposed = metricnames.exposed_names()
        shown: dict[str, str] = {}
        empty: list[str] = []

        async def every_panel_has_data() -> bool:
            shown.clear()
            empty.clear()
            for title, ref_id, expr in dashboard_queries():
                series = await prometheus.query_range(expr, started, time.time())  # raises if Prometheus refuses it
                last = {
                    json.dumps(s["metric"], sort_keys=True): next(v for _, v in reversed(s["values"]) if v != "NaN")
                    for s in series
                    if any(v != "NaN" for _, v in s["values"])
                }
                shown[f"{title} [{ref_id}]"] = ", ".join(f"{k} {v}" for k, v in sorted(last.items())) or "(no data)"
                if (title, ref_id) in QUIET:
                    assert set(_METRIC.findall(expr)) <= exposed, (title, ref_id, expr)
                elif not last:
                    empty.append(f"{title} [{ref_id}]: {expr}")
            return not empty

        try:
            await eventually(every_panel_has_data, 60, "data in every panel", world)
        finally:
            (tmp_path / "panels.txt").write_text("\n".join(f"{k}: {v}" for k, v in shown.items()) + "\n")
            print("\n".join(f"{k}: {v}" for k, v in shown.items()))  # what each panel showed (pytest -s)
        # Digests by state: of the two dispatchers only the leader reports, so one series per state: a sum is right.
        leading = (await prometheus.api("query", query="podsweep_dispatcher_leading"))["result"]
        assert sorted(float(s["value"][1]) for s in leading) == [0.0, 1.0], leading
        done = (await prometheus.api("query", query='podsweep_digests{state="done"}'))["result"]
        assert len(done) == 1 and float(done[0]["value"][1]) >= 2, done
        # The rules: loaded, evaluated without error, and none fires in a healthy run.
        rules = [r for g in (await prometheus.api("rules"))["groups"] for r in g["rules"]]
        assert len(rules) == 11 and all(r["health"] == "ok" for r in rules), rules
        assert [r["name"] for r in rules if r["state"] == "firing"] == [], rules
    finally:
        prometheus.stop()
