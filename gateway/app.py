"""``create_app(settings)``: the aiohttp application and the lifecycle of its broker connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.errors import error_middleware
from gateway.handlers import health, post_customer
from gateway.inflight import InFlight, track_in_flight
from gateway.keys import CLOCK, IN_FLIGHT, RPC, SETTINGS
from gateway.rpc import RpcClient
from shared.settings import Settings
from shared.stamps import HybridClock


async def _rpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the broker connection (fails start-up if unreachable), close it on shutdown."""
    rpc = RpcClient(app[SETTINGS])
    await rpc.start()
    app[RPC] = rpc
    yield
    await rpc.stop()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.body_limit, middlewares=[track_in_flight, error_middleware])
    app[SETTINGS] = settings
    app[IN_FLIGHT] = InFlight()
    app[CLOCK] = HybridClock()
    app.cleanup_ctx.append(_rpc_ctx)
    app.router.add_post("/api/external/customers", post_customer)
    app.router.add_get("/healthz", health)
    return app
