"""The gateway's read-only view of the database: read-back of a customer and the status of a request.

A small pool (``GATEWAY_DB_POOL_SIZE``) opened lazily: the gateway never needs Postgres to accept writes, so
an unreachable database fails only these reads (503), never the gateway's start-up or readiness. All of the
gateway's SQL is here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from gateway.request_ids import request_id_time_ms
from gateway.responses import RequestOutcome, RequestStatusData
from shared.errors import ServiceUnavailable

DATABASE_DOWN = "数据库暂不可用，请稍后重试"

# Stored columns -> the request's field names; room_tags comes back as the JSON text the bots send.
SELECT_CUSTOMER = """
SELECT id, user_id AS "userId", bot_id AS "botId", nickname, name, phone, backup_phone, wechat, status,
       community, business_type, room_type, room_tags::text AS room_tags, move_in_date, lease_period,
       price_range, source_channel, creator, internal_notes, created_at AS "createdAt", updated_at AS "updatedAt"
FROM customers WHERE user_id = $1
"""

# A processed outcome wins over a recorded failure: a dead letter replayed later may have succeeded.
SELECT_REQUEST_STATUS = """
SELECT user_id, customer_id, outcome, NULL AS error, 0 AS rank FROM processed_requests WHERE request_id = $1
UNION ALL
SELECT user_id, NULL, 'failed', error, 1 FROM failed_requests WHERE request_id = $1
ORDER BY rank LIMIT 1
"""

_CONNECTION_ERRORS = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)

# Ids stamped this far ahead of the database clock are still taken as ours (gateways' clocks are on it).
FUTURE_TOLERANCE_MS = 5 * 60 * 1000


@dataclass(frozen=True)
class RequestStatus:
    request_id: str
    user_id: str | None
    status: RequestOutcome
    id: int | None = None
    error: str | None = None

    def body(self) -> RequestStatusData:
        return {"requestId": self.request_id, "userId": self.user_id, "status": self.status, "id": self.id,
                "error": self.error}


class ReadStore:
    def __init__(self, database_url: str, pool_size: int, retention_hours: float) -> None:
        self.database_url = database_url
        self.pool_size = pool_size
        self.retention_ms = int(retention_hours * 3600 * 1000)
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        # min_size=0: creating the pool opens no connection, so a database outage cannot fail start-up.
        self.pool = await asyncpg.create_pool(
            self.database_url, min_size=0, max_size=self.pool_size, command_timeout=5, timeout=5,
            server_settings={"default_transaction_read_only": "on"},
        )

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        assert self.pool is not None
        # Twice: a pooled connection from before a database restart fails once, a fresh one then works.
        for attempt in (1, 2):
            try:
                return await self.pool.fetchrow(query, *args)
            except _CONNECTION_ERRORS as exc:
                if attempt == 2 or not isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
                    raise ServiceUnavailable(DATABASE_DOWN) from exc
        raise AssertionError("unreachable")

    async def customer(self, user_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow(SELECT_CUSTOMER, user_id)
        if row is None:
            return None
        customer = dict(row)
        if isinstance(customer["move_in_date"], dt.date):
            customer["move_in_date"] = customer["move_in_date"].isoformat()
        return customer

    async def request_status(self, request_id: str, now_ms: int) -> RequestStatus | None:
        """The outcome of an accepted request; ``pending`` for one of ours with none yet; None if unknown."""
        issued_ms = request_id_time_ms(request_id)
        if issued_ms is None:
            return None  # not one of our ids: no need to ask the database
        row = await self._fetchrow(SELECT_REQUEST_STATUS, request_id)
        if row is not None:
            return RequestStatus(request_id, row["user_id"], row["outcome"], row["customer_id"], row["error"])
        if now_ms - self.retention_ms <= issued_ms <= now_ms + FUTURE_TOLERANCE_MS:
            return RequestStatus(request_id, None, "pending")
        return None


STORE = web.AppKey("store", ReadStore)
