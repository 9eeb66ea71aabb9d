"""The requests resource: ``GET /api/external/requests/{requestId}`` — what became of an accepted request.

A bot that got a 202 polls this with the ``requestId`` of the 202 body: ``pending`` until a worker applied it,
then ``created`` / ``updated`` / ``superseded`` / ``phone_taken`` (with the customer ``id``), or ``failed``
(dead-lettered, with the reason) — and after a successful replay, the replay's outcome.
"""

from __future__ import annotations

from aiohttp import web

from gateway import responses
from gateway.state import STORE, TIMELINE
from shared.errors import RequestNotFound


async def get_request_status(request: web.Request) -> web.Response:
    request_id = request.match_info["requestId"]
    now_ms = request.app[TIMELINE].now_us() // 1000
    status = await request.app[STORE].request_status(request_id, now_ms)
    if status is None:
        raise RequestNotFound(f"请求不存在或已超过保留期：{request_id}")
    return responses.json_response({"success": True, "data": status.body()})
