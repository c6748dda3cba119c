"""Turns a container status's `imageID` (every form the runtimes write) into a validated `repo@sha256:<hex>`.

Pure and cached. Never returns a string that has not matched schemas.refs.DIGEST_REF_RE.

Forms (decisions written down):
- `docker-pullable://repo@sha256:<hex>` (dockershim, cri-dockerd) and `repo@sha256:<hex>` (containerd, CRI-O):
  the repository digest; the runtime resolved it from a registry, so it is what a scan Job can name.
- `repo:tag@sha256:<hex>`: the tag is dropped; the digest alone names the content.
- `sha256:<hex>`, `docker://sha256:<hex>`, and a bare 64-hex id (older CRI-O): the runtime's *image id*, given when
  the image has no repository digest (loaded or built on the node). The repository comes from the spec image. When
  the spec image pins a digest (`repo@sha256:…`) that digest is used instead: it is the name the runtime knows the
  image by. Otherwise `repo@<image id>` is a stable content key for deduplication, but not a pullable reference;
  `source="image-id"` says so, and a node scan of it may fail with ErrImageNeverPull (the dispatcher retries).
- Repositories are normalized the way the Docker CLI and containerd do: no registry means `docker.io`, a single
  path component on Docker Hub gets `library/`, `index.docker.io` is `docker.io`. So `nginx`, `docker.io/nginx` and
  `docker.io/library/nginx` are one repository, and the same image on every node yields the same digest ref.
- An empty imageID (the container has not started, or kwok) is not ready; anything else is invalid.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

import msgspec

from schemas.refs import DIGEST_REF_RE, IMAGE_RE, MAX_DIGEST_REF, REPOSITORY_RE

DigestSource = Literal["repo-digest", "spec-digest", "image-id"]

_HEX64 = re.compile(r"[a-f0-9]{64}")
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# Longest imageID worth parsing: scheme + the longest valid digest ref + a tag.
_MAX_IMAGE_ID = 32 + MAX_DIGEST_REF + 129


class ImageDigest(msgspec.Struct, frozen=True, gc=False):
    digest_ref: str  # validated: matches schemas.refs.DIGEST_REF_RE
    source: DigestSource


class NotReady(msgspec.Struct, frozen=True, gc=False):
    """No imageID yet: report the container when the runtime has one."""

    reason: str


class Invalid(msgspec.Struct, frozen=True, gc=False):
    """An imageID (or spec image) podsweep will not scan; the reason names the problem, never echoes the value."""

    reason: str


ParsedImage = ImageDigest | NotReady | Invalid

NO_IMAGE_ID = NotReady("no imageID yet")


def normalize_repository(repository: str) -> str | None:
    """Canonical `registry/path` for a repository, or None when it is not a valid OCI repository name."""
    first, slash, rest = repository.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        domain, path = _DOCKER_HUB, repository
    else:
        domain, path = first, rest
    if domain in _DOCKER_HUB_ALIASES:
        domain = _DOCKER_HUB
        if "/" not in path:
            path = "library/" + path
    normalized = f"{domain}/{path}"
    if REPOSITORY_RE.match(normalized) is None:
        return None
    return normalized


def spec_repository(image: str) -> tuple[str, str]:
    """(repository, digest or "") of an image as written in a pod spec; the tag is dropped."""
    name, _, digest = image.partition("@")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:  # a ':' after the last '/' starts the tag; before it, it is a registry port
        name = name[:colon]
    return name, digest


def parse_image_id(image_id: str, spec_image: str) -> ParsedImage:
    """The digest ref a running container's image is known by."""
    if not image_id:
        return NO_IMAGE_ID
    if len(image_id) > _MAX_IMAGE_ID:
        return Invalid(f"imageID is {len(image_id)} characters")
    if len(spec_image) > _MAX_IMAGE_ID:
        spec_image = ""  # only bounded strings enter the cache; an oversized spec image is no repository anyway
    return _parse(image_id, spec_image)


@lru_cache(maxsize=65536)
def _parse(image_id: str, spec_image: str) -> ParsedImage:
    # Cached: replicas share both strings, and equal results become one shared digest ref string.
    scheme, sep, rest = image_id.partition("://")
    if not sep:
        rest = image_id
    elif scheme not in ("docker-pullable", "docker"):
        return Invalid(f"imageID has an unknown scheme ({len(scheme)} characters)")

    if "@" in rest:
        repository, digest = spec_repository(rest)
        return _digest_ref(repository, digest, "repo-digest")

    image_id_digest = rest if rest.startswith("sha256:") else f"sha256:{rest}"
    if _HEX64.fullmatch(image_id_digest.removeprefix("sha256:")) is None:
        return Invalid("imageID is neither repository@sha256:<hex> nor sha256:<hex>")
    if not spec_image:
        return Invalid("imageID is a bare image id and the spec image is missing or oversized")
    repository, spec_digest = spec_repository(spec_image)
    if spec_digest:
        return _digest_ref(repository, spec_digest, "spec-digest")
    return _digest_ref(repository, image_id_digest, "image-id")


def _digest_ref(repository: str, digest: str, source: DigestSource) -> ParsedImage:
    normalized = normalize_repository(repository)
    if normalized is None:
        return Invalid(f"repository is not a valid OCI name ({source})")
    digest_ref = f"{normalized}@{digest}"
    if len(digest_ref) > MAX_DIGEST_REF or DIGEST_REF_RE.match(digest_ref) is None:
        return Invalid(f"not repository@sha256:<64 lower-case hex> ({source})")
    return ImageDigest(digest_ref, source)


def display_image(spec_image: str, digest_ref: str) -> str:
    """The image as written in the spec when it is a valid reference, else the digest ref (never hostile text)."""
    if len(spec_image) > MAX_DIGEST_REF + 129:
        return digest_ref
    return _display_image(spec_image, digest_ref)


@lru_cache(maxsize=65536)
def _display_image(spec_image: str, digest_ref: str) -> str:
    return spec_image if IMAGE_RE.match(spec_image) is not None else digest_ref
