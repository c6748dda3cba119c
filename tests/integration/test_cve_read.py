"""How `podsweep cve` reads index/: plain GETs presigned by podsweep/s3sign.py over the stdlib (static keys, path
style) or boto3 (any other addressing), against a real SeaweedFS holding a small index written as the parser writes
it; both give the same answers. Errors (a refused signature, a failing server, nothing listening, an object over
the cap) are a message naming what failed and exit 2, never a traceback."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest

from podsweep import embedded
from podsweep.config import S3Settings
from podsweep.objectstore import ObjectStore
from podsweep.s3read import PresignedReader, ReadFailed
from podsweep.s3sign import QuerySigner, path_style_root
from schemas import storage
from schemas.events import Workload
from schemas.index import CveAnswer, DigestPostings, PackageVersion, PostedVuln
from schemas.state import DigestWorkloads, WorkloadRun
from services.parser.vulnindex import VulnIndex

T0 = datetime(2026, 12, 1, tzinfo=UTC)
CVE, OTHER = "CVE-2024-3094", "CVE-2023-4863"
# Runs the command in its own process and says on stderr's last line whether boto3 was loaded to answer.
RUN = (
    "import sys; from services.parser import cvecli; code = cvecli.main(sys.argv[1:]); "
    "print('boto3 loaded' if 'boto3' in sys.modules else 'no boto3', file=sys.stderr); sys.exit(code)"
)


def _index() -> VulnIndex:
    """Twelve digests over several digest shards: eight with CVE (and xz-utils), four with OTHER only; two
    workloads each, one digest no workload runs."""
    model = VulnIndex()
    for n in range(12):
        hex_ = f"{n:02x}{n:062x}"
        ref = f"registry.example.com/team/app{n}@sha256:{hex_}"
        cve = CVE if n < 8 else OTHER
        model.apply_postings(
            hex_,
            DigestPostings(
                digest_ref=ref,
                scan_id=f"psw-{n:012x}",
                finished_at=T0 + timedelta(minutes=n),
                sbom=True,
                vulns=[PostedVuln(id=cve, package="xz-utils", installed_version="5.6.0", severity="CRITICAL")],
                packages=[PackageVersion("xz-utils", "5.6.0", "deb"), PackageVersion(f"lib{n}", "1.0", "deb")],
            ),
        )
        runs = [
            WorkloadRun(
                namespace=f"ns-{n % 3}", workload=Workload("Deployment", f"app{n}-{k}"), image=ref.split("@")[0]
            )
            for k in range(0 if n == 5 else 2)
        ]
        model.apply_workloads(hex_, DigestWorkloads(digest_ref=ref, runs=runs))
        model.apply_running(hex_, [f"node-{n % 4}"], None)
    return model


@pytest.fixture
async def indexed(s3_settings: S3Settings) -> S3Settings:
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    model = _index()
    cves, packages, digests, _ = model.take_dirty()
    writes = [store.put(storage.cve_shard_key(s), msgspec.json.encode(model.cve_shard(s))) for s in cves]
    writes += [store.put(storage.package_shard_key(s), msgspec.json.encode(model.package_shard(s))) for s in packages]
    writes += [store.put(storage.digest_shard_key(s), msgspec.json.encode(model.digest_shard(s))) for s in digests]
    await asyncio.gather(*writes)
    return s3_settings


async def cve(s3: S3Settings, *args: str, path_style: bool = True) -> tuple[int, str, list[str]]:
    env = {
        **os.environ,
        "PODSWEEP_S3_ENDPOINT_URL": s3.endpoint_url,
        "PODSWEEP_S3_BUCKET": s3.bucket,
        "PODSWEEP_S3_ACCESS_KEY_ID": s3.access_key_id,
        "PODSWEEP_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
        "PODSWEEP_S3_PATH_STYLE": "true" if path_style else "false",
        "PODSWEEP_DATA_DIR": "/nonexistent-podsweep",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode().splitlines()


QUERIES = {
    "cve": [CVE, "--json"],
    "other_cve": [OTHER.lower(), "--json"],
    "package": ["--package", "XZ-Utils@5.6", "--json"],
    "one_digest_package": ["--package", "lib3", "--json"],
    "table": [CVE],
}


async def test_presigned_gets_and_boto3_give_the_same_answers(indexed: S3Settings) -> None:
    for name, args in QUERIES.items():
        fast, slow = await asyncio.gather(cve(indexed, *args), cve(indexed, *args, path_style=False))
        assert fast[0] == slow[0] == 0, (name, fast, slow)
        assert fast[1] == slow[1], name
        assert fast[2][-1] == "no boto3" and slow[2][-1] == "boto3 loaded", (name, fast[2], slow[2])
    _, out, _ = await cve(indexed, CVE, "--json")
    answer = msgspec.json.decode(out, type=CveAnswer)
    assert answer.digests == 8 and len(answer.affected) == 15  # seven digests with two workloads, one with none
    assert {r.digest_ref.split("@")[0].rsplit("/", 1)[1] for r in answer.affected} == {f"app{n}" for n in range(8)}
    _, out, _ = await cve(indexed, "--package", "xz-utils", "--json")
    assert msgspec.json.decode(out, type=CveAnswer).digests == 12
    for path_style in (True, False):
        code, out, err = await cve(indexed, "CVE-2099-99999", path_style=path_style)
        assert code == 1 and err[0] == "CVE-2099-99999: no stored report has it", (code, out, err)


async def test_a_refused_signature_names_the_key_and_the_status(indexed: S3Settings) -> None:
    wrong = msgspec.structs.replace(indexed, secret_access_key=indexed.secret_access_key + "x")
    code, _, err = await cve(wrong, CVE)
    shard = storage.cve_shard_key(storage.shard_of(CVE))
    assert code == 2, err
    assert err[0].startswith(f"s3: GET {shard} in bucket {indexed.bucket} answered HTTP 403 ("), err
    assert not any("Traceback" in line for line in err)


async def test_a_shard_naming_a_digest_that_is_not_a_hex_is_an_error_not_a_traceback(s3_settings: S3Settings) -> None:
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    shard = storage.shard_of(CVE)
    hits = [{"package": "xz-utils", "installed_version": "5.6.0", "severity": "CRITICAL", "since": T0.isoformat()}]
    doc = {"shard": shard, "cves": {CVE: {"digests": {"../../etc": hits}}}}
    await store.put(storage.cve_shard_key(shard), msgspec.json.encode(doc))
    for path_style in (True, False):
        code, _, err = await cve(s3_settings, CVE, path_style=path_style)
        assert code == 2, err
        assert err[0] == (
            f"a shard of index/ in bucket {s3_settings.bucket} is not a podsweep document (it names a digest "
            "'../../etc', not a SHA-256 hex)"
        ), err


class _Failing(BaseHTTPRequestHandler):
    """An S3 endpoint in trouble: every GET is a 500 with an S3 error body."""

    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        body = b"<?xml version='1.0'?><Error><Code>InternalError</Code></Error>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def failing() -> Iterator[tuple[str, list[str]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.paths  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


async def test_a_failing_server_is_tried_again_then_named_with_its_status(
    s3_settings: S3Settings, failing: tuple[str, list[str]]
) -> None:
    endpoint, paths = failing
    code, _, err = await cve(msgspec.structs.replace(s3_settings, endpoint_url=endpoint), CVE)
    shard = storage.cve_shard_key(storage.shard_of(CVE))
    assert code == 2
    assert err[0] == f"s3: GET {shard} in bucket {s3_settings.bucket} answered HTTP 500 (InternalError)", err
    assert [p.split("?")[0] for p in paths] == [f"/{s3_settings.bucket}/{shard}"] * 3  # the attempts
    assert not any("Traceback" in line for line in err)


class _Elsewhere(BaseHTTPRequestHandler):
    """AWS S3 asked in the wrong region: every GET is a 301 PermanentRedirect naming the bucket's region."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Authorization", "")))  # type: ignore[attr-defined]
        body = b"<?xml version='1.0'?><Error><Code>PermanentRedirect</Code></Error>"
        self.send_response(301)
        self.send_header("x-amz-bucket-region", "eu-west-1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


async def test_a_bucket_in_another_region_is_read_again_through_boto3_which_follows_the_redirect(
    s3_settings: S3Settings,
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Elsewhere)
    server.requests = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        code, _, err = await cve(msgspec.structs.replace(s3_settings, endpoint_url=endpoint), CVE)
    finally:
        server.shutdown()
        server.server_close()
    requests = server.requests  # type: ignore[attr-defined]
    assert code == 2 and not any("Traceback" in line for line in err), err  # this server redirects boto3 too
    assert err[0].startswith(f"note: bucket {s3_settings.bucket} is not in region {s3_settings.region}"), err
    presigned = [path for path, auth in requests if "X-Amz-Signature=" in path]
    signed_headers = [path for path, auth in requests if auth.startswith("AWS4-HMAC-SHA256")]
    assert len(presigned) == 1 and signed_headers, requests  # no retry of a redirect; then boto3's own request


async def test_nothing_listening_is_named_without_a_traceback(s3_settings: S3Settings) -> None:
    endpoint = f"http://127.0.0.1:{embedded.free_port()}"
    code, _, err = await cve(msgspec.structs.replace(s3_settings, endpoint_url=endpoint), CVE)
    assert code == 2
    assert err[0].startswith(f"s3: cannot reach {endpoint} (bucket {s3_settings.bucket}, key index/by-cve/"), err
    assert "Connection refused" in err[0] and not any("Traceback" in line for line in err)


async def test_reads_are_bounded_and_absent_objects_are_none(s3_settings: S3Settings) -> None:
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    await asyncio.gather(*(store.put(f"index/t/{n}.json", b"x" * (100 + n)) for n in range(40)))
    root = path_style_root(s3_settings.endpoint_url, s3_settings.region, s3_settings.bucket, True, {}, False)
    assert root is not None
    signer = QuerySigner(root, s3_settings.region, s3_settings.access_key_id, s3_settings.secret_access_key)
    reader = PresignedReader(signer, s3_settings.bucket)
    keys = [f"index/t/{n}.json" for n in range(40)] + ["index/t/absent.json"]
    found = await asyncio.to_thread(reader.get_many, keys, 139)
    assert found == [b"x" * (100 + n) for n in range(40)] + [None]  # in order, over keep-alive connections
    with pytest.raises(ReadFailed, match=r"^s3: index/t/39.json in bucket \S+ is 139 bytes, over the cap of 138$"):
        await asyncio.to_thread(reader.get_many, keys, 138)
    assert await asyncio.to_thread(reader.get, "index/t/0.json", 100) == b"x" * 100
    reader.close()
