"""Worker lifecycle: open and check connections, consume, drain on SIGTERM, close.

start():  Postgres pool (+ migrations) -> database clock (shared/timeline.py) -> robust AMQP connection ->
          topology -> appliers -> consumers
stop():   cancel consumers (stop taking work) -> wait for in-flight packs up to the deadline ->
          cancel the rest (left unacked: the broker redelivers them) -> close AMQP -> close the pool and clock
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

import asyncpg
from aio_pika.abc import AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

from shared.brokers import connect_robust
from shared.migrate import apply_migrations
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.timeline import Timeline
from shared.topology import Topology
from worker.consumer import Consumer
from worker.metrics import WorkerMetrics, metrics_server
from worker.repository import create_pool, delete_expired_processed

log = logging.getLogger("worker")

CLEANUP_INTERVAL = 600.0


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.pool: asyncpg.Pool | None = None
        # The worker reads the shared timeline only to spot requests stamped in the future (a gateway whose
        # clock is not synchronised with the database).
        self.timeline = Timeline.from_settings(settings, decides_shift=True)
        self.metrics = WorkerMetrics()
        self.metrics.clock.follow_timeline(self.timeline)
        self.metrics_server = metrics_server(settings, self.metrics)
        self.connection: AbstractRobustConnection | None = None
        # Strong references: aio-pika only restores channels and consumers that are still alive.
        self.consume_channel: AbstractRobustChannel | None = None
        self.publish_channel: AbstractRobustChannel | None = None
        self.reply_channel: AbstractRobustChannel | None = None
        self.queues: list[AbstractQueue] = []
        self.consumer_tags: list[str] = []
        self.consumer: Consumer | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        self.pool = await create_pool(settings.database_url, settings.db_pool_size)
        async with self.pool.acquire() as conn:
            if settings.migrate_on_start:
                await apply_migrations(conn)
            await conn.fetchval("SELECT 1 FROM customers LIMIT 1")
        await self.timeline.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()  # a taken METRICS_PORT fails start-up, like an unreachable broker
        self.connection = await connect_robust(settings.amqp_url, name="crm-worker", attempt_timeout=CONNECT_TIMEOUT)
        # Dead letters: confirmed, and an unroutable one raises (so its pack is not acked).
        self.publish_channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.reply_channel = await self.connection.channel(publisher_confirms=False)
        self.consume_channel = await self.connection.channel()
        assert self.consume_channel is not None and self.publish_channel is not None
        assert self.reply_channel is not None
        await self.consume_channel.set_qos(prefetch_count=settings.worker_prefetch)
        _, self.queues = await self.topology.declare(self.consume_channel)
        self.consumer = Consumer(settings, self.topology, self.pool, self.publish_channel, self.reply_channel,
                                 self.timeline, self.metrics)
        self.tasks = [asyncio.create_task(self.consumer.run_applier()) for _ in range(settings.worker_concurrency)]
        self.tasks.append(asyncio.create_task(self._cleanup_loop()))
        for queue in self.queues:
            self.consumer_tags.append(await queue.consume(self.consumer.on_message))
        log.info("worker consuming %d shard queues (prefetch %d, batch %d)",
                 len(self.queues), settings.worker_prefetch, settings.worker_batch_size)

    async def stop(self) -> None:
        log.info("worker stopping: no new deliveries, draining in-flight work")
        for queue, tag in zip(self.queues, self.consumer_tags, strict=False):
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        if self.consumer is not None:
            drained = await self.consumer.drain(self.settings.shutdown_deadline)
            if not drained:
                log.warning("drain deadline reached with %d packs unsettled; they will be redelivered",
                            len(self.consumer.unsettled))
            self.consumer.cancel_retries()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.connection is not None:
            await self.connection.close()
        if self.pool is not None:
            await self.pool.close()
        await self.timeline.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        log.info("worker stopped")

    async def _cleanup_loop(self) -> None:
        retention = dt.timedelta(hours=self.settings.processed_retention_hours)
        while True:
            await asyncio.sleep(CLEANUP_INTERVAL)
            try:
                assert self.pool is not None
                async with self.pool.acquire() as conn:
                    deleted = await delete_expired_processed(conn, retention)
                if deleted:
                    log.info("forgot %d processed request ids older than %s", deleted, retention)
            except Exception as exc:
                log.warning("cleanup of processed requests failed: %s", exc)
