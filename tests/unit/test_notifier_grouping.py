"""Grouping a storm: members, CVE pages, idempotency keys, and the split into the fewest messages within each
destination kind's limits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from schemas.alerts import AlertFinding, AlertPayload, GroupMember, GroupPayload, Threshold
from schemas.events import SeverityCounts, Workload
from services.notifier import grouping, messages

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def alert(n: int, cves: Sequence[tuple[str, str]] = (("CVE-2026-1000", "CRITICAL"),), omitted: int = 0) -> AlertPayload:
    hex_ = f"{n % 300:064x}"
    return AlertPayload(
        id=f"{n:032x}",
        cluster="prod",
        digest_ref=f"registry.example.com/shop/app@sha256:{hex_}",
        image=f"registry.example.com/shop/app:{n % 300}",
        namespace=f"team-{n % 7}",
        workload=Workload("Deployment", f"app-{n:05d}"),
        rule="defaults",
        threshold=Threshold(max_critical=0),
        reasons=["1 CRITICAL (more than 0)"],
        counts=SeverityCounts(CRITICAL=len(cves)),
        new_count=len(cves),
        findings=[
            AlertFinding(id=c, package="openssl", installed_version="3.0.1", severity=s)  # type: ignore[arg-type]
            for c, s in cves
        ],
        omitted=omitted,
        scan_id=f"scan-{n:05d}",
        report_key=f"reports/sha256/{hex_}/latest.json",
        created_at=NOW,
    )


def members(count: int, **extra: Any) -> list[GroupMember]:
    return [grouping.member(alert(n, **extra)) for n in range(count)]


@pytest.mark.parametrize(
    ("cve", "key"),
    [
        pytest.param("CVE-2024-3094", "index/cve/CVE-2024-3094.html", id="cve"),
        pytest.param("CVE-2021-44228", "index/cve/CVE-2021-44228.html", id="five-digit-cve"),
        pytest.param("GHSA-jfh8-c2jp-5v3q", "index/cve/GHSA-jfh8-c2jp-5v3q.html", id="ghsa"),
        pytest.param("CVE-2024-3094/../../x", "", id="path-traversal"),
        pytest.param("cve-2024-3094", "", id="lower-case-is-not-an-id"),
        pytest.param("CVE-2024-1*", "", id="glob"),
        pytest.param("$(rm -rf /)", "", id="shell"),
        pytest.param("DLA-3682-1", "index/cve/DLA-3682-1.html", id="other-advisory"),
        pytest.param("RHSA-2023:1234", "index/cve/RHSA-2023_1234.html", id="colon-becomes-underscore"),
        pytest.param("GHSA-jfh8-c2jp-5v3", "", id="short-ghsa"),
        pytest.param("", "", id="empty"),
    ],
)
def test_cve_page_key_only_for_ids_that_are_safe_keys(cve: str, key: str) -> None:
    assert grouping.cve_page_key(cve) == key


def test_member_lists_each_cve_once_new_first_and_counts_the_rest() -> None:
    many = [(f"CVE-2026-{1000 + i}", "HIGH") for i in range(12)] + [("CVE-2026-1000", "HIGH")]
    m = grouping.member(alert(1, cves=many, omitted=5))
    assert m.cves == [f"CVE-2026-{1000 + i}" for i in range(10)]
    assert m.severities == ["HIGH"] * 10
    assert m.more == 2 + 5
    assert (m.id, m.namespace, m.workload.name) == (f"{1:032x}", "team-1", "app-00001")


@pytest.mark.parametrize(
    ("keys", "same_as"),
    [
        pytest.param(["a" * 32], "a" * 32, id="lone-alert-keeps-its-key"),
        pytest.param(["a" * 32, "b" * 32], None, id="group"),
    ],
)
def test_group_key(keys: list[str], same_as: str | None) -> None:
    key = grouping.group_key("slack", keys)
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
    if same_as is not None:
        assert key == same_as
    else:
        assert key == grouping.group_key("slack", list(reversed(keys))), "the order of members does not matter"
        assert key != grouping.group_key("hook", keys), "each destination has its own key"
        assert key != grouping.group_key("slack", [*keys, "c" * 32]), "other members, another key"


def test_cves_are_worst_first_then_most_affected_with_their_pages() -> None:
    group = [
        grouping.member(alert(0, cves=[("CVE-2026-0002", "HIGH"), ("CVE-2026-0001", "MEDIUM")])),
        grouping.member(alert(1, cves=[("CVE-2026-0001", "CRITICAL")])),
        grouping.member(alert(2, cves=[("CVE-2026-0003", "HIGH"), ("weird id", "LOW")])),
        grouping.member(alert(3, cves=[("CVE-2026-0003", "HIGH")])),
    ]
    found = grouping.cves(group)
    assert [(c.id, c.severity, c.workloads) for c in found] == [
        ("CVE-2026-0001", "CRITICAL", 2),
        ("CVE-2026-0003", "HIGH", 2),
        ("CVE-2026-0002", "HIGH", 1),
        ("weird id", "LOW", 1),
    ]
    assert found[0].page_key == "index/cve/CVE-2026-0001.html" and found[-1].page_key == ""


@pytest.mark.parametrize(
    ("sizes", "capacity", "limit", "chunks"),
    [
        pytest.param([1] * 10, 3, None, [3, 3, 3, 1], id="equal-sizes"),
        pytest.param([1] * 9, 3, None, [3, 3, 3], id="exact-fit"),
        pytest.param([2, 2, 1, 3, 1], 4, None, [2, 2, 1], id="variable-sizes-in-order"),
        pytest.param([5, 1], 4, None, [1, 1], id="too-big-alone-still-leaves"),
        pytest.param([1] * 10, 3, 2, [3, 3], id="only-the-first-chunks"),
        pytest.param([1] * 1000, 1000, None, [1000], id="one-big-chunk"),
        pytest.param([], 3, None, [], id="nothing"),
    ],
)
def test_split_takes_the_longest_prefix_that_fits(
    sizes: list[int], capacity: int, limit: int | None, chunks: list[int]
) -> None:
    items = members(len(sizes))
    size_of = {m.id: s for m, s in zip(items, sizes, strict=True)}
    calls: list[int] = []

    def fits(chunk: Sequence[GroupMember]) -> bool:
        calls.append(len(chunk))
        return sum(size_of[m.id] for m in chunk) <= capacity

    got = grouping.split(items, fits, limit=limit)
    assert [len(c) for c in got] == chunks
    assert [m for c in got for m in c] == items[: sum(chunks)], "in order, each member once"
    assert len(calls) <= 4 * max(1, len(chunks)) * 11, "a logarithmic number of probes per chunk"


@pytest.mark.parametrize("count", [2, 40, 2000])
def test_slack_groups_stay_within_slack_limits_and_are_full(count: int) -> None:
    everyone = members(count)
    chunks = grouping.split(everyone, lambda ms: messages.group_fits("slack", ms, "prod", 0))
    for i, chunk in enumerate(chunks):
        message = messages.slack_group_message("f" * 32, "prod", chunk, NOW)
        body = json.loads(messages.encode(message))
        assert len(body["blocks"]) <= messages.SLACK_MAX_BLOCKS
        assert all(len(b["text"]["text"]) <= 3000 for b in body["blocks"] if b["type"] in ("section", "header"))
        assert messages.slack_chars(message) <= messages.SLACK_MAX_CHARS
        text = json.dumps(body)
        assert all(m.workload.name in text for m in chunk)
        assert "index/cve/CVE-2026-1000.html" in text
        if i < len(chunks) - 1:  # the next member would not have fitted: no two messages could have been one
            assert not messages.group_fits("slack", [*chunk, chunks[i + 1][0]], "prod", 0)
    assert sum(len(c) for c in chunks) == count


@pytest.mark.parametrize("max_bytes", [16_384, 262_144])
def test_webhook_groups_fit_the_destination_body_limit(max_bytes: int) -> None:
    everyone = members(2000)
    chunks = grouping.split(everyone, lambda ms: messages.group_fits("webhook", ms, "prod", max_bytes))
    for chunk in chunks:
        body = messages.group_webhook_body("f" * 32, "prod", chunk, datetime(2026, 11, 23, 12, 0, 0, 123456, UTC))
        assert len(body) <= max_bytes
        decoded = msgspec.json.decode(body, type=GroupPayload)
        assert [m.id for m in decoded.members] == [m.id for m in chunk]
        assert decoded.cves[0].page_key == "index/cve/CVE-2026-1000.html"
        assert decoded.cves[0].workloads == len(chunk)
    assert sum(len(c) for c in chunks) == 2000


def test_teams_groups_fit_teams_message_size() -> None:
    chunks = grouping.split(members(500), lambda ms: messages.group_fits("teams", ms, "prod", 0))
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(messages.encode(messages.teams_group_message("f" * 32, "prod", chunk, NOW))) <= 28_000


def test_slack_group_escapes_hostile_names() -> None:
    m = msgspec.structs.replace(grouping.member(alert(1)), image="evil<!channel>&<http://x|y>")
    text = json.dumps(json.loads(messages.encode(messages.slack_group_message("f" * 32, "prod", [m, m], NOW))))
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text
