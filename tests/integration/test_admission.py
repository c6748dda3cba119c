"""The admission gate as the apiserver sees it: the harness kube-apiserver calls `podsweep run admission` over HTTPS
on loopback (a CA made here, registered as the webhook's caBundle), with a real NATS and a real SeaweedFS behind it.

The gate starts from a stored index and reports in S3 and from events on the stream, as in a cluster. Pods and
Deployments go through the apiserver with a raw HTTP client, so the `Warning` headers of each answer are visible.
The last test kills the gate's process: failurePolicy Ignore admits, Fail refuses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio
import yaml
from typer.testing import CliRunner

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings
from podsweep.embedded import free_port
from podsweep.kube import Kube, KubeError
from podsweep.objectstore import ObjectStore
from schemas import storage, subjects
from schemas.admission import AdmissionDecided
from schemas.events import ReportStored, RescanRequested, SeverityCounts, Workload
from schemas.index import DigestSummary, IndexedDigest, SummaryIndex
from schemas.report import Finding, Report
from tests.harness.admission import Tls, deployment, make_tls, pod, review, seen
from tests.harness.kube import KubeControlPlane, KubeControlPlaneError
from tests.harness.kwok import create_namespace
from tests.harness.streams import stored_messages

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC)
IMAGE = "registry.test/team/app"
BAD = f"{IMAGE}@sha256:{'b' * 64}"  # in the stored index: 1 CRITICAL
SUPPRESSED = f"{IMAGE}@sha256:{'5' * 64}"  # in the stored index: 1 CRITICAL, suppressed by the policy
CLEAN = f"{IMAGE}@sha256:{'c' * 64}"
LATE = f"{IMAGE}@sha256:{'1' * 64}"  # its report arrives while the gate runs
UNSCANNED = f"{IMAGE}@sha256:{'d' * 64}"  # seen running, never scanned
CVE = "CVE-2026-4242"
SUPPRESSED_CVE = "CVE-2026-5353"
LATE_CVE = "CVE-2026-6464"
WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


@dataclass
class Gate:
    kube: KubeControlPlane
    kube_api: Kube
    nats: NatsSettings
    bus: busmod.Bus
    store: ObjectStore
    tls: Tls
    port: int
    metrics_port: int
    process: asyncio.subprocess.Process
    webhook: str
    enforce: str  # namespaces the webhook selects, by mode
    warn: str
    config_file: Path
    log: Path

    async def create(self, namespace: str, obj: dict[str, Any]) -> tuple[int, dict[str, Any], list[str]]:
        """POST through the apiserver: status, body and the Warning headers (the client's view of admission)."""
        plural = {"Pod": "pods", "Deployment": "deployments"}[obj["kind"]]
        base = "/api/v1" if obj["kind"] == "Pod" else "/apis/apps/v1"
        context = ssl.create_default_context(cafile=str(self.kube.ca_file))
        async with httpx.AsyncClient(verify=context, timeout=20) as client:
            response = await client.post(
                f"{self.kube.server}{base}/namespaces/{namespace}/{plural}",
                json=obj,
                headers={"Authorization": f"Bearer {self.kube.token}"},
            )
        return response.status_code, response.json(), response.headers.get_list("warning")

    async def audits(self) -> list[AdmissionDecided]:
        return [msgspec.json.decode(d, type=AdmissionDecided) for d in await self._read(subjects.ADMISSION_DECIDED)]

    async def rescans(self) -> list[RescanRequested]:
        return [msgspec.json.decode(d, type=RescanRequested) for d in await self._read(subjects.RESCAN_REQUESTED)]

    async def _read(self, name: str) -> list[bytes]:
        """Every event stored on the subject so far: the read ends at its last stream sequence, not at a pause."""
        return [msg.data for msg in await stored_messages(self.bus.js, self.nats.stream, self.bus.subject(name))]

    async def audit_for(self, uid_part: str, timeout_s: float = 10) -> AdmissionDecided:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in await self.audits():
                if uid_part in (event.name or "") or uid_part in event.workload.name:
                    return event
            await asyncio.sleep(0.2)
        raise AssertionError(f"no admission.decided for {uid_part} in {timeout_s} s")


def _report(ref: str, scan_id: str, cve: str) -> Report:
    finding = Finding(
        id=cve,
        package="openssl",
        installed_version="3.0.1",
        severity="CRITICAL",
        fixed_version="3.0.9",
        fixable=True,
        cvss=9.8,
        title="a fixture finding",
    )
    counts = SeverityCounts(CRITICAL=1)
    return Report(
        digest_ref=ref,
        scan_id=scan_id,
        source_format="v2",
        findings=[finding],
        counts=counts,
        fixable=counts,
    )


def _summary(ref: str, scan_id: str, critical: int) -> DigestSummary:
    counts = SeverityCounts(CRITICAL=critical)
    return DigestSummary(
        digest_ref=ref,
        scan_id=scan_id,
        finished_at=NOW - timedelta(hours=1),
        stored_at=NOW - timedelta(hours=1),
        counts=counts,
        fixable=counts,
        report_key=storage.latest_report_key(ref),
        history_key=storage.history_report_key(ref, NOW - timedelta(hours=1)),
    )


async def _seed(store: ObjectStore, bus: busmod.Bus) -> None:
    """What podsweep knew before the gate started: an index with reports, and sightings on the stream."""
    encode = msgspec.json.encode
    for ref, scan_id, cve in ((BAD, "scan-bad-0001", CVE), (SUPPRESSED, "scan-sup-0001", SUPPRESSED_CVE)):
        await store.put(storage.latest_report_key(ref), encode(_report(ref, scan_id, cve)))
    index = SummaryIndex(
        generated_at=NOW - timedelta(minutes=30),
        digests={
            ref.rsplit(":", 1)[1]: IndexedDigest(digest_ref=ref, images=images, report=report)
            for ref, images, report in (
                (BAD, [f"{IMAGE}:1.0"], _summary(BAD, "scan-bad-0001", 1)),
                (SUPPRESSED, [], _summary(SUPPRESSED, "scan-sup-0001", 1)),
                (CLEAN, [f"{IMAGE}:2.0"], _summary(CLEAN, "scan-cln-0001", 0)),
            )
        },
    )
    await store.put(storage.SUMMARY_KEY, encode(index))
    # The tag moved: first to CLEAN (in the index), then seen running BAD; the gate must follow the sighting.
    await bus.publish(
        subjects.IMAGE_SEEN,
        seen(f"{IMAGE}:moving", CLEAN, NOW - timedelta(hours=3), namespace="somewhere"),
        msg_id="s1",
    )
    await bus.publish(
        subjects.IMAGE_SEEN,
        seen(f"{IMAGE}:moving", BAD, NOW - timedelta(minutes=5), namespace="somewhere"),
        msg_id="s2",
    )
    await bus.publish(
        subjects.IMAGE_SEEN,
        seen(f"{IMAGE}:new", UNSCANNED, NOW - timedelta(minutes=5), namespace="somewhere"),
        msg_id="s3",
    )


def _write_config(path: Path, gate_port: int, metrics_port: int, nats: NatsSettings, s3: S3Settings, tls: Tls) -> None:
    policy = path.parent / "policy.yaml"
    policy.write_text(
        f"""suppressions:
  - id: {SUPPRESSED_CVE}
    owner: sec-team@example.com
    reason: only reachable from the admin network; fix tracked in SEC-77
    expires: {(NOW + timedelta(days=10)).date().isoformat()}
"""
    )
    document = {
        "nats": {
            "url": nats.url,
            "user": nats.user,
            "password": nats.password,
            "subject_root": nats.subject_root,
            "stream": nats.stream,
            "kv_prefix": nats.kv_prefix,
        },
        "s3": {
            "endpoint_url": s3.endpoint_url,
            "bucket": s3.bucket,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
        },
        "telemetry": {"metrics_port": metrics_port},
        "admission": {
            "host": "127.0.0.1",
            "port": gate_port,
            "cert_file": str(tls.cert_file),
            "key_file": str(tls.key_file),
            "cert_reload_s": 0.5,
            "policy_file": str(policy),
            "default_mode": "warn",
            "namespace_modes": ["enf-*=enforce"],
            "bypasses": [
                {
                    "selector": {"app.kubernetes.io/instance": "payments"},
                    "owner": "platform@example.com",
                    "reason": "release 4.2 ships before the base image fix (INC-1234)",
                    "expires": (NOW + timedelta(days=3)).isoformat(),
                }
            ],
        },
    }
    path.write_text(yaml.safe_dump(document))


async def _start(config_file: Path, log: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "PODSWEEP_CONFIG": str(config_file), "PODSWEEP_LOG_FORMAT": "json"}
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "podsweep", "run", "admission", cwd=REPO, env=env, stdout=out, stderr=out
        )


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _ready(metrics_port: int, process: asyncio.subprocess.Process, log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise AssertionError(f"the gate exited with {process.returncode}:\n{_tail(log)}")
            try:
                if (await client.get(f"http://127.0.0.1:{metrics_port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the gate was not ready in {timeout_s} s:\n{_tail(log)}")


def _shipped_rules() -> dict[str, list[dict[str, Any]]]:
    """The rules of each webhook as deploy/base/admission.yaml ships them: what the apiserver sends here is what it
    would send a deployed gate."""
    documents = yaml.safe_load_all((REPO / "deploy" / "base" / "admission.yaml").read_text())
    shipped = next(d for d in documents if d and d["kind"] == "ValidatingWebhookConfiguration")
    return {hook["name"]: hook["rules"] for hook in shipped["webhooks"]}


def _webhook_configuration(name: str, port: int, ca: bytes, namespaces: list[str], policy: str) -> dict[str, Any]:
    rules = _shipped_rules()
    assert set(rules) == {"pods.admission.podsweep.io", "workloads.admission.podsweep.io"}, rules

    def hook(hook_name: str) -> dict[str, Any]:
        return {
            "name": hook_name,
            "clientConfig": {"url": f"https://127.0.0.1:{port}/validate", "caBundle": base64.b64encode(ca).decode()},
            "rules": rules[hook_name],
            "failurePolicy": policy,
            "timeoutSeconds": 3,
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "namespaceSelector": {
                "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]
            },
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [hook("pods.admission.podsweep.io"), hook("workloads.admission.podsweep.io")],
    }


@pytest_asyncio.fixture(scope="module")
async def gate(
    kube: KubeControlPlane,
    nats_server: embedded.EmbeddedNats,
    s3_server: embedded.EmbeddedS3,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Gate]:
    run = secrets.token_hex(3)
    work = tmp_path_factory.mktemp("admission")
    nats = NatsSettings(
        url=nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        subject_root=f"adm{run}.podsweep",
        stream=f"ADM{run}",
        kv_prefix=f"adm{run}",
    )
    s3 = S3Settings(
        endpoint_url=s3_server.endpoint_url,
        bucket=f"podsweep-adm{run}",
        access_key_id=s3_server.identity.access_key_id,
        secret_access_key=s3_server.identity.secret_access_key,
    )
    bus = await busmod.connect(nats, "admission-test")
    await busmod.ensure_stream(bus)
    store = ObjectStore(s3)
    await store.ensure_bucket()
    await _seed(store, bus)
    tls = make_tls(work / "tls")
    port, metrics_port = free_port(), free_port()
    config_file = work / "podsweep.yaml"
    _write_config(config_file, port, metrics_port, nats, s3, tls)
    log = work / "admission.log"
    process = await _start(config_file, log)
    kube_api = await Kube.connect(str(kube.kubeconfig))
    enforce, warn = f"enf-{run}", f"warn-{run}"
    for namespace in (enforce, warn):
        await create_namespace(kube_api, namespace)
    webhook = f"podsweep-admission-{run}"
    try:
        await _ready(metrics_port, process, log)
        await kube_api.request(
            "POST",
            WEBHOOKS,
            body=_webhook_configuration(webhook, port, tls.ca_pem, [enforce, warn], "Ignore"),
        )
        gate = Gate(
            kube, kube_api, nats, bus, store, tls, port, metrics_port, process, webhook, enforce, warn, config_file, log
        )
        await _wait_webhook_active(gate)
        yield gate
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(KubeError):
            await kube_api.request("DELETE", f"{WEBHOOKS}/{webhook}")
        for namespace in (enforce, warn):
            with contextlib.suppress(KubeError):
                await kube_api.request("DELETE", f"/api/v1/namespaces/{namespace}")
        await kube_api.close()
        await bus.close()


async def _wait_webhook_active(gate: Gate, timeout_s: float = 20) -> None:
    """The apiserver picks a new webhook configuration up asynchronously: probe until a bad pod is refused."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _, _ = await gate.create(gate.enforce, pod(f"probe-{secrets.token_hex(3)}", {"app": BAD}))
        if status == 403:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"the webhook never refused a breaching pod:\n{_tail(gate.log)}")


# ---------------------------------------------------------------------------------------------------------------


async def test_enforce_denies_a_breaching_pod_and_the_message_names_the_findings(gate: Gate) -> None:
    status, body, _ = await gate.create(gate.enforce, pod("bad-by-digest", {"app": BAD}))
    assert status == 403, body
    message = body["message"]
    for part in (BAD, "1 CRITICAL (more than 0)", CVE, "openssl 3.0.1", "suppression"):
        assert part in message, message
    audit = await gate.audit_for("bad-by-digest")
    assert (audit.verdict, audit.allowed, audit.namespace) == ("deny", False, gate.enforce)
    assert audit.images[0].findings == [CVE]
    # Who asked: the apiserver's words in the request, marked as such.
    assert audit.requester is not None and audit.requester.source == "request.userInfo"
    assert audit.requester.username == "podsweep-test-admin" and "system:masters" in audit.requester.groups


async def test_enforce_denies_a_deployment_at_apply(gate: Gate) -> None:
    status, body, _ = await gate.create(gate.enforce, deployment("api", {"app": BAD}))
    assert status == 403, body
    assert CVE in body["message"]
    audit = await gate.audit_for("api")
    assert audit.workload == Workload(kind="Deployment", name="api")


async def test_warn_mode_creates_the_pod_and_the_client_sees_the_warnings(gate: Gate) -> None:
    status, body, warnings = await gate.create(gate.warn, pod("warned", {"app": BAD}))
    assert status == 201, body
    assert any(CVE in w and "1 CRITICAL" in w for w in warnings), warnings
    assert (await gate.audit_for("warned")).verdict == "warn"


async def test_a_suppression_lets_it_in_and_the_audit_names_owner_and_reason(gate: Gate) -> None:
    status, body, warnings = await gate.create(gate.enforce, pod("suppressed", {"app": SUPPRESSED}))
    assert status == 201, body
    assert any("sec-team@example.com" in w for w in warnings), warnings
    audit = await gate.audit_for("suppressed")
    assert audit.verdict == "suppressed" and audit.allowed
    note = audit.images[0].suppressions[0]
    assert (note.owner, note.reason) == (
        "sec-team@example.com",
        "only reachable from the admin network; fix tracked in SEC-77",
    )


async def test_a_bypass_label_lets_it_in_and_the_audit_names_owner_and_reason(gate: Gate) -> None:
    labels = {"app.kubernetes.io/instance": "payments"}
    status, body, warnings = await gate.create(gate.enforce, pod("bypassed", {"app": BAD}, labels=labels))
    assert status == 201, body
    assert any("bypass by platform@example.com" in w for w in warnings), warnings
    audit = await gate.audit_for("bypassed")
    assert audit.verdict == "bypass" and audit.bypass is not None
    assert (audit.bypass.owner, audit.bypass.reason) == (
        "platform@example.com",
        "release 4.2 ships before the base image fix (INC-1234)",
    )


async def test_a_tag_resolves_through_the_last_digest_seen_running_it(gate: Gate) -> None:
    status, body, _ = await gate.create(gate.enforce, pod("by-tag", {"app": f"{IMAGE}:moving"}))
    assert status == 403, body
    assert "tags move" in body["message"] and CVE in body["message"]
    status, body, _ = await gate.create(gate.enforce, pod("clean-tag", {"app": f"{IMAGE}:2.0"}))
    assert status == 201, body


async def test_an_unknown_image_is_admitted_with_a_warning_and_a_known_unscanned_one_gets_a_scan_request(
    gate: Gate,
) -> None:
    status, body, warnings = await gate.create(gate.enforce, pod("unknown", {"app": "registry.test/never:1"}))
    assert status == 201, body
    assert any("never been seen running" in w for w in warnings), warnings
    status, body, warnings = await gate.create(gate.enforce, pod("unscanned", {"app": f"{IMAGE}:new"}))
    assert status == 201, body
    assert any("scan was requested" in w for w in warnings), warnings
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        requests = [r for r in await gate.rescans() if UNSCANNED in r.digests]
        if requests:
            break
        await asyncio.sleep(0.2)
    assert requests and requests[0].requested_by == "admission"


async def test_a_report_stored_while_running_is_used_without_restart(gate: Gate) -> None:
    status, _, _ = await gate.create(gate.enforce, pod("late-before", {"app": LATE}))
    assert status == 201  # never seen: unknown, admitted with a warning
    at = datetime.now(UTC)
    history = storage.history_report_key(LATE, at)
    await gate.store.put(history, msgspec.json.encode(_report(LATE, "scan-late-0001", LATE_CVE)))
    event = ReportStored(
        cluster="default",
        scan_id="scan-late-0001",
        digest_ref=LATE,
        report_key=storage.latest_report_key(LATE),
        history_key=history,
        counts=SeverityCounts(CRITICAL=1),
        fixable=SeverityCounts(CRITICAL=1),
        stored_at=at,
    )
    await gate.bus.publish(subjects.REPORT_STORED, event, msg_id="late-1")
    deadline = time.monotonic() + 10
    message = ""
    while time.monotonic() < deadline:
        status, body, _ = await gate.create(gate.enforce, pod(f"late-{secrets.token_hex(2)}", {"app": LATE}))
        message = body.get("message", "")
        if status == 403 and LATE_CVE in message:  # the findings, not only the counts
            break
        await asyncio.sleep(0.2)
    assert LATE_CVE in message


async def test_hostile_input_gets_a_clear_answer_and_never_a_crash(gate: Gate) -> None:
    context = ssl.create_default_context(cadata=gate.tls.ca_pem.decode())
    url = f"https://127.0.0.1:{gate.port}/validate"
    async with httpx.AsyncClient(verify=context, timeout=10) as client:
        malformed = await client.post(url, content=b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionRev')
        assert malformed.status_code == 400 and "not an AdmissionReview" in malformed.text
        # Over admission.max_body_mb (32 MiB): declared, or found while reading a chunked body. Raw writes that stop
        # where the gate must answer: a client still sending when the gate closes (1 s after its answer) would get a
        # reset instead of the answer on a loaded machine, which says nothing about the gate.
        declared = await _exchange(gate, [_post_head(33 * 1024 * 1024)])
        assert declared.startswith(b"HTTP/1.1 413"), declared[:300]
        over = 32 * 1024 * 1024 + 1
        chunked_head = (
            b"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        chunked = await _exchange(gate, [chunked_head + f"{over:x}\r\n".encode() + b"x" * over + b"\r\n"])
        assert chunked.startswith(b"HTTP/1.1 413"), chunked[:300]
        # A compressed review is not decompressed (the apiserver never sends one): a 400, whatever it holds.
        packed = gzip.compress(json.dumps(review(pod("gz", {"app": BAD}), gate.enforce, uid="gz-1")).encode())
        compressed = await client.post(url, content=packed, headers={"Content-Encoding": "gzip"})
        assert compressed.status_code == 400 and "not an AdmissionReview" in compressed.text
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
        unknown_kind = await client.post(url, json=review(configmap, gate.enforce, uid="u-kind"))
        assert unknown_kind.json()["response"] == {"uid": "u-kind", "allowed": True}
    # Odd image references through the apiserver (which accepts them): admitted with a bounded warning.
    for image in ("Registry.Test/UPPER:1", "registry.test/app:" + "t" * 300, "registry.test/x@sha256:zz"):
        status, body, warnings = await gate.create(gate.enforce, pod(f"odd-{secrets.token_hex(2)}", {"app": image}))
        assert status == 201, body
        assert warnings and all(len(w) < 400 for w in warnings)
    assert gate.process.returncode is None


def _padded_review(namespace: str, name: str, image: str, size: int) -> bytes:
    """An AdmissionReview of a pod whose env value pads the body to `size` bytes (what an attacker would send to
    push a review past what the gate reads)."""
    obj = pod(name, {"app": image})
    obj["spec"]["containers"][0]["env"] = [{"name": "PAD", "value": ""}]
    body = json.dumps(review(obj, namespace, uid=f"pad-{name}"))
    obj["spec"]["containers"][0]["env"][0]["value"] = "x" * (size - len(body))
    padded = json.dumps(review(obj, namespace, uid=f"pad-{name}")).encode()
    assert len(padded) == size
    return padded


def _denied(answer: bytes, uid: str) -> bool:
    response = json.loads(answer)["response"]
    return response["uid"] == uid and response["allowed"] is False and response["status"]["code"] == 403


async def _exchange(gate: Gate, parts: list[bytes], pause_s: float = 0.05) -> bytes:
    """Send `parts` over one TLS connection, each its own write with a pause between, and read until the gate
    closes it (the request asks it to)."""
    context = ssl.create_default_context(cadata=gate.tls.ca_pem.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port, ssl=context)
    try:
        for n, part in enumerate(parts):
            if n:
                await asyncio.sleep(pause_s)  # builds the split on the wire; nothing is concluded from it
            writer.write(part)
            await writer.drain()
        return await _read_until_closed(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def _read_until_closed(reader: asyncio.StreamReader, timeout_s: float = 60) -> bytes:
    """Everything the gate sends until it closes the connection (an abrupt close counts as closed); fails after a
    generous `timeout_s` if it never does."""
    received = bytearray()

    async def drain() -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                return
            if not chunk:
                return
            received.extend(chunk)

    await asyncio.wait_for(drain(), timeout_s)
    return bytes(received)


def _post_head(length: int, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{connection}\r\n"
    ).encode()


async def test_a_review_split_across_writes_is_judged_whole(gate: Gate) -> None:
    body = json.dumps(review(pod("split", {"app": BAD}), gate.enforce, uid="split-1")).encode()
    half = len(body) // 2
    answer = await _exchange(gate, [_post_head(len(body)) + body[:half], body[half:]])
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:500]
    assert _denied(payload, "split-1"), payload[:500]


@pytest.mark.parametrize("size", [600_000, 900_000], ids=["600KB", "900KB"])
async def test_a_large_review_is_read_whole_and_judged(gate: Gate, size: int) -> None:
    body = _padded_review(gate.enforce, f"large-{size}", BAD, size)
    # In two writes, as a busy sender's would arrive: the gate must not judge what came first.
    third = size // 3
    answer = await _exchange(gate, [_post_head(size) + body[:third], body[third:]])
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:500]
    assert _denied(payload, f"pad-large-{size}"), payload[:500]


@pytest.mark.parametrize("filler", ["x", "<"], ids=["plain", "escaped-six-fold"])
async def test_a_padded_pod_through_the_apiserver_is_still_denied_in_enforce(gate: Gate, filler: str) -> None:
    # ~2 MB of env value: under the apiserver's 3 MiB request limit, over the 1 MiB the gate used to read. The
    # apiserver writes `<` as \u003c, so the second review is about six times the pod.
    size = 2_000_000 if filler == "x" else 450_000
    obj = pod(f"padded-{secrets.token_hex(2)}", {"app": BAD})
    obj["spec"]["containers"][0]["env"] = [{"name": "PAD", "value": filler * size}]
    status, body, _ = await gate.create(gate.enforce, obj)
    assert status == 403, {k: str(v)[:300] for k, v in body.items()}
    assert CVE in body["message"]


@pytest.mark.timeout(120)
async def test_a_client_that_sends_headers_and_no_body_is_answered_and_closed(gate: Gate) -> None:
    context = ssl.create_default_context(cadata=gate.tls.ca_pem.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port, ssl=context)
    try:
        writer.write(_post_head(2000, close=False))  # keep-alive asked for, and the body never comes
        await writer.drain()
        answer = await _read_until_closed(reader)  # returns once the gate closes the connection
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"read_timeout_s" in answer


@pytest.mark.timeout(120)
async def test_a_client_that_stalls_inside_its_headers_is_closed(gate: Gate) -> None:
    context = ssl.create_default_context(cadata=gate.tls.ca_pem.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port, ssl=context)
    try:
        writer.write(b"POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        await writer.drain()
        # Closed by the header deadline (admission.read_timeout_s); aiohttp alone would wait for its keep-alive
        # timeout, an hour by default.
        assert await _read_until_closed(reader, 45) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.timeout(120)
async def test_a_client_that_never_starts_tls_is_let_go(gate: Gate) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    try:
        # The gate's handshake deadline is admission.read_timeout_s (5 s); the default would have been 60 s.
        assert await _read_until_closed(reader, 45) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_deep_nesting_is_a_400_not_a_crash(gate: Gate) -> None:
    body = review(pod("deep", {"app": BAD}), gate.enforce, uid="deep-1")
    encoded = json.dumps(body)[:-2] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}}"
    context = ssl.create_default_context(cadata=gate.tls.ca_pem.decode())
    async with httpx.AsyncClient(verify=context, timeout=20) as client:
        response = await client.post(f"https://127.0.0.1:{gate.port}/validate", content=encoded.encode())
    assert response.status_code == 400, response.text[:300]
    assert "nested too deeply" in response.text


async def test_set_image_on_a_running_pod_is_judged_like_a_new_pod(gate: Gate) -> None:
    name = f"set-image-{secrets.token_hex(2)}"
    status, body, _ = await gate.create(gate.enforce, pod(name, {"app": CLEAN}))
    assert status == 201, body
    with pytest.raises(KubeControlPlaneError) as refused:
        await asyncio.to_thread(gate.kube.kubectl_run, "-n", gate.enforce, "set", "image", f"pod/{name}", f"app={BAD}")
    assert "denied the request" in str(refused.value) and CVE in str(refused.value)
    current = msgspec.json.decode(await gate.kube_api.get(f"/api/v1/namespaces/{gate.enforce}/pods/{name}"))
    assert current["spec"]["containers"][0]["image"] == CLEAN
    audit = await gate.audit_for(name)
    assert (audit.operation, audit.verdict) == ("UPDATE", "deny")
    # The same pod relabelled keeps its image: an update that brings no image is never refused.
    await asyncio.to_thread(gate.kube.kubectl_run, "-n", gate.enforce, "label", f"pod/{name}", "relabelled=yes")


async def test_a_debug_container_with_a_breaching_image_is_refused(gate: Gate) -> None:
    name = f"debugged-{secrets.token_hex(2)}"
    status, body, _ = await gate.create(gate.enforce, pod(name, {"app": CLEAN}))
    assert status == 201, body
    patch = {"spec": {"ephemeralContainers": [{"name": "debugger", "image": BAD}]}}
    with pytest.raises(KubeError) as refused:
        await gate.kube_api.request(
            "PATCH",
            f"/api/v1/namespaces/{gate.enforce}/pods/{name}/ephemeralcontainers",
            body=msgspec.json.encode(patch),
            content_type="application/strategic-merge-patch+json",
        )
    assert refused.value.status == 403 and CVE.encode() in refused.value.body


async def test_a_renewed_certificate_is_served_without_restart(gate: Gate) -> None:
    original = (gate.tls.cert_file.read_bytes(), gate.tls.key_file.read_bytes())
    renewed = make_tls(gate.tls.cert_file.parent / "renewed")
    try:
        gate.tls.key_file.write_bytes(renewed.key_file.read_bytes())
        gate.tls.cert_file.write_bytes(renewed.cert_file.read_bytes())
        assert await _served_with(gate, renewed.ca_pem)
    finally:  # the apiserver's caBundle is the first CA: put the first pair back
        gate.tls.key_file.write_bytes(original[1])
        gate.tls.cert_file.write_bytes(original[0])
    assert await _served_with(gate, gate.tls.ca_pem)


async def _served_with(gate: Gate, ca_pem: bytes, timeout_s: float = 10) -> bool:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(verify=context, timeout=5) as client:
                response = await client.post(f"https://127.0.0.1:{gate.port}/validate", content=b"{}")
                return response.status_code == 400
        except httpx.ConnectError:  # still the other certificate
            await asyncio.sleep(0.2)
    return False


async def test_report_admissions_lists_recent_decisions(gate: Gate) -> None:
    from podsweep_cli.app import app

    env = {"PODSWEEP_CONFIG": str(gate.config_file)}
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["report", "admissions", "--json", "--verdict", "bypass"], env=env
    )
    assert result.exit_code == 0, result.output
    lines = [msgspec.json.decode(line, type=AdmissionDecided) for line in result.output.splitlines() if line]
    assert [event.name for event in lines] == ["bypassed"]


async def test_metrics_count_decisions_by_verdict_and_namespace(gate: Gate) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{gate.metrics_port}/metrics")).text
    decided = [line for line in text.splitlines() if line.startswith("podsweep_admission_decisions_total{")]
    assert any(f'namespace="{gate.enforce}"' in line and 'verdict="deny"' in line for line in decided), decided
    assert any(f'namespace="{gate.warn}"' in line and 'verdict="warn"' in line for line in decided), decided
    assert any('verdict="http-400"' in line for line in decided), decided
    assert "podsweep_admission_request_seconds_bucket" in text


async def test_a_killed_webhook_admits_under_ignore_and_refuses_under_fail(gate: Gate) -> None:
    gate.process.send_signal(signal.SIGKILL)
    await gate.process.wait()
    status, body, _ = await gate.create(gate.enforce, pod("while-dead", {"app": BAD}))
    assert status == 201, body  # failurePolicy Ignore
    path = f"{WEBHOOKS}/{gate.webhook}"
    current = msgspec.json.decode(await gate.kube_api.get(path))
    for hook in current["webhooks"]:
        hook["failurePolicy"] = "Fail"
    await gate.kube_api.request("PUT", path, body=current)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, body, _ = await gate.create(gate.enforce, pod(f"refused-{secrets.token_hex(2)}", {"app": CLEAN}))
        if status >= 500 or status == 403:
            break
        await asyncio.sleep(0.3)
    assert status >= 500 or status == 403, body
    assert "failed calling webhook" in body.get("message", ""), body
