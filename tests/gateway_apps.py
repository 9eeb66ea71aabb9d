"""Small aiohttp applications behind the gateway's real edge middleware, for unit tests of what it wires.

``edge_app()`` holds what the edge reads (settings, in-flight count, metrics, timeline; the timeline is never
synchronised: it reads the local wall clock) so a test adds only its own routes.
"""

from __future__ import annotations

from aiohttp import web

from gateway.inflight import IN_FLIGHT, InFlight
from gateway.metrics import METRICS, GatewayMetrics
from gateway.middleware.edge import edge
from gateway.state import SETTINGS, TIMELINE
from shared.clock.timeline import Timeline
from shared.settings import Settings


def edge_app(*, settings: Settings | None = None, metrics: GatewayMetrics | None = None) -> web.Application:
    app = web.Application(middlewares=[edge])
    app[SETTINGS] = settings or Settings()
    app[IN_FLIGHT] = InFlight()
    app[METRICS] = metrics or GatewayMetrics()
    app[TIMELINE] = Timeline("postgresql://unused")
    return app
