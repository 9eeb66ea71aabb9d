"""``python -m bench.baseline``: the direct-write server a user would build instead of the pipeline.

One aiohttp process, the same validation (``shared.model.parse_customer``) and error shape as the gateway,
and one ``INSERT … ON CONFLICT (user_id) DO UPDATE`` per request straight into Postgres through an asyncpg
pool. No queue, no request log, no per-field stamps: it is the yardstick, not a second implementation.

Environment: ``DATABASE_URL``, ``PORT`` (default 3100), ``HOST`` (default 127.0.0.1),
``BASELINE_POOL_SIZE`` (default 16). Migrations are applied on start (``shared.migrate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson
from aiohttp import web

from shared.errors import (
    BodyTooLarge,
    ClientError,
    PhoneTaken,
    RequestInvalid,
    UnsupportedMediaType,
)
from shared.migrate import apply_migrations
from shared.model import CustomerIn, parse_customer
from shared.runtime import use_uvloop

log = logging.getLogger("bench.baseline")

BODY_LIMIT: Final = 64 * 1024
PHONE_INDEX: Final = "customers_phone_key"

# Columns written from the request, in parameter order ($2 … $18 of UPSERT; $1 is user_id).
COLUMNS: Final = (
    "bot_id", "nickname", "name", "phone", "backup_phone", "wechat", "status", "community", "business_type",
    "room_type", "room_tags", "move_in_date", "lease_period", "price_range", "source_channel", "creator",
    "internal_notes",
)

# The trick: a field that was not provided arrives as NULL. On insert, COALESCE($n, default) fills the spec's
# creation defaults; on conflict, COALESCE($n, c.col) keeps the stored value. The parameter is used rather
# than EXCLUDED.col because EXCLUDED already carries the creation default. xmax = 0 holds only for a freshly
# inserted row version: it tells "created" from "updated".
UPSERT: Final = """
INSERT INTO customers AS c (
    user_id, bot_id, nickname, name, phone, backup_phone, wechat, status, community, business_type,
    room_type, room_tags, move_in_date, lease_period, price_range, source_channel, creator, internal_notes
)
VALUES (
    $1::text, $2::text, $3::text, $4::text, $5::text, $6::text, $7::text, COALESCE($8::smallint, 1),
    $9::text, COALESCE($10::text, 'whole_rent'), COALESCE($11::text, 'one_bedroom'), $12::jsonb, $13::date,
    $14::integer, $15::text, COALESCE($16::text, 'referral'), COALESCE($17::text, '外部系统'), $18::text
)
ON CONFLICT (user_id) DO UPDATE SET
    bot_id = COALESCE($2::text, c.bot_id),
    nickname = COALESCE($3::text, c.nickname),
    name = COALESCE($4::text, c.name),
    phone = COALESCE($5::text, c.phone),
    backup_phone = COALESCE($6::text, c.backup_phone),
    wechat = COALESCE($7::text, c.wechat),
    status = COALESCE($8::smallint, c.status),
    community = COALESCE($9::text, c.community),
    business_type = COALESCE($10::text, c.business_type),
    room_type = COALESCE($11::text, c.room_type),
    room_tags = COALESCE($12::jsonb, c.room_tags),
    move_in_date = COALESCE($13::date, c.move_in_date),
    lease_period = COALESCE($14::integer, c.lease_period),
    price_range = COALESCE($15::text, c.price_range),
    source_channel = COALESCE($16::text, c.source_channel),
    creator = COALESCE($17::text, c.creator),
    internal_notes = COALESCE($18::text, c.internal_notes),
    updated_at = now()
RETURNING id, (xmax = 0) AS inserted
"""


def upsert_args(customer: CustomerIn) -> list[Any]:
    fields = customer.provided_fields()
    args: list[Any] = [customer.user_id]
    for col in COLUMNS:
        value = fields.get(col)
        if col == "room_tags" and value is not None:
            value = orjson.dumps(value).decode()
        args.append(value)
    return args


@dataclass(frozen=True)
class Config:
    database_url: str
    host: str
    port: int
    pool_size: int

    @classmethod
    def from_env(cls) -> Config:
        return cls(
            database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", "3100")),
            pool_size=int(os.environ.get("BASELINE_POOL_SIZE", "16")),
        )


POOL = web.AppKey("pool", asyncpg.Pool)
CONFIG = web.AppKey("config", Config)


def json_response(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The gateway's error shape: ``{"success": false, "error": …, "message": …}``."""
    try:
        return await handler(request)
    except ClientError as error:
        return json_response(error.body(), status=error.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        refused = RequestInvalid(exc.reason or "请求无效")
        return json_response(refused.body(), status=exc.status)
    except Exception:
        log.exception("unhandled error")
        return json_response({"success": False, "error": "服务器内部错误", "message": "服务器处理失败"}, 500)


async def post_customer(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type必须为application/json")
    if request.content_length is not None and request.content_length > BODY_LIMIT:
        raise BodyTooLarge(f"请求体不能超过{BODY_LIMIT}字节")
    raw = await request.read()
    if not raw.strip():
        raise RequestInvalid("请求体不能为空")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestInvalid("请求体不是有效的JSON") from None
    customer = parse_customer(data)
    try:
        row = await request.app[POOL].fetchrow(UPSERT, *upsert_args(customer))
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == PHONE_INDEX:
            raise PhoneTaken("手机号已存在，已被其他客户使用") from None
        raise
    body = {"id": row["id"], "userId": customer.user_id}
    if row["inserted"]:
        return json_response({"success": True, "data": {**body, "action": "created"}, "message": "新客户创建成功"},
                             status=201)
    return json_response({"success": True, "data": {**body, "action": "updated"}, "message": "客户信息已更新"})


async def health(request: web.Request) -> web.Response:
    return json_response({"success": True, "status": "ok"})


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    pool: asyncpg.Pool = await asyncpg.create_pool(
        config.database_url, min_size=config.pool_size, max_size=config.pool_size, command_timeout=60
    )
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    app[POOL] = pool
    yield
    await pool.close()


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=BODY_LIMIT, middlewares=[error_middleware])
    app[CONFIG] = config
    app.cleanup_ctx.append(_pool_ctx)
    app.router.add_post("/api/external/customers", post_customer)
    app.router.add_get("/healthz", health)
    return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = Config.from_env()
    use_uvloop()
    web.run_app(create_app(config), host=config.host, port=config.port, access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main()
