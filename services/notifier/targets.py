"""What `podsweep check` evaluates for a stored image, digest or namespace: one target per workload and digest.

Pure: the CLI reads the parser's index (index/summary.json, index/namespaces/<ns>.json) and the WORKLOADS KV
documents and passes them in; nothing here does I/O. The index says which digests; the KV adds the pods'
podsweep.io/* options (notify route, ignore-unfixed) that the index does not keep.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import msgspec

from podsweep.policy import Policy, PolicyRule, rule_for
from schemas.events import Workload
from schemas.index import NamespaceIndex, SummaryIndex
from schemas.refs import DIGEST_REF_RE, SHA256_PATTERN
from schemas.state import DigestWorkloads, WorkloadRun

_DIGEST_RE = re.compile(rf"^(?:(?P<repo>.+)@)?(?P<digest>{SHA256_PATTERN})$")


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """One digest as run by one workload (`namespace`/`workload` None when nothing is known to run it)."""

    digest_hex: str
    image: str
    namespace: str | None = None
    workload: Workload | None = None
    route: str | None = None
    ignore_unfixed: bool = False

    @property
    def where(self) -> str:
        if self.namespace is None or self.workload is None:
            return self.image
        return f"{self.namespace}/{self.workload.kind}/{self.workload.name}"


def parse_digest(value: str) -> tuple[str, str] | None:
    """(digest hex, image to show) of `sha256:<hex>` or `repo@sha256:<hex>`, or None when it is neither."""
    match = _DIGEST_RE.match(value.strip())
    if match is None or (match["repo"] is not None and DIGEST_REF_RE.match(value.strip()) is None):
        return None
    return match["digest"].removeprefix("sha256:"), value.strip()


def _targets(doc: DigestWorkloads, runs: Iterable[WorkloadRun]) -> list[Target]:
    hex_ = doc.digest_ref.rsplit(":", 1)[1]
    groups: dict[tuple[str, str, str], list[WorkloadRun]] = {}
    for run in runs:
        groups.setdefault((run.namespace, run.workload.kind, run.workload.name), []).append(run)
    out = []
    for (namespace, kind, name), group in sorted(groups.items()):
        group.sort(key=lambda r: r.image)
        out.append(
            Target(
                digest_hex=hex_,
                image=doc.digest_ref,
                namespace=namespace,
                workload=Workload(kind=kind, name=name),
                route=next((r.options.notify for r in group if r.options.notify), None),
                ignore_unfixed=all(r.options.ignore_unfixed for r in group),
            )
        )
    return out


def for_digest(digest_hex: str, image: str, doc: DigestWorkloads | None) -> list[Target]:
    """Every workload known to run the digest, or the bare digest when none is known."""
    targets = _targets(doc, doc.runs) if doc is not None else []
    return targets or [Target(digest_hex=digest_hex, image=image)]


def image_matches(wanted: str, image: str) -> bool:
    """`image` (as written in a pod spec) is `wanted`, or `wanted` without the digest, or its repository."""
    written = image.split("@", 1)[0]
    repository = written.rsplit(":", 1)[0] if ":" in written.rsplit("/", 1)[-1] else written
    return wanted in (image, written, repository)


def for_image(docs: Sequence[DigestWorkloads], image: str) -> list[Target]:
    """Runs whose image as written is `image`, or whose repository is `image` (any tag)."""
    return [t for doc in docs for t in _targets(doc, [r for r in doc.runs if image_matches(image, r.image)])]


def for_namespace(docs: Sequence[DigestWorkloads], namespace: str) -> list[Target]:
    return [t for doc in docs for t in _targets(doc, [r for r in doc.runs if r.namespace == namespace])]


def digests_for_image(index: SummaryIndex, image: str) -> list[str]:
    """Digest hexes whose indexed images include `image` (sorted)."""
    return sorted(h for h, d in index.digests.items() if any(image_matches(image, i) for i in d.images))


def digests_for_namespace(index: NamespaceIndex) -> list[str]:
    return sorted({i.digest_ref.rsplit(":", 1)[1] for w in index.workloads for i in w.images})


def from_index(
    hexes: Sequence[str],
    docs: dict[str, DigestWorkloads],
    *,
    image: str | None = None,
    namespace_index: NamespaceIndex | None = None,
    summary: SummaryIndex | None = None,
) -> list[Target]:
    """Targets for indexed digests: from each digest's KV document when there is one (it knows the options),
    otherwise from the index alone (no notify route, no ignore-unfixed)."""
    out: list[Target] = []
    for hex_ in hexes:
        doc = docs.get(hex_)
        if doc is not None:
            runs = [
                r
                for r in doc.runs
                if (image is None or image_matches(image, r.image))
                and (namespace_index is None or r.namespace == namespace_index.namespace)
            ]
            if runs:
                out += _targets(doc, runs)
                continue
        if namespace_index is not None:
            seen: set[tuple[str, str]] = set()
            for w in namespace_index.workloads:
                for i in w.images:
                    if i.digest_ref.rsplit(":", 1)[1] == hex_ and (w.workload.kind, w.workload.name) not in seen:
                        seen.add((w.workload.kind, w.workload.name))
                        out.append(
                            Target(
                                digest_hex=hex_,
                                image=i.digest_ref,
                                namespace=namespace_index.namespace,
                                workload=w.workload,
                            )
                        )
        elif summary is not None and hex_ in summary.digests:
            out.append(Target(digest_hex=hex_, image=summary.digests[hex_].digest_ref))
    return out


def rule_of(policy: Policy, target: Target) -> PolicyRule:
    """The rule the notifier applies to this workload (with its pods' ignore-unfixed annotation)."""
    rule = rule_for(policy, target.namespace, target.workload, target.route)
    if target.ignore_unfixed and not rule.ignore_unfixed:
        rule = msgspec.structs.replace(rule, ignore_unfixed=True)
    return rule
