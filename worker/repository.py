"""All SQL of the worker. ``apply_batch`` applies many requests in one transaction with one outcome each.

One transaction per batch:
  1. lock every userId of the batch (advisory, in a fixed order, so workers never deadlock on each other);
  2. read what is already known: processed request ids, Idempotency-Keys, the customers, phone owners;
  3. merge in Python, request by request in stamp order (``worker.merge``);
  4. write every changed customer with one upsert, and every outcome into ``processed_requests``.
Callers retry the whole batch on transient errors and split it on anything else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from shared.envelope import Outcome, RequestEnvelope
from shared.model import CustomerIn
from worker.merge import FIELDS, JSON_FIELDS, CustomerState


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: jsonb <-> Python via orjson."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def create_pool(database_url: str, size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=size, init=init_connection, command_timeout=60
    )
    return pool


@dataclass(frozen=True)
class Request:
    envelope: RequestEnvelope
    customer: CustomerIn


LOCK_USERS = """
SELECT pg_advisory_xact_lock(k)
FROM (SELECT DISTINCT hashtextextended(u, 0) AS k FROM unnest($1::text[]) AS u ORDER BY k) AS keys
"""

SELECT_PROCESSED = """
SELECT request_id, user_id, customer_id, outcome FROM processed_requests WHERE request_id = ANY($1::text[])
"""

# A key older than the window may be used again: forget it before looking keys up.
EXPIRE_IDEMPOTENCY_KEYS = """
UPDATE processed_requests SET idempotency_key = NULL
WHERE idempotency_key = ANY($1::text[]) AND processed_at < now() - make_interval(secs => $2)
"""

SELECT_IDEMPOTENCY_KEYS = """
SELECT idempotency_key, body_hash, user_id, customer_id, outcome
FROM processed_requests WHERE idempotency_key = ANY($1::text[])
"""

SELECT_CUSTOMERS = """
SELECT id, user_id, bot_id, nickname, name, phone, backup_phone, wechat, status, community, business_type,
       room_type, room_tags, move_in_date, lease_period, price_range, source_channel, creator,
       internal_notes, field_stamps
FROM customers WHERE user_id = ANY($1::text[])
FOR UPDATE
"""

SELECT_PHONE_OWNERS = "SELECT phone, user_id FROM customers WHERE phone = ANY($1::text[])"

# The trick: the merge already happened in Python while this transaction holds the userIds' locks, so the
# incoming row *is* the final row; ON CONFLICT just turns "insert new customers, overwrite changed ones"
# into one statement over arrays (one round trip for the whole batch). jsonb values travel as text and are
# cast back: a Python list inside a jsonb[] parameter would be read as another array dimension.
UPSERT_CUSTOMERS = """
INSERT INTO customers AS c (
    user_id, bot_id, nickname, name, phone, backup_phone, wechat, status, community, business_type,
    room_type, room_tags, move_in_date, lease_period, price_range, source_channel, creator, internal_notes,
    field_stamps
)
SELECT user_id, bot_id, nickname, name, phone, backup_phone, wechat, status, community, business_type,
       room_type, room_tags::jsonb, move_in_date, lease_period, price_range, source_channel, creator,
       internal_notes, field_stamps::jsonb
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::smallint[],
    $9::text[], $10::text[], $11::text[], $12::text[], $13::date[], $14::integer[], $15::text[],
    $16::text[], $17::text[], $18::text[], $19::text[]
) AS incoming (
    user_id, bot_id, nickname, name, phone, backup_phone, wechat, status, community, business_type,
    room_type, room_tags, move_in_date, lease_period, price_range, source_channel, creator, internal_notes,
    field_stamps
)
ON CONFLICT (user_id) DO UPDATE SET
    bot_id = EXCLUDED.bot_id,
    nickname = EXCLUDED.nickname,
    name = EXCLUDED.name,
    phone = EXCLUDED.phone,
    backup_phone = EXCLUDED.backup_phone,
    wechat = EXCLUDED.wechat,
    status = EXCLUDED.status,
    community = EXCLUDED.community,
    business_type = EXCLUDED.business_type,
    room_type = EXCLUDED.room_type,
    room_tags = EXCLUDED.room_tags,
    move_in_date = EXCLUDED.move_in_date,
    lease_period = EXCLUDED.lease_period,
    price_range = EXCLUDED.price_range,
    source_channel = EXCLUDED.source_channel,
    creator = EXCLUDED.creator,
    internal_notes = EXCLUDED.internal_notes,
    field_stamps = EXCLUDED.field_stamps,
    updated_at = now()
RETURNING id, user_id
"""

INSERT_PROCESSED = """
INSERT INTO processed_requests (request_id, user_id, customer_id, outcome, idempotency_key, body_hash)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (request_id) DO NOTHING
"""

DELETE_EXPIRED_PROCESSED = """
DELETE FROM processed_requests WHERE processed_at < now() - make_interval(secs => $1)
"""


def _column_value(name: str, value: Any) -> Any:
    if name in JSON_FIELDS and value is not None:
        return orjson.dumps(value).decode()
    return value


def _state_from_row(row: asyncpg.Record) -> CustomerState:
    return CustomerState(
        user_id=row["user_id"],
        values={name: row[name] for name in FIELDS},
        stamps={name: int(stamp) for name, stamp in row["field_stamps"].items()},
        id=row["id"],
    )


async def apply_batch(
    conn: asyncpg.Connection, requests: Sequence[Request], idempotency_window: dt.timedelta
) -> list[Outcome]:
    """Apply ``requests`` in one transaction; return one outcome per request, in input order."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    user_ids = sorted({r.envelope.user_id for r in requests})
    request_ids = [r.envelope.request_id for r in requests]
    keys = sorted({r.envelope.idempotency_key for r in requests if r.envelope.idempotency_key})
    phones = sorted({r.customer.phone for r in requests if r.customer.phone})

    async with conn.transaction():
        await conn.execute(LOCK_USERS, user_ids)
        processed = {row["request_id"]: row for row in await conn.fetch(SELECT_PROCESSED, request_ids)}
        by_key: dict[str, dict[str, Any]] = {}
        if keys:
            await conn.execute(EXPIRE_IDEMPOTENCY_KEYS, keys, idempotency_window.total_seconds())
            by_key = {row["idempotency_key"]: dict(row) for row in await conn.fetch(SELECT_IDEMPOTENCY_KEYS, keys)}
        states = {row["user_id"]: _state_from_row(row) for row in await conn.fetch(SELECT_CUSTOMERS, user_ids)}
        phone_owner: dict[str, str] = {}
        if phones:
            phone_owner = {row["phone"]: row["user_id"] for row in await conn.fetch(SELECT_PHONE_OWNERS, phones)}

        # Requests whose outcome must be recorded, with the state their customer id comes from.
        recorded: list[tuple[int, CustomerState | None]] = []
        seen_in_batch: dict[str, int] = {}
        # Stamp order = the order the gateway received them (stable for equal stamps).
        for index in sorted(range(len(requests)), key=lambda i: requests[i].envelope.stamp):
            envelope, customer = requests[index].envelope, requests[index].customer
            earlier = processed.get(envelope.request_id)
            if earlier is not None:  # a redelivery: answer what the first application answered
                outcomes[index] = Outcome(
                    request_id=envelope.request_id, user_id=envelope.user_id,
                    status=earlier["outcome"], id=earlier["customer_id"],
                )
                continue
            if envelope.request_id in seen_in_batch:
                outcomes[index] = outcomes[seen_in_batch[envelope.request_id]]
                continue
            seen_in_batch[envelope.request_id] = index

            key = envelope.idempotency_key
            if key is not None and key in by_key:
                first = by_key[key]
                if first["body_hash"] == envelope.body_hash and first["user_id"] == envelope.user_id:
                    outcomes[index] = Outcome(
                        request_id=envelope.request_id, user_id=envelope.user_id,
                        status=first["outcome"], id=first["customer_id"],
                    )
                else:
                    outcomes[index] = Outcome(
                        request_id=envelope.request_id, user_id=envelope.user_id,
                        status="idempotency_conflict", error="Idempotency-Key已用于内容不同的请求",
                    )
                continue

            state = states.get(envelope.user_id)
            owner = phone_owner.get(customer.phone) if customer.phone else None
            if owner is not None and owner != envelope.user_id:
                status = "phone_taken"
            else:
                status = "updated" if state is not None else "created"
                if state is None:
                    state = states[envelope.user_id] = CustomerState.new(envelope.user_id)
                old_phone = state.values["phone"]
                state.apply(customer.provided_fields(), envelope.stamp)
                if state.values["phone"] != old_phone:
                    if old_phone is not None:
                        phone_owner.pop(old_phone, None)
                    phone_owner[state.values["phone"]] = envelope.user_id
            outcomes[index] = Outcome(
                request_id=envelope.request_id, user_id=envelope.user_id, status=status,
                error="手机号已存在，已被其他客户使用" if status == "phone_taken" else None,
            )
            recorded.append((index, state))
            if key is not None:
                by_key[key] = {
                    "body_hash": envelope.body_hash, "user_id": envelope.user_id,
                    "customer_id": None, "outcome": status, "pending_index": index,
                }

        dirty = [state for state in states.values() if state.dirty]
        if dirty:
            columns: list[list[Any]] = [[s.user_id for s in dirty]]
            columns += [[_column_value(name, s.values[name]) for s in dirty] for name in FIELDS]
            columns.append([orjson.dumps(s.stamps).decode() for s in dirty])
            for row in await conn.fetch(UPSERT_CUSTOMERS, *columns):
                states[row["user_id"]].id = row["id"]

        for index, state in recorded:
            outcome = outcomes[index]
            assert outcome is not None
            outcome.id = state.id if state is not None else None
        # Same-key duplicates inside this batch copied their outcome before ids were known.
        for index, request in enumerate(requests):
            outcome = outcomes[index]
            assert outcome is not None
            if outcome.id is None and outcome.status in ("created", "updated"):
                state = states.get(request.envelope.user_id)
                outcome.id = state.id if state is not None else None

        if recorded:
            rows = [(requests[i].envelope, outcomes[i]) for i, _ in recorded]
            await conn.execute(
                INSERT_PROCESSED,
                [e.request_id for e, _ in rows],
                [e.user_id for e, _ in rows],
                [o.id if o else None for _, o in rows],
                [o.status if o else None for _, o in rows],
                [e.idempotency_key for e, _ in rows],
                [e.body_hash for e, _ in rows],
            )
    return [outcome for outcome in outcomes if outcome is not None]


async def delete_expired_processed(conn: asyncpg.Connection, retention: dt.timedelta) -> int:
    """Forget processed request ids older than the retention period; return how many."""
    result: str = await conn.execute(DELETE_EXPIRED_PROCESSED, retention.total_seconds())
    return int(result.split()[-1])
