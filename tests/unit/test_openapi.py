"""The OpenAPI document (``gateway.openapi``) and the pages serving it (``gateway.docs``), without any service.

* the document is valid OpenAPI 3.1 and lists every endpoint and answer of the gateway;
* its request schema says what the model enforces: each case below is judged by the schema (JSON Schema
  2020-12, formats asserted) and by ``parse_customer``, and both must give the expected verdict;
* every example in it, and the bodies the gateway really builds, match the documented schemas;
* ``/openapi.json``, ``/docs`` and the docs assets are served by an aiohttp app and need no network.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import PurePosixPath
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import responses
from gateway.api.customers import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY, parse_idempotency_key
from gateway.docs import (
    DOCS,
    DOCS_ASSETS,
    DOCS_ASSETS_ROUTE,
    SERVED_ASSETS,
    docs_asset,
    docs_page,
    load_docs,
    openapi_json,
)
from gateway.inflight import IN_FLIGHT, InFlight
from gateway.openapi import SPEC_EXAMPLES, build_openapi, external_operations
from gateway.state import SETTINGS
from shared.errors import (
    BodyTooLarge,
    ClientError,
    IdempotencyKeyReused,
    NotFound,
    PhoneTaken,
    ProcessingFailed,
    RequestInvalid,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from shared.model import (
    BUSINESS_TYPES,
    MAX_LENGTHS,
    MAX_ROOM_TAG_LENGTH,
    MAX_ROOM_TAGS,
    ROOM_TYPES,
    SOURCE_CHANNELS,
    CustomerIn,
    parse_customer,
)
from shared.settings import Settings
from tests.gateway_apps import edge_app
from tests.hypothesis_profiles import examples
from tests.spec_examples import scenario_1_body

DOC: dict[str, Any] = build_openapi(Settings())
USER = "agent_user_12345"
DOC_URI = "urn:crm-ingest:openapi"


def schema_validator(ref: str) -> Draft202012Validator:
    """A Draft 2020-12 validator for ``#/...`` inside the document, formats asserted (dates, uuids)."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": DOC_URI + ref}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def request_body_validator() -> Draft202012Validator:
    schema = DOC["paths"]["/api/external/customers"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return schema_validator(schema["$ref"])


REQUEST = request_body_validator()


@functools.cache  # built once: a property test asks for it hundreds of times
def idempotency_key_validator() -> Draft202012Validator:
    return Draft202012Validator(DOC["components"]["parameters"]["IdempotencyKey"]["schema"])


def model_accepts(body: dict[str, Any]) -> bool:
    try:
        parse_customer(body)
    except RequestInvalid:
        return False
    return True


# ---- the document itself ----------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(DOC).validate()


def test_served_bytes_are_the_document() -> None:
    assert orjson.loads(load_docs(Settings()).openapi.body) == DOC


def test_document_follows_settings() -> None:
    settings = Settings(body_limit=2048)
    post = build_openapi(settings)["paths"]["/api/external/customers"]["post"]
    assert "2048" in post["responses"]["413"]["description"]


EXPECTED_ANSWERS = {
    ("/api/external/customers", "post"): {"200", "201", "202", "400", "408", "409", "413", "415", "422", "500", "503"},
    ("/api/external/customers/{userId}", "get"): {"200", "404", "503"},
    ("/api/external/requests/{requestId}", "get"): {"200", "404", "503"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/metrics", "get"): {"200"},
    ("/openapi.json", "get"): {"200"},
    ("/docs", "get"): {"200"},
}


def test_document_lists_every_endpoint_and_status() -> None:
    listed = {
        (path, method): set(operation["responses"])
        for path, item in DOC["paths"].items()
        for method, operation in item.items()
    }
    assert listed == EXPECTED_ANSWERS


def test_every_post_answer_carries_x_request_id() -> None:
    answers = DOC["paths"]["/api/external/customers"]["post"]["responses"]
    for status, answer in answers.items():
        assert answer["headers"]["X-Request-Id"] == {"$ref": "#/components/headers/XRequestId"}, status
    assert DOC["components"]["headers"]["XRequestId"]["schema"]["format"] == "uuid"


def test_503_documents_retry_after() -> None:
    answer = DOC["paths"]["/api/external/customers"]["post"]["responses"]["503"]
    assert "Retry-After" in answer["headers"]


def test_idempotency_key_header_is_optional_and_bounded() -> None:
    header = DOC["components"]["parameters"]["IdempotencyKey"]
    assert (header["in"], header["name"], header["required"]) == ("header", "Idempotency-Key", False)
    assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 255)


def test_idempotency_key_constraints_of_the_document_are_the_gateways_constants() -> None:
    schema = DOC["components"]["parameters"]["IdempotencyKey"]["schema"]
    assert schema["maxLength"] == MAX_IDEMPOTENCY_KEY
    assert schema["pattern"] == IDEMPOTENCY_KEY_PATTERN
    assert f"1到{MAX_IDEMPOTENCY_KEY}个" in DOC["components"]["parameters"]["IdempotencyKey"]["description"]


@given(st.from_regex(IDEMPOTENCY_KEY_PATTERN, fullmatch=True).filter(lambda key: len(key) <= MAX_IDEMPOTENCY_KEY))
@hypothesis_settings(max_examples=examples(300))
def test_every_idempotency_key_the_document_allows_is_accepted(key: str) -> None:
    assert idempotency_key_validator().is_valid(key)
    assert parse_idempotency_key(key) == key  # accepted, and used as sent


@pytest.mark.parametrize(
    "key",
    ["", " ", " lead", "trail ", "x" * (MAX_IDEMPOTENCY_KEY + 1), "tab\there", "nul\x00"],
    ids=["empty", "space", "leading-space", "trailing-space", "too-long", "tab", "nul"],
)
def test_the_document_refuses_keys_at_the_gateways_bounds(key: str) -> None:
    assert not idempotency_key_validator().is_valid(key)


def test_the_longest_key_the_document_allows_is_accepted_one_more_is_400() -> None:
    longest = "k" * (MAX_IDEMPOTENCY_KEY - 2) + " ~"
    assert parse_idempotency_key(longest) == longest
    with pytest.raises(RequestInvalid):
        parse_idempotency_key(longest + "!")


def test_202_links_to_the_request_status_endpoint() -> None:
    link = DOC["paths"]["/api/external/customers"]["post"]["responses"]["202"]["links"]["requestStatus"]
    assert link["operationId"] == DOC["paths"]["/api/external/requests/{requestId}"]["get"]["operationId"]
    assert link["parameters"] == {"requestId": "$response.body#/data/requestId"}


def resolved(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or the component it refers to."""
    if "$ref" not in schema:
        return schema
    target: dict[str, Any] = DOC["components"]["schemas"][schema["$ref"].removeprefix("#/components/schemas/")]
    return target


def test_request_status_values() -> None:
    data = resolved(DOC["components"]["schemas"]["RequestStatus"]["properties"]["data"])
    status = data["properties"]["status"]
    assert status["enum"] == ["pending", "created", "updated", "superseded", "phone_taken", "failed"]


def test_external_operations_are_the_api_ones() -> None:
    ids = {op["operationId"] for op in external_operations(DOC)}
    assert ids == {"upsertCustomer", "getCustomer", "getRequestStatus"}


# ---- the request schema: generated from the model, only wire names ---------------------------------


def customer_schema() -> dict[str, Any]:
    schema: dict[str, Any] = DOC["components"]["schemas"]["CustomerIn"]
    return schema


def value_branch(field: str) -> dict[str, Any]:
    """The schema a provided value of ``field`` must match (the first branch, before ""/null)."""
    field_schema: dict[str, Any] = customer_schema()["properties"][field]
    branches: list[dict[str, Any]] = field_schema.get("anyOf", [field_schema])
    return branches[0]


def test_every_model_field_is_documented_under_its_wire_name() -> None:
    wire = {field.alias or name for name, field in CustomerIn.model_fields.items()}
    assert set(customer_schema()["properties"]) == wire
    assert "userId" in wire and "user_id" not in wire
    assert customer_schema()["required"] == ["userId"]
    assert customer_schema()["additionalProperties"] is True


def test_every_field_is_described() -> None:
    for name, field_schema in customer_schema()["properties"].items():
        assert field_schema.get("description"), name


@pytest.mark.parametrize("field", sorted(MAX_LENGTHS))
def test_max_lengths_are_documented(field: str) -> None:
    assert value_branch(field)["maxLength"] == MAX_LENGTHS[field]


@pytest.mark.parametrize(
    ("field", "values"),
    [("business_type", BUSINESS_TYPES), ("room_type", ROOM_TYPES), ("source_channel", SOURCE_CHANNELS)],
)
def test_enums_are_documented(field: str, values: tuple[str, ...]) -> None:
    assert value_branch(field)["enum"] == list(values)


def test_patterns_and_ranges_are_documented() -> None:
    assert value_branch("phone")["pattern"] == "^1[3-9][0-9]{9}$"
    assert value_branch("backup_phone")["pattern"] == "^1[3-9][0-9]{9}$"
    assert value_branch("move_in_date")["format"] == "date"
    assert (value_branch("status")["minimum"], value_branch("status")["maximum"]) == (1, 5)
    assert (value_branch("lease_period")["minimum"], value_branch("lease_period")["maximum"]) == (1, 120)
    tags = value_branch("room_tags")["contentSchema"]
    assert tags["maxItems"] == MAX_ROOM_TAGS
    assert (tags["items"]["minLength"], tags["items"]["maxLength"]) == (1, MAX_ROOM_TAG_LENGTH)


def test_spec_examples_are_the_spec_bodies() -> None:
    assert SPEC_EXAMPLES["scenario1_create"]["value"] == scenario_1_body(USER, "13800138000", "13900139000")
    examples = DOC["paths"]["/api/external/customers"]["post"]["requestBody"]["content"]["application/json"]
    assert set(examples["examples"]) == {"scenario1_create", "scenario2_update", "scenario3_minimal"}


@pytest.mark.parametrize("name", sorted(SPEC_EXAMPLES))
def test_schema_and_model_accept_the_spec_examples(name: str) -> None:
    body = SPEC_EXAMPLES[name]["value"]
    assert list(REQUEST.iter_errors(body)) == []
    assert model_accepts(body)


def body(**fields: Any) -> dict[str, Any]:
    return {"userId": USER, **fields}


def without_user_id(**fields: Any) -> dict[str, Any]:
    return dict(fields)


OPTIONAL_FIELDS = [name for name in customer_schema()["properties"] if name != "userId"]

# (case, body, expected verdict). Each is judged by the schema and by the model.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    *[(f"{field} empty string", body(**{field: ""}), True) for field in OPTIONAL_FIELDS],
    *[(f"{field} null", body(**{field: None}), True) for field in OPTIONAL_FIELDS],
    ("userId only", body(), True),
    ("unknown field ignored", body(extra_field="x", user_id="ignored"), True),
    ("userId at its limit", {"userId": "u" * 128}, True),
    ("name at its limit", body(name="名" * 100), True),
    ("internal_notes at its limit", body(internal_notes="x" * 2000), True),
    ("status 1", body(status=1), True),
    ("status 5", body(status=5), True),
    ("lease_period 1", body(lease_period=1), True),
    ("lease_period 120", body(lease_period=120), True),
    ("room_tags as an array", body(room_tags=["loft", "two_bath"]), True),
    ("room_tags as a JSON string", body(room_tags='["loft"]'), True),
    ("room_tags 50 tags of 50 chars", body(room_tags=["t" * 50] * 50), True),
    ("room_tags empty array", body(room_tags=[]), True),
    ("price_range", body(price_range="0-0"), True),
    # --- rejected
    ("bad phone prefix", body(phone="12800138000"), False),
    ("phone too short", body(phone="1380013800"), False),
    ("phone too long", body(phone="138001380000"), False),
    ("phone with space", body(phone=" 13800138000"), False),
    ("phone as number", body(phone=13800138000), False),
    ("bad backup_phone", body(backup_phone="23800138000"), False),
    ("status 0", body(status=0), False),
    ("status 6", body(status=6), False),
    ('status "1"', body(status="1"), False),
    ("status true", body(status=True), False),
    ("status 1.5", body(status=1.5), False),
    ("lease_period 0", body(lease_period=0), False),
    ("lease_period 121", body(lease_period=121), False),
    ('lease_period "12"', body(lease_period="12"), False),
    ("bad business_type", body(business_type="whole"), False),
    ("bad room_type", body(room_type="studio"), False),
    ("bad source_channel", body(source_channel="wechat"), False),
    ("name too long", body(name="名" * 101), False),
    ("nickname too long", body(nickname="x" * 101), False),
    ("internal_notes too long", body(internal_notes="x" * 2001), False),
    ("name not a string", body(name=123), False),
    ("name with NUL", body(name="a\x00b"), False),
    ("missing userId", without_user_id(name="张三"), False),
    ("userId null", {"userId": None}, False),
    ("userId empty", {"userId": ""}, False),
    ("userId blank", {"userId": "   "}, False),
    ("userId too long", {"userId": "u" * 129}, False),
    ("userId a number", {"userId": 12345}, False),
    ("move_in_date with slashes", body(move_in_date="2024/09/01"), False),
    ("move_in_date short year", body(move_in_date="24-09-01"), False),
    ("move_in_date not a date", body(move_in_date="2024-02-30"), False),
    ("price_range with tilde", body(price_range="5000~8000"), False),
    ("price_range text", body(price_range="cheap"), False),
    ("room_tags plain text", body(room_tags="loft"), False),
    ("room_tags 51 tags", body(room_tags=["t"] * 51), False),
    ("room_tags tag too long", body(room_tags=["t" * 51]), False),
    ("room_tags empty tag", body(room_tags=[""]), False),
    ("room_tags not strings", body(room_tags=[1, 2]), False),
    ("room_tags an object", body(room_tags={"a": "b"}), False),
]


@pytest.mark.parametrize(("case", "payload", "valid"), CASES, ids=[case for case, _, _ in CASES])
def test_schema_and_model_agree(case: str, payload: dict[str, Any], valid: bool) -> None:
    assert REQUEST.is_valid(payload) is valid, f"schema: {case}"
    assert model_accepts(payload) is valid, f"model: {case}"


def test_rules_only_the_model_can_check_are_described() -> None:
    # JSON Schema cannot compare two numbers in one string or parse JSON inside a string: the model does,
    # and the field descriptions say so.
    assert not model_accepts(body(price_range="8000-5000"))
    assert "最低价不能大于最高价" in customer_schema()["properties"]["price_range"]["description"]
    assert not model_accepts(body(room_tags='["loft"'))
    assert "JSON" in customer_schema()["properties"]["room_tags"]["description"]


# ---- response schemas against examples and the gateway's real bodies --------------------------------


def media_examples() -> Iterator[tuple[str, str, Any]]:
    """(where, schema $ref or inline schema, example value) for every example in the document."""
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            answers = [(f"{method} {path} {status}", a) for status, a in operation["responses"].items()]
            if "requestBody" in operation:
                answers.append((f"{method} {path} body", operation["requestBody"]))
            for where, answer in answers:
                for media in answer.get("content", {}).values():
                    for name, example in media.get("examples", {}).items():
                        yield f"{where} {name}", media["schema"], example["value"]


EXAMPLES = list(media_examples())


def test_there_are_examples_for_every_post_answer() -> None:
    statuses = {where.split()[2] for where, _, _ in EXAMPLES if where.startswith("post ")}
    assert statuses == EXPECTED_ANSWERS[("/api/external/customers", "post")] | {"body"}


@pytest.mark.parametrize(("where", "schema", "value"), EXAMPLES, ids=[where for where, _, _ in EXAMPLES])
def test_every_example_matches_its_schema(where: str, schema: dict[str, Any], value: Any) -> None:
    errors = [error.message for error in schema_validator(schema["$ref"]).iter_errors(value)]
    assert errors == [], where


def response_schema(path: str, method: str, status: str) -> Draft202012Validator:
    answer = DOC["paths"][path][method]["responses"][status]
    return schema_validator(answer["content"]["application/json"]["schema"]["$ref"])


@pytest.mark.parametrize(
    ("status", "response"),
    [
        ("201", responses.created(7, USER)),
        ("200", responses.updated(7, USER)),
        ("200", responses.updated(7, USER, ["phone"])),
        ("200", responses.superseded(7, USER, ["phone", "name"])),
        ("202", responses.accepted(USER, "01920b6e-5f3a-7cc2-9b1e-4f6d2a8c0e31")),
    ],
)
def test_gateway_success_bodies_match_the_document(status: str, response: web.Response) -> None:
    assert str(response.status) == status
    assert isinstance(response.body, bytes)
    validator = response_schema("/api/external/customers", "post", status)
    assert list(validator.iter_errors(orjson.loads(response.body))) == []


def test_the_200_schema_tells_updated_from_superseded() -> None:
    # The documented schemas really discriminate (guards against a schema that accepts anything).
    validator = response_schema("/api/external/customers", "post", "200")
    body_201 = orjson.loads(responses.created(7, USER).body)  # type: ignore[arg-type]
    assert not validator.is_valid(body_201)
    superseded = orjson.loads(responses.superseded(7, USER, ["phone"]).body)  # type: ignore[arg-type]
    assert not validator.is_valid({**superseded, "message": responses.UPDATED_MESSAGE})
    assert not validator.is_valid({**superseded, "data": {**superseded["data"], "supersededFields": None}})
    del superseded["data"]["supersededFields"]
    assert not validator.is_valid(superseded)


ERRORS: list[ClientError] = [
    RequestInvalid("name长度不能超过100个字符", details=[{"field": "name", "error": "name长度不能超过100个字符"}]),
    PhoneTaken("手机号已存在"),
    BodyTooLarge("请求体过大"),
    UnsupportedMediaType("Content-Type必须为application/json"),
    IdempotencyKeyReused("Idempotency-Key已用于内容不同的请求"),
    ProcessingFailed("客户数据处理失败"),
    ServiceUnavailable("消息代理暂时不可用"),
    NotFound("客户不存在"),
]


@pytest.mark.parametrize("error", ERRORS, ids=[type(error).__name__ for error in ERRORS])
def test_error_bodies_match_the_error_schema(error: ClientError) -> None:
    validator = schema_validator("#/components/schemas/Error")
    assert list(validator.iter_errors(error.body())) == []
    assert not validator.is_valid({**error.body(), "success": True})


# ---- /openapi.json, /docs and the assets, served ----------------------------------------------------


def docs_app(*, gateway_middlewares: bool = False) -> web.Application:
    """An app with the lines gateway/app.py wires (see gateway.docs), optionally behind its middlewares."""
    settings = Settings()
    if gateway_middlewares:
        app = edge_app(settings=settings)
    else:
        app = web.Application()
        app[SETTINGS] = settings
        app[IN_FLIGHT] = InFlight()
    app[DOCS] = load_docs(settings)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_get(DOCS_ASSETS_ROUTE, docs_asset)
    return app


Client = TestClient[web.Request, web.Application]


@pytest.fixture(params=[False, True], ids=["bare", "gateway-middlewares"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    async with TestClient(TestServer(docs_app(gateway_middlewares=request.param))) as test_client:
        yield test_client


class AssetRefs(HTMLParser):
    """Every src= and href= of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value for name, value in attrs if name in {"src", "href"} and value is not None]


# An absolute or protocol-relative URL (a JS comment's "//" is neither).
EXTERNAL_URL = re.compile(r"https?://|[\"'(=]\s*//", re.IGNORECASE)


async def test_openapi_json_is_served(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOC


async def test_docs_page_loads_only_its_own_assets(client: Client) -> None:
    response = await client.get("/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    page = await response.text()
    assert not EXTERNAL_URL.search(page)
    parser = AssetRefs()
    parser.feed(page)
    assert set(parser.refs) == {f"docs/assets/{name}" for name in SERVED_ASSETS}
    for ref in parser.refs:
        # Relative to /docs, as a browser resolves them.
        asset = await client.get("/" + ref)
        assert asset.status == 200, ref
        assert await asset.read() == (DOCS_ASSETS / ref.removeprefix("docs/assets/")).read_bytes(), ref
        assert asset.content_type in {"text/css", "text/javascript", "application/javascript"}, ref


async def test_docs_initializer_points_at_the_local_document(client: Client) -> None:
    script = await (await client.get("/docs/assets/docs.js")).text()
    assert 'url: "openapi.json"' in script
    assert "validatorUrl: null" in script  # the default would send the document to an outside service
    assert not EXTERNAL_URL.search(script)
    css = await (await client.get("/docs/assets/swagger-ui/swagger-ui.css")).text()
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", css)


@pytest.mark.parametrize("path", ["/docs/assets/nope.js", "/docs/assets/../docs.py", "/docs/assets/swagger-ui/LICENSE"])
async def test_only_the_page_assets_are_served(client: Client, path: str) -> None:
    assert (await client.get(path)).status == 404


async def test_unchanged_assets_answer_304(client: Client) -> None:
    first = await client.get("/docs/assets/swagger-ui/swagger-ui-bundle.js")
    etag = first.headers["ETag"]
    again = await client.get("/docs/assets/swagger-ui/swagger-ui-bundle.js", headers={"If-None-Match": etag})
    assert again.status == 304
    other = await client.get("/docs/assets/docs.js", headers={"If-None-Match": etag})
    assert other.status == 200


def test_swagger_ui_ships_with_its_licence() -> None:
    assert "Apache License" in (DOCS_ASSETS / "swagger-ui" / "LICENSE").read_text()
    assert (DOCS_ASSETS / "swagger-ui" / "NOTICE").is_file()


def test_every_docs_asset_is_package_data() -> None:
    # The image installs the package (not the source tree): an asset missing from package-data is a 404 there.
    pyproject = tomllib.loads((DOCS_ASSETS.parent.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["gateway"]
    assets = [path for path in DOCS_ASSETS.rglob("*") if path.is_file()]
    assert assets
    for path in assets:
        relative = PurePosixPath(path.relative_to(DOCS_ASSETS.parent).as_posix())
        assert any(relative.match(glob) for glob in globs), relative
