"""The request model: every field rule of the API spec, with Chinese error messages naming the field.

Gateway and worker validate with this same model. Conventions:
* a field that is missing, ``null`` or ``""`` is "not provided" (``None``) and never overwrites stored data;
* defaults (status 1, whole_rent, ...) are *not* filled here: they apply only when a customer is created,
  so they live with the storage code (``CREATE_DEFAULTS``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from shared.errors import RequestInvalid

USER_ID_REQUIRED: Final = "userId为必填字段"

BusinessType = Literal["whole_rent", "shared_rent", "centralized"]
RoomType = Literal["one_bedroom", "two_bedroom", "three_bedroom", "four_plus", "master_room", "second_room"]
SourceChannel = Literal["xianyu", "xiaohongshu", "beike", "58tongcheng", "shipinhao", "douyin", "referral"]

BUSINESS_TYPES: Final = ("whole_rent", "shared_rent", "centralized")
ROOM_TYPES: Final = ("one_bedroom", "two_bedroom", "three_bedroom", "four_plus", "master_room", "second_room")
SOURCE_CHANNELS: Final = ("xianyu", "xiaohongshu", "beike", "58tongcheng", "shipinhao", "douyin", "referral")

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
# The spec's status values and their meaning (the validator accepts exactly these keys).
STATUS_LABELS: Final[dict[int, str]] = {
    1: "跟进中", 2: "客户不再回复", 3: "已约带看", 4: "已成交未结佣", 5: "已成交已结佣",
}

# [0-9], not \d: \d also matches non-ASCII digits such as "١".
_PHONE = re.compile(r"1[3-9][0-9]{9}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_PRICE_RANGE = re.compile(r"([0-9]{1,9})-([0-9]{1,9})")

# Defaults of the spec, applied only when a customer is created (column name -> value).
CREATE_DEFAULTS: Final[dict[str, Any]] = {
    "status": 1,
    "business_type": "whole_rent",
    "room_type": "one_bedroom",
    "source_channel": "referral",
    "creator": "外部系统",
}


# ---- JSON schema of the rules (documentation only) ---------------------------------------------------
# The validators below are ``mode="before"`` functions, which pydantic's JSON schema cannot see. Each field
# therefore carries ``json_schema_extra`` describing, from the same constants, what its validator enforces;
# gateway/openapi.py publishes the result. None of it takes part in validation.

JsonDict = dict[str, Any]

_NO_NUL = r"^[^\u0000]*$"
_NON_BLANK_NO_NUL = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
_NOT_PROVIDED: Final[JsonDict] = {"const": "", "description": "空字符串：视为未提供"}


def _anchored(pattern: re.Pattern[str]) -> str:
    # The validators use fullmatch; a JSON-schema pattern matches anywhere unless anchored.
    return f"^{pattern.pattern}$"


def _text_schema(field: str, pattern: str = _NO_NUL) -> JsonDict:
    schema: JsonDict = {"type": "string", "pattern": pattern}
    if field in MAX_LENGTHS:
        schema["maxLength"] = MAX_LENGTHS[field]
    return schema


def _documented(*branches: JsonDict, required: bool = False) -> Callable[[JsonDict], None]:
    """``json_schema_extra`` replacing pydantic's schema of a field by the wire rules (keeps the description).

    An optional field also accepts ``null`` — and ``""`` where its value branch does not already — both
    meaning "not provided".
    """

    def update(schema: JsonDict) -> None:
        description = schema.get("description")
        schema.clear()
        if description is not None:
            schema["description"] = description
        if required:
            schema.update(branches[0])
        else:
            schema["anyOf"] = [*branches, {"type": "null", "description": "null：视为未提供"}]

    return update


def _document_model(schema: JsonDict) -> None:
    """Model-level ``json_schema_extra``: unknown keys are ignored, not refused; no generated titles."""
    schema["additionalProperties"] = True
    for field_schema in schema.get("properties", {}).values():
        field_schema.pop("title", None)


def _room_tags_array() -> JsonDict:
    tag: JsonDict = {"type": "string", "minLength": 1, "maxLength": MAX_ROOM_TAG_LENGTH, "pattern": _NO_NUL}
    return {"type": "array", "items": tag, "maxItems": MAX_ROOM_TAGS}


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("crm_field", message)


def _text(value: Any, field: str) -> str | None:
    """Common rule of every text field: string, "" means not provided, bounded, no NUL."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(f"{field}必须是字符串")
    if "\x00" in value:
        raise _fail(f"{field}不能包含空字符(NUL)")
    limit = MAX_LENGTHS.get(field)
    if limit is not None and len(value) > limit:
        raise _fail(f"{field}长度不能超过{limit}个字符")
    return value


def _strict_int(value: Any, field: str) -> int:
    # bool is a subclass of int in Python; JSON true/false must not pass as 1/0.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{field}必须是整数")
    return value


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> str | None:
    text = _text(value, field)
    if text is not None and text not in allowed:
        raise _fail(f"{field}取值无效，可选值：{'/'.join(allowed)}")
    return text


class CustomerIn(BaseModel):
    """One customer record as posted by a bot (wire names are the aliases)."""

    # Only the documented wire names count: ``user_id`` / ``bot_id`` are unknown keys, ignored like any other
    # (no populate_by_name, so {"user_id": ...} is a missing userId, not an alias).
    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra=_document_model)

    user_id: str = Field(
        alias="userId",
        description="用户第三方唯一标识ID（必填，不能为空白）",
        json_schema_extra=_documented(
            {**_text_schema("userId", _NON_BLANK_NO_NUL), "minLength": 1}, required=True
        ),
    )
    bot_id: str | None = Field(
        None, alias="botId", description="机器人/工作人员账号ID", json_schema_extra=_documented(_text_schema("botId"))
    )
    nickname: str | None = Field(
        None, description="客户昵称", json_schema_extra=_documented(_text_schema("nickname"))
    )
    name: str | None = Field(None, description="客户真实姓名", json_schema_extra=_documented(_text_schema("name")))
    phone: str | None = Field(
        None,
        description="主手机号：1[3-9]开头的11位中国大陆手机号；已被其他客户使用时返回409",
        json_schema_extra=_documented({"type": "string", "pattern": _anchored(_PHONE)}, _NOT_PROVIDED),
    )
    backup_phone: str | None = Field(
        None,
        description="备用手机号：格式同phone",
        json_schema_extra=_documented({"type": "string", "pattern": _anchored(_PHONE)}, _NOT_PROVIDED),
    )
    wechat: str | None = Field(None, description="微信号", json_schema_extra=_documented(_text_schema("wechat")))
    status: int | None = Field(
        None,
        description="客户状态（整数，不接受字符串）："
        + "，".join(f"{value}={label}" for value, label in STATUS_LABELS.items())
        + f"；新建时默认{CREATE_DEFAULTS['status']}",
        json_schema_extra=_documented(
            {"type": "integer", "minimum": min(STATUS_LABELS), "maximum": max(STATUS_LABELS)}, _NOT_PROVIDED
        ),
    )
    community: str | None = Field(
        None, description="咨询小区名称", json_schema_extra=_documented(_text_schema("community"))
    )
    business_type: BusinessType | None = Field(
        None,
        description=f"业务类型；新建时默认{CREATE_DEFAULTS['business_type']}",
        json_schema_extra=_documented({"type": "string", "enum": list(BUSINESS_TYPES)}, _NOT_PROVIDED),
    )
    room_type: RoomType | None = Field(
        None,
        description=f"房型；新建时默认{CREATE_DEFAULTS['room_type']}",
        json_schema_extra=_documented({"type": "string", "enum": list(ROOM_TYPES)}, _NOT_PROVIDED),
    )
    room_tags: list[str] | None = Field(
        None,
        description=f"房型标签：JSON数组字符串（如 '[\"loft\", \"two_bath\"]'）或字符串数组；"
        f"最多{MAX_ROOM_TAGS}个标签，每个1到{MAX_ROOM_TAG_LENGTH}个字符",
        json_schema_extra=_documented(
            {
                "type": "string",
                "description": "JSON数组字符串",
                "pattern": r"^\s*\[[\s\S]*\]\s*$",
                "contentMediaType": "application/json",
                "contentSchema": _room_tags_array(),
            },
            _room_tags_array(),
            _NOT_PROVIDED,
        ),
    )
    move_in_date: dt.date | None = Field(
        None,
        description="期望入住日期，YYYY-MM-DD",
        json_schema_extra=_documented(
            {"type": "string", "format": "date", "pattern": _anchored(_DATE)}, _NOT_PROVIDED
        ),
    )
    lease_period: int | None = Field(
        None,
        description="租赁周期（月数，整数）",
        json_schema_extra=_documented({"type": "integer", "minimum": 1, "maximum": MAX_LEASE_MONTHS}, _NOT_PROVIDED),
    )
    price_range: str | None = Field(
        None,
        description="可接受价格范围“最低价-最高价”，如5000-8000；最低价不能大于最高价",
        json_schema_extra=_documented(_text_schema("price_range", _anchored(_PRICE_RANGE)), _NOT_PROVIDED),
    )
    source_channel: SourceChannel | None = Field(
        None,
        description=f"来源渠道；新建时默认{CREATE_DEFAULTS['source_channel']}",
        json_schema_extra=_documented({"type": "string", "enum": list(SOURCE_CHANNELS)}, _NOT_PROVIDED),
    )
    creator: str | None = Field(
        None,
        description=f"录入人标识；新建时默认“{CREATE_DEFAULTS['creator']}”",
        json_schema_extra=_documented(_text_schema("creator")),
    )
    internal_notes: str | None = Field(
        None, description="内部备注", json_schema_extra=_documented(_text_schema("internal_notes"))
    )

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id(cls, value: Any) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _fail(USER_ID_REQUIRED)
        text = _text(value, "userId")
        assert text is not None
        return text

    @field_validator("bot_id", "nickname", "name", "wechat", "community", "creator", "internal_notes",
                     mode="before")
    @classmethod
    def _free_text(cls, value: Any, info: Any) -> str | None:
        return _text(value, _wire_name(info.field_name))

    @field_validator("phone", "backup_phone", mode="before")
    @classmethod
    def _phone(cls, value: Any, info: Any) -> str | None:
        text = _text(value, info.field_name)
        if text is not None and not _PHONE.fullmatch(text):
            raise _fail(f"{info.field_name}格式不正确，应为1[3-9]开头的11位手机号")
        return text

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: Any) -> int | None:
        if value is None or value == "":
            return None
        number = _strict_int(value, "status")
        if not 1 <= number <= 5:
            raise _fail("status必须是1到5之间的整数")
        return number

    @field_validator("business_type", mode="before")
    @classmethod
    def _business_type(cls, value: Any) -> str | None:
        return _choice(value, "business_type", BUSINESS_TYPES)

    @field_validator("room_type", mode="before")
    @classmethod
    def _room_type(cls, value: Any) -> str | None:
        return _choice(value, "room_type", ROOM_TYPES)

    @field_validator("source_channel", mode="before")
    @classmethod
    def _source_channel(cls, value: Any) -> str | None:
        return _choice(value, "source_channel", SOURCE_CHANNELS)

    @field_validator("room_tags", mode="before")
    @classmethod
    def _room_tags(cls, value: Any) -> list[str] | None:
        if value is None or value == "":
            return None
        tags: Any = value
        if isinstance(value, str):
            if "\x00" in value:
                raise _fail("room_tags不能包含空字符(NUL)")
            try:
                tags = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise _fail("room_tags必须是JSON数组字符串，如[\"loft\"]") from None
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise _fail("room_tags必须是字符串组成的JSON数组")
        if len(tags) > MAX_ROOM_TAGS:
            raise _fail(f"room_tags最多{MAX_ROOM_TAGS}个标签")
        for tag in tags:
            if not tag or len(tag) > MAX_ROOM_TAG_LENGTH or "\x00" in tag:
                raise _fail(f"room_tags的每个标签必须是1到{MAX_ROOM_TAG_LENGTH}个字符且不含空字符")
        return list(tags)

    @field_validator("move_in_date", mode="before")
    @classmethod
    def _move_in_date(cls, value: Any) -> dt.date | None:
        if value is None or value == "":
            return None
        if isinstance(value, dt.date):
            return value
        if not isinstance(value, str) or not _DATE.fullmatch(value):
            raise _fail("move_in_date格式不正确，应为YYYY-MM-DD")
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise _fail("move_in_date不是有效的日期") from None

    @field_validator("lease_period", mode="before")
    @classmethod
    def _lease_period(cls, value: Any) -> int | None:
        if value is None or value == "":
            return None
        months = _strict_int(value, "lease_period")
        if not 1 <= months <= MAX_LEASE_MONTHS:
            raise _fail(f"lease_period必须是1到{MAX_LEASE_MONTHS}之间的整数（月数）")
        return months

    @field_validator("price_range", mode="before")
    @classmethod
    def _price_range(cls, value: Any) -> str | None:
        text = _text(value, "price_range")
        if text is None:
            return None
        match = _PRICE_RANGE.fullmatch(text)
        if match is None:
            raise _fail("price_range格式不正确，应为“最低价-最高价”，如5000-8000")
        if int(match.group(1)) > int(match.group(2)):
            raise _fail("price_range的最低价不能大于最高价")
        return text

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


_wire_name = wire_name


_PYDANTIC_MESSAGES: Final = {
    "missing": "{field}为必填字段",
    "string_type": "{field}必须是字符串",
    "int_type": "{field}必须是整数",
    "literal_error": "{field}取值无效",
}


def parse_customer(data: Any) -> CustomerIn:
    """Validate a decoded JSON body; raise ``RequestInvalid`` listing every field error."""
    if not isinstance(data, dict):
        raise RequestInvalid("请求体必须是JSON对象")
    try:
        return CustomerIn.model_validate(data)
    except ValidationError as exc:
        details = []
        for err in exc.errors(include_url=False, include_context=False, include_input=False):
            field = _wire_name(str(err["loc"][0])) if err["loc"] else "body"
            if err["type"] == "crm_field":
                text = err["msg"]
            else:
                text = _PYDANTIC_MESSAGES.get(err["type"], "{field}格式不正确").format(field=field)
            details.append({"field": field, "error": text})
        # The userId error, when present, is the headline: the spec quotes it exactly.
        details.sort(key=lambda d: d["field"] != "userId")
        raise RequestInvalid(details[0]["error"], details=details) from None
