"""What every service's main() opens first: its NATS connection (stream declared) and, if it needs one, S3."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nats.js.errors
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.natsaccess import NatsAccess
from podsweep.objectstore import ObjectStore

LAG_POLL_S = 15.0
meter = metrics.get_meter("podsweep.service")
_lag: dict[str, tuple[int, int]] = {}  # service -> (pending, ack pending), from its consumer's info
_connections: dict[str, busmod.Bus] = {}  # service -> its open NATS connection


def _observe_pending(_: CallbackOptions) -> Iterable[Observation]:
    return [Observation(pending, {"service": name}) for name, (pending, _ack) in _lag.items()]


def _observe_ack_pending(_: CallbackOptions) -> Iterable[Observation]:
    return [Observation(ack, {"service": name}) for name, (_pending, ack) in _lag.items()]


meter.create_observable_gauge(
    "podsweep_consumer_pending", [_observe_pending], description="Events not yet delivered to the service's consumer"
)
meter.create_observable_gauge(
    "podsweep_consumer_ack_pending", [_observe_ack_pending], description="Events delivered and not yet acknowledged"
)


def _observe_connected(_: CallbackOptions) -> Iterable[Observation]:
    return [Observation(1 if bus.nc.is_connected else 0, {"service": name}) for name, bus in _connections.items()]


meter.create_observable_gauge(
    "podsweep_nats_connected",
    [_observe_connected],
    description="1 while the service's NATS connection is up, 0 while it is lost and reconnecting",
)


async def _follow_lag(bus: busmod.Bus, name: str, every_s: float = LAG_POLL_S) -> None:
    """Consumer lag for /metrics: one consumer-info request every `every_s` (a service without a consumer, such as
    the watcher, reports none)."""
    misses = 0
    while True:
        wait = every_s
        try:
            info = await bus.js.consumer_info(bus.settings.stream, name)
            _lag[name] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))
        except nats.js.errors.NotFoundError:  # not created yet (the service is starting) or none at all
            _lag.pop(name, None)
            misses += 1
            wait = min(every_s, 2.0) if misses < 30 else every_s
        except Exception as exc:  # lag is for dashboards: a failed reading waits for the next one
            logs.get("podsweep.service").debug("consumer lag unreadable", service=name, error=str(exc)[:200])
        await asyncio.sleep(wait)


@dataclass
class Service:
    name: str
    settings: Settings
    bus: busmod.Bus
    store: ObjectStore | None

    def require_store(self) -> ObjectStore:
        if self.store is None:
            raise RuntimeError(f"service {self.name} was opened without S3")
        return self.store


@asynccontextmanager
async def open_service(
    name: str, settings: Settings, *, s3: bool = False, access: NatsAccess | None = None
) -> AsyncIterator[Service]:
    """Connect (under the service's NATS declaration, `access`, which the Bus enforces) and declare the stream."""
    bus = await busmod.connect(settings.nats, name, access)
    _connections[name] = bus
    try:
        await busmod.ensure_stream(bus)
        store = None
        if s3:
            store = ObjectStore(settings.s3)
            await store.ensure_bucket()
        logs.get(f"podsweep.{name}").info("service connected", nats=settings.nats.url, s3=bool(store))
        _freeze_start_up()
        # Lag for /metrics, from the consumer named after the service (a service without one reports none).
        follows_lag = access is None or access.durable(name) is not None
        lag = asyncio.create_task(_follow_lag(bus, name) if follows_lag else asyncio.sleep(0))
        try:
            yield Service(name=name, settings=settings, bus=bus, store=store)
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            _lag.pop(name, None)
    finally:
        _connections.pop(name, None)
        stats = bus.nc.stats
        logs.get(f"podsweep.{name}").info(
            "service disconnecting",
            nats_in_msgs=stats["in_msgs"],
            nats_out_msgs=stats["out_msgs"],
            nats_in_bytes=stats["in_bytes"],
            nats_out_bytes=stats["out_bytes"],
        )
        await bus.close()


def _freeze_start_up() -> None:
    """Take what start-up made (modules, API models, the S3 client's service model: over 100,000 objects) out of
    the garbage collector's sight. They live as long as the process, yet every full collection walked them all
    again (a full collection walks every one of them); frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()
