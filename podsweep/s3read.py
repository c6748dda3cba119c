"""Reading many small objects by presigned GET over the stdlib's http.client, for a command that must answer before
boto3 and aiohttp would have finished importing (`podsweep cve`).

One keep-alive connection per worker thread, all GETs at once. Only for static keys and an address podsweep can
build itself (podsweep/s3sign.py); every other case reads through ObjectStore.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import cast
from urllib.parse import urlsplit

from podsweep.s3sign import QuerySigner
from schemas.storage import checked_key

ATTEMPTS = 3  # a connection that failed or a 5xx is tried again, as botocore's standard retries would
RETRY_STATUS = frozenset({500, 502, 503, 504})
_ERROR_BODY_BYTES = 4096
_CODE_RE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


class ReadFailed(Exception):
    """An object could not be read: the message names the key, the bucket, and the endpoint or the HTTP status
    (`status`, when the server answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PresignedReader:
    def __init__(
        self, signer: QuerySigner, bucket: str, connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0
    ) -> None:
        self.bucket = bucket
        self.origin = signer.origin
        self._signer = signer
        parts = urlsplit(signer.origin)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []

    def get_many(self, keys: Sequence[str], max_bytes: int, workers: int = 32) -> list[bytes | None]:
        """Each key's bytes (None when absent), in the order given; ReadFailed on the first that cannot be read.
        The connections are closed when it returns."""
        try:
            if len(keys) <= 1:
                return [self.get(key, max_bytes) for key in keys]
            with ThreadPoolExecutor(min(workers, len(keys))) as pool:
                return list(pool.map(lambda key: self.get(key, max_bytes), keys))
        finally:
            self.close()

    def close(self) -> None:
        """Close every connection opened so far (each thread's)."""
        while self._opened:
            self._opened.pop().close()
        self._local = threading.local()

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """The object's bytes, None when absent (404); never more than `max_bytes` + 1 read."""
        url = self._signer.presign("GET", checked_key(key), 60, datetime.now(UTC))
        target = url[len(self.origin) :]
        for attempt in range(1, ATTEMPTS + 1):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                if not reused:
                    conn.connect()  # within the connect timeout; each read then waits up to the read timeout
                    cast("socket.socket", conn.sock).settimeout(self._read_timeout_s)
                conn.request("GET", target)
                response = conn.getresponse()
                if response.status in RETRY_STATUS and attempt < ATTEMPTS:
                    self._close()
                    time.sleep(0.1 * 2**attempt)
                    continue
                return self._body(response, key, max_bytes)
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                if attempt == ATTEMPTS:
                    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                    raise ReadFailed(
                        f"s3: cannot reach {self.origin} (bucket {self.bucket}, key {key}): {reason}; is the endpoint "
                        "up and reachable from here?"
                    ) from None
                if not reused:  # a keep-alive connection the server closed is tried again at once
                    time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _body(self, response: http.client.HTTPResponse, key: str, max_bytes: int) -> bytes | None:
        if response.status != 200:
            detail = response.read(_ERROR_BODY_BYTES + 1)
            if len(detail) > _ERROR_BODY_BYTES or response.status != 404:
                self._close()  # not worth draining, or the server may be in trouble: a new connection next time
            if response.status == 404:
                return None
            code = _CODE_RE.search(detail)
            said = f" ({code.group(1).decode()})" if code else ""
            raise ReadFailed(
                f"s3: GET {key} in bucket {self.bucket} answered HTTP {response.status}{said}", response.status
            )
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            self._close()
            raise ReadFailed(f"s3: {key} in bucket {self.bucket} is {length} bytes, over the cap of {max_bytes}")
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            self._close()
            raise ReadFailed(f"s3: {key} in bucket {self.bucket} is over the cap of {max_bytes} bytes")
        if not response.isclosed():  # a chunked body that ended exactly at the cap: its last chunk, empty
            response.read()
        return data

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                import ssl  # only for https: a few milliseconds the loopback case does not pay

                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._connect_timeout_s, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout_s)
            self._local.conn = conn
            self._opened.append(conn)
        return conn

    def _close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
