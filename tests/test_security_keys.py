"""API keys, end to end (issue 9): missing / wrong / right / rotated keys, the key's name in the processed
record, the access log and the metrics, the key itself nowhere; open mode, PROTECT_DOCS / PROTECT_METRICS,
and a malformed keys file at start-up — against real gateway and worker processes.

The tests of the ``keyed`` stack share one gateway and run in file order: rotation replaces the keys file,
and the last test reads every log line the stack wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from shared.apikeys import new_key
from tests.helpers import assert_error_shape, customers_url, eventually, key_line
from tests.support import ROOT, RUN_ID, Gateway, Stack, unique_user


def keys_text(keys: dict[str, str]) -> str:
    """A keys file holding ``keys`` (name -> key)."""
    return "".join(f"{key_line(name, key)}\n" for name, key in keys.items())


@dataclass
class Keyed:
    stack: Stack
    gateway: Gateway
    keys_file: Path
    keys: dict[str, str]  # name -> key, as handed to the clients
    presented: list[str] = field(default_factory=list)  # every key string any test sent, right or wrong

    @property
    def api(self) -> str:
        return customers_url(self.gateway)

    def key(self, name: str) -> str:
        self.presented.append(self.keys[name])
        return self.keys[name]


@pytest.fixture(scope="module")
def keyed(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    log_dir = tmp_path_factory.mktemp("keys")
    keys = {"crm-bot-1": new_key(), "crm-bot-2": new_key()}
    keys_file = log_dir / "api_keys"
    keys_file.write_text("# test keys\n" + keys_text(keys))
    stack = Stack(database_url, amqp_url, prefix=f"keys{RUN_ID}", log_dir=log_dir, api_keys_file=keys_file)
    stack.start_worker()
    gateway = stack.start_gateway()
    yield Keyed(stack, gateway, keys_file, keys)
    stack.stop()


async def post_customer(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], user: str | None = None
) -> aiohttp.ClientResponse:
    async with http.post(url, json={"userId": user or unique_user("key"), "name": "张三"}, headers=headers) as r:
        await r.read()
        return r


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(orjson.loads(line))
    return lines


# ---- missing, wrong, right ---------------------------------------------------------------------------


async def test_missing_key_is_401_in_the_error_shape_with_www_authenticate_bearer(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    for method, url in (("POST", keyed.api), ("GET", f"{keyed.api}/anyone"),
                        ("GET", f"{keyed.gateway.url}/api/external/requests/x"),
                        ("GET", f"{keyed.gateway.url}/api/external/no-such-route")):
        async with http.request(method, url, json={"userId": "u"}) as response:
            body = await response.json()
            assert_error_shape(body, status=401, answered=response.status)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "API密钥" in body["error"]


async def test_wrong_key_is_401_in_either_header(keyed: Keyed, http: aiohttp.ClientSession) -> None:
    wrong = new_key()
    keyed.presented.append(wrong)
    almost = keyed.key("crm-bot-1")[:-1] + "x"
    keyed.presented.append(almost)
    for headers in ({"Authorization": f"Bearer {wrong}"}, {"X-API-Key": wrong}, {"X-API-Key": almost},
                    {"Authorization": f"Basic {wrong}"}, {"Authorization": "Bearer "}):
        response = await post_customer(http, keyed.api, headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await post_customer(http, keyed.api, {"X-API-Key": wrong})
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_right_key_in_either_header_is_201(keyed: Keyed, http: aiohttp.ClientSession) -> None:
    key = keyed.key("crm-bot-1")
    for headers in ({"Authorization": f"Bearer {key}"}, {"Authorization": f"bearer {key}"}, {"X-API-Key": key}):
        response = await post_customer(http, keyed.api, headers)
        assert response.status == 201, headers
    async with http.get(f"{keyed.api}/nobody", headers={"X-API-Key": key}) as response:
        assert response.status == 404  # authenticated reads reach the handler


async def test_health_readiness_docs_and_metrics_stay_open_by_default(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/docs/assets/docs.js"):
        async with http.get(f"{keyed.gateway.url}{path}") as response:
            assert response.status == 200, path


async def test_openapi_document_offers_both_key_headers_so_docs_can_send_one(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{keyed.gateway.url}/openapi.json") as response:
        document = await response.json()
    assert set(document["components"]["securitySchemes"]) == {"bearerKey", "apiKeyHeader"}
    operation = document["paths"]["/api/external/customers"]["post"]
    assert operation["security"] == [{"bearerKey": []}, {"apiKeyHeader": []}]
    assert "401" in operation["responses"]


# ---- the key's name travels; the key does not -------------------------------------------------------


async def test_key_name_is_stored_with_the_processed_request(
    keyed: Keyed, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    response = await post_customer(http, keyed.api, {"Authorization": f"Bearer {keyed.key('crm-bot-2')}"})
    assert response.status == 201
    request_id = response.headers["X-Request-Id"]
    stored = await db.fetchval("SELECT api_key_name FROM processed_requests WHERE request_id = $1", request_id)
    assert stored == "crm-bot-2"


async def test_key_name_is_in_the_gateway_access_log_line(keyed: Keyed, http: aiohttp.ClientSession) -> None:
    response = await post_customer(http, keyed.api, {"X-API-Key": keyed.key("crm-bot-1")})
    request_id = response.headers["X-Request-Id"]

    async def access_line() -> dict[str, Any] | None:
        for line in json_lines(keyed.gateway.output()):
            if line.get("event") == "http request" and line.get("request_id") == request_id:
                return line
        return None

    line = await eventually(access_line, within=5, what="the access log line")
    assert line["api_key"] == "crm-bot-1" and line["status"] == 201


async def test_key_name_labels_the_metrics_and_failures_are_counted(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{keyed.gateway.url}/metrics") as response:
        text = await response.text()
    assert 'crm_gateway_authenticated_requests_total{key="crm-bot-1"}' in text
    assert 'crm_gateway_auth_failures_total{reason="missing"}' in text
    assert 'crm_gateway_auth_failures_total{reason="invalid"}' in text
    assert 'crm_gateway_http_requests_total{method="POST",route="/api/external/customers",status="401"}' in text
    for key in keyed.keys.values():
        assert key not in text


# ---- rotation without restart -----------------------------------------------------------------------


async def accepted(http: aiohttp.ClientSession, url: str, key: str) -> bool:
    async with http.get(f"{url}/nobody", headers={"X-API-Key": key}) as response:
        return response.status == 404  # 401 while the key is not (or no longer) configured


async def test_rotated_key_via_file_change_old_key_401_new_key_201_same_process(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    pid = keyed.gateway.pid
    old, new = keyed.key("crm-bot-1"), new_key()
    keyed.keys["crm-bot-1"] = new
    keyed.presented.append(new)
    # Atomic replacement, as an operator's tooling would do it (a new inode: mtime alone may not move).
    staged = keyed.keys_file.with_suffix(".new")
    staged.write_text(keys_text(keyed.keys))
    os.replace(staged, keyed.keys_file)

    async def rotated() -> bool:
        return not await accepted(http, keyed.api, old) and await accepted(http, keyed.api, new)

    await eventually(rotated, within=5, what="the new key in force, the old one refused")
    assert (await post_customer(http, keyed.api, {"Authorization": f"Bearer {new}"})).status == 201
    assert (await post_customer(http, keyed.api, {"Authorization": f"Bearer {old}"})).status == 401
    assert keyed.gateway.pid == pid and keyed.gateway.alive()
    await keyed.gateway.logged("API keys reloaded (file changed)", within=3)


async def test_rotated_key_via_sighup_old_key_401_new_key_201_same_process(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    pid = keyed.gateway.pid
    old, new = keyed.key("crm-bot-2"), new_key()
    keyed.presented.append(new)
    # Rewritten in place with the same size and mtime: only SIGHUP can make the gateway notice.
    before = keyed.keys_file.stat()
    keyed.keys["crm-bot-2"] = new
    keyed.keys_file.write_text(keys_text(keyed.keys))
    os.utime(keyed.keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keyed.keys_file.stat().st_size == before.st_size
    await asyncio.sleep(2.5)  # more than two polls of the file
    assert await accepted(http, keyed.api, old), "the watcher must not have seen this change"

    os.kill(pid, signal.SIGHUP)

    async def rotated() -> bool:
        return not await accepted(http, keyed.api, old) and await accepted(http, keyed.api, new)

    await eventually(rotated, within=5, what="the new key in force, the old one refused")
    assert (await post_customer(http, keyed.api, {"X-API-Key": new})).status == 201
    assert keyed.gateway.pid == pid and keyed.gateway.alive()
    await keyed.gateway.logged("API keys reloaded (SIGHUP)", within=3)


async def test_a_malformed_new_keys_file_keeps_the_old_keys_and_logs_an_error(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    key = keyed.key("crm-bot-1")
    staged = keyed.keys_file.with_suffix(".bad")
    staged.write_text(keys_text({"crm-bot-1": key}) + "oops-not-a-line\n")
    os.replace(staged, keyed.keys_file)

    async def reported() -> bool:
        return any(line.get("level") == "error" and "line 2" in line.get("event", "")
                   for line in json_lines(keyed.gateway.output()))

    await eventually(reported, within=5, what="an error naming line 2 logged")
    assert await accepted(http, keyed.api, key)
    assert await accepted(http, keyed.api, keyed.keys["crm-bot-2"])  # still the keys in force before
    assert keyed.gateway.alive()


def test_the_key_itself_appears_in_no_log_line_of_the_stack(keyed: Keyed) -> None:
    """Last of the keyed tests: every key any of them sent, right or wrong, against every line logged."""
    assert len(keyed.presented) >= 5
    for proc in keyed.stack.procs:
        text = proc.output()
        assert text, proc.module
        for key in keyed.presented:
            assert key not in text, f"a key appears in {proc.module}'s log"
    assert "crm-bot-1" in keyed.gateway.output()  # the names do appear


# ---- open mode, protected docs and metrics, start-up -------------------------------------------------


def test_open_mode_warns_once_at_start(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    gateway = stack.start_gateway()
    warnings = [line for line in json_lines(gateway.output()) if "API KEYS ARE OFF" in line.get("event", "")]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"


async def test_open_mode_lets_requests_through_without_a_key(make_stack: Callable[..., Stack],
                                                          http: aiohttp.ClientSession) -> None:
    stack = make_stack()
    gateway = stack.start_gateway()
    async with http.get(f"{gateway.url}/api/external/customers/nobody") as response:
        assert response.status == 404 and "WWW-Authenticate" not in response.headers


async def test_protect_metrics_and_protect_docs_put_them_behind_the_keys(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    key = new_key()
    stack = make_stack(api_keys=key_line("ops", key), protect_metrics="true", protect_docs="true")
    gateway = stack.start_gateway()
    for path in ("/metrics", "/docs", "/openapi.json", "/docs/assets/docs.js"):
        async with http.get(f"{gateway.url}{path}") as response:
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"] == "Bearer"
        async with http.get(f"{gateway.url}{path}", headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200, path
    for path in ("/healthz", "/readyz"):
        async with http.get(f"{gateway.url}{path}") as response:
            assert response.status == 200, path
    assert key not in gateway.output()


async def test_api_keys_variable_configures_keys_without_a_file(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    key = new_key()
    stack = make_stack(api_keys=f"a:{hashlib.sha256(b'other').hexdigest()}," + key_line("b", key))
    gateway = stack.start_gateway()
    url = f"{gateway.url}/api/external/customers/nobody"
    async with http.get(url, headers={"X-API-Key": key}) as response:
        assert response.status == 404  # through the key check to the handler
    async with http.get(url) as response:
        assert response.status == 401


def test_a_malformed_keys_file_stops_the_gateway_with_one_line_naming_the_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "api_keys"
    keys_file.write_text(keys_text({"ok": new_key()}) + "# comment\n\nbroken-line-with-no-hash\n")
    env = {**os.environ, "API_KEYS_FILE": str(keys_file), "PORT": "1"}  # fails before listening
    result = subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: invalid API_KEYS_FILE {keys_file}: line 4: expected name:sha256hex or name:sha256hex:rate:burst"
    ]
