"""Who runs it: the real parser on real Trivy 0.76 reports and SBOM, a real nats-server and SeaweedFS, and
`podsweep cve` run as its own process against what the parser stored (the CVE page opened in headless Chromium)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import msgspec
import structlog

from podsweep.config import NatsSettings, S3Settings
from podsweep.objectstore import ObjectStore
from schemas import storage, subjects
from schemas.events import ScanCompleted
from schemas.index import CveAnswer, CveShard, DigestPostings
from schemas.state import SCANS_BUCKET, DigestScanState
from tests.integration.test_parser import (
    T0,
    _chromium,
    _cli_env,
    completed,
    digest_ref,
    eventually,
    make_settings,
    running,
    scan_id,
    seen,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trivy"
NODE_SCAN = (FIXTURES / "trivy-0.76-node-scan-combined.json").read_bytes()
SBOM = (FIXTURES / "trivy-0.76-combined.cdx.json").read_bytes()
RESCAN = (FIXTURES / "trivy-0.76-sbom-rescan-combined.json").read_bytes()  # adds CVE-2020-28500 (lodash)
ALPINE = (FIXTURES / "trivy-0.76-alpine.json").read_bytes()
NEW_CVE, OLD_CVE, SHARED_CVE = "CVE-2020-28500", "CVE-2021-23337", "CVE-2024-45491"


async def cve(s3: S3Settings, *args: str) -> tuple[int, str, str]:
    """`podsweep cve …` as its own process, as a script would run it."""
    env = {**os.environ, **_cli_env(s3), "PODSWEEP_DATA_DIR": "/nonexistent-podsweep"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "podsweep_cli", "cve", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rescan(ref: str, sid: str, at: object) -> ScanCompleted:
    return ScanCompleted(
        cluster="test",
        scan_id=sid,
        digest_ref=ref,
        mode="sbom",
        job=sid,
        raw_key=storage.raw_key(ref, sid),
        finished_at=at,  # type: ignore[arg-type]
    )


async def test_podsweep_cve_shows_who_runs_a_cve_once_a_report_has_it_and_packages_from_the_sbom_before(
    nats_settings: NatsSettings, s3_settings: S3Settings, tmp_path: Path
) -> None:
    app, other = digest_ref(500), digest_ref(501, "registry.example.com/team/edge")
    settings = make_settings(nats_settings, s3_settings)
    async with running(settings) as h:
        await h.publish(seen(app, "shop", "web", "registry.example.com/team/app:2.0"), subjects.IMAGE_SEEN, "c1")
        await h.publish(seen(other, "edge", "proxy", "registry.example.com/team/edge:1"), subjects.IMAGE_SEEN, "c2")
        scans = await h.bus.kv(SCANS_BUCKET)  # the dispatcher's record of the nodes that run a digest
        await scans.put(app.split(":")[1], msgspec.json.encode(DigestScanState(digest_ref=app, nodes_seen=["node-7"])))
        await h.upload(app, scan_id(500), NODE_SCAN, sbom=SBOM)
        await h.complete(completed(app, scan_id(500), T0, sbom=True))
        await h.upload(other, scan_id(501), ALPINE)
        await h.complete(completed(other, scan_id(501), T0))
        await eventually(lambda: _async(len(h.stored) == 2))

        async def shard_has(cve_id: str, digests: int) -> bool:
            data = await h.store.get_if_exists(storage.cve_shard_key(storage.shard_of(cve_id)))
            entry = msgspec.json.decode(data, type=CveShard).cves.get(cve_id) if data else None
            return entry is not None and len(entry.digests) == digests

        await eventually(lambda: shard_has(SHARED_CVE, 2))

        # Before any report has the new CVE: not found, but the package is found from the SBOM.
        code, out, err = await cve(s3_settings, NEW_CVE)
        assert code == 1 and f"{NEW_CVE}: no stored report has it" in err, (code, out, err)
        code, out, _ = await cve(s3_settings, "--package", "lodash@4.17", "--json")
        assert code == 0, out
        found = msgspec.json.decode(out, type=CveAnswer)
        assert [
            (r.namespace, r.workload.name if r.workload else None, r.installed_version) for r in found.affected
        ] == [("shop", "web", "4.17.20")]
        assert found.affected[0].purl_type == "npm" and found.affected[0].nodes == ["node-7"]
        code, _, err = await cve(s3_settings, "--package", "lodash@4.18")
        assert code == 1 and "no stored SBOM or report of a digest has it" in err
        # musl has no finding at all: only the SBOM knows it.
        code, out, _ = await cve(s3_settings, "--package", "MUSL", "--json")
        assert code == 0 and {r.digest_ref for r in msgspec.json.decode(out, type=CveAnswer).affected} == {app}

        # The SBOM rescan after the DB learned of CVE-2020-28500: now it is found, since the rescan.
        later = T0 + timedelta(hours=6)
        await h.upload(app, scan_id(502), RESCAN)
        await h.complete(rescan(app, scan_id(502), later))
        await eventually(lambda: shard_has(NEW_CVE, 1))

        code, out, err = await cve(s3_settings, NEW_CVE.lower(), "--json")
        assert code == 0, (out, err)
        answer = msgspec.json.decode(out, type=CveAnswer)
        [row] = answer.affected
        assert (row.cluster, row.namespace, row.workload and row.workload.name, row.containers) == (
            "test",
            "shop",
            "web",
            ["app"],
        )
        assert (row.image, row.nodes, row.package, row.installed_version, row.fixed_version) == (
            "registry.example.com/team/app:2.0",
            ["node-7"],
            "lodash",
            "4.17.20",
            "4.17.21",
        )
        assert row.since == later and answer.query == NEW_CVE
        code, out, _ = await cve(s3_settings, OLD_CVE, "--json")
        assert code == 0 and msgspec.json.decode(out, type=CveAnswer).affected[0].since == T0  # kept across scans
        code, out, _ = await cve(s3_settings, SHARED_CVE)
        assert code == 0 and "shop" in out and "edge" in out and "Deployment/proxy" in out and "node-7" in out

        page = await eventually(lambda: h.store.get_if_exists(storage.cve_page_key(NEW_CVE)))
        digest_page = (await h.store.get(storage.digest_page_key(app))).decode()
        assert f'href="../cve/{NEW_CVE}.html"' in digest_page

    # A restart reloads the shards: the next scan keeps the since of what it had before.
    async with running(settings) as h:
        await h.upload(app, scan_id(503), RESCAN)
        await h.complete(rescan(app, scan_id(503), later + timedelta(hours=6)))
        await eventually(lambda: _async(len(h.stored) == 1))

        async def digest_shard_moved_on() -> bool:
            data = await h.store.get_if_exists(storage.digest_shard_key(app.split(":")[1][:2]))
            return data is not None and scan_id(503).encode() in data

        await eventually(digest_shard_moved_on)
    code, out, _ = await cve(s3_settings, NEW_CVE, "--json")
    assert code == 0 and msgspec.json.decode(out, type=CveAnswer).affected[0].since == later

    # The CVE page in a real browser: the workload is there, the report's text made no element.
    chromium = _chromium()
    assert chromium, "chromium is not installed: scripts/test.sh installs it (apt-get install -y chromium)"
    site = tmp_path / "index" / "cve"
    site.mkdir(parents=True)
    (site / f"{NEW_CVE}.html").write_bytes(page)
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--dump-dom", (site / f"{NEW_CVE}.html").as_uri(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        dom, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = dom.decode()
    assert proc.returncode == 0 and "<table>" in text and "Deployment/web" in text and "lodash" in text
    assert '<a href="../namespaces/shop.html">shop</a>' in text and "<script" not in text


async def _async(value: bool) -> bool:
    return value


async def test_a_digest_stored_before_the_cve_index_existed_is_indexed_from_its_stored_report_and_sbom(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    app = digest_ref(510)
    settings = make_settings(nats_settings, s3_settings)
    store = ObjectStore(s3_settings)

    async def indexed(cve_id: str) -> bool:
        data = await store.get_if_exists(storage.cve_shard_key(storage.shard_of(cve_id)))
        return data is not None and cve_id in msgspec.json.decode(data, type=CveShard).cves

    async with running(settings) as h:
        await h.publish(seen(app, "shop", "web", "registry.example.com/team/app:2.0"), subjects.IMAGE_SEEN, "c10")
        await h.upload(app, scan_id(510), RESCAN, sbom=SBOM)
        await h.complete(completed(app, scan_id(510), T0, sbom=True))
        await eventually(lambda: indexed(NEW_CVE))
    # What a parser from before the inverted index left behind: reports, summaries and SBOMs, no postings, no shards.
    gone = [key for prefix in ("index/postings/", "index/by-", "index/cve/") for key in await store.list_keys(prefix)]
    assert storage.postings_key(app) in gone
    for key in gone:
        await store.delete(key)
    code, _, err = await cve(s3_settings, NEW_CVE)
    assert code == 1, err

    async with running(settings) as h:
        await eventually(lambda: indexed(NEW_CVE))
        postings = await h.get_json(storage.postings_key(app), DigestPostings)
        assert (postings.scan_id, postings.finished_at, postings.sbom) == (scan_id(510), T0, True)
    code, out, err = await cve(s3_settings, NEW_CVE, "--json")
    assert code == 0, (out, err)
    [row] = msgspec.json.decode(out, type=CveAnswer).affected
    assert (row.namespace, row.workload and row.workload.name, row.fixed_version, row.since) == (
        "shop",
        "web",
        "4.17.21",
        T0,
    )
    code, out, _ = await cve(s3_settings, "--package", "musl", "--json")  # from the SBOM: no finding names musl
    assert code == 0 and [r.digest_ref for r in msgspec.json.decode(out, type=CveAnswer).affected] == [app]


async def test_a_cve_in_a_bucket_without_an_index_is_not_found_and_bad_input_is_an_error(
    s3_settings: S3Settings,
) -> None:
    await ObjectStore(s3_settings).ensure_bucket()
    code, out, err = await cve(s3_settings, "CVE-2024-3094")
    assert code == 1 and "CVE-2024-3094: no stored report has it" in err and "Traceback" not in err
    code, out, err = await cve(s3_settings, "CVE-2024-3094", "--json")
    assert code == 1 and msgspec.json.decode(out, type=CveAnswer).affected == []
    code, _, err = await cve(s3_settings, "--package", "x;$(id)")
    assert code == 2 and "is not a package name" in err and "Traceback" not in err


async def test_a_stored_report_over_the_cap_leaves_its_digest_out_without_stopping_the_index(
    nats_settings: NatsSettings, s3_settings: S3Settings
) -> None:
    app = digest_ref(520)
    settings = make_settings(nats_settings, s3_settings)
    store = ObjectStore(s3_settings)
    async with running(settings) as h:
        await h.publish(seen(app, "shop", "web", "registry.example.com/team/app:2.0"), subjects.IMAGE_SEEN, "c20")
        await h.upload(app, scan_id(520), RESCAN, sbom=SBOM)
        await h.complete(completed(app, scan_id(520), T0, sbom=True))
        await eventually(lambda: store.get_if_exists(storage.postings_key(app)))
    for key in [k for prefix in ("index/postings/", "index/by-") for k in await store.list_keys(prefix)]:
        await store.delete(key)
    # A cap lowered since (the stored report is larger now): the digest waits for its next report, and the
    # index's other work goes on instead of retrying the same read at every flush.
    small = msgspec.structs.replace(settings, parser=msgspec.structs.replace(settings.parser, max_report_mb=0.001))
    with structlog.testing.capture_logs() as logged:
        async with running(small):

            async def said_left_out() -> bool | None:
                return True if any(e["event"].startswith("stored report unreadable") for e in logged) else None

            await eventually(said_left_out)
    assert not [e for e in logged if e["event"] == "postings read failed, will retry"]
    assert await store.get_if_exists(storage.postings_key(app)) is None
