"""Masking rules for personal data and secrets: pure functions, no I/O, unit-tested directly.

Used by the log formatter (``mask_text`` over every finished line, see ``shared.logs``), by the replay tool
(``mask_payload`` over what it prints) and by the worker (failure reasons shown by the request-status endpoint).
Phones keep their first three and last four digits (``138****8000``), WeChat ids at most two characters at each
end, names their first character; URL passwords and bearer tokens become ``***``.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

# ---- URLs ----------------------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """``amqp://guest:guest@host/v`` → ``amqp://guest:***@host/v`` (also ``?password=`` in the query).

    A list of URLs (``AMQP_URL`` naming every node, comma-separated) is masked URL by URL; a libpq URL with
    several hosts (``postgresql://u:p@h1:5432,h2:5433/db``) stays one URL.
    """
    parts = _NEXT_URL.split(url)
    if len(parts) > 1:
        return ",".join(_mask_one_url(part) for part in parts)
    return _mask_one_url(url)


# A comma that starts another URL (``,amqp://``), not one between the hosts of a libpq URL.
_NEXT_URL: Final = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def _mask_one_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{key}={'***' if key.lower() == 'password' else value}" for key, value in pairs)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


# ---- personal data and secrets -----------------------------------------------------------------------

# No (?<![0-9]) here: a leading look-behind makes the scan ~10x slower; the callback checks that digit instead.
_PHONE: Final = re.compile(r"1[3-9][0-9]{9}(?![0-9])")
# Request and correlation ids (UUIDs, 32+ hex digits) can hold 11 digits in a row; a phone-like run inside one
# is left alone, so masking never mangles the id an operator greps for.
_HEX_ID: Final = re.compile(
    r"(?<![0-9A-Za-z])(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32,})(?![0-9A-Za-z])"
)
_HEX_OR_DASH: Final = frozenset("0123456789abcdefABCDEF-")

_WECHAT_KEY: Final = r"(?<![A-Za-z0-9_])wechat(?:_?id)?"
_WECHAT_PATTERNS: Final = (
    # JSON or a Python dict repr, possibly escaped inside another JSON string: "wechat": "v", \"wechat\":\"v\"
    # (no closing quote required: a value with a quote in it is still masked up to that quote)
    re.compile(rf"(?i)(?P<q>\\?[\"']){_WECHAT_KEY}(?P=q)\s*:\s*\\?[\"'](?P<value>[^\"'\\]*)"),
    # key=value text (our own text format, URLs, DSNs): wechat=v, wechat="v w"
    re.compile(rf"(?i){_WECHAT_KEY}=(?:\"(?P<value>[^\"]*)\"|'(?P<value2>[^']*)'|(?P<value3>[^\s\"',;&)}}\]]+))"),
    # free text such as "wechat: zhangsan123": only a value shaped like a WeChat id (letter, then 5-19 chars)
    re.compile(rf"(?i){_WECHAT_KEY}\s*[:：]\s*(?P<value>[A-Za-z][-_A-Za-z0-9]{{5,19}})(?![-_A-Za-z0-9])"),
    re.compile(r"微信号?\s*[:：=]\s*(?P<value>[^\s,，;；\"')]+)"),
)
# PostgreSQL error details name the columns, then the values: Key (bot_id, wechat)=(b1, zhangsan123) already ...
_PG_KEY_DETAIL: Final = re.compile(r"Key \((?P<columns>[^()]*)\)=\((?P<values>.*?)\)(?= |\.|,|\\|\"|$)")
# ... or dump the whole row (check / not-null violations): no column names, so the row is hidden entirely.
_PG_FAILING_ROW: Final = re.compile(r"(Failing row contains \().*?(\))(?= *(?:\.|\\|\"|$))")
_URL_PASSWORD: Final = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s\"']*:)[^@\s\"']+(?=@)")
_BEARER: Final = re.compile(r"(?i)(?P<head>\bbearer\s+)[A-Za-z0-9._~+/=-]+")
_AUTHORIZATION: Final = re.compile(
    r"(?i)(?P<head>\bauthorization\\?[\"']?\s*[:=]\s*\\?[\"']?(?:basic|token|digest)\s+)[^\s\"'\\,;]+"
)
_SECRET = "***"


def mask_phone(phone: str) -> str:
    """``13800138000`` → ``138****8000``: keep the first 3 and last 4 digits of anything longer than 7."""
    if len(phone) <= 7:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def mask_wechat(wechat: str) -> str:
    """``zhangsan123`` → ``zh*******23``: at most the first 2 and last 2 characters, never more than half."""
    kept = min(2, len(wechat) // 4)
    if kept == 0:
        return "*" * len(wechat)
    return wechat[:kept] + "*" * (len(wechat) - 2 * kept) + wechat[-kept:]


def mask_name(name: str) -> str:
    """``张三`` → ``张*``: the family name stays, the rest is starred (a one-character name is starred)."""
    if len(name) <= 1:
        return "*" * len(name)
    return name[0] + "*" * (len(name) - 1)


_PAYLOAD_MASKS: Final = {"phone": mask_phone, "backup_phone": mask_phone, "wechat": mask_wechat, "name": mask_name}


def mask_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a customer payload (wire names) with phone, backup_phone, wechat and name masked.

    Other string values still go through ``mask_text`` (a phone typed into the notes is a phone), nested
    mappings and lists are masked the same way.
    """
    return {key: _mask_value(key, value) for key, value in payload.items()}


def _mask_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        rule = _PAYLOAD_MASKS.get(key)
        return rule(value) if rule is not None else mask_text(value)
    if isinstance(value, Mapping):
        return mask_payload(value)
    if isinstance(value, list | tuple):
        return [_mask_value(key, item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and 13_000_000_000 <= value < 20_000_000_000:
        return mask_phone(str(value))  # a phone sent as a JSON number
    return value


def _mask_extra(key: str, value: Any) -> Any:
    """An ``extra=`` value, masked where the line-level pass could not do it (or would break the JSON)."""
    if isinstance(value, str):  # free text is left to mask_text over the whole line
        rule = _PAYLOAD_MASKS.get(key)
        return value if rule is None else rule(value)
    return _mask_value(key, value)  # phones sent as numbers, nested payloads


def mask_text(text: str) -> str:
    """``text`` with every phone number, recognisable WeChat id, URL password and auth token masked.

    A phone is ``1[3-9]`` + 9 digits that is not part of a longer digit run (so 12-digit numbers, timestamps
    and UUIDs stay readable). A WeChat id cannot be told from other words on its own, so it is masked where
    its key names it: ``"wechat": "..."``, ``wechat=...``, ``wechat: ...``, ``微信: ...`` and PostgreSQL's
    ``Key (wechat)=(...)``; a PostgreSQL ``Failing row contains (...)`` is hidden whole.
    """
    text = _PHONE.sub(_mask_phone_match, text)
    lowered = text.lower()
    if "wechat" in lowered or "微信" in text:
        for pattern in _WECHAT_PATTERNS:
            text = pattern.sub(_mask_wechat_match, text)
    if "key (" in lowered:
        text = _PG_KEY_DETAIL.sub(_mask_pg_key, text)
    if "failing row" in lowered:
        text = _PG_FAILING_ROW.sub(rf"\g<1>{_SECRET}\g<2>", text)
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<head>{_SECRET}", text)
    if "bearer" in lowered:
        text = _BEARER.sub(rf"\g<head>{_SECRET}", text)
    if "authorization" in lowered:
        text = _AUTHORIZATION.sub(rf"\g<head>{_SECRET}", text)
    return text


def _mask_phone_match(match: re.Match[str]) -> str:
    text, (start, end) = match.string, match.span()
    if start > 0 and "0" <= text[start - 1] <= "9":  # the tail of a longer digit run, not a phone
        return match[0]
    # Only the run of hex digits and dashes around the match can form an id: look for one there.
    low, high = start, end
    while low > 0 and text[low - 1] in _HEX_OR_DASH:
        low -= 1
    while high < len(text) and text[high] in _HEX_OR_DASH:
        high += 1
    if (low, high) != (start, end):
        for hex_id in _HEX_ID.finditer(text, low, high):
            if hex_id.start() <= start and end <= hex_id.end():
                return match[0]
    return mask_phone(match[0])


def _mask_wechat_match(match: re.Match[str]) -> str:
    groups = match.groupdict()
    name = next(key for key in ("value", "value2", "value3") if groups.get(key) is not None)
    start, end = match.span(name)
    offset = match.start()
    whole = match[0]
    return whole[: start - offset] + mask_wechat(match[name]) + whole[end - offset :]


def _mask_pg_key(match: re.Match[str]) -> str:
    columns = [column.strip().lower() for column in match["columns"].split(",")]
    if not any("wechat" in column for column in columns):
        return match[0]
    values = match["values"].split(", ")
    if len(values) != len(columns):  # a value holds ", ": cannot tell them apart, hide them all
        masked = _SECRET
    else:
        masked = ", ".join(
            mask_wechat(value) if "wechat" in column else value for column, value in zip(columns, values, strict=True)
        )
    return f"Key ({match['columns']})=({masked})"
