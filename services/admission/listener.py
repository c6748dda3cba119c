"""The gate's HTTPS listener: aiohttp serving one handler, with deadlines so a slow or silent client is let go.

Deadlines, each `read_timeout_s` unless said: the TLS handshake; a request's line and headers, counted from its first
byte (HeaderDeadline below); its body (the handler's own, answered 408). A connection that sends nothing at all is
closed by aiohttp's keep-alive timeout (KEEPALIVE_S). Never decides anything.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from podsweep import logs

# A connection without a complete request is closed this long after it opened or was last answered. Above the
# apiserver's 90 s idle timeout for its pooled connections: closing one just as it sends a review fails that review,
# which failurePolicy Ignore then admits unjudged.
KEEPALIVE_S = 120.0
# After an answer sent before the body was read (408, 413), read what still comes this long, then close (aiohttp's
# default keeps a silent client 10 s more).
LINGER_S = 1.0

log = logs.get("podsweep.admission")


class HeaderDeadline(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, and a clock for the request line and headers.

    A byte arriving while no request is being handled starts the clock; the handler starting (the middleware of
    `Listener`) stops it. A request whose headers are not complete in time closes the connection."""

    def __init__(self, inner: asyncio.Protocol, listener: Listener) -> None:
        self.inner = inner
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.handling = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport has a Transport's methods without deriving from it: no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections[id(transport)] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.handling and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.listener.read_timeout_s, self._expired)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        if self.transport is not None:
            self.listener.connections.pop(id(self.transport), None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def started(self) -> None:
        self.handling += 1
        self._stop_clock()

    def finished(self) -> None:
        self.handling -= 1

    def _stop_clock(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.handling or self.transport is None:
            return
        log.warning("admission connection closed: request headers incomplete", seconds=self.listener.read_timeout_s)
        self.transport.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Listener:
    """Serves `app` over TLS on host:port with the deadlines above until `close`."""

    def __init__(self, app: web.Application, read_timeout_s: float) -> None:
        self.read_timeout_s = read_timeout_s
        self.connections: dict[int, HeaderDeadline] = {}
        app.middlewares.append(self._mark)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            # The apiserver never compresses a review: a compressed body is a 400, not a decompression paid for.
            auto_decompress=False,
            keepalive_timeout=KEEPALIVE_S,
            lingering_time=LINGER_S,
        )
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int, context: ssl.SSLContext) -> None:
        await self.runner.setup()
        http = self.runner.server
        assert http is not None  # set by setup()
        self.server = await asyncio.get_running_loop().create_server(
            lambda: HeaderDeadline(http(), self),
            host,
            port,
            ssl=context,
            backlog=1024,
            ssl_handshake_timeout=self.read_timeout_s,  # aiohttp's TCPSite cannot set it
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.runner.cleanup()

    @web.middleware
    async def _mark(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = self.connections.get(id(request.transport)) if request.transport is not None else None
        if connection is None:
            return await handler(request)
        connection.started()
        try:
            return await handler(request)
        finally:
            connection.finished()
