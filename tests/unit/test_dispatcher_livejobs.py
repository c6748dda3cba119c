"""Jobs that exist when a dispatcher starts leading: counted against the limits, or deleted when nobody wants them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from schemas import jobs
from schemas.state import DigestScanState, LimiterState, Slot
from services.dispatcher import livejobs
from services.dispatcher.plan import scan_id_for

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
LIFE = timedelta(minutes=12)
REF = "registry.example.com/app@sha256:" + "4" * 64
SCAN = scan_id_for(REF, 3)


def job(
    name: str = SCAN, *, mode: str = "node", finished: str = "", created: datetime = T0, ref: str = REF
) -> livejobs.ExistingJob:
    raw: dict[str, Any] = {
        "metadata": {
            "name": name,
            "creationTimestamp": created.isoformat(),
            "labels": {jobs.MANAGED_BY_LABEL: jobs.MANAGED_BY_VALUE, jobs.SCAN_ID_LABEL: name},
            "annotations": {jobs.MODE_ANNOTATION: mode, jobs.DIGEST_REF_ANNOTATION: ref, jobs.NODE_ANNOTATION: "n1"}
            if mode == "node"
            else {jobs.MODE_ANNOTATION: mode},
        },
        "status": {"conditions": [{"type": finished, "status": "True"}] if finished else []},
    }
    return msgspec.json.decode(msgspec.json.encode(raw), type=livejobs.ExistingJob)


def claim(status: str = "running", seq: int = 3) -> DigestScanState:
    return DigestScanState(digest_ref=REF, status=status, scan_id=scan_id_for(REF, seq), node="n1", scan_seq=seq)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("found", "state", "count", "delete"),
    [
        pytest.param([job()], claim(), [Slot(SCAN, "n1", T0 + LIFE)], [], id="the-claims-job-is-counted"),
        pytest.param([job()], claim("pending"), [Slot(SCAN, "n1", T0 + LIFE)], [], id="pending-claim-too"),
        pytest.param([job()], claim(seq=4), [], [SCAN], id="an-older-scans-job-is-deleted"),
        pytest.param([job()], claim("done"), [], [SCAN], id="a-finished-claims-job-is-deleted"),
        pytest.param([job()], None, [], [SCAN], id="no-state-at-all"),
        pytest.param([job(finished="Complete")], None, [], [], id="finished-jobs-hold-nothing"),
        pytest.param([job(finished="Failed")], claim(), [], [], id="failed-jobs-hold-nothing"),
        pytest.param([job("other-job")], None, [], [], id="not-a-name-podsweep-gives"),
        pytest.param([job(created=T0 - LIFE - LIFE)], claim(), [], [], id="past-its-deadline"),
        pytest.param(
            [job("psw-b-" + "0" * 24, mode="sbom")],
            None,
            [Slot("psw-b-" + "0" * 24, None, T0 + LIFE)],
            [],
            id="a-batch-counts-globally",
        ),
        pytest.param(
            [job(ref="not a digest")],
            None,
            [Slot(SCAN, None, T0 + LIFE)],
            [],
            id="unreadable-annotation-is-counted-never-judged",
        ),
    ],
)
def test_reconcile(
    found: list[livejobs.ExistingJob], state: DigestScanState | None, count: list[Slot], delete: list[str]
) -> None:
    result = livejobs.reconcile(found, {REF: state}, T0, LIFE)
    assert (result.count, result.delete) == (count, delete)


def test_adopted_slots_count_beyond_the_limits_and_once() -> None:
    held = Slot("psw-a", "n1", T0 + LIFE)
    state = LimiterState(slots=[held], created=[T0])
    new = livejobs.adopt(state, [held, Slot("psw-b", "n1", T0 + LIFE)])
    assert new is not None and [s.scan_id for s in new.slots] == ["psw-a", "psw-b"]
    assert new.created == [T0], "adopting is not creating"
    assert livejobs.adopt(new, [held]) is None
