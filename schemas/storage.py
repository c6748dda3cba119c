"""Object keys in the report bucket. Derived only from validated digests and scan ids, never from user text.

This module is the storage layout of docs/architecture.md; change both together.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import NewType

from schemas.refs import DNS_LABEL_PATTERN, MAX_OBJECT_KEY, OBJECT_KEY_PATTERN, digest_hex, vuln_id

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


# -- the inverted index: vulnerability id / package name -> digests, digest -> who runs it (docs/reports.md) --------

_SHARD_RE = re.compile(r"^[0-9a-f]{3}(?!\n)$")
_PREFIX_RE = re.compile(r"^[0-9a-f]{2}(?!\n)$")


def shard_of(name: str) -> str:
    """The shard (3 hex digits of its SHA-256, 4,096 shards) of a vulnerability id or a package name (lower case):
    text from scanned images picks a shard, never a key's characters."""
    return hashlib.sha256(name.encode()).hexdigest()[:3]


def _shard(shard: str) -> str:
    if not _SHARD_RE.match(shard):
        raise ValueError(f"index shard {shard[:80]!r} is not 3 hex digits")
    return shard


def cve_shard_key(shard: str) -> StorageKey:
    return StorageKey(f"index/by-cve/{_shard(shard)}.json")


def package_shard_key(shard: str) -> StorageKey:
    return StorageKey(f"index/by-package/{_shard(shard)}.json")


def digest_shard_key(prefix: str) -> StorageKey:
    """Who runs the digests whose hex starts with `prefix` (2 hex digits, 256 shards)."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"digest shard {prefix[:80]!r} is not 2 hex digits")
    return StorageKey(f"index/by-digest/{prefix}.json")


def postings_key(digest_ref: str) -> StorageKey:
    """What the latest report and SBOM of a digest put in the inverted index (written by the handler)."""
    return StorageKey(f"index/postings/{digest_hex(digest_ref)}.json")


def cve_page_key(cve_id: str) -> StorageKey:
    """index/cve/<id>.html for an id of the strict pattern (refs.VULN_ID_PATTERN) only. The one key that keeps upper
    case (CVE-2024-3094.html, as people type it); the ':' of RHSA-2023:1234 becomes '_', which no id contains."""
    canonical = vuln_id(cve_id)
    if canonical is None or canonical != cve_id:
        raise ValueError(f"{cve_id[:80]!r} is not a vulnerability id (CVE-YYYY-NNNN, GHSA-xxxx-xxxx-xxxx, ...)")
    return StorageKey(f"index/cve/{cve_id.replace(':', '_')}.html")


def cve_page_name(cve_id: str) -> str:
    """The file name of a CVE page, relative to index/cve/ (for links between pages)."""
    return cve_page_key(cve_id).rsplit("/", 1)[1]


SUMMARY_KEY = StorageKey("index/summary.json")
INDEX_HTML_KEY = StorageKey("index/index.html")
SEARCH_KEY = StorageKey("index/search.json")
SEARCH_SCRIPT_KEY = StorageKey("index/search.js")
