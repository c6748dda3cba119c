"""Writes the JSON Schema of every event and stored document, for subscribers in other languages."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from schemas import admission, alerts, events, index, report, state

JSON_DIR = Path(__file__).parent / "json"

# File stem -> type. Event stems are their subject names (relative to the root).
DOCUMENTS: dict[str, Any] = {
    "image.seen": events.ImageSeen,
    "image.gone": events.ImageGone,
    "scan.started": events.ScanStarted,
    "scan.completed": events.ScanCompleted,
    "scan.failed": events.ScanFailed,
    "report.stored": events.ReportStored,
    "report.quarantined": events.ReportQuarantined,
    "report.reached": events.ReportReached,
    "alert.sent": events.AlertSent,
    "alert.failed": events.AlertSent,  # the same audit record with outcome "failed"
    "dead": events.DeadLetter,
    "rescan.requested": events.RescanRequested,
    "rescan.accepted": events.RescanAccepted,
    "db.updated": events.DbUpdated,
    "admission.decided": admission.AdmissionDecided,  # the admission gate's audit of a warn/deny/bypass
    "report": report.Report,  # reports/sha256/<hex>/latest.json
    "state.digest": state.DigestScanState,
    "state.workloads": state.DigestWorkloads,
    "state.lease": state.DispatcherLease,
    "state.vulndb": state.VulnDbSeen,
    "alert.webhook": alerts.AlertPayload,  # the generic webhook body (docs/webhooks.md)
    "alert.webhook-group": alerts.GroupPayload,  # the generic webhook body of a grouped alert (docs/webhooks.md)
    "state.notify": alerts.NotifyFingerprint,
    "state.summary": index.DigestSummary,  # KV summaries: the latest report of a digest, compact
    "index.summary": index.SummaryIndex,  # index/summary.json
    "index.namespace": index.NamespaceIndex,  # index/namespaces/<ns>.json
    "index.search": index.SearchIndex,  # index/search.json
    "index.postings": index.DigestPostings,  # index/postings/<hex>.json
    "index.by-cve": index.CveShard,  # index/by-cve/<shard>.json
    "index.by-package": index.PackageShard,  # index/by-package/<shard>.json
    "index.by-digest": index.DigestRunsShard,  # index/by-digest/<2 hex>.json
    "cli.cve": index.CveAnswer,  # podsweep cve --json
}


def _normalized(node: Any) -> Any:
    """Descriptions as `inspect.cleandoc` gives them: msgspec's own dedenting changed between releases (0.22 kept a
    docstring's indentation, 0.23 removes it), and the committed files must not depend on which one is installed."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value) if key == "description" and isinstance(value, str) else _normalized(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_normalized(item) for item in node]
    return node


def render() -> dict[str, str]:
    """File name -> JSON Schema text, deterministic so a stale committed file is a visible diff."""
    out: dict[str, str] = {}
    for stem, typ in DOCUMENTS.items():
        schema = _normalized(msgspec.json.schema(typ))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = f"podsweep {stem}"
        out[f"{stem}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
