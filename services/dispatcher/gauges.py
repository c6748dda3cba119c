"""The dispatcher's gauges: scan Jobs holding a slot (in all, per node), the configured limits, whether this replica
leads. They read the leading replica's limiter view as it last saw it; they never read or write NATS themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep.config import DispatcherSettings
from schemas.state import LimiterState
from services.dispatcher import limits as limiter
from services.dispatcher.digests import utcnow

LimiterView = Callable[[], LimiterState]
_leading: list[tuple[LimiterView, DispatcherSettings]] = []  # this process's leading replica, while it leads


def leading(view: LimiterView, configured: DispatcherSettings) -> Callable[[], None]:
    """Report this replica's view while it leads; call the returned function when it stops."""
    entry = (view, configured)
    _leading.append(entry)
    return lambda: _leading.remove(entry)


def _active(_: CallbackOptions) -> Iterable[Observation]:
    if _leading:
        yield Observation(len(limiter.live(_leading[-1][0](), utcnow()).slots))


def _active_per_node(_: CallbackOptions) -> Iterable[Observation]:
    if _leading:
        for node, count in limiter.active_per_node(_leading[-1][0](), utcnow()).items():
            yield Observation(count, {"node": node})


def _limits(_: CallbackOptions) -> Iterable[Observation]:
    """The configured limits, so a dashboard can draw the active Jobs against them."""
    if _leading:
        configured = _leading[-1][1]
        yield Observation(configured.max_active, {"limit": "max_active"})
        yield Observation(configured.max_active_per_node, {"limit": "max_active_per_node"})
        yield Observation(configured.max_created_per_minute, {"limit": "max_created_per_minute"})


meter = metrics.get_meter("podsweep.dispatcher")
meter.create_observable_gauge(
    "podsweep_dispatcher_active_jobs", [_active], description="Scan Jobs holding a limiter slot"
)
meter.create_observable_gauge(
    "podsweep_dispatcher_active_jobs_per_node",
    [_active_per_node],
    description="Scan Jobs holding a limiter slot, by node",
)
meter.create_observable_gauge(
    "podsweep_dispatcher_limit", [_limits], description="The dispatcher's configured scan limits, by limit"
)
meter.create_observable_gauge(
    "podsweep_dispatcher_leading",
    [lambda _: [Observation(1 if _leading else 0)]],
    description="1 while this replica holds the dispatcher lease and consumes, 0 while it stands by",
)
