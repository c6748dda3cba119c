"""Constrained string types for every field that may reach a Kubernetes spec, an S3 key or a shell.

Pure: no I/O. Patterns follow the OCI distribution reference grammar and Kubernetes' DNS rules, so a value
that decodes here is safe to place in a Job spec or an object key without further escaping.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

# OCI distribution reference grammar: optional registry host[:port], then lower-case path components.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]{{1,5}})?)"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_PATTERN = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
SHA256_PATTERN = r"sha256:[a-f0-9]{64}"
TAG_PATTERN = r"[\w][\w.-]{0,127}"
# `$` alone also matches before a trailing newline (in Python and in msgspec, which uses re.search).
END = r"(?!\n)$"

REPOSITORY_RE = re.compile(rf"^{REPOSITORY_PATTERN}{END}")
DIGEST_REF_RE = re.compile(rf"^(?P<repo>{REPOSITORY_PATTERN})@(?P<digest>{SHA256_PATTERN}){END}")
# An image as written in a pod spec: repo[:tag][@digest]. Only used for display and tag→digest lookups.
IMAGE_RE = re.compile(rf"^{REPOSITORY_PATTERN}(?::{TAG_PATTERN})?(?:@{SHA256_PATTERN})?{END}")

MAX_REPOSITORY = 255
MAX_DIGEST_REF = MAX_REPOSITORY + 1 + 71

DigestRef = Annotated[
    str,
    msgspec.Meta(
        pattern=DIGEST_REF_RE.pattern,
        max_length=MAX_DIGEST_REF,
        description="An image by content: repository@sha256:<64 hex>. The only image form podsweep scans.",
        examples=["registry.example.com/team/app@sha256:" + "a" * 64],
    ),
]
Digest = Annotated[str, msgspec.Meta(pattern=rf"^{SHA256_PATTERN}{END}", description="sha256:<64 hex>")]
ImageRef = Annotated[
    str,
    msgspec.Meta(
        pattern=IMAGE_RE.pattern,
        max_length=MAX_DIGEST_REF + 129,
        description="The image as written in the pod spec (repo[:tag][@digest]).",
    ),
]
# RFC 1123 subdomain (node, pod and workload names) and label (namespace, container names).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*" + END
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?" + END
K8sName = Annotated[str, msgspec.Meta(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
K8sLabelName = Annotated[str, msgspec.Meta(pattern=DNS_LABEL_PATTERN, max_length=63)]
# Node names are subdomains in practice, but some providers use upper case; accept it, nothing else.
NodeName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?" + END, max_length=253)]
KindName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9]*" + END, max_length=63)]
# Scan ids and Job names: derived by podsweep from a hash, never from user text.
ScanId = Annotated[str, msgspec.Meta(pattern=DNS_LABEL_PATTERN, min_length=8, max_length=63)]
# Object keys podsweep writes: a fixed alphabet, no "..", no leading slash, never empty.
OBJECT_KEY_PATTERN = r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*" + END
MAX_OBJECT_KEY = 512
ObjectKey = Annotated[str, msgspec.Meta(pattern=OBJECT_KEY_PATTERN, max_length=MAX_OBJECT_KEY)]
ClusterName = Annotated[str, msgspec.Meta(pattern=DNS_LABEL_PATTERN, max_length=63)]
# A vulnerability id as Trivy's databases name it: CVE-2024-3094, GHSA-jfh8-c2jp-5v3q, and the vendor kinds
# (ALAS2-2023-1, DLA-3449-1, TEMP-0841856-B18BAF, NSWG-ECO-328, RUSTSEC-2021-0001, GO-2024-2687, pyup.io-37863,
# RHSA-2023:1234, openSUSE-SU-2024:0001-1). A malformed CVE or GHSA id is refused, not read as a vendor id. Strict
# enough to name a page in index/cve/: no '/', no '..', no space, at most 96 characters.
VULN_ID_PATTERN = (
    r"^(?:CVE-[0-9]{4}-[0-9]{4,19}|GHSA(?:-[23456789cfghjmpqrvwx]{4}){3}"
    r"|(?![Cc][Vv][Ee]-|[Gg][Hh][Ss][Aa]-)[A-Za-z][A-Za-z0-9]{1,23}(?:[-.][A-Za-z0-9]{1,32}){1,6}"
    r"(?::[0-9]{1,12}(?:-[0-9]{1,6})?)?)" + END
)
VULN_ID_RE = re.compile(VULN_ID_PATTERN)
MAX_VULN_ID = 96
VulnId = Annotated[str, msgspec.Meta(pattern=VULN_ID_PATTERN, max_length=MAX_VULN_ID)]


def vuln_id(text: str) -> str | None:
    """`text` as the index spells the id (CVE upper case, GHSA's prefix upper and its code lower), or None when it
    is not a vulnerability id."""
    text = text.strip()
    upper = text.upper()
    if upper.startswith("CVE-"):
        text = upper
    elif upper.startswith("GHSA-"):
        text = "GHSA-" + text[5:].lower()
    return text if len(text) <= MAX_VULN_ID and VULN_ID_RE.match(text) else None


# A notification route from the podsweep.io/notify annotation.
RouteName = Annotated[str, msgspec.Meta(pattern=DNS_LABEL_PATTERN, max_length=63)]
# Free text that is displayed, never executed or used as a key: bounded, no control characters.
Text = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$", max_length=4096)]
ShortText = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]*" + END, max_length=256)]


class InvalidReference(ValueError):
    """An image reference podsweep will not scan; the message says why."""


def split_digest_ref(digest_ref: str) -> tuple[str, str]:
    """Return (repository, 'sha256:<hex>') or raise InvalidReference naming the problem."""
    if len(digest_ref) > MAX_DIGEST_REF:
        raise InvalidReference(f"digest ref is {len(digest_ref)} characters (at most {MAX_DIGEST_REF})")
    match = DIGEST_REF_RE.fullmatch(digest_ref)
    if match is None:
        raise InvalidReference(f"{digest_ref[:120]!r} is not repository@sha256:<64 lower-case hex>")
    return match["repo"], match["digest"]


def digest_hex(digest_ref: str) -> str:
    """The 64 hex characters of a digest ref (what storage keys and Job names are derived from)."""
    return split_digest_ref(digest_ref)[1].removeprefix("sha256:")
