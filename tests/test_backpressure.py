"""Backpressure, never silent loss: a full queue, a broker alarm and a flood get 503 + Retry-After at once.

Each cause is really produced: a shard queue bounded to a few messages with no worker running, RabbitMQ's
memory alarm (``rabbitmqctl set_vm_memory_high_watermark``, restored afterwards), MAX_IN_FLIGHT requests
held open. A request answered 503 was not accepted: it is not applied unless the client sends it again.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.helpers import applied_customer, assert_error_shape, eventually, fetch_customer, post
from tests.support import Stack, unique_user

QUEUE_FULL = "消息队列已满"
BLOCKED = "资源告警"
TOO_BUSY = "网关繁忙"


def assert_503(status: int, body: dict[str, Any], headers: Any, says: str) -> None:
    assert_error_shape(body, status=503, answered=status)
    assert says in body["error"], body
    assert headers.get("Retry-After", "").isdigit()


async def post_with_headers(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any], Any]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_a_full_shard_queue_refuses_with_503_and_applies_only_what_it_accepted(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    # One shard bounded to 3 messages, no worker: the queue fills up.
    stack = make_stack(SHARD_COUNT=1, QUEUE_MAX_LENGTH=3, RPC_TIMEOUT=0.3)
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers"
    users = [unique_user("full") for _ in range(12)]
    answers = {}
    for user in users:  # one at a time: one request per message
        answers[user] = await post_with_headers(http, url, {"userId": user, "name": "first try"})

    accepted = [user for user in users if answers[user][0] == 202]
    refused = [user for user in users if answers[user][0] == 503]
    assert accepted and refused and len(accepted) + len(refused) == len(users), {u: a[0] for u, a in answers.items()}
    assert len(accepted) <= 3 + 2  # quorum queues enforce the bound approximately (a message or two over)
    for user in refused:
        assert_503(*answers[user], says=QUEUE_FULL)

    stack.start_worker()
    for user in accepted:  # everything accepted is applied...
        assert (await applied_customer(db, user))["name"] == "first try"
    for user in refused:  # ...and nothing refused is, until the client sends it again
        assert await fetch_customer(db, user) is None
        status, body = await post(http, url, {"userId": user, "name": "retried"})
        assert status == 201, body
        row = await fetch_customer(db, user)
        assert row is not None and row["name"] == "retried"


async def test_past_max_in_flight_a_request_gets_503_at_once(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    stack = make_stack(MAX_IN_FLIGHT=3, RPC_TIMEOUT=3)  # no worker: requests wait RPC_TIMEOUT, then 202
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers"
    held = [asyncio.create_task(post(http, url, {"userId": unique_user("held")})) for _ in range(3)]
    await asyncio.sleep(1.0)  # the three are in flight
    started = time.monotonic()
    status, body, headers = await post_with_headers(http, url, {"userId": unique_user("over")})
    assert time.monotonic() - started < 1.0
    assert_503(status, body, headers, says=TOO_BUSY)
    async with http.get(f"{gateway.url}/healthz") as response:
        assert response.status == 200  # health is never refused
    assert [status for status, _ in await asyncio.gather(*held)] == [202, 202, 202]
    status, _ = await post(http, url, {"userId": unique_user("after")})
    assert status == 202  # below the cap again


# ---- broker alarm (changes the shared broker: a fault test, run last) ------------------------------------


def _watermark() -> str:
    out = subprocess.run(
        ["rabbitmqctl", "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    # 0.4, or {absolute, N} on brokers configured with an absolute limit
    match = re.fullmatch(r"\{absolute,\s*(\d+)\}", out)
    return match[1] if match else out


@pytest.fixture
def memory_alarm() -> Iterator[Callable[[], None]]:
    """Call it to raise RabbitMQ's memory alarm; the watermark is restored afterwards, whatever happens."""
    before = _watermark()
    absolute = not re.fullmatch(r"[0-9.]+", before) or float(before) > 1

    def raise_alarm() -> None:
        subprocess.run(["rabbitmqctl", "set_vm_memory_high_watermark", "0.0001"], check=True,
                       capture_output=True, timeout=60)

    yield raise_alarm
    restore = ["rabbitmqctl", "set_vm_memory_high_watermark", *(["absolute"] if absolute else []), before]
    subprocess.run(restore, check=True, capture_output=True, timeout=60)


@pytest.mark.fault
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs local rabbitmqctl to raise a memory alarm")
async def test_a_broker_memory_alarm_gets_503_at_once_and_recovers(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, memory_alarm: Callable[[], None]
) -> None:
    stack = make_stack()
    stack.start_worker()
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers"
    assert (await post(http, url, {"userId": unique_user("alarm")}))[0] == 201  # a publishing connection

    await asyncio.to_thread(memory_alarm)

    async def blocked() -> tuple[int, dict[str, Any]] | None:
        async with http.get(f"{gateway.url}/readyz") as response:
            readiness = await response.json()
        return (response.status, readiness) if readiness["checks"]["broker"] == "blocked" else None

    status, readiness = await eventually(blocked, within=30, interval=0.2, what="the gateway seeing connection.blocked")
    assert status == 503 and "broker" in readiness["failing"]
    started = time.monotonic()
    status, body, headers = await post_with_headers(http, url, {"userId": unique_user("alarm")})
    assert time.monotonic() - started < 1.0  # at once, not after PUBLISH_TIMEOUT
    assert_503(status, body, headers, says=BLOCKED)


@pytest.mark.fault
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs local rabbitmqctl to raise a memory alarm")
async def test_after_a_broker_alarm_clears_requests_are_accepted_again(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, memory_alarm: Callable[[], None],
    db: asyncpg.Pool,
) -> None:
    stack = make_stack()
    stack.start_worker()
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers"
    assert (await post(http, url, {"userId": unique_user("alarm")}))[0] == 201
    await asyncio.to_thread(memory_alarm)
    await asyncio.sleep(2)
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "set_vm_memory_high_watermark", "0.4"], check=True,
                            capture_output=True, timeout=60)
    user = unique_user("cleared")

    async def accepted() -> bool:
        status, body = await post(http, url, {"userId": user, "name": "after the alarm"})
        assert status in (200, 201, 503), body  # refused while blocked, never a 5xx of another kind
        return status in (200, 201)

    await eventually(accepted, within=60, interval=0.5, what="a request accepted after the alarm cleared")
    row = await fetch_customer(db, user)
    assert row is not None and row["name"] == "after the alarm"
