"""Property tests of the request model (``shared.model.parse_customer``), with hypothesis, no service.

Rules checked, each over hundreds of generated bodies:
* any JSON value (as the gateway's decoder hands it over) either validates or raises ``RequestInvalid`` (400,
  the spec's error shape: ``error`` naming a documented field, ``details`` listing every field error) — never
  another exception;
* what validates round-trips: ``CustomerIn.wire()``, through JSON, parses back to the same model;
* one invalid value in an otherwise valid body is refused naming exactly that field.

``valid_customer_bodies()`` is also the generator of the live round-trip test (tests/test_roundtrip_properties.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any, Final

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shared.errors import VALIDATION_MESSAGE, RequestInvalid
from shared.model import (
    BUSINESS_TYPES,
    MAX_LEASE_MONTHS,
    MAX_LENGTHS,
    MAX_ROOM_TAG_LENGTH,
    MAX_ROOM_TAGS,
    ROOM_TYPES,
    SOURCE_CHANNELS,
    STATUS_LABELS,
    CustomerIn,
    parse_customer,
    wire_name,
)
from tests.hypothesis_profiles import examples  # counts as `make test` runs them; derandomized, no database

DOCUMENTED_FIELDS: Final = tuple(wire_name(name) for name in CustomerIn.model_fields)
OPTIONAL_FIELDS: Final = tuple(field for field in DOCUMENTED_FIELDS if field != "userId")
TEXT_FIELDS: Final = ("botId", "nickname", "name", "wechat", "community", "creator", "internal_notes")
PHONE_FIELDS: Final = ("phone", "backup_phone")
CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "business_type": BUSINESS_TYPES,
    "room_type": ROOM_TYPES,
    "source_channel": SOURCE_CHANNELS,
}

# ---- strategies ---------------------------------------------------------------------------------------

# What orjson can decode into a str: any code point but lone surrogates. NUL is allowed here (the model refuses
# it); valid_text() leaves it out.
_ANY_CHAR = st.characters(exclude_categories=["Cs"])
_TEXT_CHAR = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
# Any finite number: JSON has no NaN or infinity (orjson refuses them).
_NUMBERS = st.integers() | st.floats(allow_nan=False, allow_infinity=False)

json_scalars = st.none() | st.booleans() | _NUMBERS | st.text(_ANY_CHAR)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(_ANY_CHAR), children, max_size=4),
    max_leaves=12,
)


def valid_text(max_size: int, min_size: int = 1) -> st.SearchStrategy[str]:
    return st.text(_TEXT_CHAR, min_size=min_size, max_size=max_size)


phones = st.from_regex(r"\A1[3-9][0-9]{9}\Z")
dates = st.dates(min_value=dt.date(1, 1, 1), max_value=dt.date(9999, 12, 31)).map(dt.date.isoformat)
price_ranges = st.tuples(st.integers(0, 999_999_999), st.integers(0, 999_999_999)).map(
    lambda pair: f"{min(pair)}-{max(pair)}"
)
tag_lists = st.lists(valid_text(MAX_ROOM_TAG_LENGTH), max_size=MAX_ROOM_TAGS)
# The spec's form (a JSON array in a string) and the plain array; the string may carry JSON whitespace.
room_tags_values = tag_lists | tag_lists.map(lambda tags: orjson.dumps(tags).decode())


NOT_PROVIDED: Final = st.sampled_from([None, ""])


@functools.cache  # strategies are immutable; building them (regexes) on every draw is the slow part
def valid_values(field: str) -> st.SearchStrategy[Any]:
    """A value the model accepts and keeps for ``field`` (never null or "", which mean "not provided")."""
    if field == "userId":
        return valid_text(MAX_LENGTHS["userId"]).filter(lambda text: text.strip() != "")
    if field in TEXT_FIELDS:
        return valid_text(MAX_LENGTHS[field])
    if field in PHONE_FIELDS:
        return phones
    if field == "status":
        return st.sampled_from(sorted(STATUS_LABELS))
    if field in CHOICES:
        return st.sampled_from(CHOICES[field])
    if field == "room_tags":
        return room_tags_values
    if field == "move_in_date":
        return dates
    if field == "lease_period":
        return st.integers(1, MAX_LEASE_MONTHS)
    if field == "price_range":
        return price_ranges
    raise AssertionError(f"no strategy for {field}")


@functools.cache
def invalid_values(field: str) -> st.SearchStrategy[Any]:
    """A value the model must refuse for ``field``."""
    not_a_string = _NUMBERS | st.booleans() | st.lists(st.integers(), min_size=1)
    with_nul = st.tuples(valid_text(20, 0), valid_text(20, 0)).map(lambda parts: f"{parts[0]}\x00{parts[1]}")
    if field == "userId":
        too_long = valid_text(MAX_LENGTHS[field] + 40, MAX_LENGTHS[field] + 1).filter(str.strip)
        return not_a_string | with_nul | too_long | st.text(" \t\n", min_size=1) | st.none() | st.just("")
    if field in TEXT_FIELDS:
        return not_a_string | with_nul | valid_text(MAX_LENGTHS[field] + 40, MAX_LENGTHS[field] + 1)
    if field in PHONE_FIELDS:
        return st.one_of(
            not_a_string,
            st.from_regex(r"\A1[0-2][0-9]{9}\Z"),  # second digit out of 3-9
            st.from_regex(r"\A1[3-9][0-9]{8}\Z"),  # one digit short
            st.from_regex(r"\A1[3-9][0-9]{10}\Z"),  # one digit too many
            st.from_regex(r"\A[02-9][0-9]{10}\Z"),  # not starting with 1
            phones.map(lambda phone: f"+86{phone}"),
        )
    if field in ("status", "lease_period"):
        upper = max(STATUS_LABELS) if field == "status" else MAX_LEASE_MONTHS
        out_of_range = st.integers(max_value=0) | st.integers(min_value=upper + 1)
        as_string = st.integers(1, upper).map(str)  # "1" is not 1: the spec says integers only
        return out_of_range | as_string | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    if field in CHOICES:
        return (not_a_string | valid_text(30)).filter(lambda value: value not in CHOICES[field])
    if field == "room_tags":
        too_many = st.lists(st.just("t"), min_size=MAX_ROOM_TAGS + 1, max_size=MAX_ROOM_TAGS + 5)
        bad_tag = st.lists(st.just("") | valid_text(80, MAX_ROOM_TAG_LENGTH + 1), min_size=1, max_size=3)
        not_json = valid_text(20).filter(lambda text: not _is_json(text))
        return too_many | bad_tag | not_json | st.lists(st.integers(), min_size=1) | st.integers() | st.just("{}")
    if field == "move_in_date":
        impossible = st.sampled_from(["2024-02-30", "2023-02-29", "2024-13-01", "2024-00-10", "0000-01-01"])
        return impossible | st.sampled_from(["2024/09/01", "20240901", "2024-9-1", " 2024-09-01"]) | not_a_string
    if field == "price_range":
        reversed_range = st.tuples(st.integers(0, 999), st.integers(1, 999)).map(lambda p: f"{p[0] + p[1]}-{p[0]}")
        return reversed_range | st.sampled_from(["5000", "5000-", "-8000", "a-b", "5000 - 8000"]) | not_a_string
    raise AssertionError(f"no strategy for {field}")


def through_json(value: Any) -> Any:
    """What the gateway's decoder (orjson) makes of ``value`` sent as JSON (stdlib-encoded: any int size)."""
    return orjson.loads(json.dumps(value))


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


# Built once, not per draw: hypothesis validates every new strategy object, which cost more than drawing.
_SOME_OPTIONAL_FIELDS = st.sets(st.sampled_from(OPTIONAL_FIELDS))
_SOME_DOCUMENTED_FIELDS = st.sets(st.sampled_from(DOCUMENTED_FIELDS))
_UNKNOWN_KEYS = st.dictionaries(st.text(_ANY_CHAR, max_size=12), json_values, max_size=3)


@functools.cache
def wrong_values(field: str) -> st.SearchStrategy[Any]:
    """A value refused for ``field``, or any JSON value at all (maybe a valid one)."""
    return invalid_values(field) | json_values


@functools.cache
def given_values(field: str) -> st.SearchStrategy[Any]:
    """A valid value for ``field``, or (but for userId) one that means "not provided"."""
    return valid_values(field) if field == "userId" else valid_values(field) | NOT_PROVIDED


@st.composite
def valid_customer_bodies(draw: st.DrawFn, *, user_id: st.SearchStrategy[str] | None = None) -> dict[str, Any]:
    """A valid body: userId and any subset of the other documented fields, each with a valid value."""
    body: dict[str, Any] = {"userId": draw(user_id if user_id is not None else valid_values("userId"))}
    # Sorted: a set's order changes with the process's hash seed, and the draws' order with it.
    for field in sorted(draw(_SOME_OPTIONAL_FIELDS)):
        body[field] = draw(valid_values(field))
    return body


@st.composite
def any_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Documented keys with valid, invalid, "not provided" or arbitrary JSON values, plus unknown keys."""
    body: dict[str, Any] = draw(_UNKNOWN_KEYS)
    fields = sorted({"userId", *draw(_SOME_DOCUMENTED_FIELDS)})
    # None to a few of them wrong (userId missing counts), so that bodies that validate are common too.
    wrong = draw(st.sets(st.sampled_from(fields), max_size=3))
    for field in fields:
        if field in wrong:
            if field == "userId" and draw(st.booleans()):
                continue
            body[field] = draw(wrong_values(field))
        else:
            body[field] = draw(given_values(field))
    return body


# ---- the properties -----------------------------------------------------------------------------------


def assert_spec_error(error: RequestInvalid) -> None:
    """The 400 of the spec: ``error`` is the first detail, every detail names a documented field."""
    assert error.status == 400
    assert error.message == VALIDATION_MESSAGE
    body = error.body()
    assert body["success"] is False and body["message"] == VALIDATION_MESSAGE
    assert isinstance(body["error"], str) and body["error"]
    details = body["details"]
    assert isinstance(details, list) and details
    for detail in details:
        assert set(detail) == {"field", "error"}, detail
        assert detail["field"] in DOCUMENTED_FIELDS, detail
        assert isinstance(detail["error"], str) and detail["error"], detail
    assert body["error"] == details[0]["error"]
    orjson.dumps(body)  # the answer can be written


def assert_round_trips(customer: CustomerIn) -> None:
    wire = customer.wire()
    assert parse_customer(orjson.loads(orjson.dumps(wire))) == customer
    assert wire == customer.model_dump(mode="json", by_alias=True, exclude_none=True)


@settings(max_examples=examples(400))
@given(any_objects())
def test_any_json_object_validates_or_gives_the_spec_400(body: dict[str, Any]) -> None:
    try:
        customer = parse_customer(through_json(body))
    except RequestInvalid as error:
        event("refused")
        assert_spec_error(error)
    else:
        event("valid")
        assert_round_trips(customer)


@settings(max_examples=examples(200))
@given(json_values.filter(lambda value: not isinstance(value, dict)))
def test_any_json_value_that_is_not_an_object_gives_a_400(value: Any) -> None:
    try:
        parse_customer(through_json(value))
    except RequestInvalid as error:
        assert error.status == 400
        assert error.body() == {"success": False, "error": error.error, "message": VALIDATION_MESSAGE}
    else:
        raise AssertionError(f"{value!r} was accepted as a customer")


@settings(max_examples=examples(400))
@given(valid_customer_bodies())
def test_valid_body_validates_and_round_trips_through_wire(body: dict[str, Any]) -> None:
    customer = parse_customer(body)
    assert_round_trips(customer)
    # Every field sent is kept (normalised: room_tags as a list, the date as a date).
    assert set(customer.wire()) == set(body)


@pytest.mark.parametrize("field", DOCUMENTED_FIELDS)
@settings(max_examples=examples(80))
@given(data=st.data())
def test_one_invalid_field_is_refused_naming_that_field(field: str, data: st.DataObject) -> None:
    body = data.draw(valid_customer_bodies())
    body[field] = data.draw(invalid_values(field), label=f"invalid {field}")
    try:
        parse_customer(through_json(body))
    except RequestInvalid as error:
        assert_spec_error(error)
        assert error.details is not None
        assert [detail["field"] for detail in error.details] == [field]
    else:
        raise AssertionError(f"{field}={body[field]!r} was accepted")
