"""The customers resource: ``POST /api/external/customers`` (upsert) and ``GET .../{userId}`` (read-back).

POST flow: the request id was made by ``gateway.request_id`` (unaccepted form) -> validate -> stamp ->
publish under the id's accepted form and wait for the broker's confirm -> from then on the answer and the log
lines carry the accepted id (so do the envelope, the processed record and a dead letter) -> wait for the
worker's outcome up to RPC_TIMEOUT, else 202 with the id to poll. A refusal before the confirm keeps the
unaccepted id, which ``GET /api/external/requests/{id}`` answers 404.
Errors are raised, never answered here: ``gateway.errors`` turns them into HTTP (with the id).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway import responses
from gateway.metrics import METRICS
from gateway.request_id import accept_request_id, accepted
from gateway.rpc import RPC
from gateway.server import request_started, stop_lingering
from gateway.state import API_KEY_NAME, SETTINGS, TIMELINE
from gateway.store import STORE
from shared.envelope import RequestEnvelope, body_hash
from shared.errors import (
    BodyTooLarge,
    CustomerNotFound,
    IdempotencyKeyReused,
    PhoneTaken,
    ProcessingFailed,
    RequestInvalid,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from shared.model import parse_customer

MAX_IDEMPOTENCY_KEY: Final = 255
# What the OpenAPI document states (gateway.openapi): visible ASCII, inner spaces allowed, none around — a key
# every client can send in a header, and every such key of 1..MAX_IDEMPOTENCY_KEY characters is accepted.
# The gateway itself is laxer (any printable characters, surrounding whitespace stripped): see
# ``parse_idempotency_key``.
IDEMPOTENCY_KEY_PATTERN: Final = r"^[!-~](?:[ -~]*[!-~])?$"

# The texts of the refusals raised here ({limit} bytes, {seconds} of CLIENT_TIMEOUT); gateway.openapi shows them.
NOT_JSON: Final = "Content-Type必须为application/json"
BODY_TOO_LARGE: Final = "请求体不能超过{limit}字节"
BODY_TOO_SLOW: Final = "请求体未在{seconds:g}秒内传完"
PHONE_TAKEN: Final = "手机号已存在"  # when the worker's outcome carries no text of its own
KEY_REUSED: Final = "Idempotency-Key已用于内容不同的请求"
DEAD_LETTERED: Final = "客户数据处理失败，请求已转入死信队列"


async def read_json_body(request: web.Request, limit: int, client_timeout: float) -> object:
    """The decoded JSON body, or the matching ClientError (415, 413, 408, 400)."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(NOT_JSON)
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(BODY_TOO_LARGE.format(limit=limit))
    remaining = client_timeout - (time.monotonic() - request_started(request))
    try:
        if request.content.is_eof():  # the whole body has arrived (the usual case): no deadline to arm
            raw = await request.read()
        else:
            async with asyncio.timeout(max(remaining, 0.001)):  # CLIENT_TIMEOUT covers the whole request
                raw = await request.read()  # aiohttp enforces client_max_size (= limit) for chunked bodies
    except (RequestPayloadError, HttpProcessingError):  # truncated body, bad Content-Encoding...
        raise RequestInvalid("请求体无法读取（内容不完整或编码错误）") from None
    except TimeoutError:
        stop_lingering(request)
        raise RequestTimeout(BODY_TOO_SLOW.format(seconds=client_timeout)) from None
    if not raw.strip():
        raise RequestInvalid("请求体不能为空")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestInvalid("请求体不是有效的JSON") from None


def idempotency_key(request: web.Request) -> str | None:
    return parse_idempotency_key(request.headers.get("Idempotency-Key"))


def parse_idempotency_key(header: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header value (None: no header): 1..MAX_IDEMPOTENCY_KEY printable
    characters once stripped, else 400."""
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise RequestInvalid(f"Idempotency-Key必须是1到{MAX_IDEMPOTENCY_KEY}个可打印字符")
    return key


async def post_customer(request: web.Request) -> web.Response:
    started = time.monotonic()
    app = request.config_dict
    settings, rpc, metrics, timeline = app[SETTINGS], app[RPC], app[METRICS], app[TIMELINE]
    request_id = accept_request_id(request)  # carried by the envelope; the answer's only once confirmed

    data = await read_json_body(request, settings.body_limit, settings.client_timeout)
    customer = parse_customer(data)
    key = idempotency_key(request)
    payload = customer.wire()
    # Built from validated parts, so constructed without a second validation (the worker validates it).
    envelope = RequestEnvelope.model_construct(
        request_id=request_id,
        stamp=timeline.stamp(),
        user_id=customer.user_id,
        payload=payload,
        idempotency_key=key,
        body_hash=body_hash(payload) if key is not None else None,
        api_key=request.get(API_KEY_NAME),
    )
    try:
        outcome_future = await rpc.submit(envelope)  # returns once the broker confirmed: nothing is lost now
    except ServiceUnavailable:
        metrics.count_outcome("unavailable")
        raise  # answered with the unaccepted id: the 503 says "not accepted", and so does the id
    accepted(request, request_id)
    remaining = settings.rpc_timeout - (time.monotonic() - started)
    try:
        outcome = await asyncio.wait_for(outcome_future, timeout=max(remaining, 0.001))
    except TimeoutError:
        rpc.forget(request_id)
        metrics.count_outcome("timeout")
        return responses.accepted(envelope.user_id, request_id)

    metrics.count_outcome(outcome.status)
    if outcome.status == "created" and outcome.id is not None:
        return responses.created(outcome.id, outcome.user_id)
    if outcome.status == "updated" and outcome.id is not None:
        return responses.updated(outcome.id, outcome.user_id, outcome.superseded)
    if outcome.status == "superseded" and outcome.id is not None:
        return responses.superseded(outcome.id, outcome.user_id, outcome.superseded or [])
    if outcome.status == "phone_taken":
        raise PhoneTaken(outcome.error or PHONE_TAKEN)
    if outcome.status == "idempotency_conflict":
        raise IdempotencyKeyReused(outcome.error or KEY_REUSED)
    raise ProcessingFailed(DEAD_LETTERED)


async def get_customer(request: web.Request) -> web.Response:
    """The stored customer in the request's field names, plus ``id``, ``createdAt``, ``updatedAt``."""
    user_id = request.match_info["userId"]
    customer = await request.config_dict[STORE].customer(user_id)
    if customer is None:
        raise CustomerNotFound(f"客户不存在：{user_id}")
    return responses.stored_customer(customer)
