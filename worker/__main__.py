"""``python -m worker``: run one worker process until SIGTERM/SIGINT, then drain and exit.

``python -m worker --check`` is the health probe (compose healthcheck): it connects to PostgreSQL (and looks
for the ``customers`` table) and to RabbitMQ, each within ``CONNECT_TIMEOUT`` seconds, and exits 0, or 1 with
one line saying what is wrong. It changes nothing: no migration, no declaration.

A normal start runs the same two probes first, so that an unreachable or refusing dependency is named in
one line before ``Worker.start()`` (which opens the pool, migrates, checks the topology, consumes).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import asyncpg

from shared.brokers import connect_once
from shared.cli import (
    StartupError,
    describe_unexpected,
    entry_point_parser,
    load_settings_or_exit,
    quiet_amqp_logs,
    run_or_fail,
    starting,
)
from shared.logs import configure_logging
from shared.runtime import use_uvloop
from shared.settings import CONNECT_TIMEOUT, Settings
from worker.service import Worker

log = logging.getLogger("worker")

DESCRIPTION = """\
Consume the shard queues of RabbitMQ (AMQP_URL, AMQP_PREFIX) and apply the customer requests to
PostgreSQL (DATABASE_URL), replying to the gateway. Applies pending migrations first unless
MIGRATE_ON_START=false. Stops on SIGTERM/SIGINT: no new deliveries, in-flight work finished within
SHUTDOWN_DEADLINE seconds, the rest left to be redelivered."""

CHECK_NOTES = """\
--check: exit 0 when PostgreSQL (with the customers table) and RabbitMQ answer within 5 s, else 1 with
one line on stderr naming what is wrong. Nothing is changed."""


async def check_database(settings: Settings, *, want_schema: bool) -> None:
    """Connect to PostgreSQL; with ``want_schema``, also require the ``customers`` table."""
    with starting("PostgreSQL", settings.database_url):
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT)
        try:
            if want_schema and await conn.fetchval("SELECT to_regclass('customers')") is None:
                raise asyncpg.UndefinedTableError('relation "customers" does not exist')
        finally:
            await conn.close()


async def check_broker(settings: Settings) -> None:
    with starting("RabbitMQ", settings.amqp_url):
        connection = await connect_once(settings.amqp_url, attempt_timeout=CONNECT_TIMEOUT)
        await connection.close()


async def check(settings: Settings) -> None:
    await check_database(settings, want_schema=True)
    await check_broker(settings)


async def run(settings: Settings) -> None:
    await check_database(settings, want_schema=not settings.migrate_on_start)
    await check_broker(settings)
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        with quiet_amqp_logs():  # aio-pika's own error lines would double ours
            await worker.start()
    except Exception as exc:  # the probes passed: the topology, a migration, a port or a race
        raise StartupError(describe_unexpected(exc, settings)) from exc  # start() closed what it opened
    try:
        await stop.wait()
    finally:
        await worker.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = entry_point_parser("python -m worker", DESCRIPTION, CHECK_NOTES, reads="worker")
    parser.add_argument("--check", action="store_true",
                        help="check that PostgreSQL and RabbitMQ are reachable, then exit (0 ok, 1 not)")
    args = parser.parse_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings, "worker")
    use_uvloop()
    run_or_fail(check(settings) if args.check else run(settings), settings, "worker")
    if args.check:
        print("ok: PostgreSQL and RabbitMQ reachable")


if __name__ == "__main__":
    main()
