"""Live property: a valid body POSTed and read back with ``GET /api/external/customers/{userId}`` is what was sent.

Against the shared running stack (gateway + worker + Postgres), hypothesis generates valid bodies from the model's
own constants (tests/unit/test_model_properties.py ``valid_customer_bodies``); each example gets a run-unique
userId prefix and run-unique phones so examples never meet each other or other tests. Per example:
1. create: POST -> 201; GET returns every field sent, normalised (room_tags as a JSON string decoding to the
   tags, move_in_date YYYY-MM-DD), the create defaults for the defaulted fields not sent (status 1, whole_rent,
   one_bedroom, referral, creator 外部系统), null for the others;
2. partial update: POST a random subset of new values, other fields omitted, null or "" -> 200; GET shows the
   new values where provided and the stored ones everywhere else (never overwritten by null or "": COALESCE).

The tests are ``async def`` under ``@given``: pytest-asyncio runs each example on the session's event loop, so
the session's aiohttp client is shared (no ``asyncio.run`` per example).
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Final

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from shared.model import CREATE_DEFAULTS, MAX_LENGTHS
from tests.helpers import post
from tests.support import unique_phone, unique_user
from tests.unit.test_model_properties import (
    DOCUMENTED_FIELDS,
    OPTIONAL_FIELDS,
    valid_customer_bodies,
    valid_values,
)

LIVE_SETTINGS: Final = settings(
    max_examples=40,
    deadline=None,  # each example is a few HTTP round trips through the broker and the database
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Wire name -> default applied on create (CREATE_DEFAULTS is keyed by column name; these coincide).
CREATE_DEFAULT_FIELDS: Final = {name: value for name, value in CREATE_DEFAULTS.items() if name in DOCUMENTED_FIELDS}
NOT_PROVIDED: Final = st.sampled_from(["omit", None, ""])
# The suffix hypothesis chooses for a userId; a run-unique prefix goes in front (see unique_user_id).
USER_ID_SUFFIXES: Final = valid_values("userId").map(lambda text: text[:64])


def unique_user_id(suffix: str) -> str:
    return f"{unique_user('rt')}_{suffix}"[: MAX_LENGTHS["userId"]]


def with_unique_phones(body: dict[str, Any]) -> dict[str, Any]:
    """Phones are identities (409 when taken): a run-unique number in place of each generated one."""
    return {field: unique_phone() if field in ("phone", "backup_phone") else value for field, value in body.items()}


def stored_form(field: str, value: Any) -> Any:
    """How GET shows a value that was sent: room_tags as a JSON string (compared decoded), others unchanged."""
    if field == "room_tags":
        return orjson.loads(value) if isinstance(value, str) else value
    return value


def read_back_form(customer: dict[str, Any]) -> dict[str, Any]:
    """The documented fields of a GET answer, room_tags decoded (it is a JSON string, checked here)."""
    fields = {field: customer[field] for field in DOCUMENTED_FIELDS}
    if fields["room_tags"] is not None:
        assert isinstance(fields["room_tags"], str), fields["room_tags"]
        fields["room_tags"] = orjson.loads(fields["room_tags"])
    return fields


async def read_customer(http: aiohttp.ClientSession, api: str, user_id: str) -> dict[str, Any]:
    url = URL(f"{api}/{urllib.parse.quote(user_id, safe='')}", encoded=True)
    async with http.get(url) as response:
        answer = await response.json(content_type=None)
        assert response.status == 200, (user_id, answer)
    customer: dict[str, Any] = answer["data"]
    assert customer["userId"] == user_id
    assert isinstance(customer["id"], int) and customer["createdAt"] and customer["updatedAt"]
    return customer


async def create(http: aiohttp.ClientSession, api: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a new customer and return its read-back form, checked against what was sent."""
    status, answer = await post(http, api, raw=orjson.dumps(body))
    assert status == 201, (body, answer)
    customer = await read_customer(http, api, body["userId"])
    assert customer["id"] == answer["data"]["id"]
    expected = {
        field: stored_form(field, body[field]) if field in body else CREATE_DEFAULT_FIELDS.get(field)
        for field in DOCUMENTED_FIELDS
    }
    assert read_back_form(customer) == expected
    return expected


@st.composite
def partial_updates(draw: st.DrawFn) -> dict[str, Any]:
    """New values for a random subset of fields; every other field omitted, null or "" (all: not provided)."""
    update: dict[str, Any] = {}
    for field in OPTIONAL_FIELDS:
        if draw(st.booleans()):
            update[field] = draw(valid_values(field))
        elif (absent := draw(NOT_PROVIDED)) != "omit":
            update[field] = absent
    return update


@LIVE_SETTINGS
@given(body=valid_customer_bodies(user_id=USER_ID_SUFFIXES))
async def test_valid_body_read_back_equals_what_was_sent_with_create_defaults(
    http: aiohttp.ClientSession, api: str, body: dict[str, Any]
) -> None:
    body = with_unique_phones({**body, "userId": unique_user_id(body["userId"])})
    await create(http, api, body)


@LIVE_SETTINGS
@given(body=valid_customer_bodies(user_id=USER_ID_SUFFIXES), update=partial_updates())
async def test_partial_update_read_back_keeps_every_field_not_provided(
    http: aiohttp.ClientSession, api: str, body: dict[str, Any], update: dict[str, Any]
) -> None:
    user_id = unique_user_id(body["userId"])
    stored = await create(http, api, with_unique_phones({**body, "userId": user_id}))
    update = with_unique_phones({**update, "userId": user_id})
    status, answer = await post(http, api, raw=orjson.dumps(update))
    assert status == 200 and answer["data"]["action"] == "updated", (update, answer)
    expected = {
        field: stored_form(field, update[field]) if update.get(field) not in (None, "") else stored[field]
        for field in DOCUMENTED_FIELDS
    }
    assert read_back_form(await read_customer(http, api, user_id)) == expected


@pytest.mark.parametrize("suffix", ["{", "}", "{tag}"])
async def test_user_id_with_braces_can_be_read_back(http: aiohttp.ClientSession, api: str, suffix: str) -> None:
    await create(http, api, {"userId": unique_user_id(suffix)})
