"""What tests call: the one way to wait for a condition, the one error-shape assertion, HTTP and database shortcuts.

``tests/support.py`` runs the processes (gateway, worker) and makes the run's databases and vhost; fixtures live in
``tests/conftest.py``. Nothing here is a fixture, and nothing here starts a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import asyncpg
import orjson

if TYPE_CHECKING:  # support.py waits with the helpers below: it imports this module, not the other way round
    from tests.support import Gateway, Stack

T = TypeVar("T")

CUSTOMERS_PATH = "/api/external/customers"


# ---- waiting for a condition --------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float = 15, interval: float = 0.1, what: str = "the condition"
) -> T:
    """Call ``check`` until it returns something truthy and return that; after ``within`` seconds without one, fail
    the test (``AssertionError`` naming ``what`` and the last result). ``check`` may raise to fail at once (a
    process that exited, an answer no retry can change)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last check gave {result!r})")
        await asyncio.sleep(interval)


def eventually_blocking(
    check: Callable[[], T | None], *, within: float = 15, interval: float = 0.1, what: str = "the condition"
) -> T:
    """``eventually`` for code that runs outside the event loop (starting processes from fixtures): the same rule,
    sleeping the thread between checks."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last check gave {result!r})")
        time.sleep(interval)


# ---- the error shape --------------------------------------------------------------------------------------------

ERROR_KEYS = {"success", "error", "message", "details"}


def assert_error_shape(body: Any, *, status: int, answered: int | None = None) -> None:
    """``body`` is the spec's error answer for HTTP ``status``: success false, a non-empty error and message, an
    optional details list, nothing else (a 500 of a dead-lettered request also names its ``requestId``), and no
    stack trace. ``answered``, the status the server gave, must be ``status`` when it is passed."""
    assert answered is None or answered == status, (answered, body)
    assert isinstance(body, dict), body
    allowed = ERROR_KEYS | ({"requestId"} if status == 500 else set())
    assert set(body) <= allowed, body
    assert body["success"] is False, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body.get("details", []), list), body
    text = orjson.dumps(body).decode()
    assert "Traceback" not in text and 'File "' not in text and "Error:" not in text, body


# ---- HTTP ---------------------------------------------------------------------------------------------------------


def customers_url(gateway: Gateway) -> str:
    return f"{gateway.url}{CUSTOMERS_PATH}"


def api_of(stack: Stack) -> str:
    """The customers URL of the stack's (first) gateway."""
    return customers_url(stack.gateway())


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None, *, raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST JSON (or raw bytes) and return (status, decoded JSON body)."""
    if raw is not None:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with http.post(url, data=raw, headers=hdrs) as response:
            return response.status, await response.json(content_type=None)
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def key_line(name: str, key: str, extra: str = "") -> str:
    """One API_KEYS entry: ``name:sha256(key)`` plus ``extra`` (``:rate:burst``)."""
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}{extra}"


# ---- the database ---------------------------------------------------------------------------------------------


async def fetch_customer(db: asyncpg.Pool, user_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT * FROM customers WHERE user_id = $1", user_id)
    return dict(row) if row is not None else None


async def applied_customer(db: asyncpg.Pool, user_id: str, within: float = 30) -> dict[str, Any]:
    """The customer's row once a worker has written it."""
    return await eventually(lambda: fetch_customer(db, user_id), within=within, what=f"a row for {user_id}")


async def processed_outcomes(db: asyncpg.Pool, request_ids: list[str], within: float = 20) -> dict[str, str]:
    """Once a worker has processed every one of ``request_ids``: request_id -> outcome."""

    async def all_processed() -> dict[str, str] | None:
        rows = await db.fetch(
            "SELECT request_id, outcome FROM processed_requests WHERE request_id = ANY($1::text[])", request_ids
        )
        return {row["request_id"]: row["outcome"] for row in rows} if len(rows) == len(request_ids) else None

    return await eventually(all_processed, within=within, what=f"{len(request_ids)} request(s) processed")
