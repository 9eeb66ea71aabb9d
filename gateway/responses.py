"""JSON responses in the spec's shapes (orjson-encoded)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

CREATED_MESSAGE = "新客户创建成功"
UPDATED_MESSAGE = "客户信息已更新"
SUPERSEDED_MESSAGE = "客户信息未修改：所提交字段已被更新的请求覆盖"
ACCEPTED_MESSAGE = "请求已受理，正在处理"


def json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    # orjson writes datetimes as RFC 3339 (ISO 8601) with their offset.
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def created(customer_id: int, user_id: str) -> web.Response:
    data = {"id": customer_id, "userId": user_id, "action": "created"}
    return json_response({"success": True, "data": data, "message": CREATED_MESSAGE}, status=201)


def updated(customer_id: int, user_id: str, superseded: list[str] | None = None) -> web.Response:
    """200 "updated"; ``supersededFields`` lists provided fields that a newer write had already set."""
    data: dict[str, Any] = {"id": customer_id, "userId": user_id, "action": "updated"}
    if superseded:
        data["supersededFields"] = superseded
    return json_response({"success": True, "data": data, "message": UPDATED_MESSAGE}, status=200)


def superseded(customer_id: int, user_id: str, fields: list[str]) -> web.Response:
    """200 with action "superseded": the customer exists, but every field the request provided had already
    been written by a newer request (a stale or concurrent write), so nothing changed."""
    data = {"id": customer_id, "userId": user_id, "action": "superseded", "supersededFields": fields}
    return json_response({"success": True, "data": data, "message": SUPERSEDED_MESSAGE}, status=200)


def accepted(user_id: str, request_id: str) -> web.Response:
    data = {"userId": user_id, "requestId": request_id}
    return json_response({"success": True, "data": data, "message": ACCEPTED_MESSAGE}, status=202)
