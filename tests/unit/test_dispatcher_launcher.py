"""launcher.py driven without an API server: the request and the URL signer are stand-ins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from podsweep.config import Settings
from podsweep.kube import KubeError
from schemas.events import ScanFailed
from schemas.storage import StorageKey
from services.dispatcher.launcher import Launcher
from services.dispatcher.plan import ScanPlan, scan_id_for
from services.dispatcher.settings import configure

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REF = "registry.example.com/team/app@sha256:" + "a" * 64
JOBS = "/apis/batch/v1/namespaces/scans/jobs"


class Api:
    """Answers with the next status in `answers` (201 when none), recording every call."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, Any]] = []

    async def __call__(self, method: str, path: str, *, body: bytes) -> Any:
        self.calls.append((method, path, msgspec.json.decode(body)))
        status = self.answers.pop(0) if self.answers else 201
        if status >= 300:
            raise KubeError(status, method, path, b"{}")
        return b"{}"


class Signer:
    def presign_upload(self, key: StorageKey, expires_s: int, max_bytes: int) -> str:
        return f"https://s3.example/upload/{key}?max={max_bytes}"

    def presign_get(self, key: StorageKey, expires_s: int) -> str:
        return f"https://s3.example/get/{key}"


def launcher(api: Api) -> Launcher:
    settings = Settings(namespace="scans")
    return Launcher(configure(settings), settings.parser, api, Signer())


def node_scan(node: str | None = "n1") -> ScanPlan:
    return ScanPlan(scan_id=scan_id_for(REF, 1), digest_ref=REF, mode="node", node=node, attempt=1)


def refused_pod(scan_id: str) -> ScanFailed:
    return ScanFailed(
        cluster="c",
        scan_id=scan_id,
        digest_ref=REF,
        mode="node",
        node="n1",
        job=scan_id,
        reason="PodCreateRejected",
        message='serviceaccount "scan" not found',
        failed_at=T0,
    )


@pytest.mark.parametrize(
    ("status", "created"),
    [
        pytest.param(201, "created", id="created"),
        pytest.param(409, "exists", id="a-repeated-step"),
        pytest.param(422, "refused", id="invalid-every-time"),
        pytest.param(403, "refused", id="forbidden-every-time"),
    ],
)
async def test_creating_a_job_says_what_the_api_server_answered(status: int, created: str) -> None:
    api = Api(status)
    jobs = launcher(api)
    manifest = jobs.node_scan(node_scan())
    assert await jobs.create(manifest, slot_id="psw-x", mode="node", now=T0, span_name="t") == (created, status)
    ((method, path, body),) = api.calls
    assert (method, path, body["metadata"]["namespace"]) == ("POST", JOBS, "scans")


@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_a_transient_refusal_to_create_raises_for_the_caller_to_retry(status: int) -> None:
    jobs = launcher(Api(status))
    with pytest.raises(KubeError):
        await jobs.create(jobs.node_scan(node_scan()), slot_id="psw-x", mode="node", now=T0, span_name="t")


def test_a_node_scan_job_uploads_to_its_own_keys_only() -> None:
    manifest = launcher(Api()).node_scan(node_scan())
    text = msgspec.json.encode(manifest).decode()
    assert f"upload/raw/sha256/{'a' * 64}/" in text
    with pytest.raises(ValueError, match="without a node"):
        launcher(Api()).node_scan(node_scan(node=None))


@pytest.mark.parametrize(
    ("name", "statuses", "gone", "calls"),
    [
        pytest.param("psw-0123456789abcdef01234567", (200,), True, 1, id="deleted"),
        pytest.param("psw-0123456789abcdef01234567", (404,), True, 1, id="already-gone"),
        pytest.param("psw-0123456789abcdef01234567", (403,), False, 1, id="not-allowed"),
        pytest.param("kube-proxy", (), True, 0, id="never-a-job-podsweep-did-not-name"),
    ],
)
async def test_deleting_a_job(name: str, statuses: tuple[int, ...], gone: bool, calls: int) -> None:
    api = Api(*statuses)
    assert await launcher(api).delete(name) is gone
    assert len(api.calls) == calls
    if calls:
        assert api.calls[0][:2] == ("DELETE", f"{JOBS}/{name}")
        assert api.calls[0][2] == {"propagationPolicy": "Background"}


async def test_a_delete_the_api_server_fails_raises() -> None:
    with pytest.raises(KubeError):
        await launcher(Api(500)).delete("psw-0123456789abcdef01234567")


async def test_refused_pods_hold_creations_until_a_probe_is_accepted() -> None:
    jobs = launcher(Api())
    policy = jobs.cfg.policy
    assert jobs.allowance(T0) is None, "no hold: only the limits say"
    jobs.pods_refused(refused_pod("psw-first"), T0)
    assert jobs.allowance(T0) == 0
    after = T0 + policy.backoff_base
    assert jobs.allowance(after) == 1, "the backoff passed: one probe"
    await jobs.create(jobs.node_scan(node_scan()), slot_id="psw-probe", mode="node", now=after, span_name="t")
    assert jobs.hold is not None and jobs.hold.probe == "psw-probe"
    assert jobs.allowance(after) == 0, "the probe is out"
    jobs.pods_refused(refused_pod("psw-older"), after)
    assert jobs.hold.rejections == 1, "a Job created before the hold is refused too: it changes nothing"
    jobs.pods_refused(refused_pod("psw-probe"), after)
    assert jobs.hold.rejections == 2 and jobs.hold.until == after + 2 * policy.backoff_base
    assert jobs.pods_accepted() is True
    assert jobs.allowance(after) is None and jobs.pods_accepted() is False


def test_a_probe_that_failed_otherwise_lets_the_next_job_probe() -> None:
    jobs = launcher(Api())
    jobs.pods_refused(refused_pod("psw-first"), T0)
    later = T0 + timedelta(hours=1)
    jobs.hold = msgspec.structs.replace(jobs.hold, probe="psw-probe") if jobs.hold else None
    jobs.failed_otherwise("psw-unrelated")
    assert jobs.allowance(later) == 0
    jobs.failed_otherwise("psw-probe")
    assert jobs.allowance(later) == 1
