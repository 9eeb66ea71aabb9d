"""Fixtures: one isolated database and vhost per test run, and a running gateway + worker against them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

import tests.hypothesis_profiles  # noqa: F401 - registers the profiles before --hypothesis-profile loads one
from bench.stack import rabbitmqctl, with_database, with_vhost
from shared.migrate import migrate
from tests.poison import FAST_RETRIES, PoisonTrigger
from tests.support import (
    ADMIN_AMQP_URL,
    ADMIN_DATABASE_URL,
    RUN_ID,
    Gateway,
    Stack,
    have_rabbitmqctl,
)

TEST_DATABASE = f"crm_test_{RUN_ID}"
TEST_VHOST = f"crm_test_{RUN_ID}"


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A database of its own for this run, migrated, dropped at the end."""
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{TEST_DATABASE}"')
    await admin.close()
    url = with_database(ADMIN_DATABASE_URL, TEST_DATABASE)
    await migrate(url)
    yield url
    admin = await _connect_with_retry(ADMIN_DATABASE_URL)
    await admin.execute(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')
    await admin.close()


async def _connect_with_retry(url: str, attempts: int = 60) -> asyncpg.Connection:
    for _ in range(attempts - 1):
        try:
            return await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(1)
    return await asyncpg.connect(url)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ vhost of its own for this run (falls back to the given vhost plus a name prefix)."""
    if not have_rabbitmqctl():
        yield ADMIN_AMQP_URL
        return
    rabbitmqctl("add_vhost", TEST_VHOST)
    rabbitmqctl("set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*")
    yield with_vhost(ADMIN_AMQP_URL, TEST_VHOST)
    with contextlib.suppress(Exception):
        rabbitmqctl("delete_vhost", TEST_VHOST)


@pytest.fixture(scope="session")
def stack(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The system as users run it: one gateway and one worker process (shared by the core tests)."""
    stack = Stack(database_url, amqp_url, prefix=f"core{RUN_ID}", log_dir=tmp_path_factory.mktemp("core"))
    stack.start_worker()
    stack.start_gateway()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def gateway(stack: Stack) -> Gateway:
    return next(p for p in stack.procs if isinstance(p, Gateway))


@pytest.fixture(scope="session")
def api(gateway: Gateway) -> str:
    return f"{gateway.url}/api/external/customers"


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def make_stack(
    database_url: str, amqp_url: str, tmp_path: Path
) -> Iterator[Callable[..., Stack]]:
    """Build extra stacks with their own queue prefix (for tests that kill or restart processes)."""
    stacks: list[Stack] = []

    def build(**overrides: Any) -> Stack:
        prefix = f"s{RUN_ID}x{len(stacks)}{tmp_path.name[-6:]}".replace("-", "").replace("_", "")
        stack = Stack(database_url, amqp_url, prefix=prefix, log_dir=tmp_path, **overrides)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop()


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None, *, raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST JSON (or raw bytes) and return (status, decoded JSON body)."""
    if raw is not None:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with http.post(url, data=raw, headers=hdrs) as response:
            return response.status, await response.json(content_type=None)
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def fetch_customer(db: asyncpg.Pool, user_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT * FROM customers WHERE user_id = $1", user_id)
    return dict(row) if row is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fault tests stop and restart the shared broker and database: run them after everything else."""
    items.sort(key=lambda item: item.get_closest_marker("fault") is not None)


@pytest.fixture
async def poison(db: asyncpg.Pool) -> AsyncIterator[PoisonTrigger]:
    """A trigger refusing the userIds ``poison.user()`` makes; dropped afterwards."""
    trigger = PoisonTrigger(db)
    await trigger.create()
    try:
        yield trigger
    finally:
        await trigger.drop()


@pytest.fixture
def poison_stack(make_stack: Callable[..., Stack]) -> Stack:
    """One worker and one gateway with small retry delays (a poison request dies within a second)."""
    stack = make_stack(**FAST_RETRIES)
    stack.start_worker()
    stack.start_gateway()
    return stack
