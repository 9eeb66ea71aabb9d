"""Rate limits, end to end (issue 9): 429 after the burst with Retry-After and the RateLimit fields, recovery
after the refill, the fields on every answer of a limited route, per-key buckets and overrides, per-address
buckets with keys off, and no limit by default — against real gateway and worker processes.

RATE_LIMIT=1 (one token a second) keeps the arithmetic clear of timing: a burst sent in well under a second
gains less than one token back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from shared.apikeys import new_key
from tests.helpers import assert_error_shape, customers_url, key_line
from tests.support import RUN_ID, Gateway, Stack, unique_user

BURST = 4


@dataclass
class Limited:
    gateway: Gateway
    keys: dict[str, str]

    @property
    def api(self) -> str:
        return customers_url(self.gateway)

    def auth(self, name: str) -> dict[str, str]:
        return {"X-API-Key": self.keys[name]}


@pytest.fixture(scope="module")
def limited(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    """RATE_LIMIT=1/s, RATE_BURST=4; keys a, b, c on the default, ``slow`` with its own 1/s and burst 1,
    ``exempt`` with rate 0 (never limited)."""
    keys = {name: new_key() for name in ("a", "b", "c", "slow", "exempt")}
    entries = [key_line(name, keys[name]) for name in ("a", "b", "c")]
    entries += [key_line("slow", keys["slow"], ":1:1"), key_line("exempt", keys["exempt"], ":0:0")]
    stack = Stack(database_url, amqp_url, prefix=f"rate{RUN_ID}", log_dir=tmp_path_factory.mktemp("rate"),
                  api_keys=",".join(entries), rate_limit=1, rate_burst=BURST)
    stack.start_worker()
    gateway = stack.start_gateway()
    yield Limited(gateway, keys)
    stack.stop()


async def get_status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
    async with http.get(url, headers=headers) as response:
        await response.read()
        return response


async def spend(http: aiohttp.ClientSession, limited: Limited, name: str, count: int) -> list[aiohttp.ClientResponse]:
    """``count`` requests at once from key ``name`` (GETs of an unknown customer: 404 when let through)."""
    return list(await asyncio.gather(*(
        get_status(http, f"{limited.api}/nobody", limited.auth(name)) for _ in range(count)
    )))


async def test_429_after_the_burst_with_retry_after_and_ratelimit_fields(
    limited: Limited, http: aiohttp.ClientSession
) -> None:
    answers = await spend(http, limited, "a", BURST)
    assert [r.status for r in answers] == [404] * BURST
    async with http.get(f"{limited.api}/nobody", headers=limited.auth("a")) as response:
        assert_error_shape(await response.json(), status=429, answered=response.status)
        assert response.headers["Retry-After"] == "1"  # one token a second
        assert response.headers["RateLimit-Policy"] == f'"default";q={BURST};w={BURST}'
        assert response.headers["RateLimit"] == '"default";r=0;t=1'  # t = Retry-After (draft section 6)
        assert "WWW-Authenticate" not in response.headers


async def test_recovery_after_the_refill(limited: Limited, http: aiohttp.ClientSession) -> None:
    await spend(http, limited, "b", BURST + 2)
    refused = await get_status(http, f"{limited.api}/nobody", limited.auth("b"))
    assert refused.status == 429
    await asyncio.sleep(int(refused.headers["Retry-After"]) + 0.05)
    response = await get_status(http, f"{limited.api}/nobody", limited.auth("b"))
    assert response.status == 404
    assert response.headers["RateLimit"] == '"default";r=0;t=1'  # the one token that came back is spent


async def test_every_answer_of_a_limited_route_carries_the_ratelimit_fields(
    limited: Limited, http: aiohttp.ClientSession
) -> None:
    headers = limited.auth("c")
    async with http.post(limited.api, json={"userId": unique_user("rate"), "name": "张三"}, headers=headers) as r:
        created = (r.status, r.headers.copy())
    async with http.post(limited.api, json={"name": "no user"}, headers=headers) as r:
        invalid = (r.status, r.headers.copy())
    async with http.get(f"{limited.api}/nobody", headers=headers) as r:
        missing = (r.status, r.headers.copy())
    assert [created[0], invalid[0], missing[0]] == [201, 400, 404]
    remaining = [int(h["RateLimit"].split(";r=")[1].split(";")[0]) for _, h in (created, invalid, missing)]
    assert remaining == [BURST - 1, BURST - 2, BURST - 3]  # each answer counts down
    for _, answer_headers in (created, invalid, missing):
        assert answer_headers["RateLimit-Policy"] == f'"default";q={BURST};w={BURST}'
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        async with http.get(f"{limited.gateway.url}{path}") as r:
            assert r.status == 200 and "RateLimit" not in r.headers, path


async def test_each_key_name_has_its_own_bucket_and_its_own_override(
    limited: Limited, http: aiohttp.ClientSession
) -> None:
    assert [r.status for r in await spend(http, limited, "slow", 2)] == [404, 429]
    slow = (await spend(http, limited, "slow", 1))[0]
    assert slow.headers["RateLimit-Policy"] == '"default";q=1;w=1'
    exempt = await spend(http, limited, "exempt", 3 * BURST)
    assert {r.status for r in exempt} == {404} and "RateLimit" not in exempt[0].headers


async def test_rate_limited_requests_are_counted_by_key_name(limited: Limited, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{limited.gateway.url}/metrics") as response:
        text = await response.text()
    assert 'crm_gateway_rate_limited_total{key="a"} 1.0' in text
    assert 'crm_gateway_rate_limited_total{key="slow"}' in text
    assert 'status="429"' in text


async def test_keys_off_limits_each_client_address(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    stack = make_stack(rate_limit=1, rate_burst=2)
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers/nobody"
    first = [await get_status(http, url, {}) for _ in range(3)]
    assert [r.status for r in first] == [404, 404, 429]
    # Another loopback address is another client with a bucket of its own.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        assert (await get_status(other, url, {})).status == 404
    async with http.get(f"{gateway.url}/metrics") as response:
        assert 'crm_gateway_rate_limited_total{key="anonymous"} 1.0' in await response.text()


async def test_no_rate_limit_by_default(make_stack: Callable[..., Stack], http: aiohttp.ClientSession) -> None:
    stack = make_stack()
    gateway = stack.start_gateway()
    answers = await asyncio.gather(*(
        get_status(http, f"{gateway.url}/api/external/customers/nobody", {}) for _ in range(50)
    ))
    assert {r.status for r in answers} == {404}
    assert "RateLimit" not in answers[0].headers


async def test_ratelimit_policy_states_the_configured_rate_exactly(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    """Issue 13: RATE_LIMIT=2 RATE_BURST=3 was described as q=3;w=2 (1.5/s). Now q/w is 2/s, and q is no
    smaller than the burst the bucket really allows at once."""
    stack = make_stack(rate_limit=2, rate_burst=3)
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers/nobody"
    answers = await asyncio.gather(*(get_status(http, url, {}) for _ in range(4)))
    assert sorted(r.status for r in answers) == [404, 404, 404, 429]  # the burst: 3 at once
    policy = answers[0].headers["RateLimit-Policy"]
    assert policy == '"default";q=4;w=2'
    quota, window = (int(part.split("=")[1]) for part in policy.split(";")[1:])
    assert quota / window == 2 and quota >= 3
