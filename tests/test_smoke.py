"""Smoke: the spec's first scenario through the running system."""

from __future__ import annotations

import aiohttp
import asyncpg

from tests.helpers import fetch_customer, post
from tests.support import unique_phone, unique_user


async def test_create_then_update_smoke(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user = unique_user()
    status, body = await post(http, api, {"userId": user, "phone": unique_phone(), "name": "张三"})
    assert status == 201, body
    assert body["data"]["action"] == "created"
    status, again = await post(http, api, {"userId": user, "nickname": "小张"})
    assert status == 200, again
    assert again["data"]["id"] == body["data"]["id"]
    row = await fetch_customer(db, user)
    assert row is not None and row["name"] == "张三" and row["nickname"] == "小张"
