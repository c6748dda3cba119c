"""Checks that an SBOM upload is CycloneDX JSON podsweep can rescan later, and which Trivy wrote it.

Pure: decodes bytes, never reads files or the network. Only the fields it checks are decoded; the stored SBOM is
the uploaded bytes, unchanged.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from podsweep.reports import normalize, trivy
from schemas.index import PackageVersion
from services.parser import vulnindex

SPEC_VERSION_PATTERN = r"^1\.[0-9]{1,2}(?!\n)$"
SbomErrorKind = Literal["oversized", "not-json", "truncated", "bad-gzip", "not-cyclonedx"]


class SbomError(ValueError):
    """An SBOM upload podsweep will not keep as the digest's SBOM. `kind` is for metrics, the message for people."""

    def __init__(self, kind: SbomErrorKind, message: str) -> None:
        message = " ".join(message.split())[:1000]
        super().__init__(f"{kind}: {message}")
        self.kind: SbomErrorKind = kind
        self.reason = message


class Tool(msgspec.Struct, frozen=True, gc=False):
    name: str = ""
    version: str = ""


class Tools(msgspec.Struct, frozen=True, gc=False):
    """CycloneDX 1.5+ lists tools as components; 1.4 and earlier as a bare array (decoded as list[Tool])."""

    components: list[Tool] = []


class Metadata(msgspec.Struct, frozen=True, gc=False):
    tools: Tools | list[Tool] | None = None


class Component(msgspec.Struct, frozen=True, gc=False):
    """Every CycloneDX component has a type and a name; its group, version and package URL feed the package index."""

    type: str
    name: str
    group: str = ""
    version: str = ""
    purl: str = ""


class Bom(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    bom_format: Literal["CycloneDX"]
    spec_version: Annotated[str, msgspec.Meta(pattern=SPEC_VERSION_PATTERN)]
    components: list[Component]
    metadata: Metadata | None = None


_DECODER = msgspec.json.Decoder(Bom)
_GZIP_KINDS: dict[str, SbomErrorKind] = {"oversized": "oversized", "truncated": "truncated", "bad-gzip": "bad-gzip"}


class SbomInfo(msgspec.Struct, frozen=True):
    spec_version: str
    components: int
    trivy_version: str  # empty when no tool named trivy is listed
    packages: list[PackageVersion] = []  # the library components, for `podsweep cve --package`


# Group joined to the name as the ecosystem writes it: Maven group:artifact, npm @scope/name.
_GROUP_SEPARATOR = {"maven": ":", "npm": "/"}


def _packages(bom: Bom) -> list[PackageVersion]:
    """Library components (not the OS or an application file): name with its group, version, purl type; text from
    the scanned image, bounded and without control characters."""
    out = []
    for c in bom.components:
        if c.type not in ("library", "framework") or not c.name:
            continue
        kind = vulnindex.purl_type(c.purl)
        name = f"{c.group}{_GROUP_SEPARATOR.get(kind, '/')}{c.name}" if c.group else c.name
        out.append(PackageVersion(normalize.short_text(name), normalize.short_text(c.version), kind))
    return out


def _trivy_version(bom: Bom) -> str:
    tools = bom.metadata.tools if bom.metadata is not None else None
    listed = tools.components if isinstance(tools, Tools) else (tools or [])
    for tool in listed:
        if tool.name == "trivy" and tool.version.isprintable():
            return tool.version[:64]
    return ""


def check(data: bytes, *, max_bytes: int) -> SbomInfo:
    """What the SBOM is, or SbomError saying why it is not a usable CycloneDX JSON document."""
    if len(data) > max_bytes:
        raise SbomError("oversized", f"SBOM is {len(data)} bytes, over the {max_bytes}-byte cap; raise the cap")
    if data.startswith(trivy.GZIP_MAGIC):
        try:
            data = trivy.gunzip(data, max_bytes=max_bytes)
        except trivy.ParseError as exc:
            kind = _GZIP_KINDS.get(exc.kind, "bad-gzip")
            raise SbomError(kind, exc.reason.replace("report", "SBOM")) from None
    if not data.strip():
        raise SbomError("not-json", "the SBOM upload is empty")
    try:
        bom = _DECODER.decode(data)
    except RecursionError:
        raise SbomError(
            "oversized", f"JSON nested deeper than {trivy.MAX_DEPTH_TEXT}; not an SBOM Trivy wrote"
        ) from None
    except msgspec.ValidationError as exc:
        raise SbomError(
            "not-cyclonedx",
            f"not a CycloneDX JSON SBOM ({exc}); podsweep keeps `trivy … --format cyclonedx` output",
        ) from None
    except UnicodeDecodeError:
        raise SbomError("not-json", "a string is not valid UTF-8") from None
    except msgspec.DecodeError as exc:
        message = str(exc)
        if "truncated" in message:
            raise SbomError("truncated", "JSON ends before every value is closed (cut off)") from None
        raise SbomError("not-json", message) from None
    return SbomInfo(
        spec_version=bom.spec_version,
        components=len(bom.components),
        trivy_version=_trivy_version(bom),
        packages=_packages(bom),
    )
