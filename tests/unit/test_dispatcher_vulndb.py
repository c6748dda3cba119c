"""The vulnerability DB watch's decisions: reading a Trivy server's /version answer (hostile bodies are only
"unreadable"), whether the DB changed, and the order a DB update rescans digests in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.state import VulnDbSeen
from services.dispatcher import vulndb

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
V1 = datetime(2026, 12, 5, 9, 52, 10, 399469, tzinfo=UTC)  # msgspec rounds the nanoseconds
# What Trivy 0.76's `trivy server` answered on this machine over the fixture DB.
REAL = (
    b'{"Version":"0.76.0","VulnerabilityDB":{"Version":2,"NextUpdate":"2126-12-05T09:52:10.399468529Z",'
    b'"UpdatedAt":"2026-12-05T09:52:10.399468529Z","DownloadedAt":"0001-01-01T00:00:00Z"}}'
)


def test_trivys_own_answer_is_read() -> None:
    assert vulndb.read_version(REAL, NOW) == vulndb.DbVersion(updated_at=V1, schema_version=2, trivy_version="0.76.0")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html>bad gateway</html>", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"Version":"0.76.0"}', id="no-db"),
        pytest.param(b'{"VulnerabilityDB":{"Version":2}}', id="no-updated-at"),
        pytest.param(b'{"VulnerabilityDB":{"Version":2,"UpdatedAt":"yesterday"}}', id="updated-at-not-a-time"),
        pytest.param(b'{"VulnerabilityDB":{"Version":2,"UpdatedAt":"2026-12-05T09:52:10"}}', id="no-time-zone"),
        pytest.param(b'{"VulnerabilityDB":{"Version":0,"UpdatedAt":"2026-12-05T09:52:10Z"}}', id="version-zero"),
        pytest.param(b'{"VulnerabilityDB":{"Version":"2","UpdatedAt":"2026-12-05T09:52:10Z"}}', id="version-string"),
        pytest.param(b'{"VulnerabilityDB":{"Version":2,"UpdatedAt":"9999-12-31T00:00:00Z"}}', id="far-future"),
        pytest.param(
            b'{"Version":"0.76.0; rm -rf /","VulnerabilityDB":{"Version":2,"UpdatedAt":"2026-12-05T09:52:10Z"}}',
            id="version-with-shell-text",
        ),
        pytest.param(b'{"Version":"' + b"9" * 100 + b'"}', id="version-too-long"),
        pytest.param(b" " * (vulndb.MAX_BODY_BYTES + 1), id="too-large"),
    ],
)
def test_a_bad_answer_is_unreadable_and_says_why_without_echoing_it(body: bytes) -> None:
    found = vulndb.read_version(body, NOW)
    assert isinstance(found, vulndb.Unreadable)
    assert found.reason and "rm -rf" not in found.reason and len(found.reason) < 200


def test_a_db_stamped_within_a_day_ahead_is_believed() -> None:
    ahead = (NOW + timedelta(hours=23)).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    found = vulndb.read_version(b'{"VulnerabilityDB":{"Version":2,"UpdatedAt":"' + ahead + b'"}}', NOW)
    assert isinstance(found, vulndb.DbVersion) and found.trivy_version == ""


def _seen(at: datetime) -> VulnDbSeen:
    return VulnDbSeen(updated_at=at, schema_version=2, seen_at=NOW)


def _db(at: datetime) -> vulndb.DbVersion:
    return vulndb.DbVersion(updated_at=at, schema_version=2)


@pytest.mark.parametrize(
    ("last", "current", "change"),
    [
        pytest.param(None, V1, "first", id="nothing-recorded"),
        pytest.param(V1, V1, "same", id="same-db"),
        pytest.param(V1, V1 + timedelta(microseconds=1), "newer", id="newer-by-a-microsecond"),
        pytest.param(V1, V1 + timedelta(hours=6), "newer", id="next-update"),
        pytest.param(V1, V1 - timedelta(hours=6), "older", id="a-replica-behind"),
    ],
)
def test_judge(last: datetime | None, current: datetime, change: str) -> None:
    assert vulndb.judge(_seen(last) if last else None, _db(current)) == change


def test_the_event_names_both_dbs_and_its_message_id_the_new_one() -> None:
    event = vulndb.updated_event("prod", _seen(V1), _db(V1 + timedelta(hours=6)), NOW)
    assert (event.previous_updated_at, event.updated_at, event.detected_at) == (V1, V1 + timedelta(hours=6), NOW)
    assert (event.previous_schema_version, event.schema_version) == (2, 2)
    again = vulndb.updated_event("prod", None, _db(V1 + timedelta(hours=6)), NOW + timedelta(minutes=5))
    assert vulndb.message_id(event) == vulndb.message_id(again), "the same DB, noticed twice: one message id"
    assert vulndb.message_id(event) != vulndb.message_id(vulndb.updated_event("prod", None, _db(V1), NOW))
    assert vulndb.seen(_db(V1), NOW) == _seen(V1)


@pytest.mark.parametrize(
    ("candidates", "order"),
    [
        pytest.param([], [], id="none"),
        pytest.param([("a", 1, True), ("b", 5, True), ("c", 3, True)], ["b", "c", "a"], id="most-workloads-first"),
        pytest.param([("a", 9, False), ("b", 0, True)], ["b", "a"], id="not-running-last-whatever-its-workloads"),
        pytest.param([("b", 2, True), ("a", 2, True)], ["a", "b"], id="ties-by-key"),
        pytest.param(
            [("z", 1, False), ("y", 3, False), ("x", 0, True), ("w", 4, True)],
            ["w", "x", "y", "z"],
            id="both-groups-ordered",
        ),
    ],
)
def test_order_for_rescan(candidates: list[tuple[str, int, bool]], order: list[str]) -> None:
    assert vulndb.order_for_rescan(candidates) == order
