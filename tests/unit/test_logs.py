"""Logging: the JSON and text line shapes, the request id carried by the context, the access log, and the
masking rules (phones, WeChat ids, URL passwords, tokens) applied to every line."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.logs import (
    bind_request,
    configure_logging,
    log_event,
    mask_name,
    mask_payload,
    mask_phone,
    mask_text,
    mask_wechat,
    parse_log_level,
    request_id_var,
    set_request_id,
)
from tests.gateway_apps import edge_app

PHONE = "13800138000"
WECHAT = "zhangsan123"
# What asyncpg's str() gives for a unique violation on a (bot_id, wechat) key and on the phone key.
PG_WECHAT_TAKEN = (
    'duplicate key value violates unique constraint "customers_wechat_key"\n'
    "DETAIL:  Key (bot_id, wechat)=(bot-1, zhangsan123) already exists."
)
PG_PHONE_TAKEN = (
    'duplicate key value violates unique constraint "customers_phone_key"\n'
    "DETAIL:  Key (phone)=(13800138000) already exists."
)
PG_CHECK_FAILED = (
    'new row for relation "customers" violates check constraint "customers_status_check"\n'
    "DETAIL:  Failing row contains (7, u-1, bot-1, 张三, 13800138000, zhangsan123, 9)."
)


@dataclass
class LogSettings:
    log_level: str = "INFO"
    log_format: str = "json"


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def text(self) -> str:
        """What was written, after flushing the handler's buffer (INFO lines are written in batches)."""
        for handler in logging.getLogger().handlers:
            handler.flush()
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines()]


@pytest.fixture
def capture() -> Iterator[Callable[..., Captured]]:
    """configure_logging into a buffer; the root logger is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def configure(log_format: str = "json", service: str = "gateway", level: str = "DEBUG") -> Captured:
        captured = Captured()
        configure_logging(LogSettings(level, log_format), service, stream=captured.stream)
        return captured

    yield configure
    root.handlers[:] = handlers
    root.setLevel(level)


log = logging.getLogger("tests.logs")


# ---- line shape -------------------------------------------------------------------------------------

def test_json_line_has_ts_level_event_service_logger(capture: Callable[..., Captured]) -> None:
    captured = capture(service="worker")
    log.info("worker consuming %d shard queues", 2)
    [line] = captured.lines()
    record = orjson.loads(line)
    assert list(record)[:5] == ["ts", "level", "event", "service", "logger"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), record["ts"]
    assert record["level"] == "info"
    assert record["event"] == "worker consuming 2 shard queues"
    assert record["service"] == "worker"
    assert record["logger"] == "tests.logs"


def test_extra_fields_become_keys_of_the_line(capture: Callable[..., Captured]) -> None:
    captured = capture()
    log.info("request applied", extra={"request_id": "r-1", "user_id": "u-1", "attempt": 2, "event": "clash"})
    [record] = captured.records()
    assert record["request_id"] == "r-1" and record["user_id"] == "u-1" and record["attempt"] == 2
    assert record["event"] == "request applied" and record["event_"] == "clash"  # a base key is never replaced


def test_records_below_the_level_are_dropped_and_aio_pika_is_quieted(capture: Callable[..., Captured]) -> None:
    captured = capture(level="info")
    log.debug("not shown")
    logging.getLogger("aio_pika.robust_connection").info("reconnecting")
    assert captured.lines() == []
    assert logging.getLogger("aiormq").getEffectiveLevel() == logging.WARNING


def test_configuring_twice_replaces_the_handler_instead_of_doubling_lines(capture: Callable[..., Captured]) -> None:
    capture()
    captured = capture()
    log.info("once")
    assert len(captured.lines()) == 1


def test_text_format_is_one_readable_line_with_key_values(capture: Callable[..., Captured]) -> None:
    captured = capture(log_format="text", service="migrate")
    log.warning("two\nlines", extra={"version": "0001_customers", "note": "has spaces"})
    [line] = captured.lines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING +\[migrate\] tests\.logs: two\\nlines "
        r'version=0001_customers note="has spaces"',
        line,
    ), line


def test_exception_is_one_field_and_masked(capture: Callable[..., Captured]) -> None:
    captured = capture()
    try:
        raise RuntimeError(PG_WECHAT_TAKEN + " phone " + PHONE)
    except RuntimeError:
        log.exception("batch failed")
    [line] = captured.lines()
    record = orjson.loads(line)
    assert record["level"] == "error"
    assert "Traceback (most recent call last)" in record["exc"] and "RuntimeError" in record["exc"]
    assert "138****8000" in record["exc"] and "(bot-1, zh*******23)" in record["exc"]
    assert PHONE not in line and WECHAT not in line


def test_text_format_masks_and_keeps_the_exception_on_the_line(capture: Callable[..., Captured]) -> None:
    captured = capture(log_format="text")
    try:
        raise ValueError(PG_PHONE_TAKEN)
    except ValueError:
        log.exception("apply failed", extra={"wechat": WECHAT})
    [line] = captured.lines()
    assert 'exc="Traceback' in line and "Key (phone)=(138****8000)" in line
    assert "wechat=zh*******23" in line
    assert PHONE not in line and WECHAT not in line


def test_every_part_of_a_line_is_masked(capture: Callable[..., Captured]) -> None:
    captured = capture()
    log.warning(
        "publish failed: %s",
        PG_CHECK_FAILED,
        extra={"phone": int(PHONE), "payload": {"wechat": WECHAT, "name": "张三", "internal_notes": f"tel {PHONE}"},
               "dsn": "postgresql://crm:s3cret@db:5432/crm"},
    )
    [line] = captured.lines()
    record = orjson.loads(line)  # still valid JSON after masking
    assert record["phone"] == "138****8000"
    assert record["payload"] == {"wechat": "zh*******23", "name": "张*", "internal_notes": "tel 138****8000"}
    assert record["dsn"] == "postgresql://crm:***@db:5432/crm"
    assert "Failing row contains (***)" in record["event"]
    for secret in (PHONE, WECHAT, "张三", "s3cret"):
        assert secret not in line, secret


# ---- request id context -----------------------------------------------------------------------------

async def test_lines_inside_bind_request_carry_the_request_id(capture: Callable[..., Captured]) -> None:
    captured = capture()
    with bind_request("req-1", client_request_id="theirs-1"):
        log.info("published")
        await asyncio.create_task(_log_from_a_task())  # a task started inside inherits the binding
        log.info("explicit wins", extra={"request_id": "req-2"})
    log.info("after")
    first, from_task, explicit, after = captured.records()
    assert (first["request_id"], first["client_request_id"]) == ("req-1", "theirs-1")
    assert from_task["request_id"] == "req-1"
    assert explicit["request_id"] == "req-2"
    assert "request_id" not in after and "client_request_id" not in after
    assert request_id_var.get() is None


async def _log_from_a_task() -> None:
    log.info("from a task")


# ---- access log -------------------------------------------------------------------------------------

async def test_access_log_line_per_request_with_our_id_and_the_callers(capture: Callable[..., Captured]) -> None:
    captured = capture()

    async def post_customer(request: web.Request) -> web.Response:
        set_request_id("ours-1")
        log.info("request accepted")
        return web.json_response({"success": True}, status=202, headers={"X-Request-Id": "ours-1"})

    async def boom(request: web.Request) -> web.Response:
        raise web.HTTPConflict()

    app = edge_app()
    app.router.add_post("/api/external/customers", post_customer)
    app.router.add_get("/boom", boom)
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            "/api/external/customers?phone=13800138000", json={"phone": PHONE}, headers={"X-Request-Id": "theirs-9"}
        )
        assert response.status == 202
        assert (await client.get("/boom")).status == 409
        assert (await client.get("/nowhere")).status == 404

    # (the test server also writes aiohttp's own access log, which gateway/__main__.py turns off)
    ours = [record for record in captured.records() if record["logger"] != "aiohttp.access"]
    handler_line, post_line, boom_line, missing_line = ours
    assert handler_line["request_id"] == "ours-1" and handler_line["client_request_id"] == "theirs-9"
    assert post_line["event"] == "http request" and post_line["logger"] == "gateway.access"
    assert {key: post_line[key] for key in ("method", "path", "status", "request_id", "client_request_id")} == {
        "method": "POST", "path": "/api/external/customers", "status": 202,
        "request_id": "ours-1", "client_request_id": "theirs-9",
    }
    assert isinstance(post_line["duration_ms"], float) and post_line["remote"] == "127.0.0.1"
    assert (boom_line["path"], boom_line["status"]) == ("/boom", 409) and "request_id" not in boom_line
    assert missing_line["status"] == 404 and "client_request_id" not in missing_line
    assert PHONE not in captured.text()  # no body, no query string


# ---- masking rules ----------------------------------------------------------------------------------

def test_mask_phone_keeps_the_first_three_and_last_four_digits() -> None:
    assert mask_phone("13800138000") == "138****8000"
    assert mask_phone("1234567") == "*******"


@pytest.mark.parametrize(
    ("wechat", "masked"),
    [("zhangsan123", "zh*******23"), ("wxid_a1b2c3", "wx*******c3"), ("abcdefg", "a*****g"), ("abcd", "a**d"),
     ("abc", "***"), ("", "")],
)
def test_mask_wechat_keeps_at_most_two_characters_each_side_and_never_half(wechat: str, masked: str) -> None:
    assert mask_wechat(wechat) == masked
    assert sum(char != "*" for char in masked) <= len(wechat) / 2


def test_mask_name_keeps_the_family_name() -> None:
    assert (mask_name("张三"), mask_name("欧阳娜娜"), mask_name("张")) == ("张*", "欧***", "*")


def test_mask_payload_masks_phones_wechat_and_name_only() -> None:
    payload = {"userId": "u-1", "name": "张三", "phone": PHONE, "backup_phone": "13900139000", "wechat": WECHAT,
               "community": "阳光小区", "internal_notes": f"备用 {PHONE}", "status": 1, "room_tags": None}
    assert mask_payload(payload) == {
        "userId": "u-1", "name": "张*", "phone": "138****8000", "backup_phone": "139****9000",
        "wechat": "zh*******23", "community": "阳光小区", "internal_notes": "备用 138****8000", "status": 1,
        "room_tags": None,
    }
    assert payload["phone"] == PHONE  # a copy: the caller's payload is untouched


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"phone {PHONE}.", "phone 138****8000."),
        (f"{PHONE},19912345678", "138****8000,199****5678"),
        (f'{{"phone":"{PHONE}"}}', '{"phone":"138****8000"}'),
        (f"x{PHONE}y", "x138****8000y"),
        (f"a=1{PHONE}", f"a=1{PHONE}"),  # 12 digits: not a phone
        ("id 138001380001", "id 138001380001"),
        ("12800138000 and 1380013800", "12800138000 and 1380013800"),  # 1[3-9] only; 10 digits
        ("at 2024-01-15T13:45:12.123Z", "at 2024-01-15T13:45:12.123Z"),
        ("ms 17380013800012", "ms 17380013800012"),
        # ids holding phone-like digits stay greppable
        ("request 0190f5b2-7c1e-7abc-8def-a13800138000", "request 0190f5b2-7c1e-7abc-8def-a13800138000"),
        ("request 13800138000ab0123456789abcdef0123", "request 13800138000ab0123456789abcdef0123"),
    ],
)
def test_mask_text_masks_phones_and_nothing_else(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (PG_WECHAT_TAKEN, PG_WECHAT_TAKEN.replace(WECHAT, "zh*******23")),
        ("Key (wechat)=(zhangsan123) already exists.", "Key (wechat)=(zh*******23) already exists."),
        ("Key (user_id)=(u-1) already exists.", "Key (user_id)=(u-1) already exists."),
        ('{"wechat": "zhangsan123", "x": 1}', '{"wechat": "zh*******23", "x": 1}'),
        ("{'wechat': 'zhangsan123'}", "{'wechat': 'zh*******23'}"),
        ('"event":"body {\\"wechat\\":\\"zhangsan123\\"}"', '"event":"body {\\"wechat\\":\\"zh*******23\\"}"'),
        ("wechat=zhangsan123 user=u", "wechat=zh*******23 user=u"),
        ('WeChat_ID="zhang san"', 'WeChat_ID="zh*****an"'),
        ("wechat: zhangsan123", "wechat: zh*******23"),
        ("wechat: too long", "wechat: too long"),  # not shaped like a WeChat id
        ("微信：zhangsan123", "微信：zh*******23"),
        (PG_CHECK_FAILED, PG_CHECK_FAILED.split("(7,")[0] + "(***)."),
    ],
)
def test_mask_text_masks_wechat_ids_where_their_key_names_them(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("amqp://user:secret@mq:5672/crm", "amqp://user:***@mq:5672/crm"),
        ("connect postgresql://u:p@h/db failed", "connect postgresql://u:***@h/db failed"),
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres"),
        ("http://host:8080/path", "http://host:8080/path"),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2lnbmF0", "Authorization: Bearer ***"),
        ('{"authorization": "bearer abc123"}', '{"authorization": "bearer ***"}'),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
    ],
)
def test_mask_text_hides_url_passwords_and_auth_tokens(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_masking_twice_changes_nothing() -> None:
    once = mask_text(f"{PG_WECHAT_TAKEN} {PHONE} wechat=zhangsan123 amqp://u:p@h/ Bearer x")
    assert mask_text(once) == once


# ---- LOG_LEVEL --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "level"), [("INFO", logging.INFO), ("debug", logging.DEBUG),
                                             (" Warning ", logging.WARNING), ("error", logging.ERROR)])
def test_parse_log_level_accepts_level_names_in_any_case(text: str, level: int) -> None:
    assert parse_log_level(text) == level


@pytest.mark.parametrize("text", ["bogus", "", "10", "INFO2"])
def test_parse_log_level_rejects_anything_else_with_one_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"^LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL \(got"):
        parse_log_level(text)


def test_configure_logging_refuses_a_bad_level(capture: Callable[..., Captured]) -> None:
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        capture(level="verbose")


# ---- buffering and the hot-path line -----------------------------------------------------------------


def test_info_lines_are_buffered_and_a_warning_writes_them_in_order(capture: Callable[..., Captured]) -> None:
    captured = capture()
    log = logging.getLogger("crm.test")
    log.info("first")
    assert captured.stream.getvalue() == ""  # not written yet: lines go out in batches
    log.warning("second")
    assert [line["event"] for line in map(orjson.loads, captured.stream.getvalue().splitlines())] == [
        "first", "second"]


def test_log_event_writes_the_same_line_as_logger_info(capture: Callable[..., Captured]) -> None:
    captured = capture()
    log = logging.getLogger("gateway.access")
    fields = {"method": "POST", "status": 200, "request_id": "r1", "path": f"/x/{PHONE}", "remote": None}
    log_event(log, "http request", fields)
    log.info("http request", extra={k: v for k, v in fields.items() if v is not None})
    fast, slow = captured.records()
    assert fast.keys() == slow.keys()
    assert {k: v for k, v in fast.items() if k != "ts"} == {k: v for k, v in slow.items() if k != "ts"}
    assert PHONE not in captured.text()


def test_log_event_respects_the_level(capture: Callable[..., Captured]) -> None:
    captured = capture(level="WARNING")
    log_event(logging.getLogger("gateway.access"), "http request", {"status": 200})
    assert captured.lines() == []
