"""The dead-letter format, shared by the consumer (which writes dead letters) and the replay tool.

A dead letter is one RequestEnvelope (JSON) in the dead-letter queue, with headers saying why it died.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import aio_pika

H_ERROR = "x-error"
H_EXCEPTION = "x-exception"
H_ATTEMPTS = "x-attempts"
H_FIRST_FAILURE = "x-first-failure"
H_LAST_FAILURE = "x-last-failure"
H_ROUTING_KEY = "x-original-routing-key"
H_REQUEST_ID = "x-request-id"
H_USER_ID = "x-user-id"
H_DEAD_AT = "x-dead-at"
H_REPLAYED = "x-replayed"


def dead_letter_message(
    body: bytes,
    *,
    error: BaseException,
    attempts: int,
    first_failure: dt.datetime,
    last_failure: dt.datetime,
    routing_key: str,
    request_id: str | None,
    user_id: str | None,
) -> aio_pika.Message:
    headers: dict[str, Any] = {
        H_ERROR: str(error)[:1000] or error.__class__.__name__,
        H_EXCEPTION: f"{error.__class__.__module__}.{error.__class__.__qualname__}",
        H_ATTEMPTS: attempts,
        H_FIRST_FAILURE: first_failure.isoformat(),
        H_LAST_FAILURE: last_failure.isoformat(),
        H_ROUTING_KEY: routing_key,
        H_DEAD_AT: dt.datetime.now(dt.UTC).isoformat(),
    }
    if request_id is not None:
        headers[H_REQUEST_ID] = request_id
    if user_id is not None:
        headers[H_USER_ID] = user_id
    return aio_pika.Message(
        body,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=request_id,
    )
