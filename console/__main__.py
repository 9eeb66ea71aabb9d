"""``python -m console``: serve the dead-letter console on CONSOLE_HOST:CONSOLE_PORT until SIGTERM/SIGINT.

Start-up, each failure one ``error:`` line and exit 1 (``shared.cli``): settings; console keys (a bad line is
named by number, never shown); the loopback rule (no keys → a loopback address only); PostgreSQL and RabbitMQ
(``console.app``'s cleanup context); the port.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from console.app import create_app
from console.keys import check_open_console, load_console_keys
from shared.cli import (
    StartupError,
    describe_listen_error,
    entry_point_parser,
    fail,
    load_settings_or_exit,
    run_or_fail,
)
from shared.logs import configure_logging
from shared.settings import Settings

log = logging.getLogger("console")

DESCRIPTION = """\
Serve the dead-letter console on CONSOLE_HOST:CONSOLE_PORT: find, inspect, replay and drop dead-lettered
requests in the browser (a dry run first, stale-safe replays, masked personal data, an audit trail), and the same
as JSON under /api. Log in with a console key (CONSOLE_KEYS / CONSOLE_KEYS_FILE: name:sha256hex:role lines,
role viewer or operator); without keys it listens on a loopback address only, everyone an operator."""

NOTES = """\
a key for someone:
  python -m gateway.keys new alice          prints the key (give it to alice) and the line alice:<sha256>
  append :operator or :viewer to the line   alice:<sha256>:operator, into CONSOLE_KEYS_FILE"""


async def serve(settings: Settings, secret: str) -> None:
    keys = load_console_keys(settings.console_keys, settings.console_keys_file)
    app = create_app(settings, keys, secret)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()  # the cleanup contexts' start-up half: PostgreSQL, RabbitMQ, the topology check
    site = web.TCPSite(runner, settings.console_host, settings.console_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(describe_listen_error(exc, settings.console_host, settings.console_port,
                                                 "CONSOLE_PORT")) from exc
    log.info("console listening on http://%s:%d (%s)", settings.console_host, settings.console_port,
             f"{len(keys)} key(s)" if len(keys) else "no keys: open to anyone on this machine, everyone an operator")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    log.info("console stopped")


def main(argv: Sequence[str] | None = None) -> None:
    entry_point_parser("python -m console", DESCRIPTION, NOTES, reads="console").parse_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings, "console")
    try:
        keys = load_console_keys(settings.console_keys, settings.console_keys_file)
        check_open_console(settings.console_host, keys)
    except ValueError as exc:
        fail(str(exc))
    if settings.console_secret is not None:
        secret = settings.console_secret.get_secret_value()
    else:
        secret = secrets.token_urlsafe(32)
        log.warning("CONSOLE_SECRET is not set: sessions are signed with a random key of this process, so a "
                    "restart logs everyone out (set CONSOLE_SECRET to keep them)")
    run_or_fail(serve(settings, secret), settings, "console")


if __name__ == "__main__":
    main()
    sys.exit(0)
