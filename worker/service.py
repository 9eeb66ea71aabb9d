"""Worker lifecycle: open and check connections, consume, drain on SIGTERM, close.

start():  Postgres pool (+ migrations) -> database clock (shared/clock/timeline.py) -> metrics server -> AMQP
          connection (a node list, shared/brokers.py) -> topology -> appliers -> consumers; each opened resource
          is registered on one AsyncExitStack, so a failure half-way closes exactly what was opened
stop():   cancel consumers (stop taking work) -> wait for in-flight packs up to the deadline ->
          cancel the rest (left unacked: the broker redelivers them) -> close in reverse order: appliers, AMQP,
          metrics server, clock, pool
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

import asyncpg
from aio_pika.abc import AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

from shared.brokers import connect_robust
from shared.clock.timeline import Timeline
from shared.migrate import apply_migrations
from shared.settings import CONNECT_TIMEOUT, Settings
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
        # Everything start() opened, closed by stop() (or by start() itself when it fails half-way).
        self._resources = contextlib.AsyncExitStack()

    async def start(self) -> None:
        """Open and check everything, in order; on any failure close what was opened (one owner) and raise."""
        try:
            await self._open()
        except BaseException:
            logging.disable(logging.CRITICAL)  # the clean-up's own lines would follow the start-up error
            try:
                await self._resources.aclose()
            except Exception:
                pass
            finally:
                logging.disable(logging.NOTSET)
            raise

    async def _open(self) -> None:
        settings = self.settings
        resources = self._resources
        self.pool = await create_pool(settings.database_url, settings.db_pool_size)
        resources.push_async_callback(self.pool.close)
        async with self.pool.acquire() as conn:
            if settings.migrate_on_start:
                await apply_migrations(conn)
            await conn.fetchval("SELECT 1 FROM customers LIMIT 1")
        await self.timeline.start()
        resources.push_async_callback(self.timeline.stop)
        if self.metrics_server is not None:
            await self.metrics_server.start()  # a taken METRICS_PORT fails start-up, like an unreachable broker
            resources.push_async_callback(self.metrics_server.stop)
        self.connection = await connect_robust(settings.amqp_url, name="crm-worker", attempt_timeout=CONNECT_TIMEOUT)
        resources.push_async_callback(self.connection.close)
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
        resources.push_async_callback(self._cancel_tasks)  # closed first: before the connection and the pool
        for queue in self.queues:
            self.consumer_tags.append(await queue.consume(self.consumer.on_message))
        log.info("worker consuming %d shard queues (prefetch %d, batch %d)",
                 len(self.queues), settings.worker_prefetch, settings.worker_batch_size)

    async def stop(self) -> None:
        """Stop taking work, drain in-flight packs up to the deadline, then close everything ``start`` opened."""
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
        await self._resources.aclose()  # in reverse order of opening
        log.info("worker stopped")

    async def _cancel_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

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
