"""Object keys in the report bucket. Derived only from validated digests and scan ids, never from user text.

This module is the storage layout of docs/architecture.md; change both together.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import NewType

from schemas.refs import DNS_LABEL_PATTERN, MAX_OBJECT_KEY, OBJECT_KEY_PATTERN, digest_hex

_SCAN_ID_RE = re.compile(DNS_LABEL_PATTERN)
_NAMESPACE_RE = re.compile(DNS_LABEL_PATTERN)
_OBJECT_KEY_RE = re.compile(OBJECT_KEY_PATTERN)

StorageKey = NewType("StorageKey", str)
"""A key of this layout's alphabet (refs.ObjectKey), never empty: what the builders below return and the only thing
podsweep presigns a URL for (an empty key would sign the bucket itself, whose GET lists it)."""


def checked_key(key: str) -> StorageKey:
    """`key` as a StorageKey, or ValueError naming it: for keys that were stored or sent as text (a scan state's
    sbom_key) before they reach a signer."""
    if not (len(key) <= MAX_OBJECT_KEY and _OBJECT_KEY_RE.match(key)):
        raise ValueError(
            f"object key {key[:80]!r} is not a podsweep key (segments of a-z, 0-9, '.', '_', '-' joined by '/', "
            f"1 to {MAX_OBJECT_KEY} characters)"
        )
    return StorageKey(key)


def _scan_id(scan_id: str) -> str:
    if not (8 <= len(scan_id) <= 63 and _SCAN_ID_RE.match(scan_id)):
        raise ValueError(f"scan id {scan_id[:80]!r} is not a DNS-1123 label of 8-63 characters")
    return scan_id


def raw_key(digest_ref: str, scan_id: str) -> StorageKey:
    return StorageKey(f"raw/sha256/{digest_hex(digest_ref)}/{_scan_id(scan_id)}.json")


def sbom_key(digest_ref: str, scan_id: str) -> StorageKey:
    return StorageKey(f"sbom/sha256/{digest_hex(digest_ref)}/{_scan_id(scan_id)}.cdx.json")


def latest_report_key(digest_ref: str) -> StorageKey:
    return StorageKey(f"reports/sha256/{digest_hex(digest_ref)}/latest.json")


def history_report_key(digest_ref: str, at: datetime) -> StorageKey:
    return StorageKey(f"reports/sha256/{digest_hex(digest_ref)}/history/{_stamp(at)}.json")


def _stamp(at: datetime) -> str:
    return at.strftime("%Y%m%dt%H%M%S%fz")


def stored_event_key(digest_ref: str, scan_id: str) -> StorageKey:
    """The report.stored event as published for this scan: what a redelivery re-publishes, unchanged."""
    return StorageKey(f"reports/sha256/{digest_hex(digest_ref)}/stored/{_scan_id(scan_id)}.json")


def latest_sbom_key(digest_ref: str) -> StorageKey:
    return StorageKey(f"sbom/sha256/{digest_hex(digest_ref)}/latest.cdx.json")


def history_sbom_key(digest_ref: str, at: datetime) -> StorageKey:
    """An SBOM kept as validated (gzip when uploaded gzip); the digest's scan state points here (immutable)."""
    return StorageKey(f"{history_sbom_prefix(digest_ref)}{_stamp(at)}.cdx.json")


def history_sbom_prefix(digest_ref: str) -> str:
    """Where every kept SBOM of a digest lies: a key sent in an event is checked against it before it is recorded."""
    return f"sbom/sha256/{digest_hex(digest_ref)}/history/"


def quarantine_key(scan_id: str) -> StorageKey:
    return StorageKey(f"quarantine/{_scan_id(scan_id)}.json")


def quarantine_error_key(scan_id: str) -> StorageKey:
    return StorageKey(f"quarantine/{_scan_id(scan_id)}.error.txt")


def quarantine_sbom_key(scan_id: str) -> StorageKey:
    return StorageKey(f"quarantine/{_scan_id(scan_id)}.cdx.json")


def quarantine_sbom_error_key(scan_id: str) -> StorageKey:
    return StorageKey(f"quarantine/{_scan_id(scan_id)}.cdx.error.txt")


def _namespace(namespace: str) -> str:
    if not (len(namespace) <= 63 and _NAMESPACE_RE.match(namespace)):
        raise ValueError(f"namespace {namespace[:80]!r} is not a DNS-1123 label")
    return namespace


def namespace_index_key(namespace: str) -> StorageKey:
    return StorageKey(f"index/namespaces/{_namespace(namespace)}.json")


def namespace_page_key(namespace: str) -> StorageKey:
    return StorageKey(f"index/namespaces/{_namespace(namespace)}.html")


def digest_page_key(digest_ref: str) -> StorageKey:
    return StorageKey(f"index/digests/{digest_hex(digest_ref)}.html")


SUMMARY_KEY = StorageKey("index/summary.json")
INDEX_HTML_KEY = StorageKey("index/index.html")
SEARCH_KEY = StorageKey("index/search.json")
SEARCH_SCRIPT_KEY = StorageKey("index/search.js")
