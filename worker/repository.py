"""All SQL of the worker. ``apply_batch`` applies many requests in one transaction with one outcome each.

One transaction per batch, five round trips whatever its size:
  1. BEGIN, and lock every userId of the batch (advisory, in a fixed order, so workers never deadlock);
  2. read what is already known, in one statement: the batch's customers with the owners of its phones and the
     request ids already processed (redeliveries, replays); Idempotency-Keys, when sent, in two more;
  3. merge in Python, request by request in stamp order (``worker.merge``);
  4. write every changed customer and every outcome with one statement; COMMIT.
Callers retry the whole batch on transient errors and split it on anything else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from shared.envelope import Outcome, OutcomeStatus, RequestEnvelope
from shared.model import CustomerIn, wire_name
from worker.merge import FIELD_TYPES, FIELDS, CustomerState


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: jsonb <-> Python via orjson."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """On release: roll back a transaction left open, nothing more.

    asyncpg's default reset (unlock advisory locks, CLOSE ALL, UNLISTEN, RESET ALL) costs a round trip per
    batch; this worker holds no session state (its advisory locks are transaction-scoped).
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(database_url: str, size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        init=init_connection,
        reset=_reset_connection,
        command_timeout=60,
        # Plan every query for its actual arrays: a generic plan cached while the tables were small is a
        # sequential scan, and stays one (measured: 3x slower batches on a table of 10,000 rows).
        server_settings={"plan_cache_mode": "force_custom_plan"},
    )
    return pool


@dataclass(frozen=True)
class Request:
    envelope: RequestEnvelope
    customer: CustomerIn


# Every writer of customers goes through this lock, so it alone serialises a user's requests (no FOR UPDATE).
LOCK_USERS = """
SELECT pg_advisory_xact_lock(k)
FROM (SELECT DISTINCT hashtextextended(u, 0) AS k FROM unnest($1::text[]) AS u ORDER BY k) AS keys
"""

# The customers columns a request can set, said once (worker.merge.FIELD_TYPES): the statements below name them
# through these, so a new field is added in one place.
_FIELDS = ", ".join(FIELDS)
_FIELDS_TYPED = ", ".join(f"{name} {sql_type}" for name, sql_type in FIELD_TYPES.items())
_FIELDS_FROM_INCOMING = ",\n        ".join(f"{name} = EXCLUDED.{name}" for name in FIELDS)

# The batch's customers ($1) and whoever owns one of its phones ($2); used alone by the replay's dry run.
SELECT_CUSTOMERS_AND_PHONE_OWNERS = f"""
SELECT id, user_id, {_FIELDS}, field_stamps
FROM customers WHERE user_id = ANY($1::text[]) OR phone = ANY($2::text[])
"""

# A batch's one read, right after its locks (so its snapshot sees every earlier writer of these users): the
# customers and phone owners as above, and which of its requests ($3) were processed before (redeliveries,
# replays), as one JSON array repeated on every row (NULL, and sent once, when there are none: the usual case).
# One statement instead of two saves a round trip and a plan per batch (issue 14's profile: each statement is
# ~5% of the worker). At least one row comes back, all customers' columns NULL when none matched.
SELECT_BATCH_STATE = f"""
SELECT p.processed, c.id, c.user_id, {", ".join(f"c.{name}" for name in FIELDS)}, c.field_stamps
FROM (
    SELECT json_agg(json_build_object('request_id', request_id, 'customer_id', customer_id, 'outcome', outcome,
                                      'superseded_fields', superseded_fields)) AS processed
    FROM processed_requests WHERE request_id = ANY($3::text[])
) AS p
LEFT JOIN customers AS c ON c.user_id = ANY($1::text[]) OR c.phone = ANY($2::text[])
"""

# A key older than the window may be used again: forget it before looking keys up.
EXPIRE_IDEMPOTENCY_KEYS = """
UPDATE processed_requests SET idempotency_key = NULL
WHERE idempotency_key = ANY($1::text[]) AND processed_at < now() - make_interval(secs => $2)
"""

SELECT_IDEMPOTENCY_KEYS = """
SELECT idempotency_key, body_hash, user_id, customer_id, outcome, superseded_fields
FROM processed_requests WHERE idempotency_key = ANY($1::text[])
"""

# The one write of a batch. The trick: the merge already happened in Python while this transaction holds the
# userIds' locks, so each incoming row *is* the final row; ON CONFLICT just makes "insert new customers,
# overwrite changed ones" one statement. The outcomes go into processed_requests in the same statement,
# taking the ids of new customers from the upsert's RETURNING. Rows travel as one JSON array per table
# (json_to_recordset): one parameter to encode instead of one array per column, cheaper on both sides.
WRITE_BATCH = f"""
WITH upserted AS (
    INSERT INTO customers AS c (user_id, {_FIELDS}, field_stamps)
    SELECT user_id, {_FIELDS}, field_stamps
    FROM json_to_recordset($1::json) AS incoming (user_id text, {_FIELDS_TYPED}, field_stamps jsonb)
    ON CONFLICT (user_id) DO UPDATE SET
        {_FIELDS_FROM_INCOMING},
        field_stamps = EXCLUDED.field_stamps,
        updated_at = now()
    RETURNING id, user_id
),
recorded AS (
    INSERT INTO processed_requests (
        request_id, user_id, customer_id, outcome, idempotency_key, body_hash, api_key_name, superseded_fields
    )
    SELECT r.request_id, r.user_id, COALESCE(r.customer_id, u.id), r.outcome, r.idempotency_key, r.body_hash,
           r.api_key_name, r.superseded_fields
    FROM json_to_recordset($2::json) AS r (
        request_id text, user_id text, customer_id bigint, outcome text, idempotency_key text, body_hash text,
        api_key_name text, superseded_fields text[]
    )
    LEFT JOIN upserted AS u ON u.user_id = r.user_id AND r.outcome <> 'phone_taken'
    ON CONFLICT (request_id) DO NOTHING
),
-- The timeline's floor (shared/clock/timeline.py): the highest stamp written, raised in this same transaction, in
-- the slot of this backend so that concurrent batches do not queue on one row.
raised AS (
    UPDATE clock_high_water SET stamp = $3 WHERE slot = pg_backend_pid() % 64 AND stamp < $3
)
SELECT id, user_id FROM upserted
"""

# In chunks, so the cleanup never holds a long transaction or bloats WAL in one go.
DELETE_EXPIRED_PROCESSED = """
DELETE FROM processed_requests
WHERE request_id IN (
    SELECT request_id FROM processed_requests
    WHERE processed_at < now() - make_interval(secs => $1)
    LIMIT $2
)
"""
CLEANUP_CHUNK = 10_000


def _state_from_row(row: asyncpg.Record) -> CustomerState:
    return CustomerState(
        user_id=row["user_id"],
        values={name: row[name] for name in FIELDS},
        stamps={name: int(stamp) for name, stamp in row["field_stamps"].items()},
        id=row["id"],
    )


async def apply_batch(
    conn: asyncpg.Connection, requests: Sequence[Request], idempotency_window: dt.timedelta,
    duplicates: set[str] | None = None,
) -> list[Outcome]:
    """Apply ``requests`` in one transaction; return one outcome per request, in input order.

    ``duplicates``, when given, receives the ids of requests that had been applied before (redeliveries,
    replays): their outcome is the first application's, and nothing was written for them now.
    """
    outcomes: list[Outcome | None] = [None] * len(requests)
    user_ids = sorted({r.envelope.user_id for r in requests})
    keys = sorted({r.envelope.idempotency_key for r in requests if r.envelope.idempotency_key})
    phones = sorted({r.customer.phone for r in requests if r.customer.phone})
    request_ids = [r.envelope.request_id for r in requests]

    async with conn.transaction():
        await conn.execute(LOCK_USERS, user_ids)
        states: dict[str, CustomerState] = {}
        phone_owner: dict[str, str] = {}
        batch_users = set(user_ids)
        rows = await conn.fetch(SELECT_BATCH_STATE, user_ids, phones, request_ids)
        for row in rows:
            if row["user_id"] is None:  # no customer matched: the one row carries only `processed`
                continue
            if row["user_id"] in batch_users:
                states[row["user_id"]] = _state_from_row(row)
            if row["phone"] is not None:
                phone_owner[row["phone"]] = row["user_id"]
        # Always asked, not only for redelivered messages: a duplicate can also come from a replay whose ack
        # was lost, or from messages moved by hand.
        processed_json = rows[0]["processed"] if rows else None
        processed = {p["request_id"]: p for p in orjson.loads(processed_json)} if processed_json else {}
        by_key: dict[str, dict[str, Any]] = {}
        if keys:
            await conn.execute(EXPIRE_IDEMPOTENCY_KEYS, keys, idempotency_window.total_seconds())
            rows = await conn.fetch(SELECT_IDEMPOTENCY_KEYS, keys)
            by_key = {row["idempotency_key"]: dict(row) for row in rows}

        # Requests whose outcome must be recorded, with the state their customer id comes from.
        recorded: list[tuple[int, CustomerState | None]] = []
        seen_in_batch: dict[str, int] = {}
        # Stamp order = the order the gateway received them (stable for equal stamps).
        for index in sorted(range(len(requests)), key=lambda i: requests[i].envelope.stamp):
            envelope, customer = requests[index].envelope, requests[index].customer
            earlier = processed.get(envelope.request_id)
            if earlier is not None:  # a redelivery: answer what the first application answered
                if duplicates is not None:
                    duplicates.add(envelope.request_id)
                outcomes[index] = Outcome(
                    request_id=envelope.request_id, user_id=envelope.user_id,
                    status=earlier["outcome"], id=earlier["customer_id"],
                    superseded=earlier["superseded_fields"] or None,
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
                        superseded=first["superseded_fields"] or None,
                    )
                else:
                    outcomes[index] = Outcome(
                        request_id=envelope.request_id, user_id=envelope.user_id,
                        status="idempotency_conflict", error="Idempotency-Key已用于内容不同的请求",
                    )
                continue

            state = states.get(envelope.user_id)
            owner = phone_owner.get(customer.phone) if customer.phone else None
            status: OutcomeStatus
            lost: list[str] = []
            if owner is not None and owner != envelope.user_id:
                status = "phone_taken"
            else:
                status = "updated" if state is not None else "created"
                if state is None:
                    state = states[envelope.user_id] = CustomerState.new(envelope.user_id)
                old_phone = state.values["phone"]
                provided = customer.provided_fields()
                lost = state.apply(provided, envelope.stamp)
                if lost and len(lost) == len(provided):
                    status = "superseded"  # every provided field had a newer write: nothing changed
                if state.values["phone"] != old_phone:
                    if old_phone is not None:
                        phone_owner.pop(old_phone, None)
                    phone_owner[state.values["phone"]] = envelope.user_id
            outcomes[index] = Outcome(
                request_id=envelope.request_id, user_id=envelope.user_id, status=status,
                id=state.id if state is not None else None,
                error="手机号已存在，已被其他客户使用" if status == "phone_taken" else None,
                superseded=[wire_name(name) for name in lost] or None,
            )
            recorded.append((index, state))
            if key is not None:
                by_key[key] = {
                    "body_hash": envelope.body_hash, "user_id": envelope.user_id,
                    "customer_id": None, "outcome": status,
                    "superseded_fields": [wire_name(name) for name in lost] or None,
                }

        if recorded:
            customers = [
                {"user_id": s.user_id, **s.values, "field_stamps": s.stamps} for s in states.values() if s.dirty
            ]
            processed_rows = []
            for index, state in recorded:
                envelope, outcome = requests[index].envelope, outcomes[index]
                assert outcome is not None
                processed_rows.append({
                    "request_id": envelope.request_id, "user_id": envelope.user_id,
                    "customer_id": state.id if state is not None else None, "outcome": outcome.status,
                    "idempotency_key": envelope.idempotency_key, "body_hash": envelope.body_hash,
                    "api_key_name": envelope.api_key, "superseded_fields": outcome.superseded,
                })
            # orjson writes dates as YYYY-MM-DD, which json_to_recordset reads back as date.
            highest_stamp = max(requests[index].envelope.stamp for index, _ in recorded)
            written = await conn.fetch(
                WRITE_BATCH, orjson.dumps(customers).decode(), orjson.dumps(processed_rows).decode(), highest_stamp
            )
            for row in written:
                states[row["user_id"]].id = row["id"]

    # New customers got their ids from the upsert; fill them into every created/updated outcome (including
    # in-batch duplicates that copied an outcome before the ids were known).
    for request, outcome in zip(requests, outcomes, strict=True):
        assert outcome is not None
        if outcome.id is None and outcome.status in ("created", "updated", "superseded"):
            outcome.id = states[request.envelope.user_id].id
    return [outcome for outcome in outcomes if outcome is not None]


RECORD_FAILURE = """
INSERT INTO failed_requests (request_id, user_id, error) VALUES ($1, $2, $3)
ON CONFLICT (request_id) DO UPDATE SET error = EXCLUDED.error, failed_at = now()
"""

DELETE_EXPIRED_FAILED = "DELETE FROM failed_requests WHERE failed_at < now() - make_interval(secs => $1)"


async def record_failure(conn: asyncpg.Connection, request_id: str, user_id: str | None, error: str) -> None:
    """Remember that ``request_id`` was dead-lettered and why (read by the gateway's request status)."""
    await conn.execute(RECORD_FAILURE, request_id, user_id, error)


async def delete_expired_processed(conn: asyncpg.Connection, retention: dt.timedelta) -> int:
    """Forget processed request ids older than the retention period, in chunks; return how many."""
    total = 0
    while True:
        result: str = await conn.execute(DELETE_EXPIRED_PROCESSED, retention.total_seconds(), CLEANUP_CHUNK)
        deleted = int(result.split()[-1])
        total += deleted
        if deleted < CLEANUP_CHUNK:
            break
    await conn.execute(DELETE_EXPIRED_FAILED, retention.total_seconds())
    return total


# ---- dead letters (worker/dead_letters.py: the replay tool and the console) ---------------------------------

# user_ids, request_ids and field_values are what the filters search (GIN indexes, migration 0007); they are
# derived from the letter when it is moved in (DeadLetter.search_columns).
INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (queue, fingerprint, request_id, user_id, reason, headers, body, dead_at, user_ids,
                          request_ids, field_values)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11)
ON CONFLICT (queue, fingerprint) DO NOTHING
"""

DEAD_LETTER_COLUMNS = "id, headers, body, dead_at, moved_at"

DELETE_DEAD_LETTERS = "DELETE FROM dead_letters WHERE id = ANY($1::bigint[])"


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters: every condition given must hold (none given: all of them). The replay tool's options
    and the console's query parameters both become one of these, so both select with the same SQL."""

    user_id: str | None = None      # one of the letter's userIds (a pack has several)
    request_id: str | None = None   # one of its request ids
    reason: str | None = None       # a substring of the error or the exception's name, any case
    since: dt.datetime | None = None  # dead at or after
    until: dt.datetime | None = None  # dead at or before
    q: str | None = None            # the whole value of any field of its requests (a phone, a community)

    def where(self, queue: str) -> tuple[str, list[Any]]:
        """The WHERE clause (without the keyword) and its parameters, ``$1`` being ``queue``."""
        conditions, params = ["queue = $1"], [queue]

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if self.user_id is not None:
            conditions.append(f"user_ids @> ARRAY[{param(self.user_id)}::text]")
        if self.request_id is not None:
            conditions.append(f"request_ids @> ARRAY[{param(self.request_id)}::text]")
        if self.reason is not None:
            # strpos, not LIKE: the operator's text has no wildcards to escape.
            haystack = "lower(reason || ' ' || coalesce(headers ->> 'x-exception', ''))"
            conditions.append(f"strpos({haystack}, lower({param(self.reason)})) > 0")
        if self.since is not None:
            conditions.append(f"dead_at >= {param(self.since)}")
        if self.until is not None:
            conditions.append(f"dead_at <= {param(self.until)}")
        if self.q is not None:
            conditions.append(f"field_values @> ARRAY[{param(self.q)}::text]")
        return " AND ".join(conditions), params

    def given(self) -> dict[str, str]:
        """The conditions given, as text (what the audit records and the console's links carry)."""
        values = {"userId": self.user_id, "requestId": self.request_id, "reason": self.reason,
                  "since": self.since.isoformat() if self.since else None,
                  "until": self.until.isoformat() if self.until else None, "q": self.q}
        return {key: value for key, value in values.items() if value is not None}


# These run on connections set up by ``init_connection`` (jsonb as Python values).


async def insert_dead_letter(conn: asyncpg.Connection, *, queue: str, fingerprint: str, request_id: str | None,
                             user_id: str | None, reason: str, headers: dict[str, Any], body: bytes,
                             dead_at: dt.datetime, user_ids: Sequence[str], request_ids: Sequence[str],
                             field_values: Sequence[str]) -> None:
    await conn.execute(INSERT_DEAD_LETTER, queue, fingerprint, request_id, user_id, reason, headers, body, dead_at,
                       list(user_ids), list(request_ids), list(field_values))


async def select_dead_letters(conn: asyncpg.Connection, queue: str, letter_filter: LetterFilter | None = None, *,
                              newest_first: bool = False, limit: int | None = None, offset: int = 0,
                              ) -> list[asyncpg.Record]:
    """The dead letters of ``queue`` that match, in the order they were moved in (or newest first)."""
    where, params = (letter_filter or LetterFilter()).where(queue)
    order = "id DESC" if newest_first else "id"
    params += [limit, offset]
    query = (f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE {where} ORDER BY {order} "
             f"LIMIT ${len(params) - 1} OFFSET ${len(params)}")
    rows: list[asyncpg.Record] = await conn.fetch(query, *params)
    return rows


async def count_dead_letters(conn: asyncpg.Connection, queue: str, letter_filter: LetterFilter | None = None) -> int:
    where, params = (letter_filter or LetterFilter()).where(queue)
    return int(await conn.fetchval(f"SELECT count(*) FROM dead_letters WHERE {where}", *params))


async def select_dead_letter(conn: asyncpg.Connection, queue: str, row_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE queue = $1 AND id = $2", queue, row_id)
    return row


async def delete_dead_letters(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    await conn.execute(DELETE_DEAD_LETTERS, list(ids))


async def select_customer_states(conn: asyncpg.Connection, user_ids: Sequence[str]) -> dict[str, CustomerState]:
    """The stored customers of ``user_ids`` with their field stamps: what a replay would merge into (dry run)."""
    rows = await conn.fetch(SELECT_CUSTOMERS_AND_PHONE_OWNERS, list(user_ids), [])
    return {row["user_id"]: _state_from_row(row) for row in rows}


# Where a request stands, read as the gateway's GET /api/external/requests/{id} reads it: applied (its outcome)
# before failed, and neither = pending (replayed, not applied yet).
SELECT_REQUEST_STATUSES = """
SELECT r.request_id, p.outcome, p.superseded_fields, f.error
FROM unnest($1::text[]) AS r (request_id)
LEFT JOIN processed_requests AS p ON p.request_id = r.request_id
LEFT JOIN failed_requests AS f ON f.request_id = r.request_id
"""


@dataclass(frozen=True)
class RequestStatus:
    request_id: str
    status: str                     # an outcome (created, updated, superseded ...), "failed" or "pending"
    error: str | None = None
    superseded: list[str] | None = None


async def select_request_statuses(conn: asyncpg.Connection, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
    statuses = {}
    for row in await conn.fetch(SELECT_REQUEST_STATUSES, list(request_ids)):
        status = row["outcome"] or ("failed" if row["error"] is not None else "pending")
        statuses[row["request_id"]] = RequestStatus(row["request_id"], status,
                                                    row["error"] if row["outcome"] is None else None,
                                                    row["superseded_fields"])
    return statuses


# The newest write stamp stored: the timeline's high-water mark (raised by every batch, seeded by migration 0005
# from every stored field stamp).
NEWEST_FIELD_STAMP = "SELECT max(stamp) FROM clock_high_water"

INSERT_AUDIT = """
INSERT INTO dead_letter_audit (actor, action, filters, request_ids, outcome) VALUES ($1, $2, $3::jsonb, $4, $5)
RETURNING id
"""

# Back on a shard: "pending" again until a worker applies it.
FORGET_FAILURES = "DELETE FROM failed_requests WHERE request_id = ANY($1::text[])"

SELECT_AUDIT = """
SELECT id, at, actor, action, filters, request_ids, outcome FROM dead_letter_audit
WHERE ($1::bigint IS NULL OR id = $1) ORDER BY id DESC LIMIT $2 OFFSET $3
"""


async def newest_field_stamp(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(NEWEST_FIELD_STAMP) or 0)


async def record_audit(conn: asyncpg.Connection, actor: str, action: str, filters: dict[str, Any],
                       request_ids: Sequence[str], outcome: str) -> int:
    """One audit row for a replay, drop or reveal (its id); a replay also forgets the requests' recorded
    failures."""
    async with conn.transaction():
        audit_id = int(await conn.fetchval(INSERT_AUDIT, actor, action, filters, list(request_ids), outcome))
        if action == "replay":
            await conn.execute(FORGET_FAILURES, list(request_ids))
    return audit_id


async def select_audit(conn: asyncpg.Connection, *, audit_id: int | None = None, limit: int = 50,
                       offset: int = 0) -> list[asyncpg.Record]:
    """Audit rows, newest first (or the one with ``audit_id``)."""
    rows: list[asyncpg.Record] = await conn.fetch(SELECT_AUDIT, audit_id, limit, offset)
    return rows


async def count_audit(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dead_letter_audit"))
