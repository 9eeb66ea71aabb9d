"""``python -m worker``: run one worker process until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import logging
import signal

import asyncpg
from aio_pika.exceptions import AMQPError

from shared.runtime import configure_logging, use_uvloop
from shared.settings import Settings
from worker.service import Worker


async def run(settings: Settings) -> None:
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    try:
        await stop.wait()
    finally:
        await worker.stop()


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    use_uvloop()
    try:
        asyncio.run(run(settings))
    except (OSError, AMQPError, asyncpg.PostgresError) as exc:  # broker or database unreachable at start-up
        logging.getLogger("worker").error("worker cannot start: %s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
