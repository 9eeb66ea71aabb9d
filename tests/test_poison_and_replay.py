"""Poison messages, the dead-letter queue and the replay tool (``python -m worker.replay``), end to end.

Poison is made for real: a Postgres trigger on ``customers`` raises for userIds that start with a marker
unique to the test, so only that test's requests fail, permanently, until the trigger is dropped. Every
test has its own stack (queue prefix, so its own dead-letter queue) with small retry delays; the replay
tool runs as a subprocess with the stack's environment, as an operator would run it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest
from aiormq.exceptions import ConnectionInternalError

from shared.clock.stamps import HybridClock
from shared.envelope import RequestEnvelope, encode_pack
from shared.topology import Topology, shard_for
from tests.helpers import api_of as api_of  # re-exported for tests/test_console.py (being written elsewhere)
from tests.helpers import applied_customer, assert_error_shape, eventually, fetch_customer, post
from tests.poison import FAST_RETRIES, MAX_ATTEMPTS, PoisonTrigger
from tests.support import ROOT, Stack, unique_phone, unique_user
from worker.dead_letters import move_from_queue, plain_headers
from worker.deadletter import dead_letter_message
from worker.repository import init_connection

SHARDS = 8  # the test stacks run with 8 shards (tests/support.py)
UNREACHABLE_AMQP = "amqp://guest:guest@127.0.0.1:1/"


@pytest.fixture
def cli_stack(make_stack: Callable[..., Stack]) -> Stack:
    """Only a queue prefix and an environment: for replay-tool tests that publish dead letters themselves."""
    return make_stack(**FAST_RETRIES)


def topology_of(stack: Stack) -> Topology:
    return Topology(prefix=stack.prefix, shard_count=SHARDS, queue_type="quorum")


def same_shard_users(user: str, count: int) -> list[str]:
    shard = shard_for(user, SHARDS)
    users: list[str] = []
    while len(users) < count:
        candidate = unique_user("calm")
        if shard_for(candidate, SHARDS) == shard:
            users.append(candidate)
    return users


async def send_poison(http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any]) -> None:
    """Post a request the trigger refuses; it must come back as 500 once it is dead-lettered."""
    status, answer = await post(http, api_of(stack), body)
    assert_error_shape(answer, status=500, answered=status)


# ---- the dead-letter queue, read and written directly -----------------------------------------------


@dataclass(frozen=True)
class Letter:
    body: dict[str, Any]
    headers: dict[str, Any]

    @property
    def request_id(self) -> str:
        return str(self.body["request_id"])

    @property
    def user_id(self) -> str:
        return str(self.body["user_id"])


async def dead_letters(stack: Stack) -> list[Letter]:
    """Every dead letter of the stack, in order: those the replay tool moved into PostgreSQL, then those still
    in the dead-letter queue (read and left in place: unacked, requeued on close)."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch("SELECT body, headers::text AS headers FROM dead_letters WHERE queue = $1 ORDER BY id",
                                topology_of(stack).dead_letter_queue)
    finally:
        await conn.close()
    letters = [Letter(orjson.loads(row["body"]), orjson.loads(row["headers"])) for row in rows]
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await topology_of(stack).declare_dead_letter_queue(channel)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
            letters.append(Letter(orjson.loads(message.body), plain_headers(headers)))
    return letters


CLOCK = HybridClock()


def envelope_for(user: str, **fields: Any) -> RequestEnvelope:
    return RequestEnvelope(
        request_id=uuid.uuid4().hex, stamp=CLOCK.now(), user_id=user, payload={"userId": user, **fields}
    )


async def publish_dead_letters(stack: Stack, envelopes: list[RequestEnvelope], reason: str = "test poison") -> None:
    """Dead letters exactly as the worker writes them, without waiting for real retries."""
    topology = topology_of(stack)
    now = dt.datetime.now(dt.UTC)
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_dead_letter_queue(channel)
        for envelope in envelopes:
            message = dead_letter_message(
                envelope.to_json(),
                error=RuntimeError(reason),
                attempts=MAX_ATTEMPTS,
                first_failure=now,
                last_failure=now,
                routing_key=topology.routing_key_for(envelope.user_id),
                request_id=envelope.request_id,
                user_id=envelope.user_id,
            )
            await channel.default_exchange.publish(message, routing_key=topology.dead_letter_queue)


# ---- the replay tool as a subprocess ------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.strip()]


async def replay_tool(stack: Stack, *args: str, **env: Any) -> Cli:
    """Run ``python -m worker.replay ARGS`` with the stack's environment (plus ``env`` overrides)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.replay", *args,
        env=stack.env(**env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()  # never leave a hung tool behind
        await process.wait()
        raise
    assert process.returncode is not None
    return Cli(process.returncode, stdout.decode(), stderr.decode())


async def listed_ids(stack: Stack, *args: str) -> list[str]:
    result = await replay_tool(stack, "list", "--json", *args)
    assert result.code == 0, result
    return [str(item["requestId"]) for item in result.json_lines()]


async def audit_rows(db: asyncpg.Pool, actor: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT actor, action, request_ids, outcome FROM dead_letter_audit WHERE actor = $1 ORDER BY id", actor
    )
    return [dict(row) for row in rows]


def new_actor() -> str:
    return f"ops-{uuid.uuid4().hex[:10]}"


# ---- poison requests --------------------------------------------------------------------------------


async def test_poison_request_answers_500_in_the_error_shape(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    user = poison.user()
    status, body = await post(http, api_of(poison_stack), {"userId": user, "name": "毒"})

    assert_error_shape(body, status=500, answered=status)
    assert await fetch_customer(db, user) is None


async def test_poison_request_is_dead_lettered_after_max_attempts_with_why_headers(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession
) -> None:
    user = poison.user()
    await send_poison(http, poison_stack, {"userId": user, "name": "毒"})

    letters = await dead_letters(poison_stack)
    assert [letter.user_id for letter in letters] == [user]
    letter = letters[0]
    headers = letter.headers
    assert "test trigger refuses" in headers["x-error"], headers
    assert "RaiseError" in headers["x-exception"], headers
    assert headers["x-attempts"] == MAX_ATTEMPTS
    assert headers["x-original-routing-key"] == topology_of(poison_stack).routing_key_for(user)
    first = dt.datetime.fromisoformat(headers["x-first-failure"])
    last = dt.datetime.fromisoformat(headers["x-last-failure"])
    # Backoff between the attempts: 0.2 s then 0.4 s.
    assert last - first >= dt.timedelta(seconds=0.5), (first, last)
    assert letter.body["payload"]["name"] == "毒"


async def test_poison_request_does_not_delay_other_requests_of_its_shard(
    make_stack: Callable[..., Stack], poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    # Slower retries than the other tests (1.5 s twice) so "well before the poison is dead" is measurable.
    backoff = 1.5
    stack = make_stack(MAX_ATTEMPTS=MAX_ATTEMPTS, RETRY_BASE_DELAY=backoff, RETRY_MAX_DELAY=backoff)
    stack.start_worker()
    stack.start_gateway()
    api = api_of(stack)
    user = poison.user()
    first_wave, second_wave = same_shard_users(user, 20), same_shard_users(user, 20)

    async def timed(body: dict[str, Any], delay: float = 0) -> tuple[int, float]:
        await asyncio.sleep(delay)
        sent = time.monotonic()
        status, answer = await post(http, api, body)
        assert status in (201, 500), answer
        return status, time.monotonic() - sent

    poisoned, *others = await asyncio.gather(
        timed({"userId": user, "name": "毒"}),
        # Sent with the poison: same shard, likely the same pack and the same batch.
        *(timed({"userId": other, "name": "ok"}) for other in first_wave),
        # Sent while the poison is between its retries.
        *(timed({"userId": other, "name": "ok"}, delay=0.5) for other in second_wave),
    )

    poison_status, poison_latency = poisoned
    assert poison_status == 500
    assert poison_latency >= 2 * backoff, "the poison request should have been retried with backoff"
    assert [status for status, _ in others] == [201] * len(others)
    slowest = max(latency for _, latency in others)
    print(f"poison answered after {poison_latency:.2f}s, the slowest of its shard neighbours after {slowest:.2f}s")
    assert slowest < backoff, f"a request of the poison's shard waited {slowest:.2f}s"
    stored = await db.fetchval(
        "SELECT count(*) FROM customers WHERE user_id = ANY($1) AND name = 'ok'", first_wave + second_wave
    )
    assert stored == len(others)


# ---- list ---------------------------------------------------------------------------------------------


async def test_list_shows_dead_letters_with_phones_masked_unless_show_pii(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession
) -> None:
    user, phone, backup = poison.user(), unique_phone(), unique_phone()
    await send_poison(http, poison_stack, {"userId": user, "phone": phone, "backup_phone": backup, "name": "毒"})
    [letter] = await dead_letters(poison_stack)

    masked = await replay_tool(poison_stack, "list", "--json")
    full = await replay_tool(poison_stack, "list", "--json", "--show-pii")

    assert masked.code == 0, masked
    [item] = masked.json_lines()
    assert item["requestId"] == letter.request_id
    assert item["userId"] == user
    assert "test trigger refuses" in item["reason"]
    assert item["attempts"] == MAX_ATTEMPTS
    assert dt.datetime.fromisoformat(item["deadAt"]) <= dt.datetime.now(dt.UTC)
    assert item["payload"]["phone"] == f"{phone[:3]}****{phone[-4:]}"
    assert item["payload"]["backup_phone"] == f"{backup[:3]}****{backup[-4:]}"
    assert item["payload"]["name"] == "*"  # names and WeChat ids are personal data too
    assert phone not in masked.stdout and backup not in masked.stdout and "毒" not in masked.stdout
    assert full.code == 0, full
    [whole] = full.json_lines()
    assert (whole["payload"]["phone"], whole["payload"]["backup_phone"]) == (phone, backup)
    assert whole["payload"]["name"] == "毒"


async def test_listing_removes_and_reorders_nothing(cli_stack: Stack) -> None:
    envelopes = [envelope_for(unique_user("dl"), nickname=f"n{i}") for i in range(12)]
    await publish_dead_letters(cli_stack, envelopes)
    expected = [envelope.request_id for envelope in envelopes]

    first = await listed_ids(cli_stack)
    second = await listed_ids(cli_stack)
    text = await replay_tool(cli_stack, "list")

    assert first == expected
    assert second == expected
    assert text.code == 0 and "12 dead letter(s)" in text.stdout, text
    assert [letter.request_id for letter in await dead_letters(cli_stack)] == expected


class LeaderlessFirst:
    """A ``connected`` provider for ``move_from_queue`` whose first connection is on a node where the dead-letter
    queue has no leader yet: RabbitMQ answers with the hard error it gives then (541, which closes the whole
    connection). Later calls connect for real, as the replay tool does after a closed connection."""

    def __init__(self, amqp_url: str, error: str) -> None:
        self.amqp_url = amqp_url
        self.error = error
        self.calls = 0
        self.connection: aio_pika.abc.AbstractConnection | None = None

    async def __call__(self) -> aio_pika.abc.AbstractConnection:
        self.calls += 1
        if self.calls == 1:
            return cast(aio_pika.abc.AbstractConnection, self)
        if self.connection is None:
            self.connection = await aio_pika.connect(self.amqp_url)
        return self.connection

    def channel(self) -> Any:  # the first connection's channel: its first operation meets the missing leader
        raise ConnectionInternalError(self.error)


LEADERLESS = "INTERNAL_ERROR - Cannot get a message from queue 'queue 'crm.dead' in vhost '/'': nodedown"


async def worker_connection(stack: Stack) -> asyncpg.Connection:
    """A database connection set up as the replay tool's is (jsonb through orjson)."""
    conn = await asyncpg.connect(stack.database_url)
    await init_connection(conn)
    return conn


async def test_listing_waits_for_a_dead_letter_queue_without_a_leader(cli_stack: Stack) -> None:
    envelopes = [envelope_for(unique_user("leaderless"), nickname="x") for _ in range(3)]
    await publish_dead_letters(cli_stack, envelopes)
    broker = LeaderlessFirst(cli_stack.amqp_url, LEADERLESS)
    conn = await worker_connection(cli_stack)
    try:
        moved = await move_from_queue(broker, conn, topology_of(cli_stack))
    finally:
        await conn.close()
        if broker.connection is not None:
            await broker.connection.close()

    assert moved == len(envelopes) and broker.calls == 2
    assert await listed_ids(cli_stack) == [envelope.request_id for envelope in envelopes]


async def test_a_hard_error_other_than_a_missing_leader_is_not_waited_for(cli_stack: Stack) -> None:
    broker = LeaderlessFirst(cli_stack.amqp_url, "INTERNAL_ERROR - something else broke")
    conn = await worker_connection(cli_stack)
    try:
        with pytest.raises(ConnectionInternalError, match="something else"):
            await move_from_queue(broker, conn, topology_of(cli_stack))
    finally:
        await conn.close()
    assert broker.calls == 1


async def test_list_filters_by_user_reason_and_limit(cli_stack: Stack) -> None:
    chosen, other = unique_user("dl"), unique_user("dl")
    mine = [envelope_for(chosen, nickname=f"n{i}") for i in range(3)]
    theirs = [envelope_for(other, nickname="x")]
    await publish_dead_letters(cli_stack, [mine[0], theirs[0], mine[1]], reason="trigger said no")
    await publish_dead_letters(cli_stack, [mine[2]], reason="schema mismatch")

    assert await listed_ids(cli_stack, "--user-id", chosen) == [e.request_id for e in mine]
    assert await listed_ids(cli_stack, "--reason", "SCHEMA") == [mine[2].request_id]
    assert await listed_ids(cli_stack, "--limit", "2") == [mine[0].request_id, theirs[0].request_id]


# ---- replay ---------------------------------------------------------------------------------------------


async def test_replay_applies_the_chosen_letter_and_keeps_the_others_in_order(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    users = [poison.user() for _ in range(3)]
    for user in users:
        await send_poison(http, poison_stack, {"userId": user, "name": f"name of {user}"})
    letters = await dead_letters(poison_stack)
    assert [letter.user_id for letter in letters] == users
    chosen = letters[1]
    await poison.drop()
    actor = new_actor()

    result = await replay_tool(poison_stack, "replay", "--request-id", chosen.request_id, USER=actor)

    assert result.code == 0, result
    assert chosen.request_id in result.stdout
    row = await applied_customer(db, users[1], within=15)
    assert row["name"] == f"name of {users[1]}"
    processed = await db.fetchval("SELECT outcome FROM processed_requests WHERE request_id = $1", chosen.request_id)
    assert processed == "created"
    remaining = await dead_letters(poison_stack)
    assert [letter.request_id for letter in remaining] == [letters[0].request_id, letters[2].request_id]
    assert await fetch_customer(db, users[0]) is None and await fetch_customer(db, users[2]) is None
    audit = await audit_rows(db, actor)
    assert [(a["action"], a["request_ids"]) for a in audit] == [("replay", [chosen.request_id])], audit


async def replayed_over_a_newer_request(
    stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool, *options: str
) -> dict[str, Any]:
    """A dead-lettered ``name: old, wechat: w1``, then a newer ``name: new`` applied, then the letter replayed with
    ``options``: the row once the replay is applied (wechat w1)."""
    user = poison.user()
    await send_poison(http, stack, {"userId": user, "name": "old", "wechat": "w1"})
    await poison.drop()
    status, body = await post(http, api_of(stack), {"userId": user, "name": "new"})
    assert status == 201, body

    result = await replay_tool(stack, "replay", "--user-id", user, *options, "--actor", new_actor())

    assert result.code == 0, result

    async def wechat_set() -> dict[str, Any] | None:
        row = await fetch_customer(db, user)
        return row if row is not None and row["wechat"] == "w1" else None

    return await eventually(wechat_set, what="the replay applied")


async def test_replay_never_overwrites_a_field_set_by_a_newer_request(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    row = await replayed_over_a_newer_request(poison_stack, poison, http, db)

    assert row["name"] == "new", "a stale replay overwrote a newer field"
    assert await dead_letters(poison_stack) == []


async def test_forced_replay_overwrites_newer_fields(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    row = await replayed_over_a_newer_request(poison_stack, poison, http, db, "--force")

    assert row["name"] == "old"


async def test_replay_dry_run_changes_nothing(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    user = poison.user()
    await send_poison(http, poison_stack, {"userId": user, "name": "毒"})
    before = await dead_letters(poison_stack)
    await poison.drop()  # a real replay would now succeed: the dry run must not do it
    actor = new_actor()

    result = await replay_tool(poison_stack, "replay", "--user-id", user, "--dry-run", "--actor", actor)

    assert result.code == 0, result
    assert before[0].request_id in result.stdout and "would" in result.stdout, result
    await asyncio.sleep(1.5)  # long enough for the worker to apply a republished request
    assert await fetch_customer(db, user) is None
    assert await dead_letters(poison_stack) == before
    assert await audit_rows(db, actor) == []


# ---- drop ----------------------------------------------------------------------------------------------


async def test_drop_discards_only_the_chosen_letters_and_is_audited(cli_stack: Stack, db: asyncpg.Pool) -> None:
    dropped_user, kept_user = unique_user("dl"), unique_user("dl")
    u1, v1, u2, v2 = (envelope_for(user, nickname="x") for user in (dropped_user, kept_user, dropped_user, kept_user))
    await publish_dead_letters(cli_stack, [u1, v1, u2, v2])
    actor = new_actor()

    result = await replay_tool(cli_stack, "drop", "--user-id", dropped_user, "--yes", USER=actor)

    assert result.code == 0, result
    assert [letter.request_id for letter in await dead_letters(cli_stack)] == [v1.request_id, v2.request_id]
    audit = await audit_rows(db, actor)
    assert [(a["action"], a["request_ids"]) for a in audit] == [("drop", [u1.request_id, u2.request_id])], audit


async def test_drop_without_yes_is_refused(cli_stack: Stack) -> None:
    user = unique_user("dl")
    letter = envelope_for(user, nickname="x")
    await publish_dead_letters(cli_stack, [letter])

    result = await replay_tool(cli_stack, "drop", "--user-id", user)

    assert result.code == 2, result
    assert "--yes" in result.stderr
    assert [kept.request_id for kept in await dead_letters(cli_stack)] == [letter.request_id]


# ---- the tool's manners --------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "option"), [("list", "--json"), ("replay", "--dry-run"), ("drop", "--yes")])
async def test_every_command_has_help(cli_stack: Stack, command: str, option: str) -> None:
    result = await replay_tool(cli_stack, command, "--help")

    assert result.code == 0, result
    assert result.stdout.startswith("usage:") and option in result.stdout, result


@pytest.mark.parametrize(
    "args", [("list",), ("replay", "--all"), ("drop", "--all", "--yes")], ids=["list", "replay", "drop"]
)
async def test_unreachable_broker_is_a_clear_error(cli_stack: Stack, args: tuple[str, ...]) -> None:
    result = await replay_tool(cli_stack, *args, AMQP_URL=UNREACHABLE_AMQP)

    assert result.code != 0, result
    assert result.stderr.startswith("error:"), result
    assert "RabbitMQ" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [("replay", "--all"), ("drop", "--all", "--yes")], ids=["replay", "drop"])
async def test_unreachable_database_is_a_clear_error_and_touches_no_letter(
    cli_stack: Stack, args: tuple[str, ...]
) -> None:
    letter = envelope_for(unique_user("dl"), nickname="x")
    await publish_dead_letters(cli_stack, [letter])
    parts = urllib.parse.urlsplit(cli_stack.database_url)
    netloc = parts.netloc.rsplit("@", 1)[0] + "@127.0.0.1:1" if "@" in parts.netloc else "127.0.0.1:1"
    unreachable_db = urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    result = await replay_tool(cli_stack, *args, DATABASE_URL=unreachable_db)

    assert result.code != 0, result
    assert result.stderr.startswith("error:"), result
    assert "PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
    assert [kept.request_id for kept in await dead_letters(cli_stack)] == [letter.request_id]


async def test_pack_dead_lettered_by_the_broker_is_listed_and_replayed_whole(
    poison_stack: Stack, db: asyncpg.Pool
) -> None:
    """A quorum queue's delivery limit dead-letters a whole pack (with x-death, none of our headers)."""
    users = [unique_user("limit") for _ in range(2)]
    envelopes = [envelope_for(user, name=f"limit {user}") for user in users]
    topology = topology_of(poison_stack)
    connection = await aio_pika.connect(poison_stack.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_dead_letter_queue(channel)
        await channel.default_exchange.publish(
            aio_pika.Message(
                encode_pack(envelopes),
                headers={"x-death": [{
                    "reason": "delivery_limit", "count": 1, "exchange": topology.exchange,
                    "queue": topology.shard_queue(0), "routing-keys": [topology.routing_key_for(users[0])],
                }]},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=topology.dead_letter_queue,
        )

    listed = await replay_tool(poison_stack, "list", "--json", "--user-id", users[1])
    assert listed.code == 0, listed
    [item] = listed.json_lines()
    assert "delivery_limit" in item["reason"]
    assert item["requestIds"] == [e.request_id for e in envelopes]

    result = await replay_tool(poison_stack, "replay", "--user-id", users[1])
    assert result.code == 0, result
    for user in users:
        row = await applied_customer(db, user, within=15)
        assert row["name"] == f"limit {user}"
    assert await dead_letters(poison_stack) == []


async def test_request_that_always_violates_a_unique_constraint_is_dead_lettered_and_blocks_nothing(
    poison_stack: Stack, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """A unique violation is a retryable race only until the database says it again and again."""
    marker = f"uniq_{uuid.uuid4().hex[:8]}"
    index = f"customers_{marker}"
    await db.execute(f"CREATE UNIQUE INDEX {index} ON customers (wechat) WHERE wechat LIKE '{marker}%'")
    try:
        first, second = unique_user("uniq"), unique_user("uniq")
        status, _ = await post(http, api_of(poison_stack), {"userId": first, "wechat": f"{marker}_w"})
        assert status == 201
        started = time.monotonic()
        status, body = await post(http, api_of(poison_stack), {"userId": second, "wechat": f"{marker}_w"})
        assert_error_shape(body, status=500, answered=status)
        assert time.monotonic() - started < 10
        [letter] = [letter for letter in await dead_letters(poison_stack) if letter.user_id == second]
        assert "UniqueViolation" in letter.headers["x-exception"]
        status, _ = await post(http, api_of(poison_stack), {"userId": unique_user("uniq"), "name": "after"})
        assert status == 201  # the worker is not stuck on it
    finally:
        await db.execute(f"DROP INDEX IF EXISTS {index}")


async def test_replay_routes_by_user_id_even_if_the_recorded_shard_is_gone(
    poison_stack: Stack, db: asyncpg.Pool
) -> None:
    user = unique_user("reroute")
    envelope = envelope_for(user, name="rerouted")
    now = dt.datetime.now(dt.UTC)
    connection = await aio_pika.connect(poison_stack.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology_of(poison_stack).declare_dead_letter_queue(channel)
        message = dead_letter_message(
            envelope.to_json(), error=RuntimeError("old"), attempts=MAX_ATTEMPTS, first_failure=now,
            last_failure=now, routing_key="shard.99", request_id=envelope.request_id, user_id=user,
        )
        await channel.default_exchange.publish(message, routing_key=topology_of(poison_stack).dead_letter_queue)

    result = await replay_tool(poison_stack, "replay", "--request-id", envelope.request_id)
    assert result.code == 0, result
    row = await applied_customer(db, user, within=15)
    assert row["name"] == "rerouted"
    assert [letter for letter in await dead_letters(poison_stack) if letter.user_id == user] == []
