"""Trivy's JSON report as written in the wild: SchemaVersion 2 (Trivy 0.20 and later), the legacy array and `null`.

Pure: decodes bytes, never reads files or the network. Holds only the fields podsweep uses; everything else Trivy
writes (descriptions, references, package lists, image config) is skipped by the decoder without being built.
"""

from __future__ import annotations

import codecs
import zlib
from datetime import datetime
from typing import Literal

import msgspec

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Largest report podsweep reads, after gunzip. The biggest real image reports are a few tens of MB."""

GZIP_MAGIC = b"\x1f\x8b"
MAX_DEPTH_TEXT = "the decoder's limit (about 1,000 levels)"
SUPPORTED_SCHEMA = 2
LEGACY_SCHEMA = 1
"""What podsweep calls the pre-0.20 array format (Trivy never wrote a SchemaVersion for it)."""

ParseErrorKind = Literal["oversized", "not-json", "truncated", "wrong-type", "not-trivy", "unsupported", "bad-gzip"]


class ParseError(ValueError):
    """An upload that is not a Trivy report podsweep can read. `kind` is for metrics; the message is for people."""

    def __init__(self, kind: ParseErrorKind, message: str) -> None:
        # One line, bounded: it goes to logs, a quarantine .error.txt and a failure event.
        message = " ".join(message.split())[:1000]
        super().__init__(f"{kind}: {message}")
        self.kind: ParseErrorKind = kind
        self.reason = message


# Wire Structs. `rename="pascal"` maps snake_case to Trivy's names; the few that differ are named explicitly.
# gc=False: decoded trees never hold cycles, and skipping the GC tracking makes decoding large reports faster.


class CVSS(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """One source's CVSS scores (nvd, redhat, ghsa, ...); newer Trivy adds CVSS v4.0 (V40*)."""

    v2_score: float | None = None
    v2_vector: str = ""
    v3_score: float | None = None
    v3_vector: str = ""
    v40_score: float | None = None
    v40_vector: str = ""


class PkgIdentifier(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """Newer Trivy identifies the package by PURL (and UID, BOMRef: not used)."""

    purl: str = msgspec.field(default="", name="PURL")


class Layer(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    diff_id: str = msgspec.field(default="", name="DiffID")


class Vulnerability(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """One entry of Results[].Vulnerabilities. Status appeared in Trivy 0.35; before it, FixedVersion alone."""

    vulnerability_id: str = msgspec.field(name="VulnerabilityID")
    pkg_name: str = ""
    pkg_path: str = ""
    pkg_identifier: PkgIdentifier | None = None
    installed_version: str = ""
    fixed_version: str = ""
    status: str = ""
    severity: str = "UNKNOWN"
    title: str = ""
    primary_url: str = msgspec.field(default="", name="PrimaryURL")
    layer: Layer | None = None
    cvss: dict[str, CVSS] | None = msgspec.field(default=None, name="CVSS")


class Misconfiguration(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """Results[].Misconfigurations. Trivy lists PASS/EXCEPTION entries only with --include-non-failures."""

    id: str = msgspec.field(default="", name="ID")
    avd_id: str = msgspec.field(default="", name="AVDID")
    title: str = ""
    message: str = ""
    resolution: str = ""
    severity: str = "UNKNOWN"
    primary_url: str = msgspec.field(default="", name="PrimaryURL")
    status: str = ""


class Secret(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """Results[].Secrets. `match` is Trivy's masked line; `Code` (context lines) is never decoded."""

    rule_id: str = msgspec.field(default="", name="RuleID")
    category: str = ""
    severity: str = "UNKNOWN"
    title: str = ""
    start_line: int = 0
    match: str = ""


class Result(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """One target (an OS, a lock file, a binary, a config file). Legacy reports are a bare array of these."""

    target: str
    klass: str = msgspec.field(default="", name="Class")
    type: str = ""
    vulnerabilities: list[Vulnerability] | None = None
    misconfigurations: list[Misconfiguration] | None = None
    secrets: list[Secret] | None = None


class OS(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    family: str = ""
    name: str = ""
    eosl: bool = msgspec.field(default=False, name="EOSL")


class Metadata(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    os: OS | None = msgspec.field(default=None, name="OS")


class TrivyInfo(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """The `Trivy` object newer Trivy writes (its version; `dev` in Trivy's own tests)."""

    version: str = ""


class TrivyReport(msgspec.Struct, frozen=True, gc=False, rename="pascal"):
    """A Trivy report. Legacy arrays and `null` are decoded into this shape with schema_version 1."""

    schema_version: int
    artifact_name: str = ""
    artifact_type: str = ""
    created_at: datetime | None = None
    metadata: Metadata | None = None
    trivy: TrivyInfo | None = None
    results: list[Result] | None = None

    @property
    def is_legacy(self) -> bool:
        return self.schema_version == LEGACY_SCHEMA


# One decoder for every format: an object is SchemaVersion 2, an array is legacy, null is legacy with nothing found.
_DECODER: msgspec.json.Decoder[TrivyReport | list[Result] | None] = msgspec.json.Decoder(
    TrivyReport | list[Result] | None
)


def gunzip(data: bytes, *, max_bytes: int) -> bytes:
    """Inflate gzip input, refusing to produce more than max_bytes (a small upload can inflate to gigabytes).

    Every member is read, as `gzip -d` does: a stream is the concatenation of its members, so an empty report
    followed by another member is that other member's content, never a clean report. Bytes after the last member
    that are not a member themselves make the stream corrupt (`gzip` would ignore them; podsweep reads nothing it
    cannot account for)."""
    parts: list[bytes] = []
    produced = 0
    rest = data
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(rest, max_bytes - produced + 1)
        except zlib.error as exc:
            raise ParseError("bad-gzip", f"gzip stream is corrupt ({exc}); re-upload the report") from None
        produced += len(out)
        if produced > max_bytes or inflater.unconsumed_tail:
            raise ParseError("oversized", f"report inflates to more than {max_bytes} bytes (the cap); raise the cap")
        if not inflater.eof:
            raise ParseError("truncated", "gzip stream ends early; the upload was cut off")
        parts.append(out)
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if not rest.startswith(GZIP_MAGIC):
            raise ParseError("bad-gzip", f"{len(rest)} bytes after the gzip stream are not gzip; re-upload the report")


def _text_bytes(data: bytes) -> bytes:
    """UTF-8 as msgspec wants it: strip a UTF-8 BOM, re-encode UTF-16 (PowerShell's `>` writes it)."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16").encode()
        except UnicodeError:
            raise ParseError("not-json", "starts with a UTF-16 mark but is not UTF-16 text") from None
    return data


def _validation_error(exc: msgspec.ValidationError) -> ParseError:
    message = str(exc)
    # msgspec names the path (`$.Results[0]...`) except for the top level, which is where a non-Trivy
    # document (CycloneDX, SARIF, a `trivy k8s` report, a number) fails.
    if " - at `$" not in message:
        return ParseError(
            "not-trivy",
            f"not a Trivy report ({message}); podsweep reads `trivy image|rootfs|fs|sbom --format json` output",
        )
    return ParseError("wrong-type", message)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> TrivyReport:
    """Decode a Trivy JSON report of any version (plain or gzip, LF or CRLF) or raise ParseError saying why not."""
    if len(data) > max_bytes:
        raise ParseError("oversized", f"report is {len(data)} bytes, over the {max_bytes}-byte cap; raise the cap")
    if data.startswith(GZIP_MAGIC):
        data = gunzip(data, max_bytes=max_bytes)
    if not data:
        raise ParseError("not-json", "the upload is empty (0 bytes)")
    if data[:1] not in b"{[n \t\r\n":
        data = _text_bytes(data)
    try:
        doc = _DECODER.decode(data)
    except RecursionError:
        # Skipped fields are walked too: arrays nested ~1,000 deep exhaust the interpreter's stack. Trivy nests a
        # handful of levels; a report this deep is too big in depth, quarantined like one too big in bytes.
        raise ParseError("oversized", f"JSON nested deeper than {MAX_DEPTH_TEXT}; not a report Trivy wrote") from None
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 inside strings as it builds them.
        raise ParseError("not-json", f"a string is not valid UTF-8 ({exc.reason}); Trivy writes UTF-8") from None
    except msgspec.DecodeError as exc:
        message = str(exc)
        if "truncated" in message:
            # msgspec also says "truncated" for a broken \\u escape, so the message names both causes.
            raise ParseError(
                "truncated", "JSON ends before every value is closed (cut off, or a broken escape)"
            ) from None
        raise ParseError("not-json", message) from None
    if doc is None:
        return TrivyReport(schema_version=LEGACY_SCHEMA, results=[])
    if isinstance(doc, list):
        return TrivyReport(schema_version=LEGACY_SCHEMA, results=doc)
    if doc.schema_version != SUPPORTED_SCHEMA:
        raise ParseError(
            "unsupported",
            f"SchemaVersion {doc.schema_version} is not one podsweep reads (it reads {SUPPORTED_SCHEMA} and the "
            "legacy array); upgrade podsweep",
        )
    return doc
