"""RabbitMQ names, the shard function, and the declaration of everything both sides rely on.

Layout (all durable):
    <prefix>.requests   direct exchange; routing key ``shard.<n>``
    <prefix>.shard.<n>  one queue per shard, bound with ``shard.<n>``; every worker consumes every shard
    <prefix>.dead       dead-letter queue, of QUEUE_TYPE too: on a cluster a quorum queue, replicated like the
                        shards (the replay tool moves its messages into PostgreSQL, worker/dead_letters.py)
    <prefix>.topology   marker exchange (internal, never published to) recording SHARD_COUNT and QUEUE_TYPE

Quorum queues get a replica on every node (up to QUORUM_REPLICAS) and their leaders spread over the nodes
(``x-queue-leader-locator: balanced``), so losing one node of three loses no queue and moves few leaders.

Every process checks its topology against the broker's before declaring anything (``declare``): a gateway
routing by 3 shards while the workers consume 2 would accept requests that nobody ever applies. Three checks,
each turned into one ``TopologyMismatch`` line naming both values:
1. no ``<prefix>.shard.<SHARD_COUNT>`` queue exists (more shards, or one left behind by a reduced count);
2. the marker: RabbitMQ compares only one argument of an exchange on re-declaration, ``alternate-exchange``
   (custom ``x-`` arguments are ignored, checked on 3.10 and in 4.x's source), so the marker carries the
   topology there: ``shard-count=3,queue-type=quorum,dead=quorum``. Any other value is refused with
   PRECONDITION_FAILED, whose text names the value already on the broker;
3. every existing queue's ``x-queue-type``, which RabbitMQ compares on re-declaration (PRECONDITION_FAILED).
A check changes nothing it finds different: existence is looked up with passive declares, only existing
queues are re-declared (to compare), and the marker is created only after every existing queue matched. The
checks run on channels of their own, which the broker closes on failure, not on the caller's; deployments from
before the marker pass checks 1 and 3 and get their marker from the first process that starts.

Only features RabbitMQ 3.10 already has are used: direct exchanges, quorum/classic queues, publisher confirms,
quorum leader locators and at-least-once dead-lettering (both 3.10).
"""

from __future__ import annotations

import contextlib
import logging
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractExchange
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from shared.errors import CrmError
from shared.settings import Settings

CHANGE_HINT = "give every gateway and worker the same SHARD_COUNT and QUEUE_TYPE, or change the topology as " \
    "docs/architecture.md, \"Changing SHARD_COUNT or QUEUE_TYPE\", says"


log = logging.getLogger("topology")


class TopologyMismatch(CrmError):
    """This process's SHARD_COUNT / QUEUE_TYPE differ from what the broker already has: it must not start."""


def shard_for(user_id: str, shard_count: int) -> int:
    """Stable shard of a userId: crc32 of its UTF-8 bytes modulo the shard count."""
    return zlib.crc32(user_id.encode("utf-8")) % shard_count


@dataclass(frozen=True)
class Topology:
    prefix: str
    shard_count: int
    queue_type: str
    # The bound of each shard queue (x-max-length with x-overflow reject-publish): past it the broker refuses
    # publishes (basic.nack) and the gateway answers 503, instead of the broker's disk filling up.
    max_length: int = 100_000
    # Members of each quorum queue (x-quorum-initial-group-size); RabbitMQ takes one per node, as many as the
    # cluster has up to this.
    quorum_replicas: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(settings.amqp_prefix, settings.shard_count, settings.queue_type, settings.queue_max_length,
                   settings.quorum_replicas)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_letter_type(self) -> str:
        """A quorum deployment keeps its dead letters replicated too; a classic one keeps them classic."""
        return self.queue_type

    def routing_key(self, shard: int) -> str:
        return f"shard.{shard}"

    def routing_key_for(self, user_id: str) -> str:
        return self.routing_key(shard_for(user_id, self.shard_count))

    def shard_queue(self, shard: int) -> str:
        return f"{self.prefix}.shard.{shard}"

    def reply_queue(self, instance: str) -> str:
        return f"{self.prefix}.reply.{instance}"

    @property
    def marker_exchange(self) -> str:
        return f"{self.prefix}.topology"

    @property
    def marker_value(self) -> str:
        return format_marker(self.shard_count, self.queue_type, self.dead_letter_type)

    def describe(self) -> str:
        return f"SHARD_COUNT={self.shard_count} QUEUE_TYPE={self.queue_type}"

    async def declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.DIRECT, durable=True)

    async def declare(self, channel: AbstractChannel) -> tuple[AbstractExchange, list[aio_pika.abc.AbstractQueue]]:
        """Check the topology against the broker's, then declare exchange, shard queues and the dead-letter
        queue; idempotent. Raises ``TopologyMismatch`` (one line) when this process's differs."""
        settled = await self.check_against_broker(channel)
        exchange = await self.declare_exchange(channel)
        queues = []
        for shard in range(self.shard_count):
            name = self.shard_queue(shard)
            try:
                if name in settled:  # exists with other placement or bound: take it as it is (_check_queue)
                    queue = await channel.declare_queue(name, passive=True)
                else:
                    queue = await channel.declare_queue(name, durable=True, arguments=self.shard_arguments)
            except ChannelPreconditionFailed as exc:
                raise self._queue_mismatch(name, exc) from None
            await queue.bind(exchange, self.routing_key(shard))
            queues.append(queue)
        if self.dead_letter_queue in settled:
            await channel.declare_queue(self.dead_letter_queue, passive=True)
        else:
            await self.declare_dead_letter_queue(channel)
        return exchange, queues

    async def check_against_broker(self, channel: AbstractChannel) -> set[str]:
        """Checks 1-3 of the module docstring. A check changes nothing on a mismatch: it looks with passive
        declares, and compares by re-declaring only what already exists; the marker is created only once every
        existing queue is known to match (the first process of a new deployment, or one from before markers).

        Returns the queues that exist with other tolerated arguments (see ``_check_queue``)."""
        connection = (await channel.get_underlay_channel()).connection
        beyond = self.shard_queue(self.shard_count)
        if await _exists(connection, beyond):
            raise TopologyMismatch(
                f"topology mismatch: queue {beyond} exists on RabbitMQ but this process has {self.describe()} "
                f"(shards 0..{self.shard_count - 1}): another process uses more shards, or "
                f"a reduced SHARD_COUNT left it behind (drain and delete it); {CHANGE_HINT}")
        marker_exists = await _exists(connection, self.marker_exchange, exchange=True)
        if marker_exists:
            await self._check_marker(connection)  # compares; equal values change nothing
        settled: set[str] = set()
        for name, arguments in self._durable_queues():
            if await _exists(connection, name) and await self._check_queue(connection, name, arguments):
                settled.add(name)
        if not marker_exists:
            await self._check_marker(connection)  # creates it: every existing queue matched
        return settled

    def _durable_queues(self) -> list[tuple[str, dict[str, Any]]]:
        shards = [(self.shard_queue(shard), self.shard_arguments) for shard in range(self.shard_count)]
        return [*shards, (self.dead_letter_queue, self.dead_letter_arguments)]

    async def _check_marker(self, connection: aiormq.abc.AbstractConnection) -> None:
        async with _probe_channel(connection) as probe:
            try:
                await probe.exchange_declare(
                    self.marker_exchange, exchange_type="fanout", durable=True, internal=True,
                    arguments={"alternate-exchange": self.marker_value},
                )
            except ChannelPreconditionFailed as exc:
                current = _current_value(exc, truncated=True)
                theirs = describe_marker(current) if current is not None else "another topology"
                raise TopologyMismatch(
                    f"topology mismatch: this process has {self.describe()} (dead letters: {self.dead_letter_type} "
                    f"queue) but RabbitMQ already has {theirs} for prefix {self.prefix!r} (exchange "
                    f"{self.marker_exchange}); {CHANGE_HINT}") from None

    async def _check_queue(self, connection: aiormq.abc.AbstractConnection, name: str,
                           arguments: dict[str, Any]) -> bool:
        """Re-declare an existing queue with our arguments on a probe channel; a different type is fatal.

        Returns True when it exists with other *tolerated* arguments. A queue's arguments cannot change once it
        exists — RabbitMQ refuses a re-declaration (PRECONDITION_FAILED) — and two kinds may well differ on an
        upgraded deployment: the bound (``x-max-length`` / ``x-overflow``: created before the bound existed, or
        with another QUEUE_MAX_LENGTH) and the placement (``x-quorum-initial-group-size``,
        ``x-queue-leader-locator``, ``x-dead-letter-strategy``: created before QUORUM_REPLICAS existed). Such a
        queue is used as it is, with a warning: an operator changes a bound with a policy (docs/operations.md,
        "Bounded queues") and adds replicas with ``rabbitmq-queues grow`` (docs/operations.md, "High availability").
        """
        async with _probe_channel(connection) as probe:
            try:
                await probe.queue_declare(name, durable=True, arguments=arguments)
            except ChannelPreconditionFailed as exc:
                argument = _inequivalent_argument(exc)
                if argument not in _TOLERATED_ARGUMENTS:
                    raise self._queue_mismatch(name, exc) from None
                log.warning("queue %s exists with %s %s, not %r as this process would declare it: queue arguments "
                            "cannot change, so it is used as it is (docs/operations.md, \"Bounded queues\" and "
                            "\"High availability\")", name, argument, _current_value(exc) or "unset",
                            arguments.get(argument, "unset"))
                return True
        return False

    def _queue_mismatch(self, name: str, exc: BaseException) -> TopologyMismatch:
        current = _current_value(exc)
        setting = (f"QUEUE_TYPE={self.queue_type} (its dead letters go to a {self.dead_letter_type} queue)"
                   if name == self.dead_letter_queue else f"QUEUE_TYPE={self.queue_type}")
        return TopologyMismatch(
            f"topology mismatch: queue {name} exists on RabbitMQ with x-queue-type {current or 'different'} but "
            f"this process has {setting}; {CHANGE_HINT}")

    @property
    def _placement(self) -> dict[str, Any]:
        """Where a quorum queue's replicas and leader live: a replica on every node (up to QUORUM_REPLICAS), the
        leaders spread over the nodes (``balanced``, RabbitMQ 3.10+) instead of all on the declaring node."""
        if self.queue_type != "quorum":
            return {}
        return {"x-quorum-initial-group-size": self.quorum_replicas, "x-queue-leader-locator": "balanced"}

    @property
    def shard_arguments(self) -> dict[str, Any]:
        # A safety net, not the normal path: RabbitMQ 4 gives quorum queues a default delivery limit (20), and a
        # message redelivered more often (say, workers crash-looping on it) is dropped unless the queue has a
        # dead-letter target. With this one it lands in the dead-letter queue, where the replay tool sees it.
        arguments: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_letter_queue,
            # Backpressure, never silent loss: a full queue refuses new publishes (the gateway gets a nack and
            # answers 503) instead of dropping the oldest (the default, drop-head) or growing without end.
            "x-max-length": self.max_length,
            "x-overflow": "reject-publish",
            **self._placement,
        }
        if self.queue_type == "quorum":
            # The broker keeps a message it dead-letters until the dead-letter queue has confirmed it (the default,
            # at-most-once, drops it if that queue is unavailable, e.g. its leader moving); needs reject-publish.
            arguments["x-dead-letter-strategy"] = "at-least-once"
        return arguments

    @property
    def dead_letter_arguments(self) -> dict[str, Any]:
        # No delivery limit is set here: nothing reads this queue by get-and-return (the replay tool moves its
        # messages into PostgreSQL, worker/dead_letters.py), so a policy's delivery-limit can never drop one.
        return {"x-queue-type": self.dead_letter_type, **self._placement}

    async def declare_dead_letter_queue(self, channel: AbstractChannel) -> aio_pika.abc.AbstractQueue:
        try:
            return await channel.declare_queue(
                self.dead_letter_queue, durable=True, arguments=self.dead_letter_arguments)
        except ChannelPreconditionFailed as exc:
            raise self._queue_mismatch(self.dead_letter_queue, exc) from None


def format_marker(shard_count: int, queue_type: str, dead_letter_type: str) -> str:
    """The marker exchange's ``alternate-exchange`` value: ``shard-count=3,queue-type=quorum,dead=quorum``.

    Short on purpose: RabbitMQ's PRECONDITION_FAILED text, which quotes both values, is cut at 255 characters.
    """
    return f"shard-count={shard_count},queue-type={queue_type},dead={dead_letter_type}"


# Markers written before the dead-letter queue could be quorum have no dead part: it was classic then.
_MARKER = re.compile(r"shard-count=(\d+),queue-type=(\w+)(?:,dead=(\w+))?")


def describe_marker(value: str) -> str:
    """A marker value in words, also when the broker's text cut it short: ``SHARD_COUNT=2 QUEUE_TYPE=quorum``."""
    match = _MARKER.match(value)
    if match is None:
        return repr(value)
    dead = match[3] or ("classic" if match.end() == len(value) else None)
    return f"SHARD_COUNT={match[1]} QUEUE_TYPE={match[2]}" + (f" (dead letters: {dead} queue)" if dead else "")
# RabbitMQ's PRECONDITION_FAILED text: "... received 'X' but current is 'Y'" (3.10+), or "... received the
# value 'X' of type 'longstr' but current is the value 'Y' of type 'longstr'" when the types differ.
_CURRENT = re.compile(r"but current is (?:the value )?'([^']*)'")
# The same, when the text was cut at 255 characters before the closing quote.
_CURRENT_TRUNCATED = re.compile(r"but current is (?:the value )?'([^']*)")


# "... inequivalent arg 'x-max-length' for queue 'crm.shard.0' in vhost '/': received '5' but current is '2'"
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'")
_TOLERATED_ARGUMENTS = frozenset({
    "x-max-length", "x-overflow", "x-quorum-initial-group-size", "x-queue-leader-locator", "x-dead-letter-strategy",
})


def _inequivalent_argument(exc: BaseException) -> str | None:
    match = _INEQUIVALENT.search(str(exc))
    return match[1] if match else None


def parse_marker(value: str) -> tuple[int, str, str] | None:
    """(SHARD_COUNT, QUEUE_TYPE, dead-letter queue type) of a marker value, or None for one we did not write."""
    match = _MARKER.fullmatch(value)
    return (int(match[1]), match[2], match[3] or "classic") if match else None


async def _exists(connection: aiormq.abc.AbstractConnection, name: str, *, exchange: bool = False) -> bool:
    """A passive declare on a probe channel: True when the queue (or exchange) exists; changes nothing."""
    async with _probe_channel(connection) as probe:
        try:
            if exchange:
                await probe.exchange_declare(name, passive=True)
            else:
                await probe.queue_declare(name, passive=True)
        except ChannelNotFoundEntity:
            return False
    return True


def _current_value(exc: BaseException, *, truncated: bool = False) -> str | None:
    match = (_CURRENT_TRUNCATED if truncated else _CURRENT).search(str(exc))
    return match[1] if match else None


@contextlib.asynccontextmanager
async def _probe_channel(connection: aiormq.abc.AbstractConnection) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A raw channel for checks that may make the broker close it (404/406), closed after use."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            await channel.close()
