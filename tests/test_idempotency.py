"""Idempotency: client retries with an ``Idempotency-Key`` and broker redeliveries are applied once.

Rules under test (issue 3):
* the same key with the same body returns the stored outcome (same status, same id) without applying again;
* the same key with a different body is refused with 422 in the spec's error shape, and nothing is written;
* a redelivered request (same request id) is applied once and answers with its first outcome.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import aio_pika
import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from gateway.api.customers import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY
from shared.clock.stamps import HybridClock
from shared.envelope import Outcome, RequestEnvelope, decode_reply, encode_pack
from shared.topology import Topology
from tests.helpers import assert_error_shape, fetch_customer, post
from tests.support import Stack, unique_phone, unique_user


def new_key() -> str:
    return f"idem-{uuid.uuid4().hex}"


async def rows_for_key(db: asyncpg.Pool, key: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT request_id, user_id, customer_id, outcome FROM processed_requests WHERE idempotency_key = $1", key
    )
    return rows


async def customer_count(db: asyncpg.Pool, user_id: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM customers WHERE user_id = $1", user_id)
    return count


async def test_same_key_and_same_body_returns_the_first_answer_and_applies_once(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user, key = unique_user("idem"), new_key()
    body = {"userId": user, "phone": unique_phone(), "name": "张三"}

    first_status, first = await post(http, api, body, headers={"Idempotency-Key": key})
    second_status, second = await post(http, api, body, headers={"Idempotency-Key": key})

    assert first_status == 201, first
    assert first["data"]["action"] == "created"
    # The retry is answered with the stored outcome: "created" again, not "updated".
    assert (second_status, second["data"]["action"], second["data"]["id"]) == (201, "created", first["data"]["id"])
    assert second["data"]["userId"] == user
    rows = await rows_for_key(db, key)
    assert len(rows) == 1, rows
    assert rows[0]["outcome"] == "created" and rows[0]["customer_id"] == first["data"]["id"]
    assert await customer_count(db, user) == 1


async def test_the_longest_key_the_openapi_document_allows_is_accepted_and_honoured(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    """Issue 13: a client generated from the document must not send keys that get 400."""
    key = new_key() + " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    key += "k" * (MAX_IDEMPOTENCY_KEY - len(key))
    assert len(key) == MAX_IDEMPOTENCY_KEY and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)
    body = {"userId": unique_user("idem-long"), "name": "张三"}

    first_status, first = await post(http, api, body, headers={"Idempotency-Key": key})
    second_status, second = await post(http, api, body, headers={"Idempotency-Key": key})

    assert first_status == 201, first
    assert (second_status, second["data"]["id"]) == (201, first["data"]["id"]), second
    assert [row["outcome"] for row in await rows_for_key(db, key)] == ["created"]


async def test_same_key_retry_does_not_revert_a_newer_change(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user, key = unique_user("idem"), new_key()
    body = {"userId": user, "nickname": "first"}

    status, created = await post(http, api, body, headers={"Idempotency-Key": key})
    assert status == 201, created
    status, changed = await post(http, api, {"userId": user, "nickname": "changed"})
    assert status == 200, changed
    status, retried = await post(http, api, body, headers={"Idempotency-Key": key})

    assert status == 201, retried
    assert retried["data"] == created["data"]
    row = await fetch_customer(db, user)
    assert row is not None
    # Applied a second time, the retry would have put "first" back.
    assert row["nickname"] == "changed"
    assert len(await rows_for_key(db, key)) == 1


async def test_same_key_with_an_updating_request_returns_updated_again(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user, key = unique_user("idem"), new_key()
    status, created = await post(http, api, {"userId": user, "nickname": "a"})
    assert status == 201, created
    body = {"userId": user, "nickname": "b"}

    first_status, first = await post(http, api, body, headers={"Idempotency-Key": key})
    second_status, second = await post(http, api, body, headers={"Idempotency-Key": key})

    assert (first_status, first["data"]["action"]) == (200, "updated"), first
    assert (second_status, second["data"]) == (200, first["data"]), second
    assert len(await rows_for_key(db, key)) == 1


async def test_same_key_with_a_different_body_is_422_and_writes_nothing(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user, other_user, key = unique_user("idem"), unique_user("idem"), new_key()
    status, created = await post(http, api, {"userId": user, "nickname": "a"}, headers={"Idempotency-Key": key})
    assert status == 201, created

    changed_status, changed = await post(
        http, api, {"userId": user, "nickname": "b"}, headers={"Idempotency-Key": key}
    )
    other_status, other = await post(
        http, api, {"userId": other_user, "nickname": "a"}, headers={"Idempotency-Key": key}
    )

    assert_error_shape(changed, status=422, answered=changed_status)
    assert_error_shape(other, status=422, answered=other_status)
    row = await fetch_customer(db, user)
    assert row is not None and row["nickname"] == "a"
    assert await customer_count(db, other_user) == 0
    rows = await rows_for_key(db, key)
    assert [(r["user_id"], r["outcome"]) for r in rows] == [(user, "created")]


async def next_outcomes(replies: asyncio.Queue[bytes], count: int) -> list[Outcome]:
    """The next ``count`` outcomes arriving on our reply queue (at most 20 s)."""
    outcomes: list[Outcome] = []
    async with asyncio.timeout(20):
        while len(outcomes) < count:
            outcomes.extend(decode_reply(await replies.get()))
    return outcomes


async def deliver_twice(stack: Stack, amqp_url: str, envelope: RequestEnvelope, timing: str) -> list[Outcome]:
    """Publish the same pack twice, as a broker redelivery would present it; return both outcomes."""
    pack = encode_pack([envelope])
    topology = Topology(prefix=stack.prefix, shard_count=8, queue_type="quorum")

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        reply_queue = await channel.declare_queue(exclusive=True)
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            await replies.put(message.body)

        await reply_queue.consume(on_reply, no_ack=True)
        exchange = await topology.declare_exchange(channel)

        async def publish() -> None:
            message = aio_pika.Message(
                pack,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=envelope.request_id,
                reply_to=reply_queue.name,
            )
            await exchange.publish(message, routing_key=topology.routing_key_for(envelope.user_id))

        if timing == "back_to_back":
            await publish()
            await publish()
            return await next_outcomes(replies, 2)
        await publish()
        outcomes = await next_outcomes(replies, 1)
        await publish()
        return outcomes + await next_outcomes(replies, 1)


@pytest.mark.parametrize("timing", ["back_to_back", "after_the_first_reply"])
async def test_redelivered_request_is_applied_once_and_answers_its_first_outcome(
    stack: Stack, amqp_url: str, db: asyncpg.Pool, timing: str
) -> None:
    user = unique_user("redeliver")
    envelope = RequestEnvelope(
        request_id=uuid.uuid4().hex,
        stamp=HybridClock().now(),
        user_id=user,
        payload={"userId": user, "nickname": "once"},
    )

    outcomes = await deliver_twice(stack, amqp_url, envelope, timing)

    assert [(o.request_id, o.status) for o in outcomes] == [(envelope.request_id, "created")] * 2, outcomes
    assert outcomes[0].id is not None and outcomes[0].id == outcomes[1].id
    assert await customer_count(db, user) == 1
    processed = await db.fetch("SELECT outcome FROM processed_requests WHERE request_id = $1", envelope.request_id)
    assert [r["outcome"] for r in processed] == ["created"]


async def test_a_redelivered_superseded_request_answers_its_superseded_fields_again(
    stack: Stack, amqp_url: str, http: aiohttp.ClientSession, api: str
) -> None:
    user = unique_user("redeliver")
    older = HybridClock().now()  # stamped before the POST below: it loses every field to it
    status, _ = await post(http, api, {"userId": user, "nickname": "newer"})
    assert status == 201
    envelope = RequestEnvelope(request_id=uuid.uuid4().hex, stamp=older, user_id=user,
                               payload={"userId": user, "nickname": "older"})

    outcomes = await deliver_twice(stack, amqp_url, envelope, "after_the_first_reply")

    assert [(o.status, o.superseded) for o in outcomes] == [("superseded", ["nickname"])] * 2, outcomes
