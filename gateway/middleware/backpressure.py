"""``cap_in_flight``: past MAX_IN_FLIGHT requests being handled at once, answer 503 at once.

Every accepted request holds memory and a future until its outcome or RPC_TIMEOUT; a flood would otherwise
grow the gateway without bound. Only the public API is capped (``gateway.app`` installs this middleware there):
health, metrics and docs are never refused (they are how operators see the flood). The 503 is raised, and
answered by the edge in the spec's shape with a Retry-After.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.inflight import IN_FLIGHT
from gateway.state import SETTINGS
from shared.errors import ServiceUnavailable

TOO_BUSY = "网关繁忙（处理中的请求已达上限），请求未被受理，请稍后重试"


@web.middleware
async def cap_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The count includes this request (the edge, outermost, entered it).
    config = request.config_dict
    if config[IN_FLIGHT].count > config[SETTINGS].max_in_flight:
        raise ServiceUnavailable(TOO_BUSY)
    return await handler(request)
