"""``cap_in_flight``: past MAX_IN_FLIGHT requests being handled at once, answer 503 at once.

Every accepted request holds memory and a future until its outcome or RPC_TIMEOUT; a flood would otherwise
grow the gateway without bound. Only the public API (``gateway.paths.EXTERNAL_ROUTES``) is capped: health,
metrics and docs are never refused (they are how operators see the flood). Sits inside the error middleware,
so the 503 has the spec's shape and a Retry-After.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.paths import EXTERNAL_ROUTES
from gateway.state import IN_FLIGHT, SETTINGS
from shared.errors import ServiceUnavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TOO_BUSY = "网关繁忙（处理中的请求已达上限），请求未被受理，请稍后重试"


@web.middleware
async def cap_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The count includes this request (track_in_flight, outermost, entered it).
    if request.path.startswith(EXTERNAL_ROUTES) and request.app[IN_FLIGHT].count > request.app[SETTINGS].max_in_flight:
        raise ServiceUnavailable(TOO_BUSY)
    return await handler(request)
