"""The kubelet stand-in runs podsweep's scan Jobs for real: real Trivy, real S3, the Job spec's own paths and flags."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import re
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from podsweep.config import S3Settings
from podsweep.kube import Kube, KubeError
from podsweep.objectstore import ObjectStore
from schemas import jobs, storage
from services.dispatcher import jobspec, scanenv
from tests.harness.kwok import create_fake_node, get_node, get_pod, list_pods, wait_until
from tests.harness.rootfs import (
    EXPECTED_FINDINGS,
    HOSTILE_TRIVY_ENV,
    HOSTILE_WORKDIR,
    FixtureKind,
    build_rootfs,
    hostile_trivy_settings_rootfs,
)
from tests.harness.standin import (
    DEFAULT_CAPABILITIES,
    Bind,
    Capabilities,
    Container,
    ContainerState,
    EnvVar,
    HostImage,
    ImageRoot,
    KubeletStandin,
    Pod,
    PodMeta,
    PodSpec,
    RootfsImage,
    Running,
    SecurityContext,
    StartStandin,
    Terminated,
    VolumeMount,
    Waiting,
    effective_capabilities,
    expand_references,
    plan_container,
    pod_phase,
    pod_status,
    scan_images,
)
from tests.harness.trivy import TrivyServer

DIGEST_REF = "registry.example.com/team/app@sha256:" + "5e" * 32
NOW = "2026-11-23T10:00:00Z"


# --- pure decisions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        pytest.param(SecurityContext(), set(DEFAULT_CAPABILITIES), id="no-context-keeps-runtime-defaults"),
        pytest.param(
            SecurityContext(capabilities=Capabilities(drop=["ALL"], add=["DAC_READ_SEARCH"])),
            {"DAC_READ_SEARCH"},
            id="drop-all-add-one-keeps-only-that-one",
        ),
        pytest.param(SecurityContext(capabilities=Capabilities(drop=["ALL"])), set(), id="drop-all-keeps-none"),
        pytest.param(
            SecurityContext(capabilities=Capabilities(drop=["CAP_NET_RAW", "chown"])),
            set(DEFAULT_CAPABILITIES) - {"NET_RAW", "CHOWN"},
            id="drop-accepts-cap-prefix-and-lower-case",
        ),
        pytest.param(
            SecurityContext(capabilities=Capabilities(add=["NO_SUCH_CAP"], drop=["ALL"])),
            set(),
            id="unknown-capability-is-not-granted",
        ),
    ],
)
def test_capabilities_follow_runtime_defaults_drop_then_add(context: SecurityContext, expected: set[str]) -> None:
    assert effective_capabilities(context) == expected


def test_privileged_container_keeps_every_capability() -> None:
    assert "SYS_ADMIN" in effective_capabilities(SecurityContext(privileged=True))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("--server=$(URL)", "--server=http://t", id="defined-name-expands"),
        pytest.param("$(MISSING)", "$(MISSING)", id="undefined-name-stays-as-written"),
        pytest.param("$$(URL)", "$(URL)", id="double-dollar-escapes"),
        pytest.param("a$b", "a$b", id="lone-dollar-is-kept"),
    ],
)
def test_env_references_expand_like_kubernetes(text: str, expected: str) -> None:
    assert expand_references(text, {"URL": "http://t"}) == expected


def _pod(init: list[Container], main: list[Container]) -> Pod:
    return Pod(metadata=PodMeta(name="p", namespace="n", uid="u"), spec=PodSpec(init_containers=init, containers=main))


_INIT = [Container(name="a", image="i"), Container(name="b", image="i")]
_MAIN = [Container(name="c", image="i")]
_OK = Terminated(0, "Completed", NOW, NOW)


@pytest.mark.parametrize(
    ("states", "phase"),
    [
        pytest.param({}, "Pending", id="nothing-started-is-pending"),
        pytest.param({"a": _OK, "b": Running(NOW)}, "Pending", id="init-running-is-pending"),
        pytest.param({"a": _OK, "b": Waiting("ErrImageNeverPull")}, "Pending", id="image-never-pull-stays-pending"),
        pytest.param({"a": Terminated(1, "Error", NOW, NOW)}, "Failed", id="failed-init-fails-the-pod"),
        pytest.param({"a": _OK, "b": _OK, "c": Running(NOW)}, "Running", id="main-running-is-running"),
        pytest.param({"a": _OK, "b": _OK, "c": Terminated(2, "Error", NOW, NOW)}, "Failed", id="failed-main"),
        pytest.param({"a": _OK, "b": _OK, "c": _OK}, "Succeeded", id="all-completed-succeeds"),
    ],
)
def test_pod_phase_follows_container_states(states: dict[str, Any], phase: str) -> None:
    assert pod_phase(_pod(_INIT, _MAIN), states) == phase


def test_status_of_a_pod_stuck_on_its_image_reports_the_waiting_reason_without_an_image_id() -> None:
    states: dict[str, ContainerState] = {"a": _OK, "b": Waiting("ErrImageNeverPull", "not present")}
    status = pod_status(_pod(_INIT, _MAIN), states, host_ip="10.0.0.1", pod_ip="10.1.0.1", start_time=NOW, now=NOW)
    encoded = msgspec.to_builtins(status)
    assert encoded["phase"] == "Pending"
    first, second = encoded["initContainerStatuses"]
    assert first["state"]["terminated"]["exitCode"] == 0
    assert first["imageID"] == f"i@sha256:{hashlib.sha256(b'i').hexdigest()}"
    assert second["state"] == {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}}
    assert second["imageID"] == ""
    assert encoded["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
    assert {c["type"]: c["status"] for c in encoded["conditions"]}["Initialized"] == "False"


_ROOTFS = RootfsImage(path="/images/app")
_VOLUMES = {"work": Bind("/host/work", "")}


@pytest.mark.parametrize(
    ("container", "image", "reason"),
    [
        pytest.param(
            Container(name="s", image="x", image_pull_policy="Never", command=["/t"]),
            None,
            "ErrImageNeverPull",
            id="missing-image-with-pull-never",
        ),
        pytest.param(Container(name="s", image="x", command=["/t"]), None, "ErrImagePull", id="missing-image-pulls"),
        pytest.param(
            Container(name="s", image="x", command=["/t"], env=[EnvVar("K", value_from={"secretKeyRef": {}})]),
            _ROOTFS,
            "CreateContainerConfigError",
            id="env-from-a-secret-is-unsupported",
        ),
        pytest.param(Container(name="s", image="x"), _ROOTFS, "CreateContainerConfigError", id="no-command"),
        pytest.param(
            Container(name="s", image="x", command=["/t"], volume_mounts=[VolumeMount("nope", "/n")]),
            _ROOTFS,
            "CreateContainerConfigError",
            id="mount-names-no-volume",
        ),
    ],
)
def test_containers_that_cannot_start_wait_with_the_kubelets_reason(
    container: Container, image: RootfsImage | None, reason: str, tmp_path: Path
) -> None:
    plan = plan_container(_pod([], [container]), container, image, _VOLUMES, tmp_path)
    assert isinstance(plan, Waiting)
    assert plan.reason == reason


def test_plan_mounts_parents_first_expands_args_and_keeps_the_security_context(tmp_path: Path) -> None:
    container = Container(
        name="s",
        image="x",
        command=["/podsweep/trivy"],
        args=["--out", "$(OUT)/r.json"],
        env=[EnvVar("OUT", "/podsweep/out")],
        volume_mounts=[VolumeMount("out", "/podsweep/out", read_only=True), VolumeMount("work", "/podsweep")],
        security_context=SecurityContext(
            run_as_user=65532,
            run_as_group=65532,
            read_only_root_filesystem=True,
            allow_privilege_escalation=False,
            capabilities=Capabilities(drop=["ALL"]),
        ),
    )
    volumes = {**_VOLUMES, "out": Bind("/host/out", "")}
    plan = plan_container(
        _pod([], [container]), container, HostImage(binds=["/usr"], path_prepend=["/v/bin"]), volumes, tmp_path
    )
    assert not isinstance(plan, Waiting)
    assert [b.target for b in plan.volumes] == ["/podsweep", "/podsweep/out"]
    assert [b.readonly for b in plan.volumes] == [False, True]
    assert plan.argv == ["/podsweep/trivy", "--out", "/podsweep/out/r.json"]
    assert plan.env["PATH"].startswith("/v/bin:")
    assert (plan.uid, plan.gid, plan.readonly_root, plan.no_new_privs, plan.capabilities) == (
        65532,
        65532,
        True,
        True,
        [],
    )
    assert plan.lower is None, "a host image gets a tmpfs root of binds, not an overlay"


# --- against the control plane, real Trivy and real S3 -------------------------------------------------------------


class JobCondition(msgspec.Struct, frozen=True):
    type: str
    status: str
    reason: str = ""


class JobStatus(msgspec.Struct, frozen=True):
    conditions: list[JobCondition] = []


class Job(msgspec.Struct, frozen=True):
    status: JobStatus = JobStatus()

    def finished(self) -> str | None:
        return next(
            (c.type for c in self.status.conditions if c.type in ("Complete", "Failed") and c.status == "True"), None
        )


class Vulnerability(msgspec.Struct, frozen=True, rename="pascal"):
    pkg_name: str
    vulnerability_id: str = msgspec.field(name="VulnerabilityID")


class Package(msgspec.Struct, frozen=True, rename="pascal"):
    name: str
    version: str = ""


class Result(msgspec.Struct, frozen=True, rename="pascal"):
    target: str = ""
    vulnerabilities: list[Vulnerability] = []
    packages: list[Package] = []


class TrivyReport(msgspec.Struct, frozen=True, rename="pascal"):
    results: list[Result] = []


class Sbom(msgspec.Struct, frozen=True, rename="camel"):
    bom_format: str
    components: list[dict[str, object]] = []


class Event(msgspec.Struct, frozen=True):
    reason: str = ""
    message: str = ""


class EventList(msgspec.Struct, frozen=True):
    items: list[Event]


_job_decoder = msgspec.json.Decoder(Job)
_report_decoder = msgspec.json.Decoder(TrivyReport)
_sbom_decoder = msgspec.json.Decoder(Sbom)


async def _ready_node(kube_api: Kube) -> str:
    name = f"kwok-{secrets.token_hex(4)}"
    await create_fake_node(kube_api, name)

    async def ready() -> bool | None:
        return True if (await get_node(kube_api, name)).ready else None

    await wait_until(ready, 20, f"node {name} Ready")
    return name


async def _job_finished(kube_api: Kube, namespace: str, name: str, standin: KubeletStandin | None) -> str:
    async def finished() -> str | None:
        found = _job_decoder.decode(await kube_api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"))
        return found.finished()

    try:
        return await wait_until(finished, 60, f"Job {name} Complete or Failed")
    except TimeoutError as error:
        events = msgspec.json.decode(await kube_api.get(f"/api/v1/namespaces/{namespace}/events"), type=EventList)
        said = "\n".join(f"event {e.reason}: {e.message}" for e in events.items)
        raise AssertionError(f"{error}\n{standin.describe() if standin else ''}\n{said}") from None


def _images(trivy_bin: Path, target: Path | None) -> dict[str, ImageRoot]:
    return scan_images(trivy_bin, DIGEST_REF, target)


async def _create_scan_job(
    kube_api: Kube,
    store: ObjectStore,
    namespace: str,
    node: str,
    options: jobspec.JobOptions,
    edit: Callable[[dict[str, Any], str], None] | None = None,
    digest_ref: str = DIGEST_REF,
) -> tuple[str, str, str]:
    """Create a node scan Job built by the dispatcher's own builder; returns (job name, raw key, sbom key)."""
    scan_id = f"scan-{secrets.token_hex(6)}"
    raw_key = storage.raw_key(digest_ref, scan_id)
    sbom_key = storage.sbom_key(digest_ref, scan_id)
    scan = jobspec.validated_node_scan(
        scan_id=scan_id,
        digest_ref=digest_ref,
        node=node,
        raw_put_url=store.presign_upload(raw_key, 600, 64 * 1024 * 1024),  # as the dispatcher signs them
        sbom_put_url=store.presign_upload(sbom_key, 600, 64 * 1024 * 1024),
    )
    manifest = jobspec.build_node_scan_job(scan, options)
    if options.service_account is not None:  # deploy/ creates it in production
        account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": options.service_account}}
        with contextlib.suppress(KubeError):  # 409: an earlier Job of this test made it
            await kube_api.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body=account)
    if edit is not None:
        edit(manifest, raw_key)
    await kube_api.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=manifest)
    return scan_id, raw_key, sbom_key


def _containers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = manifest["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


@pytest.mark.kube
@pytest.mark.parametrize("mode", ["client-server", "standalone-db-claim"])
async def test_scan_job_runs_for_real_and_uploads_the_fixture_cves_and_an_sbom(
    mode: str,
    kube_api: Kube,
    kube_namespace: str,
    kubelet_standin: StartStandin,
    s3_settings: S3Settings,
    trivy_bin: Path,
    trivy_db: Path,
    trivy_server: TrivyServer,
) -> None:
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    node = await _ready_node(kube_api)
    if mode == "client-server":
        options = jobspec.JobOptions(namespace=kube_namespace, trivy_server=trivy_server.url)
    else:
        options = jobspec.JobOptions(namespace=kube_namespace, trivy_server=None, db_claim="trivy-db")
    standin = await kubelet_standin(
        _images(trivy_bin, build_rootfs(FixtureKind.COMBINED)), namespace=kube_namespace, claims={"trivy-db": trivy_db}
    )

    job, raw_key, sbom_key = await _create_scan_job(kube_api, store, kube_namespace, node, options)

    assert await _job_finished(kube_api, kube_namespace, job, standin) == "Complete", standin.describe()
    report = _report_decoder.decode(gzip.decompress(await store.get(raw_key)))
    found = {(v.pkg_name, v.vulnerability_id) for r in report.results for v in r.vulnerabilities}
    assert found == {(f.package, f.vulnerability_id) for f in EXPECTED_FINDINGS[FixtureKind.COMBINED]}
    sbom = _sbom_decoder.decode(gzip.decompress(await store.get(sbom_key)))
    assert sbom.bom_format == "CycloneDX"
    assert any("pkg:npm/lodash@4.17.20" in str(c.get("purl", "")) for c in sbom.components)
    (pod,) = await list_pods(kube_api, kube_namespace, f"job-name={job}")
    assert pod.status.phase == "Succeeded"
    assert pod.spec.node_name == node
    assert pod.image_ids()["scan"] == DIGEST_REF, "the target container reports the digest it ran"
    run = await standin.wait_for_job(kube_namespace, job)
    assert [(c.name, c.state.exit_code if isinstance(c.state, Terminated) else None) for c in run.containers] == [
        ("install-trivy", 0),
        ("scan", 0),
        ("sbom", 0),
        ("upload", 0),
    ]


HOSTILE_REF = "registry.example.com/team/hostile@sha256:" + "4b" * 32


def _packages_and_findings(report: TrivyReport) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    packages = {(r.target, p.name, p.version) for r in report.results for p in r.packages}
    return packages, {(v.pkg_name, v.vulnerability_id) for r in report.results for v in r.vulnerabilities}


@pytest.mark.kube
async def test_an_images_own_trivy_settings_change_nothing_in_its_scan(
    kube_api: Kube,
    kube_namespace: str,
    kubelet_standin: StartStandin,
    s3_settings: S3Settings,
    trivy_bin: Path,
    trivy_server: TrivyServer,
) -> None:
    """The hostile image runs with its config's Env (TRIVY_SKIP_FILES, TRIVY_SEVERITY) and WorkingDir (a trivy.yaml
    naming an ignore policy, and a .trivyignore): each hid one finding (Go, requests, lodash, libexpat) before the
    scan container had podsweep's own config, ignore file, working directory and environment. Its packages are the
    clean image's, so are its findings."""
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    node = await _ready_node(kube_api)
    options = jobspec.JobOptions(namespace=kube_namespace, trivy_server=trivy_server.url)
    images = _images(trivy_bin, build_rootfs(FixtureKind.COMBINED))
    images[HOSTILE_REF] = RootfsImage(
        path=str(hostile_trivy_settings_rootfs()), env=dict(HOSTILE_TRIVY_ENV), workdir=HOSTILE_WORKDIR
    )
    standin = await kubelet_standin(images, namespace=kube_namespace)

    reports = {}
    for ref in (DIGEST_REF, HOSTILE_REF):
        job, raw_key, _ = await _create_scan_job(kube_api, store, kube_namespace, node, options, digest_ref=ref)
        assert await _job_finished(kube_api, kube_namespace, job, standin) == "Complete", standin.describe()
        reports[ref] = _report_decoder.decode(gzip.decompress(await store.get(raw_key)))

    clean_packages, clean_findings = _packages_and_findings(reports[DIGEST_REF])
    packages, findings = _packages_and_findings(reports[HOSTILE_REF])
    assert clean_findings == {(f.package, f.vulnerability_id) for f in EXPECTED_FINDINGS[FixtureKind.COMBINED]}
    assert findings == clean_findings
    assert packages == clean_packages
    assert len(packages) > 5


def test_every_flag_of_the_real_trivy_is_neutral_in_a_scanned_images_environment(trivy_bin: Path) -> None:
    """Trivy binds TRIVY_<FLAG> for each flag of a command and the global ones: a flag added by a newer Trivy and
    missing from scanenv.TRIVY_FLAGS would let an image set it."""
    listed = set()
    for command in (["rootfs", "--help"], ["sbom", "--help"], ["convert", "--help"], ["--help"]):
        usage = subprocess.run([str(trivy_bin), *command], capture_output=True, text=True, check=True).stdout
        listed |= set(re.findall(r"^\s+(?:-[a-zA-Z], )?--([a-z0-9-]+)", usage, re.MULTILINE))
    listed.discard("help")
    assert len(listed) > 60, "the help output changed shape"
    assert listed <= set(scanenv.TRIVY_FLAGS), sorted(listed - set(scanenv.TRIVY_FLAGS))
    env = {e["name"]: e["value"] for e in scanenv.neutral_env("/podsweep")}
    assert all(env[scanenv.trivy_env_name(flag)] == "" for flag in listed)
    assert env["TRIVY_RUN_AS_PLUGIN"] == env["XDG_DATA_HOME"] == "", "the image's plugin never runs instead"


def _set_scan_args(extra: list[str]) -> Callable[[dict[str, Any], str], None]:
    def edit(manifest: dict[str, Any], _: str) -> None:
        args = _containers(manifest)["scan"]["args"]
        args[-1:-1] = extra

    return edit


def _set(container: str, field: str, index: int, value: str) -> Callable[[dict[str, Any], str], None]:
    def edit(manifest: dict[str, Any], _: str) -> None:
        _containers(manifest)[container][field][index] = value

    return edit


def _upload_url_for_another_path(manifest: dict[str, Any], raw_key: str) -> None:
    env = _containers(manifest)["upload"]["env"]
    env[0]["value"] = env[0]["value"].replace(raw_key, raw_key.replace(".json", "-x.json"))


@pytest.mark.kube
@pytest.mark.parametrize(
    ("edit", "container", "exit_code", "says"),
    [
        pytest.param(_set_scan_args(["--no-such-flag"]), "scan", 1, "unknown flag", id="unknown-trivy-flag"),
        pytest.param(
            _set("install-trivy", "command", 2, "/podsweep/bin/trivy"),
            "install-trivy",
            1,
            "No such file or directory",
            id="trivy-copied-into-a-directory-that-does-not-exist",
        ),
        pytest.param(
            _set("scan", "command", 0, "/podsweep/trivy-0.76"),
            "scan",
            128,
            'exec: "/podsweep/trivy-0.76": No such file or directory',
            id="scan-runs-a-path-the-copy-never-wrote",
        ),
        pytest.param(
            _set("install-trivy", "command", 1, "/usr/bin/trivy"),
            "install-trivy",
            1,
            "cannot stat",
            id="trivy-binary-path-not-in-the-trivy-image",
        ),
        pytest.param(_upload_url_for_another_path, "upload", 1, "403", id="presigned-url-whose-path-was-changed"),
        pytest.param(
            _set("upload", "args", 0, "/podsweep/out/missing.json=PODSWEEP_RAW_URL"),
            "upload",
            2,
            "cannot read /podsweep/out/missing.json",
            id="uploader-reads-a-report-path-that-was-never-written",
        ),
    ],
)
async def test_a_wrong_flag_path_or_url_in_the_job_fails_the_pod_and_the_job(
    edit: Callable[[dict[str, Any], str], None],
    container: str,
    exit_code: int,
    says: str,
    kube_api: Kube,
    kube_namespace: str,
    kubelet_standin: StartStandin,
    s3_settings: S3Settings,
    trivy_bin: Path,
    trivy_server: TrivyServer,
) -> None:
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    node = await _ready_node(kube_api)
    options = jobspec.JobOptions(namespace=kube_namespace, trivy_server=trivy_server.url)
    standin = await kubelet_standin(_images(trivy_bin, build_rootfs(FixtureKind.ALPINE)), namespace=kube_namespace)

    job, raw_key, _ = await _create_scan_job(kube_api, store, kube_namespace, node, options, edit)

    assert await _job_finished(kube_api, kube_namespace, job, standin) == "Failed"
    run = await standin.wait_for_job(kube_namespace, job)
    failed = run.container(container)
    assert isinstance(failed.state, Terminated), run.logs()
    assert failed.state.exit_code == exit_code, run.logs()
    assert failed.state.reason == ("StartError" if exit_code == 128 else "Error")
    assert says in run.logs()
    (pod,) = await list_pods(kube_api, kube_namespace, f"job-name={job}")
    assert pod.status.phase == "Failed"
    assert await store.get_if_exists(raw_key) is None


@pytest.mark.kube
async def test_target_image_without_a_rootfs_waits_in_err_image_never_pull(
    kube_api: Kube,
    kube_namespace: str,
    kubelet_standin: StartStandin,
    s3_settings: S3Settings,
    trivy_bin: Path,
    trivy_server: TrivyServer,
) -> None:
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    node = await _ready_node(kube_api)
    options = jobspec.JobOptions(namespace=kube_namespace, trivy_server=trivy_server.url)
    standin = await kubelet_standin(_images(trivy_bin, target=None), namespace=kube_namespace)

    job, _, _ = await _create_scan_job(kube_api, store, kube_namespace, node, options)

    run = await standin.wait_for_job(kube_namespace, job, timeout_s=60)
    assert run.outcome == "Pending"
    raw = await kube_api.get(f"/api/v1/namespaces/{kube_namespace}/pods/{run.pod}")
    status = msgspec.json.decode(raw)["status"]
    assert status["phase"] == "Pending"
    install, scan = status["initContainerStatuses"][:2]
    assert install["state"]["terminated"]["exitCode"] == 0
    assert scan["state"]["waiting"]["reason"] == "ErrImageNeverPull"
    assert DIGEST_REF in scan["state"]["waiting"]["message"]
    found = _job_decoder.decode(await kube_api.get(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/{job}"))
    assert found.finished() is None, "a pod waiting for its image fails no Job by itself"


@pytest.mark.kube
async def test_kwok_leaves_podsweep_pods_to_the_standin_which_can_just_complete_them(
    kube_api: Kube, kube_namespace: str, kubelet_standin: StartStandin
) -> None:
    node = await _ready_node(kube_api)
    spec = {"nodeName": node, "restartPolicy": "Never", "containers": [{"name": "c", "image": "example.com/c:1"}]}
    labels = {jobs.MANAGED_BY_LABEL: jobs.MANAGED_BY_VALUE}
    for name, pod_labels in (("theirs", {}), ("ours", labels)):
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": pod_labels}, "spec": spec}
        await kube_api.request("POST", f"/api/v1/namespaces/{kube_namespace}/pods", body=body)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "completed", "labels": labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": spec}},
    }
    await kube_api.request("POST", f"/apis/batch/v1/namespaces/{kube_namespace}/jobs", body=job)

    async def theirs_running() -> bool | None:
        return True if (await get_pod(kube_api, kube_namespace, "theirs")).status.phase == "Running" else None

    await wait_until(theirs_running, 20, "kwok running the unlabelled pod")
    ours = await get_pod(kube_api, kube_namespace, "ours")
    assert (ours.status.phase, ours.image_ids()) == ("Pending", {}), "kwok never touched the podsweep pod"

    await kubelet_standin(namespace=kube_namespace, execute=False)

    assert await _job_finished(kube_api, kube_namespace, "completed", None) == "Complete"

    async def ours_succeeded() -> bool | None:
        return True if (await get_pod(kube_api, kube_namespace, "ours")).status.phase == "Succeeded" else None

    await wait_until(ours_succeeded, 20, "the completer finishing the labelled pod")
    ours = await get_pod(kube_api, kube_namespace, "ours")
    assert ours.image_ids() == {"c": f"example.com/c@sha256:{hashlib.sha256(b'example.com/c:1').hexdigest()}"}
