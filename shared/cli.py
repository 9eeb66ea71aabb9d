"""The command-line face of every entry point: ``--help``, settings, and start-up failures as one line.

Flow of an entry point (``python -m gateway``, ``worker``, ``shared.migrate``, ``worker.replay``):

    entry_point_parser(...).parse_args()   --help prints usage, the environment variables (generated from
                                           ``Settings.model_fields``, so it cannot drift) and the exit codes,
                                           and exits 0 before anything is read, opened or applied
    load_settings_or_exit()                invalid settings → ``error: invalid setting PORT: ...``, exit 1
    connect, declare, listen               a failure is raised as ``StartupError`` (``describe_amqp_error``,
                                           ``describe_postgres_error`` say what is wrong in one line)
    fail(str(exc))                         ``error: <one line>`` on stderr, exit 1, no traceback

Passwords never reach a message: every URL is shown through ``mask_url`` and a setting's value is never
echoed back (only its name and the rule it breaks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import socket
import sys
import types
import typing
import urllib.parse
from collections.abc import Coroutine, Iterator
from typing import Any, Final, NoReturn

import asyncpg
from aio_pika import exceptions as amqp_errors
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import SettingsError

from shared.brokers import NodesUnreachable
from shared.errors import CrmError
from shared.logs import parse_log_level
from shared.masking import mask_url
from shared.settings import CONNECT_TIMEOUT, READ_BY, Settings

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1

EXIT_CODES: Final = (
    f"exit codes:\n  {EXIT_OK}  success (for a service: stopped cleanly on SIGTERM/SIGINT)\n"
    f"  {EXIT_FAILURE}  cannot start or failed: one line on stderr says why (bad setting, RabbitMQ or PostgreSQL\n"
    "     unreachable or refusing, port taken, topology differing from the broker's)\n"
    "  2  bad command-line arguments"
)


class StartupError(Exception):
    """A process cannot start; the message is the one line the operator reads."""


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr (one line) and exit 1."""
    one_line = " ".join(message.split())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_FAILURE)


# ---- --help ---------------------------------------------------------------------------------------------


def entry_point_parser(prog: str, description: str, usage_notes: str = "", *, reads: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` ends with the environment variables this entry point reads (``reads``
    names it in ``shared.settings.READ_BY``) and the exit codes."""
    epilog = "\n\n".join(part for part in (usage_notes.strip("\n"), settings_help(reads), EXIT_CODES) if part)
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def settings_help(reads: str) -> str:
    """Every setting the entry point reads, as ``NAME  default  (rule)  description``, in declaration order."""
    wanted = set(READ_BY[reads])
    rows = [(name.upper(), _default_text(name, field), _field_notes(field)) for name, field in
            Settings.model_fields.items() if name in wanted]
    width = max(len(name) for name, _, _ in rows)
    lines = ["environment variables (all optional; default shown):"]
    for name, default, notes in rows:
        lines.append(f"  {name:<{width}}  {default}{'  ' + notes if notes else ''}")
    return "\n".join(lines)


def _default_text(name: str, field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        return "(required)"
    default = field.default
    if isinstance(default, bool):
        return "true" if default else "false"
    text = mask_url(default) if isinstance(default, str) and name.endswith("_url") else str(default)
    return text if text else '""'


def _field_notes(field: FieldInfo) -> str:
    rules: list[str] = []
    choices = _literal_choices(field.annotation)
    if choices:
        rules.append("one of " + "|".join(choices))
    for constraint in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(constraint, attribute, None)
            if value is not None:
                rules.append(f"{symbol} {value}")
    notes = f"({', '.join(rules)})" if rules else ""
    if field.description:
        notes = f"{notes} {field.description}".strip()
    return notes


def _literal_choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [choice for arg in typing.get_args(annotation) for choice in _literal_choices(arg)]
    return []


# ---- settings -------------------------------------------------------------------------------------------


def load_settings_or_exit() -> Settings:
    """The process's settings, or ``error: invalid setting NAME: rule`` and exit 1."""
    try:
        settings = Settings()
    except ValidationError as exc:
        fail(describe_settings_error(exc))
    except SettingsError as exc:  # a value pydantic-settings could not even parse
        fail(f"invalid settings: {exc}")
    try:
        parse_log_level(settings.log_level)
    except ValueError as exc:
        fail(f"invalid setting LOG_LEVEL: {str(exc).removeprefix('LOG_LEVEL ')}")
    return settings


def describe_settings_error(exc: ValidationError) -> str:
    """``invalid setting PORT: Input should be less than or equal to 65535`` (all errors, one line)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in error["loc"]).upper()
        parts.append(f"invalid setting {location}: {message}" if location else f"invalid settings: {message}")
    return "; ".join(parts)


# ---- URLs and errors ------------------------------------------------------------------------------------


def amqp_vhost(url: str) -> str:
    """The vhost an AMQP URL names: its path, percent-decoded; ``/`` when the path is empty."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def describe_amqp_error(exc: BaseException, url: str) -> str:
    """One line for a failed AMQP connection: where (passwords masked) and why, in words.

    With a node list (``shared.brokers``) where no node answered, every node is named with its own reason.
    """
    if isinstance(exc, NodesUnreachable):
        reasons = "; ".join(f"{node}: {_amqp_reason(error, node)}" for node, error in exc.failures)
        return f"cannot connect to RabbitMQ: none of {len(exc.failures)} nodes answered ({reasons})"
    return f"cannot connect to RabbitMQ at {mask_url(url)}: {_amqp_reason(exc, url)}"


def _amqp_reason(exc: BaseException, url: str) -> str:
    if isinstance(exc, amqp_errors.ProbableAuthenticationError):
        return "authentication failed (wrong user name or password)"
    if isinstance(exc, amqp_errors.InvalidFrameError) and "Connection.Close" in str(exc):
        # The broker closed the connection in answer to connection.open: the vhost is missing or this user
        # has no permission on it (aiormq drops the broker's reply text, so both are named).
        return f'vhost "{amqp_vhost(url)}" does not exist or access refused'
    if isinstance(exc, amqp_errors.ConnectionClosed) and len(exc.args) >= 2:
        return str(exc.args[1])
    return _reason(exc)


def describe_postgres_error(exc: BaseException, url: str) -> str:
    """One line for a failed PostgreSQL connection or query at start-up."""
    where = f"cannot connect to PostgreSQL at {mask_url(url)}"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return (f"PostgreSQL at {mask_url(url)} has no schema yet ({exc}): run `python -m shared.migrate` "
                "or set MIGRATE_ON_START=true")
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _REFUSED_CONNECTION):
        return f"PostgreSQL at {mask_url(url)} answered: {exc}"  # connected; a statement failed
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return f"{where}: {exc}"
    return f"{where}: {_reason(exc)}"


# The server refused the connection itself: unknown database or role, bad password, not accepting, full.
_REFUSED_CONNECTION: Final = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


def describe_listen_error(exc: OSError, host: str, port: int, setting: str = "PORT") -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {host}:{port}: address already in use (another process has it; set {setting})"
    return f"cannot listen on {host}:{port}: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    """An exception in words: connection refused, host not found, timed out — else its own text."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in (socket.EAI_NONAME, socket.EAI_AGAIN)
    ):
        return "host name not found"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connection refused (is it running and listening there?)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


# ---- start-up phases ------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_amqp_logs() -> Iterator[None]:
    """Silence aio-pika/aiormq while connecting: their own error lines would double ours."""
    loggers = [logging.getLogger(name) for name in ("aio_pika", "aiormq")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def starting(what: str, url: str) -> Iterator[None]:
    """Turn any failure inside the block (connecting to ``what`` at ``url``) into a one-line ``StartupError``.

    ``what`` is ``"RabbitMQ"`` or ``"PostgreSQL"``; a ``StartupError`` or a ``CrmError`` raised inside (a
    topology mismatch) keeps its own message.
    """
    try:
        with quiet_amqp_logs() if what == "RabbitMQ" else contextlib.nullcontext():
            yield
    except (StartupError, CrmError) as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        describe = describe_amqp_error if what == "RabbitMQ" else describe_postgres_error
        logging.getLogger("startup").debug("start-up failed", exc_info=True)
        raise StartupError(describe(exc, url)) from exc


def run_or_fail(main: Coroutine[Any, Any, object], settings: Settings, process: str) -> None:
    """``asyncio.run(main)``; a ``StartupError`` or any other exception ends as one ``error:`` line, exit 1."""
    try:
        asyncio.run(_silent_after_failure(main))
    except StartupError as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"{process} failed: {describe_unexpected(exc, settings)}")


async def _silent_after_failure(main: Coroutine[Any, Any, object]) -> None:
    try:
        await main
    except Exception:
        # What a failed start leaves behind (tasks of a half-open AMQP connection) would log tracebacks while
        # asyncio.run() cancels it: the one error line is all the operator should read.
        logging.disable(logging.CRITICAL)
        raise


def describe_unexpected(exc: BaseException, settings: Settings) -> str:
    """A start-up failure raised outside ``starting``: name the dependency from the exception's type."""
    if isinstance(exc, StartupError | CrmError):
        return str(exc)
    if isinstance(exc, amqp_errors.AMQPError):
        return describe_amqp_error(exc, settings.amqp_url)
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return describe_postgres_error(exc, settings.database_url)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        # The gateway names its own PORT; a worker listens only for /metrics.
        port = getattr(settings, "metrics_port", None)
        return f"cannot listen on {settings.host}:{port} (METRICS_PORT): address already in use"
    return f"{exc.__class__.__name__}: {_reason(exc)}"
