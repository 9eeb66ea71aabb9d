"""The request model: every field rule of the API spec, with Chinese error messages naming the field.

Gateway and worker validate with this same model. Conventions:
* a field that is missing, ``null`` or ``""`` is "not provided" (``None``) and never overwrites stored data;
* defaults (status 1, whole_rent, ...) are *not* filled here: they apply only when a customer is created,
  so they live with the storage code (``CREATE_DEFAULTS``).
"""

from __future__ import annotations

import datetime as dt
import re
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
    model_config = ConfigDict(extra="ignore", frozen=True)

    user_id: str = Field(alias="userId")
    bot_id: str | None = Field(None, alias="botId")
    nickname: str | None = None
    name: str | None = None
    phone: str | None = None
    backup_phone: str | None = None
    wechat: str | None = None
    status: int | None = None
    community: str | None = None
    business_type: BusinessType | None = None
    room_type: RoomType | None = None
    room_tags: list[str] | None = None
    move_in_date: dt.date | None = None
    lease_period: int | None = None
    price_range: str | None = None
    source_channel: SourceChannel | None = None
    creator: str | None = None
    internal_notes: str | None = None

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


def _wire_name(field_name: str) -> str:
    return _WIRE_NAMES.get(field_name, field_name)


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
