"""The OpenAPI 3.1 document of the gateway, built once at start-up from the shared request model.

Flow: ``build_openapi(settings)`` → the request schema is ``CustomerIn.model_json_schema()`` (every field rule
is declared beside its field in ``shared/model.py``, so the document cannot drift from the validators) →
response schemas, examples and error bodies are built from the code that produces them (``gateway.responses``
messages, ``shared.errors`` classes, ``parse_customer``'s own error for a missing userId) → one dict, served
as JSON by ``gateway.docs``.

API keys and rate limits are described as configured (``describe_access``): with keys, the two security
schemes (``Authorization: Bearer`` and ``X-API-Key``, so /docs can send a key), a ``security`` requirement and a
401 answer on every protected operation (``external_operations``, plus /metrics and the docs when
PROTECT_METRICS / PROTECT_DOCS); with keys or RATE_LIMIT, the 429 answer and its headers on the external API.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from gateway.customers import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY
from gateway.request_status import REFUSED
from gateway.responses import ACCEPTED_MESSAGE, CREATED_MESSAGE, SUPERSEDED_MESSAGE, UPDATED_MESSAGE
from shared.errors import (
    INVALID_KEY,
    MISSING_KEY,
    BodyTooLarge,
    ClientError,
    IdempotencyKeyReused,
    NotFound,
    PhoneTaken,
    ProcessingFailed,
    RequestInvalid,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from shared.model import CustomerIn, parse_customer
from shared.settings import Settings

JsonDict = dict[str, Any]

EXTERNAL_API: Final = "/api/external"
REQUEST_STATUSES: Final = ("pending", "created", "updated", "superseded", "phone_taken", "failed")

_EXAMPLE_USER = "agent_user_12345"
_USER_ID = "CustomerIn/properties/userId"
_EXAMPLE_REQUEST_ID = "01920b6e-5f3a-7cc2-9b1e-4f6d2a8c0e31"  # a UUIDv7
_EXAMPLE_REFUSED_ID = "01920b6e-5f3a-7bad-9b1e-4f6d2a8c0e31"  # its unaccepted form (shared.request_ids)

# The scenario bodies of the API spec (customer-api.zh.md, "业务场景示例"), verbatim.
SPEC_EXAMPLES: Final[dict[str, JsonDict]] = {
    "scenario1_create": {
        "summary": "场景一：创建新客户（全部字段）",
        "value": {
            "userId": _EXAMPLE_USER,
            "botId": "bot_001",
            "nickname": "小张",
            "name": "张三",
            "phone": "13800138000",
            "backup_phone": "13900139000",
            "wechat": "zhangsan123",
            "status": 1,
            "community": "万科城",
            "business_type": "whole_rent",
            "room_type": "two_bedroom",
            "room_tags": '["loft", "two_bath"]',
            "move_in_date": "2024-09-01",
            "lease_period": 12,
            "price_range": "5000-8000",
            "source_channel": "referral",
            "creator": "外部Agent系统",
            "internal_notes": "来自Agent系统推送",
        },
    },
    "scenario2_update": {
        "summary": "场景二：更新现有客户（部分字段）",
        "value": {
            "userId": _EXAMPLE_USER,
            "nickname": "张三丰",
            "phone": "13800138001",
            "community": "万科城二期",
            "business_type": "shared_rent",
            "price_range": "6000-9000",
        },
    },
    "scenario3_minimal": {
        "summary": "场景三：最小化数据录入",
        "value": {"userId": "agent_user_67890", "name": "李四", "phone": "13900139000"},
    },
}


def _ref(kind: str, name: str) -> JsonDict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: JsonDict, examples: dict[str, JsonDict] | None = None) -> JsonDict:
    media: JsonDict = {"schema": schema}
    if examples:
        media["examples"] = examples
    return {"application/json": media}


def _error_example(error: ClientError, request_id: str | None = None) -> JsonDict:
    body = error.body()
    if request_id is not None:
        body["requestId"] = request_id
    return {"value": body}


def _missing_user_id_example() -> JsonDict:
    """The 400 body of the spec's own error example, produced by the validator itself."""
    try:
        parse_customer({"name": "张三"})
    except RequestInvalid as error:
        return _error_example(error)
    raise AssertionError("a body without userId must be invalid")


def _error_response(description: str, *examples: tuple[str, JsonDict]) -> JsonDict:
    return {"description": description, "content": _json(_ref("schemas", "Error"), dict(examples) or None)}


def _with_request_id(response: JsonDict) -> JsonDict:
    return {**response, "headers": {**response.get("headers", {}), "X-Request-Id": _ref("headers", "XRequestId")}}


# ---- schemas ----------------------------------------------------------------------------------------


def _schemas() -> dict[str, JsonDict]:
    customer_in = CustomerIn.model_json_schema(by_alias=True, mode="validation")
    customer_in["description"] = (
        "一条客户记录。只有userId必填；缺省、null或空字符串\"\"的字段视为未提供，不会覆盖已存储的值"
        "（部分更新）。未列出的字段被忽略。"
    )
    write_result: JsonDict = {
        "type": "object",
        "required": ["id", "userId", "action"],
        "properties": {
            "id": {"type": "integer", "description": "客户ID"},
            "userId": {"type": "string"},
            "action": {"type": "string", "enum": ["created", "updated", "superseded"]},
            "supersededFields": {
                "type": "array",
                "items": {"type": "string"},
                "description": "被更新的写入覆盖而未生效的字段（字段名同请求）；部分更新时也会出现",
            },
        },
    }
    return {
        "CustomerIn": customer_in,
        "Error": {
            "type": "object",
            "required": ["success", "error", "message"],
            "properties": {
                "success": {"const": False},
                "error": {"type": "string", "description": "具体错误（如哪个字段不合规）"},
                "message": {"type": "string", "description": "错误类别"},
                "details": {
                    "type": "array",
                    "description": "400时逐字段列出全部错误",
                    "items": {
                        "type": "object",
                        "required": ["field", "error"],
                        "properties": {"field": {"type": "string"}, "error": {"type": "string"}},
                    },
                },
                "requestId": {"type": "string", "description": "请求ID（死信的500带此字段，可用于replay）"},
            },
        },
        "CustomerWriteResult": write_result,
        "Created": _success(
            {**write_result, "properties": {**write_result["properties"], "action": {"const": "created"}}},
            message={"const": CREATED_MESSAGE},
        ),
        "Updated": {
            "oneOf": [
                _success(
                    {**write_result, "properties": {**write_result["properties"], "action": {"const": "updated"}}},
                    message={"const": UPDATED_MESSAGE},
                ),
                _success(
                    {
                        **write_result,
                        "required": [*write_result["required"], "supersededFields"],
                        "properties": {**write_result["properties"], "action": {"const": "superseded"}},
                    },
                    message={"const": SUPERSEDED_MESSAGE},
                ),
            ]
        },
        "Accepted": _success(
            {
                "type": "object",
                "required": ["userId", "requestId"],
                "properties": {"userId": {"type": "string"}, "requestId": _request_id_schema()},
            },
            message={"const": ACCEPTED_MESSAGE},
        ),
        "StoredCustomer": _success(_stored_customer_schema()),
        "RequestStatus": _success(
            {
                "type": "object",
                "required": ["requestId", "status"],
                "properties": {
                    "requestId": _request_id_schema(),
                    "userId": {"type": ["string", "null"]},
                    "status": {
                        "type": "string",
                        "enum": list(REQUEST_STATUSES),
                        "description": "pending：已受理尚未处理；created/updated/superseded：已处理（id为客户ID）；"
                        "phone_taken：手机号已被其他客户使用；failed：进入死信队列（error为原因）",
                    },
                    "id": {"type": ["integer", "null"]},
                    "error": {"type": ["string", "null"]},
                },
            }
        ),
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Readiness": {
            "type": "object",
            "required": ["checks"],
            "properties": {
                "status": {"type": "string"},
                "checks": {
                    "type": "object",
                    "description": "每个依赖的状态。数据库不可用只算degraded，网关仍然就绪（写入排队，稍后应用）",
                    "required": ["broker", "replies", "database"],
                    "properties": {
                        "broker": {"type": "string", "description": "RabbitMQ连接与通道"},
                        "replies": {"type": "string", "description": "回复消费者"},
                        "database": {"type": "string", "description": "只读数据库连接池；不可用时为degraded"},
                    },
                },
            },
        },
    }


def _success(data: JsonDict, message: JsonDict | None = None) -> JsonDict:
    properties: JsonDict = {"success": {"const": True}, "data": data}
    required = ["success", "data"]
    if message is not None:
        properties["message"] = message
        required.append("message")
    return {"type": "object", "required": required, "properties": properties}


def _request_id_schema() -> JsonDict:
    return {"type": "string", "format": "uuid", "description": "请求ID（UUIDv7）"}


def _stored_customer_schema() -> JsonDict:
    """The stored customer in the request's field names: each field of the model, null when never set."""
    properties: JsonDict = {}
    for name, field_schema in CustomerIn.model_json_schema(by_alias=True)["properties"].items():
        integer = any(branch.get("type") == "integer" for branch in field_schema.get("anyOf", [field_schema]))
        properties[name] = {"type": ["integer" if integer else "string", "null"]}
        if "description" in field_schema:
            properties[name]["description"] = field_schema["description"]
    properties["userId"] = {"type": "string"}
    properties["room_tags"]["description"] = "JSON数组字符串，与请求中的格式相同"
    properties.update(
        id={"type": "integer"},
        createdAt={"type": "string", "format": "date-time"},
        updatedAt={"type": "string", "format": "date-time"},
    )
    return {"type": "object", "required": ["id", "userId", "createdAt", "updatedAt"], "properties": properties}


# ---- operations --------------------------------------------------------------------------------------


def _post_customer(settings: Settings) -> JsonDict:
    responses = {
        "201": {
            "description": "新客户已创建",
            "content": _json(
                _ref("schemas", "Created"),
                {
                    "created": {
                        "value": {
                            "success": True,
                            "data": {"id": 123, "userId": _EXAMPLE_USER, "action": "created"},
                            "message": CREATED_MESSAGE,
                        }
                    }
                },
            ),
        },
        "200": {
            "description": "已有客户：updated = 已更新；superseded = 提供的每个字段都已被更新的写入覆盖，"
            "未作改变（supersededFields列出这些字段）",
            "content": _json(
                _ref("schemas", "Updated"),
                {
                    "updated": {
                        "value": {
                            "success": True,
                            "data": {"id": 123, "userId": _EXAMPLE_USER, "action": "updated"},
                            "message": UPDATED_MESSAGE,
                        }
                    },
                    "superseded": {
                        "value": {
                            "success": True,
                            "data": {
                                "id": 123,
                                "userId": _EXAMPLE_USER,
                                "action": "superseded",
                                "supersededFields": ["phone"],
                            },
                            "message": SUPERSEDED_MESSAGE,
                        }
                    },
                },
            ),
        },
        "202": {
            "description": f"已受理，但{settings.rpc_timeout:g}秒内未处理完（不会丢失）。"
            "用data.requestId轮询 GET /api/external/requests/{requestId}",
            "content": _json(
                _ref("schemas", "Accepted"),
                {
                    "accepted": {
                        "value": {
                            "success": True,
                            "data": {"userId": _EXAMPLE_USER, "requestId": _EXAMPLE_REQUEST_ID},
                            "message": ACCEPTED_MESSAGE,
                        }
                    }
                },
            ),
            "links": {
                "requestStatus": {
                    "operationId": "getRequestStatus",
                    "parameters": {"requestId": "$response.body#/data/requestId"},
                }
            },
        },
        "400": _error_response(
            "请求无效：字段不合规（details逐字段列出）、JSON无效或Idempotency-Key格式错误",
            ("missingUserId", _missing_user_id_example()),
        ),
        "409": _error_response("手机号已被其他客户使用", ("phoneTaken", _error_example(PhoneTaken("手机号已存在")))),
        "413": _error_response(
            f"请求体超过{settings.body_limit}字节",
            ("tooLarge", _error_example(BodyTooLarge(f"请求体不能超过{settings.body_limit}字节"))),
        ),
        "408": _error_response(
            f"请求未在CLIENT_TIMEOUT（{settings.client_timeout:g}秒）内传完，连接随后关闭",
            ("tooSlow", _error_example(RequestTimeout(f"请求体未在{settings.client_timeout:g}秒内传完"))),
        ),
        "415": _error_response(
            "Content-Type不是application/json",
            ("notJson", _error_example(UnsupportedMediaType("Content-Type必须为application/json"))),
        ),
        "422": _error_response(
            "Idempotency-Key已用于内容不同的请求",
            ("keyReused", _error_example(IdempotencyKeyReused("Idempotency-Key已用于内容不同的请求"))),
        ),
        "500": _error_response(
            "处理失败，请求已转入死信队列（body带requestId）",
            (
                "deadLettered",
                _error_example(ProcessingFailed("客户数据处理失败，请求已转入死信队列"), _EXAMPLE_REQUEST_ID),
            ),
        ),
        "503": {
            **_error_response(
                "暂时无法受理（消息代理不可用、队列已满、代理资源告警或网关繁忙），请求未被接受；"
                "按Retry-After重试（建议带Idempotency-Key）",
                ("unavailable", _error_example(ServiceUnavailable("消息代理暂时不可用"))),
            ),
            "headers": {"Retry-After": _ref("headers", "RetryAfter")},
        },
    }
    return {
        "operationId": "upsertCustomer",
        "tags": ["customers"],
        "summary": "录入或更新客户（按userId）",
        "description": "相同userId的重复调用更新已有客户；只写入提供了的字段。",
        "parameters": [_ref("parameters", "IdempotencyKey")],
        "requestBody": {"required": True, "content": _json(_ref("schemas", "CustomerIn"), SPEC_EXAMPLES)},
        "responses": {status: _with_request_id(answer) for status, answer in responses.items()},
    }


def _get_customer() -> JsonDict:
    return {
        "operationId": "getCustomer",
        "tags": ["customers"],
        "summary": "读取已存储的客户",
        # The path parameter obeys the body field's rules: one schema, referenced.
        "parameters": [{"name": "userId", "in": "path", "required": True, "schema": _ref("schemas", _USER_ID)}],
        "responses": {
            "200": {"description": "已存储的客户（字段名同请求）", "content": _json(_ref("schemas", "StoredCustomer"))},
            "404": _error_response("客户不存在", ("unknown", _error_example(NotFound("客户不存在")))),
            "503": _database_down(),
        },
    }


def _get_request_status() -> JsonDict:
    return {
        "operationId": "getRequestStatus",
        "tags": ["requests"],
        "summary": "查询已受理请求（202）的结果",
        "description": "用POST回答中的requestId（202响应体或X-Request-Id头）查询。"
        "被拒绝的POST（400、401、413、415、429、503等）的X-Request-Id是“未受理”形式的ID"
        f"（第三段为7bad，如{_EXAMPLE_REFUSED_ID}）：这样的请求从未被受理、不会被处理，"
        "查询它回答404，绝不会是pending。网关在消息代理确认收到请求后才给出已受理形式的ID。"
        "其他UUIDv7在保留期内（且尚无结果）回答pending，超出保留期或不是UUIDv7回答404。",
        "parameters": [{"name": "requestId", "in": "path", "required": True, "schema": _request_id_schema()}],
        "responses": {
            "200": {"description": "请求的当前结果", "content": _json(_ref("schemas", "RequestStatus"))},
            "404": _error_response(
                "未知的请求ID、已超出保留期，或是被拒绝的请求的ID（未受理形式，第三段为7bad）",
                ("unknown", _error_example(NotFound("请求不存在"))),
                ("refused", _error_example(NotFound(f"{REFUSED}：{_EXAMPLE_REFUSED_ID}"))),
            ),
            "503": _database_down(),
        },
    }


def _database_down() -> JsonDict:
    return {
        **_error_response(
            "数据库暂不可用（读取需要数据库；写入仍被受理）；按Retry-After重试",
            ("databaseDown", _error_example(ServiceUnavailable("数据库暂不可用，请稍后重试"))),
        ),
        "headers": {"Retry-After": _ref("headers", "RetryAfter")},
    }


def _operations_endpoint(operation_id: str, summary: str, responses: JsonDict) -> JsonDict:
    return {"get": {"operationId": operation_id, "tags": ["operations"], "summary": summary, "responses": responses}}


def _operations_paths() -> dict[str, JsonDict]:
    readiness = _json(_ref("schemas", "Readiness"))
    text = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/healthz": _operations_endpoint(
            "healthz", "进程存活（不检查依赖）",
            {"200": {"description": "存活", "content": _json(_ref("schemas", "Health"))}},
        ),
        "/readyz": _operations_endpoint(
            "readyz", "能否接受写入（消息代理连接与通道可用、回复消费者在运行）",
            {
                "200": {"description": "就绪（数据库可以是degraded）", "content": readiness},
                "503": {"description": "未就绪，checks指出出错的部分", "content": readiness},
            },
        ),
        "/metrics": _operations_endpoint(
            "metrics", "Prometheus指标（文本格式）", {"200": {"description": "指标", "content": text}}
        ),
        "/openapi.json": _operations_endpoint(
            "openapi", "本文档（OpenAPI 3.1）",
            {"200": {"description": "OpenAPI文档", "content": _json({"type": "object"})}},
        ),
        "/docs": _operations_endpoint(
            "docs", "本文档的网页（Swagger UI，离线可用）", {"200": {"description": "HTML页面", "content": html}}
        ),
    }


def _paths(settings: Settings) -> dict[str, JsonDict]:
    return {
        f"{EXTERNAL_API}/customers": {"post": _post_customer(settings)},
        f"{EXTERNAL_API}/customers/{{userId}}": {"get": _get_customer()},
        f"{EXTERNAL_API}/requests/{{requestId}}": {"get": _get_request_status()},
        **_operations_paths(),
    }


def external_operations(document: JsonDict) -> Iterator[JsonDict]:
    """Every operation of the external API (the ones an API key will protect)."""
    for path, item in document["paths"].items():
        if path.startswith(f"{EXTERNAL_API}/"):
            yield from item.values()


def _package_version() -> str:
    try:
        return version("crm-ingest")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def describe_access(document: JsonDict, settings: Settings) -> None:
    """Add the API keys' security schemes, requirements and 401s, and the rate limit's 429s, as configured."""
    keys_on = bool(settings.api_keys_file.strip() or settings.api_keys.strip())
    components = document["components"]
    if keys_on:
        components["securitySchemes"] = {
            "bearerKey": {"type": "http", "scheme": "bearer", "description": "API密钥：Authorization: Bearer <key>"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "API密钥"},
        }
        unauthorized = {
            **_error_response(
                "缺少API密钥或密钥无效",
                ("missingKey", _error_example(Unauthorized(MISSING_KEY))),
                ("invalidKey", _error_example(Unauthorized(INVALID_KEY))),
            ),
            "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
        }
        protected = list(external_operations(document))
        paths = document["paths"]
        if settings.protect_metrics:
            protected.append(paths["/metrics"]["get"])
        if settings.protect_docs:
            protected += [paths["/openapi.json"]["get"], paths["/docs"]["get"]]
        for operation in protected:
            operation["security"] = [{"bearerKey": []}, {"apiKeyHeader": []}]  # either one
            operation["responses"]["401"] = unauthorized
    if keys_on or settings.rate_limit > 0:
        field = "draft-ietf-httpapi-ratelimit-headers-11中的"
        components["headers"]["RateLimitPolicy"] = {
            "description": field + "配额策略，如\"default\";q=10;w=1（q个请求/w秒）", "schema": {"type": "string"}
        }
        components["headers"]["RateLimit"] = {
            "description": field + "当前余量，如\"default\";r=3;t=1（剩余r个请求，t秒）", "schema": {"type": "string"}
        }
        too_many = {
            **_error_response(
                "超过频率限制（每个API密钥一个令牌桶，未配置密钥时按客户端地址）；按Retry-After重试",
                ("rateLimited", _error_example(TooManyRequests("请求过于频繁，请1秒后重试", retry_after=1))),
            ),
            "headers": {
                "Retry-After": _ref("headers", "RetryAfter"),
                "RateLimit-Policy": _ref("headers", "RateLimitPolicy"),
                "RateLimit": _ref("headers", "RateLimit"),
            },
        }
        for operation in external_operations(document):
            operation["responses"]["429"] = too_many


def build_openapi(settings: Settings) -> JsonDict:
    """The whole OpenAPI 3.1 document (a JSON-ready dict)."""
    document = _document(settings)
    describe_access(document, settings)
    return document


def _document(settings: Settings) -> JsonDict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "客户数据录入接口 (crm-ingest)",
            "version": _package_version(),
            "description": (
                "外部系统向CRM录入或更新客户信息。按userId幂等：相同userId的重复调用更新已有客户。\n\n"
                "- 只有userId必填；缺省、null或\"\"的字段视为未提供，不覆盖已存储的值。\n"
                "- 回答202时请求已受理且不会丢失：用requestId轮询 GET /api/external/requests/{requestId}。\n"
                "- 503时请求未被接受，按Retry-After重试；带Idempotency-Key的重试不会重复应用。\n"
                "- 每个POST回答都带X-Request-Id头（UUIDv7），与日志、死信中的请求ID相同；"
                "被拒绝的请求的ID是未受理形式（第三段为7bad），查询它回答404。"
            ),
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "customers", "description": "客户录入与读取"},
            {"name": "requests", "description": "已受理请求的结果"},
            {"name": "operations", "description": "健康检查、指标与文档"},
        ],
        "paths": _paths(settings),
        "components": {
            "schemas": _schemas(),
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": f"可选。1到{MAX_IDEMPOTENCY_KEY}个可打印ASCII字符（中间可有空格，首尾不可），"
                    "否则400；"
                    f"{settings.idempotency_window_hours:g}小时内相同键+相同内容的重试只应用一次，"
                    "相同键+不同内容返回422",
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_IDEMPOTENCY_KEY,
                        "pattern": IDEMPOTENCY_KEY_PATTERN,
                    },
                }
            },
            "headers": {
                "XRequestId": {
                    "description": "本请求的ID（UUIDv7），与202响应体、处理记录、死信和日志中的ID相同。"
                    "请求未被受理时（4xx、503）为未受理形式（第三段为7bad）：查询它回答404",
                    "schema": _request_id_schema(),
                },
                "RetryAfter": {
                    "description": "建议的重试等待秒数",
                    "schema": {"type": "integer", "minimum": 1, "examples": [settings.retry_after_seconds]},
                },
            },
        },
    }
