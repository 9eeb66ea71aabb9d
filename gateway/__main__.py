"""``python -m gateway``: serve the API on HOST:PORT until SIGTERM/SIGINT.

Lifecycle, explicitly: open the broker connection (start-up fails if RabbitMQ is unreachable) → listen →
on SIGTERM stop listening → let in-flight requests finish (they get their outcome or a 202) for up to
SHUTDOWN_DEADLINE seconds → close the broker connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aio_pika.exceptions import AMQPError
from aiohttp import web

from gateway.app import create_app
from gateway.keys import IN_FLIGHT
from shared.runtime import configure_logging, use_uvloop
from shared.settings import Settings

log = logging.getLogger("gateway")


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()  # runs the cleanup contexts' start-up half: the broker connection
    # backlog: bursts of hundreds of new connections; the default 128 drops SYNs (1 s client retries).
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
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


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    use_uvloop()
    try:
        asyncio.run(serve(settings))
    except (OSError, AMQPError) as exc:  # broker unreachable or port taken at start-up
        log.error("gateway cannot start: %s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
