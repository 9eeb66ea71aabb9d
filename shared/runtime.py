"""Process start-up helpers shared by every entry point: logging and the event loop."""

from __future__ import annotations

import asyncio
import logging

from shared.settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # aio-pika logs every reconnect attempt with a traceback; one line is enough.
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, logging.getLogger().level))


def use_uvloop() -> None:
    """Use uvloop when it is installed (it is a dependency everywhere but Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
