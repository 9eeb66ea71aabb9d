"""``python -m gateway``: serve the API on HOST:PORT until SIGTERM/SIGINT.

Lifecycle, explicitly: read the settings (``--help`` stops before) → open the broker connection and check the
topology (start-up fails with one line if RabbitMQ is unreachable or its topology differs) → listen (fails if
PORT is taken) → on SIGTERM stop listening → let in-flight requests finish (they get their outcome or a 202)
for up to SHUTDOWN_DEADLINE seconds → close the broker connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from aiohttp import web

from gateway.app import create_app
from gateway.inflight import IN_FLIGHT
from gateway.server import GatewayRunner
from shared.cli import (
    StartupError,
    describe_listen_error,
    entry_point_parser,
    load_settings_or_exit,
    run_or_fail,
    starting,
)
from shared.logs import configure_logging
from shared.runtime import use_uvloop
from shared.settings import Settings

log = logging.getLogger("gateway")

DESCRIPTION = """\
Serve the customer-ingestion HTTP API (POST /api/external/customers, GET /healthz) on HOST:PORT.
Each accepted request is published to RabbitMQ (AMQP_URL) for a worker to apply; the gateway answers
with the worker's outcome, or 202 after RPC_TIMEOUT seconds. Stops on SIGTERM/SIGINT after in-flight
requests finish (at most SHUTDOWN_DEADLINE seconds)."""


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = GatewayRunner(app, settings, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    with starting("RabbitMQ", settings.amqp_url):
        await runner.setup()  # runs the cleanup contexts' start-up half: the broker connection and topology
    # backlog: bursts of hundreds of new connections; the default 128 drops SYNs (1 s client retries).
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(describe_listen_error(exc, settings.host, settings.port)) from exc
    log.info("gateway listening on %s:%d", settings.host, settings.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping: no new connections, waiting for in-flight requests")
    await site.stop()  # stop listening
    if not await app[IN_FLIGHT].wait_idle(settings.shutdown_deadline):
        log.warning("shutdown deadline reached with %d requests in flight", app[IN_FLIGHT].count)
    await runner.cleanup()  # close connections (idle now), then the broker connection
    log.info("gateway stopped")


def main(argv: Sequence[str] | None = None) -> None:
    entry_point_parser("python -m gateway", DESCRIPTION, reads="gateway").parse_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings, "gateway")
    use_uvloop()
    run_or_fail(serve(settings), settings, "gateway")


if __name__ == "__main__":
    main()
