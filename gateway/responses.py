"""JSON responses in the spec's shapes (orjson-encoded)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

CREATED_MESSAGE = "新客户创建成功"
UPDATED_MESSAGE = "客户信息已更新"
ACCEPTED_MESSAGE = "请求已受理，正在处理"


def json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def created(customer_id: int, user_id: str) -> web.Response:
    data = {"id": customer_id, "userId": user_id, "action": "created"}
    return json_response({"success": True, "data": data, "message": CREATED_MESSAGE}, status=201)


def updated(customer_id: int, user_id: str) -> web.Response:
    data = {"id": customer_id, "userId": user_id, "action": "updated"}
    return json_response({"success": True, "data": data, "message": UPDATED_MESSAGE}, status=200)


def accepted(user_id: str, request_id: str) -> web.Response:
    data = {"userId": user_id, "requestId": request_id}
    return json_response({"success": True, "data": data, "message": ACCEPTED_MESSAGE}, status=202)
