"""Transport side of the worker: the one place where messages are acked, retried or dead-lettered.

Flow: ``on_message`` splits each delivered pack into work items and queues them; ``run_applier`` loops
take batches (``worker.batch``), apply them in one transaction (``worker.repository``), publish the replies
and ack every pack whose requests are all settled. Error policy (``shared.errors``):

* transient database trouble: keep everything unacked, back off (capped), try the same batch again;
* anything else on a batch: split it and apply each request alone, so one poison request cannot fail its
  neighbours;
* a request that fails alone: retried ``max_attempts`` times with exponential backoff, then published to the
  dead-letter queue (confirmed) and answered with a failure reply. Only then is its pack acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import ValidationError

from shared.brokers import ChannelRecycler
from shared.clock.timeline import Timeline
from shared.envelope import Outcome, RequestEnvelope, decode_pack, encode_reply
from shared.errors import PermanentError, is_transient
from shared.logs import log_event, mask_text
from shared.settings import Settings
from shared.topology import Topology
from worker.batch import Inbox
from worker.deadletter import dead_letter_message
from worker.metrics import WorkerMetrics
from worker.repository import Request, apply_batch, record_failure

log = logging.getLogger("worker.consumer")

# Transient errors that come from the data of the batch rather than from the environment: the batch is
# split instead of being retried whole (an in-batch phone swap would otherwise fail the same way forever).
_SPLIT_ON = (
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


@dataclass(eq=False)
class Delivery:
    """One AMQP message (a pack of requests); acked once every request in it is settled."""

    message: AbstractIncomingMessage
    pending: int


@dataclass(eq=False)
class WorkItem:
    raw: dict[str, Any]
    delivery: Delivery
    request: Request | None
    invalid: BaseException | None = None
    attempts: int = 0
    first_failure: dt.datetime | None = None

    @property
    def request_id(self) -> str | None:
        value = self.raw.get("request_id")
        return value if isinstance(value, str) else None

    @property
    def user_id(self) -> str | None:
        value = self.raw.get("user_id")
        return value if isinstance(value, str) else None


# Whole-batch retries of a transient error before checking whether the database itself is fine.
SUSPECT_BATCH_AFTER = 3
# Seconds between two log lines about requests stamped in the future (each is counted).
FUTURE_STAMP_LOG_INTERVAL = 10.0
# The dead-letter queue has no bound: a nack there is never "full" (ChannelRecycler reopens the channel).
DEAD_LETTER_QUEUE_NEVER_FULL = 2**62
# Quick retries of a lone request that hit a conflict (unique violation, deadlock) before it counts as failing.
RACE_RETRIES = 3


def _stamp(item: WorkItem) -> int:
    return item.request.envelope.stamp if item.request is not None else 0


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2*base, 4*base... never above cap (attempt counts from 1)."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


@dataclass(eq=False)
class Consumer:
    settings: Settings
    topology: Topology
    pool: asyncpg.Pool
    # Dead letters are published with confirms (the pack is acked only once the broker has them); replies
    # are not: a lost reply only turns the gateway's answer into a 202.
    publish_channel: AbstractChannel
    reply_channel: AbstractChannel
    timeline: Timeline
    metrics: WorkerMetrics
    inbox: Inbox = field(default_factory=Inbox)
    unsettled: set[Delivery] = field(default_factory=set)
    _retry_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _dead_letter_recycler: ChannelRecycler = field(default_factory=ChannelRecycler)
    future_stamps: int = 0
    _future_stamps_logged_at: float = -FUTURE_STAMP_LOG_INTERVAL

    def __post_init__(self) -> None:
        self._idle.set()

    # ---- intake -------------------------------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Consumer callback: split the pack into work items (never blocks on the database)."""
        try:
            raws = decode_pack(message.body)
        except PermanentError as exc:
            # Not a pack at all: retrying cannot change the bytes, so it is dead-lettered at once.
            delivery = Delivery(message, pending=1)
            self._track(delivery)
            item = WorkItem(raw={}, delivery=delivery, request=None, invalid=exc, attempts=1)
            await self._dead_letter(item, exc, body=message.body)
            return
        delivery = Delivery(message, pending=len(raws))
        if not raws:
            await self._ack(delivery)
            return
        self._track(delivery)
        items = [self._work_item(raw, delivery) for raw in raws]
        self._check_stamps(items)
        for item in items:
            if item.request is None:
                self._schedule_retry(item, item.invalid or PermanentError("invalid request"))
            else:
                self.inbox.put(item)

    def _work_item(self, raw: dict[str, Any], delivery: Delivery) -> WorkItem:
        try:
            envelope = RequestEnvelope.model_validate(raw)
            return WorkItem(raw, delivery, Request(envelope, envelope.customer()))
        except (ValidationError, PermanentError) as exc:
            error = exc if isinstance(exc, PermanentError) else PermanentError(f"invalid envelope: {exc}")
            return WorkItem(raw, delivery, None, invalid=error)

    def _check_stamps(self, items: list[WorkItem]) -> None:
        """Detection: a request stamped further in the future than the bound comes from a process that does
        not stamp on the shared timeline (its gateway never reached the database and uses its wall clock).
        Logged at most every few seconds, counted always."""
        if not self.timeline.synchronized:
            return
        limit = self.timeline.now_us() + self.timeline.bound_us
        for item in items:
            if item.request is not None and item.request.envelope.stamp > limit:
                self.future_stamps += 1
                self.metrics.count_future_stamp()
                now = time.monotonic()
                if now - self._future_stamps_logged_at >= FUTURE_STAMP_LOG_INTERVAL:
                    self._future_stamps_logged_at = now
                    ahead_ms = (item.request.envelope.stamp - self.timeline.now_us()) / 1000
                    log.warning("request %s is stamped %.1f ms in the future (beyond CLOCK_SKEW_BOUND_MS): its "
                                "gateway's clock is not synchronised with the database (%d such requests so far)",
                                item.request_id, ahead_ms, self.future_stamps,
                                extra={"request_id": item.request_id})

    def _track(self, delivery: Delivery) -> None:
        self.unsettled.add(delivery)
        self._idle.clear()

    # ---- applying -----------------------------------------------------------------------------------

    async def run_applier(self) -> None:
        """Take batches from the inbox forever (one of ``worker_concurrency`` such loops)."""
        while True:
            items = await self.inbox.next_batch(self.settings.worker_batch_size)
            try:
                await self._apply_items(items)
            except Exception:  # a bug, not a message problem: keep the loop alive, leave them unacked
                log.exception("applier failed on %d requests; they stay unacked until redelivery", len(items))

    async def _apply_items(self, items: list[WorkItem]) -> None:
        """Apply ``items`` in one transaction, or find out which of them is the problem.

        A transient error while the database is down is retried on the whole batch for as long as it takes.
        When the database answers but the batch keeps failing, the batch is split (in stamp order) and each
        request is applied alone; a lone request that keeps failing goes to the bounded retries that end in
        the dead-letter queue.
        """
        attempt = 0
        failures_while_database_answers = 0
        while True:
            try:
                outcomes = await self._apply_in_db(items)
            except Exception as exc:
                attempt += 1
                if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
                    # Connected to a standby: new connections may reach the primary (libpq host lists).
                    await self.pool.expire_connections()
                if is_transient(exc) and not isinstance(exc, _SPLIT_ON):
                    if attempt >= SUSPECT_BATCH_AFTER and await self._database_answers():
                        failures_while_database_answers += 1
                    # One failure right after an outage is normal (a connection from before it); two are not.
                    if failures_while_database_answers < 2:
                        delay = backoff(attempt, self.settings.retry_base_delay, self.settings.retry_max_delay)
                        log.warning("transient database error (%s: %s); retrying %d requests in %.1fs",
                                    exc.__class__.__name__, exc, len(items), delay)
                        self.metrics.count_transient_retry(len(items))
                        await asyncio.sleep(delay)
                        continue
                if len(items) > 1:
                    log.warning("batch of %d failed (%s: %s); applying one by one",
                                len(items), exc.__class__.__name__, exc)
                    for item in sorted(items, key=_stamp):
                        await self._apply_items([item])
                    return
                if isinstance(exc, _SPLIT_ON) and attempt < RACE_RETRIES:
                    # Most likely a race lost to another worker: the retry sees the winner's row and decides.
                    log.info("request %s: %s, retrying", items[0].request_id, exc.__class__.__name__,
                             extra={"request_id": items[0].request_id})
                    self.metrics.count_transient_retry()
                    await asyncio.sleep(backoff(attempt, 0.05, 1.0))
                    continue
                self._schedule_retry(items[0], exc)
                return
            await self._settle(items, outcomes)
            return

    async def _database_answers(self) -> bool:
        """True when Postgres answers *and accepts writes*: then a failing batch is the batch's fault.

        A standby answers queries but refuses every write (read-only transaction): that is the database being
        unavailable, exactly like an outage, so its batches are retried and never split or dead-lettered.
        """
        try:
            async with asyncio.timeout(5):
                async with self.pool.acquire() as conn:
                    read_only = await conn.fetchval("SELECT current_setting('transaction_read_only')")
            return bool(read_only == "off")
        except Exception:
            return False

    async def _apply_in_db(self, items: list[WorkItem]) -> list[Outcome]:
        window = dt.timedelta(hours=self.settings.idempotency_window_hours)
        started = time.perf_counter()
        duplicates: set[str] = set()
        async with self.pool.acquire() as conn:
            outcomes = await apply_batch(conn, [item.request for item in items if item.request], window,
                                         duplicates)
        elapsed = time.perf_counter() - started
        self.metrics.observe_batch(len(items), elapsed)
        for outcome in outcomes:
            if outcome.request_id in duplicates:
                self.metrics.count_applied("duplicate")
            elif outcome.status != "failed":
                self.metrics.count_applied(outcome.status)
        if duplicates:
            self.metrics.count_redelivery_deduplicated(len(duplicates))
        log.debug("applied %d requests in %.1f ms", len(items), elapsed * 1000)
        return outcomes

    # ---- poison requests ----------------------------------------------------------------------------

    def _schedule_retry(self, item: WorkItem, exc: BaseException) -> None:
        now = dt.datetime.now(dt.UTC)
        item.attempts += 1
        item.first_failure = item.first_failure or now
        if item.attempts >= self.settings.max_attempts:
            task = asyncio.create_task(self._dead_letter(item, exc))
        else:
            delay = backoff(item.attempts, self.settings.retry_base_delay, self.settings.retry_max_delay)
            log.warning("request %s failed (attempt %d/%d: %s: %s); retrying in %.1fs", item.request_id,
                        item.attempts, self.settings.max_attempts, exc.__class__.__name__, exc, delay,
                        extra={"request_id": item.request_id})
            task = asyncio.create_task(self._retry_after(item, delay))
        self._retry_tasks.add(task)
        task.add_done_callback(self._retry_tasks.discard)

    async def _retry_after(self, item: WorkItem, delay: float) -> None:
        await asyncio.sleep(delay)
        if item.request is None:
            # A request that fails the shared schema fails it again: count the attempt and move on.
            self._schedule_retry(item, item.invalid or PermanentError("invalid request"))
            return
        await self._apply_items([item])

    async def _dead_letter(self, item: WorkItem, exc: BaseException, body: bytes | None = None) -> None:
        now = dt.datetime.now(dt.UTC)
        message = dead_letter_message(
            body if body is not None else orjson.dumps(item.raw),
            error=exc,
            attempts=item.attempts,
            first_failure=item.first_failure or now,
            last_failure=now,
            routing_key=item.delivery.message.routing_key or "",
            request_id=item.request_id,
            user_id=item.user_id,
        )
        while True:
            try:
                await self.publish_channel.default_exchange.publish(
                    message, routing_key=self.topology.dead_letter_queue
                )
                break
            except Exception as publish_error:  # broker trouble: the item stays unacked until it works
                log.warning("dead-lettering %s failed (%s); retrying", item.request_id, publish_error,
                            extra={"request_id": item.request_id})
                if isinstance(publish_error, aio_pika.exceptions.DeliveryError):  # nacked: maybe a stuck channel
                    with contextlib.suppress(Exception):
                        await self._dead_letter_recycler.after_nack(
                            self.publish_channel, self.topology.dead_letter_queue, DEAD_LETTER_QUEUE_NEVER_FULL)
                await asyncio.sleep(1.0)
        log.error("request %s dead-lettered after %d attempts: %s", item.request_id, item.attempts, exc,
                  extra={"request_id": item.request_id})
        self.metrics.count_dead_lettered()
        # Masked: the reason is shown by GET /api/external/requests/{id}, and database errors quote values.
        reason = mask_text(f"{exc.__class__.__name__}: {exc}")[:500]
        if item.request_id:
            await self._record_failure(item.request_id, item.user_id, reason)
        failed = None
        if item.request_id and item.user_id:
            failed = Outcome(request_id=item.request_id, user_id=item.user_id, status="failed", error=reason)
        await self._settle([item], [failed] if failed else [])

    async def _record_failure(self, request_id: str, user_id: str | None, reason: str) -> None:
        """Best effort: the dead letter is what counts; this row only feeds the request-status endpoint."""
        try:
            async with asyncio.timeout(5):
                async with self.pool.acquire() as conn:
                    await record_failure(conn, request_id, user_id, reason)
        except Exception as exc:
            log.warning("could not record the failure of %s (%s); its status stays pending", request_id, exc,
                        extra={"request_id": request_id})

    # ---- replies and acks ---------------------------------------------------------------------------

    async def _settle(self, items: list[WorkItem], outcomes: Iterable[Outcome]) -> None:
        """Reply to the waiting gateways, then ack every pack that has nothing left pending."""
        by_request = {outcome.request_id: outcome for outcome in outcomes}
        replies: dict[str, list[Outcome]] = defaultdict(list)
        for item in items:
            reply_to = item.delivery.message.reply_to
            outcome = by_request.get(item.request_id or "")
            if reply_to and outcome is not None:
                replies[reply_to].append(outcome)
        await asyncio.gather(*(self._reply(reply_to, batch) for reply_to, batch in replies.items()))
        for outcome in by_request.values():  # one line per request, carrying the gateway's request id
            if outcome.status != "failed":  # a failure has its own "dead-lettered" line
                log_event(log, f"request {outcome.status}", {
                    "request_id": outcome.request_id, "user_id": outcome.user_id, "customer_id": outcome.id})
        for item in items:
            item.delivery.pending -= 1
            if item.delivery.pending == 0:
                await self._ack(item.delivery)

    async def _reply(self, reply_to: str, outcomes: list[Outcome]) -> None:
        try:
            await self.reply_channel.default_exchange.publish(
                aio_pika.Message(encode_reply(outcomes), content_type="application/json"),
                routing_key=reply_to,
                mandatory=False,
            )
        except Exception as exc:
            # The write is committed; a lost reply only turns the gateway's answer into 202.
            log.warning("reply to %s lost: %s", reply_to, exc)

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.message.ack()
        except Exception as exc:
            # The channel died after the commit: the broker redelivers and processed_requests answers.
            log.warning("ack failed (%s); the message will be redelivered and deduplicated", exc)
        self.unsettled.discard(delivery)
        if not self.unsettled:
            self._idle.set()

    # ---- shutdown -----------------------------------------------------------------------------------

    async def drain(self, deadline: float) -> bool:
        """Wait until every delivered pack is settled, at most ``deadline`` seconds; True if all were."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=deadline)
            return True
        except TimeoutError:
            return False

    def cancel_retries(self) -> None:
        for task in list(self._retry_tasks):
            task.cancel()
