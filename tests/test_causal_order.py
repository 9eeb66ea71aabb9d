"""Causal order across gateways whose clocks disagree: a write sent after an answer always wins.

The gateways' wall clocks are really shifted with libfaketime (Debian package ``faketime``; ``.ci/run``
installs it where it is missing). Every gateway stamps on the database server's clock (``shared.clock.timeline``),
so the shift must change nothing: the row ends with the last step, and every answer says what happened.
"""

from __future__ import annotations

import asyncio
import glob
import shutil
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.faults import postgres_down
from tests.helpers import fetch_customer, post, processed_outcomes
from tests.support import Stack, unique_user

# libfaketime, preloaded into the gateway process itself (not through the `faketime` wrapper, which forks: a
# SIGTERM to the wrapper would leave the gateway running).
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)
needs_faketime = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime (Debian package faketime) not installed")

USERS = 100
STEPS = 15


def shifted(seconds: float) -> dict[str, Any]:
    """Environment that runs a process with its wall clock shifted by ``seconds`` (monotonic clock untouched)."""
    if seconds == 0:
        return {}
    assert LIBFAKETIME is not None
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{seconds:+}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


async def alternate_updates(urls: list[str], users: list[str], steps: int) -> dict[str, list[tuple[int, Any]]]:
    """Each user is a client sending ``steps`` writes in sequence, waiting for each answer, alternating gateways."""
    answers: dict[str, list[tuple[int, Any]]] = {user: [] for user in users}
    connector = aiohttp.TCPConnector(limit=len(users))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def client(user: str) -> None:
            for step in range(steps):
                url = f"{urls[step % len(urls)]}/api/external/customers"
                body = {"userId": user, "nickname": f"n{step}", "community": f"c{step}"}
                answers[user].append(await post(http, url, body))

        await asyncio.gather(*(client(user) for user in users))
    return answers


def assert_truthful(user: str, answers: list[tuple[int, Any]]) -> None:
    """Step 0 created the customer; every later step was applied as an update (nothing superseded)."""
    (status, body), *rest = answers
    assert (status, body["data"]["action"]) == (201, "created"), (user, status, body)
    for step, (status, body) in enumerate(rest, start=1):
        assert status == 200, (user, step, status, body)
        assert body["data"]["action"] == "updated", (user, step, body)
        assert "supersededFields" not in body["data"], (user, step, body)


@needs_faketime
@pytest.mark.parametrize(
    ("shift_a", "shift_b"), [(0.0, -0.5), (0.0, +0.5), (-0.5, +0.5)], ids=["behind", "ahead", "both-ways"]
)
async def test_a_later_write_wins_across_gateways_whose_clocks_are_skewed(
    make_stack: Callable[..., Stack], db: asyncpg.Pool, shift_a: float, shift_b: float
) -> None:
    stack = make_stack()
    for _ in range(3):
        stack.start_worker()
    gateway_a = stack.start_gateway(**shifted(shift_a))
    gateway_b = stack.start_gateway(**shifted(shift_b))
    users = [unique_user("skew") for _ in range(USERS)]

    answers = await alternate_updates([gateway_a.url, gateway_b.url], users, STEPS)

    lost = []
    for user in users:
        assert_truthful(user, answers[user])
        row = await fetch_customer(db, user)
        assert row is not None
        if (row["nickname"], row["community"]) != (f"n{STEPS - 1}", f"c{STEPS - 1}"):
            lost.append((user, row["nickname"]))
    assert lost == [], f"{len(lost)} of {USERS} rows do not hold the last step: {lost[:5]}"


@needs_faketime
async def test_a_gateway_whose_wall_clock_is_off_logs_it(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    gateway = stack.start_gateway(**shifted(-0.5))
    await gateway.logged("clock synchronised with the database")
    await gateway.logged("local wall clock is -50")  # "-500.x ms off the database clock"
    assert "off the database clock" in gateway.output()


@needs_faketime
async def test_without_the_database_at_start_a_gateway_stamps_with_its_wall_clock_and_the_worker_flags_it(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = make_stack()
    worker = stack.start_worker()
    await worker.logged("clock synchronised with the database")
    # This gateway cannot reach Postgres (nothing listens on port 1) and its wall clock is 2 s ahead.
    gateway = stack.start_gateway(**shifted(+2.0), DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere")
    await gateway.logged("stamping with the local wall clock")
    user = unique_user("future")
    status, body = await post(http, f"{gateway.url}/api/external/customers", {"userId": user, "name": "x"})
    assert status == 201, body  # still accepted and applied: the queue does not need the gateway's database
    await worker.logged("in the future")
    row = await fetch_customer(db, user)
    assert row is not None and row["name"] == "x"


async def nickname_set_from_the_future(api: str, http: aiohttp.ClientSession, db: asyncpg.Pool, prefix: str) -> str:
    """A new customer ``nickname: first, community: c1`` whose nickname a write stamped an hour from now has set
    since (as a concurrent request from elsewhere could); returns its userId."""
    user = unique_user(prefix)
    assert (await post(http, api, {"userId": user, "nickname": "first", "community": "c1"}))[0] == 201
    future = (time.time_ns() // 1000) + 3_600_000_000
    await db.execute(
        "UPDATE customers SET field_stamps = jsonb_set(field_stamps, '{nickname}', to_jsonb($2::bigint))"
        " WHERE user_id = $1", user, future,
    )
    return user


async def test_an_update_whose_fields_all_lost_to_newer_writes_answers_superseded(
    api: str, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    user = await nickname_set_from_the_future(api, http, db, "sup")
    before = await fetch_customer(db, user)
    assert before is not None

    status, body = await post(http, api, {"userId": user, "nickname": "stale"})
    assert status == 200
    assert body["success"] is True
    assert body["data"]["action"] == "superseded"
    assert body["data"]["supersededFields"] == ["nickname"]
    assert body["data"]["id"] == before["id"]
    after = await fetch_customer(db, user)
    assert after == before  # nothing changed, not even updated_at


async def test_a_partly_superseded_update_is_updated_and_names_the_fields_that_lost(
    api: str, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    user = await nickname_set_from_the_future(api, http, db, "part")
    status, body = await post(http, api, {"userId": user, "nickname": "stale", "community": "c2"})
    assert (status, body["data"]["action"], body["data"]["supersededFields"]) == (200, "updated", ["nickname"])
    row = await fetch_customer(db, user)
    assert row is not None and (row["nickname"], row["community"]) == ("first", "c2")


async def test_snake_case_user_id_is_not_accepted_for_userId(
    api: str, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    status, body = await post(http, api, {"user_id": unique_user("snake"), "name": "x"})
    assert (status, body["error"]) == (400, "userId为必填字段")


async def test_snake_case_bot_id_is_ignored_like_any_unknown_key(
    api: str, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    user = unique_user("botid")
    status, _ = await post(http, api, {"userId": user, "bot_id": "x"})
    assert status == 201
    row = await fetch_customer(db, user)
    assert row is not None and row["bot_id"] is None


@pytest.mark.fault
@needs_faketime
@pytest.mark.skipif(shutil.which("pg_ctlcluster") is None, reason="needs local pg_ctlcluster to stop Postgres")
async def test_during_a_postgres_outage_skewed_gateways_keep_accepting_and_order_holds(
    make_stack: Callable[..., Stack], db: asyncpg.Pool
) -> None:
    stack = make_stack(RPC_TIMEOUT="1.5")
    stack.start_worker()
    gateway_a = stack.start_gateway()
    gateway_b = stack.start_gateway(**shifted(-0.5))
    for gateway in (gateway_a, gateway_b):
        await gateway.logged("clock synchronised with the database")
    users = [unique_user("outage") for _ in range(10)]
    steps = 6

    async with postgres_down():
        answers = await alternate_updates([gateway_a.url, gateway_b.url], users, steps)
        for user in users:  # accepted durably, applied later
            assert [status for status, _ in answers[user]] == [202] * steps, answers[user]

    request_ids = [body["data"]["requestId"] for user in users for _, body in answers[user]]
    await processed_outcomes(db, request_ids, within=90)  # every accepted request, after the outage
    for user in users:
        row = await fetch_customer(db, user)
        assert row is not None
        assert (row["nickname"], row["community"]) == (f"n{steps - 1}", f"c{steps - 1}"), user
    assert "cannot read the database clock" in gateway_b.output()  # noticed, and went on from the last offset
