"""``create_app(settings)``: the one place that wires the gateway's middlewares, routes and resources.

Every request passes one middleware, the edge (``gateway.middleware.edge``: in-flight count, request ids,
errors -> HTTP, metrics, ``Server``, writing the answer, the access log). The public API is an application of
its own mounted at ``/api/external`` (``gateway.paths``), carrying its own middlewares, outermost first:
  API key (401; only with keys configured) -> rate limit (429, RateLimit fields on every answer; only with a
  limit configured) -> in-flight cap (503 past MAX_IN_FLIGHT) -> handler (``gateway.api``)
so no middleware tests a path. ``/docs`` and ``/metrics`` are wrapped in the key check when PROTECT_DOCS /
PROTECT_METRICS say so; ``/healthz`` and ``/readyz`` never are.
Resources, opened in this order at start-up and closed in reverse (cleanup contexts): the API keys (SIGHUP
handler, file watcher; a bad keys file fails start-up before anything opens), the database clock,
the read-only database pool (neither may fail start-up: Postgres can be away), the broker connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.api.customers import get_customer, post_customer
from gateway.api.requests import get_request_status
from gateway.docs import (
    DOCS,
    DOCS_ASSETS_ROUTE,
    docs_asset,
    docs_page,
    docs_with_slash,
    load_docs,
    openapi_json,
)
from gateway.health import healthz, readyz
from gateway.inflight import IN_FLIGHT, InFlight
from gateway.metrics import METRICS, GatewayMetrics, metrics_handler
from gateway.middleware.auth import AUTH, ApiKeys, api_keys_ctx, protected, require_api_key
from gateway.middleware.backpressure import cap_in_flight
from gateway.middleware.edge import edge
from gateway.middleware.ratelimit import RATE_LIMITER, RateLimiter, rate_limit
from gateway.paths import EXTERNAL_API
from gateway.rpc import RPC, RpcClient
from gateway.state import SETTINGS, TIMELINE
from gateway.store import STORE, ReadStore
from shared.clock.timeline import Timeline
from shared.settings import Settings


async def _timeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """Stamp on the database clock: measure its offset now if Postgres answers, and keep measuring.

    Never fails start-up: with Postgres away the gateway still accepts (and stamps with its wall clock until
    the first sample, see shared/clock/timeline.py).
    """
    timeline = Timeline.from_settings(app[SETTINGS])
    await timeline.start()
    app[TIMELINE] = timeline
    app[METRICS].clock.follow_timeline(timeline)
    yield
    await timeline.stop()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = ReadStore(settings.database_url, settings.gateway_db_pool_size, settings.processed_retention_hours)
    await store.start()
    app[STORE] = store
    yield
    await store.stop()


async def _rpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the broker connection (fails start-up if unreachable), close it on shutdown."""
    rpc = RpcClient(app[SETTINGS], app[METRICS])
    await rpc.start()
    app[RPC] = rpc
    app[METRICS].set_ready(True)
    yield
    await rpc.stop()


def create_app(settings: Settings) -> web.Application:
    keys_configured = bool(settings.api_keys.strip() or settings.api_keys_file.strip())
    app = web.Application(client_max_size=settings.body_limit, middlewares=[edge])
    app[SETTINGS] = settings
    app[IN_FLIGHT] = InFlight()
    app[METRICS] = GatewayMetrics()
    app[DOCS] = load_docs(settings)  # the OpenAPI document and the docs page, built once
    app[AUTH] = ApiKeys(settings)
    app[AUTH].load()  # StartupError (one line) for a keys file that cannot be read or parsed
    app[RATE_LIMITER] = RateLimiter(settings)
    app.cleanup_ctx.append(api_keys_ctx)
    app.cleanup_ctx.append(_timeline_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_rpc_ctx)
    app.add_subapp(EXTERNAL_API, _public_api(settings, keys_configured))

    docs_guard = protected if keys_configured and settings.protect_docs else _open
    metrics_guard = protected if keys_configured and settings.protect_metrics else _open
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_guard(metrics_handler))
    app.router.add_get("/openapi.json", docs_guard(openapi_json))
    app.router.add_get("/docs", docs_guard(docs_page))
    app.router.add_get("/docs/", docs_guard(docs_with_slash))
    app.router.add_get(DOCS_ASSETS_ROUTE, docs_guard(docs_asset))
    return app


def _public_api(settings: Settings, keys_configured: bool) -> web.Application:
    """The public API, mounted at ``/api/external``, with its own middlewares: API keys (401), rate limits (429)
    and the in-flight cap (503). Keys and limits only where configured: an idle layer still costs every request."""
    middlewares: list[Middleware] = [
        *([require_api_key] if keys_configured else []),
        *([rate_limit] if keys_configured or settings.rate_limit > 0 else []),  # per-key limits live in the keys
        cap_in_flight,
    ]
    api = web.Application(client_max_size=settings.body_limit, middlewares=middlewares)
    api.router.add_post("/customers", post_customer)
    # [^/]+, not aiohttp's default [^{}/]+: a userId may hold braces (found by the round-trip property test).
    api.router.add_get("/customers/{userId:[^/]+}", get_customer)
    api.router.add_get("/requests/{requestId}", get_request_status)
    return api


def _open(handler: Handler) -> Handler:
    return handler
