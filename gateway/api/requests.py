"""The requests resource: ``GET /api/external/requests/{requestId}`` — what became of an accepted request.

A bot that got a 202 polls this with the ``requestId`` of the 202 body: ``pending`` until a worker applied it,
then ``created`` / ``updated`` / ``superseded`` / ``phone_taken`` (with the customer ``id``), or ``failed``
(dead-lettered, with the reason) — and after a successful replay, the replay's outcome.

404 for an id that is not ours, is past PROCESSED_RETENTION_HOURS, or was handed out with a refusal (400, 401,
413, 429, 503...: its unaccepted form, ``gateway.request_ids.was_refused``; such a request was never accepted
and never will be applied) — told apart from the id alone, without asking the database.
"""

from __future__ import annotations

from aiohttp import web

from gateway import responses
from gateway.request_ids import was_refused
from gateway.state import TIMELINE
from gateway.store import STORE
from shared.errors import RequestNotFound

REFUSED = "请求未被受理（提交时已被拒绝），不会被处理"


async def get_request_status(request: web.Request) -> web.Response:
    request_id = request.match_info["requestId"]
    if was_refused(request_id):
        raise RequestNotFound(f"{REFUSED}：{request_id}")
    now_ms = request.config_dict[TIMELINE].now_us() // 1000
    status = await request.config_dict[STORE].request_status(request_id, now_ms)
    if status is None:
        raise RequestNotFound(f"请求不存在或已超过保留期：{request_id}")
    return responses.request_status(status.body())
