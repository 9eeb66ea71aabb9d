"""Requests in flight, so that SIGTERM can wait for every answer to be written before closing anything."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, deadline: float) -> bool:
        """True once no request is in flight; False if ``deadline`` seconds passed first."""
        try:
            async with asyncio.timeout(deadline):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


@web.middleware
async def track_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: a request counts until its response is fully written."""
    from gateway.state import IN_FLIGHT  # keys imports this module

    in_flight = request.app[IN_FLIGHT]
    in_flight.enter()
    try:
        response = await handler(request)
        # Write it here, inside the count (aiohttp would otherwise write it after we return).
        await response.prepare(request)
        await response.write_eof()
        return response
    finally:
        in_flight.leave()
