"""Reads the secrets a policy references ({env: NAME} or {file: /path}) at the moment a delivery needs them.

Never logs a secret or puts one in an error message: errors name the variable or the file, nothing else.
Files are read on every use, so a rotated Kubernetes Secret takes effect without a restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from podsweep.policy import SecretRef

MAX_SECRET_BYTES = 64 * 1024
_URL_RE = re.compile(r"^https?://[^\s/?#]+(/\S*)?$")


class SecretError(ValueError):
    """A referenced secret is missing, unreadable or malformed; the message names where it was looked for."""


def where(ref: SecretRef) -> str:
    return f"environment variable {ref.env}" if ref.env is not None else f"file {ref.file}"


def read_secret(ref: SecretRef, environ: Mapping[str, str]) -> str:
    """The secret's text without surrounding whitespace (mounted files usually end with a newline)."""
    if ref.env is not None:
        value = environ.get(ref.env)
        if value is None:
            raise SecretError(f"secret: {where(ref)} is not set; set it or change the policy's reference")
    else:
        assert ref.file is not None  # SecretRef allows exactly one of env and file
        try:
            with Path(ref.file).open("rb") as handle:
                raw = handle.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise SecretError(f"secret: {where(ref)} cannot be read ({exc.strerror}); is the Secret mounted?") from None
        if len(raw) > MAX_SECRET_BYTES:
            raise SecretError(f"secret: {where(ref)} is larger than {MAX_SECRET_BYTES} bytes; is it the right file?")
        try:
            value = raw.decode()
        except UnicodeDecodeError:
            raise SecretError(f"secret: {where(ref)} is not UTF-8 text") from None
    value = value.strip()
    if not value:
        raise SecretError(f"secret: {where(ref)} is empty")
    return value


def read_url(ref: SecretRef | str, environ: Mapping[str, str]) -> str:
    """A webhook URL given inline or as a secret (Slack and Teams URLs are credentials)."""
    if isinstance(ref, str):
        return ref
    url = read_secret(ref, environ)
    if not _URL_RE.match(url):
        raise SecretError(f"secret: {where(ref)} does not hold an http(s) URL")
    return url


def read_keys(ref: SecretRef, environ: Mapping[str, str]) -> list[bytes]:
    """HMAC keys, one per line: two lines while a key is being rotated (docs/webhooks.md)."""
    keys = [line.strip().encode() for line in read_secret(ref, environ).splitlines() if line.strip()]
    return keys
