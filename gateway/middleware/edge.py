"""The edge: the one middleware every request passes, doing in one frame what every request needs.

Flow of one request:
  count it in flight (SIGTERM waits for it, ``gateway.inflight``) → bind the caller's ``X-Request-Id`` for the
  log lines; give a POST our own id in its unaccepted form (``gateway.request_ids``; the handler turns it into
  its accepted form once the broker confirmed, ``gateway.request_id.accepted``) → the handler, through the
  public API's own middlewares (keys, limits, in-flight cap: ``gateway.app``) → anything raised becomes the spec's
  JSON answer (``gateway.errors.answer_error``: the only place errors become HTTP) → ``X-Request-Id`` on a POST's
  answer, ``Server: crm-gateway`` on every answer → count and time it by route template (``gateway.metrics``) →
  write it, inside the in-flight count → one access-log line (``gateway.access_log``) → unbind.

One frame instead of five nested middlewares (access log, in-flight, request id, metrics, errors): each layer
costs every request a coroutine frame and a call through aiohttp's middleware chain (issue 14's profile).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.access_log import CLIENT_CLOSED_REQUEST, REQUEST_ID_HEADER, access_log, client_request_id
from gateway.errors import answer_error
from gateway.inflight import IN_FLIGHT
from gateway.metrics import METRICS, route_of
from gateway.request_ids import new_unaccepted_request_id
from gateway.server import SERVER_NAME
from gateway.state import REQUEST_ID, TIMELINE
from shared.logs import client_request_id_var, request_id_var


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app  # installed on the main application only
    in_flight, metrics = app[IN_FLIGHT], app[METRICS]
    started = time.perf_counter()
    in_flight.enter()
    metrics.in_flight.inc()
    # Fresh bindings for this request; the handler's accepted id lands in this same context (handlers are
    # awaited, not spawned), so it is visible here afterwards and undone by the resets below.
    id_token = request_id_var.set(None)
    client_token = client_request_id_var.set(client_request_id(request))
    post = request.method == "POST"
    status = 500  # an exception that escapes becomes aiohttp's 500
    try:
        if post:
            request_id = new_unaccepted_request_id(app[TIMELINE].now_us() // 1000)
            request[REQUEST_ID] = request_id
            request_id_var.set(request_id)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect raised: aiohttp sends it
                status = exc.status
                raise
            response = answer_error(request, exc)
        except Exception as exc:
            response = answer_error(request, exc)
        if post:
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]  # the accepted form if it was accepted
        response.headers["Server"] = SERVER_NAME  # no versions (aiohttp's default names them)
        status = response.status
        # Written here, inside the in-flight count (aiohttp would otherwise write it after we return).
        await response.prepare(request)
        await response.write_eof()
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.in_flight.dec()
        metrics.observe_request(route_of(request), request.method, status, elapsed)
        access_log(request, status, elapsed, request_id_var.get())
        request_id_var.reset(id_token)
        client_request_id_var.reset(client_token)
        in_flight.leave()
