"""The request model: every field rule of the API spec, with Chinese error messages naming the field.

Gateway and worker validate with this same model. Conventions:
* a field that is missing, ``null`` or ``""`` is "not provided" (``None``) and never overwrites stored data;
* defaults (status 1, whole_rent, ...) are *not* filled here: they apply only when a customer is created,
  so they live with the storage code (``CREATE_DEFAULTS``).

Each rule is stated once, as pydantic's own constraint beside its field (``StringConstraints``, ``Field(ge=,
le=)``, ``Literal``, ``Json``); the one ``BeforeValidator`` turns ``""`` into "not provided". The JSON Schema
(and so the OpenAPI document, ``gateway/openapi.py``) is generated from them, and ``ERROR_MESSAGES`` turns
pydantic's error types into the spec's messages. Patterns run on pydantic's Rust regex engine, where ``$`` is
the end of the text (a trailing newline does not slip through) and ``\\s`` is Unicode White_Space.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal, TypeVar, get_args

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Json,
    StringConstraints,
    Tag,
    ValidationError,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, PydanticCustomError, core_schema

from shared.errors import FieldError, RequestInvalid

USER_ID_REQUIRED: Final = "userId为必填字段"

BusinessType = Literal["whole_rent", "shared_rent", "centralized"]
RoomType = Literal["one_bedroom", "two_bedroom", "three_bedroom", "four_plus", "master_room", "second_room"]
SourceChannel = Literal["xianyu", "xiaohongshu", "beike", "58tongcheng", "shipinhao", "douyin", "referral"]

BUSINESS_TYPES: Final[tuple[str, ...]] = get_args(BusinessType)
ROOM_TYPES: Final[tuple[str, ...]] = get_args(RoomType)
SOURCE_CHANNELS: Final[tuple[str, ...]] = get_args(SourceChannel)

# Documented maximum lengths (characters) of the free-text fields, by wire name.
MAX_LENGTHS: Final[dict[str, int]] = {
    "userId": 128,
    "botId": 128,
    "nickname": 100,
    "name": 100,
    "wechat": 100,
    "community": 200,
    "price_range": 50,
    "creator": 100,
    "internal_notes": 2000,
}
MAX_ROOM_TAGS: Final = 50
MAX_ROOM_TAG_LENGTH: Final = 50
MAX_LEASE_MONTHS: Final = 120
# The spec's status values and their meaning (the model accepts exactly these keys).
STATUS_LABELS: Final[dict[int, str]] = {
    1: "跟进中", 2: "客户不再回复", 3: "已约带看", 4: "已成交未结佣", 5: "已成交已结佣",
}
# Inclusive bounds of the integer fields, by wire name.
RANGES: Final[dict[str, tuple[int, int]]] = {
    "status": (min(STATUS_LABELS), max(STATUS_LABELS)),
    "lease_period": (1, MAX_LEASE_MONTHS),
}

# Defaults of the spec, applied only when a customer is created (column name -> value).
CREATE_DEFAULTS: Final[dict[str, Any]] = {
    "status": 1,
    "business_type": "whole_rent",
    "room_type": "one_bedroom",
    "source_channel": "referral",
    "creator": "外部系统",
}

# ---- the rules ---------------------------------------------------------------------------------------

NO_NUL: Final = r"^[^\u0000]*$"
# Not blank: a character that str.strip() would keep. Python counts U+001C..U+001F as whitespace, the Rust
# engine's \s does not, hence the range beside it.
NOT_BLANK_NO_NUL: Final = r"^[^\u0000]*[^\s\u0000\u001c-\u001f][^\u0000]*$"
# [0-9], not \d: \d also matches non-ASCII digits such as "١".
PHONE: Final = r"^1[3-9][0-9]{9}$"
DATE: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
PRICE_RANGE: Final = r"^([0-9]{1,9})-([0-9]{1,9})$"
# The JSON text form of room_tags, stated exactly: a JSON array of JSON strings (the JSON parser is what enforces
# it; escapes of UTF-16 surrogates are left out, the parser refuses lone ones). Tag count and length are stated
# in words (contentSchema).
_JSON_WS: Final = r"[ \t\n\r]*"
_JSON_STRING: Final = r'"(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u(?![dD][89abAB])[0-9a-fA-F]{4})*"'
_JSON_ARRAY_TEXT: Final = (
    rf"^{_JSON_WS}\[{_JSON_WS}(?:{_JSON_STRING}{_JSON_WS}(?:,{_JSON_WS}{_JSON_STRING}{_JSON_WS})*)?\]{_JSON_WS}$"
)

_T = TypeVar("_T")


def _absent_if_empty(value: Any) -> Any:
    return None if value == "" else value


# An optional field: missing, null and "" all mean "not provided" (None).
Provided = Annotated[_T | None, BeforeValidator(_absent_if_empty)]


def _text(field: str) -> StringConstraints:
    return StringConstraints(strict=True, max_length=MAX_LENGTHS[field], pattern=NO_NUL)


def _integer(field: str) -> Any:
    low, high = RANGES[field]
    return Field(strict=True, ge=low, le=high)


Phone = Annotated[str, StringConstraints(strict=True, pattern=PHONE)]
RoomTag = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ROOM_TAG_LENGTH, pattern=NO_NUL)]
RoomTagList = Annotated[list[RoomTag], Field(max_length=MAX_ROOM_TAGS)]


def _room_tags_form(value: Any) -> str | None:
    return "json" if isinstance(value, str) else "array" if isinstance(value, list) else None


# The spec's JSON text ('["loft"]') or the array itself; the form is chosen by the value's type.
RoomTags = Annotated[
    Annotated[Json[RoomTagList], Tag("json"), Field(description="JSON数组字符串",
                                                    json_schema_extra={"pattern": _JSON_ARRAY_TEXT})]
    | Annotated[RoomTagList, Tag("array")],
    Discriminator(_room_tags_form, custom_error_type="room_tags_form",
                  custom_error_message="room_tags must be a JSON array or its text"),
]


class _IsoDateText:
    """A date sent as ``YYYY-MM-DD`` text only (pydantic's own date parsing also takes timestamps)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.chain_schema([core_schema.str_schema(strict=True, pattern=DATE), handler(source)])

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), "format": "date"}


def _lowest_not_above_highest(text: str) -> str:
    low, high = text.split("-")
    if int(low) > int(high):
        raise PydanticCustomError("price_range_order", "the lowest price is above the highest")
    return text


PriceRange = Annotated[
    str,
    StringConstraints(strict=True, max_length=MAX_LENGTHS["price_range"], pattern=PRICE_RANGE),
    AfterValidator(_lowest_not_above_highest),
]


# ---- JSON schema (documentation, generated from the rules) -------------------------------------------

JsonDict = dict[str, Any]

_NOT_PROVIDED_EMPTY: Final[JsonDict] = {"const": "", "description": "空字符串：视为未提供"}
_NOT_PROVIDED_NULL: Final[JsonDict] = {"type": "null", "description": "null：视为未提供"}


def _accepts_empty_string(branch: JsonDict) -> bool:
    return (
        branch.get("type") == "string"
        and not branch.keys() & {"enum", "const", "format", "minLength", "contentMediaType"}
        and re.search(branch.get("pattern", ""), "") is not None
    )


def _document_model(schema: JsonDict) -> None:
    """Model-level ``json_schema_extra``: how "not provided" is written, no generated titles or defaults.

    Unknown keys are ignored, not refused. An optional field lists its value forms, then ``""`` (where its
    value rule would refuse it) and ``null``, each described as "not provided".
    """
    schema["additionalProperties"] = True
    for field_schema in schema.get("properties", {}).values():
        field_schema.pop("title", None)
        field_schema.pop("default", None)
        if "anyOf" not in field_schema:
            continue
        values: list[JsonDict] = []
        for branch in field_schema["anyOf"]:
            if branch != {"type": "null"}:
                values += branch["oneOf"] if set(branch) == {"oneOf"} else [branch]  # exclusive forms
        empty = [] if any(_accepts_empty_string(branch) for branch in values) else [_NOT_PROVIDED_EMPTY]
        field_schema["anyOf"] = [*values, *empty, _NOT_PROVIDED_NULL]


# ---- the model ---------------------------------------------------------------------------------------


class CustomerIn(BaseModel):
    """One customer record as posted by a bot (wire names are the aliases)."""

    # Only the documented wire names count: ``user_id`` / ``bot_id`` are unknown keys, ignored like any other
    # (no populate_by_name, so {"user_id": ...} is a missing userId, not an alias).
    model_config = ConfigDict(
        extra="ignore", frozen=True, json_schema_extra=_document_model, regex_engine="rust-regex"
    )

    user_id: Annotated[
        str, StringConstraints(strict=True, min_length=1, max_length=MAX_LENGTHS["userId"], pattern=NOT_BLANK_NO_NUL)
    ] = Field(alias="userId", description="用户第三方唯一标识ID（必填，不能为空白）")
    bot_id: Provided[Annotated[str, _text("botId")]] = Field(
        None, alias="botId", description="机器人/工作人员账号ID"
    )
    nickname: Provided[Annotated[str, _text("nickname")]] = Field(None, description="客户昵称")
    name: Provided[Annotated[str, _text("name")]] = Field(None, description="客户真实姓名")
    phone: Provided[Phone] = Field(
        None, description="主手机号：1[3-9]开头的11位中国大陆手机号；已被其他客户使用时返回409"
    )
    backup_phone: Provided[Phone] = Field(None, description="备用手机号：格式同phone")
    wechat: Provided[Annotated[str, _text("wechat")]] = Field(None, description="微信号")
    status: Provided[Annotated[int, _integer("status")]] = Field(
        None,
        description="客户状态（整数，不接受字符串）："
        + "，".join(f"{value}={label}" for value, label in STATUS_LABELS.items())
        + f"；新建时默认{CREATE_DEFAULTS['status']}",
    )
    community: Provided[Annotated[str, _text("community")]] = Field(None, description="咨询小区名称")
    business_type: Provided[BusinessType] = Field(
        None, description=f"业务类型；新建时默认{CREATE_DEFAULTS['business_type']}"
    )
    room_type: Provided[RoomType] = Field(None, description=f"房型；新建时默认{CREATE_DEFAULTS['room_type']}")
    room_tags: Provided[RoomTags] = Field(
        None,
        description=f"房型标签：JSON数组字符串（如 '[\"loft\", \"two_bath\"]'）或字符串数组；"
        f"最多{MAX_ROOM_TAGS}个标签，每个1到{MAX_ROOM_TAG_LENGTH}个字符",
    )
    move_in_date: Provided[Annotated[dt.date, _IsoDateText()]] = Field(None, description="期望入住日期，YYYY-MM-DD")
    lease_period: Provided[Annotated[int, _integer("lease_period")]] = Field(
        None, description="租赁周期（月数，整数）"
    )
    price_range: Provided[PriceRange] = Field(
        None, description="可接受价格范围“最低价-最高价”，如5000-8000；最低价不能大于最高价"
    )
    source_channel: Provided[SourceChannel] = Field(
        None, description=f"来源渠道；新建时默认{CREATE_DEFAULTS['source_channel']}"
    )
    creator: Provided[Annotated[str, _text("creator")]] = Field(
        None, description=f"录入人标识；新建时默认“{CREATE_DEFAULTS['creator']}”"
    )
    internal_notes: Provided[Annotated[str, _text("internal_notes")]] = Field(None, description="内部备注")

    def provided_fields(self) -> dict[str, Any]:
        """Column name -> value for every field the caller actually provided (user_id excluded)."""
        return {
            name: value
            for name, value in self.__dict__.items()
            if value is not None and name != "user_id"
        }

    def wire(self) -> dict[str, Any]:
        """The normalised request in wire names, JSON-ready (what travels in the envelope).

        Same result as ``model_dump(mode="json", by_alias=True, exclude_none=True)``, built directly: this
        runs once per request on the gateway's hot path.
        """
        wire: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if value is None:
                continue
            if isinstance(value, dt.date):
                value = value.isoformat()
            wire[_WIRE_NAMES.get(name, name)] = value
        return wire


_WIRE_NAMES: Final = {"user_id": "userId", "bot_id": "botId"}


def wire_name(field_name: str) -> str:
    """The name a field has in requests and answers (``bot_id`` -> ``botId``)."""
    return _WIRE_NAMES.get(field_name, field_name)


# ---- errors: pydantic's error types -> the spec's messages --------------------------------------------

_PHONE_FORMAT: Final = "{field}格式不正确，应为1[3-9]开头的11位手机号"
_ROOM_TAGS_NOT_STRINGS: Final = "room_tags必须是字符串组成的JSON数组"
_ROOM_TAG_INVALID: Final = f"room_tags的每个标签必须是1到{MAX_ROOM_TAG_LENGTH}个字符且不含空字符"
_DATE_FORMAT: Final = "move_in_date格式不正确，应为YYYY-MM-DD"
_RANGE: Final = "{field}必须是{low}到{high}之间的整数"
_LEASE_RANGE: Final = _RANGE + "（月数）"

# Key: pydantic's error type, or "type:field" where a field words it its own way ({field}: the wire name;
# {limit}, {low}, {high}, {choices}: from the field's rule). A room_tags key covers its tags too.
ERROR_MESSAGES: Final[dict[str, str]] = {
    "missing": "{field}为必填字段",
    "string_type": "{field}必须是字符串",
    "string_too_long": "{field}长度不能超过{limit}个字符",
    "string_pattern_mismatch": "{field}不能包含空字符(NUL)",  # the pattern of the text fields
    "string_too_short:userId": USER_ID_REQUIRED,
    "string_pattern_mismatch:userId": USER_ID_REQUIRED,  # blank (a NUL is named first, see below)
    "string_pattern_mismatch:phone": _PHONE_FORMAT,
    "string_pattern_mismatch:backup_phone": _PHONE_FORMAT,
    "int_type": "{field}必须是整数",
    "greater_than_equal": _RANGE,
    "less_than_equal": _RANGE,
    "greater_than_equal:lease_period": _LEASE_RANGE,
    "less_than_equal:lease_period": _LEASE_RANGE,
    "literal_error": "{field}取值无效，可选值：{choices}",
    "room_tags_form": _ROOM_TAGS_NOT_STRINGS,
    "list_type:room_tags": _ROOM_TAGS_NOT_STRINGS,
    "string_type:room_tags": _ROOM_TAGS_NOT_STRINGS,
    "json_invalid:room_tags": "room_tags必须是JSON数组字符串，如[\"loft\"]",
    "too_long:room_tags": f"room_tags最多{MAX_ROOM_TAGS}个标签",
    "string_too_short:room_tags": _ROOM_TAG_INVALID,
    "string_too_long:room_tags": _ROOM_TAG_INVALID,
    "string_pattern_mismatch:room_tags": _ROOM_TAG_INVALID,
    "string_type:move_in_date": _DATE_FORMAT,
    "string_pattern_mismatch:move_in_date": _DATE_FORMAT,
    "date_parsing:move_in_date": "move_in_date不是有效的日期",
    "date_from_datetime_parsing:move_in_date": "move_in_date不是有效的日期",
    "string_pattern_mismatch:price_range": "price_range格式不正确，应为“最低价-最高价”，如5000-8000",
    "price_range_order:price_range": "price_range的最低价不能大于最高价",
    "nul": "{field}不能包含空字符(NUL)",
}
_OTHER_ERROR: Final = "{field}格式不正确"

_CHOICES: Final[dict[str, str]] = {
    "business_type": "/".join(BUSINESS_TYPES),
    "room_type": "/".join(ROOM_TYPES),
    "source_channel": "/".join(SOURCE_CHANNELS),
}
# Fields sent as text whose first rule, after the type, is "no NUL" (a date's only message is its format).
_NUL_FIRST: Final = frozenset({*MAX_LENGTHS, "phone", "backup_phone", *_CHOICES, "room_tags"})


def _first_broken_rule(field: str, value: Any, errors: list[ErrorDetails]) -> str:
    """The key of the message for one field: one message per field, for the first rule its value breaks in
    the spec's order (userId given at all; a string; no NUL; then length and form), whichever pydantic
    reported first."""
    if field == "userId" and (value is None or (isinstance(value, str) and not value.strip())):
        return "missing"
    if isinstance(value, str) and "\x00" in value and field in _NUL_FIRST and errors[0]["type"] != "string_type":
        return "nul"
    if field == "room_tags" and _has_non_string_tag(value):
        return "string_type"  # before "too many": a list of non-strings is the wrong kind of value
    if field in _CHOICES and not isinstance(value, str):
        return "string_type"  # Literal says literal_error for a number too
    return errors[0]["type"]


def _has_non_string_tag(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False
    return isinstance(value, list) and not all(isinstance(tag, str) for tag in value)


def _message(field: str, kind: str) -> str:
    template = ERROR_MESSAGES.get(f"{kind}:{field}") or ERROR_MESSAGES.get(kind, _OTHER_ERROR)
    low, high = RANGES.get(field, (0, 0))
    return template.format(field=field, limit=MAX_LENGTHS.get(field), low=low, high=high,
                           choices=_CHOICES.get(field))


def _field_errors(errors: Iterable[ErrorDetails]) -> dict[str, list[ErrorDetails]]:
    by_field: dict[str, list[ErrorDetails]] = {}
    for error in errors:
        field = wire_name(str(error["loc"][0])) if error["loc"] else "body"
        by_field.setdefault(field, []).append(error)
    return by_field


def parse_customer(data: Any) -> CustomerIn:
    """Validate a decoded JSON body; raise ``RequestInvalid`` listing every field error."""
    if not isinstance(data, dict):
        raise RequestInvalid("请求体必须是JSON对象")
    try:
        return CustomerIn.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        details: list[FieldError] = [
            {"field": field, "error": _message(field, _first_broken_rule(field, data.get(field), field_errors))}
            for field, field_errors in _field_errors(errors).items()
        ]
        # The userId error, when present, is the headline: the spec quotes it exactly.
        details.sort(key=lambda d: d["field"] != "userId")
        raise RequestInvalid(details[0]["error"], details=details) from None
