"""The S3 plumbing against a real SeaweedFS S3 server with an identity configured."""

from __future__ import annotations

import asyncio
import gzip
import os
from pathlib import Path

import aiohttp
import httpx
import pytest

from podsweep.config import S3Settings
from podsweep.objectstore import ObjectMissing, ObjectStore, ObjectTooLarge
from schemas.storage import StorageKey
from services.dispatcher import upload


@pytest.fixture
async def store(s3_settings: S3Settings) -> ObjectStore:
    s = ObjectStore(s3_settings)
    await s.ensure_bucket()
    return s


async def test_round_trip_and_bucket_creation_is_idempotent(store: ObjectStore) -> None:
    await store.ensure_bucket()
    await store.put("raw/sha256/aa/scan-0001.json", b'{"ok": true}')
    assert await store.get("raw/sha256/aa/scan-0001.json") == b'{"ok": true}'
    assert await store.list_keys("raw/") == ["raw/sha256/aa/scan-0001.json"]
    assert await store.get_if_exists("raw/missing.json") is None
    with pytest.raises(ObjectMissing):
        await store.get("raw/missing.json")


async def test_put_new_writes_only_where_no_object_is(store: ObjectStore) -> None:
    assert await store.put_new("index/postings/aa.json", b"first")
    assert not await store.put_new("index/postings/aa.json", b"second")
    assert await store.get("index/postings/aa.json") == b"first"


async def test_object_over_the_cap_is_refused_without_reading_it_whole(store: ObjectStore) -> None:
    await store.put("big.json", b"x" * 10_000)
    with pytest.raises(ObjectTooLarge, match="cap of 1000"):
        await store.get("big.json", max_bytes=1000)
    assert len(await store.get("big.json", max_bytes=10_000)) == 10_000


async def test_fetch_over_a_shared_session_reads_bounded_and_says_missing(store: ObjectStore) -> None:
    await store.put("reports/sha256/cc/latest.json", b'{"ok": true}')
    await store.put("reports/sha256/cc/big.json", b"x" * 10_000)
    async with aiohttp.ClientSession() as client:
        assert await store.fetch(client, "reports/sha256/cc/latest.json", 1000) == b'{"ok": true}'
        assert await store.fetch(client, "reports/sha256/cc/missing.json", 1000) is None
        with pytest.raises(ObjectTooLarge, match="cap of 1000"):
            await store.fetch(client, "reports/sha256/cc/big.json", 1000)
        assert len(await store.fetch(client, "reports/sha256/cc/big.json", 10_000) or b"") == 10_000
        with pytest.raises(ValueError, match="not a podsweep key"):
            await store.fetch(client, "../etc/passwd", 1000)


async def test_presigned_put_works_over_plain_http_for_its_key_only(store: ObjectStore) -> None:
    url = store.presign_put("raw/sha256/bb/scan-0002.json", expires_s=60)
    async with httpx.AsyncClient() as http:
        ok = await http.put(url, content=b'{"Results": []}')
        assert ok.status_code == 200, ok.text
        assert await store.get("raw/sha256/bb/scan-0002.json") == b'{"Results": []}'

        other_key = await http.put(url.replace("scan-0002", "scan-0003"), content=b"evil")
        assert other_key.status_code == 403
        anonymous = await http.put(url.split("?")[0].replace("scan-0002", "scan-0004"), content=b"evil")
        assert anonymous.status_code == 403
        get_with_put_url = await http.get(url)
        assert get_with_put_url.status_code == 403
    assert await store.get_if_exists("raw/sha256/bb/scan-0003.json") is None
    assert await store.get_if_exists("raw/sha256/bb/scan-0004.json") is None


async def test_presigned_put_is_refused_after_it_expires(store: ObjectStore) -> None:
    url = store.presign_put("raw/sha256/cc/scan-0005.json", expires_s=1)
    await asyncio.sleep(2.1)
    async with httpx.AsyncClient() as http:
        late = await http.put(url, content=b"{}")
    assert late.status_code == 403


def _upload(url: str, path: Path) -> int:
    """`podsweep upload` of one file to `url`, as the scan Job runs it; its exit code."""
    return upload.run([f"{path}=UPLOAD_URL"], env={"UPLOAD_URL": url}, policy=upload.RetryPolicy(attempts=1))


async def test_an_upload_url_takes_its_key_only_and_at_most_its_size(store: ObjectStore, tmp_path: Path) -> None:
    key = StorageKey("raw/sha256/dd/scan-0006.json")
    url = store.presign_upload(key, expires_s=60, max_bytes=1000)
    form = upload.post_form(url)
    assert form is not None
    bucket_url, fields = form
    async with httpx.AsyncClient() as http:
        too_big = await http.post(bucket_url, data=dict(fields), files={"file": ("f", b"x" * 1001)})
        assert too_big.status_code == 400 and "EntityTooLarge" in too_big.text
        assert await store.get_if_exists(key) is None
        other_key = dict(fields) | {"key": "raw/sha256/dd/scan-0007.json"}
        elsewhere = await http.post(bucket_url, data=other_key, files={"file": ("f", b"x")})
        assert elsewhere.status_code == 403
        assert await store.get_if_exists("raw/sha256/dd/scan-0007.json") is None
        at_the_bound = await http.post(bucket_url, data=dict(fields), files={"file": ("f", b"x" * 1000)})
        assert at_the_bound.is_success, at_the_bound.text
    assert await store.get(key) == b"x" * 1000


async def test_the_uploader_sends_through_an_upload_url_and_never_replaces_what_is_there(
    store: ObjectStore, tmp_path: Path
) -> None:
    key = StorageKey("raw/sha256/ee/scan-0008.json")
    url = store.presign_upload(key, expires_s=60, max_bytes=100_000)
    report, other = tmp_path / "report.json", tmp_path / "other.json"
    report.write_bytes(b'{"SchemaVersion": 2}')
    other.write_bytes(b'{"SchemaVersion": 2, "Results": []}')

    assert await asyncio.to_thread(_upload, url, report) == upload.EXIT_OK
    assert gzip.decompress(await store.get(key)) == report.read_bytes()

    assert await asyncio.to_thread(_upload, url, other) == upload.EXIT_UPLOAD_FAILED, "412: it is there already"
    assert gzip.decompress(await store.get(key)) == report.read_bytes()


async def test_the_uploader_refuses_a_file_over_the_urls_bound(store: ObjectStore, tmp_path: Path) -> None:
    key = StorageKey("raw/sha256/ff/scan-0009.json")
    url = store.presign_upload(key, expires_s=60, max_bytes=64)
    report = tmp_path / "report.json"
    report.write_bytes(os.urandom(4096))  # gzip cannot make random bytes smaller

    assert await asyncio.to_thread(_upload, url, report) == upload.EXIT_UPLOAD_FAILED
    assert await store.get_if_exists(key) is None
