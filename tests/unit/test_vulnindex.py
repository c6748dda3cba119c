"""The inverted index model: postings in, shards and pages dirtied, who runs a vulnerability or a package out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from podsweep.reports import normalize
from schemas import storage
from schemas.events import Workload
from schemas.index import Affected, CveAnswer, DigestPostings, PackageVersion, PostedVuln
from schemas.refs import vuln_id
from schemas.report import Finding, Report
from schemas.state import DigestWorkloads, WorkloadRun
from services.parser import sbom, vulnindex
from services.parser.vulnindex import BadQuery, VulnIndex, package_query, postings_of, version_matches

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trivy"
T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)
A, B = "a" * 64, "b" * 64
REF_A, REF_B = f"registry.example.com/app@sha256:{A}", f"registry.example.com/api@sha256:{B}"


def vuln(cve: str = "CVE-2024-3094", package: str = "liblzma5", installed: str = "5.6.0-0.2", **kw: str) -> PostedVuln:
    return PostedVuln(
        id=cve, package=package, installed_version=installed, severity=kw.pop("severity", "CRITICAL"), **kw
    )  # type: ignore[arg-type]


def postings(
    ref: str, scan: str, at: datetime, vulns: list[PostedVuln], packages: list[PackageVersion] = ()
) -> DigestPostings:  # type: ignore[assignment]
    return DigestPostings(digest_ref=ref, scan_id=scan, finished_at=at, vulns=vulns, packages=list(packages))


def workloads(ref: str, *names: str, ns: str = "shop") -> DigestWorkloads:
    return DigestWorkloads(
        digest_ref=ref,
        runs=[
            WorkloadRun(
                namespace=ns,
                workload=Workload("Deployment", n),
                image=ref.split("@")[0] + ":1",
                cluster="prod",
                containers=["app"],
            )
            for n in names
        ],
    )


def indexed(*docs: tuple[str, DigestPostings]) -> VulnIndex:
    model = VulnIndex()
    for hex_, doc in docs:
        model.apply_postings(hex_, doc)
    return model


# -- ids and queries ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("CVE-2024-3094", "CVE-2024-3094"),
        ("cve-2024-3094", "CVE-2024-3094"),
        (" CVE-2021-44228 ", "CVE-2021-44228"),
        ("CVE-2024-1234567", "CVE-2024-1234567"),
        ("GHSA-jfh8-c2jp-5v3q", "GHSA-jfh8-c2jp-5v3q"),
        ("ghsa-JFH8-C2JP-5V3Q", "GHSA-jfh8-c2jp-5v3q"),
        ("TEMP-0841856-B18BAF", "TEMP-0841856-B18BAF"),
        ("NSWG-ECO-328", "NSWG-ECO-328"),
        ("DLA-3449-1", "DLA-3449-1"),
        ("ALAS2-2023-2001", "ALAS2-2023-2001"),
        ("RUSTSEC-2021-0001", "RUSTSEC-2021-0001"),
        ("GO-2024-2687", "GO-2024-2687"),
        ("pyup.io-37863", "pyup.io-37863"),
        ("RHSA-2023:1234", "RHSA-2023:1234"),
        ("openSUSE-SU-2024:0001-1", "openSUSE-SU-2024:0001-1"),
        ("CVE-24-3094", None),  # a malformed CVE id is not read as a vendor id
        ("CVE-2024-309", None),
        ("CVE-20X4-3094", None),
        ("GHSA-0000-0000-0000", None),  # GitHub's alphabet has no 0
        ("CVE-2024-3094/../../x", None),
        ("../index", None),
        ("CVE-2024-3094\n", "CVE-2024-3094"),  # surrounding white space is not part of it
        ("CVE-2024-\n3094", None),
        ("CVE-2024-3094;rm", None),
        ("$(id)", None),
        ("*", None),
        ("", None),
        ("A" * 200 + "-1", None),
    ],
)
def test_vulnerability_ids_are_checked_against_a_strict_pattern(text: str, canonical: str | None) -> None:
    assert vuln_id(text) == canonical


@pytest.mark.parametrize(
    ("cve", "key"),
    [
        ("CVE-2024-3094", "index/cve/CVE-2024-3094.html"),
        ("GHSA-jfh8-c2jp-5v3q", "index/cve/GHSA-jfh8-c2jp-5v3q.html"),
        ("RHSA-2023:1234", "index/cve/RHSA-2023_1234.html"),
    ],
)
def test_cve_page_keys_name_the_id(cve: str, key: str) -> None:
    assert storage.cve_page_key(cve) == key


@pytest.mark.parametrize("hostile", ["../x", "CVE-2024-3094/../../raw", "cve-2024-3094", "a b", "CVE-2024-3094\n"])
def test_no_page_key_for_what_is_not_a_canonical_id(hostile: str) -> None:
    with pytest.raises(ValueError, match="not a vulnerability id"):
        storage.cve_page_key(hostile)


@pytest.mark.parametrize("name", ["../../etc/passwd", "$(id)", "lib;rm", "x" * 1000, "CVE-2024-3094"])
def test_shard_keys_are_hashes_whatever_the_name(name: str) -> None:
    key = storage.package_shard_key(storage.shard_of(name))
    assert (
        storage.checked_key(key) == key
        and key.startswith("index/by-package/")
        and len(key) == len("index/by-package/000.json")
    )


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("liblzma5", ("liblzma5", None)),
        ("liblzma5@5.6.0", ("liblzma5", "5.6.0")),
        ("@babel/core", ("@babel/core", None)),
        ("@babel/core@7.0.0", ("@babel/core", "7.0.0")),
        ("golang.org/x/text@v0.3.7", ("golang.org/x/text", "v0.3.7")),
        ("org.apache.logging.log4j:log4j-core@2.14.1", ("org.apache.logging.log4j:log4j-core", "2.14.1")),
        ("libstdc++6@12.2.0-14", ("libstdc++6", "12.2.0-14")),
        ("libc6@2.36-9+deb12u3", ("libc6", "2.36-9+deb12u3")),
        ("bash@1:5.2", ("bash", "1:5.2")),
    ],
)
def test_package_queries(text: str, parsed: tuple[str, str | None]) -> None:
    assert package_query(text) == parsed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("lib*", "patterns are not supported"),
        ("liblzma?", "patterns are not supported"),
        ("lib[a-z]", "patterns are not supported"),
        ("{a,b}", "patterns are not supported"),
        ("a;rm -rf /", "not a package name"),
        ("$(id)", "not a package name"),
        ("`id`", "not a package name"),
        ("../etc/passwd", "not a package name"),
        ("a/../../b", "not a package name"),
        ("a b", "not a package name"),
        ("", "not a package name"),
        ("x@", "not a version"),
        ("x@1;2", "not a version"),
        ("x@$(id)", "not a version"),
    ],
)
def test_hostile_package_queries_get_a_clear_answer(text: str, says: str) -> None:
    with pytest.raises(BadQuery, match=says.replace("(", r"\(")):
        package_query(text)


@pytest.mark.parametrize(
    ("installed", "wanted", "matches"),
    [
        ("5.6.0", "5.6.0", True),
        ("5.6.0-0.2", "5.6.0", True),
        ("5.6.0.1", "5.6.0", True),
        ("5.6.0+b1", "5.6.0", True),
        ("5.6.0~rc1", "5.6.0", True),
        ("5.6.1", "5.6.0", False),
        ("5.6.01", "5.6.0", False),
        ("5.6.0", "5.6.0-0.2", False),
        ("v0.3.7", "0.3.7", True),
        ("0.3.7", "v0.3.7", True),
        ("1.2.4_git20230717-r4", "1.2.4", True),
        ("15.6.0", "5.6.0", False),
    ],
)
def test_version_matches_a_whole_version_or_a_prefix_ending_at_a_part(
    installed: str, wanted: str, matches: bool
) -> None:
    assert version_matches(installed, wanted) is matches


# -- postings from real Trivy output -------------------------------------------------------------------------------


def test_postings_of_a_real_report_and_its_sbom() -> None:
    report = normalize.parse((FIXTURES / "trivy-0.76-node-scan-combined.json").read_bytes())
    info = sbom.check((FIXTURES / "trivy-0.76-combined.cdx.json").read_bytes(), max_bytes=10_000_000)
    doc, skipped = postings_of(report, REF_A, "psw-0001", T0, info.packages)
    assert skipped == 0 and doc.sbom
    assert {v.id for v in doc.vulns} == {f.id for f in report.findings}
    by_name = {p.name: p for p in doc.packages}
    assert by_name["musl"] == PackageVersion("musl", "1.2.4_git20230717-r4", "apk")
    assert by_name["golang.org/x/text"].purl_type == "golang" and by_name["PyYAML"].version == "5.3.1"
    assert "usr/local/bin/fixture-app" not in by_name and "alpine" not in by_name  # application and OS components


def test_findings_whose_id_is_not_a_vulnerability_id_stay_out() -> None:
    bad = Finding(id="../../x", package="p", installed_version="1", severity="HIGH")
    good = Finding(id="CVE-2024-3094", package="p", installed_version="1", severity="HIGH", url="javascript:alert(1)")
    doc, skipped = postings_of(Report(source_format="v2", findings=[bad, good]), REF_A, "psw-0001", T0, None)
    assert skipped == 1 and [v.id for v in doc.vulns] == ["CVE-2024-3094"] and doc.vulns[0].url == ""
    assert not doc.sbom and doc.packages == [PackageVersion("p", "1", "")]  # packages from findings without an SBOM


# -- the model ------------------------------------------------------------------------------------------------------


def test_a_cve_lists_each_workload_of_each_digest_with_fixed_version_and_since() -> None:
    model = indexed((A, postings(REF_A, "psw-a0000001", T0, [vuln(fixed_version="5.6.1+really5.4.5-1")])))
    model.apply_workloads(A, workloads(REF_A, "web", "worker"))
    model.apply_running(A, ["node-2", "node-1"], None)
    answer = model.lookup_cve("CVE-2024-3094")
    assert [(r.namespace, r.workload.name if r.workload else None) for r in answer.affected] == [
        ("shop", "web"),
        ("shop", "worker"),
    ]
    row = answer.affected[0]
    assert (row.cluster, row.containers, row.nodes, row.image) == (
        "prod",
        ["app"],
        ["node-1", "node-2"],
        "registry.example.com/app:1",
    )
    assert (row.package, row.installed_version, row.fixed_version, row.since) == (
        "liblzma5",
        "5.6.0-0.2",
        "5.6.1+really5.4.5-1",
        T0,
    )
    assert answer.digests == 1
    assert model.lookup_cve("CVE-2021-44228").affected == []


def test_a_digest_no_workload_is_known_to_run_still_shows() -> None:
    model = indexed((A, postings(REF_A, "psw-a0000001", T0, [vuln()])))
    [row] = model.lookup_cve("CVE-2024-3094").affected
    assert row.workload is None and row.digest_ref == REF_A


def test_replacing_a_digests_findings_keeps_since_adds_new_and_drops_fixed() -> None:
    model = indexed((A, postings(REF_A, "psw-a0000001", T0, [vuln(), vuln("CVE-2024-0001", "zlib", "1.2")])))
    model.take_dirty()
    later = T0 + timedelta(days=1)
    model.apply_postings(A, postings(REF_A, "psw-a0000002", later, [vuln(), vuln("CVE-2024-0002", "openssl", "3")]))
    assert model.lookup_cve("CVE-2024-3094").affected[0].since == T0  # first stored scan that had it
    assert model.lookup_cve("CVE-2024-0002").affected[0].since == later
    assert model.lookup_cve("CVE-2024-0001").affected == []  # fixed: gone
    cve, _, digest, pages = model.take_dirty()
    assert pages == {"CVE-2024-0001", "CVE-2024-0002"}  # not the unchanged one
    assert cve == {storage.shard_of("CVE-2024-0001"), storage.shard_of("CVE-2024-0002")}
    assert digest == {A[:2]}  # records the new scan id
    assert "CVE-2024-0001" not in model.cve_shard(storage.shard_of("CVE-2024-0001")).cves


def test_a_rescan_with_the_same_findings_dirties_only_the_digest_shard() -> None:
    packages = [PackageVersion("liblzma5", "5.6.0-0.2", "deb")]
    model = indexed((A, postings(REF_A, "psw-a0000001", T0, [vuln()], packages)))
    model.take_dirty()
    model.apply_postings(A, postings(REF_A, "psw-a0000002", T0 + timedelta(hours=6), [vuln()], packages))
    assert model.take_dirty() == (set(), set(), {A[:2]}, set())
    assert model.lookup_cve("CVE-2024-3094").affected[0].since == T0


def test_removing_a_digest_removes_it_everywhere() -> None:
    packages = [PackageVersion("liblzma5", "5.6.0-0.2", "deb")]
    model = indexed(
        (A, postings(REF_A, "psw-a0000001", T0, [vuln()], packages)),
        (B, postings(REF_B, "psw-b0000001", T0, [vuln()], packages)),
    )
    model.apply_postings(A, None)
    assert [r.digest_ref for r in model.lookup_cve("CVE-2024-3094").affected] == [REF_B]
    assert [r.digest_ref for r in model.lookup_package("liblzma5").affected] == [REF_B]
    model.apply_postings(B, None)
    assert model.cves == {} and model.packages == {} and model.cve_info == {}
    assert model.cve_shard(storage.shard_of("CVE-2024-3094")).cves == {}
    assert model.digest_shard(A[:2]).digests == {} and model.digest_shard(B[:2]).digests == {}


def test_a_digest_that_stops_running_is_listed_last_with_since_when() -> None:
    model = indexed(
        (A, postings(REF_A, "psw-a0000001", T0, [vuln()])), (B, postings(REF_B, "psw-b0000001", T0, [vuln()]))
    )
    model.apply_workloads(A, workloads(REF_A, "old"))
    model.apply_workloads(B, workloads(REF_B, "new"))
    model.apply_running(A, ["node-1"], None)
    model.apply_running(B, ["node-1"], None)
    model.take_dirty()
    stopped = T0 + timedelta(hours=2)
    model.apply_running(A, [], stopped)
    assert model.take_dirty() == (set(), set(), {A[:2]}, {"CVE-2024-3094"})  # who runs it changed, not the hits
    rows = model.lookup_cve("CVE-2024-3094").affected
    assert [(r.digest_ref, r.nodes, r.not_running_since) for r in rows] == [
        (REF_B, ["node-1"], None),
        (REF_A, [], stopped),
    ]


def test_workload_changes_of_a_digest_outside_the_index_dirty_nothing() -> None:
    model = VulnIndex()
    model.apply_workloads(A, workloads(REF_A, "web"))
    model.apply_running(A, ["node-1"], None)
    assert model.take_dirty() == (set(), set(), set(), set())


@pytest.mark.parametrize(
    ("query", "version", "found"),
    [
        ("liblzma5", None, {REF_A, REF_B}),
        ("LIBLZMA5", None, {REF_A, REF_B}),
        ("liblzma5", "5.6.0", {REF_A}),
        ("liblzma5", "5.6", {REF_A}),
        ("liblzma5", "5.4.5", {REF_B}),
        ("liblzma5", "5.6.1", set()),
        ("liblzma", None, set()),  # exact names only
        ("log4j-core", "2.14.1", {REF_B}),  # a Maven artifact by its own name
        ("org.apache.logging.log4j:log4j-core", None, {REF_B}),
    ],
)
def test_package_at_version_matching(query: str, version: str | None, found: set[str]) -> None:
    model = indexed(
        (A, postings(REF_A, "psw-a0000001", T0, [], [PackageVersion("liblzma5", "5.6.0-0.2", "deb")])),
        (
            B,
            postings(
                REF_B,
                "psw-b0000001",
                T0,
                [],
                [
                    PackageVersion("liblzma5", "5.4.5-0.3", "deb"),
                    PackageVersion("org.apache.logging.log4j:log4j-core", "2.14.1", "maven"),
                ],
            ),
        ),
    )
    assert {r.digest_ref for r in model.lookup_package(query, version).affected} == found


def test_shards_round_trip_through_a_restart_without_dirtying_anything() -> None:
    packages = [PackageVersion("liblzma5", "5.6.0-0.2", "deb")]
    model = indexed((A, postings(REF_A, "psw-a0000001", T0, [vuln(title="xz backdoor", url="https://x/1")], packages)))
    model.apply_workloads(A, workloads(REF_A, "web"))
    cve, package, digest, _ = model.take_dirty()

    def through_json(doc: msgspec.Struct) -> msgspec.Struct:
        return msgspec.json.decode(msgspec.json.encode(doc), type=type(doc))

    restarted = VulnIndex()
    restarted.load(
        [through_json(model.cve_shard(s)) for s in cve],  # type: ignore[misc]
        [through_json(model.package_shard(s)) for s in package],  # type: ignore[misc]
        [through_json(model.digest_shard(s)) for s in digest],  # type: ignore[misc]
    )
    restarted.apply_workloads(A, workloads(REF_A, "web"))  # runs come from KV
    restarted.settle({A: model.digest_runs(A)})  # type: ignore[dict-item]
    assert restarted.take_dirty() == (set(), set(), set(), set())  # a clean restart writes nothing
    assert restarted.scan_of == {A: "psw-a0000001"}
    assert restarted.lookup_cve("CVE-2024-3094") == model.lookup_cve("CVE-2024-3094")
    assert restarted.lookup_package("liblzma5") == model.lookup_package("liblzma5")
    # the same postings again (a summary re-read) change nothing but nothing was dirty from loading either
    restarted.take_dirty()
    restarted.apply_postings(
        A, postings(REF_A, "psw-a0000001", T0, [vuln(title="xz backdoor", url="https://x/1")], packages)
    )
    assert restarted.take_dirty() == (set(), set(), set(), set())
    restarted.apply_workloads(A, workloads(REF_A, "web", "api"))
    restarted.settle({A: model.digest_runs(A)})  # type: ignore[dict-item]
    assert restarted.take_dirty() == (set(), set(), {A[:2]}, {"CVE-2024-3094"})  # one that changed while down


def test_the_cli_join_over_shards_equals_the_in_memory_lookup() -> None:
    model = indexed(
        (A, postings(REF_A, "psw-a0000001", T0, [vuln()])), (B, postings(REF_B, "psw-b0000001", T0, [vuln()]))
    )
    model.apply_workloads(B, workloads(REF_B, "api", ns="billing"))
    shard = model.cve_shard(storage.shard_of("CVE-2024-3094"))
    runs = {**model.digest_shard(A[:2]).digests, **model.digest_shard(B[:2]).digests}
    assert vulnindex.answer_cve("CVE-2024-3094", shard.cves["CVE-2024-3094"], runs) == model.lookup_cve("CVE-2024-3094")


def test_the_hourly_refresh_of_a_workload_rewrites_nothing() -> None:
    model = indexed((A, postings(REF_A, "psw-a0000001", T0, [vuln()])))
    model.apply_workloads(A, workloads(REF_A, "web"))
    model.take_dirty()
    doc = workloads(REF_A, "web")
    refreshed = msgspec.structs.replace(
        doc, runs=[msgspec.structs.replace(r, last_seen_at=T0 + timedelta(hours=1)) for r in doc.runs]
    )
    model.apply_workloads(A, refreshed)
    assert model.take_dirty() == (set(), set(), set(), set())
    model.apply_workloads(A, workloads(REF_A, "web", ns="billing"))  # moved: shown
    assert model.take_dirty() == (set(), set(), {A[:2]}, {"CVE-2024-3094"})


def test_one_clusters_answer_keeps_its_workloads_and_counts_its_digests() -> None:
    def row(digest: str, cluster: str | None, name: str) -> Affected:
        return Affected(
            digest_ref=f"registry.example.com/app@sha256:{digest * 64}",
            cluster=cluster,
            namespace="shop",
            workload=Workload("Deployment", name),
            package="musl",
            installed_version="1.2.4-r2",
        )

    answer = CveAnswer(
        kind="cve",
        query="CVE-2024-3094",
        digests=2,
        affected=[row("a", "east", "api"), row("a", "west", "api"), row("b", "west", "web"), row("c", None, "old")],
    )
    west = vulnindex.in_cluster(answer, "west")
    assert [(a.cluster, a.workload and a.workload.name) for a in west.affected] == [("west", "api"), ("west", "web")]
    assert west.digests == 2
    assert [a.workload and a.workload.name for a in vulnindex.in_cluster(answer, "default").affected] == ["old"]
    assert vulnindex.in_cluster(answer, "north").affected == []
    with pytest.raises(BadQuery, match="is not a cluster name"):
        vulnindex.in_cluster(answer, "$(id)")
