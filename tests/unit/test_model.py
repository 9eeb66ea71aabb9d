"""Every field rule of the request model (``shared.model``), valid and invalid, without any service.

The gateway and the worker both validate with this model, so these rules are the API contract's rules.
Each invalid case also checks that the error names the field and is listed in ``details``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.errors import VALIDATION_MESSAGE, RequestInvalid
from shared.model import (
    BUSINESS_TYPES,
    MAX_LENGTHS,
    ROOM_TYPES,
    SOURCE_CHANNELS,
    USER_ID_REQUIRED,
    CustomerIn,
    parse_customer,
)
from tests.spec_examples import scenario_1_body

USER = "agent_user_12345"

# The spec's scenario-1 body: every field, all valid.
FULL_BODY: dict[str, Any] = scenario_1_body(USER, "13800138000", "13900139000")

# Wire name -> attribute name where they differ.
ATTRIBUTE = {"userId": "user_id", "botId": "bot_id"}


def valid(field: str, value: Any) -> Any:
    """Parse ``{userId, field: value}`` and return the normalised value of ``field``."""
    customer = parse_customer({"userId": USER, field: value})
    return getattr(customer, ATTRIBUTE.get(field, field))


def invalid(field: str, value: Any) -> RequestInvalid:
    """Parse ``{userId, field: value}``, expect a rejection naming ``field``, return the error."""
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"userId": USER, field: value})
    error = caught.value
    assert error.status == 400
    assert error.message == VALIDATION_MESSAGE
    assert field in error.error, error.error
    assert error.details is not None
    assert [d["field"] for d in error.details] == [field], error.details
    return error


# ---- the whole spec body ----------------------------------------------------------------------------


def test_spec_full_body_is_valid_and_normalised() -> None:
    customer = parse_customer(FULL_BODY)
    assert customer.provided_fields() == {
        "bot_id": "bot_001",
        "nickname": "小张",
        "name": "张三",
        "phone": "13800138000",
        "backup_phone": "13900139000",
        "wechat": "zhangsan123",
        "status": 1,
        "community": "万科城",
        "business_type": "whole_rent",
        "room_type": "two_bedroom",
        "room_tags": ["loft", "two_bath"],
        "move_in_date": dt.date(2024, 9, 1),
        "lease_period": 12,
        "price_range": "5000-8000",
        "source_channel": "referral",
        "creator": "外部Agent系统",
        "internal_notes": "来自Agent系统推送",
    }
    assert customer.user_id == USER


def test_wire_form_is_json_ready_in_wire_names() -> None:
    wire = parse_customer(FULL_BODY).wire()
    assert wire["userId"] == USER and wire["botId"] == "bot_001"
    assert wire["room_tags"] == ["loft", "two_bath"]
    assert wire["move_in_date"] == "2024-09-01"
    # The wire form validates again to the same customer (the worker re-validates it).
    assert CustomerIn.model_validate(wire) == parse_customer(FULL_BODY)


def test_body_that_is_not_an_object_is_rejected() -> None:
    for body in ([], [FULL_BODY], "userId", 1, None, True):
        with pytest.raises(RequestInvalid) as caught:
            parse_customer(body)
        assert caught.value.status == 400
        assert caught.value.error == "请求体必须是JSON对象"


# ---- userId -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"userId": None}, {"userId": ""}, {"userId": " "}, {"userId": "\t\n "}, {"name": "张三"}],
    ids=["missing", "null", "empty", "blank", "whitespace", "missing-with-other-fields"],
)
def test_user_id_required_gives_exact_message(body: dict[str, Any]) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer(body)
    assert caught.value.error == USER_ID_REQUIRED == "userId为必填字段"
    assert caught.value.message == "请求数据验证失败"
    assert caught.value.details is not None
    assert caught.value.details[0] == {"field": "userId", "error": "userId为必填字段"}


def test_user_id_error_is_the_headline_among_several() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"phone": "123", "status": 9, "userId": ""})
    assert caught.value.error == "userId为必填字段"
    assert caught.value.details is not None
    assert {d["field"] for d in caught.value.details} == {"userId", "phone", "status"}


@pytest.mark.parametrize("value", [123, 1.5, True, ["u"], {"id": "u"}])
def test_user_id_must_be_a_string(value: Any) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"userId": value})
    assert "userId" in caught.value.error


def test_user_id_is_kept_verbatim() -> None:
    assert parse_customer({"userId": " agent 1 "}).user_id == " agent 1 "
    assert parse_customer({"userId": "用户_甲"}).user_id == "用户_甲"


# ---- phone and backup_phone -------------------------------------------------------------------------

GOOD_PHONES = ["13800138000", "13900139000", "14000000000", "15912345678", "16600000000", "17700000000",
               "18800000000", "19999999999"]
BAD_PHONES: list[Any] = [
    "10800138000",  # second digit 0
    "11800138000",  # second digit 1
    "12800138000",  # second digit 2
    "23800138000",  # does not start with 1
    "1380013800",  # 10 digits
    "138001380001",  # 12 digits
    "1380013800a",
    "138-0013-8000",
    "+8613800138000",
    " 13800138000",
    "13800138000 ",
    "13800138000\n",  # a trailing newline must not slip through ($ in a regex would let it)
    "١٣٨٠٠١٣٨٠٠٠",  # Arabic-Indic digits: \d matches them, the rule means 0-9
    "１３８００１３８０００",  # full-width digits
    "1３800138000",
    13800138000,  # a number, not a string
    ["13800138000"],
]


@pytest.mark.parametrize("field", ["phone", "backup_phone"])
@pytest.mark.parametrize("value", GOOD_PHONES)
def test_phone_valid(field: str, value: str) -> None:
    assert valid(field, value) == value


@pytest.mark.parametrize("field", ["phone", "backup_phone"])
@pytest.mark.parametrize("value", BAD_PHONES, ids=repr)
def test_phone_invalid(field: str, value: Any) -> None:
    invalid(field, value)


# ---- status -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 2, 3, 4, 5])
def test_status_valid(value: int) -> None:
    number = valid("status", value)
    assert number == value and type(number) is int


@pytest.mark.parametrize(
    "value", [0, 6, -1, 100, True, False, 1.0, 2.5, "1", "一", [1], {"v": 1}], ids=repr
)
def test_status_invalid(value: Any) -> None:
    invalid("status", value)


# ---- enums ------------------------------------------------------------------------------------------

SPEC_ENUMS = {
    "business_type": ("whole_rent", "shared_rent", "centralized"),
    "room_type": ("one_bedroom", "two_bedroom", "three_bedroom", "four_plus", "master_room", "second_room"),
    "source_channel": ("xianyu", "xiaohongshu", "beike", "58tongcheng", "shipinhao", "douyin", "referral"),
}


def test_enum_values_are_exactly_the_spec_values() -> None:
    assert SPEC_ENUMS["business_type"] == BUSINESS_TYPES
    assert SPEC_ENUMS["room_type"] == ROOM_TYPES
    assert SPEC_ENUMS["source_channel"] == SOURCE_CHANNELS


@pytest.mark.parametrize(
    ("field", "value"), [(field, value) for field, values in SPEC_ENUMS.items() for value in values]
)
def test_enum_valid(field: str, value: str) -> None:
    assert valid(field, value) == value


ENUM_NEAR_MISSES: list[Any] = ["WHOLE_RENT", "Whole_Rent", "whole rent", " whole_rent", "whole_rent ", "整租",
                               "other", "one_bedroom\n", "58同城", 1, True, ["referral"]]


@pytest.mark.parametrize("field", list(SPEC_ENUMS))
@pytest.mark.parametrize("value", ENUM_NEAR_MISSES, ids=repr)
def test_enum_invalid(field: str, value: Any) -> None:
    invalid(field, value)


def test_enum_value_of_another_enum_is_invalid() -> None:
    invalid("business_type", "two_bedroom")
    invalid("room_type", "referral")
    invalid("source_channel", "whole_rent")


# ---- room_tags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["loft", "two_bath"]', ["loft", "two_bath"]),
        ('["朝南"]', ["朝南"]),
        ('[ "a" , "b" ]', ["a", "b"]),
        (["loft", "two_bath"], ["loft", "two_bath"]),  # a real JSON array is accepted too
        (["朝南", "近地铁"], ["朝南", "近地铁"]),
    ],
    ids=repr,
)
def test_room_tags_valid(value: Any, expected: list[str]) -> None:
    assert valid("room_tags", value) == expected


@pytest.mark.parametrize(
    "value",
    [
        '{"a": "b"}',  # JSON object string
        "[1, 2]",  # numbers
        '["a", null]',
        '["a", ["b"]]',
        '"loft"',  # a JSON string, not an array
        "loft",  # not JSON
        "[loft]",
        '["a",',  # truncated JSON
        "['a']",  # Python, not JSON
        {"a": "b"},  # real object
        [1],
        ["a", 2],
        ["a", None],
        5,
        True,
        '["a\\u0000b"]',  # NUL inside a tag
    ],
    ids=repr,
)
def test_room_tags_invalid(value: Any) -> None:
    invalid("room_tags", value)


# ---- move_in_date -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2024-09-01", dt.date(2024, 9, 1)), ("2024-02-29", dt.date(2024, 2, 29)), ("2000-01-01", dt.date(2000, 1, 1)),
     ("2099-12-31", dt.date(2099, 12, 31))],
)
def test_move_in_date_valid(value: str, expected: dt.date) -> None:
    assert valid("move_in_date", value) == expected


@pytest.mark.parametrize(
    "value",
    ["2024-02-30", "2023-02-29", "2024-13-01", "2024-00-10", "2024-04-31", "2024-9-1", "2024-09-1", "24-09-01",
     "2024/09/01", "20240901", "2024-09-01T00:00:00", "2024-09-01 ", "2024-09-01\n", "٢٠٢٤-٠٩-٠١", "tomorrow",
     20240901, ["2024-09-01"]],
    ids=repr,
)
def test_move_in_date_invalid(value: Any) -> None:
    invalid("move_in_date", value)


# ---- lease_period -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 12, 36, 120])
def test_lease_period_valid(value: int) -> None:
    assert valid("lease_period", value) == value


@pytest.mark.parametrize("value", [0, -1, 121, 1000, 12.0, 1.5, "12", True, False, [12]], ids=repr)
def test_lease_period_invalid(value: Any) -> None:
    invalid("lease_period", value)


# ---- price_range ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["5000-8000", "6000-9000", "0-0", "0-100", "5000-5000", "999999999-999999999"])
def test_price_range_valid(value: str) -> None:
    assert valid("price_range", value) == value


@pytest.mark.parametrize(
    "value",
    ["8000-5000", "101-100", "-1-100", "5000", "5000-", "-8000", "a-b", "5000 - 8000", "5000~8000", "5000-8000-9000",
     "5000.5-8000", "５０００-８０００", "5000-8000\n", 5000, [5000, 8000]],
    ids=repr,
)
def test_price_range_invalid(value: Any) -> None:
    invalid("price_range", value)


# ---- text fields: maximum length and NUL ------------------------------------------------------------

DOCUMENTED_MAX_LENGTHS = {
    "userId": 128, "botId": 128, "nickname": 100, "name": 100, "wechat": 100, "community": 200,
    "price_range": 50, "creator": 100, "internal_notes": 2000,
}
FREE_TEXT = ["botId", "nickname", "name", "wechat", "community", "creator", "internal_notes"]


def test_max_lengths_are_the_documented_ones() -> None:
    assert dict(MAX_LENGTHS) == DOCUMENTED_MAX_LENGTHS


@pytest.mark.parametrize("field", [*FREE_TEXT, "userId"])
def test_text_at_max_length_is_valid(field: str) -> None:
    value = "字" * MAX_LENGTHS[field]
    if field == "userId":
        assert parse_customer({"userId": value}).user_id == value
    else:
        assert valid(field, value) == value


@pytest.mark.parametrize("field", [*FREE_TEXT, "price_range"])
def test_text_over_max_length_is_invalid(field: str) -> None:
    value = "1" * (MAX_LENGTHS[field] + 1)
    error = invalid(field, value)
    assert str(MAX_LENGTHS[field]) in error.error


def test_user_id_over_max_length_is_invalid() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"userId": "u" * (MAX_LENGTHS["userId"] + 1)})
    assert "userId" in caught.value.error and "128" in caught.value.error


@pytest.mark.parametrize("field", FREE_TEXT)
def test_text_with_nul_is_invalid(field: str) -> None:
    invalid(field, "ab\x00cd")


def test_user_id_with_nul_is_invalid() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"userId": "u\x00"})
    assert "userId" in caught.value.error


@pytest.mark.parametrize("field", FREE_TEXT)
def test_text_must_be_a_string(field: str) -> None:
    for value in (1, 1.5, True, ["a"], {"a": "b"}):
        invalid(field, value)


# ---- unknown fields, not-provided values, several errors --------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    customer = parse_customer({"userId": USER, "name": "张三", "id": 999, "created_at": "x", "field_stamps": {},
                               "user_id": "someone_else", "Phone": "bad", "extra": {"nested": [1, 2]}})
    assert customer.user_id == USER
    assert customer.provided_fields() == {"name": "张三"}
    assert "extra" not in customer.wire() and "id" not in customer.wire()


@pytest.mark.parametrize("empty", [None, ""], ids=["null", "empty-string"])
def test_null_and_empty_string_mean_not_provided(empty: Any) -> None:
    fields = [field for field in FULL_BODY if field != "userId"]
    customer = parse_customer({"userId": USER, **dict.fromkeys(fields, empty)})
    assert customer.provided_fields() == {}
    assert customer.wire() == {"userId": USER}


def test_every_field_error_is_listed_in_details() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"userId": USER, "phone": "1", "backup_phone": "2", "status": 0, "room_type": "x",
                        "move_in_date": "2024-02-30", "lease_period": 0, "price_range": "9-1", "room_tags": "x"})
    details = caught.value.details
    assert details is not None
    assert sorted(d["field"] for d in details) == sorted(
        ["phone", "backup_phone", "status", "room_type", "move_in_date", "lease_period", "price_range", "room_tags"]
    )
    for detail in details:
        assert detail["field"] in detail["error"], detail
    assert caught.value.error == details[0]["error"]


# ---- only the documented wire names ----------------------------------------------------------------


def test_snake_case_user_id_is_not_an_alias_of_userId() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer({"user_id": "snake_1", "name": "x"})
    assert caught.value.error == USER_ID_REQUIRED


def test_snake_case_bot_id_is_an_unknown_key_and_ignored() -> None:
    customer = parse_customer({"userId": "u2", "bot_id": "x"})
    assert customer.bot_id is None
    assert customer.provided_fields() == {}


# ---- the messages, byte for byte ----------------------------------------------------------------------

# Bodies and the 400 the hand-written validators gave them, recorded before the rules became pydantic
# constraints: every message of the model, for a value breaking one rule or several (which rule is named).
MESSAGES_BEFORE: list[dict[str, Any]] = orjson.loads((Path(__file__).parent / "model_messages.json").read_bytes())


@pytest.mark.parametrize("case", MESSAGES_BEFORE, ids=lambda case: repr(case["body"])[:60])
def test_error_messages_are_the_recorded_ones(case: dict[str, Any]) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_customer(case["body"])
    assert (caught.value.error, caught.value.details) == (case["error"], case["details"])
