"""Errors become HTTP here and nowhere else (``answer_error``, called by the edge middleware).

Every error body has the spec's shape ``{"success": false, "error": ..., "message": ...}``; nothing the
client sends can produce a stack trace or a 500 (a 500 means the worker gave up or we have a bug). What
aiohttp's own exception would have said in a header is kept: a 405 lists the route's methods in ``Allow``
(RFC 9110 section 15.5.6). The ``X-Request-Id`` of a POST's answer is set by ``gateway.request_id``.
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.responses import json_response
from gateway.state import REQUEST_ID, SETTINGS
from shared.errors import (
    BodyTooLarge,
    ClientError,
    MethodNotAllowed,
    NotFound,
    ProcessingFailed,
    RequestInvalid,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)

log = logging.getLogger("gateway.errors")

def _from_http_exception(exc: web.HTTPException) -> ClientError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return BodyTooLarge("请求体过大")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("接口不存在")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"不支持{exc.method}方法")
    error = RequestInvalid(exc.reason or "请求无效")
    error.status = exc.status
    return error


def error_response(error: ClientError, retry_after: int, request_id: str | None = None) -> web.Response:
    body = error.body()
    if request_id is not None and isinstance(error, ProcessingFailed):
        body["requestId"] = request_id  # a dead-lettered request: the id to find it with `replay list`
    response = json_response(body, status=error.status)
    if isinstance(error, ServiceUnavailable):
        response.headers["Retry-After"] = str(retry_after)
    elif isinstance(error, TooManyRequests):
        response.headers["Retry-After"] = str(error.retry_after)  # whole seconds until the next token
    elif isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"' if error.invalid_key else "Bearer"
    elif isinstance(error, RequestTimeout):
        response.force_close()  # the rest of a body that came too slowly is not worth waiting for
    return response


def answer_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The answer to an exception raised while handling ``request``: the spec's JSON error shape, or a 500.

    Called by the edge middleware (``gateway.middleware.edge``) for everything a handler or an inner middleware
    raises, and by the rate limiter (whose RateLimit fields go on error answers too). An ``HTTPException``
    below 400 (a redirect) is not an error: it is re-raised for aiohttp to send.
    """
    retry_after = request.config_dict[SETTINGS].retry_after_seconds
    if isinstance(exc, ClientError):
        return error_response(exc, retry_after, request.get(REQUEST_ID))
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        response = error_response(_from_http_exception(exc), retry_after)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = exc.headers["Allow"]  # aiohttp's: the route's methods, sorted
        return response
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return json_response({"success": False, "error": "服务器内部错误", "message": "服务器处理失败"}, status=500)
