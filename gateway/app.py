"""``create_app(settings)``: the one place that wires the gateway's middlewares, routes and resources.

Middlewares, outermost first:
  access log (one line per request, request ids bound)  ->  in-flight count (SIGTERM waits for it; writes the
  answer)  ->  request id (every POST's X-Request-Id, unaccepted until the broker confirms)  ->
  metrics (count and time, final status)  ->  API key (401)  ->  rate limit (429; RateLimit fields on every
  answer)  ->  errors (the only place errors become HTTP)  ->
  in-flight cap (503 past MAX_IN_FLIGHT)  ->  handler
Key and limit refusals are answered by their own middlewares through ``gateway.errors.error_response`` (the
same shape and headers): outside the error middleware, so the limiter sees, and stamps, every final answer,
and inside the metrics one, so 401s and 429s are counted and timed.
``Server: crm-gateway`` on every answer (``gateway.server.name_the_server``), no versions.
Resources, opened in this order at start-up and closed in reverse (cleanup contexts): the API keys (SIGHUP
handler, file watcher; a bad keys file fails start-up before anything opens), the database clock,
the read-only database pool (neither may fail start-up: Postgres can be away), the broker connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.access_log import access_log_middleware
from gateway.auth import AUTH, ApiKeys, api_keys_ctx, require_api_key
from gateway.backpressure import cap_in_flight
from gateway.customers import get_customer, post_customer
from gateway.docs import (
    DOCS,
    DOCS_ASSETS_ROUTE,
    docs_asset,
    docs_page,
    docs_with_slash,
    load_docs,
    openapi_json,
)
from gateway.errors import error_middleware
from gateway.health import healthz, readyz
from gateway.inflight import InFlight, track_in_flight
from gateway.metrics import GatewayMetrics, http_metrics, metrics_handler
from gateway.paths import EXTERNAL_API
from gateway.ratelimit import RATE_LIMITER, RateLimiter, rate_limit
from gateway.request_id import issue_request_id
from gateway.request_status import get_request_status
from gateway.rpc import RpcClient
from gateway.server import name_the_server
from gateway.state import IN_FLIGHT, METRICS, RPC, SETTINGS, STORE, TIMELINE
from gateway.store import ReadStore
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
    # Keys and limits only where configured: a middleware layer costs every request, even one that passes.
    keys_configured = bool(settings.api_keys.strip() or settings.api_keys_file.strip())
    access_control: list[Middleware] = [
        *([require_api_key] if keys_configured else []),
        *([rate_limit] if keys_configured or settings.rate_limit > 0 else []),  # per-key limits live in the keys
    ]
    app = web.Application(
        client_max_size=settings.body_limit,
        middlewares=[
            access_log_middleware, track_in_flight, issue_request_id, http_metrics, *access_control,
            error_middleware, cap_in_flight,
        ],
    )
    app.on_response_prepare.append(name_the_server)
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

    app.router.add_post(f"{EXTERNAL_API}/customers", post_customer)
    # [^/]+, not aiohttp's default [^{}/]+: a userId may hold braces (found by the round-trip property test).
    app.router.add_get(f"{EXTERNAL_API}/customers/{{userId:[^/]+}}", get_customer)
    app.router.add_get(f"{EXTERNAL_API}/requests/{{requestId}}", get_request_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/", docs_with_slash)
    app.router.add_get(DOCS_ASSETS_ROUTE, docs_asset)
    return app
