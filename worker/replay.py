"""``python -m worker.replay``: list, replay or drop dead-lettered requests.

    list   [--json] [--user-id ID] [--reason TEXT] [--limit N] [--show-pii]
    replay (--all | --user-id ID | --request-id ID | --reason TEXT) [--dry-run] [--force] [--actor NAME]
    drop   (--all | --user-id ID | --request-id ID | --reason TEXT) --yes [--actor NAME]

How it reads the queue without disturbing it: every dead letter is fetched with ``basic.get`` and left
unacked; those chosen are re-published (confirmed) and then acked, the others go back when the channel
closes — a classic queue puts returned messages back at their original position, so order is kept.

Replays keep the request id and the original write stamp: a replayed request never overwrites a field
that a newer request has set since (per-field stamps). ``--force`` gives it a fresh stamp instead, on the same
shared timeline as every gateway's (the database clock, ``shared.timeline``).
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
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.cli import describe_amqp_error, describe_unexpected, entry_point_parser, load_settings_or_exit, mask_url
from shared.logs import configure_logging, mask_payload, mask_text
from shared.settings import Settings
from shared.stamps import HybridClock
from shared.timeline import SAMPLES_PER_SYNC, Timeline
from shared.topology import Topology, TopologyMismatch
from worker import deadletter as dl

EXIT_OK, EXIT_UNREACHABLE = 0, 1


class Unreachable(Exception):
    """RabbitMQ or Postgres cannot be reached; the message says which and where."""


@dataclass(eq=False)
class DeadLetter:
    """One message of the dead-letter queue: usually one request dead-lettered by a worker, or a whole pack
    dead-lettered by the broker itself (a quorum queue's delivery limit, see ``shared.topology``)."""

    message: AbstractIncomingMessage
    envelopes: list[dict[str, Any]]
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, message: AbstractIncomingMessage) -> DeadLetter:
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            body = None
        envelopes: list[dict[str, Any]] = []
        if isinstance(body, dict) and "request_id" in body:
            envelopes = [body]
        elif isinstance(body, dict) and isinstance(body.get("requests"), list):
            envelopes = [r for r in body["requests"] if isinstance(r, dict) and "request_id" in r]
        return cls(message, envelopes, dict(message.headers or {}))

    @property
    def envelope(self) -> dict[str, Any] | None:
        return self.envelopes[0] if self.envelopes else None

    @property
    def request_ids(self) -> list[str]:
        return [str(e.get("request_id")) for e in self.envelopes]

    @property
    def request_id(self) -> str | None:
        value = (self.envelope or {}).get("request_id") or self.headers.get(dl.H_REQUEST_ID)
        return str(value) if value is not None else None

    @property
    def user_id(self) -> str | None:
        value = (self.envelope or {}).get("user_id") or self.headers.get(dl.H_USER_ID)
        return str(value) if value is not None else None

    @property
    def _x_death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death")
        return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}

    @property
    def reason(self) -> str:
        if dl.H_ERROR in self.headers:
            return str(self.headers[dl.H_ERROR])
        if self._x_death:
            return f"dead-lettered by the broker: {self._x_death.get('reason', 'unknown')}"
        return ""

    @property
    def routing_key(self) -> str | None:
        value = self.headers.get(dl.H_ROUTING_KEY)
        if value is None:
            keys = self._x_death.get("routing-keys")
            value = keys[0] if isinstance(keys, list) and keys else None
        return str(value) if value is not None else None

    def matches(self, args: argparse.Namespace) -> bool:
        user_id = getattr(args, "user_id", None)
        if user_id is not None and user_id not in {str(e.get("user_id")) for e in self.envelopes} | {
            self.user_id
        }:
            return False
        request_id = getattr(args, "request_id", None)
        if request_id is not None and request_id not in [*self.request_ids, self.request_id]:
            return False
        if getattr(args, "reason", None) is not None:
            needle = args.reason.lower()
            haystack = f"{self.reason} {self.headers.get(dl.H_EXCEPTION, '')}".lower()
            if needle not in haystack:
                return False
        return True

    def summary(self, show_pii: bool) -> dict[str, Any]:
        payload = (self.envelope or {}).get("payload")
        if isinstance(payload, dict) and not show_pii:
            payload = mask_payload(payload)  # phones, WeChat id and name
        reason = self.reason if show_pii else mask_text(self.reason)  # database errors may quote values
        return {
            "requestId": self.request_id,
            "userId": self.user_id,
            "reason": reason,
            "exception": self.headers.get(dl.H_EXCEPTION) if show_pii else mask_text(
                str(self.headers.get(dl.H_EXCEPTION) or "")) or None,
            "attempts": self.headers.get(dl.H_ATTEMPTS),
            "firstFailureAt": self.headers.get(dl.H_FIRST_FAILURE),
            "lastFailureAt": self.headers.get(dl.H_LAST_FAILURE),
            "deadAt": self.headers.get(dl.H_DEAD_AT),
            "routingKey": self.routing_key,
            "replayed": bool((self.envelope or {}).get("replayed") or self.headers.get(dl.H_REPLAYED)),
            "payload": payload if self.envelope is not None else None,
            **({"requestIds": self.request_ids} if len(self.envelopes) > 1 else {}),
        }


class DeadLetterQueue:
    """A session on the dead-letter queue: fetch everything unacked, settle what was chosen, close."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: AbstractChannel | None = None

    async def __aenter__(self) -> DeadLetterQueue:
        try:
            self.connection = await asyncio.wait_for(aio_pika.connect(self.settings.amqp_url), timeout=15)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            raise Unreachable(describe_amqp_error(exc, self.settings.amqp_url)) from exc
        # on_return_raises: an unroutable re-publish is an error, and its dead letter stays where it is.
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        try:  # replays are routed by SHARD_COUNT: it must be the one the workers consume
            await self.topology.check_against_broker(self.channel)
        except TopologyMismatch as exc:
            await self.connection.close()
            raise Unreachable(str(exc)) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()  # unacked dead letters return to their places

    async def fetch_all(self) -> list[DeadLetter]:
        assert self.channel is not None
        queue = await self.topology.declare_dead_letter_queue(self.channel)
        letters = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            letters.append(DeadLetter.read(message))
        return letters

    async def republish(self, letter: DeadLetter, force: bool, clock: HybridClock) -> str:
        """Put one dead letter back on its shard (confirmed), then remove it from the dead-letter queue."""
        assert self.channel is not None and letter.envelopes
        envelopes = [dict(envelope, replayed=True) for envelope in letter.envelopes]
        if force:
            for envelope in envelopes:
                envelope["stamp"] = clock.now()
        # Routed again by userId with today's SHARD_COUNT: the recorded key may name a shard that is gone.
        routing_key = self.topology.routing_key_for(str(letter.envelopes[0].get("user_id")))
        exchange = await self.topology.declare_exchange(self.channel)
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps({"v": 1, "requests": envelopes}),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=letter.request_id,
                headers={dl.H_REPLAYED: True, "x-replayed-at": dt.datetime.now(dt.UTC).isoformat()},
            ),
            routing_key=routing_key,
        )
        await letter.message.ack()
        return routing_key


async def fresh_stamp_clock(settings: Settings) -> HybridClock:
    """A clock on the shared timeline (the database's clock, like every gateway's) for ``--force``.

    It also observes the newest field stamp stored, so a forced replay wins even over a write stamped by a
    gateway that was running ahead of the timeline (one that never reached the database, see README).
    """
    timeline = Timeline.from_settings(settings)
    try:
        await asyncio.wait_for(timeline.sync(SAMPLES_PER_SYNC), timeout=15)
        conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), timeout=15)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise Unreachable(f"cannot connect to PostgreSQL ({_safe_url(settings.database_url)}): {exc}") from exc
    finally:
        await timeline.stop()
    try:
        newest = await conn.fetchval(NEWEST_FIELD_STAMP)
    finally:
        await conn.close()
    clock = timeline.clock
    clock.observe(int(newest or 0))
    return clock


# The newest write stamp of any stored field (a sequential scan, fine for an operator's one-off replay).
NEWEST_FIELD_STAMP = "SELECT max(value::bigint) FROM customers, jsonb_each_text(field_stamps)"


async def record_audit(settings: Settings, actor: str, action: str, filters: dict[str, Any],
                       request_ids: Sequence[str], outcome: str) -> None:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), timeout=15)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise Unreachable(f"cannot connect to PostgreSQL ({_safe_url(settings.database_url)}): {exc}") from exc
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO dead_letter_audit (actor, action, filters, request_ids, outcome)"
                " VALUES ($1, $2, $3::jsonb, $4, $5)",
                actor, action, orjson.dumps(filters).decode(), list(request_ids), outcome,
            )
            if action == "replay":  # back on a shard: "pending" again until a worker applies it
                await conn.execute("DELETE FROM failed_requests WHERE request_id = ANY($1::text[])",
                                   list(request_ids))
    finally:
        await conn.close()


async def check_database(settings: Settings) -> None:
    """Fail before touching the queue if the audit cannot be written."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), timeout=15)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise Unreachable(f"cannot connect to PostgreSQL ({_safe_url(settings.database_url)}): {exc}") from exc
    await conn.close()


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    return mask_url(url)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("all", "user_id", "request_id", "reason", "force", "dry_run")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) not in (None, False)}


async def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    async with DeadLetterQueue(settings) as dlq:
        letters = [letter for letter in await dlq.fetch_all() if letter.matches(args)]
    if args.limit is not None:
        letters = letters[: args.limit]
    for letter in letters:
        item = letter.summary(args.show_pii)
        if args.json:
            print(orjson.dumps(item).decode())
        else:
            print(f"{item['deadAt'] or '-':32} {item['requestId'] or '-':32} user={item['userId'] or '-'} "
                  f"attempts={item['attempts']} reason={item['reason']}")
    if not args.json:
        print(f"{len(letters)} dead letter(s)")
    return EXIT_OK


async def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    if not args.dry_run:
        await check_database(settings)
    clock = HybridClock()
    if args.force and not args.dry_run:
        clock = await fresh_stamp_clock(settings)
    done: list[str] = []
    skipped = failed = 0
    async with DeadLetterQueue(settings) as dlq:
        letters = await dlq.fetch_all()
        chosen = [letter for letter in letters if args.all or letter.matches(args)]
        for letter in chosen:
            if not letter.envelopes:
                print(f"skip  {letter.request_id or '-'}: not a request envelope (use drop)")
                skipped += 1
                continue
            if args.dry_run:
                print(f"would replay {letter.request_id} user={letter.user_id}"
                      f"{' with a fresh stamp' if args.force else ''}")
                continue
            try:
                routing_key = await dlq.republish(letter, args.force, clock)
            except (aio_pika.exceptions.PublishError, aio_pika.exceptions.DeliveryError) as exc:
                print(f"error: {letter.request_id} not replayed ({exc}); it stays in the dead-letter queue",
                      file=sys.stderr)
                failed += 1
                continue
            done.extend(letter.request_ids)
            print(f"replayed {letter.request_id} user={letter.user_id} -> {routing_key}")
    kept = len(letters) - len(done)
    verb = "would replay" if args.dry_run else "replayed"
    count = len(chosen) - skipped if args.dry_run else len(done)
    print(f"{verb} {count}, skipped {skipped}, left in the dead-letter queue {kept}")
    if not args.dry_run and (done or chosen):
        await record_audit(settings, args.actor, "replay", _filters(args), done,
                           f"replayed {len(done)}, skipped {skipped}, failed {failed}")
    return EXIT_UNREACHABLE if failed else EXIT_OK


async def cmd_drop(settings: Settings, args: argparse.Namespace) -> int:
    await check_database(settings)
    dropped: list[str] = []
    async with DeadLetterQueue(settings) as dlq:
        letters = await dlq.fetch_all()
        for letter in letters:
            if args.all or letter.matches(args):
                await letter.message.ack()
                dropped.append(letter.request_id or "-")
                print(f"dropped {letter.request_id or '-'} user={letter.user_id or '-'}")
    print(f"dropped {len(dropped)}, left in the dead-letter queue {len(letters) - len(dropped)}")
    if dropped:
        await record_audit(settings, args.actor, "drop", _filters(args), dropped, f"dropped {len(dropped)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = entry_point_parser("python -m worker.replay", "Inspect, replay or drop dead-lettered customer requests.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,replay,drop}")

    listing = commands.add_parser("list", help="list dead letters, oldest first (changes nothing)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--user-id", help="only this userId")
    listing.add_argument("--reason", help="only those whose error contains TEXT (case-insensitive)")
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
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (OSError, aio_pika.exceptions.AMQPError, asyncpg.PostgresError) as exc:  # lost midway: still one line
        print(f"error: {describe_unexpected(exc, settings)}", file=sys.stderr)
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
