"""Mutated real Trivy reports: the parser returns a storable Report or raises ParseError, never anything else."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podsweep.reports import normalize, trivy
from schemas.events import FindingRef
from schemas.report import Report

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trivy"
# Small and medium real reports: each example re-parses one, so the big ones would only slow the search down.
SEEDS = {
    name: (FIXTURES / f"{name}.json").read_bytes()
    for name in (
        "v2-alpine-39-eosl",
        "v2-cvss-v4",
        "v2-all-statuses",
        "v2-misconfig-and-secrets",
        "v2-secrets-repository",
        "v2-misconfig-terraform",
        "legacy-many-vulns",
        "legacy-null",
        "v2-zero-vulns",
    )
}
CAP = 4 * 1024 * 1024
REPORT = msgspec.json.Decoder(Report)
REFS = msgspec.json.Decoder(list[FindingRef])

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.sampled_from(sorted(SEEDS)).map(SEEDS.__getitem__)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x20), max_size=300),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)


def assert_parses_or_refuses(data: bytes) -> None:
    """The whole property: a Report that survives its own validation, or a ParseError with a one-line reason."""
    try:
        report = normalize.parse(data, max_bytes=CAP)
    except trivy.ParseError as exc:
        refused: trivy.ParseError | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.reason and "\n" not in str(refused)
        return
    assert REPORT.decode(msgspec.json.encode(report)) == report
    assert report.counts.total() == len(report.findings)
    new, _ = normalize.diff(None, report)
    assert REFS.decode(msgspec.json.encode(new)) == new


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (capped, so one example stays fast)."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node[:4]):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replace(node[head], rest, value)}
    copy = list(node)
    copy[head] = _replace(node[head], rest, value)
    return copy


@FUZZ
@given(seed=seeds, fraction=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_truncated_reports_never_crash(seed: bytes, fraction: float) -> None:
    assert_parses_or_refuses(seed[: int(len(seed) * fraction)])


@FUZZ
@given(seed=seeds, where=st.floats(min_value=0, max_value=1), garbage=st.binary(min_size=1, max_size=16))
def test_garbage_inserted_anywhere_never_crashes(seed: bytes, where: float, garbage: bytes) -> None:
    at = int(len(seed) * where)
    assert_parses_or_refuses(seed[:at] + garbage + seed[at:])


@FUZZ
@given(seed=seeds, where=st.floats(min_value=0, max_value=1, exclude_max=True), byte=st.integers(0, 255))
def test_a_flipped_byte_never_crashes(seed: bytes, where: float, byte: int) -> None:
    at = int(len(seed) * where)
    assert_parses_or_refuses(seed[:at] + bytes([byte]) + seed[at + 1 :])


@FUZZ
@given(seed=seeds, pick=st.floats(min_value=0, max_value=1, exclude_max=True), value=json_values)
def test_any_value_swapped_for_another_type_never_crashes(seed: bytes, pick: float, value: Any) -> None:
    document = json.loads(seed)
    paths = _paths(document)
    mutated = _replace(document, paths[int(len(paths) * pick)], value)
    assert_parses_or_refuses(json.dumps(mutated).encode())


@FUZZ
@given(
    seed=seeds,
    pick=st.floats(min_value=0, max_value=1, exclude_max=True),
    text=st.text(min_size=1, max_size=5000),
)
def test_hostile_strings_in_any_field_still_give_a_storable_report(seed: bytes, pick: float, text: str) -> None:
    document = json.loads(seed)
    paths = [p for p in _paths(document) if p and isinstance(p[-1], str)]
    if not paths:
        return
    assert_parses_or_refuses(json.dumps(_replace(document, paths[int(len(paths) * pick)], text)).encode())


@FUZZ
@given(seed=seeds, fraction=st.floats(min_value=0, max_value=1), crlf=st.booleans())
def test_gzip_whole_or_cut_never_crashes(seed: bytes, fraction: float, crlf: bool) -> None:
    body = seed.replace(b"\n", b"\r\n") if crlf else seed
    packed = gzip.compress(body)
    assert_parses_or_refuses(packed[: max(2, int(len(packed) * fraction))])


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_itself_a_valid_report(name: str) -> None:
    """Guards the fuzz tests: seeds that did not parse would make every property trivially about ParseError."""
    assert normalize.parse(SEEDS[name]).source_format in ("v2", "legacy")
