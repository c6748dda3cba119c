"""SigV4 query-string presigning with static keys, and the bucket's root URL where it can be known without botocore.

Stdlib only (and the storage layout's key check): `podsweep cve` signs its GETs with it without importing boto3, and
ObjectStore presigns with it for the services (podsweep/objectstore.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

from schemas.storage import StorageKey, checked_key

_ALGORITHM = "AWS4-HMAC-SHA256"


class QuerySigner:
    """SigV4 query-string presigning for static credentials, the same URL botocore's S3 presign makes.

    `base` is the URL of the bucket's root with a trailing slash as botocore addresses it (path or virtual-hosted);
    the signing key is derived once per UTC day. Only `host` is signed and the payload is UNSIGNED-PAYLOAD, as in
    botocore's presigned PUT and GET: the URL is good for one method on one key until it expires.
    """

    def __init__(self, base: str, region: str, access_key_id: str, secret_access_key: str) -> None:
        parts = urlsplit(base)
        if not parts.scheme or not parts.netloc or not parts.path.endswith("/"):
            raise ValueError(f"s3: cannot presign under {base!r} (expected scheme://host/[bucket/])")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.netloc
        self._prefix = parts.path
        self._region = region
        self._access_key_id = access_key_id
        self._secret = secret_access_key.encode()
        self._day = ""
        self._key = b""

    def presign_post(
        self, bucket: str, key: StorageKey, expires_s: int, max_bytes: int, now: datetime
    ) -> tuple[str, dict[str, str]]:
        """A browser-style POST upload (SigV4 POST policy) of at most `max_bytes` to exactly `key`, until `expires_s`
        seconds from `now`: the bucket's URL and the form fields to send before the file.

        The only S3 upload that bounds an unknown size: a presigned PUT can sign an exact Content-Length only, and
        `content-length-range` exists in POST policies alone. SeaweedFS refuses a larger body with 400 EntityTooLarge.
        """
        checked_key(key)
        if max_bytes < 1:
            raise ValueError(f"s3: an upload bound of {max_bytes} bytes allows nothing")
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        credential = f"{self._access_key_id}/{day}/{self._region}/s3/aws4_request"
        expiration = (now.astimezone(UTC) + timedelta(seconds=int(expires_s))).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        fields = {"key": key, "x-amz-algorithm": _ALGORITHM, "x-amz-credential": credential, "x-amz-date": stamp}
        conditions: list[object] = [{"bucket": bucket}, ["content-length-range", 0, max_bytes]]
        conditions += [{name: value} for name, value in fields.items()]
        policy = base64.b64encode(json.dumps({"expiration": expiration, "conditions": conditions}).encode()).decode()
        signature = hmac.new(self._signing_key(day), policy.encode(), hashlib.sha256).hexdigest()
        return f"{self.origin}{self._prefix}", {**fields, "policy": policy, "x-amz-signature": signature}

    def _signing_key(self, day: str) -> bytes:
        if day != self._day:
            key = hmac.digest(b"AWS4" + self._secret, day.encode(), "sha256")
            for part in (self._region, "s3", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._day, self._key = day, key
        return self._key

    def presign(self, method: str, key: StorageKey, expires_s: int, now: datetime) -> str:
        """A URL for `method` on exactly `key`, valid `expires_s` seconds from `now` (an aware UTC instant).

        The key is checked again (a NewType can be forged with a cast): an empty key would sign the bucket's root."""
        checked_key(key)
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        path = self._prefix + quote(key, safe="/~")
        credential = f"{self._access_key_id}/{day}/{self._region}/s3/aws4_request"
        # Already in sorted order, as the canonical query string requires.
        query = (
            f"X-Amz-Algorithm={_ALGORITHM}&X-Amz-Credential={quote(credential, safe='-_.~')}"
            f"&X-Amz-Date={stamp}&X-Amz-Expires={int(expires_s)}&X-Amz-SignedHeaders=host"
        )
        canonical = f"{method}\n{path}\n{query}\nhost:{self._host}\n\nhost\nUNSIGNED-PAYLOAD"
        scope = f"{day}/{self._region}/s3/aws4_request"
        to_sign = f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{self.origin}{path}?{query}&X-Amz-Signature={signature}"


# What botocore's endpoint rules turn into s3.<region>.amazonaws.com (the commercial partition's regions), and what
# in the environment or a shared config file could make it choose another endpoint (FIPS, dual-stack, a configured
# endpoint, the us-east-1 regional one): with any of these, botocore decides.
_AWS_REGION_RE = re.compile(r"^(?!cn-)[a-z]{2}-[a-z]+-[0-9]{1,2}$")
_AWS_ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_S3_US_EAST_1")
_AWS_CONFIG_ENV = ("AWS_CONFIG_FILE", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")
_ENDPOINT_PATH_RE = re.compile(r"^[A-Za-z0-9._~/-]*$")


def path_style_root(
    endpoint_url: str, region: str, bucket: str, path_style: bool, environ: Mapping[str, str], aws_config: bool
) -> str | None:
    """The bucket's root URL (trailing slash) as botocore addresses it path style, or None where only botocore can
    say: virtual-hosted addressing; an endpoint with user info, a query, an unusual path, an upper-case host or an
    explicit default port (the Host sent would not be the host signed); AWS outside the commercial partition's plain
    regions, or with anything set in `environ` or a shared config file (`aws_config`) that can move its endpoint."""
    if not path_style:
        return None
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        default_port = {"http": ":80", "https": ":443"}.get(parts.scheme)
        if (
            default_port is None
            or not parts.netloc
            or "@" in parts.netloc
            or parts.netloc != parts.netloc.lower()  # botocore signs the host lower-cased; http.client sends it as is
            or parts.netloc.endswith(default_port)
            or parts.query
            or parts.fragment
            or not _ENDPOINT_PATH_RE.match(parts.path)
            or "//" in parts.path
            or {".", ".."} & set(parts.path.split("/"))
        ):
            return None
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/{bucket}/"
    if aws_config or not _AWS_REGION_RE.match(region):
        return None
    if any(name.startswith(_AWS_ENDPOINT_ENV) or name in _AWS_CONFIG_ENV for name in environ):
        return None
    host = "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"
    return f"https://{host}/{bucket}/"
