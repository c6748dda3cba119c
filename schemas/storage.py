"""Object keys in the report bucket. Derived only from validated digests and scan ids, never from user text.

This module is the storage layout of docs/architecture.md; change both together.
"""

from __future__ import annotations

import re
from datetime import datetime

from schemas.refs import DNS_LABEL_PATTERN, digest_hex

_SCAN_ID_RE = re.compile(DNS_LABEL_PATTERN)
_NAMESPACE_RE = re.compile(DNS_LABEL_PATTERN)


def _scan_id(scan_id: str) -> str:
    if not (8 <= len(scan_id) <= 63 and _SCAN_ID_RE.match(scan_id)):
        raise ValueError(f"scan id {scan_id[:80]!r} is not a DNS-1123 label of 8-63 characters")
    return scan_id


def raw_key(digest_ref: str, scan_id: str) -> str:
    return f"raw/sha256/{digest_hex(digest_ref)}/{_scan_id(scan_id)}.json"


def sbom_key(digest_ref: str, scan_id: str) -> str:
    return f"sbom/sha256/{digest_hex(digest_ref)}/{_scan_id(scan_id)}.cdx.json"


def latest_report_key(digest_ref: str) -> str:
    return f"reports/sha256/{digest_hex(digest_ref)}/latest.json"


def history_report_key(digest_ref: str, at: datetime) -> str:
    return f"reports/sha256/{digest_hex(digest_ref)}/history/{_stamp(at)}.json"


def _stamp(at: datetime) -> str:
    return at.strftime("%Y%m%dt%H%M%S%fz")


def stored_event_key(digest_ref: str, scan_id: str) -> str:
    """The report.stored event as published for this scan: what a redelivery re-publishes, unchanged."""
    return f"reports/sha256/{digest_hex(digest_ref)}/stored/{_scan_id(scan_id)}.json"


def latest_sbom_key(digest_ref: str) -> str:
    return f"sbom/sha256/{digest_hex(digest_ref)}/latest.cdx.json"


def history_sbom_key(digest_ref: str, at: datetime) -> str:
    """An SBOM kept as validated (gzip when uploaded gzip); the digest's scan state points here (immutable)."""
    return f"sbom/sha256/{digest_hex(digest_ref)}/history/{_stamp(at)}.cdx.json"


def quarantine_key(scan_id: str) -> str:
    return f"quarantine/{_scan_id(scan_id)}.json"


def quarantine_error_key(scan_id: str) -> str:
    return f"quarantine/{_scan_id(scan_id)}.error.txt"


def quarantine_sbom_key(scan_id: str) -> str:
    return f"quarantine/{_scan_id(scan_id)}.cdx.json"


def quarantine_sbom_error_key(scan_id: str) -> str:
    return f"quarantine/{_scan_id(scan_id)}.cdx.error.txt"


def _namespace(namespace: str) -> str:
    if not (len(namespace) <= 63 and _NAMESPACE_RE.match(namespace)):
        raise ValueError(f"namespace {namespace[:80]!r} is not a DNS-1123 label")
    return namespace


def namespace_index_key(namespace: str) -> str:
    return f"index/namespaces/{_namespace(namespace)}.json"


def namespace_page_key(namespace: str) -> str:
    return f"index/namespaces/{_namespace(namespace)}.html"


def digest_page_key(digest_ref: str) -> str:
    return f"index/digests/{digest_hex(digest_ref)}.html"


SUMMARY_KEY = "index/summary.json"
INDEX_HTML_KEY = "index/index.html"
