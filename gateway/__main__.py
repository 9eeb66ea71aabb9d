"""``python -m gateway``: serve the API on HOST:PORT until SIGTERM.

On SIGTERM aiohttp stops accepting connections, lets in-flight requests finish for up to
``SHUTDOWN_DEADLINE`` seconds, then runs the cleanup contexts (closing the broker connection).
"""

from __future__ import annotations

from aiohttp import web

from gateway.app import create_app
from shared.runtime import configure_logging, use_uvloop
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    use_uvloop()
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_deadline,
        access_log=None,
        backlog=1024,  # bursts of hundreds of new connections: the default 128 drops SYNs (1 s retries)
        print=None,
    )


if __name__ == "__main__":
    main()
