"""Faults really caused against the real services: kill -9, SIGTERM, broker stop, database stop.

Promise under test: once the gateway answered 2xx or 202, the request is applied exactly once in effect,
and the answers tell the truth. These tests stop shared services, so they run last (see conftest).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest

from tests.faults import postgres_down, rabbit_down
from tests.helpers import assert_error_shape, eventually, post
from tests.support import Stack, unique_phone, unique_user

pytestmark = [
    pytest.mark.fault,
    # The services must be this machine's own (stopped and started with their CLI), not containers.
    pytest.mark.skipif(
        not (shutil.which("rabbitmqctl") and shutil.which("pg_ctlcluster")),
        reason="needs local rabbitmqctl and pg_ctlcluster to stop and start the services",
    ),
]

ACCEPTED = {200, 201, 202}


class Progress:
    """Counts answers; ``reached`` is set once a given share of all requests has been answered."""

    def __init__(self, total: int, share: float) -> None:
        self.threshold = int(total * share)
        self.answered = 0
        self.reached = asyncio.Event()

    def tick(self) -> None:
        self.answered += 1
        if self.answered >= self.threshold:
            self.reached.set()


async def run_clients(
    url: str, users: list[str], per_user: int, connections: int = 100, progress: Progress | None = None
) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Each user is one client sending ``per_user`` requests in sequence (waiting for each answer)."""
    answers: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def client(user: str) -> None:
            phone = unique_phone()
            for i in range(per_user):
                body: dict[str, Any] = {"userId": user, "nickname": f"v{i}"}
                if i == 0:
                    body["phone"] = phone
                answers[user].append(await post(http, url, body))
                if progress is not None:
                    progress.tick()

        await asyncio.gather(*(client(user) for user in users))
    return answers


async def all_rows_hold(db: asyncpg.Pool, users: list[str], value: str) -> bool:
    """True once every user's row exists with ``nickname == value``."""
    count: int = await db.fetchval(
        "SELECT count(*) FROM customers WHERE user_id = ANY($1) AND nickname = $2", users, value
    )
    return count == len(users)


async def dead_letter_count(stack: Stack) -> int:
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{stack.prefix}.dead", passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)


async def queued_messages(stack: Stack) -> int:
    """Messages waiting in the stack's shard queues (read from the queues' declarations; nothing consumed)."""
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        total = 0
        for shard in range(8):
            queue = await channel.declare_queue(f"{stack.prefix}.shard.{shard}", passive=True)
            total += int(queue.declaration_result.message_count or 0)
        return total


def assert_truthful_answers(answers: dict[str, list[tuple[int, dict[str, Any]]]]) -> None:
    for user, replies in answers.items():
        statuses = [status for status, _ in replies]
        assert set(statuses) <= ACCEPTED, (user, replies)
        assert statuses.count(201) <= 1, (user, statuses)
        if 202 not in statuses:
            assert statuses[0] == 201 and statuses.count(201) == 1, (user, statuses)
        ids = {body["data"]["id"] for status, body in replies if status in (200, 201)}
        assert len(ids) <= 1, (user, ids)


async def test_worker_killed_mid_burst_loses_nothing(make_stack: Callable[..., Stack], db: asyncpg.Pool) -> None:
    stack = make_stack(RPC_TIMEOUT=5)
    victim = stack.start_worker()
    stack.start_worker()
    gateway = stack.start_gateway()
    users = [unique_user("kill") for _ in range(200)]
    per_user = 25
    progress = Progress(len(users) * per_user, share=0.3)

    async def kill_then_replace() -> int:
        await progress.reached.wait()  # mid-burst: 30 % answered, the rest in flight or still to come
        victim.kill()
        answered_at_kill = progress.answered
        await asyncio.to_thread(stack.start_worker)
        return answered_at_kill

    answers, answered_at_kill = await asyncio.gather(
        run_clients(f"{gateway.url}/api/external/customers", users, per_user, progress=progress),
        kill_then_replace(),
    )
    assert not victim.alive()
    assert answered_at_kill < len(users) * per_user * 0.9, "the kill came too late to be mid-burst"
    assert_truthful_answers(answers)
    await eventually(lambda: all_rows_hold(db, users, f"v{per_user - 1}"), within=60, what="every row's last value")
    applied = await db.fetchval("SELECT count(*) FROM processed_requests WHERE user_id = ANY($1)", users)
    assert applied == len(users) * per_user  # every request applied exactly once
    assert await db.fetchval("SELECT count(*) FROM customers WHERE user_id = ANY($1)", users) == len(users)


async def test_worker_sigterm_drains_in_flight_and_exits(
    make_stack: Callable[..., Stack], db: asyncpg.Pool
) -> None:
    stack = make_stack(SHUTDOWN_DEADLINE=20, RPC_TIMEOUT=5)
    worker = stack.start_worker()
    gateway = stack.start_gateway()
    users = [unique_user("term") for _ in range(150)]
    per_user = 25
    progress = Progress(len(users) * per_user, share=0.3)

    async def terminate_then_replace() -> int:
        await progress.reached.wait()  # mid-burst
        code = await asyncio.to_thread(worker.terminate, 60)
        await asyncio.to_thread(stack.start_worker)
        return code

    answers, exit_code = await asyncio.gather(
        run_clients(f"{gateway.url}/api/external/customers", users, per_user, progress=progress),
        terminate_then_replace(),
    )
    assert exit_code == 0, worker.output()
    log = worker.output()
    assert "worker stopped" in log and "drain deadline reached" not in log
    assert_truthful_answers(answers)
    await eventually(lambda: all_rows_hold(db, users, f"v{per_user - 1}"), within=60, what="every row's last value")
    applied = await db.fetchval("SELECT count(*) FROM processed_requests WHERE user_id = ANY($1)", users)
    assert applied == len(users) * per_user


async def test_gateway_sigterm_answers_in_flight_requests_then_exits(
    make_stack: Callable[..., Stack], db: asyncpg.Pool
) -> None:
    # One request per message, so that queued messages count requests in flight.
    stack = make_stack(RPC_TIMEOUT=3, SHUTDOWN_DEADLINE=10, MAX_PACK_SIZE=1)
    gateway = stack.start_gateway()  # no worker yet: requests wait for their reply until RPC_TIMEOUT
    users = [unique_user("gwterm") for _ in range(10)]
    async with aiohttp.ClientSession() as http:
        pending = [
            asyncio.create_task(post(http, f"{gateway.url}/api/external/customers", {"userId": u, "name": "x"}))
            for u in users
        ]
        # In flight = accepted by the broker and waiting for a reply: all 10 are in the shard queues.
        async def all_in_flight() -> bool:
            return await queued_messages(stack) == len(users)

        await eventually(all_in_flight, within=15, interval=0.1, what="every request in flight")
        exit_code_task = asyncio.create_task(asyncio.to_thread(gateway.terminate, 30))
        answers = await asyncio.gather(*pending)
        exit_code = await exit_code_task
    assert [status for status, _ in answers] == [202] * len(users), answers
    assert exit_code == 0, gateway.output()
    stack.start_worker()  # accepted means durable: a worker started later applies them all

    async def all_applied() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM customers WHERE user_id = ANY($1)", users) == len(users))

    await eventually(all_applied, within=30, what="every request applied")


async def test_broker_restart_gateway_503_then_everyone_reconnects(
    make_stack: Callable[..., Stack], db: asyncpg.Pool
) -> None:
    stack = make_stack()
    worker = stack.start_worker()
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        status, _ = await post(http, url, {"userId": unique_user("rmq"), "name": "before"})
        assert status == 201

        async with rabbit_down():

            async def gateway_sees_outage() -> bool:
                async with http.get(f"{gateway.url}/readyz") as response:
                    return response.status == 503

            await eventually(gateway_sees_outage, within=20, what="readyz 503")
            async with http.get(f"{gateway.url}/readyz") as response:
                readiness = await response.json()
            assert readiness["checks"]["broker"] == "down" and "broker" in readiness["failing"]
            async with http.get(f"{gateway.url}/healthz") as response:
                assert response.status == 200  # alive: a broker outage is no reason to restart the gateway
            started = time.monotonic()
            async with http.post(url, json={"userId": unique_user("rmq"), "name": "during"}) as response:
                body = await response.json()
                assert_error_shape(body, status=503, answered=response.status)
                assert response.headers.get("Retry-After", "").isdigit()
            assert time.monotonic() - started < 2.0  # at once, not after a timeout

        # Same processes, no restart: the gateway publishes again and the worker consumes again (201
        # needs the worker's reply).
        user = unique_user("rmq")

        async def request_succeeds() -> bool:
            status, _ = await post(http, url, {"userId": user, "name": "after"})
            return status in (200, 201)

        await eventually(request_succeeds, within=90, interval=1.0, what="a request succeeding after the restart")
        status, body = await post(http, url, {"userId": unique_user("rmq"), "name": "after2"})
        assert status == 201, body
    assert worker.alive() and gateway.alive()
    assert await db.fetchval("SELECT name FROM customers WHERE user_id = $1", user) == "after"


async def test_postgres_down_gateway_stays_ready_reports_database_degraded_and_reads_get_503(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    stack = make_stack(CLOCK_SYNC_INTERVAL="0.2")
    stack.start_worker()
    gateway = stack.start_gateway()
    user = unique_user("ro")
    assert (await post(http, f"{gateway.url}/api/external/customers", {"userId": user, "name": "x"}))[0] == 201
    async with postgres_down():

        async def database_degraded() -> bool:
            async with http.get(f"{gateway.url}/readyz") as response:
                body = await response.json()
                return response.status == 200 and body["checks"]["database"] == "degraded"

        # Ready all along: writes are still accepted.
        await eventually(database_degraded, within=20, what="readyz 200 with the database degraded")
        async with http.get(f"{gateway.url}/api/external/customers/{user}") as response:
            body = await response.json()
            assert_error_shape(body, status=503, answered=response.status)
            assert response.headers.get("Retry-After", "").isdigit()

    async def database_back() -> bool:
        async with http.get(f"{gateway.url}/readyz") as response:
            body = await response.json()
            return bool(body["checks"]["database"] == "ok")

    await eventually(database_back, within=30, what="readyz with the database ok")
    async with http.get(f"{gateway.url}/api/external/customers/{user}") as response:
        assert response.status == 200


async def test_postgres_down_requests_get_202_and_apply_in_order_when_it_returns(
    make_stack: Callable[..., Stack], database_url: str
) -> None:
    stack = make_stack(RPC_TIMEOUT=1.5)
    worker = stack.start_worker()
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers"
    user = unique_user("pg")
    request_ids = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        status, _ = await post(http, url, {"userId": user, "nickname": "start", "phone": unique_phone()})
        assert status == 201
        async with postgres_down():
            for i in range(5):
                status, body = await post(http, url, {"userId": user, "nickname": f"p{i}", "wechat": f"w{i}"})
                assert status == 202, body
                assert body["success"] is True and body["data"]["userId"] == user
                request_ids.append(body["data"]["requestId"])
            await asyncio.sleep(2)  # the worker keeps retrying meanwhile, never dead-letters

    async def applied() -> bool:
        try:
            conn = await asyncpg.connect(database_url)
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            done = await conn.fetchval(
                "SELECT count(*) FROM processed_requests WHERE request_id = ANY($1)", request_ids
            )
            return bool(done == len(request_ids))
        finally:
            await conn.close()

    await eventually(applied, within=90, interval=1.0, what="every request applied")
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT nickname, wechat FROM customers WHERE user_id = $1", user)
        outcomes = Counter(await conn.fetch(
            "SELECT outcome FROM processed_requests WHERE request_id = ANY($1)", request_ids))
    finally:
        await conn.close()
    assert row is not None and (row["nickname"], row["wechat"]) == ("p4", "w4")
    assert sum(outcomes.values()) == 5
    assert await dead_letter_count(stack) == 0
    assert worker.alive()
