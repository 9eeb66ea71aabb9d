"""HTTP errors of ``POST /api/external/customers``: status codes, one JSON error shape, no stack traces,
and nothing written for a refused request; and for every route, a 405 that names the allowed methods (``Allow``)
and a ``Server`` header naming no versions (issue 13)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from gateway.openapi import build_openapi
from gateway.server import SERVER_NAME
from shared.settings import Settings
from tests.helpers import assert_error_shape, post
from tests.support import Gateway, unique_phone, unique_user

VALIDATION = "请求数据验证失败"
BODY_LIMIT = 64 * 1024


async def nothing_written(db: asyncpg.Pool, user_id: str) -> None:
    assert await db.fetchval("SELECT count(*) FROM customers WHERE user_id = $1", user_id) == 0
    # Nothing was published either: a published request leaves its outcome in processed_requests.
    assert await db.fetchval("SELECT count(*) FROM processed_requests WHERE user_id = $1", user_id) == 0


async def raw_request(
    http: aiohttp.ClientSession, method: str, url: str, data: Any = None, headers: dict[str, str] | None = None,
    skip_auto_headers: tuple[str, ...] = (),
) -> tuple[int, str, dict[str, Any]]:
    """Send anything; return status, Content-Type and the body decoded as JSON (it must be JSON)."""
    async with http.request(
        method, url, data=data, headers=headers, skip_auto_headers=skip_auto_headers
    ) as response:
        text = await response.text()
        assert "Traceback" not in text, text
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            pytest.fail(f"{method} {url} -> {response.status}: body is not JSON: {text[:200]!r}")
        assert isinstance(body, dict), text
        return response.status, response.content_type, body


# ---- 400: body that is not a JSON object ------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b" ", b"\r\n\t "], ids=["empty", "space", "whitespace"])
async def test_empty_body_is_400(http: aiohttp.ClientSession, api: str, raw: bytes) -> None:
    status, body = await post(http, api, raw=raw)
    assert_error_shape(body, status=400, answered=status)
    assert body["message"] == VALIDATION


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"userId=u1&name=x", b"{'userId': 'u1'}", b'{"userId": "u1",}', b'{"userId": "u1"',
     b"\xff\xfe\x00", b'{"userId": "\\ud800"}', b'{"userId": "u", "status": 1e400}', b"[" * 5000 + b"]" * 5000,
     b"NaN", b'{"userId": "u1"} trailing'],
    ids=repr,
)
async def test_body_that_is_not_json_is_400(http: aiohttp.ClientSession, api: str, raw: bytes) -> None:
    status, body = await post(http, api, raw=raw)
    assert_error_shape(body, status=400, answered=status)
    assert body["message"] == VALIDATION


@pytest.mark.parametrize("kind", ["array", "array-of-object", "string", "number", "null", "true"])
async def test_json_that_is_not_an_object_is_400(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool, kind: str
) -> None:
    user = unique_user("notobj")
    value: Any = {
        "array": [], "array-of-object": [{"userId": user, "name": "张三"}], "string": user, "number": 42,
        "null": None, "true": True,
    }[kind]
    status, body = await post(http, api, raw=orjson.dumps(value))
    assert_error_shape(body, status=400, answered=status)
    assert body["message"] == VALIDATION
    await nothing_written(db, user)


# ---- 400: field rules over HTTP ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [{}, {"userId": None}, {"userId": ""}, {"userId": "   "}, {"name": "张三", "phone": "13800138000"}],
    ids=["missing", "null", "empty", "blank", "missing-with-fields"],
)
async def test_missing_user_id_is_400_with_exact_error(
    http: aiohttp.ClientSession, api: str, body: dict[str, Any]
) -> None:
    status, answer = await post(http, api, body)
    assert_error_shape(answer, status=400, answered=status)
    assert answer["error"] == "userId为必填字段"
    assert answer["message"] == "请求数据验证失败"


INVALID_FIELDS: list[tuple[str, Any]] = [
    ("phone", "12800138000"),
    ("phone", "13800138000\n"),
    ("phone", "١٣٨٠٠١٣٨٠٠٠"),
    ("backup_phone", "1390013900"),
    ("status", 6),
    ("status", True),
    ("status", 1.5),
    ("status", "1"),
    ("business_type", "WHOLE_RENT"),
    ("room_type", "five_bedroom"),
    ("source_channel", "wechat"),
    ("room_tags", '{"a": 1}'),
    ("room_tags", "[1, 2]"),
    ("room_tags", "not json"),
    ("room_tags", {"a": "b"}),
    ("move_in_date", "2024-02-30"),
    ("move_in_date", "2024-9-1"),
    ("lease_period", 0),
    ("lease_period", 121),
    ("lease_period", "12"),
    ("price_range", "8000-5000"),
    ("price_range", "5000"),
    ("nickname", "x" * 101),
    ("internal_notes", "x" * 2001),
    ("name", "张\x00三"),
    ("wechat", 123),
]


@pytest.mark.parametrize(("field", "value"), INVALID_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in INVALID_FIELDS])
async def test_invalid_field_is_400_naming_the_field_and_nothing_written(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool, field: str, value: Any
) -> None:
    user = unique_user("invalid")
    status, body = await post(http, api, {"userId": user, "name": "张三", "phone": unique_phone(), field: value})
    assert_error_shape(body, status=400, answered=status)
    assert body["message"] == "请求数据验证失败"
    assert field in body["error"], body
    assert body["details"] == [{"field": field, "error": body["error"]}]
    await nothing_written(db, user)


async def test_every_invalid_field_is_listed_in_details(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user = unique_user("invalid")
    status, body = await post(http, api, {"userId": user, "phone": "1", "status": 0, "move_in_date": "2024-9-1"})
    assert_error_shape(body, status=400, answered=status)
    assert sorted(d["field"] for d in body["details"]) == ["move_in_date", "phone", "status"]
    await nothing_written(db, user)


async def test_invalid_existing_customer_update_changes_nothing(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user = unique_user("invalid")
    status, body = await post(http, api, {"userId": user, "name": "张三", "status": 2})
    assert status == 201, body
    status, body = await post(http, api, {"userId": user, "name": "李四", "status": 9})
    assert_error_shape(body, status=400, answered=status)
    row = await db.fetchrow("SELECT name, status FROM customers WHERE user_id = $1", user)
    assert (row["name"], row["status"]) == ("张三", 2)


# ---- 415 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
     "text/json", "application/octet-stream"],
)
async def test_other_content_type_is_415(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool, content_type: str
) -> None:
    user = unique_user("ctype")
    status, ctype, body = await raw_request(
        http, "POST", api, data=orjson.dumps({"userId": user, "name": "张三"}), headers={"Content-Type": content_type}
    )
    assert_error_shape(body, status=415, answered=status)
    assert ctype == "application/json"
    await nothing_written(db, user)


async def test_missing_content_type_is_415(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user = unique_user("ctype")
    status, _, body = await raw_request(
        http, "POST", api, data=orjson.dumps({"userId": user}), skip_auto_headers=("Content-Type",)
    )
    assert_error_shape(body, status=415, answered=status)
    await nothing_written(db, user)


async def test_json_content_type_with_charset_is_accepted(
    http: aiohttp.ClientSession, api: str, db: asyncpg.Pool
) -> None:
    user = unique_user("ctype")
    status, _, body = await raw_request(
        http, "POST", api, data=orjson.dumps({"userId": user, "name": "张三"}),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 201, body
    assert await db.fetchval("SELECT name FROM customers WHERE user_id = $1", user) == "张三"


# ---- 413 --------------------------------------------------------------------------------------------


async def test_body_over_64_kib_is_413(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user = unique_user("big")
    raw = orjson.dumps({"userId": user, "internal_notes": "x" * BODY_LIMIT})
    assert len(raw) > BODY_LIMIT
    status, body = await post(http, api, raw=raw)
    assert_error_shape(body, status=413, answered=status)
    await nothing_written(db, user)


async def test_chunked_body_over_64_kib_is_413(http: aiohttp.ClientSession, api: str, db: asyncpg.Pool) -> None:
    user = unique_user("big")
    raw = orjson.dumps({"userId": user, "internal_notes": "x" * (BODY_LIMIT + 1024)})

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(raw), 8192):
            yield raw[start:start + 8192]

    status, _, body = await raw_request(http, "POST", api, data=chunks(), headers={"Content-Type": "application/json"})
    assert_error_shape(body, status=413, answered=status)
    await nothing_written(db, user)


async def test_body_just_under_the_limit_is_not_413(http: aiohttp.ClientSession, api: str) -> None:
    # Fits the byte limit but breaks the internal_notes length rule: a 400, not a 413.
    raw = orjson.dumps({"userId": unique_user("big"), "internal_notes": "x" * (BODY_LIMIT - 100)})
    assert len(raw) < BODY_LIMIT
    status, body = await post(http, api, raw=raw)
    assert_error_shape(body, status=400, answered=status)
    assert "internal_notes" in body["error"]


# ---- 404 / 405 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/external/customer"), ("POST", "/api/external/customers/1/x"), ("GET", "/"),
     ("GET", "/api/external/unknown"), ("POST", "/api/internal/customers")],
)
async def test_unknown_path_is_404_in_the_same_shape(
    http: aiohttp.ClientSession, gateway: Gateway, method: str, path: str
) -> None:
    status, ctype, body = await raw_request(
        http, method, gateway.url + path, data=b'{"userId": "x"}', headers={"Content-Type": "application/json"}
    )
    assert_error_shape(body, status=404, answered=status)
    assert ctype == "application/json"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_other_method_is_405_in_the_same_shape(http: aiohttp.ClientSession, api: str, method: str) -> None:
    status, ctype, body = await raw_request(
        http, method, api, data=b'{"userId": "x"}', headers={"Content-Type": "application/json"}
    )
    assert_error_shape(body, status=405, answered=status)
    assert ctype == "application/json"


# ---- never a 500 for what the client sent -----------------------------------------------------------

HOSTILE_BODIES: list[bytes] = [
    b'{"userId": {"$ne": null}}',
    b'{"userId": ["a", "b"]}',
    b'{"userId": 1e308}',
    b'{"userId": "u", "status": 1000000000000000000000000000000}',
    b'{"userId": "u", "status": 18446744073709551615}',
    b'{"userId": "u", "lease_period": -1000000000000000000000000000000}',
    b'{"userId": "u", "lease_period": 18446744073709551615}',
    b'{"userId": "u", "room_tags": "' + b"[" * 3000 + b'"}',
    b'{"userId": "u", "room_tags": ' + b"[" * 500 + b"]" * 500 + b"}",
    b'{"userId": "u", "move_in_date": "9999-99-99"}',
    b'{"userId": "u", "price_range": "99999999999999999999-1"}',
    b'{"userId": "' + b"x" * 129 + b'"}',
    b'{"userId": "u\\u0000"}',
    b'{"userId": "u", "status": null, "phone": {"a": 1}}',
]


@pytest.mark.parametrize("raw", HOSTILE_BODIES, ids=lambda b: repr(b)[:40])
async def test_hostile_input_is_a_400_never_a_500(http: aiohttp.ClientSession, api: str, raw: bytes) -> None:
    status, answer = await post(http, api, raw=raw)
    assert_error_shape(answer, status=400, answered=status)
    assert answer["message"] == VALIDATION


async def test_body_with_a_broken_content_encoding_is_400_not_500(api: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    # Its own session: the server rightly drops a connection whose body it could not read.
    async with aiohttp.ClientSession() as http, http.post(api, data=b"this is not gzip", headers=headers) as response:
        body = await response.json(content_type=None)
        status = response.status
    assert_error_shape(body, status=400, answered=status)
    assert body["message"] == VALIDATION


# ---- 405 names the allowed methods; no versions in Server; /docs/ ---------------------------------------


def _routes() -> list[tuple[str, set[str]]]:
    """(a concrete path, its methods) for every path of the OpenAPI document, and a docs asset."""
    document = build_openapi(Settings())
    examples = {"{userId}": "someone", "{requestId}": "01920b6e-5f3a-7cc2-9b1e-4f6d2a8c0e31"}
    routes = []
    for path, item in document["paths"].items():
        for placeholder, value in examples.items():
            path = path.replace(placeholder, value)
        routes.append((path, {method.upper() for method in item}))
    return [*routes, ("/docs/assets/docs.js", {"GET"})]


@pytest.mark.parametrize(("path", "methods"), _routes(), ids=lambda value: value if isinstance(value, str) else "")
async def test_every_405_lists_the_allowed_methods_in_allow(
    http: aiohttp.ClientSession, gateway: Gateway, path: str, methods: set[str]
) -> None:
    wrong = "DELETE" if "DELETE" not in methods else "PATCH"
    async with http.request(wrong, gateway.url + path) as response:
        body = await response.json(content_type=None)
        allow = response.headers.get("Allow")
    assert_error_shape(body, status=405, answered=response.status)
    assert allow is not None, f"{wrong} {path}: 405 without Allow (RFC 9110 section 15.5.6)"
    expected = methods | ({"HEAD"} if "GET" in methods else set())  # aiohttp answers HEAD wherever GET
    assert {method.strip() for method in allow.split(",")} == expected, allow


async def test_every_answer_names_the_server_without_versions(
    http: aiohttp.ClientSession, gateway: Gateway, api: str
) -> None:
    answers = []
    async with http.get(f"{gateway.url}/healthz") as response:
        answers.append((response.status, response.headers.get("Server")))
    async with http.post(api, json={"name": "no userId"}) as response:
        answers.append((response.status, response.headers.get("Server")))
    async with http.get(f"{gateway.url}/nowhere") as response:
        answers.append((response.status, response.headers.get("Server")))
    async with http.delete(f"{gateway.url}/healthz") as response:
        answers.append((response.status, response.headers.get("Server")))
    # Refused by aiohttp's parser, before any middleware: a header over MAX_HEADER_SIZE.
    async with http.get(f"{gateway.url}/healthz", headers={"X-Long": "x" * 20_000}) as response:
        answers.append((response.status, response.headers.get("Server")))
    assert answers == [(200, SERVER_NAME), (400, SERVER_NAME), (404, SERVER_NAME), (405, SERVER_NAME),
                       (400, SERVER_NAME)]
    assert SERVER_NAME == "crm-gateway"  # no "Python/3.x aiohttp/3.y", no version of ours either


async def test_docs_with_a_trailing_slash_leads_to_the_docs_page(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    async with http.get(f"{gateway.url}/docs/", allow_redirects=False) as response:
        assert response.status == 301, await response.text()
        location = response.headers["Location"]
    assert location == "../docs"  # relative: a proxy's path prefix is kept
    async with http.get(f"{gateway.url}/docs/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert response.url.path == "/docs"
        assert "swagger-ui" in await response.text()
