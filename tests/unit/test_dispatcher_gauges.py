"""The dispatcher's gauges report the leading replica's limiter view and limits, and nothing once it stops leading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from opentelemetry.metrics import CallbackOptions

from podsweep.config import DispatcherSettings
from schemas.state import LimiterState, Slot
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
    stop = gauges.leading(lambda: view, configured)
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
