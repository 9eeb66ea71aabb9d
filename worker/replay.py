"""``python -m worker.replay``: list, replay or drop dead-lettered requests.

    list   [--json] [--user-id ID] [--reason TEXT] [--since T] [--until T] [--q VALUE] [--limit N] [--show-pii]
    replay (--all | --user-id ID | --request-id ID | --reason TEXT) [--dry-run] [--force] [--actor NAME]
    drop   (--all | --user-id ID | --request-id ID | --reason TEXT) --yes [--actor NAME]

Selecting, replaying, dropping and auditing are ``worker.dead_letters``'s, shared with the console
(``python -m console``): both select with the same SQL and write the same audit rows.

How it reads dead letters without using them up: every command first moves what waits in the dead-letter
queue into PostgreSQL's ``dead_letters`` table (``worker.dead_letters``: stored, then acked), and reads, replays
and drops there. Listing is a SELECT: it changes no delivery count (a quorum queue counts every get-and-return,
and a delivery limit would drop a message listed too often), no order, and nothing another operator sees.

Replays keep the request id and the original write stamp: a replayed request never overwrites a field
that a newer request has set since (per-field stamps). ``--force`` gives it a fresh stamp instead, on the same
shared timeline as every gateway's (the database clock, ``shared.clock.timeline``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel

from shared.brokers import connect_once
from shared.cli import (
    StartupError,
    describe_unexpected,
    entry_point_parser,
    fail,
    load_settings_or_exit,
    starting,
)
from shared.clock.stamps import HybridClock
from shared.logs import configure_logging
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.topology import Topology
from worker import dead_letters
from worker.dead_letters import DeadLetter, LetterFilter, fresh_stamp_clock
from worker.repository import init_connection

__all__ = ["DeadLetterSession", "fresh_stamp_clock", "main"]

EXIT_OK, EXIT_UNREACHABLE = 0, 1


class DeadLetterSession:
    """One command's view of the dead letters: connect to PostgreSQL and RabbitMQ, move whatever waits in the
    dead-letter queue into the table (``worker.dead_letters``), then select, replay and drop there, close."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.conn: asyncpg.Connection | None = None
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: AbstractChannel | None = None

    async def __aenter__(self) -> DeadLetterSession:
        # PostgreSQL first: nothing is taken from the queue unless it can be stored.
        try:
            with starting("PostgreSQL", self.settings.database_url):
                self.conn = await asyncpg.connect(self.settings.database_url, timeout=CONNECT_TIMEOUT)
                await init_connection(self.conn)
            with starting("RabbitMQ", self.settings.amqp_url):
                channel = await self.publishing_channel()
                # Replays are routed by SHARD_COUNT: it must be the one the workers consume (a mismatch keeps
                # its own message).
                await self.topology.check_against_broker(channel)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _connected(self) -> aio_pika.abc.AbstractConnection:
        """The AMQP connection, made again if the broker closed it (a hard error such as ``nodedown`` closes it)."""
        if self.connection is None or self.connection.is_closed:
            self.connection = await connect_once(self.settings.amqp_url, attempt_timeout=CONNECT_TIMEOUT)
            self.channel = None
        return self.connection

    async def publishing_channel(self) -> AbstractChannel:
        """The publishing channel, on a live connection. on_return_raises: an unroutable re-publish is an error,
        and its dead letter stays where it is."""
        connection = await self._connected()
        if self.channel is None or self.channel.is_closed:
            self.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self.conn is not None:
            await self.conn.close()

    async def select(self, letter_filter: LetterFilter, limit: int | None = None) -> list[DeadLetter]:
        """The matching dead letters, oldest first, after moving the queue's into the table."""
        assert self.conn is not None
        await dead_letters.move_from_queue(self._connected, self.conn, self.topology)
        return await dead_letters.stored(self.conn, self.topology, letter_filter, limit=limit)

    async def total(self) -> int:
        assert self.conn is not None
        return await dead_letters.count(self.conn, self.topology)


def letter_filter(args: argparse.Namespace) -> LetterFilter:
    """The dead letters the options select (``--all``, or none of the others: every one)."""
    if getattr(args, "all", False):
        return LetterFilter()
    return LetterFilter(user_id=args.user_id, request_id=getattr(args, "request_id", None), reason=args.reason,
                        since=getattr(args, "since", None), until=getattr(args, "until", None),
                        q=getattr(args, "q", None))


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("all", "user_id", "request_id", "reason", "force", "dry_run")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) not in (None, False)}


async def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    async with DeadLetterSession(settings) as session:
        letters = await session.select(letter_filter(args), limit=args.limit)
    for letter in letters:
        item = letter.summary(args.show_pii)
        if args.json:
            item.pop("id")
            print(orjson.dumps(item).decode())
        else:
            print(f"{item['deadAt'] or '-':32} {item['requestId'] or '-':32} user={item['userId'] or '-'} "
                  f"attempts={item['attempts']} reason={item['reason']}")
    if not args.json:
        print(f"{len(letters)} dead letter(s)")
    return EXIT_OK


async def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    async with DeadLetterSession(settings) as session:
        assert session.conn is not None
        clock = HybridClock()
        if args.force and not args.dry_run:
            clock = await fresh_stamp_clock(settings, session.conn)
        chosen = await session.select(letter_filter(args))
        report = await dead_letters.replay(
            await session.publishing_channel(), session.conn, session.topology, chosen, force=args.force, clock=clock,
            actor=args.actor, filters=_filters(args), dry_run=args.dry_run)
        for result in report.results:
            letter = result.letter
            if result.action == "skipped":
                print(f"skip  {letter.request_id or '-'}: {result.detail}")
            elif result.action == "would replay":
                print(f"would replay {letter.request_id} user={letter.user_id}"
                      f"{' with a fresh stamp' if args.force else ''}")
            elif result.action == "failed":
                print(f"error: {letter.request_id} not replayed ({result.detail}); it stays in the dead-letter "
                      "queue", file=sys.stderr)
            else:
                print(f"replayed {letter.request_id} user={letter.user_id} -> {result.detail}")
        kept = await session.total()
        verb, count = ("would replay", report.count("would replay")) if args.dry_run else (
            "replayed", report.count("replayed"))
        print(f"{verb} {count}, skipped {report.count('skipped')}, left in the dead-letter queue {kept}")
    return EXIT_UNREACHABLE if report.count("failed") else EXIT_OK


async def cmd_drop(settings: Settings, args: argparse.Namespace) -> int:
    async with DeadLetterSession(settings) as session:
        assert session.conn is not None
        chosen = await session.select(letter_filter(args))
        report = await dead_letters.drop(session.conn, chosen, actor=args.actor, filters=_filters(args))
        for result in report.results:
            print(f"dropped {result.letter.request_id or '-'} user={result.letter.user_id or '-'}")
        print(f"dropped {len(report.results)}, left in the dead-letter queue {await session.total()}")
    return EXIT_OK


def timestamp(text: str) -> dt.datetime:
    """An ISO 8601 date or time; one without a zone is UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = entry_point_parser("python -m worker.replay", "Inspect, replay or drop dead-lettered customer requests.",
                                reads="replay")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,replay,drop}")

    listing = commands.add_parser("list", help="list dead letters, oldest first (changes nothing)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--user-id", help="only this userId")
    listing.add_argument("--reason", help="only those whose error contains TEXT (case-insensitive)")
    listing.add_argument("--since", type=timestamp, help="only those dead at or after this ISO time (UTC if no zone)")
    listing.add_argument("--until", type=timestamp, help="only those dead at or before this ISO time")
    listing.add_argument("--q", metavar="VALUE", help="only those with a field whose whole value is VALUE")
    listing.add_argument("--limit", type=int, help="at most N dead letters")
    listing.add_argument("--show-pii", action="store_true", help="show phones, WeChat ids and names unmasked")

    default_actor = os.environ.get("USER") or getpass.getuser()
    for name, help_text in (("replay", "put dead letters back on their shard queue"),
                            ("drop", "discard dead letters for good")):
        command = commands.add_parser(name, help=help_text)
        selector = command.add_mutually_exclusive_group(required=True)
        selector.add_argument("--all", action="store_true", help="every dead letter")
        selector.add_argument("--user-id", help="the dead letters of this userId")
        selector.add_argument("--request-id", help="the dead letter with this request id")
        selector.add_argument("--reason", help="those whose error contains TEXT (case-insensitive)")
        command.add_argument("--actor", default=default_actor, help="who is doing this (default: $USER)")
        if name == "replay":
            command.add_argument("--dry-run", action="store_true", help="print what would be replayed")
            command.add_argument("--force", action="store_true",
                                 help="give replays a fresh stamp so they overwrite newer values")
        else:
            command.add_argument("--yes", action="store_true", required=True, help="confirm the drop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings_or_exit()
    # Log lines go to stderr (stdout is the tool's output), masked like every process's; the tool reports
    # connection problems itself, in one "error:" line, so the AMQP libraries stay quiet.
    configure_logging(settings, "replay", stream=sys.stderr)
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    command = {"list": cmd_list, "replay": cmd_replay, "drop": cmd_drop}[args.command]
    try:
        return asyncio.run(command(settings, args))
    except StartupError as exc:  # the same one line as every entry point's (shared.cli.starting)
        fail(str(exc))
    # Lost midway: still one line.
    except (OSError, aio_pika.exceptions.AMQPError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        fail(describe_unexpected(exc, settings))


if __name__ == "__main__":
    sys.exit(main())
