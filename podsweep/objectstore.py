"""The one S3 client: any S3-compatible endpoint, bucket creation, bounded reads, presigned URLs for one key.

boto3 is synchronous; every call runs in a worker thread so the event loop never blocks on storage.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import boto3
import botocore.exceptions
from botocore.config import Config

from podsweep.config import S3Settings


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
    def presign_put(self, key: str, expires_s: int, content_type: str | None = None) -> str:
        """A URL that can PUT exactly this key until it expires (SigV4; no other key, no other method)."""
        params = {"Bucket": self.bucket, "Key": key}
        if content_type:
            params["ContentType"] = content_type
        url: str = self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=int(expires_s))
        return url

    def presign_get(self, key: str, expires_s: int) -> str:
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_s)
        )
        return url
