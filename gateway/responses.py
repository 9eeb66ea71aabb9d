"""The gateway's answers: their shapes as typed dicts, and the JSON responses carrying them (orjson-encoded).

Each answer type is what its handler builds (mypy checks every key and value) and what ``gateway/openapi.py``
documents: pydantic generates its JSON Schema (``TypeAdapter``), so a field, constant message or description
is written here once. TypedDicts rather than BaseModels because an answer is built once per request on the hot
path: a plain dict costs nothing beyond orjson, a validated model about 4 µs more per answer (measured).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal, NotRequired, get_args

import orjson
from aiohttp import web
from pydantic import BaseModel, Discriminator, Field, GetJsonSchemaHandler, Tag, create_model
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from shared.model import CustomerIn, wire_name

CreatedMessage = Literal["新客户创建成功"]
UpdatedMessage = Literal["客户信息已更新"]
SupersededMessage = Literal["客户信息未修改：所提交字段已被更新的请求覆盖"]
AcceptedMessage = Literal["请求已受理，正在处理"]
CREATED_MESSAGE: Final[CreatedMessage] = get_args(CreatedMessage)[0]
UPDATED_MESSAGE: Final[UpdatedMessage] = get_args(UpdatedMessage)[0]
SUPERSEDED_MESSAGE: Final[SupersededMessage] = get_args(SupersededMessage)[0]
ACCEPTED_MESSAGE: Final[AcceptedMessage] = get_args(AcceptedMessage)[0]

RequestId = Annotated[str, Field(description="请求ID（UUIDv7）", json_schema_extra={"format": "uuid"})]
SupersededFields = Annotated[
    list[str], Field(description="被更新的写入覆盖而未生效的字段（字段名同请求）；部分更新时也会出现")
]
CustomerId = Annotated[int, Field(description="客户ID")]


# ---- POST /api/external/customers ---------------------------------------------------------------------


# What a write did to the customer: ``data`` of the 201 and 200 answers. (No docstrings on these types: pydantic
# would publish them as descriptions.)
class CustomerWriteResult(TypedDict):
    id: CustomerId
    userId: str
    action: Literal["created", "updated", "superseded"]
    supersededFields: NotRequired[SupersededFields]


class CreatedData(TypedDict):
    id: CustomerId
    userId: str
    action: Literal["created"]
    supersededFields: NotRequired[SupersededFields]


class UpdatedData(TypedDict):
    id: CustomerId
    userId: str
    action: Literal["updated"]
    supersededFields: NotRequired[SupersededFields]


class SupersededData(TypedDict):
    id: CustomerId
    userId: str
    action: Literal["superseded"]
    supersededFields: SupersededFields


class AcceptedData(TypedDict):
    userId: str
    requestId: RequestId


class Created(TypedDict):
    success: Literal[True]
    data: CreatedData
    message: CreatedMessage


class UpdatedAnswer(TypedDict):
    success: Literal[True]
    data: UpdatedData
    message: UpdatedMessage


class SupersededAnswer(TypedDict):
    success: Literal[True]
    data: SupersededData
    message: SupersededMessage


def _action(answer: Any) -> str | None:
    action = answer.get("data", {}).get("action") if isinstance(answer, dict) else None
    return action if isinstance(action, str) else None


# 200: one of the two, told apart by data.action.
Updated = Annotated[
    Annotated[UpdatedAnswer, Tag("updated")] | Annotated[SupersededAnswer, Tag("superseded")], Discriminator(_action)
]


class Accepted(TypedDict):
    success: Literal[True]
    data: AcceptedData
    message: AcceptedMessage


# ---- GET /api/external/customers/{userId} -------------------------------------------------------------


def _stored_customer_data() -> type[BaseModel]:
    """The stored customer in the request's field names: each field of ``CustomerIn`` (null when never set;
    integers as integers, everything else as text: the date in ISO form, room_tags as the JSON text sent)."""
    request = CustomerIn.model_json_schema(by_alias=True)["properties"]
    fields: dict[str, Any] = {}
    for name, field in CustomerIn.model_fields.items():
        wire = wire_name(name)
        branches = request[wire].get("anyOf", [request[wire]])
        kind = int if any(branch.get("type") == "integer" for branch in branches) else str
        fields[wire] = (kind | None, Field(None, description=field.description))
    fields.update(
        userId=(str, Field()),
        room_tags=(str | None, Field(None, description="JSON数组字符串，与请求中的格式相同")),
        id=(int, Field()),
        createdAt=(dt.datetime, Field()),
        updatedAt=(dt.datetime, Field()),
    )
    model: type[BaseModel] = create_model("StoredCustomerData", **fields)
    return model


StoredCustomerData = _stored_customer_data()


class _DocumentedAs:
    """Documents a value with a model's schema: the row the handler passes on as it comes is described by
    the model, never validated or copied into one."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(self.model.__pydantic_core_schema__)


class StoredCustomer(TypedDict):
    success: Literal[True]
    data: Annotated[dict[str, Any], _DocumentedAs(StoredCustomerData)]


# ---- GET /api/external/requests/{requestId} -----------------------------------------------------------

RequestOutcome = Literal["pending", "created", "updated", "superseded", "phone_taken", "failed"]


class RequestStatusData(TypedDict):
    requestId: RequestId
    userId: NotRequired[str | None]
    status: Annotated[RequestOutcome, Field(
        description="pending：已受理尚未处理；created/updated/superseded：已处理（id为客户ID）；"
        "phone_taken：手机号已被其他客户使用；failed：进入死信队列（error为原因）"
    )]
    id: NotRequired[int | None]
    error: NotRequired[str | None]


class RequestStatus(TypedDict):
    success: Literal[True]
    data: RequestStatusData


# ---- the responses ------------------------------------------------------------------------------------


def json_response(body: Any, status: int = 200) -> web.Response:
    # orjson writes datetimes as RFC 3339 (ISO 8601) with their offset.
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def created(customer_id: int, user_id: str) -> web.Response:
    answer: Created = {
        "success": True, "data": {"id": customer_id, "userId": user_id, "action": "created"},
        "message": CREATED_MESSAGE,
    }
    return json_response(answer, status=201)


def updated(customer_id: int, user_id: str, superseded: list[str] | None = None) -> web.Response:
    """200 "updated"; ``supersededFields`` lists provided fields that a newer write had already set."""
    data: UpdatedData = {"id": customer_id, "userId": user_id, "action": "updated"}
    if superseded:
        data["supersededFields"] = superseded
    answer: UpdatedAnswer = {"success": True, "data": data, "message": UPDATED_MESSAGE}
    return json_response(answer, status=200)


def superseded(customer_id: int, user_id: str, fields: list[str]) -> web.Response:
    """200 with action "superseded": the customer exists, but every field the request provided had already
    been written by a newer request (a stale or concurrent write), so nothing changed."""
    answer: SupersededAnswer = {
        "success": True,
        "data": {"id": customer_id, "userId": user_id, "action": "superseded", "supersededFields": fields},
        "message": SUPERSEDED_MESSAGE,
    }
    return json_response(answer, status=200)


def accepted(user_id: str, request_id: str) -> web.Response:
    answer: Accepted = {
        "success": True, "data": {"userId": user_id, "requestId": request_id}, "message": ACCEPTED_MESSAGE,
    }
    return json_response(answer, status=202)


def stored_customer(customer: dict[str, Any]) -> web.Response:
    answer: StoredCustomer = {"success": True, "data": customer}
    return json_response(answer)


def request_status(data: RequestStatusData) -> web.Response:
    answer: RequestStatus = {"success": True, "data": data}
    return json_response(answer)
