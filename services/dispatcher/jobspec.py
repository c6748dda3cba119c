"""Builds scan Jobs (node scans and SBOM rescan batches). Pure: never talks to the API server; inputs re-validated.

A manifest is a plain dict because it IS the Kubernetes wire format: the golden YAML files show exactly what the
API server receives, and the server validates it (the integration tests create every option combination). A
Struct model of batch/v1 would be a second copy of that schema to keep in step, for no check the server omits.

One walk of the image per scan gives both outputs: the target image runs `trivy rootfs --format json
--list-all-pkgs` once, then an init container of the trivy image runs `trivy convert --format cyclonedx` on that
report (Trivy 0.76 rebuilds the SBOM's components from the report's package list without rescanning).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

import msgspec

from schemas import jobs, storage
from schemas.events import Severity
from schemas.refs import DigestRef, ImageRef, K8sLabelName, K8sName, NodeName, ScanId
from services.dispatcher import sbomrescan, scanenv

Manifest = dict[str, Any]
_MANIFEST = msgspec.json.Decoder(dict[str, Any])

# Paths inside the pod. Trivy creates neither its --output directory nor TMPDIR, so each is a volume's root.
WORK_DIR = "/podsweep"  # emptyDir: the trivy binary, its cache, temp files
OUT_DIR = "/podsweep/out"  # emptyDir: what the uploader sends
TRIVY = f"{WORK_DIR}/trivy"
CACHE_DIR = f"{WORK_DIR}/cache"
REPORT = f"{OUT_DIR}/report.json"
SBOM = f"{OUT_DIR}/sbom.cdx.json"
RAW_URL_ENV = "PODSWEEP_RAW_URL"
SBOM_URL_ENV = "PODSWEEP_SBOM_URL"
# Never scanned: podsweep's own volumes and the kernel's pseudo filesystems. Trivy makes absolute skip paths
# relative to the scanned root, which is "/".
SKIP_DIRS = (WORK_DIR, "/proc", "/sys", "/dev")
# Trivy's config and ignore file. Without these flags Trivy reads ./trivy.yaml and ./.trivyignore from its working
# directory (the scanned image's, unless the container sets one) or the files TRIVY_CONFIG/TRIVY_IGNOREFILE name.
# /dev/null is an empty file in every container, provided by the runtime over the image's /dev: nothing the image
# holds can take its place. An explicit path Trivy cannot open fails the scan rather than being skipped.
TRIVY_CONFIG = "/dev/null"
TRIVY_IGNOREFILE = "/dev/null"

Quantity = Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$", max_length=32)]
AbsolutePath = Annotated[str, msgspec.Meta(pattern=r"^(/[A-Za-z0-9._-]+)+$", max_length=256)]
ServerUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")]
# A presigned URL: scheme, host, path and query; no whitespace or control characters.
PresignedUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s\x00-\x1f\x7f]+$", max_length=8192)]


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    requests_cpu: Quantity
    requests_memory: Quantity
    limits_cpu: Quantity | None = None
    limits_memory: Quantity

    def manifest(self) -> Manifest:
        limits = {"memory": self.limits_memory}
        if self.limits_cpu is not None:
            limits["cpu"] = self.limits_cpu
        return {"requests": {"cpu": self.requests_cpu, "memory": self.requests_memory}, "limits": limits}


# deploy/base's NetworkPolicies let pods with this component label (and only them) reach the Trivy server.
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT_VALUE = "scan"

SCAN_RESOURCES = Resources(requests_cpu="100m", requests_memory="256Mi", limits_memory="1Gi")
HELPER_RESOURCES = Resources(requests_cpu="10m", requests_memory="32Mi", limits_cpu="500m", limits_memory="256Mi")


class JobOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How scan Jobs are shaped; part of the dispatcher's validated config."""

    namespace: K8sLabelName = "podsweep"
    trivy_image: ImageRef = "mirror.gcr.io/aquasec/trivy:0.76.0"
    trivy_binary: AbsolutePath = "/usr/local/bin/trivy"  # where the trivy image keeps it
    uploader_image: ImageRef = "ghcr.io/podsweep/podsweep:0.1.0"
    # Client/server mode when set; otherwise standalone, reading the DB from `db_claim` (a PVC with a Trivy cache
    # layout) read-only.
    trivy_server: ServerUrl | None = "http://trivy.podsweep.svc:4954"
    db_claim: K8sName | None = None
    severities: list[Severity] = []  # empty: all
    ignore_unfixed: bool = False
    # One scan serves every workload running the digest, so one workload's ignore-unfixed annotation would hide
    # findings from the others: by default the parser applies it per workload and the scan reports everything.
    honor_workload_ignore_unfixed: bool = False
    sbom: bool = True
    offline_scan: bool = True  # no calls to package registries from scan pods
    active_deadline_seconds: int = 600
    ttl_seconds_after_finished: int = 900
    scan_resources: Resources = SCAN_RESOURCES
    helper_resources: Resources = HELPER_RESOURCES
    work_size_limit: Quantity = "2Gi"
    out_size_limit: Quantity = "256Mi"
    # nodeName binds without the scheduler (no scheduler needed, taints and pressure do not keep a scan Pending
    # on the node that already runs the image); required node affinity lets the scheduler account resources.
    pinning: Literal["nodeName", "affinity"] = "nodeName"
    # Root without DAC_READ_SEARCH cannot read another user's 0600 files. DAC_OVERRIDE also grants writes, but is
    # the one Pod Security "baseline" admits: choose it only when podsweep's namespace enforces baseline.
    read_capability: Literal["DAC_READ_SEARCH", "DAC_OVERRIDE"] = "DAC_READ_SEARCH"
    helper_uid: int = 65532
    priority_class: K8sName | None = None
    # The scan pods' identity (deploy/base: no RBAC, no token); None leaves the namespace's `default`.
    service_account: K8sName | None = "scan"

    def __post_init__(self) -> None:
        if (self.trivy_server is None) == (self.db_claim is None):
            raise ValueError("jobs: set exactly one of trivy_server (client/server mode) and db_claim (standalone)")
        if not 60 <= self.active_deadline_seconds <= 86400:
            raise ValueError(f"jobs: active_deadline_seconds is {self.active_deadline_seconds} (60 to 86400)")
        if self.ttl_seconds_after_finished < 0:
            raise ValueError("jobs: ttl_seconds_after_finished must not be negative")
        if not 1 <= self.helper_uid <= 2_147_483_647:
            raise ValueError(f"jobs: helper_uid is {self.helper_uid} (a non-root uid, 1 or more)")


class NodeScan(msgspec.Struct, frozen=True, kw_only=True):
    """What a node scan Job is built from; decoding into this validates every field that reaches the manifest."""

    scan_id: ScanId
    digest_ref: DigestRef
    node: NodeName
    raw_put_url: PresignedUrl
    sbom_put_url: PresignedUrl | None = None
    ignore_unfixed: bool = False


def validated_node_scan(
    *,
    scan_id: str,
    digest_ref: str,
    node: str,
    raw_put_url: str,
    sbom_put_url: str | None = None,
    ignore_unfixed: bool = False,
) -> NodeScan:
    """A NodeScan whose fields passed schemas.refs' patterns; raises msgspec.ValidationError naming the field."""
    fields: dict[str, str | bool | None] = {
        "scan_id": scan_id,
        "digest_ref": digest_ref,
        "node": node,
        "raw_put_url": raw_put_url,
        "sbom_put_url": sbom_put_url,
        "ignore_unfixed": ignore_unfixed,
    }
    return msgspec.convert(fields, NodeScan)


def url_lifetime_s(options: JobOptions, start_grace: timedelta) -> int:
    """How long a Job's presigned URLs last from signing. They are signed before the Job exists, and its
    activeDeadlineSeconds runs from its start: the deadline plus the grace the limiter gives a Job to start in, so a
    Job that starts within the grace can use its URLs until its own deadline (docs/dispatcher.md, "Upload URLs")."""
    return options.active_deadline_seconds + max(int(start_grace.total_seconds()), 0)


def _helper_security(uid: int) -> Manifest:
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _vuln_flags(options: JobOptions, *, ignore_unfixed: bool) -> list[str]:
    """Flags shared by node scans and SBOM rescans: where the DB is, what to report, no calls home, and podsweep's
    own (empty) config and ignore file."""
    args = ["--config", TRIVY_CONFIG, "--ignorefile", TRIVY_IGNOREFILE]
    args += ["--scanners", "vuln", "--list-all-pkgs", "--cache-dir", CACHE_DIR]
    args += ["--timeout", f"{max(options.active_deadline_seconds - 60, 30)}s"]
    args += ["--no-progress", "--disable-telemetry", "--skip-version-check"]
    if options.trivy_server is not None:
        args += ["--server", options.trivy_server]
    else:
        args += ["--skip-db-update", "--skip-java-db-update"]
    if options.offline_scan:
        args.append("--offline-scan")
    if options.severities:
        args += ["--severity", ",".join(options.severities)]
    if ignore_unfixed:
        args.append("--ignore-unfixed")
    return args


def _trivy_args(scan: NodeScan, options: JobOptions) -> list[str]:
    args = ["rootfs", "--format", "json", "--output", REPORT]
    args += _vuln_flags(
        options,
        ignore_unfixed=options.ignore_unfixed or (scan.ignore_unfixed and options.honor_workload_ignore_unfixed),
    )
    for skipped in SKIP_DIRS:
        args += ["--skip-dirs", skipped]
    args.append("/")
    return args


def build_node_scan_job(scan: NodeScan, options: JobOptions) -> Manifest:
    """The Job that scans `scan.digest_ref` on `scan.node` and uploads the report (and SBOM) to the presigned URLs."""
    # Decoding already checked these; checking again here keeps the builder safe when handed a hand-made Struct.
    scan = msgspec.convert(msgspec.to_builtins(scan), NodeScan)
    want_sbom = options.sbom and scan.sbom_put_url is not None
    raw_key = storage.raw_key(scan.digest_ref, scan.scan_id)
    annotations = {
        jobs.DIGEST_REF_ANNOTATION: scan.digest_ref,
        jobs.RAW_KEY_ANNOTATION: raw_key,
        jobs.MODE_ANNOTATION: "node",
        jobs.NODE_ANNOTATION: scan.node,
    }
    if want_sbom:
        annotations[jobs.SBOM_KEY_ANNOTATION] = storage.sbom_key(scan.digest_ref, scan.scan_id)

    scan_mounts: list[Manifest] = [_WORK_MOUNT, _OUT_MOUNT]
    if options.db_claim is not None:
        # The claim holds a Trivy cache layout (db/, java-db/); the scan only reads it (--skip-*-update, and the
        # report cache is in memory), so a read-only mount lets every scan Job share one claim. Checked: Trivy
        # 0.76 scans as a non-root user with a 0444 trivy.db in 0555 directories.
        scan_mounts.append(_DB_MOUNT)

    init_containers: list[Manifest] = [
        _helper_container(
            "install-trivy", options.trivy_image, ["cp", options.trivy_binary, TRIVY], [_WORK_MOUNT], options
        ),
        {
            "name": "scan",
            "image": scan.digest_ref,
            # The image is on this node already; never pull, so no registry credentials are ever needed.
            "imagePullPolicy": "Never",
            "command": [TRIVY],
            "args": _trivy_args(scan, options),
            # The image's own working directory and TRIVY_* variables must not reach Trivy (scanenv says how).
            "workingDir": WORK_DIR,
            "env": scanenv.neutral_env(WORK_DIR),
            "volumeMounts": scan_mounts,
            "resources": options.scan_resources.manifest(),
            "securityContext": {
                # Root, to read every file of the image; the rest of root's powers are dropped.
                "runAsUser": 0,
                "runAsGroup": 0,
                "runAsNonRoot": False,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "privileged": False,
                "capabilities": {"drop": ["ALL"], "add": [options.read_capability]},
            },
        },
    ]
    uploads = [f"{REPORT}={RAW_URL_ENV}"]
    env = [{"name": RAW_URL_ENV, "value": scan.raw_put_url}]
    if want_sbom:
        init_containers.append(
            _helper_container(
                "sbom",
                options.trivy_image,
                [options.trivy_binary],
                [_OUT_MOUNT],
                options,
                args=["convert", "--format", "cyclonedx", "--output", SBOM, REPORT],
            )
        )
        uploads.append(f"{SBOM}={SBOM_URL_ENV}")
        env.append({"name": SBOM_URL_ENV, "value": str(scan.sbom_put_url)})

    if options.pinning == "nodeName":
        placement: Manifest = {"nodeName": scan.node}
    else:
        term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [scan.node]}]}
        placement = {
            "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
            }
        }
    pod_spec = _pod_spec(
        options,
        pod_security={"seccompProfile": {"type": "RuntimeDefault"}},
        # The node already runs this image: its taints must not evict or block the scan there.
        tolerations=[{"operator": "Exists"}],
        init_containers=init_containers,
        # The presigned URLs travel in env, not args, so they never show in a process list on the node.
        uploader=_uploader(options, uploads, env),
        volumes=_volumes(options, {"work": options.work_size_limit, "out": options.out_size_limit}),
        placement=placement,
    )
    return _job(scan.scan_id, options, annotations, pod_spec)


MAX_BATCH = 100
IN_DIR = "/podsweep/in"  # emptyDir: the SBOMs a rescan reads


class SbomRescanItem(msgspec.Struct, frozen=True, kw_only=True):
    """One digest of a rescan batch: its SBOM to read and where its new report goes."""

    scan_id: ScanId
    digest_ref: DigestRef
    sbom_get_url: PresignedUrl
    raw_put_url: PresignedUrl


class SbomRescan(msgspec.Struct, frozen=True, kw_only=True):
    """A batch of SBOM rescans run by one unpinned Job named `batch_id`."""

    batch_id: ScanId
    items: Annotated[list[SbomRescanItem], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]

    def __post_init__(self) -> None:
        if len({i.scan_id for i in self.items}) != len(self.items):
            raise ValueError("sbom rescan: every item needs its own scan_id")


def build_sbom_rescan_job(batch: SbomRescan, options: JobOptions) -> Manifest:
    """An unpinned Job of the trivy and podsweep images that rescans stored SBOMs: no node's images, no target image.

    An init container copies the trivy image's binary into the work emptyDir; then one container of the podsweep
    image (`podsweep sbom-rescan`, services/dispatcher/sbomrescan.py) downloads every SBOM, runs `trivy sbom` on each
    in turn and uploads the reports. A failing item stops the batch and fails the Job (containers run without a
    shell, so nothing can swallow an exit code); its log's last line names the item, which the container's
    `FallbackToLogsOnError` makes the termination message the watcher reads.
    """
    batch = msgspec.convert(msgspec.to_builtins(batch), SbomRescan)
    listing = [
        {"scan_id": i.scan_id, "digest_ref": i.digest_ref, "raw_key": storage.raw_key(i.digest_ref, i.scan_id)}
        for i in batch.items
    ]
    annotations = {
        jobs.MODE_ANNOTATION: "sbom",
        jobs.BATCH_ANNOTATION: msgspec.json.encode(listing).decode(),
    }
    in_mount = {"name": "in", "mountPath": IN_DIR}
    trivy_mounts: list[Manifest] = [_WORK_MOUNT, in_mount, _OUT_MOUNT]
    if options.db_claim is not None:
        trivy_mounts.append(_DB_MOUNT)
    count = len(batch.items)

    rescan = _helper_container(
        jobs.RESCAN_CONTAINER,
        options.uploader_image,
        ["podsweep", "sbom-rescan"],
        trivy_mounts,
        options,
        args=[
            "--count",
            str(count),
            "--trivy",
            TRIVY,
            "--in-dir",
            IN_DIR,
            "--out-dir",
            OUT_DIR,
            "--work-dir",
            WORK_DIR,
            "--",
            *_vuln_flags(options, ignore_unfixed=options.ignore_unfixed),
        ],
        # The presigned URLs travel in env, not args, so they never show in a process list on the node.
        env=[{"name": sbomrescan.sbom_url_env(n), "value": i.sbom_get_url} for n, i in enumerate(batch.items)]
        + [{"name": sbomrescan.raw_url_env(n), "value": i.raw_put_url} for n, i in enumerate(batch.items)],
    )
    # The working directory is podsweep's; Trivy's own environment is set by sbom-rescan (nothing inherited).
    rescan["workingDir"] = WORK_DIR
    rescan["resources"] = options.scan_resources.manifest()
    # A failed run's last log line names its item (the termination message the watcher reads).
    rescan["terminationMessagePolicy"] = "FallbackToLogsOnError"
    install = _helper_container(
        "install-trivy", options.trivy_image, ["cp", options.trivy_binary, TRIVY], [_WORK_MOUNT], options
    )
    pod_spec = _pod_spec(
        options,
        pod_security={"seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True},
        init_containers=[install],
        uploader=rescan,
        volumes=_volumes(
            options, {"work": options.work_size_limit, "in": options.out_size_limit, "out": options.out_size_limit}
        ),
    )
    return _job(batch.batch_id, options, annotations, pod_spec)


# The parts both Jobs share.

_WORK_MOUNT: Manifest = {"name": "work", "mountPath": WORK_DIR}
_OUT_MOUNT: Manifest = {"name": "out", "mountPath": OUT_DIR}
_DB_MOUNT: Manifest = {"name": "trivy-db", "mountPath": CACHE_DIR, "readOnly": True}


def _volumes(options: JobOptions, empty_dirs: dict[str, str]) -> list[Manifest]:
    """The pod's emptyDirs (name: size limit) and, in standalone mode, the Trivy DB claim, read-only."""
    volumes: list[Manifest] = [{"name": name, "emptyDir": {"sizeLimit": size}} for name, size in empty_dirs.items()]
    if options.db_claim is not None:
        volumes.append({"name": "trivy-db", "persistentVolumeClaim": {"claimName": options.db_claim, "readOnly": True}})
    return volumes


def _helper_container(
    name: str,
    image: str,
    command: list[str],
    mounts: list[Manifest],
    options: JobOptions,
    *,
    args: list[str] | None = None,
    env: list[dict[str, str]] | None = None,
) -> Manifest:
    """A container of podsweep's own images (trivy's, the uploader's), as the helper user with helper resources."""
    container: Manifest = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": command}
    if args is not None:
        container["args"] = args
    if env is not None:
        container["env"] = env
    container["volumeMounts"] = mounts
    container["resources"] = options.helper_resources.manifest()
    container["securityContext"] = _helper_security(options.helper_uid)
    return container


def _uploader(options: JobOptions, uploads: list[str], env: list[dict[str, str]]) -> Manifest:
    """`podsweep upload` of the out/ files to the presigned URLs named in `env`."""
    mounts: list[Manifest] = [{**_OUT_MOUNT, "readOnly": True}]
    return _helper_container(
        "upload", options.uploader_image, ["podsweep", "upload"], mounts, options, args=uploads, env=env
    )


def _pod_spec(
    options: JobOptions,
    *,
    pod_security: Manifest,
    init_containers: list[Manifest],
    uploader: Manifest,
    volumes: list[Manifest],
    tolerations: list[Manifest] | None = None,
    placement: Manifest | None = None,
) -> Manifest:
    spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 5,
        "securityContext": pod_security,
    }
    if tolerations is not None:
        spec["tolerations"] = tolerations
    spec |= {"initContainers": init_containers, "containers": [uploader], "volumes": volumes}
    spec |= placement or {}
    if options.priority_class is not None:
        spec["priorityClassName"] = options.priority_class
    if options.service_account is not None:
        spec["serviceAccountName"] = options.service_account
    return spec


def _job(name: str, options: JobOptions, annotations: dict[str, str], pod_spec: Manifest) -> Manifest:
    labels = {
        jobs.MANAGED_BY_LABEL: jobs.MANAGED_BY_VALUE,
        COMPONENT_LABEL: COMPONENT_VALUE,
        jobs.SCAN_ID_LABEL: name,
    }
    manifest: Manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "backoffLimit": 0,  # retries are the dispatcher's decision, maybe on another node
            "activeDeadlineSeconds": options.active_deadline_seconds,
            "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    }
    # A JSON round trip: no two parts share a dict (a caller editing one cannot change another), and what
    # comes out is exactly what the API server will be sent.
    return _MANIFEST.decode(msgspec.json.encode(manifest))
