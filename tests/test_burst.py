"""A burst: a few thousand requests over ~100 concurrent connections, every one answered and stored.

250 clients each send 12 requests in sequence (a create with a phone, then updates), all clients at once
over a connection pool of 100: 3000 requests, a mix of creates and updates. Each client waits for every
answer before sending its next request, so its last value must be what is stored.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import Any

import aiohttp
import asyncpg

from tests.helpers import eventually, post
from tests.support import unique_phone, unique_user

CLIENTS = 250
REQUESTS_PER_CLIENT = 12
CONNECTIONS = 100
TIME_BUDGET = 60.0  # seconds for the whole burst; it takes a few on a laptop


def request_body(user: str, phone: str, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": user, "nickname": f"v{i}", "status": i % 5 + 1}
    if i == 0:
        body.update(phone=phone, name="突发", room_tags='["burst"]')
    elif i % 4 == 0:
        body["community"] = f"c{i}"
    return body


async def rows_with_last_values(db: asyncpg.Pool, users: list[str]) -> int:
    last = REQUESTS_PER_CLIENT - 1
    last_community = max(i for i in range(1, REQUESTS_PER_CLIENT) if i % 4 == 0)
    count: int = await db.fetchval(
        """SELECT count(*) FROM customers
           WHERE user_id = ANY($1::text[]) AND nickname = $2 AND status = $3 AND community = $4
             AND name = '突发' AND room_tags = '["burst"]'::jsonb""",
        users, f"v{last}", last % 5 + 1, f"c{last_community}",
    )
    return count


async def test_burst_of_3000_requests_over_100_connections_all_answered_and_stored(
    api: str, db: asyncpg.Pool
) -> None:
    users = [unique_user("burst") for _ in range(CLIENTS)]
    phones = {user: unique_phone() for user in users}
    answers: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def client(user: str) -> None:
            for i in range(REQUESTS_PER_CLIENT):
                answers[user].append(await post(http, api, request_body(user, phones[user], i)))

        await asyncio.gather(*(client(user) for user in users))
    elapsed = time.monotonic() - started
    total = CLIENTS * REQUESTS_PER_CLIENT

    statuses = Counter(status for replies in answers.values() for status, _ in replies)
    assert sum(statuses.values()) == total
    assert set(statuses) <= {200, 201, 202}, statuses  # 202 only if the worker is slower than the RPC timeout
    for user, replies in answers.items():
        codes = [status for status, _ in replies]
        if 202 not in codes:
            assert codes == [201] + [200] * (REQUESTS_PER_CLIENT - 1), (user, replies)
            assert len({body["data"]["id"] for _, body in replies}) == 1, (user, replies)

    # Every user stored once, with its last values (poll briefly in case some answers were 202).
    async def all_stored() -> bool:
        return await rows_with_last_values(db, users) >= CLIENTS

    await eventually(all_stored, within=20, interval=0.2, what=f"{CLIENTS} rows with their last values")
    assert await rows_with_last_values(db, users) == CLIENTS
    assert await db.fetchval("SELECT count(*) FROM customers WHERE user_id = ANY($1::text[])", users) == CLIENTS
    assert elapsed < TIME_BUDGET, f"{total} requests took {elapsed:.1f}s"
    print(f"\nburst: {total} requests over {CONNECTIONS} connections in {elapsed:.1f}s "
          f"({total / elapsed:.0f} req/s); statuses {dict(statuses)}")


async def test_burst_of_concurrent_creates_gives_distinct_ids(api: str, db: asyncpg.Pool) -> None:
    """1000 different new users at once over 100 connections: 1000 created answers, 1000 rows, 1000 ids."""
    users = [unique_user("fresh") for _ in range(1000)]
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        answers = await asyncio.gather(*(
            post(http, api, {"userId": user, "phone": unique_phone()}) for user in users
        ))
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {201, 202}, statuses
    created = [body for status, body in answers if status == 201]
    assert all(body["data"]["action"] == "created" for body in created)
    ids = {body["data"]["id"] for body in created}
    assert len(ids) == len(created)

    async def all_stored() -> list[asyncpg.Record] | None:
        rows = await db.fetch("SELECT id, user_id FROM customers WHERE user_id = ANY($1::text[])", users)
        return rows if len(rows) >= len(users) else None

    rows = await eventually(all_stored, within=20, interval=0.2, what=f"{len(users)} rows")
    assert sorted(row["user_id"] for row in rows) == sorted(users)
    assert len({row["id"] for row in rows}) == len(users)
    assert ids <= {row["id"] for row in rows}
