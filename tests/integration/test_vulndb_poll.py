"""The dispatcher's DB watch against a real HTTP server and real NATS: Trivy's /version answers are recorded and a
newer DB is announced once; hostile bodies, error statuses and a server that is down change nothing and never stop
the poll loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import structlog
from aiohttp import web

from podsweep import bus as busmod
from podsweep.config import NatsSettings
from podsweep.embedded import free_port
from schemas import subjects
from schemas.events import DbUpdated
from schemas.state import LIMITS_BUCKET, VULNDB_KEY, VulnDbSeen
from services.dispatcher.dbpoll import DbPoller
from tests.harness.kwok import wait_until


def _answer(updated_at: str) -> bytes:
    return (
        b'{"Version":"0.76.0","VulnerabilityDB":{"Version":2,"NextUpdate":"2126-12-05T09:52:10Z","UpdatedAt":"'
        + updated_at.encode()
        + b'","DownloadedAt":"0001-01-01T00:00:00Z"}}'
    )


V1, V2, V3 = "2026-12-05T09:52:10.399468529Z", "2026-12-05T15:52:10Z", "2026-12-05T21:52:10Z"


class FakeTrivy:
    """A loopback HTTP server answering /version with whatever the test sets."""

    def __init__(self) -> None:
        self.status, self.body = 200, _answer(V1)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0

    async def version(self, _: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(status=self.status, body=self.body, content_type="application/json")


@pytest.fixture
async def fake_trivy() -> AsyncIterator[FakeTrivy]:
    fake = FakeTrivy()
    app = web.Application()
    app.router.add_get("/version", fake.version)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fake.port).start()
    yield fake
    await runner.cleanup()


async def test_the_db_is_recorded_a_newer_one_announced_once_and_bad_answers_change_nothing(
    nats_settings: NatsSettings, fake_trivy: FakeTrivy
) -> None:
    bus = await busmod.connect(nats_settings, "test")
    await busmod.ensure_stream(bus)
    announced: list[DbUpdated] = []

    async def on_updated(msg: Any) -> None:
        announced.append(msgspec.json.decode(msg.data, type=DbUpdated))

    sub = await bus.nc.subscribe(bus.subject(subjects.DB_UPDATED), cb=on_updated)
    kv = await bus.kv(LIMITS_BUCKET)
    poller = DbPoller(bus=bus, kv=kv, server=fake_trivy.url, cluster="c", interval_s=0.1)

    async def recorded() -> VulnDbSeen | None:
        return (await busmod.kv_read(kv, VULNDB_KEY, VulnDbSeen))[0]

    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for hostile in (b"<html>", b'{"VulnerabilityDB":{"Version":2,"UpdatedAt":"9999-01-01T00:00:00Z"}}'):
                fake_trivy.body = hostile
                assert await poller.poll_once(client) is None
            assert await recorded() is None, "an unreadable answer records nothing"

            fake_trivy.body = _answer(V1)
            assert await poller.poll_once(client) == "first"
            first = await recorded()
            assert first is not None and first.updated_at.isoformat().startswith("2026-12-05T09:52:10.39946")
            assert await poller.poll_once(client) == "same"

            fake_trivy.body = _answer(V2)
            assert await poller.poll_once(client) == "newer"
            fake_trivy.body = _answer(V1)
            assert await poller.poll_once(client) == "older", "a server behind the newest seen"
            newest = await recorded()
            assert newest is not None and newest.updated_at.isoformat() == "2026-12-05T15:52:10+00:00"

            fake_trivy.status = 503
            with pytest.raises(httpx.HTTPStatusError):
                await poller.poll_once(client)

        # The loop outlives a 503, a server that is down and nonsense, and announces the next DB.
        stop = asyncio.Event()
        loop = asyncio.create_task(poller.run(stop))
        await wait_until(lambda: _past(fake_trivy, 3), 10, "polls answered 503")
        fake_trivy.status, fake_trivy.body = 200, b"\x00" * 100
        await wait_until(lambda: _past(fake_trivy, 6), 10, "polls answered with nonsense")
        fake_trivy.body = _answer(V3)

        async def third() -> DbUpdated | None:
            return next((u for u in announced if u.updated_at.isoformat() == "2026-12-05T21:52:10+00:00"), None)

        update = await wait_until(third, 10, "db.updated for the third DB")
        assert not loop.done()
        stop.set()
        await loop
    finally:
        await sub.unsubscribe()
        await bus.close()
    assert [u.updated_at.isoformat() for u in announced] == ["2026-12-05T15:52:10+00:00", "2026-12-05T21:52:10+00:00"]
    assert update.previous_updated_at is not None and update.previous_updated_at.isoformat().startswith("2026-12-05T15")


async def test_a_server_that_is_down_is_a_connect_error_the_loop_catches(nats_settings: NatsSettings) -> None:
    bus = await busmod.connect(nats_settings, "test")
    try:
        poller = DbPoller(
            bus=bus,
            kv=await bus.kv(LIMITS_BUCKET),
            server=f"http://127.0.0.1:{free_port()}",
            cluster="c",
            interval_s=0.05,
        )
        async with httpx.AsyncClient(timeout=2) as client:
            with pytest.raises(httpx.ConnectError):
                await poller.poll_once(client)
    finally:
        await bus.close()


async def _past(fake: FakeTrivy, requests: int) -> bool | None:
    return True if fake.requests >= requests else None


async def test_a_failure_that_repeats_is_warned_about_once_and_the_first_answer_after_it_is_said(
    nats_settings: NatsSettings, fake_trivy: FakeTrivy
) -> None:
    fake_trivy.status = 503
    bus = await busmod.connect(nats_settings, "test")
    stop = asyncio.Event()
    try:
        poller = DbPoller(bus=bus, kv=await bus.kv(LIMITS_BUCKET), server=fake_trivy.url, cluster="c", interval_s=0.05)
        with structlog.testing.capture_logs() as logged:
            task = asyncio.create_task(poller.run(stop))
            await wait_until(lambda: _past(fake_trivy, 5), 30, "five failed polls")
            fake_trivy.status, fake_trivy.body = 200, b"not json"  # another failure: warned about at once
            requests = fake_trivy.requests
            await wait_until(lambda: _past(fake_trivy, requests + 3), 30, "three unreadable answers")
            fake_trivy.body = _answer(V1)
            await wait_until(
                lambda: _async(any(e["event"] == "vulnerability DB version read again" for e in logged)),
                30,
                "a good answer",
            )
            stop.set()
            await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await bus.close()
    failures = [e for e in logged if e["event"] == "vulnerability DB version not read, will poll again"]
    warned = [e["error"] for e in failures if e["log_level"] == "warning"]
    assert len(failures) >= 8 and len(warned) == 2, warned
    assert warned[0].startswith("HTTPStatusError: HTTP 503") and warned[1].startswith("unreadable answer:")
    [back] = [e for e in logged if e["event"] == "vulnerability DB version read again"]
    assert back["failed_polls"] == len(failures)


async def _async(value: bool) -> bool | None:
    return True if value else None
