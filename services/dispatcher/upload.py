"""`podsweep upload` / `podsweep download`: scan Jobs move files to and from presigned S3 URLs, with bounded retries.

Must never print a URL's query string (it is the credential) and never take a URL from the command line: the Job
puts URLs in environment variables, and arguments name the variables (`FILE=ENV_VAR`).

The object is the gzip of the file, stored as it is with `Content-Type: application/gzip` (no Content-Encoding), so
no client along the way decompresses the object behind the parser's back. Readers recognise gzip by its magic bytes
(1f 8b). A URL with a POST policy in its query (the dispatcher's, bounding the size) is sent as a form upload with
If-None-Match; a plain presigned URL is PUT.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import msgspec
import tenacity

from podsweep import logs

log = logs.get("podsweep.upload")

EXIT_OK = 0
EXIT_UPLOAD_FAILED = 1
EXIT_BAD_INPUT = 2

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
MAX_FILE_BYTES = 512 * 1024 * 1024
# Statuses worth another try: the server or something in front of it is overloaded or restarting.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class BadInput(ValueError):
    """An argument, file or environment variable the uploader cannot use; retrying will not help."""


class Upload(msgspec.Struct, frozen=True):
    path: str
    url_env: str


class UploadTarget(msgspec.Struct, frozen=True):
    path: str
    url: str


class RetryableStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    attempts: int = 8  # waits 1, 2, 4, 8, 16, 30, 30 s: an S3 restarting (about a minute) is waited for
    first_wait_s: float = 1.0
    max_wait_s: float = 30.0
    timeout_s: float = 60.0


def parse_upload(arg: str) -> Upload:
    """`/podsweep/out/report.json=PODSWEEP_RAW_URL` → Upload; raises BadInput saying what was expected."""
    path, sep, env = arg.rpartition("=")
    if not sep or not path or not _ENV_NAME.match(env):
        raise BadInput(f"upload: argument {arg[:200]!r} is not FILE=ENV_VAR (e.g. /podsweep/out/report.json=RAW_URL)")
    return Upload(path=path, url_env=env)


def redact(url: str) -> str:
    """The URL without query and fragment (a presigned URL's query is its signature), for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def resolve(uploads: Sequence[Upload], env: Mapping[str, str]) -> list[UploadTarget]:
    """Each file with its URL from the environment; raises BadInput naming the missing or bad piece."""
    targets = []
    for up in uploads:
        url = env.get(up.url_env, "")
        if not url:
            raise BadInput(f"upload: environment variable {up.url_env} (the URL for {up.path}) is empty or unset")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadInput(f"upload: {up.url_env} is not an http(s) URL (starts with {url[:8]!r})")
        targets.append(UploadTarget(path=up.path, url=url))
    return targets


def read_gzipped(path: str) -> bytes:
    """The file's gzip (mtime 0, so the same file gives the same bytes); raises BadInput when it cannot be read."""
    file = Path(path)
    try:
        size = file.stat().st_size
        if not file.is_file():
            raise BadInput(f"upload: {path} is not a regular file")
        if size > MAX_FILE_BYTES:
            raise BadInput(f"upload: {path} is {size} bytes (at most {MAX_FILE_BYTES})")
        data = file.read_bytes()
    except OSError as exc:
        raise BadInput(f"upload: cannot read {path}: {exc.strerror or exc}") from None
    return gzip.compress(data, compresslevel=6, mtime=0)


class PermanentStatus(Exception):
    """A status another try cannot fix (403: signature expired or for another key; 400; 404 bucket)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def post_form(url: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(bucket URL, form fields) when `url` carries a POST policy (ObjectStore.presign_upload); None for a PUT URL."""
    parts = urlsplit(url)
    fields = parse_qsl(parts.query, keep_blank_values=True)
    if not any(name == "policy" for name, _ in fields):
        return None
    return f"{parts.scheme}://{parts.netloc}{parts.path}", fields


def _put_once(client: httpx.Client, target: UploadTarget, body: bytes, number: int) -> None:
    where = redact(target.url)
    form = post_form(target.url)
    try:
        if form is None:
            response = client.put(target.url, content=body, headers={"Content-Type": "application/gzip"})
        else:
            # If-None-Match: an object already under this key (written with this URL by someone else first) fails
            # the upload rather than being replaced by it.
            bucket_url, fields = form
            response = client.post(
                bucket_url,
                data=dict(fields),
                files={"file": ("upload.gz", body, "application/gzip")},
                headers={"If-None-Match": "*"},
            )
    except httpx.TransportError as exc:
        log.warning("upload attempt failed", file=target.path, url=where, attempt=number, error=type(exc).__name__)
        raise
    if response.is_success:
        log.info("upload attempt ok", file=target.path, url=where, attempt=number, status=response.status_code)
        return
    if response.status_code == 412 and form is not None and number > 1:
        # An earlier attempt whose answer was lost wrote it (or someone raced this retry: the parser judges it).
        log.warning("upload already there after a retry", file=target.path, url=where, attempt=number)
        return
    log.warning("upload attempt failed", file=target.path, url=where, attempt=number, status=response.status_code)
    if response.status_code in _RETRYABLE_STATUS:
        raise RetryableStatus(response.status_code)
    raise PermanentStatus(response.status_code)


def _retrying(policy: RetryPolicy) -> tenacity.Retrying:
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s),
        retry=tenacity.retry_if_exception_type((httpx.TransportError, RetryableStatus)),
        reraise=True,
    )


def put(client: httpx.Client, target: UploadTarget, body: bytes, policy: RetryPolicy) -> bool:
    """PUT body to the target's URL with bounded exponential retries; True when S3 accepted it."""
    try:
        for attempt in _retrying(policy):
            with attempt:
                _put_once(client, target, body, attempt.retry_state.attempt_number)
    except (httpx.TransportError, RetryableStatus, PermanentStatus):
        return False
    return True


def _get_once(client: httpx.Client, target: UploadTarget, number: int) -> bytes:
    where = redact(target.url)
    try:
        with client.stream("GET", target.url) as response:
            if response.is_success:
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > MAX_FILE_BYTES:
                        log.error("download too large", file=target.path, url=where, limit=MAX_FILE_BYTES)
                        raise PermanentStatus(response.status_code)
                log.info("download attempt ok", file=target.path, url=where, attempt=number, bytes=len(body))
                return bytes(body)
    except httpx.TransportError as exc:
        log.warning("download attempt failed", file=target.path, url=where, attempt=number, error=type(exc).__name__)
        raise
    log.warning("download attempt failed", file=target.path, url=where, attempt=number, status=response.status_code)
    if response.status_code in _RETRYABLE_STATUS:
        raise RetryableStatus(response.status_code)
    raise PermanentStatus(response.status_code)


def unpacked(body: bytes) -> bytes:
    """The object as the file it was: gunzipped when it starts with the gzip magic bytes (bounded in size)."""
    if not body.startswith(b"\x1f\x8b"):
        return body
    with gzip.GzipFile(fileobj=io.BytesIO(body)) as stream:
        data = stream.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise BadInput(f"download: object unpacks to more than {MAX_FILE_BYTES} bytes")
    return data


def get(client: httpx.Client, target: UploadTarget, policy: RetryPolicy) -> bytes | None:
    """GET the target's URL with bounded exponential retries; None when it could not be fetched."""
    try:
        for attempt in _retrying(policy):
            with attempt:
                return _get_once(client, target, attempt.retry_state.attempt_number)
    except (httpx.TransportError, RetryableStatus, PermanentStatus):
        return None
    return None  # pragma: no cover - tenacity either returns or raises


def run(args: Sequence[str], env: Mapping[str, str] | None = None, policy: RetryPolicy | None = None) -> int:
    """Upload every `FILE=ENV_VAR`; the exit code: 0 all uploaded, 1 an upload failed after retries, 2 bad input."""
    policy = policy or RetryPolicy()
    try:
        if not args:
            raise BadInput("upload: nothing to upload (give FILE=ENV_VAR arguments)")
        targets = resolve([parse_upload(a) for a in args], os.environ if env is None else env)
        bodies = [read_gzipped(t.path) for t in targets]
    except BadInput as exc:
        log.error("upload refused", error=str(exc))
        return EXIT_BAD_INPUT
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:
        for target, body in zip(targets, bodies, strict=True):
            if not put(client, target, body, policy):
                log.error("upload failed", file=target.path, url=redact(target.url))
                return EXIT_UPLOAD_FAILED
    return EXIT_OK


def download(args: Sequence[str], env: Mapping[str, str] | None = None, policy: RetryPolicy | None = None) -> int:
    """Fetch every `FILE=ENV_VAR` (gunzipping gzip objects); exit code 0 all written, 1 a fetch failed, 2 bad input."""
    policy = policy or RetryPolicy()
    try:
        if not args:
            raise BadInput("download: nothing to download (give FILE=ENV_VAR arguments)")
        targets = resolve([parse_upload(a) for a in args], os.environ if env is None else env)
    except BadInput as exc:
        log.error("download refused", error=str(exc))
        return EXIT_BAD_INPUT
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:
        for target in targets:
            body = get(client, target, policy)
            if body is None:
                log.error("download failed", file=target.path, url=redact(target.url))
                return EXIT_UPLOAD_FAILED
            try:
                Path(target.path).write_bytes(unpacked(body))
            except BadInput as exc:
                log.error("download refused", file=target.path, error=str(exc))
                return EXIT_BAD_INPUT
            except OSError as exc:
                log.error("download cannot write", file=target.path, error=exc.strerror or str(exc))
                return EXIT_BAD_INPUT
    return EXIT_OK
