"""What the index's search adds to a flush: building and encoding index/search.json beside index/summary.json (the
baseline: what every flush already writes), with synthetic digests that share their vulnerability ids as images
built on a few base images do; and the parser's memory for the ids, interned as IndexModel keeps them or not.

`search_json_cold_s` is the first flush of a parser (every digest's entry built); `search_json_s` a later flush,
where only the digests that changed are built again (none here: the cost that every flush pays).

Run: .venv/bin/python bench/search_index.py [--digests N] [--ids-per-digest K]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import storage
from schemas.events import SeverityCounts, Workload
from schemas.index import DigestSummary
from schemas.state import DigestWorkloads, WorkloadRun
from services.parser.index import IndexModel

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
encoder = msgspec.json.Encoder()


def world(digests: int, ids_per_digest: int, pool: int, seed: int) -> tuple[list[DigestSummary], list[DigestWorkloads]]:
    """Digests over 200 namespaces, 1 to 4 workloads each; each digest's ids drawn from one of 20 base images' sets
    (shared) plus a few of its own."""
    rng = random.Random(seed)
    ids = [f"CVE-20{rng.randint(10, 26)}-{n:05d}" for n in range(pool)]
    bases = [rng.sample(ids, ids_per_digest) for _ in range(20)]
    summaries, workloads = [], []
    for n in range(digests):
        hex_ = hashlib.sha256(f"d{n}".encode()).hexdigest()
        ref = f"registry.example.com/team-{n % 97}/app-{n}@sha256:{hex_}"
        own = rng.sample(ids, max(1, ids_per_digest // 10))
        # Decoded from JSON as the indexer does: fresh strings per summary, not the pool's.
        doc = msgspec.json.decode(json.dumps(sorted(set(rng.choice(bases)[: ids_per_digest - len(own)] + own))))
        summaries.append(
            DigestSummary(
                digest_ref=ref,
                scan_id=f"psw-{n:012x}",
                finished_at=T0,
                stored_at=T0,
                counts=SeverityCounts(CRITICAL=n % 3, HIGH=n % 7, MEDIUM=ids_per_digest),
                report_key=storage.latest_report_key(ref),
                history_key=storage.history_report_key(ref, T0),
                vulnerability_ids=doc,
            )
        )
        runs = [
            WorkloadRun(
                namespace=f"ns-{(n + k) % 200}",
                workload=Workload("Deployment", f"app-{n}-{k}"),
                image=f"registry.example.com/team-{n % 97}/app-{n}:1.{k}",
            )
            for k in range(1 + n % 4)
        ]
        workloads.append(DigestWorkloads(digest_ref=ref, runs=runs))
    return summaries, workloads


def model_of(summaries: list[DigestSummary], workloads: list[DigestWorkloads]) -> IndexModel:
    model = IndexModel()
    for n, (summary, doc) in enumerate(zip(summaries, workloads, strict=True)):
        hex_ = summary.digest_ref.split(":")[1]
        model.apply_summary(hex_, summary, 2 * n + 1)
        model.apply_workloads(hex_, doc, 2 * n + 2)
    return model


def best_of(rounds: int, run: Callable[[], bytes]) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(rounds):
        gc.collect()
        started = time.perf_counter()
        size = len(run())
        times.append(time.perf_counter() - started)
    return min(times), size


def ids_memory(summaries: list[DigestSummary], intern: bool) -> int:
    """Bytes the id lists take when held as decoded (one string per digest and id) or interned (IndexModel)."""
    raw = [encoder.encode(s.vulnerability_ids) for s in summaries]
    gc.collect()
    tracemalloc.start()
    held = [msgspec.json.decode(r, type=list[str]) for r in raw]
    if intern:
        held = [[sys.intern(i) for i in ids] for ids in held]
    gc.collect()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held
    return size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--digests", type=int, default=10_000)
    parser.add_argument("--ids-per-digest", type=int, default=100)
    parser.add_argument("--pool", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    summaries, workloads = world(args.digests, args.ids_per_digest, args.pool, seed=1)
    model = model_of(summaries, workloads)
    summary_s, summary_bytes = best_of(args.rounds, lambda: encoder.encode(model.summary_index(T0, model.revisions)))
    cold_s, _ = best_of(1, lambda: encoder.encode(model.search_index(T0)))
    search_s, search_bytes = best_of(args.rounds, lambda: encoder.encode(model.search_index(T0)))
    decoded = ids_memory(summaries, intern=False)
    interned = ids_memory(summaries, intern=True)
    print(
        f"{args.digests} digests, {args.ids_per_digest} ids each: summary.json {summary_bytes / 1e6:.1f} MB in "
        f"{summary_s * 1000:.0f} ms; search.json {search_bytes / 1e6:.1f} MB in {search_s * 1000:.0f} ms "
        f"({cold_s * 1000:.0f} ms the first time); "
        f"ids in memory {decoded / 1e6:.1f} MB decoded, {interned / 1e6:.1f} MB interned"
    )
    result = {
        "digests": args.digests,
        "ids_per_digest": args.ids_per_digest,
        "summary_json_s": round(summary_s, 4),
        "summary_json_bytes": summary_bytes,
        "search_json_cold_s": round(cold_s, 4),
        "search_json_s": round(search_s, 4),
        "search_json_bytes": search_bytes,
        "ratio_s": round(search_s / summary_s, 2),
        "ids_memory_decoded_bytes": decoded,
        "ids_memory_interned_bytes": interned,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
