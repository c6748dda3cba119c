"""Parse+normalize throughput on the largest real Trivy reports: podsweep vs json.loads and an equivalent dict walk.

Both sides do the same work per report (decode; every vulnerability to a finding with best CVSS, fixable, the same
string checks; counts by severity; failed misconfigurations; secrets) and must agree on the counts.
Run: .venv/bin/python bench/parse.py [--rounds N]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podsweep.reports import normalize

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "trivy"
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
NOT_FIXABLE = {"will_not_fix", "fix_deferred", "end_of_life", "not_affected"}


def baseline(data: bytes) -> dict[str, Any]:
    """The obvious way: json.loads, then walk the dicts doing what normalize does."""
    doc = json.loads(data)
    results = doc if isinstance(doc, list) else (doc or {}).get("Results") or []
    findings = []
    counts = dict.fromkeys(SEVERITIES, 0)
    fixable = dict.fromkeys(SEVERITIES, 0)
    misconfigurations: list[dict[str, Any]] = []
    secrets: list[dict[str, Any]] = []
    for result in results:
        target = result.get("Target", "")
        for vuln in result.get("Vulnerabilities") or []:
            best, vector = -1.0, ""
            for source in (vuln.get("CVSS") or {}).values():
                for score_key, vector_key in (
                    ("V40Score", "V40Vector"),
                    ("V3Score", "V3Vector"),
                    ("V2Score", "V2Vector"),
                ):
                    score = source.get(score_key)
                    if isinstance(score, (int, float)) and best < score <= 10.0:
                        best, vector = float(score), source.get(vector_key, "")
            severity = vuln.get("Severity", "UNKNOWN")
            severity = severity if severity in counts else "UNKNOWN"
            fixed, status = vuln.get("FixedVersion", ""), vuln.get("Status", "")
            finding = {
                "id": vuln["VulnerabilityID"],
                "package": vuln.get("PkgName", ""),
                "installed_version": vuln.get("InstalledVersion", ""),
                "fixed_version": fixed,
                "severity": severity,
                "status": status,
                "fixable": bool(fixed) and status not in NOT_FIXABLE,
                "cvss": best if best >= 0 else None,
                "cvss_vector": vector,
                "title": vuln.get("Title", ""),
                "url": vuln.get("PrimaryURL", ""),
                "target": target,
                "pkg_path": vuln.get("PkgPath", ""),
                "purl": (vuln.get("PkgIdentifier") or {}).get("PURL", ""),
                "layer": (vuln.get("Layer") or {}).get("DiffID", ""),
            }
            strings = "".join(v for v in finding.values() if isinstance(v, str))
            if not strings.isprintable():
                finding = {
                    k: v.translate(normalize._TEXT_DROP) if isinstance(v, str) else v for k, v in finding.items()
                }
            findings.append(finding)
            counts[severity] += 1
            fixable[severity] += finding["fixable"]
        misconfigurations.extend(
            m for m in result.get("Misconfigurations") or [] if m.get("Status", "FAIL") in ("FAIL", "")
        )
        secrets.extend(
            {"rule_id": s.get("RuleID", ""), "match": s.get("Match", "")} for s in result.get("Secrets") or []
        )
    return {"findings": findings, "counts": counts, "fixable": fixable, "misc": misconfigurations, "secrets": secrets}


def best_seconds(fns: list[Callable[[bytes], object]], data: bytes, rounds: int) -> list[float]:
    """Fastest of `rounds` runs of each, interleaved: the machine is shared, so both sides see the same
    disturbances, and the minimum is the least disturbed run."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for index, fn in enumerate(fns):
            start = time.perf_counter()
            fn(data)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--min-bytes", type=int, default=1_000_000, help="Use fixtures at least this large.")
    args = parser.parse_args()

    files = sorted((p for p in FIXTURES.glob("*.json") if p.stat().st_size >= args.min_bytes), key=lambda p: p.name)
    if not files:
        raise SystemExit(f"no fixture of at least {args.min_bytes} bytes under {FIXTURES}")
    gc.collect()
    total_bytes = 0
    podsweep_seconds = baseline_seconds = 0.0
    rows = []
    for path in files:
        data = path.read_bytes()
        ours, theirs = normalize.parse(data), baseline(data)
        if len(ours.findings) != len(theirs["findings"]) or msgspec.structs.asdict(ours.counts) != theirs["counts"]:
            raise SystemExit(f"{path.name}: podsweep and the baseline disagree on the counts")
        fast, slow = best_seconds([normalize.parse, baseline], data, args.rounds)
        total_bytes += len(data)
        podsweep_seconds += fast
        baseline_seconds += slow
        rows.append((path.name, len(data), len(ours.findings), fast, slow))

    print(f"{'fixture':45} {'MB':>6} {'findings':>8} {'podsweep MB/s':>14} {'baseline MB/s':>14} {'ratio':>6}")
    for name, size, findings, fast, slow in rows:
        print(
            f"{name:45} {size / 1e6:6.2f} {findings:8d} {size / fast / 1e6:14.0f} {size / slow / 1e6:14.0f} "
            f"{slow / fast:6.1f}"
        )
    podsweep_mb_s = total_bytes / podsweep_seconds / 1e6
    baseline_mb_s = total_bytes / baseline_seconds / 1e6
    summary = {
        "bench": "parse",
        "fixtures": [name for name, *_ in rows],
        "bytes": total_bytes,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "msgspec": msgspec.__version__,
        "podsweep_mb_s": round(podsweep_mb_s, 1),
        "baseline_mb_s": round(baseline_mb_s, 1),
        "ratio": round(podsweep_mb_s / baseline_mb_s, 2),
        "target_mb_s": 300,
        "target_ratio": 3,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
