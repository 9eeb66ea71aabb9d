"""Logging set-up for every process, the request-id context, and the masking rules for personal data.

Flow of one record: ``log.info("request applied", extra={...})`` → ``RequestContextFilter`` adds the
``request_id`` / ``client_request_id`` bound to the current task (unless the call passed its own) →
``JsonFormatter`` (or ``TextFormatter`` with ``LOG_FORMAT=text``) renders ``ts``, ``level``, ``event``,
``service``, ``logger``, the extras and ``exc`` into one line → ``mask_text`` runs over the finished line, so
no phone number, recognisable WeChat id, URL password or bearer token leaves the process, wherever in the line
it sits (message, extras, a quoted database error, a traceback).

The masking rules live in ``shared.masking`` (re-exported here for the callers that mask what they log).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO, Any, Final, Protocol

import orjson

from shared.masking import _mask_extra, mask_name, mask_payload, mask_phone, mask_text, mask_wechat

__all__ = [
    "bind_request", "client_request_id_var", "configure_logging", "log_event", "mask_name", "mask_payload",
    "mask_phone", "mask_text", "mask_wechat", "parse_log_level", "request_id_var", "set_request_id",
]

# ---- request context --------------------------------------------------------------------------------

# Our id of the request being handled (the one in the 202 body, the envelope and the dead letter).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
# The caller's own X-Request-Id: logged for their benefit, never used as ours (it need not be unique).
client_request_id_var: ContextVar[str | None] = ContextVar("client_request_id", default=None)


@contextlib.contextmanager
def bind_request(request_id: str | None, client_request_id: str | None = None) -> Iterator[None]:
    """Every log line emitted inside the block carries ``request_id`` (and ``client_request_id`` if given).

    ``client_request_id=None`` leaves an already bound caller id in place (the access-log middleware binds it).
    """
    token = request_id_var.set(request_id)
    client_token = client_request_id_var.set(client_request_id) if client_request_id is not None else None
    try:
        yield
    finally:
        request_id_var.reset(token)
        if client_token is not None:
            client_request_id_var.reset(client_token)


def set_request_id(request_id: str) -> None:
    """Bind ``request_id`` for the rest of the current task's context.

    For a gateway handler: the access-log middleware scopes the binding to the HTTP request and resets it
    afterwards, so every line logged while handling the request, and the access-log line, carry the id.
    """
    request_id_var.set(request_id)


class RequestContextFilter(logging.Filter):
    """Adds the bound request ids to each record; an explicit ``extra={"request_id": ...}`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        if not hasattr(record, "client_request_id"):
            client_request_id = client_request_id_var.get()
            if client_request_id is not None:
                record.client_request_id = client_request_id
        return True


# ---- formatting -------------------------------------------------------------------------------------

_RECORD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}
_BASE_KEYS: Final = ("ts", "level", "event", "service", "logger", "exc", "stack")


_last_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """ISO-8601 UTC with milliseconds: ``2026-05-01T12:00:00.123Z``."""
    global _last_second
    seconds = int(created)
    if _last_second[0] != seconds:  # strftime is most of the cost; lines come many per second
        _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_last_second[1]}.{int((created - seconds) * 1000):03d}Z"


class _ServiceFormatter(logging.Formatter):
    """Collects the fields of a record; subclasses render them on one line, which is then masked."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "service": self.service,
            "logger": record.name,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                fields[f"{key}_" if key in _BASE_KEYS else key] = _mask_extra(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return fields

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(self.render(self.fields(record)))

    def render(self, fields: dict[str, Any]) -> str:
        raise NotImplementedError


class JsonFormatter(_ServiceFormatter):
    """One JSON object per line (``LOG_FORMAT=json``, the default): for log collectors."""

    def render(self, fields: dict[str, Any]) -> str:
        return orjson.dumps(fields, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(_ServiceFormatter):
    """``LOG_FORMAT=text``: ``ts level [service] logger: event key=value ...`` on one line, for people."""

    def render(self, fields: dict[str, Any]) -> str:
        head = (
            f"{fields.pop('ts')} {fields.pop('level').upper():<7} [{fields.pop('service')}] {fields.pop('logger')}: "
            f"{_one_line(str(fields.pop('event')))}"
        )
        return " ".join([head, *(f"{key}={_text_value(value)}" for key, value in fields.items())])


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: Any) -> str:
    if not isinstance(value, str):
        return orjson.dumps(value, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
    if value and not any(char in value for char in " \"'=\n\r\t\\"):
        return value
    return orjson.dumps(value).decode()  # quoted, newlines and quotes escaped


# ---- set-up -----------------------------------------------------------------------------------------

_LEVELS: Final = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


def parse_log_level(text: str) -> int:
    """``"info"`` → ``logging.INFO``; anything that is not a level name raises ValueError saying what is."""
    level = _LEVELS.get(text.strip().upper())
    if level is None:
        raise ValueError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got {text!r})")
    return level


class LogSettings(Protocol):
    """The two settings logging needs (``shared.settings.Settings`` has them)."""

    @property
    def log_level(self) -> str: ...

    @property
    def log_format(self) -> str: ...


class _ServiceHandler(logging.StreamHandler[IO[str]]):
    """Our handler on the root logger (a marker, so a second ``configure_logging`` replaces it), buffered.

    A write and a flush per line cost more than formatting it, at one line per request. So lines are collected
    and written together: at once for WARNING and above (with everything before them, in order), otherwise
    when ``FLUSH_LINES`` are waiting or by the flusher thread every ``FLUSH_INTERVAL`` seconds, and at exit.
    What a ``kill -9`` can lose is the last fraction of a second of INFO lines.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._buffer_lock = threading.Lock()  # log_event writes here without the handler's own lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record), urgent=record.levelno >= logging.WARNING)
        except Exception:
            self.handleError(record)

    def write_line(self, line: str, urgent: bool = False) -> None:
        with self._buffer_lock:
            self._pending.append(line)
            if urgent or len(self._pending) >= FLUSH_LINES:
                self._write_pending()

    def flush(self) -> None:
        with self._buffer_lock:
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            self.stream.write(text)
        self.stream.flush()


FLUSH_INTERVAL: Final = 0.2
FLUSH_LINES: Final = 256
_handler: _ServiceHandler | None = None
_flusher: threading.Thread | None = None


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL)
        handler = _handler
        if handler is not None:
            with contextlib.suppress(Exception):
                handler.flush()


def log_event(logger: logging.Logger, event: str, fields: dict[str, Any]) -> None:
    """An INFO line for the hot path (one per request): the same line ``logger.info(event, extra=fields)``
    writes, masked the same way, without the stdlib's per-record machinery (a LogRecord, filters, handler
    lookup), which costs several times more than the line itself."""
    handler = _handler
    if handler is None or not logger.isEnabledFor(logging.INFO):
        return
    formatter = handler.formatter
    assert isinstance(formatter, _ServiceFormatter)
    line: dict[str, Any] = {
        "ts": _timestamp(time.time()), "level": "info", "event": event, "service": formatter.service,
        "logger": logger.name,
    }
    for key, value in fields.items():
        if value is not None:
            line[f"{key}_" if key in _BASE_KEYS else key] = _mask_extra(key, value)
    handler.write_line(mask_text(formatter.render(line)))


def configure_logging(settings: LogSettings, service: str, stream: IO[str] | None = None) -> None:
    """Send every log record of the process, masked, one line each, to ``stream`` (stdout by default).

    ``service`` names the process in every line: ``gateway``, ``worker``, ``migrate`` or ``replay``. A tool
    whose stdout is its output (the replay tool) passes ``sys.stderr``. Raises ValueError for a bad LOG_LEVEL.
    """
    level = parse_log_level(settings.log_level)
    formatter = TextFormatter(service) if settings.log_format == "text" else JsonFormatter(service)
    handler = _ServiceHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(formatter)
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _ServiceHandler)]:
        previous.flush()
        root.removeHandler(previous)
    root.addHandler(handler)
    global _handler, _flusher
    _handler = handler
    if _flusher is None:
        _flusher = threading.Thread(target=_flush_forever, name="log-flusher", daemon=True)
        _flusher.start()
    # The logging HOWTO's "Optimization": no caller frame lookup, no thread/process names (never printed).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level)
    # aio-pika logs every reconnect attempt with a traceback; one line is enough.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))
