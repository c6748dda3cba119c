"""The admission gate's memory: digest → latest report (counts and compact findings), image as written → last digest.

Pure: no I/O, no clock. The shell fills it from the stored index, the stream (image.seen, report.stored) and the
stored reports, all off the request path; a request only reads it. Tags move: a tag maps to the digest last seen
running it in this cluster, which is what the decision message says.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime

import msgspec

from podsweep.policy import worst_first
from schemas.admission import Resolution
from schemas.events import ImageSeen, ReportStored, SeverityCounts
from schemas.index import SummaryIndex
from schemas.refs import DIGEST_REF_RE, IMAGE_RE
from schemas.report import Finding

# Per digest, the worst findings kept in memory (a report with more is judged on these and on its counts).
MAX_FINDINGS = 2000


class ReportFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a digest's latest report says, in a few numbers (findings are kept beside it)."""

    scan_id: str
    counts: SeverityCounts
    fixable: SeverityCounts
    stored_at: datetime


class DigestEntry(msgspec.Struct, frozen=True, kw_only=True):
    """`findings` None: the report's findings are not loaded (yet); judge on counts until they are."""

    digest_ref: str
    report: ReportFacts | None = None
    findings: tuple[Finding, ...] | None = None


class TagEntry(msgspec.Struct, frozen=True):
    """The last digest seen running an image as written; `seen_at` None when it came from the index (no time)."""

    digest_ref: str
    seen_at: datetime | None


@dataclass(frozen=True)
class Lookup:
    """What the view knows about an image as written. `entry` None: podsweep never saw this digest (or tag) run."""

    resolution: Resolution
    digest_ref: str | None = None
    entry: DigestEntry | None = None
    seen_at: datetime | None = None  # for a tag: when its digest was last seen running


@dataclass(frozen=True)
class FindingsWanted:
    hex: str
    digest_ref: str
    scan_id: str


def compact(findings: list[Finding] | tuple[Finding, ...], limit: int = MAX_FINDINGS) -> tuple[Finding, ...]:
    """The fields a verdict and a message need, display text dropped and repeated strings interned (the same base
    image's packages recur across thousands of digests). Worst first when over `limit`."""
    kept = findings if len(findings) <= limit else sorted(findings, key=worst_first)[:limit]
    return tuple(
        Finding(
            id=sys.intern(f.id),
            package=sys.intern(f.package),
            installed_version=sys.intern(f.installed_version),
            severity=f.severity,
            fixed_version=sys.intern(f.fixed_version),
            status=sys.intern(f.status),
            fixable=f.fixable,
            cvss=f.cvss,
            pkg_path=sys.intern(f.pkg_path) if f.pkg_path else "",
        )
        for f in kept
    )


def _hex(digest_ref: str) -> str:
    return digest_ref.rsplit("@sha256:", 1)[1]


class View:
    """Digests by their 64 hex characters, and tags (images as written without a digest) by their text."""

    def __init__(self) -> None:
        self.digests: dict[str, DigestEntry] = {}
        self.tags: dict[str, TagEntry] = {}

    # -- filling ------------------------------------------------------------------------------------------------
    def load_index(self, index: SummaryIndex) -> None:
        """Every digest index/summary.json knows. A tag run by several digests maps to the one with the newest
        report until an image.seen says which ran last."""
        for hex_, indexed in index.digests.items():
            summary = indexed.report
            facts = None
            if summary is not None:
                facts = ReportFacts(
                    scan_id=summary.scan_id, counts=summary.counts, fixable=summary.fixable, stored_at=summary.stored_at
                )
            self._put(hex_, indexed.digest_ref, facts)
            for image in indexed.images:
                if "@" in image:
                    continue
                known = self.tags.get(image)
                if known is None or (known.seen_at is None and self._newer(hex_, _hex(known.digest_ref))):
                    self.tags[image] = TagEntry(indexed.digest_ref, None)

    def _newer(self, hex_: str, than_hex: str) -> bool:
        mine = self.digests.get(hex_)
        other = self.digests.get(than_hex)
        if mine is None or mine.report is None:
            return False
        return other is None or other.report is None or mine.report.stored_at > other.report.stored_at

    def _put(self, hex_: str, digest_ref: str, facts: ReportFacts | None) -> None:
        known = self.digests.get(hex_)
        if (
            known is not None
            and known.report is not None
            and (facts is None or facts.stored_at < known.report.stored_at)
        ):
            return
        findings: tuple[Finding, ...] | None = None
        if facts is not None and facts.counts.total() == 0:
            findings = ()
        elif (
            known is not None
            and known.report is not None
            and facts is not None
            and known.report.scan_id == facts.scan_id
        ):
            findings = known.findings
        self.digests[hex_] = DigestEntry(digest_ref=digest_ref, report=facts, findings=findings)

    def apply_seen(self, seen: ImageSeen, *, here: bool = True) -> None:
        """A digest seen running; a tag maps to it only when it runs `here` (this gate's cluster: in a fleet, a tag
        names what this cluster runs, while a digest's report is the fleet's)."""
        hex_ = _hex(seen.digest_ref)
        if hex_ not in self.digests:
            self.digests[hex_] = DigestEntry(digest_ref=seen.digest_ref)
        if "@" in seen.image or not here:
            return
        known = self.tags.get(seen.image)
        if known is None or known.seen_at is None or seen.observed_at >= known.seen_at:
            self.tags[seen.image] = TagEntry(seen.digest_ref, seen.observed_at)

    def apply_report(self, stored: ReportStored) -> FindingsWanted | None:
        """A newer report replaces the digest's facts; returns what to fetch when it has findings to load."""
        facts = ReportFacts(
            scan_id=stored.scan_id, counts=stored.counts, fixable=stored.fixable, stored_at=stored.stored_at
        )
        hex_ = _hex(stored.digest_ref)
        self._put(hex_, stored.digest_ref, facts)
        entry = self.digests[hex_]
        if entry.report is not None and entry.report.scan_id == stored.scan_id and entry.findings is None:
            return FindingsWanted(hex_, entry.digest_ref, stored.scan_id)
        return None

    def apply_findings(self, hex_: str, scan_id: str, findings: tuple[Finding, ...]) -> bool:
        """Attach loaded findings, unless a newer report replaced that scan meanwhile (then False)."""
        entry = self.digests.get(hex_)
        if entry is None or entry.report is None or entry.report.scan_id != scan_id:
            return False
        self.digests[hex_] = msgspec.structs.replace(entry, findings=findings)
        return True

    def wanted(self) -> list[FindingsWanted]:
        """Digests with a report whose findings are not loaded."""
        return [
            FindingsWanted(hex_, entry.digest_ref, entry.report.scan_id)
            for hex_, entry in self.digests.items()
            if entry.report is not None and entry.findings is None
        ]

    # -- reading (the request path) ---------------------------------------------------------------------------------
    def lookup(self, image: str) -> Lookup:
        """By digest when the image names one (repo:tag@sha256:… too), else through the last digest seen for the tag."""
        if not IMAGE_RE.match(image):
            return Lookup("unknown")
        at = image.rfind("@sha256:")
        if at >= 0:
            hex_ = image[at + 8 :]
            entry = self.digests.get(hex_)
            if entry is not None:
                return Lookup("digest", entry.digest_ref, entry)
            name = image[:at]
            if ":" in name.rsplit("/", 1)[-1]:
                name = name.rsplit(":", 1)[0]
            ref = f"{name}@sha256:{hex_}"
            return Lookup("digest", ref if DIGEST_REF_RE.match(ref) else None)
        tag = self.tags.get(image)
        if tag is None:
            return Lookup("unknown")
        return Lookup("tag", tag.digest_ref, self.digests.get(_hex(tag.digest_ref)), tag.seen_at)
