"""The dispatcher's gauges: scan Jobs holding a slot (in all, per node), the configured limits, digests by scan state,
whether this replica leads. They read the leading replica's limiter view and its mirror of the scans bucket as it last
saw them; they never read or write NATS themselves. All but `podsweep_dispatcher_leading` come from the leader alone,
so a sum over replicas counts each once."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep.config import DispatcherSettings
from podsweep.status import count_by_state
from schemas.state import DigestScanState, LimiterState
from services.dispatcher import limits as limiter
from services.dispatcher.digests import utcnow

LimiterView = Callable[[], LimiterState]
# Every digest's state as the leader's mirror holds it; None while the mirror is not complete (starting, or its watch
# restarting), when a count would be short.
StatesView = Callable[[], Iterable[DigestScanState] | None]
_leading: list[tuple[LimiterView, DispatcherSettings, StatesView]] = []  # this process's leader, while it leads


def leading(view: LimiterView, configured: DispatcherSettings, states: StatesView) -> Callable[[], None]:
    """Report this replica's views while it leads; call the returned function when it stops."""
    entry = (view, configured, states)
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


def _digests(_: CallbackOptions) -> Iterable[Observation]:
    """Digests by scan state, every state each time (0 when none), counted as `podsweep status` counts them."""
    if _leading:
        states = _leading[-1][2]()
        if states is not None:
            for state, count in count_by_state(states).items():
                yield Observation(count, {"state": state})


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
meter.create_observable_gauge(
    "podsweep_digests",
    [_digests],
    description="Digests podsweep knows, by scan state (pending, running, done, failed, not_scanned); the leader only",
)
