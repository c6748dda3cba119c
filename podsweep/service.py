"""What every service's main() opens first: its NATS connection (stream declared) and, if it needs one, S3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from podsweep import bus as busmod
from podsweep import logs
from podsweep.config import Settings
from podsweep.objectstore import ObjectStore


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
async def open_service(name: str, settings: Settings, *, s3: bool = False) -> AsyncIterator[Service]:
    bus = await busmod.connect(settings.nats, name)
    try:
        await busmod.ensure_stream(bus)
        store = None
        if s3:
            store = ObjectStore(settings.s3)
            await store.ensure_bucket()
        logs.get(f"podsweep.{name}").info("service connected", nats=settings.nats.url, s3=bool(store))
        yield Service(name=name, settings=settings, bus=bus, store=store)
    finally:
        await bus.close()
