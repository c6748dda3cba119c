"""Webhook signatures: what podsweep signs verifies, anything altered, stale or unsigned does not."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.notifier.signing import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    SignatureError,
    signature_header,
    signed_headers,
    verify,
)

KEY = b"k" * 32
OLD_KEY = b"o" * 32
BODY = b'{"v":1,"type":"podsweep.breach","id":"0123456789abcdef0123456789abcdef"}'
T = 1_795_000_000


def test_a_signed_body_verifies_and_returns_its_timestamp() -> None:
    headers = signed_headers([KEY], BODY, "0123456789abcdef0123456789abcdef", T)
    assert verify([KEY], BODY, headers[SIGNATURE_HEADER], now=T + 10) == T
    assert headers[IDEMPOTENCY_HEADER] == "0123456789abcdef0123456789abcdef"
    assert headers["Content-Type"] == "application/json"


def test_the_scheme_is_hmac_sha256_over_timestamp_dot_body() -> None:
    """Receivers in other languages implement exactly this (docs/webhooks.md)."""
    expected = hmac.new(KEY, f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert signature_header([KEY], BODY, T) == f"t={T},v1={expected}"


def test_key_rotation_sends_one_signature_per_key_and_either_verifies() -> None:
    header = signature_header([KEY, OLD_KEY], BODY, T)
    assert header.count("v1=") == 2
    assert verify([OLD_KEY], BODY, header, now=T) == T
    assert verify([b"x" * 32, KEY], BODY, signature_header([KEY], BODY, T), now=T) == T


@pytest.mark.parametrize(
    ("body", "header", "now", "keys", "error"),
    [
        pytest.param(BODY + b" ", None, T, [KEY], "no signature matches", id="body-altered"),
        pytest.param(BODY.replace(b"1", b"2"), None, T, [KEY], "no signature matches", id="one-byte-changed"),
        pytest.param(BODY, None, T, [OLD_KEY], "no signature matches", id="wrong-key"),
        pytest.param(BODY, "", T, [KEY], "no Podsweep-Signature", id="header-missing"),
        pytest.param(BODY, "v1=00", T, [KEY], "no t=", id="no-timestamp"),
        pytest.param(BODY, f"t={T}", T, [KEY], "no v1=", id="no-signature"),
        pytest.param(BODY, f"t={T},v0=abc", T, [KEY], "no v1=", id="only-unknown-scheme"),
        pytest.param(BODY, f"t=-{T},v1=00", T, [KEY], "malformed timestamp", id="negative-timestamp"),
        pytest.param(BODY, f"t={T},t={T},v1=00", T, [KEY], "malformed timestamp", id="two-timestamps"),
        pytest.param(BODY, "t=" + "9" * 40 + ",v1=00", T, [KEY], "malformed timestamp", id="huge-timestamp"),
        pytest.param(BODY, None, T + 301, [KEY], "from now", id="replayed-after-tolerance"),
        pytest.param(BODY, None, T - 301, [KEY], "from now", id="timestamp-in-the-future"),
        pytest.param(BODY, "t=1," + "v1=a," * 1000, T, [KEY], "longer than", id="oversized-header"),
        pytest.param(BODY, None, T, [], "no signature matches", id="receiver-without-keys"),
    ],
)
def test_tampered_stale_or_malformed_requests_are_refused(
    body: bytes, header: str | None, now: int, keys: list[bytes], error: str
) -> None:
    sent = signature_header([KEY], BODY, T) if header is None else header
    with pytest.raises(SignatureError, match=error):
        verify(keys, body, sent, now=now)


def test_timestamp_cannot_be_moved_without_breaking_the_signature() -> None:
    forged = signature_header([KEY], BODY, T).replace(f"t={T}", f"t={T + 600}")
    with pytest.raises(SignatureError, match="no signature matches"):
        verify([KEY], BODY, forged, now=T + 600)


@pytest.mark.parametrize("key", [pytest.param(b"", id="empty"), pytest.param(b"short", id="too-short")])
def test_weak_keys_are_refused_when_signing(key: bytes) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        signature_header([key], BODY, T)


def test_an_error_never_contains_the_key() -> None:
    with pytest.raises(SignatureError) as info:
        verify([KEY], BODY + b"x", signature_header([KEY], BODY, T), now=T)
    assert KEY.decode() not in str(info.value)
