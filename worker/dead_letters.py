"""Dead letters: what one is, and moving them out of the broker's dead-letter queue into PostgreSQL.

Flow: a worker gives up on a request and publishes it, with headers saying why (``worker.deadletter``), to
``<prefix>.dead`` — a quorum queue on a cluster, replicated like the shards; the broker may dead-letter a whole
pack there too (a quorum queue's delivery limit, with ``x-death``). Whoever reads dead letters (the replay tool)
first *moves* them into the ``dead_letters`` table: get one, insert it, commit, then ack it. From then on they are
read, filtered, replayed and dropped there.

Why move them: on a quorum queue every get-and-return counts as a delivery (``x-delivery-count``), and a delivery
limit — RabbitMQ 4's default of 20, or an operator's ``delivery-limit`` policy — drops a message that was merely
*listed* that often. Rows in a table can be read any number of times, by any number of operators, in a stable
order, and searched. A message whose ack is lost after the commit is moved again and stored once (its
fingerprint, sha256 of body and headers, is unique per queue).

This module is also the one core behind both faces of the dead letters, the replay tool (``worker.replay``) and
the console (``console``): select with a ``LetterFilter`` (``stored``, ``count``), ``plan`` what a replay would
do to the stored rows (dry run), ``replay`` and ``drop`` — each recording its audit row — so the two can never
differ in what they select, how they replay (stale-safe unless forced) or what they audit.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import decimal
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError

from shared.cli import starting
from shared.clock.stamps import HybridClock
from shared.clock.timeline import SAMPLES_PER_SYNC, Timeline
from shared.envelope import RequestEnvelope
from shared.errors import PermanentError
from shared.logs import mask_payload, mask_text
from shared.model import wire_name
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.topology import Topology
from worker.deadletter import (
    H_ATTEMPTS,
    H_DEAD_AT,
    H_ERROR,
    H_EXCEPTION,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
    H_REPLAYED,
    H_REQUEST_ID,
    H_ROUTING_KEY,
    H_USER_ID,
)
from worker.merge import CustomerState
from worker.repository import LetterFilter as LetterFilter  # re-exported: the filter of every selection here
from worker.repository import RequestStatus as RequestStatus
from worker.repository import (
    count_audit,
    count_dead_letters,
    delete_dead_letters,
    insert_dead_letter,
    newest_field_stamp,
    record_audit,
    select_audit,
    select_customer_states,
    select_dead_letter,
    select_dead_letters,
    select_request_statuses,
)

log = logging.getLogger("worker.dead_letters")


@dataclass(eq=False)
class DeadLetter:
    """One message of the dead-letter queue: usually one request dead-lettered by a worker, or a whole pack
    dead-lettered by the broker itself (a quorum queue's delivery limit, see ``shared.topology``)."""

    row_id: int
    envelopes: list[dict[str, Any]]
    headers: dict[str, Any] = field(default_factory=dict)
    # When it died (the worker's x-dead-at, else when it was moved in); None before it is stored.
    dead_at: dt.datetime | None = None

    @classmethod
    def read(cls, row_id: int, body: bytes, headers: dict[str, Any], dead_at: dt.datetime | None = None,
             ) -> DeadLetter:
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            decoded = None
        envelopes: list[dict[str, Any]] = []
        if isinstance(decoded, dict) and "request_id" in decoded:
            envelopes = [decoded]
        elif isinstance(decoded, dict) and isinstance(decoded.get("requests"), list):
            envelopes = [r for r in decoded["requests"] if isinstance(r, dict) and "request_id" in r]
        return cls(row_id, envelopes, headers, dead_at)

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> DeadLetter:
        return cls.read(row["id"], row["body"], row["headers"], row["dead_at"])

    def search_columns(self) -> dict[str, Any]:
        """What the filters search (migration 0007): every userId and request id, every field value (a list's
        items one by one), and when it died."""
        user_ids = {str(e["user_id"]) for e in self.envelopes if e.get("user_id") is not None}
        values: set[str] = set()
        for envelope in self.envelopes:
            payload = envelope.get("payload")
            for value in (payload.values() if isinstance(payload, dict) else ()):
                for item in (value if isinstance(value, list) else [value]):
                    if item is None or item == "" or isinstance(item, dict | list):
                        continue
                    values.add(orjson.dumps(item).decode() if isinstance(item, bool) else str(item))
        return {
            "user_ids": sorted(user_ids | ({self.user_id} if self.user_id else set())),
            "request_ids": sorted(set(self.request_ids) | ({self.request_id} if self.request_id else set())),
            "field_values": sorted(values),
            "dead_at": _timestamp(self.headers.get(H_DEAD_AT)) or dt.datetime.now(dt.UTC),
        }

    @property
    def envelope(self) -> dict[str, Any] | None:
        return self.envelopes[0] if self.envelopes else None

    @property
    def request_ids(self) -> list[str]:
        return [str(e.get("request_id")) for e in self.envelopes]

    @property
    def request_id(self) -> str | None:
        value = (self.envelope or {}).get("request_id") or self.headers.get(H_REQUEST_ID)
        return str(value) if value is not None else None

    @property
    def user_id(self) -> str | None:
        value = (self.envelope or {}).get("user_id") or self.headers.get(H_USER_ID)
        return str(value) if value is not None else None

    @property
    def _x_death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death")
        return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}

    @property
    def reason(self) -> str:
        if H_ERROR in self.headers:
            return str(self.headers[H_ERROR])
        if self._x_death:
            return f"dead-lettered by the broker: {self._x_death.get('reason', 'unknown')}"
        return ""

    @property
    def routing_key(self) -> str | None:
        value = self.headers.get(H_ROUTING_KEY)
        if value is None:
            keys = self._x_death.get("routing-keys")
            value = keys[0] if isinstance(keys, list) and keys else None
        return str(value) if value is not None else None

    def summary(self, show_pii: bool) -> dict[str, Any]:
        payload = (self.envelope or {}).get("payload")
        if isinstance(payload, dict) and not show_pii:
            payload = mask_payload(payload)  # phones, WeChat id and name
        reason = self.reason if show_pii else mask_text(self.reason)  # database errors may quote values
        return {
            "id": self.row_id,
            "requestId": self.request_id,
            "userId": self.user_id,
            "reason": reason,
            "exception": self.headers.get(H_EXCEPTION) if show_pii else mask_text(
                str(self.headers.get(H_EXCEPTION) or "")) or None,
            "attempts": self.headers.get(H_ATTEMPTS),
            "firstFailureAt": self.headers.get(H_FIRST_FAILURE),
            "lastFailureAt": self.headers.get(H_LAST_FAILURE),
            "deadAt": self.headers.get(H_DEAD_AT) or (self.dead_at.isoformat() if self.dead_at else None),
            "routingKey": self.routing_key,
            "replayed": bool((self.envelope or {}).get("replayed") or self.headers.get(H_REPLAYED)),
            "payload": payload if self.envelope is not None else None,
            **({"requestIds": self.request_ids} if len(self.envelopes) > 1 else {}),
        }


def _timestamp(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.UTC)


def plain_headers(value: Any) -> Any:
    """AMQP header values as JSON-ready values (bytes as text, timestamps as ISO strings)."""
    if isinstance(value, dict):
        return {str(key): plain_headers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_headers(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


def fingerprint(body: bytes, headers: dict[str, Any]) -> str:
    return hashlib.sha256(body + b"\0" + orjson.dumps(headers, option=orjson.OPT_SORT_KEYS)).hexdigest()


# How long a move waits for the dead-letter queue to have a leader again: a get from a quorum queue whose leader
# node just died fails with "INTERNAL_ERROR ... nodedown" — a hard error, RabbitMQ closes the whole connection —
# until the other members have elected a new leader (a few seconds).
LEADER_WAIT = 30.0
LEADER_RETRY_PAUSE = 0.5


async def move_from_queue(connected: Callable[[], Awaitable[AbstractConnection]], conn: asyncpg.Connection,
                          topology: Topology) -> int:
    """Move every message of the dead-letter queue into ``dead_letters``; return how many were moved.

    Each message is acked only after its row is committed: a crash in between leaves it in the queue, and the
    next move stores it once (ON CONFLICT on its fingerprint). ``connected`` gives a usable AMQP connection
    (reconnecting when the last one was closed); the gets run on a channel of their own. After a ``nodedown``
    (the queue has no leader yet) the move waits for one, reconnecting as needed, for up to ``LEADER_WAIT``.
    """
    loop = asyncio.get_running_loop()
    moved = 0
    deadline = loop.time() + LEADER_WAIT
    leader_lost = False
    while True:
        try:
            connection = await connected()
            async with connection.channel() as channel:
                queue = await topology.declare_dead_letter_queue(channel)
                while (message := await queue.get(no_ack=False, fail=False)) is not None:
                    await _store(conn, topology, message)
                    await message.ack()
                    moved += 1
                return moved
        except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            # After a nodedown, the reconnecting that follows may fail too: keep waiting until the deadline.
            leader_lost = leader_lost or "nodedown" in str(exc)
            if not leader_lost or loop.time() > deadline:
                raise
            log.info("the dead-letter queue has no leader (%s); waiting for the new one", exc)
            await asyncio.sleep(LEADER_RETRY_PAUSE)


async def _store(conn: asyncpg.Connection, topology: Topology, message: AbstractIncomingMessage) -> None:
    # x-delivery-count belongs to this one delivery (a quorum queue adds it), not to the dead letter.
    headers = plain_headers({k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"})
    letter = DeadLetter.read(0, message.body, headers)
    await insert_dead_letter(
        conn, queue=topology.dead_letter_queue, fingerprint=fingerprint(message.body, headers),
        request_id=letter.request_id, user_id=letter.user_id, reason=letter.reason, headers=headers,
        body=message.body, **letter.search_columns())


async def stored(conn: asyncpg.Connection, topology: Topology, letter_filter: LetterFilter | None = None, *,
                 newest_first: bool = False, limit: int | None = None, offset: int = 0) -> list[DeadLetter]:
    """The dead letters of this deployment's queue that match, in the order they were dead-lettered (or newest
    first), ``limit`` of them from ``offset``."""
    rows = await select_dead_letters(conn, topology.dead_letter_queue, letter_filter, newest_first=newest_first,
                                     limit=limit, offset=offset)
    return [DeadLetter.from_row(row) for row in rows]


async def count(conn: asyncpg.Connection, topology: Topology, letter_filter: LetterFilter | None = None) -> int:
    return await count_dead_letters(conn, topology.dead_letter_queue, letter_filter)


async def one(conn: asyncpg.Connection, topology: Topology, row_id: int) -> DeadLetter | None:
    row = await select_dead_letter(conn, topology.dead_letter_queue, row_id)
    return DeadLetter.from_row(row) if row is not None else None


async def forget(conn: asyncpg.Connection, letters: list[DeadLetter]) -> None:
    """Delete replayed or dropped dead letters."""
    await delete_dead_letters(conn, [letter.row_id for letter in letters])


# ---- what a replay would do (the dry run) ------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPlan:
    """What replaying one request would do to its customer's stored row, as the stamps decide it.

    ``sets`` are the provided fields (wire names) whose stamp is newer than the stored field's, ``held`` those a
    newer write already holds (kept as they are); ``already`` is the outcome of a request that was applied
    before (a replay answers that outcome and changes nothing); ``invalid`` says why the worker would refuse it.
    """

    request_id: str
    user_id: str
    creates: bool = False
    sets: dict[str, Any] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)
    already: str | None = None
    invalid: str | None = None


async def plan(conn: asyncpg.Connection, letters: Sequence[DeadLetter], *, force: bool) -> dict[str, RequestPlan]:
    """Per request id: what replaying ``letters`` would do (``RequestPlan``). Reads, writes nothing.

    The requests are merged as a worker would merge them — in stamp order, each into the row as the previous
    ones left it (``worker.merge``) — so two dead letters of one customer are judged against each other too.
    ``force`` gives every request a stamp newer than any stored: everything provided is set.
    """
    envelopes: list[RequestEnvelope] = []
    plans: dict[str, RequestPlan] = {}
    for letter in letters:
        for raw in letter.envelopes:
            try:
                envelopes.append(RequestEnvelope.model_validate(raw))
            except ValidationError as exc:
                request_id = str(raw.get("request_id"))
                plans[request_id] = RequestPlan(request_id, str(raw.get("user_id")),
                                                invalid=f"not a request envelope ({exc.error_count()} error(s))")
    statuses = await select_request_statuses(conn, [e.request_id for e in envelopes])
    states = await select_customer_states(conn, sorted({e.user_id for e in envelopes}))
    fresh = await newest_field_stamp(conn) + 1 if force else 0
    for envelope in sorted(envelopes, key=lambda e: e.stamp):
        status = statuses.get(envelope.request_id)
        if status is not None and status.status not in ("pending", "failed"):
            plans[envelope.request_id] = RequestPlan(envelope.request_id, envelope.user_id, already=status.status)
            continue
        try:
            provided = envelope.customer().provided_fields()
        except PermanentError as exc:
            plans[envelope.request_id] = RequestPlan(envelope.request_id, envelope.user_id, invalid=str(exc))
            continue
        state = states.get(envelope.user_id)
        creates = state is None
        if state is None:
            state = states[envelope.user_id] = CustomerState.new(envelope.user_id)
        else:
            state = states[envelope.user_id] = copy.deepcopy(state)
        held = state.apply(provided, max(fresh, envelope.stamp) if force else envelope.stamp)
        plans[envelope.request_id] = RequestPlan(
            envelope.request_id, envelope.user_id, creates=creates,
            sets={wire_name(name): value for name, value in provided.items() if name not in held},
            held=[wire_name(name) for name in held])
    return plans


async def request_statuses(conn: asyncpg.Connection, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
    """Where each request stands now: its outcome once a worker applied it, "failed" (with why), or "pending"."""
    return await select_request_statuses(conn, request_ids)


# ---- replay and drop -------------------------------------------------------------------------------------


Action = Literal["replayed", "would replay", "skipped", "failed", "dropped"]


@dataclass(frozen=True)
class Result:
    letter: DeadLetter
    action: Action
    detail: str = ""  # the routing key it went to, or why not


@dataclass(frozen=True)
class Report:
    results: list[Result]
    audit_id: int | None = None

    def count(self, action: Action) -> int:
        return sum(1 for result in self.results if result.action == action)

    @property
    def request_ids(self) -> list[str]:
        """The request ids replayed or dropped."""
        return [request_id for result in self.results if result.action in ("replayed", "dropped")
                for request_id in (result.letter.request_ids or [result.letter.request_id or "-"])]


async def fresh_stamp_clock(settings: Settings, conn: asyncpg.Connection) -> HybridClock:
    """A clock on the shared timeline (the database's clock, like every gateway's) for a forced replay.

    It also observes the newest field stamp stored, so a forced replay wins even over a write stamped by a
    gateway that was running ahead of the timeline (one that never reached the database, see docs/architecture.md).
    """
    timeline = Timeline.from_settings(settings)
    try:
        with starting("PostgreSQL", settings.database_url):
            await asyncio.wait_for(timeline.sync(SAMPLES_PER_SYNC), timeout=CONNECT_TIMEOUT)
    finally:
        await timeline.stop()
    clock = timeline.clock
    clock.observe(await newest_field_stamp(conn))
    return clock


async def republish(channel: AbstractChannel, conn: asyncpg.Connection, topology: Topology, letter: DeadLetter, *,
                    force: bool, clock: HybridClock) -> str:
    """Put one dead letter back on its shard (confirmed), then delete it; return the routing key.

    The request keeps its id and, unless ``force``, its original stamp: it never overwrites a field a newer
    request has set since. ``force`` stamps it now (``clock``: ``fresh_stamp_clock``).
    """
    assert letter.envelopes
    envelopes = [dict(envelope, replayed=True) for envelope in letter.envelopes]
    if force:
        for envelope in envelopes:
            envelope["stamp"] = clock.now()
    # Routed again by userId with today's SHARD_COUNT: the recorded key may name a shard that is gone.
    routing_key = topology.routing_key_for(str(letter.envelopes[0].get("user_id")))
    exchange = await topology.declare_exchange(channel)
    await exchange.publish(
        aio_pika.Message(
            orjson.dumps({"v": 1, "requests": envelopes}),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=letter.request_id,
            headers={H_REPLAYED: True, "x-replayed-at": dt.datetime.now(dt.UTC).isoformat()},
        ),
        routing_key=routing_key,
    )
    await forget(conn, [letter])
    return routing_key


async def replay(channel: AbstractChannel, conn: asyncpg.Connection, topology: Topology,
                 letters: Sequence[DeadLetter], *, force: bool, clock: HybridClock, actor: str,
                 filters: dict[str, Any], dry_run: bool = False) -> Report:
    """Replay ``letters`` one by one (``republish``); one audit row for the whole run unless ``dry_run``.

    A letter that is not a request envelope is skipped (drop it); one whose publish is refused stays where it
    is (``failed``) and the others go on.
    """
    results: list[Result] = []
    for letter in letters:
        if not letter.envelopes:
            results.append(Result(letter, "skipped", "not a request envelope (drop it)"))
        elif dry_run:
            results.append(Result(letter, "would replay", "with a fresh stamp" if force else ""))
        else:
            try:
                routing_key = await republish(channel, conn, topology, letter, force=force, clock=clock)
            except (aio_pika.exceptions.PublishError, aio_pika.exceptions.DeliveryError) as exc:
                results.append(Result(letter, "failed", str(exc)))
                continue
            results.append(Result(letter, "replayed", routing_key))
    report = Report(results)
    if dry_run or not results:
        return report
    outcome = f"replayed {report.count('replayed')}, skipped {report.count('skipped')}, failed {report.count('failed')}"
    audit_id = await record_audit(conn, actor, "replay", filters, report.request_ids, outcome)
    return Report(results, audit_id)


async def drop(conn: asyncpg.Connection, letters: Sequence[DeadLetter], *, actor: str, filters: dict[str, Any],
               why: str | None = None) -> Report:
    """Discard ``letters`` for good; one audit row (``why``, when given, is part of its outcome)."""
    if not letters:
        return Report([])
    await forget(conn, list(letters))
    report = Report([Result(letter, "dropped") for letter in letters])
    outcome = f"dropped {len(letters)}" + (f": {why}" if why else "")
    return Report(report.results, await record_audit(conn, actor, "drop", filters, report.request_ids, outcome))


async def reveal(conn: asyncpg.Connection, letter: DeadLetter, *, actor: str) -> int:
    """Record that ``actor`` was shown ``letter`` unmasked (the console's "reveal"); return the audit id."""
    return await record_audit(conn, actor, "reveal", {"id": letter.row_id}, letter.request_ids or
                              [letter.request_id or "-"], "revealed")


async def audit_rows(conn: asyncpg.Connection, *, audit_id: int | None = None, limit: int = 50, offset: int = 0,
                     ) -> list[dict[str, Any]]:
    """What was replayed, dropped and revealed, newest first (or the one row ``audit_id``)."""
    return [dict(row) for row in await select_audit(conn, audit_id=audit_id, limit=limit, offset=offset)]


async def audit_count(conn: asyncpg.Connection) -> int:
    return await count_audit(conn)
