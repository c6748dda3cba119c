"""The one S3 client: any S3-compatible endpoint, bucket creation, bounded reads, presigned URLs for one key.

boto3 is synchronous; every call runs in a worker thread so the event loop never blocks on storage. Presigning with
static keys is our own SigV4 query signer (podsweep/s3sign.py; botocore's builds a request object per URL); it must never
sign anything but one key and one method.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

import aiohttp
import boto3
import botocore.exceptions
from botocore.config import Config
from opentelemetry import metrics

from podsweep.config import S3Settings
from podsweep.s3sign import QuerySigner as QuerySigner  # where the static-key signer lives; imported from here too
from schemas.storage import StorageKey, checked_key

requests_counter = metrics.get_meter("podsweep.objectstore").create_counter(
    "podsweep_s3_requests", description="S3 calls (after botocore's retries), by operation and outcome"
)


def _count_answer(http_response: object, event_name: str, **_: object) -> None:
    """An HTTP answer: `ok` below 400, else `http_4xx`/`http_5xx` (a missing key is an answer, not an outage)."""
    status = int(getattr(http_response, "status_code", 0))
    outcome = "ok" if status < 400 else f"http_{status // 100}xx"
    requests_counter.add(1, {"operation": event_name.rsplit(".", 1)[-1], "outcome": outcome})


def _count_unanswered(event_name: str, **_: object) -> None:
    """No HTTP answer at all: connection refused, DNS, TLS, timeout (what "S3 unreachable" means)."""
    requests_counter.add(1, {"operation": event_name.rsplit(".", 1)[-1], "outcome": "error"})


class ObjectTooLarge(ValueError):
    """An object is bigger than the configured cap; it is not read into memory."""


class ObjectMissing(KeyError):
    """No object under this key."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    etag: str


class ObjectStore:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._signer: QuerySigner | None = None
        self._client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id or None,
            aws_secret_access_key=settings.secret_access_key or None,
            config=Config(
                signature_version="s3v4",  # facts: the default presign for custom endpoints is SigV2, refused
                s3={"addressing_style": "path" if settings.path_style else "auto"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                max_pool_connections=32,
            ),
        )
        # Each call's outcome once botocore is done retrying: what an "S3 unreachable" alert reads.
        self._client.meta.events.register("after-call.s3", _count_answer)
        self._client.meta.events.register("after-call-error.s3", _count_unanswered)

    # -- bucket -------------------------------------------------------------------------------------------------
    def _ensure_bucket_sync(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in {"404", "NoSuchBucket", "NotFound"} and time.monotonic() > deadline:
                    raise
            except botocore.exceptions.EndpointConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            try:
                self._client.create_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    return
                # facts: SeaweedFS answers InternalError for a few seconds after its S3 port opens
                if time.monotonic() > deadline:
                    raise RuntimeError(f"s3: cannot create bucket {self.bucket!r}: {code}") from exc
                time.sleep(0.3)

    async def ensure_bucket(self, wait_s: float = 20.0) -> None:
        """Create the bucket when missing (idempotent), retrying briefly while a fresh server warms up."""
        await asyncio.to_thread(self._ensure_bucket_sync, wait_s)

    # -- objects ------------------------------------------------------------------------------------------------
    async def put(self, key: str, body: bytes, content_type: str = "application/json") -> None:
        await asyncio.to_thread(
            self._client.put_object, Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
        )

    async def put_new(self, key: str, body: bytes, content_type: str = "application/json") -> bool:
        """Write `key` only if no object is there yet (If-None-Match: *): False when one is, which stays as it was."""
        try:
            await asyncio.to_thread(
                self._client.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                IfNoneMatch="*",
            )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}:
                return False
            raise
        return True

    def _get_sync(self, key: str, max_bytes: int | None) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise ObjectMissing(key) from None
            raise
        size = int(response.get("ContentLength", 0))
        body = response["Body"]
        try:
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(f"s3: {key} is {size} bytes, over the cap of {max_bytes}")
            data: bytes = body.read() if max_bytes is None else body.read(max_bytes + 1)
        finally:
            body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"s3: {key} is over the cap of {max_bytes} bytes")
        return data

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ObjectMissing when absent, ObjectTooLarge past `max_bytes` (never read whole)."""
        return await asyncio.to_thread(self._get_sync, key, max_bytes)

    async def fetch(self, client: aiohttp.ClientSession, key: str, max_bytes: int) -> bytes | None:
        """The object's bytes (None when absent) over a caller's aiohttp session and a presigned GET valid for a
        minute: for a hot path, a fraction of boto3's CPU per read. Falls back to `get` when the credentials are not
        static keys (no signer of our own). ObjectTooLarge past `max_bytes`, never read whole."""
        signer = self.signer()
        if signer is None:
            return await self.get_if_exists(key, max_bytes)
        url = signer.presign("GET", checked_key(key), 60, datetime.now(UTC))
        try:
            async with client.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=30)) as response:
                return await self._fetched(response, key, max_bytes)
        except (aiohttp.ClientError, TimeoutError):
            requests_counter.add(1, {"operation": "GetObject", "outcome": "error"})
            raise

    async def _fetched(self, response: aiohttp.ClientResponse, key: str, max_bytes: int) -> bytes | None:
        requests_counter.add(
            1,
            {
                "operation": "GetObject",
                "outcome": "ok" if response.status < 400 else f"http_{response.status // 100}xx",
            },
        )
        if response.status == 404:
            return None
        if response.status != 200:
            raise RuntimeError(f"s3: GET {key} in bucket {self.bucket} answered HTTP {response.status}")
        if (response.content_length or 0) > max_bytes:
            raise ObjectTooLarge(f"s3: {key} is {response.content_length} bytes, over the cap of {max_bytes}")
        data = await response.content.read(max_bytes + 1)
        while len(data) <= max_bytes and not response.content.at_eof():
            more = await response.content.read(max_bytes + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"s3: {key} is over the cap of {max_bytes} bytes")
        return data

    async def get_if_exists(self, key: str, max_bytes: int | None = None) -> bytes | None:
        try:
            return await self.get(key, max_bytes)
        except ObjectMissing:
            return None

    async def copy(self, source_key: str, key: str) -> None:
        """Server-side copy inside the bucket: the bytes never pass through podsweep (used for quarantine)."""
        try:
            await asyncio.to_thread(
                self._client.copy_object,
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": source_key},
            )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise ObjectMissing(source_key) from None
            raise

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=key)

    async def list_keys(self, prefix: str) -> list[str]:
        def run() -> list[str]:
            keys: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [item["Key"] for item in page.get("Contents", [])]
            return keys

        return await asyncio.to_thread(run)

    # -- presigned URLs -----------------------------------------------------------------------------------------
    def signer(self) -> QuerySigner | None:
        """Our own signer when the credentials are static keys; None (botocore presigns) for any other credentials
        (environment chain, session tokens, rotation), which botocore resolves and refreshes."""
        if self._signer is None and self.settings.access_key_id and self.settings.secret_access_key:
            # botocore decides the addressing (path or virtual-hosted) once; the key is appended to this root.
            probe: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": "probe"}, ExpiresIn=60
            )
            base = probe.split("?", 1)[0].removesuffix("probe")
            self._signer = QuerySigner(
                base, self.settings.region, self.settings.access_key_id, self.settings.secret_access_key
            )
        return self._signer

    def presign_put(self, key: StorageKey, expires_s: int, content_type: str | None = None) -> str:
        """A URL that can PUT exactly this key until it expires (SigV4; no other key, no other method)."""
        checked_key(key)
        signer = None if content_type else self.signer()
        if signer is not None:
            return signer.presign("PUT", key, int(expires_s), datetime.now(UTC))
        params = {"Bucket": self.bucket, "Key": key}
        if content_type:
            params["ContentType"] = content_type
        url: str = self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=int(expires_s))
        return url

    def presign_upload(self, key: StorageKey, expires_s: int, max_bytes: int) -> str:
        """One string for a scan Job's env: a POST upload of at most `max_bytes` to exactly `key` until it expires.

        It is the bucket's URL with the POST policy's form fields as its query (`podsweep upload` sends them as the
        form, then the file), so it travels like a presigned URL and is redacted like one (the query is the
        credential). Any holder can upload again until it expires: S3 has no create-only POST condition, so the
        uploader's own If-None-Match guards only against an object written before it.
        """
        checked_key(key)
        signer = self.signer()
        if signer is not None:
            url, fields = signer.presign_post(self.bucket, key, int(expires_s), max_bytes, datetime.now(UTC))
        else:
            post = self._client.generate_presigned_post(
                self.bucket, key, Conditions=[["content-length-range", 0, max_bytes]], ExpiresIn=int(expires_s)
            )
            url, fields = str(post["url"]), {str(k): str(v) for k, v in post["fields"].items()}
        return f"{url}?{urlencode(fields, safe='/')}"  # the key reads as itself in the query

    def presign_get(self, key: StorageKey, expires_s: int) -> str:
        """A URL that can GET exactly this key until it expires; never the bucket (its GET lists the keys)."""
        checked_key(key)
        signer = self.signer()
        if signer is not None:
            return signer.presign("GET", key, int(expires_s), datetime.now(UTC))
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_s)
        )
        return url
