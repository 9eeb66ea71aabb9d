"""The access log: one line per HTTP request (written by the edge middleware, ``gateway.middleware.edge``).

Flow: the edge middleware binds the caller's ``X-Request-Id`` as ``client_request_id`` →
``gateway.request_id`` binds our own id of a POST with ``shared.logs.set_request_id`` (and the handler its
accepted form, once the broker confirmed) → every line logged
while handling the request (the edge's error lines too) carries both → after the response, one
``http request`` line with method, path, status, duration, both ids, the peer and the API key's *name*
(``gateway.middleware.auth`` sets it; never the key) → both ids are unbound.

The caller's id is logged, never used as ours (it need not be unique). No body and no query string is logged.
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.state import API_KEY_NAME
from shared.logs import client_request_id_var, log_event, request_id_var

log = logging.getLogger("gateway.access")

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's header is free text: keep the log line bounded.
CLIENT_REQUEST_ID_MAX = 128
# nginx's code for "the client closed the connection before the answer".
CLIENT_CLOSED_REQUEST = 499



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
    client_id = client_request_id_var.get() or client_request_id(request)
    if client_id is not None:
        extra["client_request_id"] = client_id
    log_event(log, "http request", extra)  # one per request: the hot-path writer


def client_request_id(request: web.Request) -> str | None:
    """The caller's own ``X-Request-Id`` (free text, logged, never used as ours), bounded."""
    value = request.headers.get(REQUEST_ID_HEADER)
    return value[:CLIENT_REQUEST_ID_MAX] if value else None
