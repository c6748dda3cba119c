"""Who runs it: `podsweep cve` (its own process, end to end against a real SeaweedFS) and the parser's in-memory lookup,
over a generated index of 10,000 digests, 50,000 workloads and 200,000 findings; side by side, the baseline of
scanning every digest's stored report for the id (what jq over every VulnerabilityReport does), from S3 and from
memory.

With --compare-with DIR, the `podsweep cve` of another source tree (e.g. `git worktree add DIR main`) answers the
same queries against the same bucket, each query old then new, so both meet the same load: its figures are the
`old_`-prefixed keys of the same JSON line. The CLI runs with bytecode caching on (as an installed package does), after
one warm-up run per tree.

Run: .venv/bin/python bench/cve_query.py [--digests N] [--cli-runs N] [--compare-with DIR]. The last line is one JSON
object, with the load average, since the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep import embedded
from podsweep.config import S3Settings
from podsweep.objectstore import ObjectStore
from schemas import storage
from schemas.events import Severity, Workload
from schemas.index import DigestPostings, PackageVersion, PostedVuln
from schemas.report import Finding, Report
from schemas.state import DigestWorkloads, WorkloadRun
from services.parser.vulnindex import VulnIndex

SEVERITIES: tuple[Severity, ...] = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
T0 = datetime(2026, 12, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class World(msgspec.Struct):
    postings: dict[str, DigestPostings]
    workloads: dict[str, DigestWorkloads]
    nodes: dict[str, list[str]]


def generate(digests: int, workloads: int, findings: int, seed: int = 7) -> World:
    """Digests with skewed CVE popularity (a few ids in thousands of digests, most in a handful), packages from a
    shared universe, and workloads spread over 200 namespaces."""
    rng = random.Random(seed)
    cve_ids = [f"CVE-{2015 + i % 11}-{10000 + i}" for i in range(20_000)]
    cve_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 0.85 for rank in range(len(cve_ids))))
    names = [f"lib{i}" for i in range(5_000)]
    name_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 0.7 for rank in range(len(names))))
    hexes = [f"{rng.getrandbits(256):064x}" for _ in range(digests)]
    per_digest = [findings // digests] * digests
    for i in range(findings - sum(per_digest)):
        per_digest[i] += 1
    runs_left = workloads
    world = World(postings={}, workloads={}, nodes={})
    for n, hex_ in enumerate(hexes):
        ref = f"registry.example.com/team{n % 97}/app{n}@sha256:{hex_}"
        vulns: dict[tuple[str, str], PostedVuln] = {}
        while len(vulns) < per_digest[n]:
            cve = rng.choices(cve_ids, cum_weights=cve_weights)[0]
            package = rng.choices(names, cum_weights=name_weights)[0]
            vulns[(cve, package)] = PostedVuln(
                id=cve,
                package=package,
                installed_version=f"1.{rng.randrange(30)}.{rng.randrange(10)}",
                fixed_version=f"1.{rng.randrange(30, 40)}.0",
                severity=rng.choice(SEVERITIES),
                pkg_type="deb",
                title=f"{cve} in {package}",
            )
        packages = {v.package: PackageVersion(v.package, v.installed_version, "deb") for v in vulns.values()}
        for name in rng.choices(names, cum_weights=name_weights, k=30):
            packages.setdefault(name, PackageVersion(name, f"2.{rng.randrange(20)}", "deb"))
        world.postings[hex_] = DigestPostings(
            digest_ref=ref,
            scan_id=f"psw-{n:012x}",
            finished_at=T0 + timedelta(minutes=n),
            sbom=True,
            vulns=sorted(vulns.values(), key=lambda v: (v.id, v.package)),
            packages=list(packages.values()),
        )
        count = runs_left // (digests - n)
        runs_left -= count
        world.workloads[hex_] = DigestWorkloads(
            digest_ref=ref,
            runs=[
                WorkloadRun(
                    namespace=f"ns-{(n + k) % 200}",
                    workload=Workload("Deployment", f"app{n}-w{k}"),
                    image=ref.split("@")[0] + ":v1",
                    cluster="prod",
                    containers=["app"],
                    last_seen_at=T0,
                )
                for k in range(count)
            ],
        )
        world.nodes[hex_] = [f"node-{rng.randrange(100)}" for _ in range(2)]
    return world


def report_of(doc: DigestPostings) -> Report:
    """What the baseline reads per digest: the stored report, its findings only."""
    findings = [
        Finding(
            id=v.id,
            package=v.package,
            installed_version=v.installed_version,
            severity=v.severity,
            fixed_version=v.fixed_version,
            title=v.title,
        )
        for v in doc.vulns
    ]
    return Report(digest_ref=doc.digest_ref, scan_id=doc.scan_id, source_format="v2", findings=findings)


async def bounded(calls: list[Coroutine[Any, Any, Any]], limit: int = 32) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Coroutine[Any, Any, Any]) -> Any:
        async with gate:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


def baseline_memory(reports: list[bytes], cve: str) -> int:
    """jq over every VulnerabilityReport, in memory: decode each report and keep the digests with the id."""
    hits = 0
    for data in reports:
        doc = json.loads(data)
        if any(f["id"] == cve for f in doc["findings"]):
            hits += 1
    return hits


async def baseline_s3(store: ObjectStore, cve: str, reports: int) -> tuple[float, int]:
    """The same over the bucket: list every digest's latest report, read each, look for the id."""
    started = time.perf_counter()
    keys = [k for k in await store.list_keys("reports/sha256/") if k.endswith("/latest.json")]
    assert len(keys) == reports, len(keys)
    bodies = await bounded([store.get(k) for k in keys])
    hits = baseline_memory(bodies, cve)
    return time.perf_counter() - started, hits


def run_cli(env: dict[str, str], root: Path, *args: str) -> tuple[float, int, str]:
    """`podsweep cve …` of the source tree at `root`, in its own process."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "podsweep_cli", *args],
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=False,
        cwd=root,
    )
    return time.perf_counter() - started, proc.returncode, proc.stdout


class CliTimes(msgspec.Struct):
    startup: list[float] = []
    typical: list[float] = []
    wide: list[tuple[str, float, int]] = []
    package: list[float] = []


def cli_figures(times: CliTimes, wide: str, widest: str, prefix: str) -> dict[str, object]:
    wide_s = [s for cve, s, _ in times.wide if cve == wide]
    widest_s = [s for cve, s, _ in times.wide if cve == widest]
    return {
        f"{prefix}cli_p50_s": round(statistics.median(times.typical), 3),
        f"{prefix}cli_p99_s": round(percentile(times.typical, 0.99), 3),
        f"{prefix}cli_package_p50_s": round(statistics.median(times.package), 3),
        f"{prefix}cli_imports_p50_s": round(statistics.median(times.startup), 3),
        f"{prefix}cli_wide_p50_s": round(statistics.median(wide_s), 3),
        f"{prefix}cli_widest_p50_s": round(statistics.median(widest_s), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--digests", type=int, default=10_000)
    parser.add_argument("--workloads", type=int, default=50_000)
    parser.add_argument("--findings", type=int, default=200_000)
    parser.add_argument("--cli-runs", type=int, default=20)
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--compare-with", type=Path, help="another source tree whose `podsweep cve` runs alongside")
    args = parser.parse_args()
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32))

    started = time.perf_counter()
    world = generate(args.digests, args.workloads, args.findings)
    generate_s = time.perf_counter() - started

    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    model = VulnIndex()
    for hex_, doc in world.postings.items():
        model.apply_postings(hex_, doc)
        model.apply_workloads(hex_, world.workloads[hex_])
        model.apply_running(hex_, world.nodes[hex_], None)
    build_s = time.perf_counter() - started
    model_rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    cve_dirty, package_dirty, digest_dirty, _ = model.take_dirty()
    reach = Counter({cve: len(by_digest) for cve, by_digest in model.cves.items()})
    # Typical: ids in a handful of digests. Wide: the id nearest 1,000 digests (a log4shell), and the widest.
    typical = [cve for cve, n in reach.items() if 2 <= n <= 20][:200]
    wide = min(reach, key=lambda cve: abs(reach[cve] - 1000))
    widest = reach.most_common(1)[0][0]
    rare_packages = [name for name, d in model.packages.items() if 2 <= len(d) <= 20][:50]

    lookups = []
    for cve in typical * 5:
        t = time.perf_counter()
        answer = model.lookup_cve(cve)
        lookups.append((time.perf_counter() - t) * 1000)
        assert answer.affected
    package_lookups = []
    for name in rare_packages * 5:
        t = time.perf_counter()
        model.lookup_package(name, "1")
        package_lookups.append((time.perf_counter() - t) * 1000)
    wide_lookups = []
    for _ in range(10):
        t = time.perf_counter()
        wide_rows = len(model.lookup_cve(wide).affected)
        wide_lookups.append((time.perf_counter() - t) * 1000)

    reports = [msgspec.json.encode(report_of(doc)) for doc in world.postings.values()]
    memory_base = []
    for _ in range(args.baseline_runs):
        t = time.perf_counter()
        assert baseline_memory(reports, typical[0]) == reach[typical[0]]
        memory_base.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as work:
        s3 = embedded.start_seaweedfs(Path(work) / "s3")
        try:
            settings = S3Settings(
                endpoint_url=s3.endpoint_url,
                bucket="podsweep-bench",
                access_key_id=s3.identity.access_key_id,
                secret_access_key=s3.identity.secret_access_key,
                path_style=True,
            )
            store = ObjectStore(settings)
            await store.ensure_bucket()
            t = time.perf_counter()
            writes = [store.put(storage.cve_shard_key(s), msgspec.json.encode(model.cve_shard(s))) for s in cve_dirty]
            writes += [
                store.put(storage.package_shard_key(s), msgspec.json.encode(model.package_shard(s)))
                for s in package_dirty
            ]
            writes += [
                store.put(storage.digest_shard_key(s), msgspec.json.encode(model.digest_shard(s))) for s in digest_dirty
            ]
            await bounded(writes)
            write_index_s = time.perf_counter() - t
            shard_bytes = {
                "cve": statistics.mean(len(msgspec.json.encode(model.cve_shard(s))) for s in list(cve_dirty)[:200]),
                "digest": statistics.mean(
                    len(msgspec.json.encode(model.digest_shard(s))) for s in list(digest_dirty)[:50]
                ),
            }
            await bounded(
                [
                    store.put(storage.latest_report_key(doc.digest_ref), body)
                    for doc, body in zip(world.postings.values(), reports, strict=True)
                ]
            )

            s3_base = []
            for _ in range(args.baseline_runs):
                seconds, hits = await baseline_s3(store, typical[0], len(reports))
                assert hits == reach[typical[0]]
                s3_base.append(seconds)

            env = {
                **os.environ,
                "PODSWEEP_S3_ENDPOINT_URL": settings.endpoint_url,
                "PODSWEEP_S3_BUCKET": settings.bucket,
                "PODSWEEP_S3_ACCESS_KEY_ID": settings.access_key_id,
                "PODSWEEP_S3_SECRET_ACCESS_KEY": settings.secret_access_key,
                "PODSWEEP_S3_PATH_STYLE": "true",
                "PODSWEEP_DATA_DIR": str(Path(work) / "no-up-here"),
            }
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: the modules' bytecode is cached
            trees = {"": ROOT} if args.compare_with is None else {"old_": args.compare_with.resolve(), "": ROOT}
            for root in trees.values():  # the warm-up writes each tree's bytecode
                assert (await asyncio.to_thread(run_cli, env, root, "cve", typical[0], "--json"))[1] == 0
            # The floor: the interpreter alone, and `podsweep cve` refusing a malformed id (its imports, no S3).
            python_floor = []
            for _ in range(5):
                t = time.perf_counter()
                await asyncio.to_thread(subprocess.run, [sys.executable, "-c", "pass"], check=True)
                python_floor.append(time.perf_counter() - t)
            times = {prefix: CliTimes() for prefix in trees}
            for _ in range(5):
                for prefix, root in trees.items():
                    seconds, code, _ = await asyncio.to_thread(run_cli, env, root, "cve", "CVE-1")
                    assert code == 2
                    times[prefix].startup.append(seconds)
            for cve in typical[: args.cli_runs]:
                for prefix, root in trees.items():
                    seconds, code, out = await asyncio.to_thread(run_cli, env, root, "cve", cve, "--json")
                    assert code == 0, (code, out)
                    assert len(json.loads(out)["affected"]) == len(model.lookup_cve(cve).affected)
                    times[prefix].typical.append(seconds)
            for cve in (wide, widest) * 3:
                answers = set()
                for prefix, root in trees.items():
                    seconds, code, out = await asyncio.to_thread(run_cli, env, root, "cve", cve, "--json")
                    assert code == 0
                    times[prefix].wide.append((cve, seconds, len(json.loads(out)["affected"])))
                    answers.add(out)
                assert len(answers) == 1, "the two trees answered differently"
            for name in rare_packages[: args.cli_runs // 2]:
                for prefix, root in trees.items():
                    seconds, code, out = await asyncio.to_thread(run_cli, env, root, "cve", "--package", name, "--json")
                    assert code == 0
                    times[prefix].package.append(seconds)
            missing = await asyncio.to_thread(run_cli, env, ROOT, "cve", "CVE-2099-99999")
            assert missing[1] == 1
        finally:
            s3.stop()

    cli = times[""].typical
    result: dict[str, object] = {
        "digests": args.digests,
        "workloads": sum(len(w.runs) for w in world.workloads.values()),
        "findings": sum(len(p.vulns) for p in world.postings.values()),
        "cves": len(model.cves),
        "package_names": len(model.packages),
        **{key: value for prefix in trees for key, value in cli_figures(times[prefix], wide, widest, prefix).items()},
        "python_startup_p50_s": round(statistics.median(python_floor), 3),
        "cli_wide_digests": reach[wide],
        "cli_wide_rows": next(rows for cve, _, rows in times[""].wide if cve == wide),
        "cli_widest_digests": reach[widest],
        "lookup_p50_ms": round(statistics.median(lookups), 4),
        "lookup_p99_ms": round(percentile(lookups, 0.99), 4),
        "package_lookup_p50_ms": round(statistics.median(package_lookups), 4),
        "lookup_wide_p50_ms": round(statistics.median(wide_lookups), 2),
        "lookup_wide_rows": wide_rows,
        "baseline_s3_scan_p50_s": round(statistics.median(s3_base), 3),
        "baseline_memory_scan_p50_s": round(statistics.median(memory_base), 3),
        "ratio_cli_vs_s3_scan": round(statistics.median(cli) / statistics.median(s3_base), 4),
        "ratio_lookup_vs_memory_scan": round(statistics.median(lookups) / 1000 / statistics.median(memory_base), 6),
        "model_build_s": round(build_s, 2),
        "model_rss_mb": round(model_rss_mb),
        "generate_s": round(generate_s, 2),
        "write_index_s": round(write_index_s, 2),
        "index_objects": len(cve_dirty) + len(package_dirty) + len(digest_dirty),
        "cve_shard_bytes_mean": round(shard_bytes["cve"]),
        "digest_shard_bytes_mean": round(shard_bytes["digest"]),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
