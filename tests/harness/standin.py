"""A stand-in for the kubelet, for tests: runs podsweep scan pods on kwok nodes for real and reports them as a kubelet.

Test code only (`podsweep up` never imports it). Never touches pods it does not own (label
`app.kubernetes.io/managed-by=podsweep` on a kwok node), never leaves a mount behind, never runs a container in a shell.

How a container runs, and why: each container is one `python -I -S -c <_launch source> PLAN` process that enters a
private mount namespace (unshare(CLONE_NEWNS), / made private), builds the container's root there, chroots into it
and execs the container's command with its args and env. Its root is an overlay whose lower layer is the test's
fixture tree for the image (the cached tree is never written; mount points land in a per-container upper dir), or,
for podsweep's own image, a tmpfs holding read-only binds of the host's /usr, /etc, the venv and the repo. Volumes are
bind mounts of per-pod temp dirs (emptyDir, mode 0777 like the kubelet's) at their mountPaths, read-only where the
spec says; /proc, /dev and a read-only /sys are binds of the host's, so Trivy's `--skip-dirs` are exercised too.
runAsUser/runAsGroup, readOnlyRootFilesystem, allowPrivilegeEscalation (no_new_privs) and capabilities (the bounding
set, from the runtime default set, drop and add) are applied before exec. The mount namespace is why this is safe:
every mount dies with the container's process, even on SIGKILL, so nothing leaks into the host or other tests.
No container runtime exists here (no runc, no Docker) and rewriting paths would leave the Job's paths untested.
The launcher is one stdlib-only function sent with `-c`: importing this module costs about 2 s per container here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import inspect
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Literal, Protocol

import msgspec
import pytest_asyncio

from podsweep import logs
from podsweep.kube import Kube, KubeError
from schemas import jobs
from tests.harness.kube import KubeControlPlane
from tests.harness.kwok import FAKE_NODE_ANNOTATION, expected_image_id, wait_until
from tests.harness.rootfs import default_cache_dir

log = logs.get("tests.standin")

MANAGED_SELECTOR = f"{jobs.MANAGED_BY_LABEL}={jobs.MANAGED_BY_VALUE}"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # containerd's default PATH
# containerd's default capability set; a container's drop/add apply to it.
DEFAULT_CAPABILITIES = frozenset(
    {
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    }
)
# linux/capability.h, in number order.
CAPABILITY_NUMBERS: Mapping[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}
START_ERROR_EXIT = 128  # what containerd reports for a container whose process could not be started
TERMINATION_MESSAGE_MAX = 4096
_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


# --- what the stand-in reads from a pod ---------------------------------------------------------------------------


class _Kube(msgspec.Struct, frozen=True, rename="camel"):
    pass


class OwnerReference(_Kube, frozen=True):
    kind: str = ""
    name: str = ""


class PodMeta(_Kube, frozen=True):
    name: str
    namespace: str = ""
    uid: str = ""
    deletion_timestamp: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    owner_references: list[OwnerReference] = []


class EnvVar(_Kube, frozen=True):
    name: str
    value: str = ""
    value_from: dict[str, object] | None = None


class VolumeMount(_Kube, frozen=True):
    name: str
    mount_path: str
    read_only: bool = False
    sub_path: str = ""


class Capabilities(_Kube, frozen=True):
    add: list[str] = []
    drop: list[str] = []


class SecurityContext(_Kube, frozen=True):
    run_as_user: int | None = None
    run_as_group: int | None = None
    read_only_root_filesystem: bool = False
    allow_privilege_escalation: bool | None = None
    privileged: bool = False
    capabilities: Capabilities = Capabilities()


class Container(_Kube, frozen=True):
    name: str
    image: str = ""
    image_pull_policy: str = "IfNotPresent"
    command: list[str] = []
    args: list[str] = []
    env: list[EnvVar] = []
    working_dir: str = ""
    volume_mounts: list[VolumeMount] = []
    security_context: SecurityContext = SecurityContext()
    termination_message_policy: str = "File"


class PersistentVolumeClaimSource(_Kube, frozen=True):
    claim_name: str
    read_only: bool = False


class Volume(_Kube, frozen=True):
    name: str
    empty_dir: dict[str, object] | None = None
    persistent_volume_claim: PersistentVolumeClaimSource | None = None


class PodSecurityContext(_Kube, frozen=True):
    run_as_user: int | None = None
    run_as_group: int | None = None


class PodSpec(_Kube, frozen=True):
    node_name: str = ""
    init_containers: list[Container] = []
    containers: list[Container] = []
    volumes: list[Volume] = []
    security_context: PodSecurityContext = PodSecurityContext()


class ContainerStateSeen(_Kube, frozen=True):
    running: dict[str, object] | None = None
    terminated: dict[str, object] | None = None


class ContainerStatusSeen(_Kube, frozen=True):
    name: str = ""
    state: ContainerStateSeen = ContainerStateSeen()


class PodStatusSeen(_Kube, frozen=True):
    phase: str = ""
    init_container_statuses: list[ContainerStatusSeen] = []
    container_statuses: list[ContainerStatusSeen] = []


class Pod(msgspec.Struct, frozen=True):
    metadata: PodMeta
    spec: PodSpec = PodSpec()
    status: PodStatusSeen = PodStatusSeen()

    def job_name(self) -> str:
        return next((o.name for o in self.metadata.owner_references if o.kind == "Job"), "")

    def started_before(self) -> bool:
        """Whether anything already ran it (another stand-in, kwok): a kubelet never starts a pod twice."""
        statuses = self.status.init_container_statuses + self.status.container_statuses
        return self.status.phase not in ("", "Pending") or any(
            s.state.running is not None or s.state.terminated is not None for s in statuses
        )


class ListMeta(_Kube, frozen=True):
    resource_version: str = ""


class PodList(msgspec.Struct, frozen=True):
    metadata: ListMeta
    items: list[Pod]


class PodEvent(msgspec.Struct, frozen=True):
    type: str
    object: Pod | None = None


class NodeAddress(msgspec.Struct, frozen=True):
    type: str
    address: str


class NodeStatus(msgspec.Struct, frozen=True):
    addresses: list[NodeAddress] = []


class Node(msgspec.Struct, frozen=True):
    metadata: PodMeta
    status: NodeStatus = NodeStatus()


_pod_list_decoder = msgspec.json.Decoder(PodList)
_pod_event_decoder = msgspec.json.Decoder(PodEvent)
_node_decoder = msgspec.json.Decoder(Node)


# --- what stands in for an image -----------------------------------------------------------------------------------


class RootfsImage(msgspec.Struct, frozen=True, kw_only=True):
    """A directory tree standing in for an image's filesystem, plus the image config's Env, Entrypoint and
    WorkingDir (where a container without `workingDir` starts, as runc does)."""

    path: str
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    workdir: str = ""


class HostImage(msgspec.Struct, frozen=True, kw_only=True):
    """The host's own filesystem, read-only, with `path_prepend` first on PATH: podsweep's own image in tests."""

    binds: list[str]
    path_prepend: list[str] = []
    env: dict[str, str] = {}
    entrypoint: list[str] = []


ImageRoot = RootfsImage | HostImage


def podsweep_image() -> HostImage:
    """podsweep's image: the venv's `podsweep` on PATH, with /usr, /etc, the repo (and venv) and the Python prefix."""
    repo = Path(__file__).resolve().parents[2]
    venv_bin = Path(sys.executable).parent
    python_prefix = Path(sys.base_prefix).resolve()
    binds = ["/usr", "/etc", "/opt", str(repo), str(Path(sys.prefix))]
    binds += [str(python_prefix)] if not python_prefix.is_relative_to("/usr") else []
    return HostImage(binds=sorted(set(binds)), path_prepend=[str(venv_bin)])


def _dynamic_dependencies(binary: Path) -> list[Path]:
    """The shared libraries and loader `ldd` lists for a host binary (absolute paths only)."""
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", listing)
    return [Path(p) for p in found]


def trivy_image_rootfs(
    trivy_bin: Path, binary_path: str = "/usr/local/bin/trivy", cache_dir: Path | None = None
) -> Path:
    """A tree standing in for the trivy image: the real trivy at `binary_path`, and the host's `cp` with its libraries.

    Cached by the binary's identity; the 170 MB binary is hard-linked when the cache is on the same filesystem.
    """
    trivy = trivy_bin.resolve()
    cp = Path(shutil.which("cp") or "/bin/cp").resolve()
    libraries = _dynamic_dependencies(cp)
    stat = trivy.stat()
    key = hashlib.sha256(
        f"{trivy}\n{stat.st_size}\n{stat.st_mtime_ns}\n{binary_path}\n{cp}\n{libraries}".encode()
    ).hexdigest()[:16]
    target = (cache_dir or default_cache_dir()) / "rootfs" / f"trivy-image-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(target.parent / f".trivy-image-{os.getpid()}-{time.monotonic_ns()}")
    try:
        files = [(trivy, staging / binary_path.lstrip("/")), (cp, staging / "bin" / "cp")]
        files += [(library.resolve(), staging / str(library).lstrip("/")) for library in libraries]
        for source, destination in files:
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)
        (staging / "etc").mkdir(exist_ok=True)
        (staging / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/sbin/nologin\n"
        )
        (staging / "tmp").mkdir(mode=0o1777)
        for directory in (staging, *(p for p in staging.rglob("*") if p.is_dir() and p.name != "tmp")):
            directory.chmod(0o755)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


# --- pure decisions ------------------------------------------------------------------------------------------------


class Bind(msgspec.Struct, frozen=True):
    source: str
    target: str
    readonly: bool = False
    recursive: bool = False


class LaunchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `_launch` needs to become one container; written as JSON for a stdlib-only interpreter."""

    root: str
    lower: str | None  # the image tree for an overlay root; None: a tmpfs root with `host_binds`
    upper: str
    work: str
    host_binds: list[str] = []
    host_symlinks: list[tuple[str, str]] = []
    system_binds: list[Bind]
    volumes: list[Bind]
    readonly_root: bool
    workdir: str
    uid: int
    gid: int
    capabilities: list[int] | None  # the bounding set kept; None keeps everything (privileged)
    no_new_privs: bool
    argv: list[str]
    env: dict[str, str]
    start_error_path: str


class Waiting(msgspec.Struct, frozen=True, tag=True):
    reason: str
    message: str = ""


class Running(msgspec.Struct, frozen=True, tag=True):
    started_at: str


class Terminated(msgspec.Struct, frozen=True, tag=True):
    exit_code: int
    reason: str
    started_at: str
    finished_at: str
    message: str = ""


ContainerState = Waiting | Running | Terminated
PodPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


def effective_capabilities(context: SecurityContext) -> frozenset[str]:
    """The capabilities a container keeps: the runtime's default set, minus `drop`, plus `add` (ALL means all)."""
    every = frozenset(CAPABILITY_NUMBERS)
    if context.privileged:
        return every
    names = {c.upper().removeprefix("CAP_") for c in context.capabilities.drop}
    kept = frozenset() if "ALL" in names else DEFAULT_CAPABILITIES - names
    added = {c.upper().removeprefix("CAP_") for c in context.capabilities.add}
    return every if "ALL" in added else kept | (added & every)


def expand_references(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values: defined names expand, `$$` is a `$`."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _ENV_REFERENCE.sub(replace, text)


def pod_volumes(pod: Pod, pod_dir: Path, claims: Mapping[str, Path]) -> dict[str, Bind] | Waiting:
    """Each volume's host dir (emptyDir: a dir under the pod's; PVC: the test's dir for that claim)."""
    found: dict[str, Bind] = {}
    for volume in pod.spec.volumes:
        if volume.empty_dir is not None:
            found[volume.name] = Bind(str(pod_dir / "volumes" / volume.name), "")
        elif volume.persistent_volume_claim is not None:
            claim = volume.persistent_volume_claim
            if claim.claim_name not in claims:
                message = f"stand-in: no directory for PersistentVolumeClaim {claim.claim_name!r} (pass claims=)"
                return Waiting("ContainerCreating", message)
            found[volume.name] = Bind(str(claims[claim.claim_name]), "", readonly=claim.read_only)
        else:
            return Waiting("ContainerCreating", f"stand-in: volume {volume.name!r} is neither emptyDir nor a PVC")
    return found


def plan_container(
    pod: Pod,
    container: Container,
    image: ImageRoot | None,
    volumes: Mapping[str, Bind],
    container_dir: Path,
) -> LaunchPlan | Waiting:
    """How to run one container, or the waiting state a kubelet would show when it cannot be started."""
    if image is None:
        if container.image_pull_policy == "Never":
            message = f'Container image "{container.image}" is not present with pull policy of Never'
            return Waiting("ErrImageNeverPull", message)
        return Waiting(
            "ErrImagePull", f"stand-in: no root filesystem for image {container.image!r} (add it to images=)"
        )
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": pod.metadata.name, **image.env}
    if isinstance(image, HostImage):
        env["PATH"] = ":".join([*image.path_prepend, env["PATH"]])
    for variable in container.env:
        if variable.value_from is not None:
            return Waiting("CreateContainerConfigError", f"stand-in: env {variable.name} uses valueFrom (unsupported)")
        env[variable.name] = expand_references(variable.value, env)
    command = container.command or image.entrypoint
    if not command:
        return Waiting("CreateContainerConfigError", f"stand-in: container {container.name} has no command")
    argv = [expand_references(a, env) for a in [*command, *container.args]]
    mounts = []
    for mount in container.volume_mounts:
        if mount.name not in volumes:
            return Waiting("CreateContainerConfigError", f"stand-in: volumeMount {mount.name!r} names no volume")
        if mount.sub_path:
            return Waiting("CreateContainerConfigError", f"stand-in: volumeMount {mount.name!r} uses subPath")
        source = volumes[mount.name]
        mounts.append(Bind(source.source, mount.mount_path, readonly=mount.read_only or source.readonly))
    mounts.sort(key=lambda b: b.target.rstrip("/").count("/"))  # parents before children, as runc does
    context = container.security_context
    uid = context.run_as_user if context.run_as_user is not None else pod.spec.security_context.run_as_user
    gid = context.run_as_group if context.run_as_group is not None else pod.spec.security_context.run_as_group
    kept = effective_capabilities(context)
    return LaunchPlan(
        root=str(container_dir / "root"),
        lower=image.path if isinstance(image, RootfsImage) else None,
        upper=str(container_dir / "upper"),
        work=str(container_dir / "work"),
        host_binds=image.binds if isinstance(image, HostImage) else [],
        host_symlinks=_host_symlinks() if isinstance(image, HostImage) else [],
        system_binds=[
            Bind("/proc", "/proc", recursive=True),
            Bind("/dev", "/dev", recursive=True),
            Bind("/sys", "/sys", readonly=True, recursive=True),
        ],
        volumes=mounts,
        readonly_root=context.read_only_root_filesystem,
        workdir=container.working_dir or (image.workdir if isinstance(image, RootfsImage) else "") or "/",
        uid=uid or 0,
        gid=gid or 0,
        capabilities=None if context.privileged else sorted(CAPABILITY_NUMBERS[c] for c in kept),
        no_new_privs=context.allow_privilege_escalation is False,
        argv=argv,
        env=env,
        start_error_path=str(container_dir / "start-error"),
    )


def _host_symlinks() -> list[tuple[str, str]]:
    """Top-level symlinks of the host (merged /usr: /bin -> usr/bin), recreated in a host image's root."""
    return [
        (f"/{name}", os.readlink(f"/{name}"))
        for name in ("bin", "lib", "lib64", "sbin")
        if Path(f"/{name}").is_symlink()
    ]


def _read_start_error(path: Path) -> str | None:
    """What the launcher wrote before exiting 128, or None when the container's own process ran."""
    try:
        return path.read_text(errors="replace") or None
    except FileNotFoundError:
        return None


def terminated_reason(exit_code: int, start_error: str | None) -> str:
    if start_error is not None:
        return "StartError"
    return "Completed" if exit_code == 0 else "Error"


def pod_phase(pod: Pod, states: Mapping[str, ContainerState]) -> PodPhase:
    """The phase a kubelet reports for a restartPolicy Never pod with these container states."""
    every = pod.spec.init_containers + pod.spec.containers
    terminated = [states.get(c.name) for c in every]
    if any(isinstance(s, Terminated) and s.exit_code != 0 for s in terminated):
        return "Failed"
    if all(isinstance(s, Terminated) for s in terminated):
        return "Succeeded"
    initialized = all(isinstance(states.get(c.name), Terminated) for c in pod.spec.init_containers)
    if initialized and any(isinstance(states.get(c.name), Running | Terminated) for c in pod.spec.containers):
        return "Running"
    return "Pending"


class StateWaiting(_Kube, frozen=True, omit_defaults=True):
    reason: str
    message: str = ""


class StateRunning(_Kube, frozen=True):
    started_at: str


class StateTerminated(_Kube, frozen=True, omit_defaults=True):
    exit_code: int
    reason: str
    started_at: str
    finished_at: str
    container_id: str = msgspec.field(default="", name="containerID")
    message: str = ""


class StateOut(_Kube, frozen=True, omit_defaults=True):
    waiting: StateWaiting | None = None
    running: StateRunning | None = None
    terminated: StateTerminated | None = None


class ContainerStatusOut(_Kube, frozen=True):
    name: str
    image: str
    image_id: str = msgspec.field(name="imageID")
    container_id: str = msgspec.field(name="containerID")
    ready: bool
    started: bool
    restart_count: int
    state: StateOut


class ConditionOut(_Kube, frozen=True, omit_defaults=True):
    type: str
    status: str
    last_transition_time: str
    reason: str = ""


class PodIP(msgspec.Struct, frozen=True):
    ip: str


class PodStatusOut(_Kube, frozen=True):
    phase: PodPhase
    conditions: list[ConditionOut]
    host_ip: str = msgspec.field(name="hostIP")
    host_ips: list[PodIP] = msgspec.field(name="hostIPs")
    pod_ip: str = msgspec.field(name="podIP")
    pod_ips: list[PodIP] = msgspec.field(name="podIPs")
    start_time: str
    init_container_statuses: list[ContainerStatusOut]
    container_statuses: list[ContainerStatusOut]


def _container_status(pod: Pod, container: Container, state: ContainerState, phase: PodPhase) -> ContainerStatusOut:
    ran = not isinstance(state, Waiting)
    container_id = "containerd://" + hashlib.sha256(f"{pod.metadata.uid}/{container.name}".encode()).hexdigest()
    out: StateOut
    if isinstance(state, Waiting):
        out = StateOut(waiting=StateWaiting(state.reason, state.message))
    elif isinstance(state, Running):
        out = StateOut(running=StateRunning(state.started_at))
    else:
        terminated = StateTerminated(
            state.exit_code, state.reason, state.started_at, state.finished_at, container_id, state.message
        )
        out = StateOut(terminated=terminated)
    return ContainerStatusOut(
        name=container.name,
        image=container.image,
        image_id=expected_image_id(container.image, container.name, pod.metadata.annotations) if ran else "",
        container_id=container_id if ran else "",
        ready=isinstance(state, Running) and phase == "Running",
        started=isinstance(state, Running),
        restart_count=0,
        state=out,
    )


def pod_status(
    pod: Pod, states: Mapping[str, ContainerState], *, host_ip: str, pod_ip: str, start_time: str, now: str
) -> PodStatusOut:
    """The whole status a kubelet would write for these container states (sent as a merge patch: lists replaced)."""
    phase = pod_phase(pod, states)
    pending = Waiting("PodInitializing")
    initialized = all(isinstance(states.get(c.name), Terminated) for c in pod.spec.init_containers)
    ready = phase == "Running" and all(isinstance(states.get(c.name), Running) for c in pod.spec.containers)
    ready_reason = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"

    def condition(kind: str, true: bool, reason: str = "") -> ConditionOut:
        return ConditionOut(kind, "True" if true else "False", now, "" if true else reason)

    return PodStatusOut(
        phase=phase,
        conditions=[
            condition("PodReadyToStartContainers", True),
            condition("Initialized", initialized, "ContainersNotInitialized"),
            condition("Ready", ready, ready_reason),
            condition("ContainersReady", ready, ready_reason),
            condition("PodScheduled", True),
        ],
        host_ip=host_ip,
        host_ips=[PodIP(host_ip)],
        pod_ip=pod_ip,
        pod_ips=[PodIP(pod_ip)],
        start_time=start_time,
        init_container_statuses=[
            _container_status(pod, c, states.get(c.name, pending), phase) for c in pod.spec.init_containers
        ],
        container_statuses=[_container_status(pod, c, states.get(c.name, pending), phase) for c in pod.spec.containers],
    )


def termination_message(container: Container, exit_code: int, log_text: str) -> str:
    """FallbackToLogsOnError: the log's tail for a failed container, as a kubelet reports it; else nothing."""
    if container.termination_message_policy != "FallbackToLogsOnError" or exit_code == 0:
        return ""
    return log_text[-TERMINATION_MESSAGE_MAX:]


# --- the launcher: runs in a fresh stdlib-only interpreter, never imports this module ------------------------------


def _launch() -> None:
    """Become the container described by the JSON plan in argv[1]: mount namespace, root, mounts, user, exec."""
    import contextlib
    import ctypes
    import json
    import os
    import sys

    with open(sys.argv[1], encoding="utf-8") as plan_file:
        plan = json.load(plan_file)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18

    # Opened before chroot, so a failure after it can still be reported; not inherited by the container.
    start_error = os.open(plan["start_error_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def fail(message: str) -> None:
        os.write(start_error, message.encode(errors="replace"))
        sys.stderr.write(f"stand-in: {message}\n")
        sys.stderr.flush()
        os._exit(128)

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        encoded = [None if s is None else s.encode() for s in (source, target, fstype)]
        if libc.mount(encoded[0], encoded[1], encoded[2], flags, None if data is None else data.encode()) != 0:
            errno = ctypes.get_errno()
            fail(f"mount {source} on {target}: {os.strerror(errno)}")

    def bind(source: str, target: str, readonly: bool, recursive: bool) -> None:
        if os.path.isdir(source):
            os.makedirs(target, mode=0o755, exist_ok=True)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            open(target, "a").close()
        mount(source, target, None, ms_bind | (ms_rec if recursive else 0), None)
        if readonly:
            mount(None, target, None, ms_remount | ms_bind | ms_rdonly, None)

    try:
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            fail(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
        mount(None, "/", None, ms_rec | ms_private, None)
        root = plan["root"]
        if plan["lower"] is not None:
            options = f"lowerdir={plan['lower']},upperdir={plan['upper']},workdir={plan['work']}"
            mount("overlay", root, "overlay", 0, options)
        else:
            mount("tmpfs", root, "tmpfs", 0, "mode=0755")
            for path in plan["host_binds"]:
                bind(path, root + path, True, True)
            for path, target in plan["host_symlinks"]:
                os.symlink(target, root + path)
        for item in plan["system_binds"] + plan["volumes"]:
            bind(item["source"], root + item["target"], item["readonly"], item["recursive"])
        if plan["readonly_root"]:
            mount(None, root, None, ms_remount | ms_bind | ms_rdonly, None)
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as last_cap:
            every_capability = range(int(last_cap.read()) + 1)
        os.chroot(root)
        os.makedirs(plan["workdir"], exist_ok=True)
        os.chdir(plan["workdir"])
        os.umask(0o022)
        env = dict(plan["env"])
        if "HOME" not in env:  # runc: the user's home from the image's /etc/passwd, else /
            env["HOME"] = "/"
            with contextlib.suppress(OSError), open("/etc/passwd", encoding="utf-8") as passwd:
                for line in passwd:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) > 5 and fields[2] == str(plan["uid"]):
                        env["HOME"] = fields[5] or "/"
                        break
        if plan["capabilities"] is not None:
            for capability in every_capability:
                if capability not in plan["capabilities"] and libc.prctl(24, capability, 0, 0, 0) != 0:  # CAPBSET_DROP
                    fail(f"drop capability {capability}: {os.strerror(ctypes.get_errno())}")
        if plan["no_new_privs"] and libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            fail(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
        os.setgroups([])
        os.setgid(plan["gid"])
        os.setuid(plan["uid"])
        # runc's lookup: a name without a slash is searched on the container's PATH, as the container's user.
        program = plan["argv"][0]
        if "/" not in program:
            found = [d + "/" + program for d in env.get("PATH", "").split(":") if d]
            program = next((f for f in found if os.path.isfile(f) and os.access(f, os.X_OK)), program)
        os.execve(program, plan["argv"], env)
    except OSError as error:
        fail(f'exec: "{plan["argv"][0]}": {error.strerror or error}')


_LAUNCHER = inspect.getsource(_launch) + "\n_launch()\n"


# --- the shell: watch pods, run them, write their status ------------------------------------------------------------


class ContainerRun(msgspec.Struct, frozen=True):
    name: str
    state: ContainerState
    log_path: str


class PodRun(msgspec.Struct, frozen=True, kw_only=True):
    """What the stand-in did with one pod; `outcome` is the pod's phase once it stopped changing it."""

    namespace: str
    pod: str
    job: str
    uid: str
    containers: list[ContainerRun] = []
    outcome: PodPhase | Literal["running"] = "running"

    @property
    def done(self) -> bool:
        return self.outcome != "running"

    def container(self, name: str) -> ContainerRun:
        return next(c for c in self.containers if c.name == name)

    def logs(self) -> str:
        """Every container's state and output, for a failing test to print."""
        parts = [f"pod {self.namespace}/{self.pod} (job {self.job or '-'}): {self.outcome}"]
        for run in self.containers:
            try:
                text = Path(run.log_path).read_text(errors="replace")
            except OSError:
                text = "(no output)"
            parts.append(f"--- {run.name}: {run.state!r}\n{text.rstrip()}")
        return "\n".join(parts)


def _write_plan(plan: LaunchPlan, container_dir: Path) -> Path:
    """The container's dirs and its plan file (0600: the env holds presigned URLs)."""
    for directory in (plan.root, plan.upper, plan.work):
        Path(directory).mkdir(parents=True, exist_ok=True)
    plan_path = container_dir / "plan.json"
    plan_path.touch(mode=0o600)
    plan_path.write_bytes(msgspec.json.encode(plan))
    return plan_path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeletStandin:
    """Watches podsweep's pods on kwok nodes and runs them (or, with execute=False, only marks them Succeeded)."""

    def __init__(
        self,
        client: Kube,
        work_dir: Path,
        images: Mapping[str, ImageRoot] | None = None,
        *,
        namespace: str | None = None,
        claims: Mapping[str, Path] | None = None,
        execute: bool = True,
        parallel_pods: int = 4,
        container_timeout_s: float = 120.0,
        on_complete: Callable[[Pod], Awaitable[None]] | None = None,
    ) -> None:
        """`on_complete` (with execute=False) plays the scan pod's work while its containers run, e.g. PUTs a report
        to the Job's presigned URL; when it raises, the pod fails as a container exiting 1 would."""
        self.client = client
        self.on_complete = on_complete
        self.work_dir = work_dir
        self.images = dict(images or {})
        self.namespace = namespace
        self.claims = dict(claims or {})
        self.execute = execute
        self.container_timeout_s = container_timeout_s
        self.runs: dict[tuple[str, str], PodRun] = {}
        self._slots = asyncio.Semaphore(parallel_pods)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._seen: set[str] = set()
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._nodes: dict[str, str | None] = {}  # node name -> its IP when kwok manages it, None when not
        self._pod_ips = itertools.count(2)
        self._watcher: asyncio.Task[None] | None = None
        self.watch_errors: list[str] = []
        self.passed_over: dict[str, str] = {}

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._watcher = asyncio.create_task(self._watch(), name="kubelet-standin")

    async def stop(self) -> None:
        """Stop watching, kill every running container (by its own process group) and wait for the pod tasks."""
        tasks = [t for t in (self._watcher, *self._tasks.values()) if t is not None]
        for uid in list(self._processes):
            self._kill(uid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_for_job(self, namespace: str, job: str, timeout_s: float = 60.0) -> PodRun:
        """The run of that Job's pod once the stand-in stopped changing it (Succeeded, Failed, or stuck Pending)."""

        async def finished() -> PodRun | None:
            return next((r for r in self.runs.values() if r.namespace == namespace and r.job == job and r.done), None)

        return await wait_until(finished, timeout_s, f"the stand-in finishing Job {namespace}/{job}")

    def describe(self) -> str:
        """Every pod it ran with its containers' output, the last watch errors and the pods it passed over."""
        parts = [run.logs() for run in self.runs.values()] or ["(the stand-in ran no pods)"]
        parts += [f"error: {e}" for e in self.watch_errors[-5:]]
        parts += [f"passed over {pod}: {why}" for pod, why in self.passed_over.items()]
        return "\n\n".join(parts)

    # -- watching ---------------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods" if self.namespace else "/api/v1/pods"
        params: dict[str, str | int | bool] = {"labelSelector": MANAGED_SELECTOR}
        while True:
            try:
                listing = _pod_list_decoder.decode(await self.client.get(path, params))
                for pod in listing.items:
                    self._consider(pod, deleted=False)
                watch = {**params, "resourceVersion": listing.metadata.resource_version, "timeoutSeconds": 30}
                async for line in self.client.watch(path, watch, 40):
                    event = _pod_event_decoder.decode(line)
                    if event.type == "ERROR" or event.object is None:
                        break
                    self._consider(event.object, deleted=event.type == "DELETED")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the apiserver restarting, a dropped connection: list again
                self.watch_errors.append(f"{type(error).__name__}: {str(error)[:300]}")
                log.warning("stand-in watch broke, listing again", error=str(error)[:200])
                await asyncio.sleep(0.5)

    def _consider(self, pod: Pod, *, deleted: bool) -> None:
        uid = pod.metadata.uid
        if deleted or pod.metadata.deletion_timestamp is not None:
            if uid in self._tasks:
                self._kill(uid)
                self._tasks[uid].cancel()
            return
        name = f"{pod.metadata.namespace}/{pod.metadata.name}"
        if uid in self._seen:
            return
        if not pod.spec.node_name or pod.started_before():
            self.passed_over[name] = "not bound to a node yet" if not pod.spec.node_name else "already started"
            return
        self._seen.add(uid)
        task = asyncio.create_task(self._run_pod_reporting_errors(pod), name=f"standin-{pod.metadata.name}")
        self._tasks[uid] = task
        task.add_done_callback(lambda _: self._tasks.pop(uid, None))

    async def _node_ip(self, name: str) -> str | None:
        if name not in self._nodes:
            try:
                node = _node_decoder.decode(await self.client.get(f"/api/v1/nodes/{name}"))
            except KubeError as error:
                if error.status != 404:
                    raise
                return None
            kwok = node.metadata.annotations.get(FAKE_NODE_ANNOTATION) == "fake"
            # kwok's default node stages write no addresses: a stable made-up one stands in for the node's IP.
            made_up = "10.246.{}.{}".format(*hashlib.sha256(name.encode()).digest()[:2])
            address = next((a.address for a in node.status.addresses if a.type == "InternalIP"), made_up)
            self._nodes[name] = address if kwok else None
        return self._nodes[name]

    # -- running a pod ----------------------------------------------------------------------------------------------

    async def _run_pod_reporting_errors(self, pod: Pod) -> None:
        try:
            await self._run_pod(pod)
        except Exception as error:  # a stand-in bug must show in describe(), not vanish with its task
            self.watch_errors.append(f"pod {pod.metadata.namespace}/{pod.metadata.name}: {error!r}")
            raise

    async def _run_pod(self, pod: Pod) -> None:
        meta = pod.metadata
        host_ip = await self._node_ip(pod.spec.node_name)
        if host_ip is None:
            self.passed_over[f"{meta.namespace}/{meta.name}"] = f"node {pod.spec.node_name} is not a kwok node"
            return
        key = (meta.namespace, meta.name)
        self.runs[key] = PodRun(namespace=meta.namespace, pod=meta.name, job=pod.job_name(), uid=meta.uid)
        pod_dir = self.work_dir / meta.namespace / f"{meta.name}-{meta.uid[:8]}"
        ip = next(self._pod_ips)
        pod_ip = f"10.245.{ip // 250 % 250}.{ip % 250 + 1}"
        states: dict[str, ContainerState] = {}
        start_time = _now()

        async def report() -> None:
            status = pod_status(pod, states, host_ip=host_ip, pod_ip=pod_ip, start_time=start_time, now=_now())
            await self.client.request(
                "PATCH",
                f"/api/v1/namespaces/{meta.namespace}/pods/{meta.name}/status",
                body={"status": msgspec.to_builtins(status)},
                content_type="application/merge-patch+json",
            )

        try:
            async with self._slots:
                if self.execute:
                    await self._execute_pod(pod, pod_dir, states, report)
                else:
                    await self._complete_pod(pod, states, report)
        except KubeError as error:
            if error.status != 404:  # a pod deleted while it ran is no failure of the stand-in
                raise
        finally:
            run = self.runs[key]
            outcome = pod_phase(pod, states)
            self.runs[key] = msgspec.structs.replace(
                run,
                outcome="Pending" if outcome == "Running" else outcome,
                containers=self._container_runs(pod, pod_dir, states),
            )
            shutil.rmtree(pod_dir / "volumes", ignore_errors=True)
            shutil.rmtree(pod_dir / "containers", ignore_errors=True)
            log.info("stand-in pod done", pod=f"{meta.namespace}/{meta.name}", phase=self.runs[key].outcome)

    def _container_runs(self, pod: Pod, pod_dir: Path, states: Mapping[str, ContainerState]) -> list[ContainerRun]:
        every = pod.spec.init_containers + pod.spec.containers
        return [
            ContainerRun(
                c.name, states.get(c.name, Waiting("PodInitializing")), str(pod_dir / "logs" / f"{c.name}.log")
            )
            for c in every
        ]

    async def _complete_pod(
        self, pod: Pod, states: dict[str, ContainerState], report: Callable[[], Awaitable[None]]
    ) -> None:
        began = _now()
        for container in pod.spec.init_containers:
            states[container.name] = Terminated(0, "Completed", began, began)
        for container in pod.spec.containers:
            states[container.name] = Running(began)
        await report()
        code, reason = 0, "Completed"
        if self.on_complete is not None:
            try:
                await self.on_complete(pod)
            except Exception as error:  # the pod's work failed: the pod fails, as its container would
                log.warning("stand-in pod work failed", pod=pod.metadata.name, error=str(error))
                code, reason = 1, "Error"
        finished = _now()
        for container in pod.spec.containers:
            states[container.name] = Terminated(code, reason, began, finished)
        await report()

    async def _execute_pod(
        self, pod: Pod, pod_dir: Path, states: dict[str, ContainerState], report: Callable[[], Awaitable[None]]
    ) -> None:
        (pod_dir / "logs").mkdir(parents=True, exist_ok=True)
        volumes = pod_volumes(pod, pod_dir, self.claims)
        if isinstance(volumes, Waiting):
            for container in pod.spec.init_containers + pod.spec.containers:
                states[container.name] = volumes
            await report()
            return
        for volume in pod.spec.volumes:
            if volume.empty_dir is not None:
                directory = pod_dir / "volumes" / volume.name
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o777)  # the kubelet's emptyDir mode: any uid in the pod may write
        await report()
        for container in pod.spec.init_containers + pod.spec.containers:
            container_dir = pod_dir / "containers" / container.name
            plan = plan_container(pod, container, self.images.get(container.image), volumes, container_dir)
            if isinstance(plan, Waiting):
                states[container.name] = plan
                await report()
                return
            started = _now()
            states[container.name] = Running(started)
            await report()
            log_path = pod_dir / "logs" / f"{container.name}.log"
            exit_code, start_error = await self._run_container(pod.metadata.uid, plan, container_dir, log_path)
            text = log_path.read_text(errors="replace")
            states[container.name] = Terminated(
                exit_code,
                terminated_reason(exit_code, start_error),
                started,
                _now(),
                start_error or termination_message(container, exit_code, text),
            )
            await report()
            if exit_code != 0:
                return

    async def _run_container(
        self, uid: str, plan: LaunchPlan, container_dir: Path, log_path: Path
    ) -> tuple[int, str | None]:
        plan_path = _write_plan(plan, container_dir)
        with log_path.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                "-c",
                _LAUNCHER,
                str(plan_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={},
                start_new_session=True,
            )
        self._processes[uid] = process
        try:
            exit_code = await asyncio.wait_for(process.wait(), self.container_timeout_s)
        except TimeoutError:
            self._kill(uid)
            await process.wait()
            with log_path.open("a") as out:
                out.write(f"\nstand-in: killed after {self.container_timeout_s:.0f}s\n")
            exit_code = 137
        finally:
            self._processes.pop(uid, None)
            plan_path.unlink(missing_ok=True)
        message = _read_start_error(Path(plan.start_error_path))
        # A signal shows as a negative return code; kubelets report 128 + the signal number.
        return (128 - exit_code if exit_code < 0 else exit_code), message

    def _kill(self, uid: str) -> None:
        process = self._processes.get(uid)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


# --- fixture -------------------------------------------------------------------------------------------------------


class StartStandin(Protocol):
    async def __call__(
        self,
        images: Mapping[str, ImageRoot] | None = None,
        *,
        namespace: str | None = None,
        claims: Mapping[str, Path] | None = None,
        execute: bool = True,
    ) -> KubeletStandin: ...


@pytest_asyncio.fixture
async def kubelet_standin(kube: KubeControlPlane, tmp_path: Path) -> AsyncIterator[StartStandin]:
    """Starts stand-ins for this test (`await kubelet_standin(images, namespace=...)`); stops them afterwards."""
    client = await Kube.connect(str(kube.kubeconfig))
    started: list[KubeletStandin] = []

    async def start(
        images: Mapping[str, ImageRoot] | None = None,
        *,
        namespace: str | None = None,
        claims: Mapping[str, Path] | None = None,
        execute: bool = True,
    ) -> KubeletStandin:
        standin = KubeletStandin(
            client, tmp_path / f"standin-{len(started)}", images, namespace=namespace, claims=claims, execute=execute
        )
        await standin.start()
        started.append(standin)
        return standin

    try:
        yield start
    finally:
        for standin in started:
            await standin.stop()
        await client.close()


def scan_images(trivy_bin: Path, target_ref: str | None = None, target: Path | None = None) -> dict[str, ImageRoot]:
    """The images a podsweep scan Job names, as the dispatcher's defaults spell them: the trivy image, the podsweep
    image, and the target digest when a fixture root filesystem stands in for it (none: ErrImageNeverPull)."""
    from services.dispatcher import jobspec  # the builder's defaults are the contract

    options = jobspec.JobOptions()
    images: dict[str, ImageRoot] = {
        options.trivy_image: RootfsImage(path=str(trivy_image_rootfs(trivy_bin, options.trivy_binary))),
        options.uploader_image: podsweep_image(),
    }
    if target_ref is not None and target is not None:
        images[target_ref] = RootfsImage(path=str(target))
    return images
