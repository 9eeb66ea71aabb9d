"""Operations, end to end (issue 8): read-back, request status, request ids, JSON logs and masking, metrics,
health, and the OpenAPI document and docs page — against real gateway and worker processes.

Poison requests (for ``failed`` statuses and dead-letter log lines) reuse ``tests.test_poison_and_replay``'s
trigger and replay-tool helpers. Logs are read from each process's captured output (``Proc.output()``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.request_ids import new_request_id, request_id_time_ms
from tests.helpers import api_of, assert_error_shape, eventually, fetch_customer, post
from tests.poison import FAST_RETRIES, PoisonTrigger
from tests.spec_examples import scenario_1_body
from tests.support import Gateway, Proc, Stack, unique_phone, unique_user
from tests.test_poison_and_replay import replay_tool

REQUEST_ID_HEADER = "X-Request-Id"
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# ---- helpers ------------------------------------------------------------------------------------------


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as response:
        return response.status, await response.json(content_type=None)


async def post_with_headers(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str | None]:
    """POST JSON; (status, body, our X-Request-Id header)."""
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None), response.headers.get(REQUEST_ID_HEADER)


def status_url(gateway: Gateway, request_id: str) -> str:
    return f"{gateway.url}/api/external/requests/{request_id}"


async def assert_created_once_not(
    http: aiohttp.ClientSession, gateway: Gateway, db: asyncpg.Pool, request_id: str, user: str, status: str
) -> None:
    """The request's status, once it is no longer ``status``, is ``created`` with the id of the customer's row."""

    async def changed() -> dict[str, Any] | None:
        _, answer = await get(http, status_url(gateway, request_id))
        return answer["data"] if answer["data"]["status"] != status else None

    data = await eventually(changed, within=30, what=f"request {request_id} no longer {status}")
    row = await fetch_customer(db, user)
    assert row is not None
    assert data == {"requestId": request_id, "userId": user, "status": "created", "id": row["id"], "error": None}


def is_canonical_v7(request_id: str | None) -> bool:
    return request_id is not None and request_id_time_ms(request_id) is not None and (
        str(uuid.UUID(request_id)) == request_id
    )


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line of the process's output, decoded (raises if one is not a JSON object)."""
    lines = []
    for number, line in enumerate(proc.output().splitlines(), 1):
        if not line.strip():
            continue
        try:
            decoded = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"{proc.log_path.name}:{number} is not JSON: {line!r}") from None
        assert isinstance(decoded, dict), f"{proc.log_path.name}:{number} is not an object: {line!r}"
        lines.append(decoded)
    return lines


async def wait_for_lines(
    proc: Proc, matches: Callable[[dict[str, Any]], bool], within: float = 10
) -> list[dict[str, Any]]:
    """The process's log lines that ``matches`` accepts, once there is at least one."""

    async def found() -> list[dict[str, Any]]:
        return [line for line in json_lines(proc) if matches(line)]

    return await eventually(found, within=within, what=f"log lines of {proc.log_path.name} that match")


def access_lines(proc: Proc) -> list[dict[str, Any]]:
    return [line for line in json_lines(proc) if line.get("event") == "http request"]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    """One /metrics scrape as {(sample name, labels): value}."""
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain", response.headers
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ---- fixtures -----------------------------------------------------------------------------------------


# ---- 1. read-back: GET /api/external/customers/{userId} -------------------------------------------------


async def test_read_back_returns_every_stored_field_in_the_request_names(
    api: str, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    user = unique_user("read")
    sent = scenario_1_body(user, unique_phone(), unique_phone())
    status, created = await post(http, api, sent)
    assert status == 201, created

    status, body = await get(http, f"{api}/{user}")

    assert status == 200, body
    assert body["success"] is True
    data = body["data"]
    expected_keys = set(sent) | {"id", "createdAt", "updatedAt"}
    assert set(data) == expected_keys, set(data) ^ expected_keys
    for field, sent_value in sent.items():
        if field == "room_tags":
            assert isinstance(data[field], str), data[field]
            assert orjson.loads(data[field]) == orjson.loads(sent_value)
        else:
            assert data[field] == sent_value, (field, data[field], sent_value)
    assert ISO_DATE.fullmatch(data["move_in_date"])
    assert isinstance(data["lease_period"], int) and not isinstance(data["lease_period"], bool)
    assert data["id"] == created["data"]["id"]
    row = await fetch_customer(db, user)
    assert row is not None
    created_at = dt.datetime.fromisoformat(data["createdAt"])
    updated_at = dt.datetime.fromisoformat(data["updatedAt"])
    assert created_at.tzinfo is not None and updated_at.tzinfo is not None
    assert created_at == row["created_at"] and updated_at == row["updated_at"]


async def test_read_back_after_a_partial_update_keeps_the_fields_not_sent(
    api: str, http: aiohttp.ClientSession
) -> None:
    user = unique_user("read")
    sent = scenario_1_body(user, unique_phone(), unique_phone())
    status, _ = await post(http, api, sent)
    assert status == 201
    status, before = await get(http, f"{api}/{user}")
    assert status == 200

    status, answer = await post(http, api, {"userId": user, "nickname": "老张", "lease_period": 6})
    assert status == 200, answer
    status, after = await get(http, f"{api}/{user}")

    assert status == 200, after
    expected = dict(before["data"], nickname="老张", lease_period=6)
    del expected["updatedAt"]
    assert {k: v for k, v in after["data"].items() if k != "updatedAt"} == expected
    assert dt.datetime.fromisoformat(after["data"]["updatedAt"]) >= dt.datetime.fromisoformat(
        before["data"]["updatedAt"]
    )


async def test_read_back_of_an_unknown_user_is_404_in_the_error_shape(api: str, http: aiohttp.ClientSession) -> None:
    status, body = await get(http, f"{api}/{unique_user('nobody')}")

    assert_error_shape(body, status=404, answered=status)


# ---- 2. request status: GET /api/external/requests/{requestId} -----------------------------------------


async def test_status_of_a_request_answered_201_is_created_with_its_id(
    api: str, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    user = unique_user("status")
    status, body, request_id = await post_with_headers(http, api, {"userId": user, "name": "张三"})
    assert status == 201, body
    assert request_id is not None

    status, answer = await get(http, status_url(gateway, request_id))

    assert status == 200, answer
    assert answer["success"] is True
    assert answer["data"] == {
        "requestId": request_id, "userId": user, "status": "created", "id": body["data"]["id"], "error": None,
    }


async def test_status_goes_from_pending_to_created_when_a_worker_comes_back(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = make_stack(RPC_TIMEOUT=1)
    worker = stack.start_worker()
    gateway = stack.start_gateway()
    assert worker.terminate() == 0  # no worker: every POST times out into 202
    user = unique_user("pending")

    status, body, header_id = await post_with_headers(http, api_of(stack), {"userId": user, "name": "待处理"})

    assert status == 202, body
    assert is_canonical_v7(header_id), header_id
    assert body["data"]["requestId"] == header_id
    assert body["data"]["userId"] == user
    assert header_id is not None
    status, answer = await get(http, status_url(gateway, header_id))
    assert status == 200, answer
    assert answer["data"]["status"] == "pending"
    assert answer["data"]["requestId"] == header_id

    stack.start_worker()

    await assert_created_once_not(http, gateway, db, header_id, user, "pending")


async def test_dead_lettered_request_is_500_with_its_id_then_failed_then_created_after_replay(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    gateway = poison_stack.gateway()
    user = poison.user()

    status, body, header_id = await post_with_headers(http, api_of(poison_stack), {"userId": user, "name": "毒"})

    assert_error_shape(body, status=500, answered=status)
    assert is_canonical_v7(header_id), header_id
    assert body["requestId"] == header_id
    assert header_id is not None
    status, answer = await get(http, status_url(gateway, header_id))
    assert status == 200, answer
    data = answer["data"]
    assert (data["requestId"], data["userId"], data["status"], data["id"]) == (header_id, user, "failed", None)
    assert "test trigger refuses" in data["error"], data

    await poison.drop()
    result = await replay_tool(poison_stack, "replay", "--request-id", header_id, "--actor", "observability-test")
    assert result.code == 0, result

    await assert_created_once_not(http, gateway, db, header_id, user, "failed")


async def test_unknown_v7_id_inside_retention_is_pending(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    request_id = new_request_id(int(time.time() * 1000) - 60_000)

    status, answer = await get(http, status_url(gateway, request_id))

    assert status == 200, answer
    assert answer == {
        "success": True,
        "data": {"requestId": request_id, "userId": None, "status": "pending", "id": None, "error": None},
    }


@pytest.mark.parametrize(
    "request_id",
    [
        str(uuid.uuid4()),
        "not-a-request-id",
        new_request_id(int(time.time() * 1000))[:-1],
        new_request_id(int(dt.datetime(2020, 6, 1, tzinfo=dt.UTC).timestamp() * 1000)),
    ],
    ids=["uuid4", "malformed", "truncated-v7", "v7-from-2020"],
)
async def test_status_of_an_id_that_is_not_ours_is_404_in_the_error_shape(
    gateway: Gateway, http: aiohttp.ClientSession, request_id: str
) -> None:
    status, answer = await get(http, status_url(gateway, request_id))

    assert_error_shape(answer, status=404, answered=status)


async def test_status_of_an_uppercased_id_is_not_pending(
    api: str, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """An id not in its canonical (lowercase) form is not one of ours: 404, not a ``pending`` that never ends."""
    status, body, request_id = await post_with_headers(http, api, {"userId": unique_user("upper"), "name": "x"})
    assert status == 201, body
    assert request_id is not None

    status, answer = await get(http, status_url(gateway, request_id.upper()))

    assert (status, answer.get("data", {}).get("status")) != (200, "pending"), answer
    assert status == 404, answer


# ---- 3. X-Request-Id ------------------------------------------------------------------------------------


async def test_every_answer_to_a_post_carries_a_fresh_canonical_uuidv7_request_id(
    api: str, http: aiohttp.ClientSession
) -> None:
    user, other, phone = unique_user("rid"), unique_user("rid"), unique_phone()
    answers = [
        await post_with_headers(http, api, {"userId": user, "phone": phone}),  # 201
        await post_with_headers(http, api, {"userId": user, "nickname": "n"}),  # 200
        await post_with_headers(http, api, {"userId": "", "phone": "1"}),  # 400
        await post_with_headers(http, api, {"userId": other, "phone": phone}),  # 409
    ]

    assert [status for status, _, _ in answers] == [201, 200, 400, 409], answers
    ids = [request_id for _, _, request_id in answers]
    assert all(is_canonical_v7(request_id) for request_id in ids), ids
    assert len(set(ids)) == len(ids), ids
    issued = [request_id_time_ms(request_id or "") or 0 for request_id in ids]
    now_ms = time.time() * 1000
    assert all(now_ms - 60_000 < ms <= now_ms + 5_000 for ms in issued), issued


async def test_a_callers_x_request_id_is_logged_as_client_request_id_never_used_as_ours(
    api: str, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    theirs = f"caller-{uuid.uuid4()}"
    ours = []
    for _ in range(2):  # the same caller id twice: ours must still be unique
        status, body, request_id = await post_with_headers(
            http, api, {"userId": unique_user("client"), "name": "x"}, headers={REQUEST_ID_HEADER: theirs}
        )
        assert status == 201, body
        ours.append(request_id)

    assert all(is_canonical_v7(request_id) for request_id in ours), ours
    assert theirs not in ours and ours[0] != ours[1]
    ours_logged = set(map(str, ours))

    async def both_logged() -> list[dict[str, Any]] | None:
        lines = [line for line in access_lines(gateway) if line.get("request_id") in ours_logged]
        return lines if len(lines) >= len(ours) else None

    access = await eventually(both_logged, within=10, what="an access log line for each request")
    assert all(line.get("client_request_id") == theirs for line in access), access
    assert sorted(str(line.get("request_id")) for line in access) == sorted(map(str, ours)), access


# ---- 4. logs --------------------------------------------------------------------------------------------


def assert_log_line_shape(proc: Proc, service: str) -> None:
    for line in json_lines(proc):
        assert {"ts", "level", "event", "service"} <= set(line), line
        assert line["service"] == service, line
        assert line["level"] in {"debug", "info", "warning", "error", "critical"}, line
        assert dt.datetime.fromisoformat(line["ts"]).tzinfo is not None, line
        assert isinstance(line["event"], str) and line["event"], line


async def test_every_log_line_is_one_json_object_with_ts_level_event_service(
    stack: Stack, api: str, http: aiohttp.ClientSession
) -> None:
    status, _ = await post(http, api, {"userId": unique_user("log"), "name": "x"})
    assert status == 201

    for proc in stack.procs:
        assert_log_line_shape(proc, "gateway" if isinstance(proc, Gateway) else "worker")


async def test_one_access_log_line_per_http_request_without_the_body(
    api: str, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    marker = f"body-marker-{uuid.uuid4().hex}"
    user = unique_user("access")
    status, _, request_id = await post_with_headers(http, api, {"userId": user, "nickname": marker})
    assert status == 201
    missing = [f"{api}/{unique_user('absent')}" for _ in range(3)]
    for url in missing:
        status, _ = await get(http, url)
        assert status == 404

    await wait_for_lines(gateway, lambda line: line.get("path") == missing[-1].removeprefix(gateway.url))
    lines = access_lines(gateway)
    posts = [line for line in lines if line.get("request_id") == request_id]
    assert len(posts) == 1, posts
    assert posts[0]["method"] == "POST" and posts[0]["path"] == "/api/external/customers"
    assert posts[0]["status"] == 201
    for url in missing:
        path = url.removeprefix(gateway.url)
        [line] = [line for line in lines if line.get("path") == path]
        assert (line["method"], line["status"]) == ("GET", 404), line
    for line in [*posts, *(line for line in lines if line.get("path") in missing)]:
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0, line
    assert marker not in gateway.output(), "a request body reached the gateway's log"


async def test_gateway_and_worker_lines_of_one_request_carry_the_same_request_id(
    stack: Stack, api: str, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    status, body, request_id = await post_with_headers(http, api, {"userId": unique_user("corr"), "name": "x"})
    assert status == 201, body

    gateway_lines = await wait_for_lines(gateway, lambda line: line.get("request_id") == request_id)
    assert any(line.get("event") == "http request" for line in gateway_lines), gateway_lines
    [worker] = stack.workers()
    worker_lines = await wait_for_lines(worker, lambda line: line.get("request_id") == request_id)
    assert worker_lines, f"no worker log line names request {request_id} (it was applied: {body})"


async def test_gateway_and_worker_lines_of_a_dead_lettered_request_carry_the_same_request_id(
    poison_stack: Stack, poison: PoisonTrigger, http: aiohttp.ClientSession
) -> None:
    status, body, request_id = await post_with_headers(
        http, api_of(poison_stack), {"userId": poison.user(), "name": "毒"}
    )
    assert status == 500, body

    gateway_lines = await wait_for_lines(poison_stack.gateway(), lambda line: line.get("request_id") == request_id)
    assert any(line.get("event") == "http request" and line["status"] == 500 for line in gateway_lines)
    [worker] = poison_stack.workers()
    worker_lines = await wait_for_lines(worker, lambda line: line.get("request_id") == request_id)
    assert any("dead-lettered" in line["event"] for line in worker_lines), worker_lines


class QuotingTrigger(PoisonTrigger):
    """A poison trigger whose error text quotes the row's phone and WeChat id, as database errors do."""

    RAISE = """RAISE EXCEPTION 'test trigger refuses %: Key (phone, wechat)=(%, %) phone % wechat: %',
                        NEW.user_id, NEW.phone, NEW.wechat, NEW.phone, NEW.wechat;"""


# A phone anywhere that is not part of a longer run of digits, letters, dots or dashes (ids, numbers).
ANY_PHONE = re.compile(r"(?<![0-9A-Za-z.\-])1[3-9][0-9]{9}(?![0-9A-Za-z.\-])")


async def test_no_phone_or_wechat_id_appears_unmasked_in_any_log_line(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = make_stack(LOG_LEVEL="DEBUG", **FAST_RETRIES)
    stack.start_worker()
    stack.start_gateway()
    api = api_of(stack)
    phones: list[str] = []
    wechats: list[str] = []

    def phone() -> str:
        phones.append(unique_phone())
        return phones[-1]

    def wechat() -> str:
        wechats.append(f"wx{uuid.uuid4().hex[:12]}")
        return wechats[-1]

    # Ordinary traffic: create, update, phone taken (409), invalid (400), with a caller id that is a phone.
    user = unique_user("pii")
    taken = phone()
    assert (await post(http, api, scenario_1_body(user, taken, phone()) | {"wechat": wechat()}))[0] == 201
    assert (await post(http, api, {"userId": user, "wechat": wechat(), "backup_phone": phone()}))[0] == 200
    assert (await post(http, api, {"userId": unique_user("pii"), "phone": taken}))[0] == 409
    assert (await post(http, api, {"userId": unique_user("pii"), "phone": phone(), "status": 99}))[0] == 400
    caller_id = {REQUEST_ID_HEADER: phone()}
    assert (await post(http, api, {"userId": unique_user("pii"), "name": "y"}, headers=caller_id))[0] == 201
    status, _ = await get(http, f"{api}/{phone()}")  # a phone in a path
    assert status == 404

    # A dead letter whose database error quotes the phone and the WeChat id.
    trigger = QuotingTrigger(db)
    await trigger.create()
    try:
        quoted_phone, quoted_wechat = phone(), wechat()
        status, body = await post(
            http, api, {"userId": trigger.user(), "phone": quoted_phone, "wechat": quoted_wechat, "name": "毒"}
        )
        assert status == 500, body
    finally:
        await trigger.drop()

    # A dead letter from a unique violation on wechat (the database's detail names the value).
    marker = f"uniq{uuid.uuid4().hex[:8]}"
    index = f"customers_{marker}"
    await db.execute(f"CREATE UNIQUE INDEX {index} ON customers (wechat) WHERE wechat LIKE '{marker}%'")
    try:
        duplicate = f"{marker}_{uuid.uuid4().hex[:6]}"
        wechats.append(duplicate)
        assert (await post(http, api, {"userId": unique_user("pii"), "wechat": duplicate}))[0] == 201
        status, body = await post(http, api, {"userId": unique_user("pii"), "wechat": duplicate, "phone": phone()})
        assert status == 500, body
    finally:
        await db.execute(f"DROP INDEX IF EXISTS {index}")

    listing = await replay_tool(stack, "list", "--json")
    assert listing.code == 0, listing
    await asyncio.sleep(0.5)  # the last access-log lines
    logs = {proc.log_path.name: proc.output() for proc in stack.procs}
    logs["replay list (stdout)"], logs["replay list (stderr)"] = listing.stdout, listing.stderr
    # The quoted error was logged (masked): the scan below looks at lines that did hold the values.
    masked_quote = f"{quoted_phone[:3]}****{quoted_phone[-4:]}"
    worker_logs = "".join(text for name, text in logs.items() if name.startswith("worker"))
    assert masked_quote in worker_logs, worker_logs
    assert "Key (wechat)=(" in worker_logs, "the unique violation's detail was not logged"
    for name, text in logs.items():
        for number, line in enumerate(text.splitlines(), 1):
            leaked = [value for value in (*phones, *wechats) if value in line] + ANY_PHONE.findall(line)
            assert not leaked, f"{name}:{number} shows {leaked} unmasked: {line}"


# ---- 5. metrics -----------------------------------------------------------------------------------------

CREATES, UPDATES = 4, 3
POST_ROUTE = "/api/external/customers"


async def test_metrics_move_exactly_with_known_traffic(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    stack = make_stack()
    worker = stack.start_worker()
    gateway = stack.start_gateway()
    api = api_of(stack)
    gateway_metrics = f"{gateway.url}/metrics"

    async def synchronized() -> bool:
        return value(await scrape(http, gateway_metrics), "crm_clock_synchronized") == 1

    await eventually(synchronized, within=15, what="the gateway's clock synchronised")
    gateway_before = await scrape(http, gateway_metrics)
    worker_before = await scrape(http, worker.metrics_url)

    users = [unique_user("metrics") for _ in range(CREATES)]
    for user in users:
        assert (await post(http, api, {"userId": user, "name": "x"}))[0] == 201
    for user in users[:UPDATES]:
        assert (await post(http, api, {"userId": user, "nickname": "y"}))[0] == 200
    status, _ = await post(http, api, {"userId": ""})
    assert status == 400

    gateway_after = await scrape(http, gateway_metrics)
    worker_after = await scrape(http, worker.metrics_url)

    def gateway_delta(name: str, **labels: str) -> float:
        return delta(gateway_before, gateway_after, name, **labels)

    def worker_delta(name: str, **labels: str) -> float:
        return delta(worker_before, worker_after, name, **labels)

    total = CREATES + UPDATES
    assert gateway_delta("crm_gateway_rpc_outcomes_total", outcome="created") == CREATES
    assert gateway_delta("crm_gateway_rpc_outcomes_total", outcome="updated") == UPDATES
    for outcome in ("timeout", "failed", "unavailable", "phone_taken"):
        assert gateway_delta("crm_gateway_rpc_outcomes_total", outcome=outcome) == 0, outcome
    requests = "crm_gateway_http_requests_total"
    assert gateway_delta(requests, route=POST_ROUTE, method="POST", status="201") == CREATES
    assert gateway_delta(requests, route=POST_ROUTE, method="POST", status="200") == UPDATES
    assert gateway_delta(requests, route=POST_ROUTE, method="POST", status="400") == 1
    duration = "crm_gateway_http_request_duration_seconds"
    assert gateway_delta(f"{duration}_count", route=POST_ROUTE, method="POST") == total + 1
    assert gateway_delta(f"{duration}_sum", route=POST_ROUTE, method="POST") > 0
    assert gateway_delta("crm_gateway_publishes_total", result="confirmed") >= 1
    assert gateway_delta("crm_gateway_publishes_total", result="failed") == 0
    assert gateway_delta("crm_gateway_pack_size_count") >= 1
    assert gateway_delta("crm_gateway_pack_size_sum") == total  # every accepted request was published once
    assert value(gateway_after, "crm_clock_synchronized") == 1
    assert value(gateway_after, "crm_gateway_ready") == 1
    assert value(gateway_after, "crm_gateway_http_requests_in_flight") == 1  # the scrape itself

    assert worker_delta("crm_worker_requests_applied_total", outcome="created") == CREATES
    assert worker_delta("crm_worker_requests_applied_total", outcome="updated") == UPDATES
    assert worker_delta("crm_worker_dead_lettered_total") == 0
    assert worker_delta("crm_worker_batch_size_count") > 0
    assert worker_delta("crm_worker_batch_size_sum") == total
    assert worker_delta("crm_worker_batch_apply_duration_seconds_count") == worker_delta("crm_worker_batch_size_count")
    assert value(worker_after, "crm_clock_synchronized") == 1


async def test_metrics_count_routes_by_template_not_by_path(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    stack = make_stack()
    stack.start_worker()
    gateway = stack.start_gateway()
    before = await scrape(http, f"{gateway.url}/metrics")
    for _ in range(3):
        assert (await get(http, f"{api_of(stack)}/{unique_user('absent')}"))[0] == 404
    assert (await get(http, f"{gateway.url}/no/such/route/{uuid.uuid4()}"))[0] == 404

    after = await scrape(http, f"{gateway.url}/metrics")

    requests = "crm_gateway_http_requests_total"
    route = "/api/external/customers/{userId}"
    assert delta(before, after, requests, route=route, method="GET", status="404") == 3
    assert delta(before, after, requests, route="unmatched", method="GET", status="404") == 1
    routes = {dict(labels).get("route") for name, labels in after if name == requests}
    assert all(r is None or r == "unmatched" or (r.startswith("/") and "absent" not in r) for r in routes), routes


# ---- 6. health, OpenAPI, docs ---------------------------------------------------------------------------


async def test_healthz_is_200(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    status, body = await get(http, f"{gateway.url}/healthz")

    assert status == 200, body


async def test_readyz_is_200_with_broker_replies_and_database_ok(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async def database_ok() -> dict[str, Any] | None:
        status, body = await get(http, f"{gateway.url}/readyz")
        return body if status == 200 and body["checks"].get("database") == "ok" else None

    body = await eventually(database_ok, within=15, what="readyz reporting the database ok")

    assert body["checks"]["broker"] == "ok" and body["checks"]["replies"] == "ok", body


async def test_openapi_document_is_served_as_openapi_3_1(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()

    assert re.fullmatch(r"3\.1\.\d+", document["openapi"]), document["openapi"]
    paths = set(document["paths"])
    assert {"/api/external/customers", "/api/external/customers/{userId}", "/api/external/requests/{requestId}",
            "/healthz", "/readyz"} <= paths, paths


async def test_docs_page_is_served_with_no_external_url_and_its_assets_are_local(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/docs") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()

    assert not re.search(r"https?://", page), re.findall(r"https?://\S+", page)
    assets = re.findall(r"""(?:src|href)=["']([^"'#]+)["']""", page)
    assert assets, page
    for asset in assets:
        async with http.get(f"{gateway.url}{asset}" if asset.startswith("/") else f"{gateway.url}/{asset}") as r:
            assert r.status == 200, asset
