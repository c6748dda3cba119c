"""Admission latency: AdmissionReview requests against `podsweep run admission` over HTTPS on loopback.

Real nats-server and SeaweedFS (embedded, in a temp dir) hold a stored index of N digests (default 10,000; a third
breach the policy and have a stored report with findings) and a tag sighting per digest. The gate is started as a
subprocess, and the time until it is ready (index, stream replay, findings of the breaching digests) is measured.
Then pods with two containers (one by tag, one by digest, random digests) are sent: closed loops at increasing
concurrency (throughput), then a paced phase at --rate requests/s (latency as the apiserver sees it at that load).
Baseline in the same run: the same client against a bare aiohttp HTTPS server answering a fixed allow (the floor
under the gate's work). The paced phase runs twice: with client and servers free to share both cores, then (when the
machine has two cores or more) with the servers pinned to the first core and this client to the second, as an
apiserver and a webhook run on different machines; the headline figures are the pinned ones. The client's own cyclic
GC is off while it measures (its pauses are not the gate's).
With --compare-with DIR, a second gate started from another source tree (an older commit) runs on the same servers
and data, and each paced phase runs this gate, that one, that one, this one (A B B A, each once first and once last),
each pass once the gates are idle: a before/after in one run.
Run: .venv/bin/python bench/admission.py [--digests 10000] [--requests 3000] [--rate 500] [--compare-with DIR].
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings
from podsweep.objectstore import ObjectStore
from schemas import storage, subjects
from schemas.events import ImageSeen, SeverityCounts, Workload
from schemas.index import DigestSummary, IndexedDigest, SummaryIndex
from schemas.report import Finding, Report
from tests.harness.admission import make_tls, pod, review

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"


def ref(i: int) -> str:
    return f"registry.bench/team/app-{i}@sha256:{i:064x}"


def tag(i: int) -> str:
    return f"registry.bench/team/app-{i}:1.{i % 7}"


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": round(at(0.5), 3), "p99_ms": round(at(0.99), 3), "max_ms": round(ordered[-1] * 1000, 3)}


async def seed(store: ObjectStore, bus: busmod.Bus, digests: int, findings: int) -> int:
    """The stored index, the reports of the breaching third, and one sighting per tag. Returns the report count."""
    now = datetime.now(UTC)
    entries: dict[str, IndexedDigest] = {}
    breaching = [i for i in range(digests) if i % 3 == 0]
    for i in range(digests):
        critical = 2 if i % 3 == 0 else 0
        counts = SeverityCounts(CRITICAL=critical, HIGH=findings - critical if critical else 0)
        summary = DigestSummary(
            digest_ref=ref(i),
            scan_id=f"scan-{i:08d}",
            finished_at=now - timedelta(hours=2),
            stored_at=now - timedelta(hours=2),
            counts=counts,
            fixable=counts,
            report_key=storage.latest_report_key(ref(i)),
            history_key=storage.history_report_key(ref(i), now - timedelta(hours=2)),
        )
        entries[f"{i:064x}"] = IndexedDigest(digest_ref=ref(i), images=[tag(i)], namespaces=[NAMESPACE], report=summary)
    await store.put(storage.SUMMARY_KEY, msgspec.json.encode(SummaryIndex(generated_at=now, digests=entries)))
    limit = asyncio.Semaphore(32)

    async def put_report(i: int) -> None:
        items = [
            Finding(
                id=f"CVE-2026-{i % 5000:04d}{n}",
                package=f"lib{n % 40}",
                installed_version=f"1.{n}.0",
                severity="CRITICAL" if n < 2 else "HIGH",
                fixed_version=f"1.{n}.1",
                fixable=True,
                cvss=9.1,
                title="bench finding " * 4,
            )
            for n in range(findings)
        ]
        counts = SeverityCounts(CRITICAL=2, HIGH=findings - 2)
        report = Report(
            digest_ref=ref(i),
            scan_id=f"scan-{i:08d}",
            source_format="v2",
            findings=items,
            counts=counts,
            fixable=counts,
        )
        async with limit:
            await store.put(storage.latest_report_key(ref(i)), msgspec.json.encode(report))

    await asyncio.gather(*(put_report(i) for i in breaching))
    for i in range(0, digests, 10):  # a tenth of the tags seen again on the stream (replayed at start)
        seen = ImageSeen(
            cluster="default",
            digest_ref=ref(i),
            image=tag(i),
            node="node-1",
            namespace=NAMESPACE,
            pod=f"app-{i}",
            container="app",
            container_kind="app",
            workload=Workload(kind="Deployment", name=f"app-{i}"),
            observed_at=now - timedelta(minutes=10),
        )
        await bus.publish(subjects.IMAGE_SEEN, seen, msg_id=f"seen-{i}")
    return len(breaching)


def bodies(digests: int, count: int) -> list[bytes]:
    rng = random.Random(7)
    out = []
    for n in range(count):
        a, b = rng.randrange(digests), rng.randrange(digests)
        obj = pod(f"bench-{n}", {"app": tag(a), "sidecar": ref(b)})
        out.append(json.dumps(review(obj, NAMESPACE, uid=f"00000000-0000-4000-8000-{n:012d}")).encode())
    return out


async def closed_loop(url: str, ctx: ssl.SSLContext, payloads: list[bytes], concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    queue = list(reversed(payloads))
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                    data = await response.read()
                latencies.append(time.perf_counter() - started)
                key = str(response.status)
                if response.status == 200:
                    key = "allowed" if b'"allowed":true' in data else "denied"
                statuses[key] = statuses.get(key, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "requests": len(latencies), "rps": round(len(latencies) / elapsed, 1)} | (
        quantiles(latencies) | {"answers": statuses}
    )


async def paced(url: str, ctx: ssl.SSLContext, payloads: list[bytes], rate: float) -> dict[str, Any]:
    """Open loop: request n starts at n / rate, whatever the previous ones are doing (as an apiserver would)."""
    gc.collect()
    gc.disable()
    try:
        return await _paced(url, ctx, payloads, rate)
    finally:
        gc.enable()


async def _paced(url: str, ctx: ssl.SSLContext, payloads: list[bytes], rate: float) -> dict[str, Any]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=64, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def warm() -> None:
            async with session.post(url, data=payloads[0]) as response:
                await response.read()

        # Open the pool's connections first, so the phase measures requests rather than TLS handshakes (an apiserver
        # keeps its connections to a webhook alive too).
        await asyncio.gather(*(warm() for _ in range(64)))

        async def one(body: bytes) -> None:
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
            latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        tasks = []
        for n, body in enumerate(payloads):
            delay = began + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    return {"rate": rate, "requests": len(latencies), "rps": round(len(latencies) / elapsed, 1)} | quantiles(latencies)


def serve_baseline(port: int, cert: str, key: str) -> None:
    """A bare HTTPS endpoint answering a fixed allow: what the client and TLS cost without the gate."""
    answer = json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": "x", "allowed": True}},
        separators=(",", ":"),
    ).encode()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/validate", handle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=context, print=None, access_log=None)


@dataclass(frozen=True)
class Other:
    """A second gate, from another source tree, measured beside this one."""

    process: asyncio.subprocess.Process
    url: str
    metrics_url: str


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (a figure the machine's other load does not inflate much)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settle(pids: list[int], timeout_s: float = 60) -> None:
    """Wait until these processes are nearly idle (under 10 % of a core over half a second): a phase must not start
    while a gate still publishes the audits of the last one (the closed loops leave thousands queued)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        before = sum(_cpu_s(pid) for pid in pids)
        await asyncio.sleep(0.5)
        if sum(_cpu_s(pid) for pid in pids) - before < 0.05:
            return


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return round(int(next(line.split()[1] for line in status if line.startswith("VmRSS"))) / 1024, 1)


async def server_histogram(metrics_url: str) -> dict[float, float]:
    """Cumulative bucket counts of podsweep_admission_request_seconds from the gate's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
        text = await response.text()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("podsweep_admission_request_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """p50/p99 of the gate's own handling time in a phase, as the upper bound of the bucket that holds it (ms)."""
    deltas = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = deltas[-1][1] if deltas else 0.0
    out: dict[str, float | None] = {}
    for name, q in (("server_p50_ms_at_most", 0.5), ("server_p99_ms_at_most", 0.99)):
        bound = next((le for le, n in deltas if total and n >= q * total), None)
        out[name] = None if bound is None or bound == float("inf") else bound * 1000
    return out


async def wait_ready(url: str, timeout_s: float, process: asyncio.subprocess.Process, log: Path) -> float:
    began = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - began < timeout_s:
            if process.returncode is not None:
                raise SystemExit(f"server exited with {process.returncode}: {_tail(log)}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return time.perf_counter() - began
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"not ready in {timeout_s} s: {_tail(log)}")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="podsweep-bench-admission-"))
    nats = embedded.start_nats(work)
    s3 = embedded.start_seaweedfs(work)
    processes: list[asyncio.subprocess.Process] = []
    try:
        nats_settings = NatsSettings(url=nats.url, user=nats.user, password=nats.password)
        s3_settings = S3Settings(
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.identity.access_key_id,
            secret_access_key=s3.identity.secret_access_key,
        )
        bus = await busmod.connect(nats_settings, "bench")
        await busmod.ensure_stream(bus)
        store = ObjectStore(s3_settings)
        await store.ensure_bucket()
        began = time.perf_counter()
        reports = await seed(store, bus, args.digests, args.findings)
        seed_s = time.perf_counter() - began
        await bus.close()
        tls = make_tls(work / "tls")
        ctx = ssl.create_default_context(cadata=tls.ca_pem.decode())
        gate_port, metrics_port, baseline_port = embedded.free_port(), embedded.free_port(), embedded.free_port()
        env = {
            **os.environ,
            "PODSWEEP_NATS_URL": nats.url,
            "PODSWEEP_NATS_USER": nats.user,
            "PODSWEEP_NATS_PASSWORD": nats.password,
            "PODSWEEP_S3_ENDPOINT_URL": s3.endpoint_url,
            "PODSWEEP_S3_ACCESS_KEY_ID": s3.identity.access_key_id,
            "PODSWEEP_S3_SECRET_ACCESS_KEY": s3.identity.secret_access_key,
            "PODSWEEP_TELEMETRY_METRICS_PORT": str(metrics_port),
            "PODSWEEP_ADMISSION_HOST": "127.0.0.1",
            "PODSWEEP_ADMISSION_PORT": str(gate_port),
            "PODSWEEP_ADMISSION_CERT_FILE": str(tls.cert_file),
            "PODSWEEP_ADMISSION_KEY_FILE": str(tls.key_file),
            "PODSWEEP_ADMISSION_DEFAULT_MODE": "enforce",
            "PODSWEEP_LOG_LEVEL": "warning",
        }
        log = work / "admission.log"
        with log.open("ab") as out:
            gate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "podsweep", "run", "admission", cwd=REPO, env=env, stdout=out, stderr=out
            )
        processes.append(gate)
        load_s = await wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", 300, gate, log)
        other: Other | None = None
        if args.compare_with:
            # The same gate from another source tree (e.g. `git archive <commit>`), on the same servers and data.
            other_port, other_metrics = embedded.free_port(), embedded.free_port()
            other_env = env | {
                "PODSWEEP_ADMISSION_PORT": str(other_port),
                "PODSWEEP_TELEMETRY_METRICS_PORT": str(other_metrics),
            }
            other_log = work / "admission-other.log"
            with other_log.open("ab") as out:
                other_process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "podsweep",
                    "run",
                    "admission",
                    cwd=args.compare_with,
                    env=other_env,
                    stdout=out,
                    stderr=out,
                )
            processes.append(other_process)
            await wait_ready(f"http://127.0.0.1:{other_metrics}/readyz", 300, other_process, other_log)
            other = Other(
                other_process,
                f"https://127.0.0.1:{other_port}/validate",
                f"http://127.0.0.1:{other_metrics}/metrics",
            )
        with (work / "baseline.log").open("ab") as out:
            baseline = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--serve-baseline",
                str(baseline_port),
                str(tls.cert_file),
                str(tls.key_file),
                stdout=out,
                stderr=out,
            )
        processes.append(baseline)
        url = f"https://127.0.0.1:{gate_port}/validate"
        base_url = f"https://127.0.0.1:{baseline_port}/validate"
        payloads = bodies(args.digests, args.requests)
        for _ in range(100):  # the baseline server is up when it answers
            try:
                await closed_loop(base_url, ctx, payloads[:1], 1)
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        await closed_loop(url, ctx, payloads[:200], 4)  # warm-up
        if other is not None:
            await closed_loop(other.url, ctx, payloads[:200], 4)
        phases = []
        for concurrency in args.concurrency:
            cpu = _cpu_s(gate.pid)
            gate_phase = await closed_loop(url, ctx, payloads, concurrency)
            gate_phase["server_cpu_ms_per_request"] = round((_cpu_s(gate.pid) - cpu) / len(payloads) * 1000, 3)
            cpu = _cpu_s(baseline.pid)
            base_phase = await closed_loop(base_url, ctx, payloads, concurrency)
            base_phase["server_cpu_ms_per_request"] = round((_cpu_s(baseline.pid) - cpu) / len(payloads) * 1000, 3)
            phases.append({"gate": gate_phase, "baseline": base_phase})
            print(
                f"concurrency {concurrency:>3}: gate {gate_phase['rps']:>7} rps p50 {gate_phase['p50_ms']} ms "
                f"p99 {gate_phase['p99_ms']} ms cpu {gate_phase['server_cpu_ms_per_request']} ms/req | "
                f"baseline {base_phase['rps']:>7} rps p99 {base_phase['p99_ms']} ms "
                f"cpu {base_phase['server_cpu_ms_per_request']} ms/req",
                file=sys.stderr,
            )
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
        runs: dict[str, dict[str, Any]] = {}
        gates = [gate.pid] + ([other.process.pid] if other is not None else [])

        async def measure(target: str, metrics: str, pid: int) -> dict[str, Any]:
            await settle(gates)
            before, cpu = await server_histogram(metrics), _cpu_s(pid)
            phase = await paced(target, ctx, payloads, args.rate)
            phase["server_cpu_ms_per_request"] = round((_cpu_s(pid) - cpu) / len(payloads) * 1000, 3)
            return phase | bucket_quantiles(before, await server_histogram(metrics))

        for placement in ("shared", "pinned") if pin else ("shared",):
            if placement == "pinned":
                for process in processes:
                    os.sched_setaffinity(process.pid, {0})
                os.sched_setaffinity(0, {1})
            steady = await measure(url, metrics_url, gate.pid)
            if other is not None:
                # A B B A: whichever goes first or second in a phase, both gates get that place once.
                compared = await measure(other.url, other.metrics_url, other.process.pid)
                compared["again"] = await measure(other.url, other.metrics_url, other.process.pid)
                steady["again"] = await measure(url, metrics_url, gate.pid)
                steady["compared_with"] = {"tree": args.compare_with} | compared
                for name, first, second in (
                    ("gate", steady, steady["again"]),
                    (args.compare_with, compared, compared["again"]),
                ):
                    print(
                        f"paced {args.rate} rps, {placement} cores: {name} p99 {first['p99_ms']} / {second['p99_ms']} ms "
                        f"(server side p99 <= {first['server_p99_ms_at_most']} / {second['server_p99_ms_at_most']} ms, "
                        f"cpu {first['server_cpu_ms_per_request']} / {second['server_cpu_ms_per_request']} ms/req)",
                        file=sys.stderr,
                    )
            await settle(gates)
            steady_base = await paced(base_url, ctx, payloads, args.rate)
            steady["baseline_p50_ms"], steady["baseline_p99_ms"] = steady_base["p50_ms"], steady_base["p99_ms"]
            runs[placement] = steady
            print(
                f"paced {args.rate} rps, {placement} cores: gate p50 {steady['p50_ms']} ms p99 {steady['p99_ms']} ms "
                f"(server side p99 <= {steady['server_p99_ms_at_most']} ms) | "
                f"baseline p50 {steady_base['p50_ms']} ms p99 {steady_base['p99_ms']} ms",
                file=sys.stderr,
            )
        steady = runs["pinned" if pin else "shared"]
        rss_mb = _rss_mb(gate.pid)
        return {
            "digests": args.digests,
            "requests": steady["requests"],
            "rps": steady["rps"],
            "p50_ms": steady["p50_ms"],
            "p99_ms": steady["p99_ms"],
            "max_ms": steady["max_ms"],
            "server_p50_ms_at_most": steady["server_p50_ms_at_most"],
            "server_p99_ms_at_most": steady["server_p99_ms_at_most"],
            "server_cpu_ms_per_request": steady["server_cpu_ms_per_request"],
            "baseline_p50_ms": steady["baseline_p50_ms"],
            "baseline_p99_ms": steady["baseline_p99_ms"],
            "placement": "pinned" if pin else "shared",
            "compared_p99_ms": steady["compared_with"]["p99_ms"] if other is not None else None,
            "compared_server_p99_ms_at_most": (
                steady["compared_with"]["server_p99_ms_at_most"] if other is not None else None
            ),
            "paced": runs,
            "reports_with_findings": reports,
            "findings_per_report": args.findings,
            "seed_s": round(seed_s, 1),
            "view_load_s": round(load_s, 2),
            "gate_rss_mb": rss_mb,
            "closed_loop": phases,
            "load_average": os.getloadavg()[0],
            "cores": os.cpu_count(),
        }
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
        s3.stop()
        nats.stop()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-baseline":
        serve_baseline(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=10000)
    parser.add_argument("--findings", type=int, default=30, help="findings per breaching report")
    parser.add_argument("--requests", type=int, default=3000, help="requests per phase")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s of the paced phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--no-pin", action="store_true", help="only the paced phase with shared cores")
    parser.add_argument(
        "--compare-with",
        metavar="DIR",
        help="also run the gate from this source tree (e.g. `git archive <commit> | tar -x -C DIR`) in each paced "
        "phase, right after this one's",
    )
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result))
