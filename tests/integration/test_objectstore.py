"""The S3 plumbing against a real SeaweedFS S3 server with an identity configured."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from podsweep.config import S3Settings
from podsweep.objectstore import ObjectMissing, ObjectStore, ObjectTooLarge


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


async def test_object_over_the_cap_is_refused_without_reading_it_whole(store: ObjectStore) -> None:
    await store.put("big.json", b"x" * 10_000)
    with pytest.raises(ObjectTooLarge, match="cap of 1000"):
        await store.get("big.json", max_bytes=1000)
    assert len(await store.get("big.json", max_bytes=10_000)) == 10_000


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
