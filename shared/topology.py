"""RabbitMQ names, the shard function, and the declaration of everything both sides rely on.

Layout (all durable):
    <prefix>.requests   direct exchange; routing key ``shard.<n>``
    <prefix>.shard.<n>  one queue per shard, bound with ``shard.<n>``; every worker consumes every shard
    <prefix>.dead       dead-letter queue (classic, so listing and requeueing keep the order)
    <prefix>.topology   marker exchange (internal, never published to) recording SHARD_COUNT and QUEUE_TYPE

Every process checks its topology against the broker's before declaring anything (``declare``): a gateway
routing by 3 shards while the workers consume 2 would accept requests that nobody ever applies. Three checks,
each turned into one ``TopologyMismatch`` line naming both values:
1. no ``<prefix>.shard.<SHARD_COUNT>`` queue exists (more shards, or one left behind by a reduced count);
2. the shard queues' ``x-queue-type``, which RabbitMQ compares on re-declaration (PRECONDITION_FAILED): shard 0
   is declared first, then every shard in ``declare``;
3. the marker: RabbitMQ compares only one argument of an exchange on re-declaration, ``alternate-exchange``
   (custom ``x-`` arguments are ignored, checked on 3.10 and in 4.x's source), so the marker carries the
   topology there: ``shard-count=3,queue-type=quorum``. The first process declares it; any other value is
   refused with PRECONDITION_FAILED, whose text names the value already on the broker.
The checks run on channels of their own, which the broker closes on failure, not on the caller's; existing
deployments (no marker yet) pass checks 1 and 2 and get their marker from the first process that starts.

Only features RabbitMQ 3.10 already has are used: direct exchanges, quorum/classic queues, publisher confirms.
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
    "the README's \"Changing SHARD_COUNT or QUEUE_TYPE\" says"


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

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(settings.amqp_prefix, settings.shard_count, settings.queue_type, settings.queue_max_length)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead"

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
        return format_marker(self.shard_count, self.queue_type)

    def describe(self) -> str:
        return f"SHARD_COUNT={self.shard_count} QUEUE_TYPE={self.queue_type}"

    async def declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.DIRECT, durable=True)

    async def declare(self, channel: AbstractChannel) -> tuple[AbstractExchange, list[aio_pika.abc.AbstractQueue]]:
        """Check the topology against the broker's, then declare exchange, shard queues and the dead-letter
        queue; idempotent. Raises ``TopologyMismatch`` (one line) when this process's differs."""
        unbounded = await self.check_against_broker(channel)
        exchange = await self.declare_exchange(channel)
        queues = []
        for shard in range(self.shard_count):
            name = self.shard_queue(shard)
            try:
                if name in unbounded:  # exists with another bound: take it as it is (see _probe_shard_queues)
                    queue = await channel.declare_queue(name, passive=True)
                else:
                    queue = await channel.declare_queue(name, durable=True, arguments=self.shard_arguments)
            except ChannelPreconditionFailed as exc:
                raise self._queue_mismatch(name, exc) from None
            await queue.bind(exchange, self.routing_key(shard))
            queues.append(queue)
        await self.declare_dead_letter_queue(channel)
        return exchange, queues

    async def check_against_broker(self, channel: AbstractChannel) -> set[str]:
        """Checks 1-3 of the module docstring; declares the marker when it is absent (first process).

        Returns the shard queues that exist with another bound (see ``_probe_shard_queues``)."""
        connection = (await channel.get_underlay_channel()).connection
        beyond = self.shard_queue(self.shard_count)
        async with _probe_channel(connection) as probe:
            try:
                await probe.queue_declare(beyond, passive=True)
            except ChannelNotFoundEntity:
                pass  # the normal case
            else:
                raise TopologyMismatch(
                    f"topology mismatch: queue {beyond} exists on RabbitMQ but this process has {self.describe()} "
                    f"(shards 0..{self.shard_count - 1}): another process uses more shards, or "
                    f"a reduced SHARD_COUNT left it behind (drain and delete it); {CHANGE_HINT}")
        # The queues first: the marker must not be created with a type the queues do not have.
        unbounded = await self._probe_shard_queues(connection)
        async with _probe_channel(connection) as probe:
            try:
                await probe.exchange_declare(
                    self.marker_exchange, exchange_type="fanout", durable=True, internal=True,
                    arguments={"alternate-exchange": self.marker_value},
                )
            except ChannelPreconditionFailed as exc:
                current = _current_value(exc)
                parsed = parse_marker(current) if current is not None else None
                theirs = (f"SHARD_COUNT={parsed[0]} QUEUE_TYPE={parsed[1]}" if parsed is not None
                          else f"{current!r}" if current is not None else "another topology")
                raise TopologyMismatch(
                    f"topology mismatch: this process has {self.describe()} but RabbitMQ already has {theirs} "
                    f"for prefix {self.prefix!r} (exchange {self.marker_exchange}); {CHANGE_HINT}") from None
        return unbounded

    async def _probe_shard_queues(self, connection: aiormq.abc.AbstractConnection) -> set[str]:
        """Declare every shard queue with our arguments on a probe channel; a different queue type is fatal.

        A queue that exists with another bound (``x-max-length`` / ``x-overflow``: created before the bound
        existed, or with another QUEUE_MAX_LENGTH) cannot be changed by re-declaring it — RabbitMQ refuses
        (PRECONDITION_FAILED). It is used as it is, with a warning: an operator changes a bound with a policy
        (README, "Bounded queues"), which RabbitMQ applies to existing queues too.
        """
        unbounded: set[str] = set()
        for shard in range(self.shard_count):
            name = self.shard_queue(shard)
            async with _probe_channel(connection) as probe:
                try:
                    await probe.queue_declare(name, durable=True, arguments=self.shard_arguments)
                except ChannelPreconditionFailed as exc:
                    argument = _inequivalent_argument(exc)
                    if argument not in _BOUND_ARGUMENTS:
                        raise self._queue_mismatch(name, exc) from None
                    unbounded.add(name)
                    log.warning("queue %s exists with %s %s, not %r as QUEUE_MAX_LENGTH says: queue arguments "
                                "cannot change, so it is used as it is; set the bound with a policy (README, "
                                "\"Bounded queues\")", name, argument, _current_value(exc) or "unset",
                                self.shard_arguments[argument])
        return unbounded

    def _queue_mismatch(self, name: str, exc: BaseException) -> TopologyMismatch:
        current = _current_value(exc)
        return TopologyMismatch(
            f"topology mismatch: queue {name} exists on RabbitMQ with x-queue-type {current or 'different'} but "
            f"this process has QUEUE_TYPE={self.queue_type}; {CHANGE_HINT}")

    @property
    def shard_arguments(self) -> dict[str, Any]:
        # A safety net, not the normal path: RabbitMQ 4 gives quorum queues a default delivery limit (20), and a
        # message redelivered more often (say, workers crash-looping on it) is dropped unless the queue has a
        # dead-letter target. With this one it lands in the dead-letter queue, where the replay tool sees it.
        return {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_letter_queue,
            # Backpressure, never silent loss: a full queue refuses new publishes (the gateway gets a nack and
            # answers 503) instead of dropping the oldest (the default, drop-head) or growing without end.
            "x-max-length": self.max_length,
            "x-overflow": "reject-publish",
        }

    async def declare_dead_letter_queue(self, channel: AbstractChannel) -> aio_pika.abc.AbstractQueue:
        return await channel.declare_queue(
            self.dead_letter_queue, durable=True, arguments={"x-queue-type": "classic"}
        )


def format_marker(shard_count: int, queue_type: str) -> str:
    """The marker exchange's ``alternate-exchange`` value: ``shard-count=3,queue-type=quorum``."""
    return f"shard-count={shard_count},queue-type={queue_type}"


_MARKER = re.compile(r"shard-count=(\d+),queue-type=(\w+)")
# RabbitMQ's PRECONDITION_FAILED text: "... received 'X' but current is 'Y'" (3.10+), or "... received the
# value 'X' of type 'longstr' but current is the value 'Y' of type 'longstr'" when the types differ.
_CURRENT = re.compile(r"but current is (?:the value )?'([^']*)'")


# "... inequivalent arg 'x-max-length' for queue 'crm.shard.0' in vhost '/': received '5' but current is '2'"
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'")
_BOUND_ARGUMENTS = frozenset({"x-max-length", "x-overflow"})


def _inequivalent_argument(exc: BaseException) -> str | None:
    match = _INEQUIVALENT.search(str(exc))
    return match[1] if match else None


def parse_marker(value: str) -> tuple[int, str] | None:
    match = _MARKER.fullmatch(value)
    return (int(match[1]), match[2]) if match else None


def _current_value(exc: BaseException) -> str | None:
    match = _CURRENT.search(str(exc))
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
