"""The spec's three business scenarios, in order, through HTTP against the running gateway and worker.

Each answer is checked whole, and the stored row column by column. userIds and phones are made unique
(the database is shared by the whole run); scenario 3 still reuses scenario 1's *backup* phone as its main
phone, which must succeed because only the main phone is unique.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests import spec_examples
from tests.helpers import fetch_customer, post
from tests.support import unique_phone, unique_user

BUSINESS_COLUMNS = (
    "user_id", "bot_id", "nickname", "name", "phone", "backup_phone", "wechat", "status", "community",
    "business_type", "room_type", "room_tags", "move_in_date", "lease_period", "price_range", "source_channel",
    "creator", "internal_notes",
)


@dataclass(frozen=True)
class Scenario:
    user_1: str  # agent_user_12345 of the spec
    user_2: str  # agent_user_67890 of the spec
    phone: str  # 13800138000
    backup_phone: str  # 13900139000
    new_phone: str  # 13800138001


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario(unique_user("agent_user"), unique_user("agent_user"), unique_phone(), unique_phone(),
                    unique_phone())


def scenario_1_body(s: Scenario) -> dict[str, Any]:
    return spec_examples.scenario_1_body(s.user_1, s.phone, s.backup_phone)


def scenario_1_row(s: Scenario) -> dict[str, Any]:
    return {
        "user_id": s.user_1,
        "bot_id": "bot_001",
        "nickname": "小张",
        "name": "张三",
        "phone": s.phone,
        "backup_phone": s.backup_phone,
        "wechat": "zhangsan123",
        "status": 1,
        "community": "万科城",
        "business_type": "whole_rent",
        "room_type": "two_bedroom",
        "room_tags": ["loft", "two_bath"],
        "move_in_date": dt.date(2024, 9, 1),
        "lease_period": 12,
        "price_range": "5000-8000",
        "source_channel": "referral",
        "creator": "外部Agent系统",
        "internal_notes": "来自Agent系统推送",
    }


@dataclass(frozen=True)
class Created:
    status: int
    body: dict[str, Any]


@pytest.fixture(scope="module")
async def scenario_1(scenario: Scenario, http: aiohttp.ClientSession, api: str) -> Created:
    """Scenario 1 posted once; the later scenarios build on it."""
    status, body = await post(http, api, scenario_1_body(scenario))
    return Created(status, body)


async def stored_row(db: asyncpg.Pool, user_id: str) -> dict[str, Any]:
    """The business columns of the stored customer; room_tags decoded after checking it is a jsonb array."""
    row = await fetch_customer(db, user_id)
    assert row is not None, f"no row for {user_id}"
    kind = await db.fetchval("SELECT jsonb_typeof(room_tags) FROM customers WHERE user_id = $1", user_id)
    if row["room_tags"] is None:
        assert kind is None
    else:
        assert kind == "array", kind  # stored as a jsonb array, not as a jsonb string holding JSON
        row["room_tags"] = orjson.loads(row["room_tags"])
    return {column: row[column] for column in BUSINESS_COLUMNS}


def updated_body(customer_id: int, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The spec's update answer; ``"action": "updated"`` is allowed on top of it."""
    data: dict[str, Any] = {"id": customer_id, "userId": user_id}
    if "action" in body.get("data", {}):
        data["action"] = "updated"
    return {"success": True, "data": data, "message": "客户信息已更新"}


async def test_scenario_1_create_new_customer_with_full_data(
    scenario: Scenario, scenario_1: Created, db: asyncpg.Pool
) -> None:
    assert scenario_1.status == 201, scenario_1.body
    customer_id = scenario_1.body["data"]["id"]
    assert isinstance(customer_id, int) and not isinstance(customer_id, bool)
    assert scenario_1.body == {
        "success": True,
        "data": {"id": customer_id, "userId": scenario.user_1, "action": "created"},
        "message": "新客户创建成功",
    }
    row = await fetch_customer(db, scenario.user_1)
    assert row is not None and row["id"] == customer_id
    assert await stored_row(db, scenario.user_1) == scenario_1_row(scenario)
    assert isinstance(row["move_in_date"], dt.date)
    assert row["created_at"] is not None and row["updated_at"] is not None


async def test_scenario_2_update_existing_customer_with_partial_data(
    scenario: Scenario, scenario_1: Created, http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    assert scenario_1.status == 201, scenario_1.body
    customer_id = scenario_1.body["data"]["id"]
    status, body = await post(http, api, {
        "userId": scenario.user_1,
        "nickname": "张三丰",
        "phone": scenario.new_phone,
        "community": "万科城二期",
        "business_type": "shared_rent",
        "price_range": "6000-9000",
    })
    assert status == 200, body
    assert body == updated_body(customer_id, scenario.user_1, body)
    # Only the five sent fields changed; everything else is scenario 1's data.
    assert await stored_row(db, scenario.user_1) == {
        **scenario_1_row(scenario),
        "nickname": "张三丰",
        "phone": scenario.new_phone,
        "community": "万科城二期",
        "business_type": "shared_rent",
        "price_range": "6000-9000",
    }
    assert await db.fetchval("SELECT count(*) FROM customers WHERE user_id = $1", scenario.user_1) == 1
    assert await db.fetchval("SELECT id FROM customers WHERE user_id = $1", scenario.user_1) == customer_id


async def test_scenario_3_minimal_create_reusing_a_backup_phone_as_main_phone(
    scenario: Scenario, scenario_1: Created, http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    assert scenario_1.status == 201, scenario_1.body
    status, body = await post(http, api, {"userId": scenario.user_2, "name": "李四", "phone": scenario.backup_phone})
    assert status == 201, body
    customer_id = body["data"]["id"]
    assert isinstance(customer_id, int) and customer_id != scenario_1.body["data"]["id"]
    assert body == {
        "success": True,
        "data": {"id": customer_id, "userId": scenario.user_2, "action": "created"},
        "message": "新客户创建成功",
    }
    # The spec's defaults fill what was not sent; everything else stays empty.
    assert await stored_row(db, scenario.user_2) == {
        **dict.fromkeys(BUSINESS_COLUMNS),
        "user_id": scenario.user_2,
        "name": "李四",
        "phone": scenario.backup_phone,
        "status": 1,
        "business_type": "whole_rent",
        "room_type": "one_bedroom",
        "source_channel": "referral",
        "creator": "外部系统",
    }
    # Scenario 1's customer still has that number as its backup phone.
    first = await fetch_customer(db, scenario.user_1)
    assert first is not None and first["backup_phone"] == scenario.backup_phone
