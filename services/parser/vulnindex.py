"""The inverted index: vulnerability id -> digests and package name -> digests, joined with who runs each digest.

Pure: no I/O, no clock. The handler builds a digest's postings (`postings_of`); the indexer feeds them, the workloads
and the scan states to VulnIndex and writes the shards a change dirtied; `podsweep cve` joins the shards it read with
`affected`, the same function the in-memory lookup uses.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import msgspec

from schemas import storage
from schemas.index import (
    Affected,
    CveAnswer,
    CveDigests,
    CveShard,
    DigestPostings,
    DigestRuns,
    DigestRunsShard,
    PackageShard,
    PackageVersion,
    PostedVuln,
    VulnHit,
)
from schemas.refs import MAX_VULN_ID, VULN_ID_RE
from schemas.report import Report
from schemas.state import DEFAULT_CLUSTER, DigestWorkloads, WorkloadRun

# A package name as a person may ask for it: what package ecosystems use (golang.org/x/text, @babel/core,
# org.apache.logging.log4j:log4j-core, libstdc++6, python3.11), nothing a shell or a glob reads.
_PACKAGE_RE = re.compile(r"^[A-Za-z0-9@_][A-Za-z0-9._+:@/~-]{0,255}(?!\n)$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:~-]{0,127}(?!\n)$")
_GLOB = frozenset("*?[]{}")
_VERSION_SEPARATORS = frozenset(".-+~_:")


class BadQuery(ValueError):
    """A query `podsweep cve` refuses to run; the message says what is accepted."""


def package_query(text: str) -> tuple[str, str | None]:
    """NAME or NAME@VERSION (a leading @ is an npm scope, not a version) -> (name, version or None)."""
    if any(c in _GLOB for c in text):
        raise BadQuery(f"package {text[:80]!r}: patterns are not supported, give the package's exact name")
    at = text.rfind("@")
    name, version = (text[:at], text[at + 1 :]) if at > 0 else (text, None)
    if not _PACKAGE_RE.match(name) or any(part == ".." for part in re.split(r"[/:]", name)):
        raise BadQuery(
            f"package {name[:80]!r} is not a package name (letters, digits and . _ + : @ / ~ - only, no '..' part)"
        )
    if version is not None and not _VERSION_RE.match(version):
        raise BadQuery(f"version {version[:80]!r} is not a version (letters, digits and . _ + : ~ - only)")
    return name, version


def package_key(name: str) -> str:
    """Names are matched without regard to case (PyYAML is pyyaml in its package URL)."""
    return name.lower()


def version_matches(installed: str, wanted: str) -> bool:
    """`wanted` is the installed version, or a prefix of it that ends where a version part ends: 5.6.0 matches
    5.6.0-0.2 and 5.6.0.1, not 5.6.01; a leading v is ignored on both sides (Go's v0.3.7 is 0.3.7)."""
    installed, wanted = installed.removeprefix("v"), wanted.removeprefix("v")
    if installed == wanted:
        return True
    return installed.startswith(wanted) and installed[len(wanted)] in _VERSION_SEPARATORS


def purl_type(purl: str) -> str:
    """pkg:apk/alpine/musl@1.2 -> apk (empty when it is not a package URL)."""
    if not purl.startswith("pkg:"):
        return ""
    kind = purl[4:].split("/", 1)[0].lower()
    return kind if re.fullmatch(r"[a-z0-9.+-]{1,32}", kind) else ""


# -- what one scan posts ------------------------------------------------------------------------------------------


def postings_of(
    report: Report, digest_ref: str, scan_id: str, finished_at: datetime, sbom: list[PackageVersion] | None
) -> tuple[DigestPostings, int]:
    """The digest's postings from its report and SBOM packages (None: no SBOM), and how many findings were left
    out because their id is not a vulnerability id (a hostile report cannot name a page or a key)."""
    vulns: dict[tuple[str, str, str], PostedVuln] = {}
    skipped = 0
    for f in report.findings:
        if len(f.id) > MAX_VULN_ID or not VULN_ID_RE.match(f.id):
            skipped += 1
            continue
        key = (f.id, f.package, f.installed_version)
        if key not in vulns:  # the same package at two paths is one hit
            vulns[key] = PostedVuln(
                id=f.id,
                package=f.package,
                installed_version=f.installed_version,
                fixed_version=f.fixed_version,
                severity=f.severity,
                pkg_type=f.pkg_type,
                title=f.title,
                url=f.url if f.url.startswith(("https://", "http://")) else "",
            )
    packages: dict[tuple[str, str], PackageVersion] = {}
    for p in [*(sbom or []), *(PackageVersion(f.package, f.installed_version, f.pkg_type) for f in report.findings)]:
        packages.setdefault((package_key(p.name), p.version), p)
    doc = DigestPostings(
        digest_ref=digest_ref,
        scan_id=scan_id,
        finished_at=finished_at,
        sbom=sbom is not None,
        vulns=sorted(vulns.values(), key=lambda v: (v.id, v.package, v.installed_version)),
        packages=sorted(packages.values(), key=lambda p: (package_key(p.name), p.version)),
    )
    return doc, skipped


def names_of(package: PackageVersion) -> set[str]:
    """The index keys of a package: its name, and its last part when it has a group (log4j-core for
    org.apache.logging.log4j:log4j-core, core for @babel/core is not, its scope is part of the name)."""
    name = package_key(package.name)
    keys = {name}
    if ":" in name:
        keys.add(name.rsplit(":", 1)[1])
    return {k for k in keys if k}


# -- the join -----------------------------------------------------------------------------------------------------


def affected(
    hits: Mapping[str, Sequence[VulnHit | PackageVersion]],
    runs: Mapping[str, DigestRuns],
    version: str | None = None,
) -> list[Affected]:
    """One row per workload that runs a digest with a hit (a digest no known workload runs: one row without one),
    running ones first, then by cluster, namespace, workload, image."""
    rows: list[Affected] = []
    for hex_, found in hits.items():
        digest = runs.get(hex_)
        if digest is None:
            continue  # the shard of who runs it was not written yet: nothing to say about it
        for hit in found:
            if isinstance(hit, PackageVersion) and version is not None and not version_matches(hit.version, version):
                continue
            base = _hit_row(digest, hit)
            if not digest.runs:
                rows.append(base)
            rows.extend(
                msgspec.structs.replace(
                    base,
                    cluster=run.cluster,
                    namespace=run.namespace,
                    workload=run.workload,
                    containers=run.containers,
                    image=run.image,
                )
                for run in digest.runs
            )
    rows.sort(key=_row_order)
    return rows


def _hit_row(digest: DigestRuns, hit: VulnHit | PackageVersion) -> Affected:
    if isinstance(hit, PackageVersion):
        return Affected(
            digest_ref=digest.digest_ref,
            nodes=digest.nodes,
            not_running_since=digest.not_running_since,
            package=hit.name,
            installed_version=hit.version,
            purl_type=hit.purl_type,
        )
    return Affected(
        digest_ref=digest.digest_ref,
        nodes=digest.nodes,
        not_running_since=digest.not_running_since,
        package=hit.package,
        installed_version=hit.installed_version,
        fixed_version=hit.fixed_version,
        severity=hit.severity,
        since=hit.since,
        purl_type=hit.pkg_type,
    )


def _row_order(row: Affected) -> tuple[object, ...]:
    workload = (row.workload.kind, row.workload.name) if row.workload is not None else ("", "")
    return (
        row.not_running_since is not None,
        row.cluster or "",
        row.namespace or "",
        workload,
        row.image or "",
        row.digest_ref,
        row.package,
        row.installed_version,
    )


_CLUSTER_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def cluster_query(cluster: str) -> str:
    """A cluster name as `podsweep cve --cluster` takes it (checked before anything is read)."""
    if not _CLUSTER_RE.match(cluster):
        raise BadQuery(f"{cluster[:80]!r} is not a cluster name (a DNS label: lower case letters, digits, '-')")
    return cluster


def in_cluster(answer: CveAnswer, cluster: str) -> CveAnswer:
    """The answer for one cluster of a fleet (`podsweep cve --cluster`): its workloads only, and its digests counted.
    A workload recorded before fleets counts as the default cluster's."""
    cluster = cluster_query(cluster)
    kept = [a for a in answer.affected if (a.cluster or DEFAULT_CLUSTER) == cluster]
    return msgspec.structs.replace(answer, affected=kept, digests=len({a.digest_ref for a in kept}))


def answer_cve(cve_id: str, entry: CveDigests | None, runs: Mapping[str, DigestRuns]) -> CveAnswer:
    if entry is None:
        return CveAnswer(kind="cve", query=cve_id)
    rows = affected(entry.digests, runs)
    return CveAnswer(
        kind="cve",
        query=cve_id,
        title=entry.title,
        url=entry.url,
        digests=len({r.digest_ref for r in rows}),
        affected=rows,
    )


def answer_package(
    query: str, found: Mapping[str, Sequence[PackageVersion]], runs: Mapping[str, DigestRuns], version: str | None
) -> CveAnswer:
    rows = affected(found, runs, version)
    return CveAnswer(kind="package", query=query, digests=len({r.digest_ref for r in rows}), affected=rows)


def _shown(run: WorkloadRun) -> WorkloadRun:
    return WorkloadRun(
        namespace=run.namespace, workload=run.workload, image=run.image, cluster=run.cluster, containers=run.containers
    )


# -- the model ----------------------------------------------------------------------------------------------------


class VulnIndex:
    """The inverted index in memory, and the shards and CVE pages a change dirtied. A change that leaves a digest's
    hits as they were (most rescans) dirties nothing."""

    def __init__(self) -> None:
        self.cves: dict[str, dict[str, tuple[VulnHit, ...]]] = {}
        self.cve_info: dict[str, tuple[str, str]] = {}  # id -> (title, url)
        self.packages: dict[str, dict[str, tuple[PackageVersion, ...]]] = {}
        self.cve_shards: dict[str, set[str]] = defaultdict(set)  # shard -> ids
        self.package_shards: dict[str, set[str]] = defaultdict(set)  # shard -> names
        self.digest_cves: dict[str, set[str]] = {}
        self.digest_packages: dict[str, set[str]] = {}
        self.scan_of: dict[str, str] = {}  # digest hex -> scan id of the postings applied
        self.refs: dict[str, str] = {}
        self.runs: dict[str, list[WorkloadRun]] = {}
        self.running: dict[str, tuple[list[str], datetime | None]] = {}
        self.dirty_cve_shards: set[str] = set()
        self.dirty_package_shards: set[str] = set()
        self.dirty_digest_shards: set[str] = set()
        self.dirty_pages: set[str] = set()

    # -- changes --------------------------------------------------------------------------------------------------
    def apply_postings(self, hex_: str, doc: DigestPostings | None) -> None:
        """A digest's new postings (None: the digest is gone). A hit seen before keeps its `since`."""
        old_scan = self.scan_of.get(hex_)
        old_cves = self.digest_cves.pop(hex_, set())
        old_packages = self.digest_packages.pop(hex_, set())
        new_cves: dict[str, list[VulnHit]] = defaultdict(list)
        new_packages: dict[str, list[PackageVersion]] = defaultdict(list)
        if doc is not None:
            for v in doc.vulns:
                before = {(h.package, h.installed_version): h for h in self.cves.get(v.id, {}).get(hex_, ())}
                known = before.get((v.package, v.installed_version))
                new_cves[v.id].append(
                    VulnHit(
                        package=v.package,
                        installed_version=v.installed_version,
                        fixed_version=v.fixed_version,
                        severity=v.severity,
                        pkg_type=v.pkg_type,
                        since=min(known.since, doc.finished_at) if known is not None else doc.finished_at,
                    )
                )
                if v.id not in self.cve_info or (v.title and not self.cve_info[v.id][0]):
                    self.cve_info[v.id] = (v.title, v.url)
            for p in doc.packages:
                for name in names_of(p):
                    new_packages[name].append(p)
            self.scan_of[hex_] = doc.scan_id
            self.refs[hex_] = doc.digest_ref
        else:
            self.scan_of.pop(hex_, None)
        for cve_id in old_cves | new_cves.keys():
            self._set(self.cves, self.cve_shards, self.dirty_cve_shards, cve_id, hex_, tuple(new_cves.get(cve_id, ())))
        for name in old_packages | new_packages.keys():
            hits = tuple(new_packages.get(name, ()))
            self._set(self.packages, self.package_shards, self.dirty_package_shards, name, hex_, hits)
        for cve_id in old_cves - new_cves.keys():
            if cve_id not in self.cves:
                self.cve_info.pop(cve_id, None)
        if new_cves:
            self.digest_cves[hex_] = set(new_cves)
        if new_packages:
            self.digest_packages[hex_] = set(new_packages)
        if self.scan_of.get(hex_) != old_scan:  # the digest shard records the scan each digest reflects
            self.dirty_digest_shards.add(hex_[:2])
        if doc is None and hex_ not in self.runs:
            self.refs.pop(hex_, None)

    def _set(
        self,
        table: dict[str, dict[str, tuple[VulnHit, ...]]] | dict[str, dict[str, tuple[PackageVersion, ...]]],
        shards: dict[str, set[str]],
        dirty: set[str],
        key: str,
        hex_: str,
        hits: tuple[VulnHit, ...] | tuple[PackageVersion, ...],
    ) -> None:
        by_digest: dict[str, tuple[object, ...]] = table.setdefault(key, {})  # type: ignore[assignment]
        if by_digest.get(hex_, ()) == hits:
            if not by_digest:
                del table[key]
            return
        if hits:
            by_digest[hex_] = hits
        else:
            by_digest.pop(hex_, None)
        shard = storage.shard_of(key)
        if by_digest:
            shards[shard].add(key)
        else:
            del table[key]
            shards[shard].discard(key)
        dirty.add(shard)
        if table is self.cves:
            self.dirty_pages.add(key)

    def apply_workloads(self, hex_: str, doc: DigestWorkloads | None) -> None:
        """Who runs the digest. Only what the index shows is kept: the hourly refresh of a run's last-seen time
        changes nothing here, so it rewrites no shard and no page."""
        runs = [_shown(run) for run in doc.runs] if doc is not None else []
        if self.runs.get(hex_, []) == runs:
            return
        if runs:
            self.runs[hex_] = runs
            if doc is not None:
                self.refs.setdefault(hex_, doc.digest_ref)
        else:
            self.runs.pop(hex_, None)
        self._who_changed(hex_)

    def apply_running(self, hex_: str, nodes: Iterable[str], not_running_since: datetime | None) -> None:
        """The nodes that run the digest now (the dispatcher's scan state), and since when none does."""
        now = (sorted(nodes), not_running_since)
        if self.running.get(hex_, ([], None)) == now:
            return
        if now == ([], None):
            self.running.pop(hex_, None)
        else:
            self.running[hex_] = now
        self._who_changed(hex_)

    def _who_changed(self, hex_: str) -> None:
        if hex_ in self.scan_of:  # only digests in the index are shown anywhere
            self.dirty_digest_shards.add(hex_[:2])
            self.dirty_pages |= self.digest_cves.get(hex_, set())

    # -- reading --------------------------------------------------------------------------------------------------
    def digest_runs(self, hex_: str) -> DigestRuns | None:
        ref = self.refs.get(hex_)
        if ref is None or hex_ not in self.scan_of:
            return None
        nodes, since = self.running.get(hex_, ([], None))
        return DigestRuns(
            digest_ref=ref,
            scan_id=self.scan_of[hex_],
            runs=self.runs.get(hex_, []),
            nodes=nodes,
            not_running_since=since,
        )

    def _runs_of(self, hexes: Iterable[str]) -> dict[str, DigestRuns]:
        out = {}
        for hex_ in hexes:
            runs = self.digest_runs(hex_)
            if runs is not None:
                out[hex_] = runs
        return out

    def cve_entry(self, cve_id: str) -> CveDigests | None:
        found = self.cves.get(cve_id)
        if not found:
            return None
        title, url = self.cve_info.get(cve_id, ("", ""))
        return CveDigests(title=title, url=url, digests={h: list(hits) for h, hits in sorted(found.items())})

    def lookup_cve(self, cve_id: str) -> CveAnswer:
        """Who runs it, from memory."""
        entry = self.cve_entry(cve_id)
        return answer_cve(cve_id, entry, self._runs_of(entry.digests) if entry is not None else {})

    def lookup_package(self, name: str, version: str | None = None) -> CveAnswer:
        found = self.packages.get(package_key(name), {})
        query = f"{name}@{version}" if version is not None else name
        return answer_package(query, found, self._runs_of(found), version)

    # -- shards ---------------------------------------------------------------------------------------------------
    def cve_shard(self, shard: str) -> CveShard:
        cves = {cve_id: self.cve_entry(cve_id) for cve_id in sorted(self.cve_shards.get(shard, ()))}
        return CveShard(shard=shard, cves={k: v for k, v in cves.items() if v is not None})

    def package_shard(self, shard: str) -> PackageShard:
        packages = {
            name: {h: list(v) for h, v in sorted(self.packages[name].items())}
            for name in sorted(self.package_shards.get(shard, ()))
            if name in self.packages
        }
        return PackageShard(shard=shard, packages=packages)

    def digest_shard(self, prefix: str) -> DigestRunsShard:
        hexes = sorted(h for h in self.scan_of if h.startswith(prefix))
        return DigestRunsShard(shard=prefix, digests=self._runs_of(hexes))

    def take_dirty(self) -> tuple[set[str], set[str], set[str], set[str]]:
        """(CVE shards, package shards, digest shards, CVE pages) to write now; the model is clean afterwards."""
        out = (self.dirty_cve_shards, self.dirty_package_shards, self.dirty_digest_shards, self.dirty_pages)
        self.dirty_cve_shards, self.dirty_package_shards, self.dirty_digest_shards, self.dirty_pages = (
            set(),
            set(),
            set(),
            set(),
        )
        return out

    def mark_dirty(self, cve: set[str], package: set[str], digest: set[str], pages: set[str]) -> None:
        """Put back what a failed flush did not write."""
        self.dirty_cve_shards |= cve
        self.dirty_package_shards |= package
        self.dirty_digest_shards |= digest
        self.dirty_pages |= pages

    # -- restart --------------------------------------------------------------------------------------------------
    def settle(self, stored: Mapping[str, DigestRuns]) -> None:
        """After a restart has loaded the shards and KV: dirty only the digests whose runs or nodes differ from what
        the stored digest shards say (a clean restart writes nothing)."""
        self.take_dirty()
        for hex_ in self.scan_of:
            if self.digest_runs(hex_) != stored.get(hex_):
                self._who_changed(hex_)

    def load(
        self, cve_shards: Iterable[CveShard], package_shards: Iterable[PackageShard], digests: Iterable[DigestRunsShard]
    ) -> None:
        """What the stored shards say (a restart), without dirtying anything: the scan each digest reflects, so only
        a digest whose summary moved on is read again. Runs and nodes come from KV, not from here."""
        for d in digests:
            for hex_, runs in d.digests.items():
                if runs.scan_id is not None:
                    self.scan_of[hex_] = runs.scan_id
                    self.refs[hex_] = runs.digest_ref
        for s in cve_shards:
            for cve_id, entry in s.cves.items():
                if not VULN_ID_RE.match(cve_id):
                    continue
                hits = {h: tuple(v) for h, v in entry.digests.items() if h in self.scan_of and v}
                if not hits:
                    continue
                self.cves[cve_id] = hits
                self.cve_info[cve_id] = (entry.title, entry.url)
                self.cve_shards[storage.shard_of(cve_id)].add(cve_id)
                for hex_ in hits:
                    self.digest_cves.setdefault(hex_, set()).add(cve_id)
        for p in package_shards:
            for name, by_digest in p.packages.items():
                found = {h: tuple(v) for h, v in by_digest.items() if h in self.scan_of and v}
                if not found:
                    continue
                self.packages[name] = found
                self.package_shards[storage.shard_of(name)].add(name)
                for hex_ in found:
                    self.digest_packages.setdefault(hex_, set()).add(name)
