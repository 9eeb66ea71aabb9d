"""The access log: one line per HTTP request, and the middleware that scopes the request ids to it.

Flow: ``access_log_middleware`` (outermost) binds the caller's ``X-Request-Id`` as ``client_request_id`` →
``gateway.request_id`` binds our own id of a POST with ``shared.logs.set_request_id`` (and the handler its
accepted form, once the broker confirmed) → every line logged
while handling the request (the error middleware's too) carries both → after the response, one
``http request`` line with method, path, status, duration, both ids, the peer and the API key's *name*
(``gateway.auth`` sets it; never the key) → both ids are unbound.

The caller's id is logged, never used as ours (it need not be unique). No body and no query string is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.state import API_KEY_NAME
from shared.logs import client_request_id_var, log_event, request_id_var

log = logging.getLogger("gateway.access")

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's header is free text: keep the log line bounded.
CLIENT_REQUEST_ID_MAX = 128
# nginx's code for "the client closed the connection before the answer".
CLIENT_CLOSED_REQUEST = 499

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def access_log(request: web.Request, status: int, duration_s: float, request_id: str | None = None) -> None:
    """Log the ``http request`` line for ``request``; ``request_id`` defaults to the one bound in the context."""
    extra: dict[str, object] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(duration_s * 1000, 3),
        "remote": request.remote,
        "api_key": request.get(API_KEY_NAME),  # the configured name; absent (None) when keys are off
    }
    request_id = request_id or request_id_var.get()
    if request_id is not None:
        extra["request_id"] = request_id
    client_request_id = client_request_id_var.get() or _client_request_id(request)
    if client_request_id is not None:
        extra["client_request_id"] = client_request_id
    log_event(log, "http request", extra)  # one per request: the hot-path writer


def _client_request_id(request: web.Request) -> str | None:
    value = request.headers.get(REQUEST_ID_HEADER)
    return value[:CLIENT_REQUEST_ID_MAX] if value else None


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: bind the request's ids for its log lines, then write its access-log line."""
    started = time.perf_counter()
    # Fresh bindings for this request; the handler's set_request_id lands in this same context (handlers are
    # awaited, not spawned), so it is visible here afterwards and undone by the resets below.
    token = request_id_var.set(None)
    client_token = client_request_id_var.set(_client_request_id(request))
    status = 500  # an exception that escapes every middleware becomes aiohttp's 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        header_id = response.headers.get(REQUEST_ID_HEADER) if response is not None else None
        access_log(request, status, time.perf_counter() - started, request_id=request_id_var.get() or header_id)
        request_id_var.reset(token)
        client_request_id_var.reset(client_token)
