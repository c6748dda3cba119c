"""The contract: validation of fields that reach a Job spec or an S3 key, storage keys, exported JSON Schema."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from schemas import export, storage
from schemas.events import ImageSeen
from schemas.refs import InvalidReference, digest_hex, split_digest_ref

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param(f"nginx@sha256:{HEX}", id="docker-hub-short"),
        pytest.param(f"docker.io/library/nginx@sha256:{HEX}", id="docker-hub-full"),
        pytest.param(f"registry.example.com:5000/team/app@sha256:{HEX}", id="registry-with-port"),
        pytest.param(f"ghcr.io/org/my_app-x.y/sub__dir@sha256:{HEX}", id="separators"),
        pytest.param(f"localhost:5000/app@sha256:{HEX}", id="localhost-registry"),
    ],
)
def test_valid_digest_refs_split_into_repository_and_digest(ref: str) -> None:
    repo, digest = split_digest_ref(ref)
    assert ref == f"{repo}@{digest}"
    assert digest_hex(ref) == HEX


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param("nginx:1.25", id="tag-only"),
        pytest.param(f"nginx:1.25@sha256:{HEX}", id="tag-and-digest"),
        pytest.param(f"nginx@sha256:{HEX[:-1]}", id="short-hex"),
        pytest.param(f"nginx@sha256:{HEX.upper()}", id="upper-hex"),
        pytest.param(f"nginx@sha512:{HEX}{HEX}", id="sha512"),
        pytest.param(f"Nginx@sha256:{HEX}", id="upper-case-repository"),
        pytest.param(f"nginx;rm -rf /@sha256:{HEX}", id="shell-metacharacters"),
        pytest.param(f"../../etc/passwd@sha256:{HEX}", id="path-traversal"),
        pytest.param(f"nginx@sha256:{HEX}\n", id="trailing-newline"),
        pytest.param(f"{'a' * 300}@sha256:{HEX}", id="oversized"),
        pytest.param(f"sha256:{HEX}", id="bare-digest"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_digest_refs_are_refused_everywhere(ref: str) -> None:
    with pytest.raises(InvalidReference):
        split_digest_ref(ref)
    event = {
        "cluster": "c",
        "digest_ref": ref,
        "image": "nginx",
        "node": "n1",
        "namespace": "default",
        "pod": "p",
        "container": "c",
        "container_kind": "app",
        "workload": {"kind": "Pod", "name": "p"},
        "observed_at": "2026-11-23T00:00:00Z",
    }
    with pytest.raises(msgspec.ValidationError, match="digest_ref"):
        msgspec.convert(event, ImageSeen)


def test_storage_keys_come_only_from_the_digest_and_scan_id() -> None:
    ref = f"evil.example.com/../../x@sha256:{HEX}".replace("/../../", "/")
    assert storage.raw_key(ref, "s-0123456789") == f"raw/sha256/{HEX}/s-0123456789.json"
    assert storage.sbom_key(ref, "s-0123456789") == f"sbom/sha256/{HEX}/s-0123456789.cdx.json"
    assert storage.latest_report_key(ref) == f"reports/sha256/{HEX}/latest.json"
    at = datetime(2026, 11, 23, 8, 0, 1, 5, tzinfo=UTC)
    assert storage.history_report_key(ref, at) == f"reports/sha256/{HEX}/history/20261123t080001000005z.json"


@pytest.mark.parametrize("scan_id", ["../../etc", "UPPER-CASE-ID", "short", "a" * 64, "x/y-123456"])
def test_storage_keys_refuse_scan_ids_that_are_not_dns_labels(scan_id: str) -> None:
    with pytest.raises(ValueError, match="scan id"):
        storage.raw_key(f"nginx@sha256:{HEX}", scan_id)


def test_committed_json_schemas_match_the_structs() -> None:
    stale = [name for name, text in export.render().items() if (export.JSON_DIR / name).read_text() != text]
    assert stale == [], f"run `podsweep schemas export`: {stale}"


class _Indented(msgspec.Struct):
    """First line.

    An indented second paragraph, as a docstring has it.
    """

    field: int = 0


def test_exported_descriptions_do_not_depend_on_how_msgspec_dedents_them() -> None:
    """msgspec 0.22 kept a docstring's indentation in descriptions, 0.23 removes it: the export is the same for both."""
    kept = {"description": "First line.\n\n    An indented second paragraph, as a docstring has it."}
    removed = {"description": "First line.\n\nAn indented second paragraph, as a docstring has it."}
    assert export._normalized({"$defs": {"A": kept}}) == export._normalized({"$defs": {"A": removed}})
    assert export._normalized({"properties": {"description": {"type": "string"}}}) == {
        "properties": {"description": {"type": "string"}}
    }
    exported = export._normalized(msgspec.json.schema(_Indented))
    assert exported["$defs"]["_Indented"]["description"] == removed["description"]


def test_every_event_round_trips_through_its_json_schema_types() -> None:
    for stem, typ in export.DOCUMENTS.items():
        schema = msgspec.json.schema(typ)
        assert schema["$ref"].endswith(typ.__name__), stem
