"""RabbitMQ names, the shard function, and the declaration of everything both sides rely on.

Layout (all durable):
    <prefix>.requests   direct exchange; routing key ``shard.<n>``
    <prefix>.shard.<n>  one queue per shard, bound with ``shard.<n>``; every worker consumes every shard
    <prefix>.dead       dead-letter queue (classic, so listing and requeueing keep the order)

Only features RabbitMQ 3.10 already has are used: direct exchanges, quorum/classic queues, publisher confirms.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from shared.settings import Settings


def shard_for(user_id: str, shard_count: int) -> int:
    """Stable shard of a userId: crc32 of its UTF-8 bytes modulo the shard count."""
    return zlib.crc32(user_id.encode("utf-8")) % shard_count


@dataclass(frozen=True)
class Topology:
    prefix: str
    shard_count: int
    queue_type: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(settings.amqp_prefix, settings.shard_count, settings.queue_type)

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

    async def declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.DIRECT, durable=True)

    async def declare(self, channel: AbstractChannel) -> tuple[AbstractExchange, list[aio_pika.abc.AbstractQueue]]:
        """Declare exchange, shard queues and the dead-letter queue; idempotent."""
        exchange = await self.declare_exchange(channel)
        queues = []
        for shard in range(self.shard_count):
            queue = await channel.declare_queue(self.shard_queue(shard), durable=True, arguments=self.shard_arguments)
            await queue.bind(exchange, self.routing_key(shard))
            queues.append(queue)
        await self.declare_dead_letter_queue(channel)
        return exchange, queues

    @property
    def shard_arguments(self) -> dict[str, Any]:
        # A safety net, not the normal path: RabbitMQ 4 gives quorum queues a default delivery limit (20), and a
        # message redelivered more often (say, workers crash-looping on it) is dropped unless the queue has a
        # dead-letter target. With this one it lands in the dead-letter queue, where the replay tool sees it.
        return {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_letter_queue,
        }

    async def declare_dead_letter_queue(self, channel: AbstractChannel) -> aio_pika.abc.AbstractQueue:
        return await channel.declare_queue(
            self.dead_letter_queue, durable=True, arguments={"x-queue-type": "classic"}
        )
