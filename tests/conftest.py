"""Fixtures only: one isolated database and vhost per test run, and a running gateway + worker against them.

Helpers (HTTP, database, assertions, waiting) are in ``tests/helpers.py``; import them from there.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

import tests.hypothesis_profiles  # noqa: F401 - registers the profiles before --hypothesis-profile loads one
from bench.stack import rabbitmqctl, with_vhost

# Re-exported for the test files that still import them from here (being written elsewhere); no fixture uses them.
from tests.helpers import fetch_customer as fetch_customer
from tests.helpers import post as post
from tests.poison import FAST_RETRIES, PoisonTrigger
from tests.support import (
    ADMIN_AMQP_URL,
    RUN_ID,
    Gateway,
    Stack,
    create_database,
    drop_database,
    have_rabbitmqctl,
)

TEST_DATABASE = f"crm_test_{RUN_ID}"
TEST_VHOST = f"crm_test_{RUN_ID}"
_empty_databases = itertools.count(1)


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A database of its own for this run, migrated, dropped at the end."""
    yield await create_database(TEST_DATABASE)
    await drop_database(TEST_DATABASE)


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A database of the test's own with nothing in it (not migrated), dropped afterwards even when the test fails."""
    name = f"crm_empty_{RUN_ID}_{next(_empty_databases)}"
    url = await create_database(name, migrated=False)
    try:
        yield url
    finally:
        await drop_database(name)


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
    return stack.gateway()


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
