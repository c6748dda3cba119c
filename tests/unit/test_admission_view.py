"""The admission view: what the index, image.seen, report.stored and loaded findings make it remember."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import ImageSeen, ReportStored, SeverityCounts, Workload
from schemas.index import DigestSummary, IndexedDigest, SummaryIndex
from schemas.report import Finding
from services.admission.view import View, compact

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
REPO = "registry.example.com/team/app"


def ref(c: str) -> str:
    return f"{REPO}@sha256:{c * 64}"


def summary(c: str, stored_at: datetime, critical: int = 1) -> DigestSummary:
    return DigestSummary(
        digest_ref=ref(c),
        scan_id=f"scan-{c * 4}",
        finished_at=stored_at,
        stored_at=stored_at,
        counts=SeverityCounts(CRITICAL=critical),
        fixable=SeverityCounts(CRITICAL=critical),
        report_key="reports/a.json",
        history_key="reports/b.json",
    )


def seen(image: str, c: str, at: datetime) -> ImageSeen:
    return ImageSeen(
        cluster="default",
        digest_ref=ref(c),
        image=image,
        node="n",
        namespace="ns",
        pod="p",
        container="c",
        container_kind="app",
        workload=Workload(kind="Pod", name="p"),
        observed_at=at,
    )


def stored(c: str, scan_id: str, at: datetime, critical: int = 1) -> ReportStored:
    counts = SeverityCounts(CRITICAL=critical)
    return ReportStored(
        cluster="default",
        scan_id=scan_id,
        digest_ref=ref(c),
        report_key="reports/a.json",
        history_key="reports/b.json",
        counts=counts,
        fixable=counts,
        stored_at=at,
    )


def index_with_two_digests_for_one_tag() -> SummaryIndex:
    return SummaryIndex(
        generated_at=NOW,
        digests={
            "a" * 64: IndexedDigest(digest_ref=ref("a"), images=[f"{REPO}:1"], report=summary("a", NOW - timedelta(1))),
            "b" * 64: IndexedDigest(digest_ref=ref("b"), images=[f"{REPO}:1"], report=summary("b", NOW)),
            "c" * 64: IndexedDigest(digest_ref=ref("c"), images=[f"{REPO}:2"]),
        },
    )


def test_the_index_maps_a_tag_to_its_digest_with_the_newest_report() -> None:
    view = View()
    view.load_index(index_with_two_digests_for_one_tag())
    found = view.lookup(f"{REPO}:1")
    assert (found.resolution, found.digest_ref, found.seen_at) == ("tag", ref("b"), None)


def test_a_sighting_beats_the_index_and_a_later_sighting_beats_an_earlier_one() -> None:
    view = View()
    view.load_index(index_with_two_digests_for_one_tag())
    view.apply_seen(seen(f"{REPO}:1", "a", NOW - timedelta(hours=1)))
    assert view.lookup(f"{REPO}:1").digest_ref == ref("a")
    view.apply_seen(seen(f"{REPO}:1", "b", NOW - timedelta(hours=2)))  # older: ignored
    assert view.lookup(f"{REPO}:1").digest_ref == ref("a")
    view.apply_seen(seen(f"{REPO}:1", "b", NOW))
    assert view.lookup(f"{REPO}:1").digest_ref == ref("b")


def test_a_tag_follows_only_this_clusters_sightings_while_every_clusters_digest_is_known() -> None:
    view = View()
    view.apply_seen(seen(f"{REPO}:1", "a", NOW - timedelta(hours=1)))
    view.apply_seen(seen(f"{REPO}:1", "b", NOW), here=False)  # another cluster of the fleet runs the tag as b
    assert view.lookup(f"{REPO}:1").digest_ref == ref("a")
    assert view.lookup(ref("b")).entry is not None  # b's report still counts wherever b runs


def test_a_digest_known_without_report_has_no_facts_and_is_not_wanted() -> None:
    view = View()
    view.load_index(index_with_two_digests_for_one_tag())
    entry = view.lookup(f"{REPO}:2").entry
    assert entry is not None and entry.report is None
    assert sorted(w.hex for w in view.wanted()) == ["a" * 64, "b" * 64]


def test_findings_of_a_superseded_scan_are_not_attached() -> None:
    view = View()
    view.apply_report(stored("a", "scan-0001", NOW))
    wanted = view.apply_report(stored("a", "scan-0002", NOW + timedelta(minutes=1)))
    assert wanted is not None and wanted.scan_id == "scan-0002"
    assert not view.apply_findings("a" * 64, "scan-0001", ())
    assert view.apply_findings("a" * 64, "scan-0002", ())
    assert view.digests["a" * 64].findings == ()


def test_an_older_report_arriving_late_changes_nothing() -> None:
    view = View()
    view.apply_report(stored("a", "scan-0002", NOW))
    assert view.apply_report(stored("a", "scan-0001", NOW - timedelta(hours=1))) is None
    report = view.digests["a" * 64].report
    assert report is not None and report.scan_id == "scan-0002"


def test_a_clean_report_needs_no_findings() -> None:
    view = View()
    assert view.apply_report(stored("a", "scan-0001", NOW, critical=0)) is None
    assert view.digests["a" * 64].findings == ()


@pytest.mark.parametrize(
    ("image", "resolution", "digest_ref"),
    [
        (ref("a"), "digest", ref("a")),
        (f"{REPO}:1@sha256:{'a' * 64}", "digest", ref("a")),
        (f"{REPO}:9@sha256:{'f' * 64}", "digest", ref("f")),
        (f"{REPO}:unseen", "unknown", None),
        ("NOT/valid:ref", "unknown", None),
    ],
    ids=["digest-ref", "tag-and-digest", "unseen-digest-keeps-its-ref", "unseen-tag", "invalid"],
)
def test_lookup_forms(image: str, resolution: str, digest_ref: str | None) -> None:
    view = View()
    view.apply_report(stored("a", "scan-0001", NOW))
    found = view.lookup(image)
    assert (found.resolution, found.digest_ref) == (resolution, digest_ref)


def test_compact_keeps_the_worst_and_drops_display_text() -> None:
    findings = [
        Finding(id=f"CVE-{i}", package="p", installed_version="1", severity="LOW", title="long text " * 50)
        for i in range(10)
    ]
    findings.append(Finding(id="CVE-worst", package="p", installed_version="1", severity="CRITICAL"))
    kept = compact(findings, limit=3)
    assert kept[0].id == "CVE-worst" and len(kept) == 3
    assert all(f.title == "" for f in kept)
