"""Our SigV4 query signer makes exactly the URL botocore makes for the same key, method, expiry and instant."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest

from podsweep.config import S3Settings
from podsweep.objectstore import ObjectStore, QuerySigner
from schemas.state import DigestScanState
from schemas.storage import StorageKey

KEYS = {
    "storage_key": StorageKey("raw/sha256/" + "ab" * 32 + "/psw-0123456789abcdef01234567.json"),
    "dots_dashes_underscores": StorageKey("sbom/x_y-z.cdx.json"),
    "one_segment": StorageKey("a"),
}
ENDPOINTS = {
    "ip_path_style": ("http://127.0.0.1:8333", True),
    "host_path_style": ("https://s3.example.com", True),
    "host_virtual_hosted": ("https://s3.example.com:9000", False),
}


def _store(endpoint: str, path_style: bool) -> ObjectStore:
    return ObjectStore(
        S3Settings(
            endpoint_url=endpoint,
            region="eu-west-3",
            bucket="podsweep",
            access_key_id="AKIDEXAMPLE",
            secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            path_style=path_style,
        )
    )


def _botocore(store: ObjectStore, method: str, key: StorageKey, expires_s: int) -> str:
    operation = "put_object" if method == "PUT" else "get_object"
    url: str = store._client.generate_presigned_url(
        operation, Params={"Bucket": store.bucket, "Key": key}, ExpiresIn=expires_s
    )
    return url


@pytest.mark.parametrize("method", ["PUT", "GET"])
@pytest.mark.parametrize("key", list(KEYS.values()), ids=list(KEYS))
@pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=list(ENDPOINTS))
def test_presigned_url_is_the_one_botocore_makes(method: str, key: StorageKey, endpoint: tuple[str, bool]) -> None:
    store = _store(*endpoint)
    signer = store.signer()
    assert signer is not None
    expected = _botocore(store, method, key, 600)
    stamp = parse_qs(urlsplit(expected).query)["X-Amz-Date"][0]
    at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert signer.presign(method, key, 600, at) == expected


def test_signing_key_follows_the_utc_day() -> None:
    signer = QuerySigner("http://127.0.0.1:8333/podsweep/", "us-east-1", "AK", "SK")
    before = signer.presign("PUT", StorageKey("a.json"), 60, datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC))
    after = signer.presign("PUT", StorageKey("a.json"), 60, datetime(2026, 1, 2, 0, 0, 0, tzinfo=UTC))
    assert "20260101%2Fus-east-1" in before
    assert "20260102%2Fus-east-1" in after
    again = signer.presign("PUT", StorageKey("a.json"), 60, datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC))
    assert again == before


@pytest.mark.parametrize(
    ("change", "differs"),
    [("key", True), ("method", True), ("expiry", True), ("nothing", False)],
    ids=["other_key", "other_method", "other_expiry", "same_request"],
)
def test_signature_covers_key_method_and_expiry(change: str, differs: bool) -> None:
    signer = QuerySigner("http://127.0.0.1:8333/podsweep/", "us-east-1", "AK", "SK")
    at = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    base = signer.presign("PUT", StorageKey("raw/a.json"), 600, at)
    other = signer.presign(
        "GET" if change == "method" else "PUT",
        StorageKey("raw/b.json") if change == "key" else StorageKey("raw/a.json"),
        601 if change == "expiry" else 600,
        at,
    )

    def signature(url: str) -> str:
        return parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]

    assert (signature(base) != signature(other)) is differs


def test_without_static_keys_botocore_presigns() -> None:
    store = ObjectStore(S3Settings(endpoint_url="http://127.0.0.1:8333", bucket="podsweep"))
    assert store.signer() is None


@pytest.mark.parametrize(
    "base", ["127.0.0.1:8333/podsweep/", "http://127.0.0.1:8333/podsweep"], ids=["no_scheme", "no_slash"]
)
def test_a_root_that_is_not_a_url_prefix_is_refused(base: str) -> None:
    with pytest.raises(ValueError, match="cannot presign under"):
        QuerySigner(base, "us-east-1", "AK", "SK")


NOT_KEYS = {
    "empty_signs_the_bucket_which_lists_it": "",
    "leading_slash": "/raw/a.json",
    "dot_dot": "raw/../index/summary.json",
    "trailing_slash_a_prefix": "raw/",
    "space": "sbom/x y.json",
    "upper_case": "Raw/a.json",
    "non_ascii": "quarantine/ü.json",
    "query": "raw/a.json?list-type=2",
    "newline_at_end": "raw/a.json\n",
    "too_long": "a" * 513,
}


@pytest.mark.parametrize("key", list(NOT_KEYS.values()), ids=list(NOT_KEYS))
@pytest.mark.parametrize("static_keys", [True, False], ids=["own_signer", "botocore"])
def test_only_storage_keys_are_ever_presigned(key: str, static_keys: bool) -> None:
    store = (
        _store("http://127.0.0.1:8333", True)
        if static_keys
        else ObjectStore(S3Settings(endpoint_url="http://127.0.0.1:8333", bucket="podsweep"))
    )
    forged = StorageKey(key)  # what a cast, or a key stored as text, would hand over
    with pytest.raises(ValueError, match="is not a podsweep key"):
        store.presign_put(forged, 60)
    with pytest.raises(ValueError, match="is not a podsweep key"):
        store.presign_get(forged, 60)
    signer = QuerySigner("http://127.0.0.1:8333/podsweep/", "us-east-1", "AK", "SK")
    with pytest.raises(ValueError, match="is not a podsweep key"):
        signer.presign("GET", forged, 60, datetime(2026, 11, 23, tzinfo=UTC))


@pytest.mark.parametrize("key", list(NOT_KEYS.values()), ids=list(NOT_KEYS))
def test_a_scan_state_never_holds_a_key_that_could_not_be_presigned(key: str) -> None:
    state = {"digest_ref": "r.example/a@sha256:" + "ab" * 32, "sbom_key": key}
    with pytest.raises(msgspec.ValidationError, match="sbom_key"):
        msgspec.convert(state, DigestScanState)
