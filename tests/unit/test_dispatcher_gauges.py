"""The dispatcher's gauges report the leading replica's limiter view, limits and digests by state, and nothing once it
stops leading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from opentelemetry.metrics import CallbackOptions

from podsweep.config import DispatcherSettings
from schemas.state import DigestScanState, LimiterState, Slot
from services.dispatcher import gauges

OPTIONS = CallbackOptions()


def observed(callback: object) -> list[tuple[float, dict[str, str]]]:
    return [(o.value, dict(o.attributes or {})) for o in callback(OPTIONS)]  # type: ignore[operator]


def test_gauges_follow_the_leading_view_and_stop_with_it() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    earlier = datetime.now(UTC) - timedelta(hours=1)
    view = LimiterState(
        slots=[
            Slot(scan_id="psw-a", node="n1", deadline=later),
            Slot(scan_id="psw-b", node="n1", deadline=later),
            Slot(scan_id="psw-c", node=None, deadline=later),  # an SBOM batch: global only
            Slot(scan_id="psw-d", node="n2", deadline=earlier),  # past its deadline: not counted
        ]
    )
    configured = DispatcherSettings(max_active=7, max_active_per_node=3, max_created_per_minute=11)
    stop = gauges.leading(lambda: view, configured, lambda: None)
    try:
        assert observed(gauges._active) == [(3, {})]
        assert observed(gauges._active_per_node) == [(2, {"node": "n1"})]
        assert sorted(observed(gauges._limits), key=lambda o: o[1]["limit"]) == [
            (7, {"limit": "max_active"}),
            (3, {"limit": "max_active_per_node"}),
            (11, {"limit": "max_created_per_minute"}),
        ]
    finally:
        stop()
    assert observed(gauges._active) == []
    assert observed(gauges._limits) == []


def state(n: int, **fields: object) -> DigestScanState:
    return DigestScanState(digest_ref=f"r/app@sha256:{n:064x}", **fields)  # type: ignore[arg-type]


def test_digests_by_state_count_every_state_as_podsweep_status_does() -> None:
    states = [
        state(1, status="done"),
        state(2, status="done"),
        state(3, status="running", node="n1"),
        state(4, status="failed", reason="NodeGone"),
        # Runs somewhere and was never claimed: waiting for a slot, counted as pending (as `podsweep status` does).
        state(5, status="not_scanned", nodes_seen=["n1"]),
        state(6, status="not_scanned", reason="no node runs it any more"),
    ]
    stop = gauges.leading(lambda: LimiterState(), DispatcherSettings(), lambda: iter(states))
    try:
        counted = {o[1]["state"]: o[0] for o in observed(gauges._digests)}
    finally:
        stop()
    assert counted == {"pending": 1, "running": 1, "done": 2, "failed": 1, "not_scanned": 1}
    assert observed(gauges._digests) == []


def test_no_digest_count_while_the_mirror_is_incomplete() -> None:
    """A mirror still loading (or whose watch restarts) would undercount: the series is left out, not shown short."""
    stop = gauges.leading(lambda: LimiterState(), DispatcherSettings(), lambda: None)
    try:
        assert observed(gauges._digests) == []
        assert observed(gauges._active) == [(0, {})]
    finally:
        stop()
