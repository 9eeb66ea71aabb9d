"""Request/reply over RabbitMQ with publisher confirms and per-shard packing.

``RpcClient.submit(envelope)`` returns once the broker has *confirmed* the request (it is durable from then
on) and gives back a future for the worker's outcome. Requests for the same shard that arrive while a
publish is awaiting its confirm are packed into the next message: one message and one confirm carry many
requests under load, and a lone request still goes out at once.

Replies come on this gateway's own exclusive queue and are matched by request id, so any number of
requests can be in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiohttp import web

from gateway.metrics import GatewayMetrics
from shared.brokers import ChannelRecycler, connect_robust
from shared.envelope import Outcome, RequestEnvelope, decode_reply, encode_pack
from shared.errors import ServiceUnavailable
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.topology import Topology, shard_for

log = logging.getLogger("gateway.rpc")

BROKER_DOWN = "消息队列暂不可用"
QUEUE_FULL = "消息队列已满，请求未被受理，请稍后重试"
BROKER_BLOCKED = "消息队列资源告警（内存或磁盘），请求未被受理，请稍后重试"


ALARM_PROBE_INTERVAL = 1.0
BLOCKED_CHECK_INTERVAL = 0.05  # reads one flag: checking often costs nothing
ALARM_PROBE_KEY = "alarm-probe"  # bound to no queue


def broker_blocked(connection: AbstractRobustConnection | None) -> bool:
    """True while RabbitMQ has blocked this connection (a memory or disk alarm: ``connection.blocked``).

    aiormq tracks the notification in a private event and simply holds every write until ``unblocked``; it has
    no public accessor, so this reads that event where it exists (aiormq 6.x). Elsewhere it answers False and a
    publish during an alarm ends in PUBLISH_TIMEOUT's 503 instead of an immediate one (tests/test_backpressure.py
    really raises an alarm, so a change in aiormq shows up there). See ``RpcClient._probe_alarms`` for why the
    gateway publishes a probe every second.
    """
    underlying = getattr(getattr(connection, "transport", None), "connection", None)
    unblocked = getattr(underlying, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


@dataclass(eq=False, slots=True)
class _Queued:
    envelope: RequestEnvelope
    confirmed: asyncio.Future[None]
    deadline: float  # loop time after which an unsent request is withdrawn (503)


@dataclass(eq=False)
class _Shard:
    queued: list[_Queued] = field(default_factory=list)
    publishing: int = 0  # publishes of this shard awaiting their confirm


class RpcClient:
    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.topology = Topology.from_settings(settings)
        self.instance = uuid.uuid4().hex[:12]
        self.connection: AbstractRobustConnection | None = None
        # Strong references: aio-pika restores only channels/queues/consumers that are still referenced.
        self.channel: AbstractRobustChannel | None = None
        self.exchange: AbstractExchange | None = None
        self.reply_queue: AbstractQueue | None = None
        self.pending: dict[str, asyncio.Future[Outcome]] = {}
        self._shards = [_Shard() for _ in range(settings.shard_count)]
        self._recyclers = [ChannelRecycler() for _ in range(settings.shard_count)]
        self._flush_tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._reply_tag: str | None = None
        self._alarm_probe: asyncio.Task[None] | None = None
        self._alarm_watch: asyncio.Task[None] | None = None
        # Requests on the wire, waiting for their publisher confirm (see _answer_blocked).
        self._awaiting_confirm: set[_Queued] = set()

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self.connection = await connect_robust(
            self.settings.amqp_url, name=f"crm-gateway-{self.instance}", attempt_timeout=CONNECT_TIMEOUT)
        # on_return_raises: a request the broker cannot route is an error (503), never silently accepted.
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        assert self.channel is not None
        # The gateway declares the shard queues too: a request accepted before any worker started must
        # have a queue to land in, or the broker would drop it.
        self.exchange, _ = await self.topology.declare(self.channel)
        self.reply_queue = await self.channel.declare_queue(
            self.topology.reply_queue(self.instance), exclusive=True, auto_delete=True
        )
        self._reply_tag = await self.reply_queue.consume(self._on_reply, no_ack=True)
        self._sweeper = asyncio.create_task(self._withdraw_expired())
        self._alarm_probe = asyncio.create_task(self._probe_alarms())
        self._alarm_watch = asyncio.create_task(self._answer_blocked())
        log.info("gateway %s connected; replies on %s", self.instance, self.reply_queue.name)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in (self._alarm_probe, self._alarm_watch):
            if task is not None:
                task.cancel()
        if self._flush_tasks:
            await asyncio.gather(*self._flush_tasks, return_exceptions=True)
        if self.connection is not None:
            await self.connection.close()

    @property
    def available(self) -> bool:
        connection = self.connection
        return (
            connection is not None
            and connection.connected.is_set()
            and self.channel is not None
            and not self.channel.is_closed
        )

    @property
    def blocked(self) -> bool:
        return broker_blocked(self.connection)

    @property
    def replies_consuming(self) -> bool:
        """The reply consumer is registered on a usable channel (aio-pika restores it after a reconnect)."""
        return self._reply_tag is not None and self.available

    # ---- requests -----------------------------------------------------------------------------------

    async def submit(self, envelope: RequestEnvelope) -> asyncio.Future[Outcome]:
        """Publish ``envelope``; return the future of its outcome once the broker confirmed it.

        Raises ``ServiceUnavailable`` when the broker is unreachable or does not confirm in time.
        """
        if not self.available:
            raise ServiceUnavailable(BROKER_DOWN)
        if self.blocked:
            raise ServiceUnavailable(BROKER_BLOCKED)
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Outcome] = loop.create_future()
        confirmed: asyncio.Future[None] = loop.create_future()
        self.pending[envelope.request_id] = outcome
        shard_index = shard_for(envelope.user_id, self.settings.shard_count)
        shard = self._shards[shard_index]
        shard.queued.append(_Queued(envelope, confirmed, loop.time() + self.settings.publish_timeout))
        if shard.publishing < self.settings.publishes_in_flight:
            shard.publishing += 1
            task = asyncio.create_task(self._flush(shard_index))
            self._flush_tasks.add(task)
            task.add_done_callback(self._flush_tasks.discard)
        # Settles within PUBLISH_TIMEOUT: every publish carries that timeout, and a request still queued at its
        # deadline is withdrawn by _withdraw_expired (one timer for all requests, not one each).
        try:
            await confirmed
        except BaseException:
            self.pending.pop(envelope.request_id, None)
            raise
        return outcome

    def forget(self, request_id: str) -> None:
        """Stop waiting for a reply (the caller answered 202)."""
        self.pending.pop(request_id, None)

    async def _flush(self, shard_index: int) -> None:
        shard = self._shards[shard_index]
        try:
            while shard.queued:
                batch = shard.queued[: self.settings.max_pack_size]
                del shard.queued[: len(batch)]
                self.metrics.observe_pack(len(batch))
                self._awaiting_confirm.update(batch)
                try:
                    await self._publish_pack(shard_index, [item.envelope for item in batch])
                except Exception as exc:
                    # Sent or not, unconfirmed: 503 (docs/api.md: retry with the same Idempotency-Key). A nack is a
                    # refusal, surely not accepted: the bounded shard queue is full (x-overflow reject-publish), or
                    # the channel is stuck refusing a queue whose leader moved (shared.brokers.ChannelRecycler).
                    self.metrics.count_publish(confirmed=False)
                    rejected = isinstance(exc, aio_pika.exceptions.DeliveryError) and not isinstance(
                        exc, aio_pika.exceptions.PublishError)  # PublishError: returned unroutable, not a nack
                    full = rejected and await self._queue_full(shard_index)
                    reason = QUEUE_FULL if full else BROKER_BLOCKED if self.blocked else BROKER_DOWN
                    log.warning("publish of %d requests %s: %s", len(batch),
                                "refused (queue full)" if full else "refused" if rejected else "failed", exc)
                    for item in batch:
                        if not item.confirmed.done():
                            item.confirmed.set_exception(ServiceUnavailable(reason))
                else:
                    self.metrics.count_publish(confirmed=True)
                    for item in batch:
                        if not item.confirmed.done():
                            item.confirmed.set_result(None)
                finally:
                    self._awaiting_confirm.difference_update(batch)
        finally:
            shard.publishing -= 1

    async def _probe_alarms(self) -> None:
        """Publish an empty, unroutable message every second, so that a broker alarm is known at once.

        RabbitMQ tells a connection it is blocked (``connection.blocked``) only when the connection publishes
        during the alarm. Without this probe the first requests after an alarm would hang until PUBLISH_TIMEOUT;
        with it, ``blocked`` turns true within a second of the alarm and requests get 503 at once. The probe is
        routed nowhere (no binding has its key) and not persistent: the broker drops it.
        """
        while True:
            await asyncio.sleep(ALARM_PROBE_INTERVAL)
            if self.exchange is None or not self.available or self.blocked:
                continue
            with contextlib.suppress(Exception):
                await self.exchange.publish(
                    aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                    routing_key=ALARM_PROBE_KEY, mandatory=False, timeout=ALARM_PROBE_INTERVAL,
                )

    async def _queue_full(self, shard_index: int) -> bool:
        """After a nack: is the shard queue full? If not, its channel is reopened (``ChannelRecycler``)."""
        if self.channel is None or self.channel.is_closed:
            return False
        try:
            return await self._recyclers[shard_index].after_nack(
                self.channel, self.topology.shard_queue(shard_index), self.topology.max_length)
        except Exception:  # the channel went away meanwhile: not "full"
            return False

    async def _answer_blocked(self) -> None:
        """Once the connection is known to be blocked (an alarm), answer 503 for every request still waiting for
        its confirm, at once instead of at PUBLISH_TIMEOUT.

        A blocked connection is not read by the broker, so those publishes are not accepted now; they may be
        once the alarm ends — the 503 says "not accepted, retry with the same Idempotency-Key" (docs/api.md), and a
        retry of one that did land is answered from processed_requests.
        """
        while True:
            await asyncio.sleep(BLOCKED_CHECK_INTERVAL)
            if self._awaiting_confirm and self.blocked:
                waiting = [item for item in self._awaiting_confirm if not item.confirmed.done()]
                for item in waiting:
                    item.confirmed.set_exception(ServiceUnavailable(BROKER_BLOCKED))
                if waiting:
                    log.warning("broker alarm: %d requests waiting for a confirm answered 503", len(waiting))

    async def _withdraw_expired(self) -> None:
        """Answer 503 for requests still waiting to be sent at their deadline; they are never sent."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            for shard in self._shards:
                if shard.queued and shard.queued[0].deadline <= now:
                    expired = [item for item in shard.queued if item.deadline <= now]
                    shard.queued = [item for item in shard.queued if item.deadline > now]
                    for item in expired:
                        if not item.confirmed.done():
                            item.confirmed.set_exception(ServiceUnavailable(BROKER_DOWN))

    async def _publish_pack(self, shard_index: int, envelopes: list[RequestEnvelope]) -> None:
        assert self.exchange is not None and self.reply_queue is not None
        message = aio_pika.Message(
            encode_pack(envelopes),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=self.reply_queue.name,
            message_id=envelopes[0].request_id,
        )
        await self.exchange.publish(
            message, routing_key=self.topology.routing_key(shard_index),
            timeout=self.settings.publish_timeout,
        )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            outcomes = decode_reply(message.body)
        except Exception as exc:
            log.warning("ignoring malformed reply: %s", exc)
            return
        for outcome in outcomes:
            future = self.pending.pop(outcome.request_id, None)
            if future is not None and not future.done():
                future.set_result(outcome)


RPC = web.AppKey("rpc", RpcClient)
