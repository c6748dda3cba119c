"""Webhook signatures: HMAC-SHA256 over `<timestamp>.<body>`, sent as `Podsweep-Signature: t=<ts>,v1=<hex>`.

Pure: the caller passes the keys and the time. Receivers verify with `verify` (see docs/webhooks.md). Keys are
never logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "Podsweep-Signature"
IDEMPOTENCY_HEADER = "Podsweep-Idempotency-Key"
EVENT_HEADER = "Podsweep-Event"
SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300
MIN_KEY_BYTES = 16
_MAX_HEADER = 4096


class SignatureError(ValueError):
    """A request whose signature does not verify; the message says which check failed, never a key."""


def signature(key: bytes, body: bytes, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `<timestamp>.` followed by the exact body bytes."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"signing key is {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes")
    return hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(keys: Sequence[bytes], body: bytes, timestamp: int) -> str:
    """`t=<ts>,v1=<hex>[,v1=<hex>…]`: one v1 per key, so a receiver can rotate keys without a gap."""
    if not keys:
        raise ValueError("no signing key: a webhook destination needs hmac_key")
    return ",".join([f"t={timestamp}", *(f"{SCHEME}={signature(k, body, timestamp)}" for k in keys)])


def signed_headers(keys: Sequence[bytes], body: bytes, idempotency_key: str, timestamp: int) -> dict[str, str]:
    """Every header podsweep sends with a generic webhook body."""
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature_header(keys, body, timestamp),
        IDEMPOTENCY_HEADER: idempotency_key,
        EVENT_HEADER: "alert",
    }


def verify(
    keys: Sequence[bytes],
    body: bytes,
    header: str | None,
    now: int,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> int:
    """Check a `Podsweep-Signature` header against the raw body; return its timestamp or raise SignatureError.

    Any v1 signature made with any of `keys` is accepted (rotation). The timestamp must be within `tolerance_s` of
    `now` either way, which bounds replays; receivers drop repeats by `Podsweep-Idempotency-Key`.
    """
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    if len(header) > _MAX_HEADER:
        raise SignatureError(f"{SIGNATURE_HEADER} header is longer than {_MAX_HEADER} characters")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit() or len(value) > 12:
                raise SignatureError(f"{SIGNATURE_HEADER} has a malformed timestamp")
            timestamp = int(value)
        elif name == SCHEME:
            candidates.append(value)
    if timestamp is None:
        raise SignatureError(f"{SIGNATURE_HEADER} has no t=<unix seconds>")
    if not candidates:
        raise SignatureError(f"{SIGNATURE_HEADER} has no {SCHEME}= signature")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"signature timestamp is {now - timestamp} s from now (tolerance {tolerance_s} s)")
    for key in keys:
        expected = signature(key, body, timestamp)
        # Compare every candidate (no early exit on the first mismatch) in constant time per pair.
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return timestamp
    raise SignatureError("no signature matches the body with any configured key")
