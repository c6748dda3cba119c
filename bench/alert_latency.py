"""Alert latency: `report.stored` published → signed webhook received, through the real notifier process.

Real nats-server and SeaweedFS (embedded, in a temp dir), `python -m podsweep run notifier` as a subprocess, and an
aiohttp receiver on loopback that verifies every signature. Every event breaches (one new CRITICAL), for a workload
of its own digest. Two phases of N events each: `paced` (a steady rate: latency as an operator sees it) and
`burst` (all at once: alerts per second, and latency under a backlog); then the `storm` of issue 22: 2,000
workloads over 300 digests breach at once (one report reaches several workloads). Per phase: the notifier's CPU per
alert; at the paced rate also its system calls and sleeps (voluntary context switches) per alert, since there each
wait for an answer ends in a wake-up on a cold core. Baseline in the same run: a bare signed
POST from this process to the same receiver (the floor under the notifier's work: S3, KV, outbox, HTTP).
With --compare-with DIR, the notifier of another source tree (e.g. `git worktree add DIR main`) runs the same phases
first, on its own stream of the same servers: CPU milliseconds per alert (the notifier process's user + system time
over the alerts received) old and new in one run (--old-rate: at the new one's webhook rate, for a tree that knows
rate_per_s). A third run allows the webhook 10 messages/s with grouping on, so a burst leaves grouped (skip with
--skip-grouped). --profile DIR --py-spy BIN [--py-spy-phase storm] samples one phase's on-CPU stacks.
Run: .venv/bin/python bench/alert_latency.py [--events 1000] [--rate 25] [--compare-with DIR]. The last line is one
JSON object, with the load average, since the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings
from podsweep.objectstore import ObjectStore
from schemas import storage, subjects
from schemas.events import ReportStored, SeverityCounts, Workload
from schemas.report import Finding, Report
from schemas.state import WORKLOADS_BUCKET, DigestWorkloads, WorkloadRun
from services.notifier import signing

REPO = Path(__file__).resolve().parent.parent
KEY = b"bench-hmac-key-0123456789abcdef"


class _Member(msgspec.Struct):
    id: str
    scan_id: str


class _Received(msgspec.Struct):
    """A single alert (`id`, `scan_id`) or a grouped one (`members`), whichever the notifier under test sends."""

    id: str = ""
    scan_id: str = ""
    members: list[_Member] = []


_received = msgspec.json.Decoder(_Received)


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "p50_ms": round(at(0.50), 2),
        "p90_ms": round(at(0.90), 2),
        "p99_ms": round(at(0.99), 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


class Receiver:
    def __init__(self) -> None:
        self.received: dict[str, tuple[str, float]] = {}  # alert id (one per workload and report) → scan id, when
        self.bad_signatures = 0
        self.duplicates = 0
        self.done = asyncio.Event()
        self.expected = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        at = time.perf_counter()
        try:
            signing.verify([KEY], body, request.headers.get(signing.SIGNATURE_HEADER), int(time.time()))
        except signing.SignatureError:
            self.bad_signatures += 1
            return web.Response(status=401)
        received = _received.decode(body)
        alerts = (
            [(m.id, m.scan_id) for m in received.members] if received.members else [(received.id, received.scan_id)]
        )
        for alert_id, scan_id in alerts:
            if alert_id in self.received:
                self.duplicates += 1
            else:
                self.received[alert_id] = (scan_id, at)
        if self.expected and len(self.received) >= self.expected:
            self.done.set()
        return web.Response(status=204)


def cpu_s(pid: int, which: tuple[int, ...] = (11, 12)) -> float:
    """User + system CPU seconds a process has used (Linux /proc; `which` (11,) for user only); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(fields[i]) for i in which) / os.sysconf("SC_CLK_TCK")


def syscalls(pid: int) -> int:
    """Read- and write-family system calls a process has made (Linux /proc/<pid>/io: syscr + syscw); -1 elsewhere.
    Unlike CPU time, hardly moved by what else the machine runs: each NATS round trip or HTTP call costs a few."""
    try:
        fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return -1
    return int(fields["syscr"]) + int(fields["syscw"])


def sleeps(pid: int) -> int:
    """How often a process has gone to sleep waiting (voluntary context switches, all threads; Linux /proc); -1
    elsewhere. Each wait for an answer is one, and on a quiet core each wake-up starts from cold caches."""
    try:
        return sum(
            int(line.split()[1])
            for task in Path(f"/proc/{pid}/task").iterdir()
            for line in (task / "status").read_text().splitlines()
            if line.startswith("voluntary_ctxt_switches:")
        )
    except OSError:
        return -1


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def breach(digest_ref: str, scan_id: str) -> Report:
    finding = Finding(
        id="CVE-2026-1000",
        package="openssl",
        installed_version="3.1.0",
        severity="CRITICAL",
        fixed_version="3.1.1",
        fixable=True,
        cvss=9.8,
    )
    return Report(
        digest_ref=digest_ref,
        scan_id=scan_id,
        source_format="v2",
        findings=[finding],
        counts=SeverityCounts(CRITICAL=1),
        fixable=SeverityCounts(CRITICAL=1),
    )


async def prepare(
    bus: busmod.Bus, store: ObjectStore, names: list[tuple[str, str]], workloads: int = 1
) -> dict[str, ReportStored]:
    """Reports in S3 and workloads in KV, as the parser leaves them, before anything is published: `workloads`
    workloads run each digest."""
    kv = await bus.kv(WORKLOADS_BUCKET)
    limit = asyncio.Semaphore(16)
    events: dict[str, ReportStored] = {}

    async def one(digest_ref: str, scan_id: str) -> None:
        async with limit:
            report = breach(digest_ref, scan_id)
            at = datetime.now(UTC)
            history = storage.history_report_key(digest_ref, at)
            await store.put(history, msgspec.json.encode(report))
            runs = [
                WorkloadRun(
                    namespace="bench",
                    workload=Workload(kind="Deployment", name=f"app-{scan_id}" + (f"-{w}" if w else "")),
                    image=digest_ref.split("@")[0] + ":1",
                )
                for w in range(workloads)
            ]
            doc = DigestWorkloads(digest_ref=digest_ref, runs=runs)
            await kv.put(digest_ref.rsplit(":", 1)[1], msgspec.json.encode(doc))
            events[scan_id] = ReportStored(
                cluster="bench",
                scan_id=scan_id,
                digest_ref=digest_ref,
                report_key=storage.latest_report_key(digest_ref),
                history_key=history,
                counts=report.counts,
                fixable=report.fixable,
                stored_at=at,
            )

    await asyncio.gather(*(one(d, s) for d, s in names))
    return events


async def phase(
    bus: busmod.Bus,
    receiver: Receiver,
    events: dict[str, ReportStored],
    rate: float | None,
    wait_s: float,
    alerts: int | None = None,
) -> dict[str, object]:
    """Publish the events (at `rate`, or all at once) and wait for `alerts` (one per event unless given)."""
    receiver.done.clear()
    receiver.expected = len(receiver.received) + (len(events) if alerts is None else alerts)
    published: dict[str, float] = {}
    started = time.perf_counter()
    for i, (scan_id, event) in enumerate(events.items()):
        if rate:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        published[scan_id] = time.perf_counter()
        await bus.publish(subjects.REPORT_STORED, event, msg_id=f"report:{scan_id}")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receiver.done.wait(), wait_s)
    got = [(scan_id, at) for scan_id, at in receiver.received.values() if scan_id in published]
    latencies = [at - published[scan_id] for scan_id, at in got]
    elapsed = max(at for _, at in got) - started if got else float("nan")
    return {
        "events": len(events),
        "received": len(got),
        "rate_per_s": rate,
        **quantiles(latencies),
        "alerts_per_s": round(len(got) / elapsed, 1) if got else 0.0,
    }


async def baseline(url: str, n: int) -> dict[str, float]:
    """A signed POST straight to the receiver: what delivery costs without the notifier."""
    latencies = []
    async with httpx.AsyncClient() as client:
        for i in range(n):
            body = json.dumps({"scan_id": f"baseline-{i:06d}"}).encode()
            headers = signing.signed_headers([KEY], body, f"{i:032x}", int(time.time()))
            t0 = time.perf_counter()
            await client.post(f"{url}/baseline", content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
    return quantiles(latencies)


async def measure(
    args: argparse.Namespace,
    data: Path,
    name: str,
    cwd: Path,
    policy_text: str,
    servers: tuple[embedded.EmbeddedNats, embedded.EmbeddedS3],
    receiver: Receiver,
    offset: int,
) -> dict[str, object]:
    """One notifier (from the source tree `cwd`) through the warm-up, paced and burst phases, on its own stream, KV
    prefix and digests of the shared servers."""
    nats, s3 = servers
    root = f"bench{name.replace('-', '')}"
    nats_settings = NatsSettings(
        url=nats.url, user=nats.user, password=nats.password, subject_root=root, stream=root.upper(), kv_prefix=root
    )
    s3_settings = S3Settings(
        endpoint_url=s3.endpoint_url,
        bucket="podsweep-bench",
        access_key_id=s3.identity.access_key_id,
        secret_access_key=s3.identity.secret_access_key,
    )
    policy = data / f"policy-{name}.yaml"
    policy.write_text(policy_text)
    bus = await busmod.connect(nats_settings, "bench")
    await busmod.ensure_stream(bus)
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    n = args.events
    names = [
        (f"registry.example.com/bench/app@sha256:{offset + i:064x}", f"scan-{offset + i:07d}") for i in range(2 * n)
    ]
    t0 = time.perf_counter()
    events = await prepare(bus, store, names)
    # The zero-day storm of issue 22: `storm_workloads` workloads over `storm_digests` digests breach at once, so
    # a report (one S3 read, one workloads read) reaches several workloads.
    storm_events: dict[str, ReportStored] = {}
    per_digest, extra = divmod(args.storm_workloads, args.storm_digests)
    for i in range(args.storm_digests):
        storm_name = (
            f"registry.example.com/bench/storm@sha256:{offset + 5_000_000 + i:064x}",
            f"storm-{offset + i:07d}",
        )
        storm_events |= await prepare(bus, store, [storm_name], per_digest + (1 if i < extra else 0))
    prepare_s = time.perf_counter() - t0
    env = {
        **os.environ,
        "PODSWEEP_LOG_LEVEL": args.log_level,
        "PODSWEEP_LOG_FORMAT": "json",
        "PODSWEEP_CLUSTER": "bench",
        "PODSWEEP_NATS_URL": nats.url,
        "PODSWEEP_NATS_USER": nats.user,
        "PODSWEEP_NATS_PASSWORD": nats.password,
        "PODSWEEP_NATS_SUBJECT_ROOT": root,
        "PODSWEEP_NATS_STREAM": root.upper(),
        "PODSWEEP_NATS_KV_PREFIX": root,
        "PODSWEEP_S3_ENDPOINT_URL": s3.endpoint_url,
        "PODSWEEP_S3_BUCKET": "podsweep-bench",
        "PODSWEEP_S3_ACCESS_KEY_ID": s3.identity.access_key_id,
        "PODSWEEP_S3_SECRET_ACCESS_KEY": s3.identity.secret_access_key,
        "PODSWEEP_CONSUMER_CONCURRENCY": str(args.concurrency),
        "PODSWEEP_NOTIFIER_POLICY_FILE": str(policy),
        "PODSWEEP_NOTIFIER_OUTBOX_CONCURRENCY": str(args.concurrency),
        "BENCH_HOOK_KEY": KEY.decode(),
    }
    log = (data / f"notifier-{name}.log").open("wb")
    profile = (
        ["-m", "cProfile", "-o", str(args.profile / f"notifier-{name}.prof")]
        if args.profile is not None and args.py_spy is None
        else []
    )
    notifier = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
        [sys.executable, *profile, "-m", "podsweep", "run", "notifier"], cwd=cwd, env=env, stdout=log, stderr=log
    )
    try:
        # Warm up: one event through every path, so the consumers exist and connections are open.
        warm = dict(list(events.items())[:1])
        await phase(bus, receiver, warm, None, 60)
        rest = list(events.items())[1:]
        idle_from = cpu_s(notifier.pid)
        await asyncio.sleep(args.idle_s)  # what the process costs with nothing to do (timers, polls, heartbeats)
        idle_ms_per_s = (cpu_s(notifier.pid) - idle_from) * 1000 / args.idle_s
        cpu_before = cpu_s(notifier.pid)
        sys_before = cpu_s(notifier.pid, (12,))
        calls_before = syscalls(notifier.pid)
        sleeps_before = sleeps(notifier.pid)
        paced_from = time.perf_counter()
        load_before = load_average()
        spy = sample(args, name, notifier.pid) if args.py_spy_phase == "paced" else None
        paced = await phase(bus, receiver, dict(rest[: n - 1]), args.rate, 120)
        cpu_paced = cpu_s(notifier.pid)
        sys_paced = cpu_s(notifier.pid, (12,))
        calls_paced = syscalls(notifier.pid)
        sleeps_paced = sleeps(notifier.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
            spy.wait(60)
        paced_s = time.perf_counter() - paced_from
        burst = await phase(bus, receiver, dict(rest[n - 1 : 2 * n - 1]), None, 300)
        cpu_burst = cpu_s(notifier.pid)
        spy = sample(args, name, notifier.pid) if args.py_spy_phase == "storm" else None
        storm = await phase(bus, receiver, storm_events, None, 600, alerts=args.storm_workloads)
        cpu_storm = cpu_s(notifier.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        notifier.terminate()
        try:
            notifier.wait(20)
        except subprocess.TimeoutExpired:
            notifier.kill()
        await bus.close()
    return {
        "tree": str(cwd),
        "paced": paced,
        "burst": burst,
        # The notifier's own CPU (user + system) per alert received, at the paced rate and in the burst.
        "cpu_ms_per_alert_paced": round((cpu_paced - cpu_before) * 1000 / max(1, int(paced["received"])), 3),  # type: ignore[call-overload]
        "sys_cpu_ms_per_alert_paced": round((sys_paced - sys_before) * 1000 / max(1, int(paced["received"])), 3),  # type: ignore[call-overload]
        "idle_cpu_ms_per_s": round(idle_ms_per_s, 2),
        "syscalls_per_alert_paced": round((calls_paced - calls_before) / max(1, int(paced["received"])), 1),  # type: ignore[call-overload]
        "sleeps_per_alert_paced": round((sleeps_paced - sleeps_before) / max(1, int(paced["received"])), 1),  # type: ignore[call-overload]
        # The paced phase less what the process costs idle over the same time: the work alerts themselves cause.
        "cpu_ms_per_alert_paced_over_idle": round(
            ((cpu_paced - cpu_before) * 1000 - idle_ms_per_s * paced_s) / max(1, int(paced["received"])),  # type: ignore[call-overload]
            3,
        ),
        "cpu_ms_per_alert_burst": round((cpu_burst - cpu_paced) * 1000 / max(1, int(burst["received"])), 3),  # type: ignore[call-overload]
        "storm": storm,
        # The storm: CPU per alert (a workload told of a breach), and per report stored.
        "cpu_ms_per_alert_storm": round((cpu_storm - cpu_burst) * 1000 / max(1, int(storm["received"])), 3),  # type: ignore[call-overload]
        "cpu_ms_per_report_storm": round((cpu_storm - cpu_burst) * 1000 / max(1, args.storm_digests), 3),
        "prepare_s": round(prepare_s, 1),
        "load_average_1m": {"before": load_before, "after": load_average()},
    }


async def run(args: argparse.Namespace, data: Path) -> dict[str, object]:
    nats = embedded.start_nats(data / "nats")
    s3 = embedded.start_seaweedfs(data / "s3")
    runner: web.AppRunner | None = None
    try:
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        app.router.add_post("/baseline", lambda _: asyncio.sleep(0, web.Response(status=204)))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = embedded.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        hook = f'  - {{name: hook, kind: webhook, url: "{url}/hook", hmac_key: {{env: BENCH_HOOK_KEY}}'
        head = "version: 1\ndefaults: {threshold: {max_critical: 0}, destinations: [hook]}\ndestinations:\n"
        # Apples to apples: a rate high enough that nothing waits; then 10 messages/s, waiting alerts grouped.
        ungrouped = head + hook + ", rate_per_s: 1000, burst: 1000}\n"
        grouped = head + hook + ", rate_per_s: 10, burst: 10, group_alerts: true}\n"
        servers = (nats, s3)
        results: dict[str, object] = {}
        if args.compare_with is not None:
            old_policy = ungrouped if args.old_rate else head + hook + "}\n"
            results["old"] = await measure(args, data, "old", args.compare_with, old_policy, servers, receiver, 0)
        results["new"] = await measure(args, data, "new", REPO, ungrouped, servers, receiver, 10_000_000)
        if not args.skip_grouped:
            results["new_grouped"] = await measure(
                args, data, "new-grouped", REPO, grouped, servers, receiver, 20_000_000
            )
        base = await baseline(url, 500)
        new = results["new"]
        assert isinstance(new, dict)
        summary: dict[str, object] = {
            "bench": "alert_latency",
            "events_per_phase": args.events - 1,
            **results,
            "baseline_direct_post": base,
            "p50_ms": new["paced"]["p50_ms"],
            "p99_ms": new["paced"]["p99_ms"],
            "alerts_per_s": new["burst"]["alerts_per_s"],
            "cpu_ms_per_alert": new["cpu_ms_per_alert_paced"],
            "cpu_ms_per_alert_storm": new["cpu_ms_per_alert_storm"],
            "target": {"p50_ms": 50, "p99_ms": 250, "cpu_ms_per_alert": 1.0},
            "bad_signatures": receiver.bad_signatures,
            "duplicates": receiver.duplicates,
            "concurrency": args.concurrency,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        old = results.get("old")
        if isinstance(old, dict):
            summary["cpu_ms_per_alert_old"] = old["cpu_ms_per_alert_paced"]
            summary["cpu_ratio_old_to_new"] = round(
                old["cpu_ms_per_alert_paced"] / max(1e-9, new["cpu_ms_per_alert_paced"]), 2
            )
        return summary
    finally:
        if runner is not None:
            await runner.cleanup()
        if args.keep is not None:
            keep_logs(data, args.keep)
        s3.stop()
        nats.stop()


def sample(args: argparse.Namespace, name: str, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the notifier's on-CPU stacks through one phase only (`--py-spy-phase`)."""
    if args.py_spy is None or args.profile is None:
        return None
    out = args.profile / f"notifier-{name}-{args.py_spy_phase}.txt"
    return subprocess.Popen(
        [
            str(args.py_spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--gil",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def keep_logs(data: Path, into: Path) -> None:
    for log in data.glob("notifier-*.log"):
        (into / log.name).write_bytes(log.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000, help="events per phase (the first warms up)")
    parser.add_argument(
        "--rate", type=float, default=25.0, help="events per second in the paced phase (below capacity)"
    )
    parser.add_argument("--log-level", default="warning", help="the notifier's log level (info: per-event timings)")
    parser.add_argument("--keep", type=Path, default=None, help="copy the notifiers' logs into this directory")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="another source tree (e.g. a `git worktree` of main): its notifier runs the same phases first",
    )
    parser.add_argument(
        "--old-rate",
        action="store_true",
        help="give the --compare-with tree the same webhook rate as the new one (a tree that knows rate_per_s)",
    )
    parser.add_argument("--skip-grouped", action="store_true", help="skip the run at the default webhook rate")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds the idle CPU is measured over")
    parser.add_argument("--profile", type=Path, default=None, help="run the notifiers under cProfile, into this dir")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="with --profile: sample one phase with this py-spy binary (on-CPU stacks, raw) instead of cProfile",
    )
    parser.add_argument("--py-spy-phase", choices=("paced", "storm"), default="paced", help="the phase py-spy samples")
    parser.add_argument("--concurrency", type=int, default=8, help="notifier consumer and outbox concurrency")
    parser.add_argument("--storm-workloads", type=int, default=2000, help="workloads that breach at once in the storm")
    parser.add_argument("--storm-digests", type=int, default=300, help="the digests they run, one report each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="podsweep-bench-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
