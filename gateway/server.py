"""The HTTP server under the app: aiohttp's, with limits against slow and hostile clients.

* Request line and each header at most MAX_HEADER_SIZE bytes, at most MAX_HEADERS headers: aiohttp's parser
  refuses more before any middleware runs, so ``handle_error`` gives those answers the spec's JSON shape.
* Idle keep-alive connections are closed after KEEPALIVE_TIMEOUT seconds (aiohttp's default is an hour).
* CLIENT_TIMEOUT: a client has that long to send a whole request. aiohttp has no deadline for receiving a
  request's head, so a client trickling its headers one byte at a time (slowloris) would hold its connection
  for as long as it likes. ``_DeadlineRequestHandler`` starts a timer at the first byte of each request and
  closes the connection if the head is not complete when it fires; the body is read under the same deadline
  by the handler (``gateway.api.customers.read_json_body``: 408).
* Every answer says ``Server: crm-gateway`` (``SERVER_NAME``), never aiohttp's default naming the Python and
  aiohttp versions: ``name_the_server`` (the app's ``on_response_prepare``) for the app's answers,
  ``handle_error`` for the parser's refusals.

This reaches into two private attributes of aiohttp's ``RequestHandler`` (``_messages``: parsed heads waiting
for the handler task; ``_current_request``: the request being handled), stable since aiohttp 3.8;
tests/test_slow_clients.py trickles real connections, so a change there shows up as a failing test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from shared.settings import Settings

SERVER_NAME: Final = "crm-gateway"


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs before aiohttp would default the header to its versions."""
    response.headers["Server"] = SERVER_NAME


class _DeadlineRequestHandler(RequestHandler):
    __slots__ = ("_client_timeout", "_head_deadline", "request_started")

    def __init__(self, manager: web.Server, *, client_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._client_timeout = client_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        # Monotonic time of the first byte of the request being received (the body's deadline counts from it).
        self.request_started = time.monotonic()

    def data_received(self, data: bytes) -> None:
        starting = self._head_deadline is None and self._current_request is None and not self._messages
        if starting:
            self.request_started = time.monotonic()
            self._head_deadline = asyncio.get_running_loop().call_later(self._client_timeout, self._cut_off)
        super().data_received(data)
        if self._messages and self._head_deadline is not None:  # the head is complete
            self._head_deadline.cancel()
            self._head_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Requests aiohttp's parser refuses (a header too long, too many headers, a malformed request line)
        never reach the app's edge middleware: answer them in the spec's error shape too, not plain text."""
        response = super().handle_error(request, status, exc, message)  # logs it, refuses if already sent
        if status >= 500:
            error, summary = "服务器内部错误", "服务器处理失败"
        else:
            error, summary = "请求格式错误（请求行或请求头不合法、过长或过多）", "请求无效"
        body = orjson.dumps({"success": False, "error": error, "message": summary})
        answer = web.Response(body=body, status=response.status, content_type="application/json",
                              headers={"Server": SERVER_NAME})
        answer.force_close()
        return answer

    def stop_lingering(self) -> None:
        """Close right after the response instead of reading what is left of an unread body (aiohttp waits up
        to ``lingering_time`` for it to finish, which a slow body never does)."""
        self._lingering_time = 0.0

    def _cut_off(self) -> None:
        self._head_deadline = None
        if self.transport is not None:
            self.transport.close()


class _GuardedServer(web.Server):
    def __init__(self, *args: Any, client_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_timeout = client_timeout

    def __call__(self) -> RequestHandler:
        return _DeadlineRequestHandler(self, loop=self._loop, client_timeout=self._client_timeout, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server applies the limits above."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            app,
            keepalive_timeout=settings.keepalive_timeout,
            max_line_size=settings.max_header_size,
            max_field_size=settings.max_header_size,
            max_headers=settings.max_headers,
            **kwargs,
        )
        self._client_timeout = settings.client_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's start-up; a plain Server with our kwargs
        return _GuardedServer(
            server.request_handler, request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation, loop=server._loop,
            client_timeout=self._client_timeout, **server._kwargs,
        )


def request_started(request: web.BaseRequest) -> float:
    """Monotonic time the request's first byte arrived (now, if the server is not ours)."""
    protocol = request.protocol
    return protocol.request_started if isinstance(protocol, _DeadlineRequestHandler) else time.monotonic()


def stop_lingering(request: web.BaseRequest) -> None:
    """After this request's answer, close the connection at once (see ``_DeadlineRequestHandler``)."""
    if isinstance(request.protocol, _DeadlineRequestHandler):
        request.protocol.stop_lingering()
