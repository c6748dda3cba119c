"""Whether the Trivy server's vulnerability DB changed: its `GET /version` answer read, and judged against the newest DB
seen before. Pure: no I/O, the clock an argument. The answer is read as untrusted: anything but the expected shape,
in bounds, is "unreadable" and changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

import msgspec

from schemas.events import DbUpdated
from schemas.state import VulnDbSeen

MAX_BODY_BYTES = 64 * 1024
# A DB stamped further ahead than this is refused: recorded, it would hide every real update until that date.
MAX_CLOCK_AHEAD = timedelta(days=1)

Change = Literal["first", "same", "newer", "older"]
_TrivyVersion = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9A-Za-z.+_-]*$")]


class _DbMetadata(msgspec.Struct, frozen=True):
    version: Annotated[int, msgspec.Meta(ge=1, le=1000)] = msgspec.field(name="Version")
    updated_at: Annotated[datetime, msgspec.Meta(tz=True)] = msgspec.field(name="UpdatedAt")


class _ServerVersion(msgspec.Struct, frozen=True):
    """What `trivy server` answers on /version (Trivy 0.76); other fields are ignored."""

    vulnerability_db: _DbMetadata = msgspec.field(name="VulnerabilityDB")
    version: _TrivyVersion = msgspec.field(default="", name="Version")


_decoder = msgspec.json.Decoder(_ServerVersion)


class DbVersion(msgspec.Struct, frozen=True, kw_only=True):
    """The DB a Trivy server serves."""

    updated_at: datetime
    schema_version: int
    trivy_version: str = ""


class Unreadable(msgspec.Struct, frozen=True):
    """Why an answer was not used (bounded; never echoes the body)."""

    reason: str


def read_version(body: bytes, now: datetime) -> DbVersion | Unreadable:
    """The DB named by a /version answer, or why it cannot be used."""
    if len(body) > MAX_BODY_BYTES:
        return Unreadable(f"the answer is {len(body)} bytes (at most {MAX_BODY_BYTES})")
    try:
        answer = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        text = str(exc)
        where = text.rpartition(" - at ")[2][:80] if " - at " in text else "the JSON"
        return Unreadable(f"not a Trivy /version answer (at {where})")
    db = answer.vulnerability_db
    if db.updated_at > now + MAX_CLOCK_AHEAD:
        return Unreadable(f"the DB's UpdatedAt is more than {MAX_CLOCK_AHEAD} ahead of this clock")
    return DbVersion(updated_at=db.updated_at, schema_version=db.version, trivy_version=answer.version)


def judge(last: VulnDbSeen | None, current: DbVersion) -> Change:
    """`first` with nothing recorded (nothing to rescan for: what was scanned is not known to be older), `newer` when
    the DB was updated after the one recorded, `older` when the server went back (a replica behind the others, a
    restore): never a rescan, so replicas serving different DBs cannot make podsweep rescan back and forth."""
    if last is None:
        return "first"
    if current.updated_at > last.updated_at:
        return "newer"
    if current.updated_at < last.updated_at:
        return "older"
    return "same"


def seen(current: DbVersion, now: datetime) -> VulnDbSeen:
    return VulnDbSeen(updated_at=current.updated_at, schema_version=current.schema_version, seen_at=now)


def updated_event(cluster: str, last: VulnDbSeen | None, current: DbVersion, now: datetime) -> DbUpdated:
    return DbUpdated(
        cluster=cluster,
        previous_updated_at=last.updated_at if last else None,
        previous_schema_version=last.schema_version if last else None,
        updated_at=current.updated_at,
        schema_version=current.schema_version,
        trivy_version=current.trivy_version,
        detected_at=now,
    )


def message_id(event: DbUpdated) -> str:
    """One db.updated per DB: a second replica or a restart noticing the same DB within the duplicate window is
    dropped by the stream (after it, the recorded VulnDbSeen stops them)."""
    return f"db-updated-{event.cluster}-{event.updated_at.timestamp():.6f}"


def order_for_rescan(candidates: list[tuple[str, int, bool]]) -> list[str]:
    """Digest keys in the order a DB update rescans them: running ones first, those run by the most workloads first
    among them; ties by key (every replica the same order). Each candidate: (key, workloads, running)."""
    return [key for key, _, _ in sorted(candidates, key=lambda c: (not c[2], -c[1], c[0]))]
