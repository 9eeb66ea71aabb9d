"""Upsert rules through the running system: COALESCE, defaults only on create, phone uniqueness and its
atomicity, idempotent concurrent creates, concurrent and sequential updates, out-of-order delivery."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections import Counter
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest

from shared.envelope import RequestEnvelope, encode_pack
from shared.topology import Topology
from tests.helpers import assert_error_shape, fetch_customer, post, processed_outcomes
from tests.support import Stack, unique_phone, unique_user


def full_body(user: str, phone: str, backup_phone: str) -> dict[str, Any]:
    """A customer with every field set, in wire names (not the spec's defaults, so they are visible)."""
    return {
        "userId": user, "botId": "bot_001", "nickname": "小张", "name": "张三", "phone": phone,
        "backup_phone": backup_phone, "wechat": "zhangsan123", "status": 3, "community": "万科城",
        "business_type": "centralized", "room_type": "master_room", "room_tags": '["loft", "two_bath"]',
        "move_in_date": "2024-09-01", "lease_period": 12, "price_range": "5000-8000", "source_channel": "douyin",
        "creator": "外部Agent系统", "internal_notes": "来自Agent系统推送",
    }


def full_row(user: str, phone: str, backup_phone: str) -> dict[str, Any]:
    """The row ``full_body`` must be stored as, in column names."""
    return {
        "user_id": user, "bot_id": "bot_001", "nickname": "小张", "name": "张三", "phone": phone,
        "backup_phone": backup_phone, "wechat": "zhangsan123", "status": 3, "community": "万科城",
        "business_type": "centralized", "room_type": "master_room", "room_tags": ["loft", "two_bath"],
        "move_in_date": dt.date(2024, 9, 1), "lease_period": 12, "price_range": "5000-8000",
        "source_channel": "douyin", "creator": "外部Agent系统", "internal_notes": "来自Agent系统推送",
    }


COLUMNS = tuple(full_row("u", "p", "b"))
WIRE_FIELDS = [field for field in full_body("u", "p", "b") if field != "userId"]


async def stored(db: asyncpg.Pool, user: str) -> dict[str, Any] | None:
    """The business columns of a customer (room_tags decoded from jsonb), or None when there is no row."""
    row = await fetch_customer(db, user)
    if row is None:
        return None
    if row["room_tags"] is not None:
        row["room_tags"] = orjson.loads(row["room_tags"])
    return {column: row[column] for column in COLUMNS}


async def create_full(http: aiohttp.ClientSession, api: str) -> tuple[str, str, str, int]:
    user, phone, backup = unique_user("upsert"), unique_phone(), unique_phone()
    status, body = await post(http, api, full_body(user, phone, backup))
    assert status == 201, body
    return user, phone, backup, body["data"]["id"]


# ---- COALESCE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["null", "missing", "empty-string"])
async def test_coalesce_not_provided_never_overwrites(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool, empty: str
) -> None:
    user, phone, backup, customer_id = await create_full(http, api)
    if empty == "missing":
        update: dict[str, Any] = {"userId": user}
    else:
        update = {"userId": user, **dict.fromkeys(WIRE_FIELDS, None if empty == "null" else "")}
    update["community"] = "万科城二期"  # one real change, so the update does reach the row
    status, body = await post(http, api, update)
    assert status == 200, body
    assert body["data"]["id"] == customer_id
    assert await stored(db, user) == {**full_row(user, phone, backup), "community": "万科城二期"}


# ---- defaults only on create ------------------------------------------------------------------------


async def test_defaults_apply_on_create(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user = unique_user("defaults")
    status, body = await post(http, api, {"userId": user, "name": "王五"})
    assert status == 201, body
    assert await stored(db, user) == {
        **dict.fromkeys(COLUMNS), "user_id": user, "name": "王五", "status": 1, "business_type": "whole_rent",
        "room_type": "one_bedroom", "source_channel": "referral", "creator": "外部系统",
    }


async def test_defaults_do_not_apply_on_update(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user, phone, backup, _ = await create_full(http, api)  # status 3, centralized, master_room, douyin, ...
    status, body = await post(http, api, {"userId": user, "nickname": "老张"})
    assert status == 200, body
    assert await stored(db, user) == {**full_row(user, phone, backup), "nickname": "老张"}


async def test_update_keeps_a_value_set_after_create(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user = unique_user("defaults")
    assert (await post(http, api, {"userId": user}))[0] == 201
    assert (await post(http, api, {"userId": user, "status": 3, "room_type": "second_room"}))[0] == 200
    assert (await post(http, api, {"userId": user, "name": "赵六"}))[0] == 200
    row = await stored(db, user)
    assert row is not None
    assert (row["status"], row["room_type"], row["name"]) == (3, "second_room", "赵六")
    assert (row["business_type"], row["source_channel"], row["creator"]) == ("whole_rent", "referral", "外部系统")


# ---- phone uniqueness -------------------------------------------------------------------------------


def assert_phone_taken(status: int, body: dict[str, Any]) -> None:
    assert_error_shape(body, status=409, answered=status)
    assert body["error"].startswith("手机号已存在"), body


async def test_phone_taken_by_another_customer_is_409_for_an_existing_customer_and_changes_nothing(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    owner, owner_phone, _, _ = await create_full(http, api)
    other, other_phone, other_backup, _ = await create_full(http, api)
    before = await stored(db, other)
    status, body = await post(http, api, {
        "userId": other, "phone": owner_phone, "name": "不该写入", "community": "不该写入", "status": 5,
    })
    assert_phone_taken(status, body)
    assert await stored(db, other) == before == full_row(other, other_phone, other_backup)
    owner_row = await stored(db, owner)
    assert owner_row is not None and owner_row["phone"] == owner_phone


async def test_phone_taken_by_another_customer_is_409_for_a_new_user_and_creates_nothing(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    _, owner_phone, _, _ = await create_full(http, api)
    newcomer = unique_user("newcomer")
    status, body = await post(http, api, {"userId": newcomer, "phone": owner_phone, "name": "不该写入"})
    assert_phone_taken(status, body)
    assert await stored(db, newcomer) is None
    # The refused newcomer can still be created afterwards with a phone of its own.
    status, body = await post(http, api, {"userId": newcomer, "phone": unique_phone(), "name": "新人"})
    assert status == 201, body


async def test_own_phone_resent_is_not_a_conflict(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user, phone, _, customer_id = await create_full(http, api)
    status, body = await post(http, api, {"userId": user, "phone": phone, "name": "张三三"})
    assert status == 200, body
    assert body["data"]["id"] == customer_id


async def test_released_phone_can_be_taken_by_another_customer(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user, phone, _, _ = await create_full(http, api)
    assert (await post(http, api, {"userId": user, "phone": unique_phone()}))[0] == 200
    other = unique_user("taker")
    status, body = await post(http, api, {"userId": other, "phone": phone})
    assert status == 201, body


async def test_backup_phone_is_not_unique(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    _, owner_phone, owner_backup, _ = await create_full(http, api)
    same_backup, backup_is_main = unique_user("backup"), unique_user("backup")
    status, body = await post(http, api, {"userId": same_backup, "backup_phone": owner_backup})
    assert status == 201, body
    status, body = await post(http, api, {"userId": backup_is_main, "backup_phone": owner_phone})
    assert status == 201, body
    assert await db.fetchval("SELECT count(*) FROM customers WHERE backup_phone = $1", owner_backup) == 2
    assert await db.fetchval("SELECT backup_phone FROM customers WHERE user_id = $1", backup_is_main) == owner_phone


async def test_concurrent_claims_of_one_phone_by_different_users_give_one_owner(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    users, phone = [unique_user("claim") for _ in range(10)], unique_phone()
    answers = await asyncio.gather(*(post(http, api, {"userId": user, "phone": phone, "name": user}) for user in users))
    assert Counter(status for status, _ in answers) == Counter({201: 1, 409: 9}), answers
    for status, body in answers:
        if status == 409:
            assert_phone_taken(status, body)
    winner = next(user for user, (status, _) in zip(users, answers, strict=True) if status == 201)
    rows = await db.fetch("SELECT user_id, phone, name FROM customers WHERE user_id = ANY($1::text[])", users)
    assert [(row["user_id"], row["phone"], row["name"]) for row in rows] == [(winner, phone, winner)]


# ---- idempotent concurrent creates ------------------------------------------------------------------


async def test_30_concurrent_first_requests_create_exactly_one_customer(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user, phone = unique_user("burst30"), unique_phone()
    answers = await asyncio.gather(*(
        post(http, api, {"userId": user, "phone": phone, "nickname": f"n{i}"}) for i in range(30)
    ))
    statuses = Counter(status for status, _ in answers)
    assert statuses == Counter({201: 1, 200: 29}), answers
    ids = {body["data"]["id"] for _, body in answers}
    assert len(ids) == 1, ids
    rows = await db.fetch("SELECT id, phone FROM customers WHERE user_id = $1", user)
    assert [(row["id"], row["phone"]) for row in rows] == [(ids.pop(), phone)]
    created = [body for status, body in answers if status == 201]
    assert created[0]["data"]["action"] == "created" and created[0]["message"] == "新客户创建成功"
    assert all(body["message"] == "客户信息已更新" for status, body in answers if status == 200)


# ---- concurrent partial updates ---------------------------------------------------------------------


async def test_concurrent_partial_updates_of_different_fields_all_survive(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    users = [unique_user("partial") for _ in range(10)]
    created = await asyncio.gather(*(post(http, api, {"userId": user}) for user in users))
    assert [status for status, _ in created] == [201] * len(users), created
    wanted = {user: full_body(user, unique_phone(), unique_phone()) for user in users}
    # One request per (user, field), all at once: 170 requests each touching a single field.
    answers = await asyncio.gather(*(
        post(http, api, {"userId": user, field: wanted[user][field]}) for user in users for field in WIRE_FIELDS
    ))
    assert [status for status, _ in answers] == [200] * len(answers), [a for a in answers if a[0] != 200]
    for user in users:
        body = wanted[user]
        assert await stored(db, user) == full_row(user, body["phone"], body["backup_phone"])


# ---- sequential updates -----------------------------------------------------------------------------


async def test_sequential_updates_end_in_the_last_value(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user = unique_user("sequential")
    answers = []
    for i in range(25):
        body: dict[str, Any] = {"userId": user, "nickname": f"v{i}", "status": i % 5 + 1}
        if i % 2 == 0:
            body["community"] = f"c{i}"
        if i % 3 == 0:
            body["phone"] = unique_phone()
            last_phone = body["phone"]
        answers.append(await post(http, api, body))
    assert [status for status, _ in answers] == [201] + [200] * 24, answers
    assert len({body["data"]["id"] for _, body in answers}) == 1
    row = await stored(db, user)
    assert row is not None
    assert (row["nickname"], row["status"], row["community"], row["phone"]) == ("v24", 5, "c24", last_phone)


# ---- out-of-order delivery --------------------------------------------------------------------------


async def test_out_of_order_delivery_converges_to_the_newer_values(
    stack: Stack, amqp_url: str, db: asyncpg.Pool
) -> None:
    user = unique_user("ooo")
    older_stamp = time.time_ns() // 1000
    newer_stamp = older_stamp + 1_000
    newer = RequestEnvelope(
        request_id=uuid.uuid4().hex, stamp=newer_stamp, user_id=user,
        payload={"userId": user, "nickname": "新", "community": "新小区", "status": 4},
    )
    older = RequestEnvelope(
        request_id=uuid.uuid4().hex, stamp=older_stamp, user_id=user,
        payload={"userId": user, "nickname": "旧", "community": "旧小区", "status": 2, "name": "只在旧请求里"},
    )
    topology = Topology(stack.prefix, shard_count=8, queue_type="quorum")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.exchange, ensure=True)
        for envelope in (newer, older):  # the NEWER stamp is delivered first
            await exchange.publish(
                aio_pika.Message(encode_pack([envelope]), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=envelope.request_id),
                routing_key=topology.routing_key_for(user), mandatory=True,
            )
            # Wait for each to be applied so the delivery order really is newer-then-older.
            await processed_outcomes(db, [envelope.request_id])
    outcomes = await processed_outcomes(db, [newer.request_id, older.request_id])
    assert outcomes == {newer.request_id: "created", older.request_id: "updated"}
    row = await stored(db, user)
    assert row is not None
    # Fields both requests set keep the newer values; a field only the older one set is still applied.
    assert (row["nickname"], row["community"], row["status"], row["name"]) == ("新", "新小区", 4, "只在旧请求里")
    assert await db.fetchval("SELECT count(*) FROM customers WHERE user_id = $1", user) == 1
