"""The four entry points as an operator meets them: ``--help``, start-up failures, ``worker --check``, topology.

Every process runs as a subprocess against the real PostgreSQL and RabbitMQ, with its own database (a fresh
empty one where "nothing was created" is the point) and its own queue prefix in the run's vhost; what a test
declares or creates is removed by its fixture.

The rule under test, for every entry point: ``--help`` prints usage, every environment variable and the exit
codes, and starts nothing; a start-up failure exits 1 with exactly one ``error:`` line naming what is wrong,
no traceback, no password.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity
from pydantic import ValidationError

from bench.stack import free_port, with_database, with_vhost
from shared.cli import describe_amqp_error, describe_settings_error, settings_help
from shared.masking import mask_url
from shared.settings import READ_BY, Settings
from shared.topology import Topology
from tests.support import ADMIN_AMQP_URL, ADMIN_DATABASE_URL, ROOT, RUN_ID, Stack

ENTRY_POINTS = ["gateway", "worker", "shared.migrate", "worker.replay"]
# The command each entry point runs with when started (the replay tool needs a sub-command).
STARTS = {"gateway": ("gateway",), "worker": ("worker",), "shared.migrate": ("shared.migrate",),
          "worker.replay": ("worker.replay", "list")}
SECRET = "s3cretPW"
REFUSED_AMQP = f"amqp://guest:{SECRET}@127.0.0.1:1/"
REFUSED_DATABASE = f"postgresql://postgres:{SECRET}@127.0.0.1:1/crm"
_names = itertools.count(1)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


async def run(*args: str, env: dict[str, str], limit: float = 60) -> Run:
    """``python -m ARGS`` with exactly ``env`` (plus PATH); killed if it outlives ``limit`` seconds."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(limit):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()  # a process that should have stopped never outlives its test
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started)


def assert_one_line_failure(result: Run, *expected: str) -> None:
    """Exit 1, one ``error:`` line on stderr containing every ``expected`` text, no traceback, no password."""
    assert result.code == 1, result
    assert len(result.error_lines) == 1, result
    line = result.error_lines[0]
    assert line.startswith("error: "), result
    for text in expected:
        assert text in line, (text, result)
    assert "Traceback" not in result.stdout + result.stderr, result
    assert SECRET not in result.stdout + result.stderr, result


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"ep{RUN_ID}n{next(_names)}"


@pytest.fixture
def env(database_url: str, amqp_url: str, prefix: str) -> dict[str, str]:
    """A working environment: the run's migrated database, its vhost, a queue prefix of this test's own."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": database_url,
        "AMQP_URL": amqp_url,
        "AMQP_PREFIX": prefix,
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "SHARD_COUNT": "2",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
async def cleanup_prefix(amqp_url: str, prefix: str) -> AsyncIterator[None]:
    """Delete every exchange and queue this test's prefix may have declared (up to 8 shards)."""
    yield
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for shard in range(8):
            await channel.queue_delete(f"{prefix}.shard.{shard}")
        await channel.queue_delete(f"{prefix}.dead")
        for exchange in ("requests", "topology"):
            await channel.exchange_delete(f"{prefix}.{exchange}")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung server, a black-holed route)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


async def user_tables(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                                "'information_schema')")
    finally:
        await conn.close()
    return [row["tablename"] for row in rows]


async def exchange_exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.get_exchange(name, ensure=True)
        except ChannelNotFoundEntity:
            return False
        return True


# ---- --help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ENTRY_POINTS)
async def test_help_lists_the_settings_it_reads_and_exit_codes_and_starts_nothing(
    module: str, env: dict[str, str], empty_database: str, prefix: str, cleanup_prefix: None
) -> None:
    result = await run(module, "--help", env={**env, "DATABASE_URL": empty_database}, limit=30)

    assert result.code == 0, result
    assert result.stdout.startswith("usage: python -m " + module), result
    reads = READ_BY[module.removeprefix("shared.").removeprefix("worker.") if module != "worker" else "worker"]
    for name in Settings.model_fields:
        assert (f"\n  {name.upper()} " in result.stdout) == (name in reads), (name, result.stdout)
    assert "exit codes:" in result.stdout
    assert ":guest@" not in result.stdout  # the default AMQP_URL's password is masked
    assert await user_tables(empty_database) == []  # no migration applied
    assert not await exchange_exists(env["AMQP_URL"], f"{prefix}.requests")  # nothing declared


async def test_worker_help_documents_check(env: dict[str, str]) -> None:
    result = await run("worker", "--help", env=env, limit=30)

    assert result.code == 0, result
    assert "--check" in result.stdout


# ---- start-up failures: one line, exit 1 ------------------------------------------------------------


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("PORT", "70000", "invalid setting PORT: Input should be less than or equal to 65535"),
        ("SHARD_COUNT", "many", "invalid setting SHARD_COUNT:"),
        ("QUEUE_TYPE", "stream", "invalid setting QUEUE_TYPE:"),
        ("LOG_LEVEL", "bogus", "invalid setting LOG_LEVEL:"),
        ("PROCESSED_RETENTION_HOURS", "1", "IDEMPOTENCY_WINDOW_HOURS"),
    ],
    ids=["port", "shard-count", "queue-type", "log-level", "cross-field"],
)
async def test_invalid_setting_is_one_line(
    module: str, setting: str, value: str, expected: str, env: dict[str, str]
) -> None:
    result = await run(*STARTS[module], env={**env, setting: value}, limit=30)

    assert_one_line_failure(result, expected)


BROKER_USERS = ["gateway", "worker", "worker.replay"]


@pytest.mark.parametrize("module", BROKER_USERS)
async def test_unreachable_broker_is_one_line(module: str, env: dict[str, str], cleanup_prefix: None) -> None:
    result = await run(*STARTS[module], env={**env, "AMQP_URL": REFUSED_AMQP})

    assert_one_line_failure(result, "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/",
                            "connection refused")


@pytest.mark.parametrize("module", BROKER_USERS)
async def test_missing_vhost_is_named(module: str, env: dict[str, str]) -> None:
    missing = f"nope_{RUN_ID}"
    result = await run(*STARTS[module], env={**env, "AMQP_URL": with_vhost(ADMIN_AMQP_URL, missing)})

    assert_one_line_failure(result, f'vhost "{missing}" does not exist or access refused')
    assert "Connection.OpenOk" not in result.stderr


@pytest.mark.parametrize("module", BROKER_USERS)
async def test_wrong_broker_credentials_are_named(module: str, env: dict[str, str]) -> None:
    admin = urllib.parse.urlsplit(ADMIN_AMQP_URL)
    netloc = f"nobody{RUN_ID}:{SECRET}@{admin.hostname}:{admin.port or 5672}"
    wrong = urllib.parse.urlunsplit(admin._replace(netloc=netloc))
    result = await run(*STARTS[module], env={**env, "AMQP_URL": wrong})

    assert_one_line_failure(result, "cannot connect to RabbitMQ", "authentication failed")


@pytest.mark.parametrize("module", ["worker", "shared.migrate"])
async def test_unreachable_database_is_one_line(module: str, env: dict[str, str], cleanup_prefix: None) -> None:
    result = await run(*STARTS[module], env={**env, "DATABASE_URL": REFUSED_DATABASE})

    assert_one_line_failure(result, "cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:1/crm",
                            "connection refused")


@pytest.mark.parametrize("module", ["worker", "shared.migrate"])
async def test_missing_database_is_named(module: str, env: dict[str, str], cleanup_prefix: None) -> None:
    missing = f"crm_missing_{RUN_ID}"
    result = await run(*STARTS[module], env={**env, "DATABASE_URL": with_database(ADMIN_DATABASE_URL, missing)})

    assert_one_line_failure(result, f'database "{missing}" does not exist')


async def test_gateway_port_taken_is_one_line(env: dict[str, str], cleanup_prefix: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = await run("gateway", env={**env, "PORT": str(port)})

    assert_one_line_failure(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


async def test_worker_without_schema_says_to_migrate(
    env: dict[str, str], empty_database: str, cleanup_prefix: None
) -> None:
    result = await run("worker", env={**env, "DATABASE_URL": empty_database, "MIGRATE_ON_START": "false"})

    assert_one_line_failure(result, "customers", "python -m shared.migrate")


# ---- worker --check ---------------------------------------------------------------------------------


async def test_worker_check_passes_when_broker_and_database_answer(
    env: dict[str, str], prefix: str, cleanup_prefix: None
) -> None:
    result = await run("worker", "--check", env=env, limit=30)

    assert result.code == 0, result
    assert result.stderr == "", result
    assert not await exchange_exists(env["AMQP_URL"], f"{prefix}.topology")  # a probe declares nothing


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("DATABASE_URL", REFUSED_DATABASE, "PostgreSQL"),
        ("AMQP_URL", REFUSED_AMQP, "RabbitMQ"),
    ],
    ids=["database-down", "broker-down"],
)
async def test_worker_check_fails_in_one_line(setting: str, value: str, expected: str, env: dict[str, str]) -> None:
    result = await run("worker", "--check", env={**env, setting: value}, limit=30)

    assert_one_line_failure(result, expected)


async def test_worker_check_fails_without_the_customers_table(env: dict[str, str], empty_database: str) -> None:
    result = await run("worker", "--check", env={**env, "DATABASE_URL": empty_database}, limit=30)

    assert_one_line_failure(result, "customers")
    assert await user_tables(empty_database) == []  # --check never migrates


@pytest.mark.parametrize("setting", ["DATABASE_URL", "AMQP_URL"])
async def test_worker_check_gives_up_on_a_silent_server_within_seconds(
    setting: str, env: dict[str, str], silent_port: int
) -> None:
    silent = {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{silent_port}/crm",
              "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{silent_port}/"}[setting]
    result = await run("worker", "--check", env={**env, setting: silent}, limit=30)

    assert_one_line_failure(result, "no answer within 5 s")
    assert result.seconds < 15, result


# ---- topology mismatch ------------------------------------------------------------------------------


def exit_code_of(proc: Any, timeout: float = 30) -> int:
    code: int = proc.popen.wait(timeout=timeout)  # a process that refuses to start exits at once
    return code


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def own_stack(database_url: str, amqp_url: str, prefix: str, tmp_path: Any, cleanup_prefix: None) -> Iterator[Stack]:
    """Gateways and workers on this test's prefix, stopped before the prefix is cleaned up."""
    stack = Stack(database_url, amqp_url, prefix=prefix, log_dir=tmp_path)
    yield stack
    stack.stop()


async def test_worker_with_more_shards_than_the_gateway_refuses_to_start(own_stack: Stack) -> None:
    own_stack.start_gateway(SHARD_COUNT=2)

    worker = own_stack.start_worker(wait=False, SHARD_COUNT=3)

    assert exit_code_of(worker) == 1
    line = error_line(worker.output())
    assert "topology mismatch" in line
    assert "SHARD_COUNT=3" in line and "SHARD_COUNT=2" in line


async def test_worker_with_fewer_shards_than_the_gateway_refuses_to_start(own_stack: Stack) -> None:
    own_stack.start_gateway(SHARD_COUNT=3)

    worker = own_stack.start_worker(wait=False, SHARD_COUNT=2)

    assert exit_code_of(worker) == 1
    line = error_line(worker.output())
    assert f"{own_stack.prefix}.shard.2 exists" in line and "SHARD_COUNT=2" in line


async def test_gateway_with_another_queue_type_refuses_to_start(own_stack: Stack) -> None:
    own_stack.start_worker(SHARD_COUNT=2, QUEUE_TYPE="quorum")

    gateway = own_stack.start_gateway(wait=False, SHARD_COUNT=2, QUEUE_TYPE="classic")

    assert exit_code_of(gateway) == 1
    line = error_line(gateway.output())
    assert "QUEUE_TYPE=classic" in line and "QUEUE_TYPE=quorum" in line  # the marker names both


async def test_a_refused_start_leaves_the_broker_as_it_found_it(own_stack: Stack, amqp_url: str) -> None:
    """A check must not change what it checks: a worker with one shard too many declares nothing, so every
    correctly configured process still starts afterwards."""
    own_stack.start_gateway(SHARD_COUNT=2)

    refused = own_stack.start_worker(wait=False, SHARD_COUNT=3)
    assert exit_code_of(refused) == 1

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(f"{own_stack.prefix}.shard.2", passive=True)
    worker = own_stack.start_worker(SHARD_COUNT=2)
    assert worker.alive()


async def test_shard_queue_of_another_type_is_named_even_without_the_marker(own_stack: Stack, amqp_url: str) -> None:
    """A deployment from before the marker: its queues alone tell the type."""
    old = Topology(own_stack.prefix, shard_count=2, queue_type="classic")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(old.shard_queue(0), durable=True, arguments=old.shard_arguments)

    worker = own_stack.start_worker(wait=False, SHARD_COUNT=2, QUEUE_TYPE="quorum")

    assert exit_code_of(worker) == 1
    line = error_line(worker.output())
    assert f"queue {own_stack.prefix}.shard.0 exists on RabbitMQ with x-queue-type classic" in line
    assert not await exchange_exists(amqp_url, f"{own_stack.prefix}.topology")  # no marker with the wrong type


async def test_deployment_without_the_marker_keeps_working_and_gets_one(own_stack: Stack, amqp_url: str) -> None:
    old = Topology(own_stack.prefix, shard_count=2, queue_type="quorum")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await old.declare_exchange(channel)
        for shard in range(2):  # what a process of the previous version declared
            queue = await channel.declare_queue(old.shard_queue(shard), durable=True, arguments=old.shard_arguments)
            await queue.bind(exchange, old.routing_key(shard))

    own_stack.start_worker(SHARD_COUNT=2)
    own_stack.start_gateway(SHARD_COUNT=2)

    assert await exchange_exists(amqp_url, f"{own_stack.prefix}.topology")
    late = own_stack.start_worker(wait=False, SHARD_COUNT=4)
    assert exit_code_of(late) == 1
    assert "SHARD_COUNT=2" in error_line(late.output())


# ---- the pure parts of shared.cli -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("postgresql://crm:p%40ss@db:5432/crm?sslmode=require", "postgresql://crm:***@db:5432/crm?sslmode=require"),
        ("postgresql://crm@db/crm?password=hunter2", "postgresql://crm@db/crm?password=***"),
        ("amqp://mq/", "amqp://mq/"),
    ],
)
def test_mask_url_hides_passwords_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_invalid_settings_become_one_named_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "0")
    with pytest.raises(ValidationError) as caught:
        Settings()

    assert describe_settings_error(caught.value) == "invalid setting PORT: Input should be greater than or equal to 1"


@pytest.mark.parametrize("entry_point", sorted(READ_BY))
def test_help_lists_exactly_the_settings_its_entry_point_reads(entry_point: str) -> None:
    text = settings_help(entry_point)

    listed = [line.split()[0] for line in text.splitlines()[1:]]
    assert listed == [name.upper() for name in Settings.model_fields if name in READ_BY[entry_point]]


def test_every_setting_is_read_by_some_entry_point_and_described() -> None:
    read = {name for names in READ_BY.values() for name in names}
    assert read == set(Settings.model_fields)
    assert set(READ_BY["gateway"]).isdisjoint({"worker_prefetch", "db_pool_size", "metrics_port", "db_role_prefix"})
    assert "rate_limit" not in READ_BY["migrate"]
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description
                    and name not in {"database_url", "host", "port", "amqp_prefix", "shard_count", "queue_type",
                                     "migrate_on_start", "log_level", "log_format"}]
    assert undocumented == []


def test_missing_vhost_error_is_translated() -> None:
    frame_error = aio_pika.exceptions.InvalidFrameError(
        "Expected one of ['Connection.OpenOk'], got <Connection.Close object at 0x7f2066>")

    assert describe_amqp_error(frame_error, "amqp://u:pw@mq:5672/sales%2Fcn") == (
        'cannot connect to RabbitMQ at amqp://u:***@mq:5672/sales%2Fcn: vhost "sales/cn" does not exist or '
        "access refused")
