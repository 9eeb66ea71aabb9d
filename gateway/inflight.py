"""Requests in flight, so that SIGTERM can wait for every answer to be written before closing anything (counted by
the edge middleware, ``gateway.middleware.edge``)."""

from __future__ import annotations

import asyncio

from aiohttp import web


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


IN_FLIGHT = web.AppKey("in_flight", InFlight)
