"""``create_app(settings, keys, secret)``: the console's one factory — connections, templates, routes, middlewares.

    cleanup_ctx     PostgreSQL pool (the replay role) and one AMQP channel (the replay user, publisher confirms,
                    topology checked against the broker's), opened and checked at start, closed at the end;
                    the ``Desk`` over them
    middlewares     security headers, then ``access.access_middleware`` (cross-site refusal, session or key,
                    CSRF, the route's role), then ``unavailable`` (an outage mid-request: 503, said in one line)
    routes          the pages (``console.pages``) at ``/``, the JSON API (``console.api``) as the sub-application
                    ``/api`` (its refusals are JSON)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

import aio_pika
import aiohttp_jinja2
import asyncpg
import jinja2
from aiohttp import web

from console import api, pages
from console.access import REFUSE, SESSIONS, Handler, Sessions, access_middleware, refusal_for
from console.desk import DESK, Desk
from console.keys import ConsoleKeys
from shared.brokers import connect_robust
from shared.cli import starting
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.topology import Topology
from worker.repository import init_connection

log = logging.getLogger("console")

POOL_SIZE: Final = 4

# Nothing from elsewhere, no inline script (htmx is told not to evaluate any), no framing.
CONTENT_SECURITY_POLICY: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                  "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# What an outage raises mid-request: the console stays up and says so (the pool and the robust AMQP connection
# reconnect by themselves).
_UNAVAILABLE: Final = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                       asyncpg.CannotConnectNowError, aio_pika.exceptions.AMQPError)


@web.middleware
async def unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _UNAVAILABLE as exc:
        log.warning("%s %s: %s: %s", request.method, request.path, exc.__class__.__name__, exc)
        return refusal_for(request)(request, 503, "PostgreSQL or RabbitMQ cannot be reached right now: nothing was "
                                    "changed; try again in a moment")


def create_app(settings: Settings, keys: ConsoleKeys, secret: str) -> web.Application:
    app = web.Application(middlewares=[security_headers, access_middleware, unavailable])
    app[SESSIONS] = Sessions(secret, secure=settings.console_secure_cookie, keys=keys)
    app[REFUSE] = pages.refuse
    aiohttp_jinja2.setup(
        app, loader=jinja2.PackageLoader("console", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.cleanup_ctx.append(_connections(settings))
    pages.add_routes(app)
    app.add_subapp("/api", api.create_api())
    return app


def _connections(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def connections(app: web.Application) -> AsyncIterator[None]:
        with starting("PostgreSQL", settings.database_url):
            pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=POOL_SIZE,
                                             init=init_connection, timeout=CONNECT_TIMEOUT)
            # The tables the console reads, checked now rather than on the first page.
            await pool.fetchval("SELECT count(*) FROM dead_letters WHERE false")
        try:
            with starting("RabbitMQ", settings.amqp_url):
                connection = await connect_robust(settings.amqp_url, name="console",
                                                  attempt_timeout=CONNECT_TIMEOUT)
            try:
                with starting("RabbitMQ", settings.amqp_url):
                    # on_return_raises: an unroutable replay is an error, and its dead letter stays.
                    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    await Topology.from_settings(settings).check_against_broker(channel)
                app[DESK] = Desk(settings, pool, connection, channel)  # the API reads it too (request.config_dict)
                yield
            finally:
                await connection.close()
        finally:
            await pool.close()

    return connections
