"""imageID forms runtimes write, and what the watcher makes of them."""

from __future__ import annotations

import pytest

from schemas.refs import split_digest_ref
from services.watcher.digests import (
    ImageDigest,
    Invalid,
    NotReady,
    display_image,
    normalize_repository,
    parse_image_id,
)

HEX = "0123456789abcdef" * 4
HEX2 = "fedcba9876543210" * 4


@pytest.mark.parametrize(
    ("image_id", "spec_image", "digest_ref", "source"),
    [
        pytest.param(
            f"docker-pullable://nginx@sha256:{HEX}",
            "nginx:1.27",
            f"docker.io/library/nginx@sha256:{HEX}",
            "repo-digest",
            id="dockershim-docker-pullable-short-name",
        ),
        pytest.param(
            f"docker-pullable://registry.example.com:5000/team/app@sha256:{HEX}",
            "registry.example.com:5000/team/app:v1",
            f"registry.example.com:5000/team/app@sha256:{HEX}",
            "repo-digest",
            id="dockershim-registry-with-port",
        ),
        pytest.param(
            f"docker.io/library/nginx@sha256:{HEX}",
            "nginx",
            f"docker.io/library/nginx@sha256:{HEX}",
            "repo-digest",
            id="containerd-fully-qualified",
        ),
        pytest.param(
            f"quay.io/prometheus/node-exporter@sha256:{HEX}",
            "quay.io/prometheus/node-exporter:v1.8.0",
            f"quay.io/prometheus/node-exporter@sha256:{HEX}",
            "repo-digest",
            id="cri-o-quay",
        ),
        pytest.param(
            f"docker.io/bitnami/redis@sha256:{HEX}",
            "bitnami/redis",
            f"docker.io/bitnami/redis@sha256:{HEX}",
            "repo-digest",
            id="docker-hub-org-keeps-its-path",
        ),
        pytest.param(
            f"index.docker.io/nginx@sha256:{HEX}",
            "nginx",
            f"docker.io/library/nginx@sha256:{HEX}",
            "repo-digest",
            id="index-docker-io-alias",
        ),
        pytest.param(
            f"localhost:5000/app@sha256:{HEX}",
            "localhost:5000/app:dev",
            f"localhost:5000/app@sha256:{HEX}",
            "repo-digest",
            id="localhost-registry-not-docker-hub",
        ),
        pytest.param(
            f"localhost/app@sha256:{HEX}",
            "localhost/app",
            f"localhost/app@sha256:{HEX}",
            "repo-digest",
            id="localhost-without-port-is-a-registry",
        ),
        pytest.param(
            f"ghcr.io/org/app:1.2@sha256:{HEX}",
            "ghcr.io/org/app:1.2",
            f"ghcr.io/org/app@sha256:{HEX}",
            "repo-digest",
            id="tag-and-digest-drops-the-tag",
        ),
        pytest.param(
            f"sha256:{HEX}",
            "registry.example.com/team/app:v2",
            f"registry.example.com/team/app@sha256:{HEX}",
            "image-id",
            id="containerd-bare-image-id-takes-spec-repository",
        ),
        pytest.param(
            f"docker://sha256:{HEX}",
            "myapp:dev",
            f"docker.io/library/myapp@sha256:{HEX}",
            "image-id",
            id="docker-local-image-id",
        ),
        pytest.param(
            HEX,
            "quay.io/org/app",
            f"quay.io/org/app@sha256:{HEX}",
            "image-id",
            id="cri-o-hex-without-algorithm",
        ),
        pytest.param(
            f"sha256:{HEX}",
            f"ghcr.io/org/app@sha256:{HEX2}",
            f"ghcr.io/org/app@sha256:{HEX2}",
            "spec-digest",
            id="bare-image-id-prefers-the-spec-pinned-digest",
        ),
        pytest.param(
            f"sha256:{HEX}",
            "registry.example.com:5000/app",
            f"registry.example.com:5000/app@sha256:{HEX}",
            "image-id",
            id="bare-image-id-spec-with-port-and-no-tag",
        ),
    ],
)
def test_every_runtime_image_id_form_becomes_a_validated_digest_ref(
    image_id: str, spec_image: str, digest_ref: str, source: str
) -> None:
    parsed = parse_image_id(image_id, spec_image)
    assert parsed == ImageDigest(digest_ref, source)  # type: ignore[arg-type]
    split_digest_ref(parsed.digest_ref)  # raises if it is not a valid digest ref


def test_a_container_without_image_id_is_not_ready() -> None:
    assert isinstance(parse_image_id("", "nginx"), NotReady)


@pytest.mark.parametrize(
    ("image_id", "spec_image"),
    [
        pytest.param(f"nginx@sha256:{HEX.upper()}", "nginx", id="upper-case-hex"),
        pytest.param(f"nginx@sha256:{HEX[:-2]}", "nginx", id="short-hex"),
        pytest.param(f"nginx@sha512:{HEX}{HEX}", "nginx", id="sha512"),
        pytest.param(f"containerd://nginx@sha256:{HEX}", "nginx", id="unknown-scheme"),
        pytest.param(f"Nginx@sha256:{HEX}", "nginx", id="upper-case-repository"),
        pytest.param(f"nginx;rm -rf /@sha256:{HEX}", "nginx", id="shell-metacharacters"),
        pytest.param(f"../../etc@sha256:{HEX}", "nginx", id="path-traversal"),
        pytest.param(f"nginx@sha256:{HEX}\n", "nginx", id="trailing-newline"),
        pytest.param(f"{'a/' * 200}x@sha256:{HEX}", "nginx", id="oversized"),
        pytest.param(f"sha256:{HEX}", "", id="bare-image-id-without-spec-image"),
        pytest.param(f"sha256:{HEX}", "a" * 2_000_000, id="bare-image-id-with-huge-spec-image"),
        pytest.param(f"sha256:{HEX}", "UPPER/app", id="bare-image-id-with-invalid-spec-image"),
        pytest.param(f"sha256:{HEX}", "app$(reboot)", id="bare-image-id-with-hostile-spec-image"),
        pytest.param("sha256:xyz", "nginx", id="bare-non-hex"),
        pytest.param("not-an-image-id", "nginx", id="garbage"),
    ],
)
def test_invalid_image_ids_are_refused_without_echoing_them(image_id: str, spec_image: str) -> None:
    parsed = parse_image_id(image_id, spec_image)
    assert isinstance(parsed, Invalid)
    assert image_id.strip() not in parsed.reason
    assert "rm -rf" not in parsed.reason


@pytest.mark.parametrize(
    ("repository", "normalized"),
    [
        pytest.param("nginx", "docker.io/library/nginx", id="official-image"),
        pytest.param("docker.io/nginx", "docker.io/library/nginx", id="docker-io-single-component"),
        pytest.param("docker.io/library/nginx", "docker.io/library/nginx", id="already-canonical"),
        pytest.param("registry-1.docker.io/org/app", "docker.io/org/app", id="registry-1-alias"),
        pytest.param("org/app", "docker.io/org/app", id="hub-organisation"),
        pytest.param("gcr.io/project/app", "gcr.io/project/app", id="other-registry-untouched"),
        pytest.param("Registry.Example.com/app", "Registry.Example.com/app", id="domain-may-have-upper-case"),
        pytest.param("ORG/app", None, id="path-must-be-lower-case"),
        pytest.param("", None, id="empty"),
    ],
)
def test_repositories_normalize_like_the_runtimes(repository: str, normalized: str | None) -> None:
    assert normalize_repository(repository) == normalized


@pytest.mark.parametrize(
    ("spec_image", "shown"),
    [
        pytest.param("nginx:1.27", "nginx:1.27", id="valid-spec-image-as-written"),
        pytest.param("NGINX:latest", f"docker.io/library/nginx@sha256:{HEX}", id="invalid-falls-back-to-digest"),
        pytest.param("nginx:1\nINJECTED", f"docker.io/library/nginx@sha256:{HEX}", id="newline-falls-back"),
        pytest.param("a" * 2_000_000, f"docker.io/library/nginx@sha256:{HEX}", id="huge-falls-back"),
    ],
)
def test_displayed_image_is_never_hostile_text(spec_image: str, shown: str) -> None:
    assert display_image(spec_image, f"docker.io/library/nginx@sha256:{HEX}") == shown
