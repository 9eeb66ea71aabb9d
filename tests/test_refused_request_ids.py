"""Issue 13, defect 1: an id handed out with a refusal is never answered ``pending`` — end to end.

Every answer to a POST carries ``X-Request-Id``, refusals too. A refused request's id is in its unaccepted form
(``gateway.request_ids``: ``xxxxxxxx-xxxx-7bad-...``) and ``GET /api/external/requests/{id}`` answers 404 for
it, at once and without a database row per refusal; an id handed out with an accepted request (201/202) answers
its real status. Each refusal is really produced: no key (401), a key over its own rate (429), an invalid
body (400), the wrong content type (415), a body over BODY_LIMIT (413), a shard queue bounded to two messages
with no worker (503: the request was published under its accepted id and refused by the broker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.request_ids import request_id_time_ms, was_refused
from shared.apikeys import new_key
from tests.helpers import assert_error_shape, customers_url, eventually, fetch_customer, key_line
from tests.support import Gateway, Stack, unique_user

REQUEST_ID_HEADER = "X-Request-Id"


@dataclass
class Refusing:
    """A gateway with keys on (``ok``: no limit; ``slow``: 1/s, burst 1) before one bounded shard queue."""

    stack: Stack
    gateway: Gateway
    keys: dict[str, str]

    @property
    def api(self) -> str:
        return customers_url(self.gateway)

    def auth(self, name: str = "ok") -> dict[str, str]:
        return {"X-API-Key": self.keys[name]}


@pytest.fixture
def refusing(make_stack: Callable[..., Stack]) -> Refusing:
    keys = {"ok": new_key(), "slow": new_key()}
    stack = make_stack(
        api_keys=",".join([key_line("ok", keys["ok"]), key_line("slow", keys["slow"], ":1:1")]),
        shard_count=1, queue_max_length=2, rpc_timeout=0.3,
    )
    return Refusing(stack, stack.start_gateway(), keys)


async def answer(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], **kwargs: Any
) -> tuple[int, dict[str, Any], str]:
    """POST; (status, body, X-Request-Id), asserting that the header is there."""
    async with http.post(url, headers=headers, **kwargs) as response:
        request_id = response.headers.get(REQUEST_ID_HEADER)
        body = await response.json(content_type=None)
        assert request_id is not None, (response.status, body, response.headers)
        return response.status, body, request_id


async def status_of(refusing: Refusing, http: aiohttp.ClientSession, request_id: str) -> tuple[int, dict[str, Any]]:
    url = f"{refusing.gateway.url}/api/external/requests/{request_id}"
    async with http.get(url, headers=refusing.auth()) as response:
        return response.status, await response.json(content_type=None)


async def test_an_id_handed_out_with_a_refusal_answers_404_never_pending(
    refusing: Refusing, http: aiohttp.ClientSession
) -> None:
    api, user = refusing.api, unique_user("refused")
    answers = {
        401: await answer(http, api, {}, json={"userId": user}),
        400: await answer(http, api, refusing.auth(), json={"name": "no userId"}),
        415: await answer(http, api, {**refusing.auth(), "Content-Type": "text/plain"}, data=b'{"userId":"x"}'),
        413: await answer(http, api, {**refusing.auth(), "Content-Type": "application/json"},
                          data=b'{"userId":"' + b"x" * (64 * 1024) + b'"}'),
    }
    first = await answer(http, api, refusing.auth("slow"), json={"name": "spends the one token"})
    answers[429] = await answer(http, api, refusing.auth("slow"), json={"userId": user})
    assert first[0] == 400, first

    assert {status: got for status, (got, _, _) in answers.items()} == {status: status for status in answers}
    for status, (_, body, request_id) in answers.items():
        assert_error_shape(body, status=status)
        assert request_id_time_ms(request_id) is not None and was_refused(request_id), (status, request_id)
        polled, polled_body = await status_of(refusing, http, request_id)
        # before: 200 {"status": "pending"} for two days
        assert_error_shape(polled_body, status=404, answered=polled)
        assert "未被受理" in polled_body["error"], polled_body
    assert len({request_id for _, _, request_id in answers.values()}) == len(answers)


async def test_a_503_id_answers_404_and_an_accepted_id_answers_its_real_status(
    refusing: Refusing, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    accepted: dict[str, str] = {}  # userId -> id of its 202
    refused: dict[str, str] = {}  # userId -> id of its 503
    for _ in range(20):  # one at a time, no worker: the two-message queue fills up
        user = unique_user("bounded")
        status, body, request_id = await answer(http, refusing.api, refusing.auth(), json={"userId": user})
        assert status in (202, 503), (status, body)
        (accepted if status == 202 else refused)[user] = request_id
        if refused:
            break
    assert accepted and refused, (accepted, refused)

    for request_id in accepted.values():
        assert not was_refused(request_id), request_id
        polled, body = await status_of(refusing, http, request_id)
        assert (polled, body["data"]["status"]) == (200, "pending"), body  # true: accepted, not applied yet
    [(refused_user, refused_id)] = refused.items()
    assert was_refused(refused_id), refused_id
    polled, body = await status_of(refusing, http, refused_id)
    assert polled == 404, body

    refusing.stack.start_worker()
    for user, request_id in accepted.items():

        async def applied(request_id: str = request_id) -> dict[str, Any] | None:
            _, answer_body = await status_of(refusing, http, request_id)
            data: dict[str, Any] = answer_body["data"]
            return data if data["status"] != "pending" else None

        data = await eventually(applied, within=30, what=f"the request of {user} applied")
        assert data["status"] == "created" and data["userId"] == user, data
    polled, body = await status_of(refusing, http, refused_id)
    assert polled == 404, body  # still: it was never accepted...
    assert await fetch_customer(db, refused_user) is None  # ...and never applied


async def test_a_201_id_answers_its_outcome_at_once(
    api: str, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    user = unique_user("rid201")
    status, body, request_id = await answer(http, api, {}, json={"userId": user, "name": "x"})
    assert status == 201, body
    assert not was_refused(request_id), request_id
    async with http.get(f"{gateway.url}/api/external/requests/{request_id}") as response:
        polled = (response.status, await response.json())
    assert polled[0] == 200 and polled[1]["data"]["status"] == "created", polled
    assert polled[1]["data"]["id"] == body["data"]["id"], polled
