"""The watcher's first sync at scale: N pods on kwok nodes, then `podsweep run watcher` as a subprocess until every
expected (digest, node) image.seen is in the stream. Measures wall time, the watcher's CPU seconds and peak RSS, API
calls, and the control plane's CPU meanwhile.

Starts its own control plane (tests/harness/kube.py) and nats-server (podsweep.embedded) in a temp dir and stops only
those. The cluster is a realistic mix: Deployments (Pod -> ReplicaSet -> Deployment), StatefulSets, DaemonSets,
CronJob Jobs and bare pods, a few hundred distinct images, sidecars and init containers, labels and annotations.
Owners and pods are created by this script (pods with nodeName, so no scheduler): the controller-manager is stopped
once the namespaces exist, so nothing adopts, scales or garbage-collects them while the watcher lists.

The cluster is built once and nothing is timed until kwok has started every pod and the control plane is idle again
(creating 50k pods leaves the API server, etcd and kwok busy for minutes; a sync timed meanwhile measures them).
Then each variant's watcher syncs `--runs` times, alternating, each into a stream of its own: this tree, this tree
with other page sizes (`--page-size`), and `--baseline TREE` (e.g. `git archive <commit> podsweep schemas services
| tar -x -C TREE`), so before/after are compared on the same cluster and the same minutes.
Run: .venv/bin/python bench/watcher_sync.py [--pods 20000 --nodes 100 --images 300 --runs 2 --baseline TREE
--profile out.txt]. Each run prints a JSON line to stderr; the last line of stdout is one JSON object (medians of this
tree's runs at the top, every run under "runs"). --profile adds one more, unmeasured sync under pyinstrument (a dev
dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings
from podsweep.kube import Kube
from schemas import subjects
from schemas.events import ImageSeen
from tests.harness.kube import KubeControlPlane, locate_binaries
from tests.harness.kwok import create_fake_node, create_namespace, expected_image_id

REPO = Path(__file__).resolve().parent.parent
WATCHER = (sys.executable, "-m", "podsweep", "run", "watcher")
CREATE_CONCURRENCY = 32
NAMESPACES = 20
SYSTEM_NAMESPACE = "node-agents"
SIDECARS = ("docker.io/envoyproxy/envoy:v1.31.2", "cr.fluentbit.io/fluent/fluent-bit:3.1.9")
INIT_IMAGES = ("docker.io/library/busybox:1.36", "registry.example.com/platform/migrate:4.2.0")
DAEMON_IMAGES = (
    "registry.k8s.io/kube-proxy:v1.36.3",
    "quay.io/prometheus/node-exporter:v1.8.2",
    "docker.io/calico/node:v3.28.2",
)


@dataclass(frozen=True)
class PodPlan:
    """One pod to create: where it runs, what it runs, who owns it (filled in once the owner exists)."""

    namespace: str
    name: str
    node: str
    containers: tuple[tuple[str, str], ...]  # (container name, image)
    init: tuple[tuple[str, str], ...]
    owner: int | None  # index into Cluster.owners


@dataclass
class OwnerPlan:
    api: str  # "apps/v1" / "batch/v1"
    plural: str
    kind: str
    namespace: str
    name: str
    manifest: dict[str, Any]
    parent: int | None = None  # index of its own owner (ReplicaSet -> Deployment, Job -> CronJob)
    uid: str = ""


@dataclass
class Cluster:
    owners: list[OwnerPlan] = field(default_factory=list)
    pods: list[PodPlan] = field(default_factory=list)

    def expected_pairs(self) -> set[tuple[str, str]]:
        return {
            (expected_image_id(image, name), pod.node) for pod in self.pods for name, image in pod.containers + pod.init
        }


def _template(name: str, containers: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": n, "image": i} for n, i in containers],
        },
    }


def plan_cluster(pods: int, nodes: list[str], images: int, seed: int = 7) -> Cluster:
    """A deterministic mix of workloads adding up to `pods` pods, spread over `nodes`."""
    rng = random.Random(seed)
    namespaces = [f"team-{i:02d}" for i in range(NAMESPACES)]
    app_images = [
        f"registry.example.com/team{i % NAMESPACES:02d}/svc{i:03d}:{rng.randint(1, 9)}.{rng.randint(0, 20)}.0"
        for i in range(images)
    ]
    weights = [1 / (rank + 1) for rank in range(images)]  # a few images run everywhere, most in one or two places
    cluster = Cluster()

    def owner(plan: OwnerPlan) -> int:
        cluster.owners.append(plan)
        return len(cluster.owners) - 1

    def add_pod(namespace: str, name: str, node: str, containers: Any, init: Any, owner_index: int | None) -> None:
        cluster.pods.append(PodPlan(namespace, name, node, tuple(containers), tuple(init), owner_index))

    # DaemonSets: one pod per node each, like kube-proxy and a log/metrics agent.
    for d, image in enumerate(DAEMON_IMAGES):
        name = f"node-agent-{d}"
        agent = (("agent", image),)
        template = _template(name, agent)
        template["spec"]["restartPolicy"] = "Always"
        manifest = {"selector": {"matchLabels": {"app": name}}, "template": template}
        index = owner(OwnerPlan("apps/v1", "daemonsets", "DaemonSet", SYSTEM_NAMESPACE, name, manifest))
        for n, node in enumerate(nodes):
            if len(cluster.pods) < pods:
                add_pod(SYSTEM_NAMESPACE, f"{name}-{n:05d}", node, agent, (), index)
    w = 0
    while len(cluster.pods) < pods:
        w += 1
        namespace = rng.choice(namespaces)
        image = rng.choices(app_images, weights)[0]
        containers: list[tuple[str, str]] = [("app", image)]
        if rng.random() < 0.3:
            containers.append(("proxy", rng.choice(SIDECARS)))
        init = [("setup", rng.choice(INIT_IMAGES))] if rng.random() < 0.2 else []
        shape = rng.random()
        name = f"svc-{w:05d}"
        if shape < 0.65:  # Deployment -> ReplicaSet -> pods
            replicas = rng.choice((1, 2, 2, 3, 3, 5, 10, 20))
            template = _template(name, tuple(containers))
            template["spec"]["restartPolicy"] = "Always"
            selector = {"matchLabels": {"app": name}}
            spec = {"replicas": replicas, "selector": selector, "template": template}
            deployment = owner(OwnerPlan("apps/v1", "deployments", "Deployment", namespace, name, spec))
            rs_name = f"{name}-{rng.getrandbits(32):08x}"[:63]
            rs = owner(OwnerPlan("apps/v1", "replicasets", "ReplicaSet", namespace, rs_name, spec, deployment))
            pod_prefix, parent = rs_name, rs
        elif shape < 0.75:  # StatefulSet
            replicas = rng.choice((1, 3, 5))
            template = _template(name, tuple(containers))
            template["spec"]["restartPolicy"] = "Always"
            spec = {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": {"app": name}}}
            spec["template"] = template
            parent = owner(OwnerPlan("apps/v1", "statefulsets", "StatefulSet", namespace, name, spec))
            pod_prefix = name
        elif shape < 0.82:  # CronJob -> Job -> one pod
            replicas = 1
            spec = {
                "schedule": "*/30 * * * *",
                "jobTemplate": {"spec": {"template": _template(name, tuple(containers))}},
            }
            cron = owner(OwnerPlan("batch/v1", "cronjobs", "CronJob", namespace, name, spec))
            job_name = f"{name}-{29000000 + w}"
            job_spec = {"template": _template(job_name, tuple(containers))}
            parent = owner(OwnerPlan("batch/v1", "jobs", "Job", namespace, job_name, job_spec, cron))
            pod_prefix = job_name
        else:  # bare pods
            replicas, parent, pod_prefix = rng.choice((1, 1, 2)), None, name
        for r in range(replicas):
            if len(cluster.pods) >= pods:
                break
            suffix = f"{r}" if 0.65 <= shape < 0.75 else f"{rng.getrandbits(16):04x}{r:x}"  # unique per owner
            add_pod(namespace, f"{pod_prefix}-{suffix}", rng.choice(nodes), containers, init, parent)
    return cluster


def _owner_ref(plan: OwnerPlan) -> dict[str, Any]:
    return {"apiVersion": plan.api, "kind": plan.kind, "name": plan.name, "uid": plan.uid, "controller": True}


def pod_manifest(pod: PodPlan, owner: OwnerPlan | None) -> dict[str, Any]:
    """A pod about the size of a real one: labels, a few annotations, resources, env, probes."""
    metadata: dict[str, Any] = {
        "name": pod.name,
        "labels": {"app": pod.name.rsplit("-", 1)[0], "team": pod.namespace, "tier": "backend", "version": "v1"},
        "annotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "9090",
            "kubectl.kubernetes.io/default-container": pod.containers[0][0],
        },
    }
    if owner is not None:
        metadata["ownerReferences"] = [_owner_ref(owner)]

    def container(name: str, image: str, serves: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": name,
            "image": image,
            "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        }
        if serves:  # init containers may not have probes
            spec["ports"] = [{"containerPort": 8080, "name": "http"}]
            spec["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10}
        return spec

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": pod.node,
            "automountServiceAccountToken": False,
            "initContainers": [container(n, i, serves=False) for n, i in pod.init],
            "containers": [container(n, i, serves=index == 0) for index, (n, i) in enumerate(pod.containers)],
        },
    }


async def _bounded(jobs: Iterator[Awaitable[Any]], concurrency: int) -> None:
    async def worker() -> None:
        for job in jobs:  # one shared iterator: each job is taken by exactly one worker
            await job

    await asyncio.gather(*(worker() for _ in range(concurrency)))


class _Uid(msgspec.Struct):
    uid: str


class _Created(msgspec.Struct):
    metadata: _Uid


class _PhaseOnly(msgspec.Struct, frozen=True):
    phase: str = ""


class _PodPhase(msgspec.Struct):
    status: _PhaseOnly = _PhaseOnly()


class _ListMeta(msgspec.Struct):
    # `continue` is a Python keyword, hence the rename
    next: str = msgspec.field(default="", name="continue")


class _PhaseList(msgspec.Struct):
    metadata: _ListMeta
    items: list[_PodPhase]


_created = msgspec.json.Decoder(_Created)
_phase_list = msgspec.json.Decoder(_PhaseList)


async def build_cluster(api: Kube, cluster: Cluster) -> None:
    """Owners first (parents before children, uids recorded), then every pod, many requests at once."""

    async def create_owner(plan: OwnerPlan) -> None:
        manifest: dict[str, Any] = {
            "apiVersion": plan.api,
            "kind": plan.kind,
            "metadata": {"name": plan.name, "labels": {"app": plan.name}},
            "spec": plan.manifest,
        }
        if plan.parent is not None:
            manifest["metadata"]["ownerReferences"] = [_owner_ref(cluster.owners[plan.parent])]
        path = f"/apis/{plan.api}/namespaces/{plan.namespace}/{plan.plural}"
        plan.uid = _created.decode(await api.request("POST", path, body=manifest)).metadata.uid

    top = [o for o in cluster.owners if o.parent is None]
    children = [o for o in cluster.owners if o.parent is not None]
    await _bounded((create_owner(o) for o in top), CREATE_CONCURRENCY)
    await _bounded((create_owner(o) for o in children), CREATE_CONCURRENCY)

    async def create_pod(pod: PodPlan) -> None:
        owner = cluster.owners[pod.owner] if pod.owner is not None else None
        await api.request("POST", f"/api/v1/namespaces/{pod.namespace}/pods", body=pod_manifest(pod, owner))

    await _bounded((create_pod(p) for p in cluster.pods), CREATE_CONCURRENCY)


async def any_pod_pending(api: Kube) -> bool:
    """Whether kwok has yet to start some pod (Job pods go on to Succeeded, so "not Running" would never end).

    One item at most: counting them all would make the API server encode the whole pod list every few seconds,
    slowing down kwok and everything the benchmark then times.
    """
    params: dict[str, str | int | bool] = {"fieldSelector": "status.phase=Pending", "limit": 1}
    return bool(_phase_list.decode(await api.get("/api/v1/pods", params)).items)


def vm_hwm_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_record(log: Path, event: str, **match: str) -> dict[str, Any]:
    """The JSON log record of `event` whose fields equal `match` (the largest by `pages`, then `mb`, when several do:
    the workload pod list rather than the scan pod list), with `at` (epoch seconds); {} if none."""
    found: dict[str, Any] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("event") != event:
            continue
        if all(record.get(key) == value for key, value in match.items()):
            if found and (record.get("pages", 0), record.get("mb", 0)) <= (found.get("pages", 0), found.get("mb", 0)):
                continue
            stamp = str(record.get("timestamp", "")).replace("Z", "+00:00")
            record["at"] = datetime.fromisoformat(stamp).timestamp() if stamp else 0.0
            found = record
    return found


async def _terminate(process: asyncio.subprocess.Process, grace_s: float) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            process.kill()
            await process.wait()


async def settle(
    plane: KubeControlPlane, quiet_cores: float = 0.3, window_s: float = 5.0, limit_s: float = 180
) -> float:
    """Wait until the control plane has finished the work the pods' creation caused (kwok moving pods on, the API
    server and etcd writing their status): a first sync timed while they still work measures them too."""
    pids = [process.proc.pid for process in plane.processes.values()]
    began = time.monotonic()
    while True:
        before = sum(cpu_s(pid) for pid in pids)
        await asyncio.sleep(window_s)
        busy = (sum(cpu_s(pid) for pid in pids) - before) / window_s
        if busy < quiet_cores or time.monotonic() - began > limit_s:
            print(f"control plane at {busy:.2f} cores after {time.monotonic() - began:.0f}s", file=sys.stderr)
            return time.monotonic() - began


@dataclass(frozen=True)
class Variant:
    """A watcher to time: this tree, or a baseline tree (an earlier commit's `git archive`) run side by side, with
    settings of its own (environment variables)."""

    name: str
    tree: Path
    env: tuple[tuple[str, str], ...] = ()


async def profile_watcher(env: dict[str, str], work: Path, out: Path) -> None:
    """A further, unmeasured first sync under pyinstrument, into a stream of its own; the text profile goes to `out`."""
    env = {**env, "PODSWEEP_NATS_SUBJECT_ROOT": "profile", "PODSWEEP_NATS_STREAM": "PROFILE"}
    log = work / "watcher-profile.log"
    argv = [sys.executable, "-m", "pyinstrument", "--renderer", "text", "--outfile", str(out), *WATCHER[1:]]
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=sink, stderr=asyncio.subprocess.STDOUT)
        while "pods reconciled" not in log.read_text(errors="replace"):
            if process.returncode is not None:
                raise RuntimeError(f"profiled watcher exited with {process.returncode}; see {log}")
            await asyncio.sleep(0.2)
        await _terminate(process, 300)  # pyinstrument renders its report on the way out (minutes for a long session)
    print(f"profile written to {out}", file=sys.stderr)


async def time_first_sync(
    variant: Variant,
    number: int,
    base_env: dict[str, str],
    nats_url: str,
    expected: set[tuple[str, str]],
    plane: KubeControlPlane,
    work: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """One watcher process from spawn to the stream's timestamp of the last expected (digest, node) pair, into a
    stream of its own; with its CPU, the control plane's CPU meanwhile and the watcher's own split of the list."""
    root, stream = f"run{number}", f"RUN{number}"
    user, password = base_env["PODSWEEP_NATS_USER"], base_env["PODSWEEP_NATS_PASSWORD"]
    bus = await busmod.connect(
        NatsSettings(url=nats_url, user=user, password=password, subject_root=root, stream=stream), "bench"
    )
    await busmod.ensure_stream(bus)
    seen: set[tuple[str, str]] = set()
    ids: set[str] = set()
    missing = set(expected)
    stored_last = 0.0  # when the stream stored the last expected pair (its own timestamp: consumer lag is not in it)
    events = 0
    all_seen = asyncio.Event()
    decoder = msgspec.json.Decoder(ImageSeen)

    async def on_seen(msg: Any) -> None:
        nonlocal events, stored_last
        event = decoder.decode(msg.data)
        events += 1
        ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
        pair = (event.digest_ref, event.node)
        seen.add(pair)
        if pair in missing:
            missing.discard(pair)
            stored_last = max(stored_last, msg.metadata.timestamp.timestamp())
            if not missing:
                all_seen.set()

    sub = await bus.js.subscribe(bus.subject(subjects.IMAGE_SEEN), cb=on_seen, ordered_consumer=True)
    env = {
        **base_env,
        **dict(variant.env),
        "PODSWEEP_NATS_SUBJECT_ROOT": root,
        "PODSWEEP_NATS_STREAM": stream,
        "PODSWEEP_DATA_DIR": str(work / f"watcher-{number}"),
    }
    plane_pids = {name: process.proc.pid for name, process in plane.processes.items()}
    plane_before = {name: cpu_s(pid) for name, pid in plane_pids.items()}
    log = work / f"watcher-{number}-{variant.name}.log"
    peak_rss = watcher_cpu = watcher_cpu_reconciled = 0.0
    plane_used: dict[str, float] = {}
    with log.open("wb") as out:
        spawned_at = time.time()
        load_before = os.getloadavg()[0]
        watcher = await asyncio.create_subprocess_exec(
            *WATCHER, env=env, cwd=variant.tree, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not all_seen.is_set():
                if watcher.returncode is not None:
                    raise RuntimeError(f"watcher exited with {watcher.returncode}; see {log}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(missing)} of {len(expected)} (digest, node) pairs not seen in time; see {log}"
                    )
                peak_rss = max(peak_rss, vm_hwm_mb(watcher.pid))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_seen.wait(), 0.05)
            watcher_cpu = cpu_s(watcher.pid)
            plane_used = {name: cpu_s(pid) - plane_before[name] for name, pid in plane_pids.items()}
            # Every pair is out before the list ends (events go per page, and the last pages add only sightings of
            # pairs already seen: other workloads, other pods): wait for the end of the list too.
            while not log_record(log, "pods reconciled"):
                if watcher.returncode is not None or time.monotonic() > deadline:
                    break
                peak_rss = max(peak_rss, vm_hwm_mb(watcher.pid))
                await asyncio.sleep(0.2)
            watcher_cpu_reconciled = cpu_s(watcher.pid)
            await asyncio.sleep(2.0)  # anything published after the reconcile (it should be nothing) lands now
            peak_rss = max(peak_rss, vm_hwm_mb(watcher.pid))
        finally:
            await _terminate(watcher, 10)
    await sub.unsubscribe()
    await bus.close()
    listed = log_record(log, "list done", resource="pods")
    reconciled = log_record(log, "pods reconciled")
    started = log_record(log, "watcher started")
    return {
        "variant": variant.name,
        "first_sync_s": round(stored_last - spawned_at, 2),
        "watcher_cpu_s": round(watcher_cpu, 2),
        "reconciled_s": round(reconciled["at"] - spawned_at, 2) if reconciled else None,
        "watcher_cpu_reconciled_s": round(watcher_cpu_reconciled, 2),
        "apiserver_cpu_s": round(plane_used.get("kube-apiserver", 0.0), 2),
        "etcd_cpu_s": round(plane_used.get("etcd", 0.0), 2),
        "kwok_cpu_s": round(plane_used.get("kwok", 0.0), 2),
        "load_avg_before": round(load_before, 2),
        "startup_s": round(started["at"] - spawned_at, 2) if started else None,
        # From the watcher's own log (absent in versions that did not log them): the pod list from its first
        # request to the end of the reconcile, the part of it spent waiting for pages and decoding them, and
        # (reconcile line) the time turning pods into state and publishing.
        "list_s": listed.get("s"),
        "list_waiting_s": listed.get("waiting_s"),
        "list_decoding_s": listed.get("decoding_s"),
        "list_mb": listed.get("mb"),
        "states_s": reconciled.get("states_s"),
        "publish_s": reconciled.get("publish_s"),
        "api_calls": reconciled.get("api_calls"),
        "peak_rss_mb": round(peak_rss, 1),
        "seen_events": events,
        # One image.seen per (digest, node, workload): more events than pairs is by design. A duplicate is one
        # message id stored twice.
        "sightings": len(ids),
        "duplicates": events - len(ids),
        "unexpected_pairs": len(seen - expected),
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else round((ordered[middle - 1] + ordered[middle]) / 2, 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    this = asyncio.current_task()
    assert this is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # cancel, so `finally` stops every process this run started
        asyncio.get_running_loop().add_signal_handler(sig, this.cancel)
    work = Path(tempfile.mkdtemp(prefix="podsweep-watcher-sync-"))
    plane = KubeControlPlane(bin_dir=locate_binaries(), work_dir=work / "kube")
    nats = None
    variants = [Variant("current", REPO)]
    for size in args.page_sizes:
        variants.append(Variant(f"current-page-{size}", REPO, (("PODSWEEP_WATCHER_PAGE_SIZE", str(size)),)))
    if args.baseline:
        variants.insert(0, Variant("baseline", args.baseline))
    try:
        plane.start()
        nats = embedded.start_nats(work)
        api = await Kube.connect(str(plane.kubeconfig))
        nodes = [f"kwok-node-{i:03d}" for i in range(args.nodes)]
        await _bounded((create_fake_node(api, n) for n in nodes), CREATE_CONCURRENCY)
        for ns in [SYSTEM_NAMESPACE, *(f"team-{i:02d}" for i in range(NAMESPACES))]:
            await create_namespace(api, ns)
        # Nothing may adopt, scale or collect what the benchmark creates by hand (see the module docstring).
        for name in ("kube-controller-manager", "kube-scheduler"):
            plane.processes.pop(name).stop()

        cluster = plan_cluster(args.pods, nodes, args.images)
        expected = cluster.expected_pairs()
        print(
            f"creating {len(cluster.owners)} owners and {len(cluster.pods)} pods "
            f"({len(expected)} digest/node pairs) on {len(nodes)} nodes",
            file=sys.stderr,
        )
        began = time.monotonic()
        await build_cluster(api, cluster)
        create_s = time.monotonic() - began
        print(f"created in {create_s:.0f}s ({len(cluster.pods) / create_s:.0f} pods/s)", file=sys.stderr)
        began = time.monotonic()
        while await any_pod_pending(api):
            print(f"waiting for kwok to start every pod ({time.monotonic() - began:.0f}s)", file=sys.stderr)
            await asyncio.sleep(5)
        await api.close()
        settle_s = await settle(plane)
        # kwok keeps working after every pod runs (node heartbeats, its own resyncs: 0.7 of a core during a 50k
        # sync). Nothing needs it any more (no controller-manager reacts to nodes going stale), so it stops here.
        plane.processes.pop("kwok").stop()

        env = {
            **os.environ,
            "PODSWEEP_KUBECONFIG": str(plane.kubeconfig),
            "PODSWEEP_NATS_URL": nats.url,
            "PODSWEEP_NATS_USER": nats.user,
            "PODSWEEP_NATS_PASSWORD": nats.password,
            "PODSWEEP_CLUSTER": "bench",
            "PODSWEEP_LOG_FORMAT": "json",
        }
        runs: list[dict[str, Any]] = []
        for number in range(args.runs * len(variants)):  # alternating, so a busy minute hits both alike
            variant = variants[number % len(variants)]
            result = await time_first_sync(variant, number, env, nats.url, expected, plane, work, args.timeout_s)
            print(json.dumps(result), file=sys.stderr)
            runs.append(result)
        if args.profile:
            await profile_watcher({**env, "PODSWEEP_DATA_DIR": str(work / "watcher-profile")}, work, Path(args.profile))
        summary = {
            v.name: {
                key: _median([r[key] for r in runs if r["variant"] == v.name and r[key] is not None] or [-1.0])
                for key in ("first_sync_s", "reconciled_s", "watcher_cpu_s", "apiserver_cpu_s", "peak_rss_mb")
            }
            for v in variants
        }
        current = summary["current"]
        return {
            "pods": len(cluster.pods),
            "nodes": len(nodes),
            "owners": len(cluster.owners),
            "distinct_digests": len({digest for digest, _ in expected}),
            "digest_node_pairs": len(expected),
            "pods_create_s": round(create_s, 1),
            "settle_s": round(settle_s, 1),
            "first_sync_s": current["first_sync_s"],  # medians of this tree's runs
            "reconciled_s": current["reconciled_s"],
            "watcher_cpu_s": current["watcher_cpu_s"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs if r["variant"] == "current"),
            "api_calls": max(r["api_calls"] or 0 for r in runs if r["variant"] == "current"),
            "duplicates": sum(r["duplicates"] for r in runs),
            "unexpected_pairs": sum(r["unexpected_pairs"] for r in runs),
            "summary": summary,
            "runs": runs,
        }
    finally:
        if nats is not None:
            nats.stop()
        plane.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--images", type=int, default=300, help="distinct application images")
    parser.add_argument("--runs", type=int, default=2, help="watcher first syncs per variant over the one cluster")
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also time the watcher of this source tree (e.g. `git archive <commit> podsweep schemas services`)",
    )
    parser.add_argument(
        "--page-size",
        dest="page_sizes",
        type=int,
        action="append",
        default=[],
        help="also time this tree with this list page size (repeatable)",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="how long the watcher may take to sync")
    parser.add_argument("--profile", metavar="PATH", help="then profile one more first sync with pyinstrument")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args()
    if args.baseline:
        args.baseline = Path(args.baseline).resolve()
        if not (args.baseline / "services" / "watcher" / "main.py").is_file():
            parser.error(f"--baseline {args.baseline} has no services/watcher/main.py (expected a podsweep tree)")
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
