"""One error model for the whole service.

* ``ClientError`` and its children: the caller sent something we refuse. Only the gateway's error
  middleware turns them into HTTP (status + the spec's JSON shape).
* ``RetryableError``: the world is temporarily broken (database restarting, deadlock). The worker keeps the
  message unacked and retries with backoff for as long as it takes; it is never dead-lettered.
* ``PermanentError``: retrying will not help by itself (a constraint or trigger raising, a malformed
  message). The worker retries it a bounded number of times, then dead-letters it.

Business outcomes such as "phone taken" are not exceptions: they are results the worker records and replies.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal, NotRequired

import asyncpg
from pydantic import Field
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

VALIDATION_MESSAGE = "请求数据验证失败"


class FieldError(TypedDict):
    field: str
    error: str


# The spec's error shape, every error answer's body; the OpenAPI document's Error schema is generated from it
# (so no docstring: it would become the schema's description).
class ErrorBody(TypedDict):
    success: Literal[False]
    error: Annotated[str, Field(description="具体错误（如哪个字段不合规）")]
    message: Annotated[str, Field(description="错误类别")]
    details: NotRequired[Annotated[list[FieldError], Field(description="400时逐字段列出全部错误")]]
    requestId: NotRequired[Annotated[str, Field(description="请求ID（死信的500带此字段，可用于replay）")]]


class CrmError(Exception):
    """Root of every error this service raises on purpose."""


class ClientError(CrmError):
    """A request the gateway refuses; carries everything needed for the HTTP answer."""

    status = 400
    message = VALIDATION_MESSAGE

    def __init__(self, error: str, *, details: list[FieldError] | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.details = details

    def body(self) -> ErrorBody:
        body: ErrorBody = {"success": False, "error": self.error, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class RequestInvalid(ClientError):
    status = 400


class UnsupportedMediaType(ClientError):
    status = 415


class BodyTooLarge(ClientError):
    status = 413


class NotFound(ClientError):
    status = 404
    message = "接口不存在"


class CustomerNotFound(NotFound):
    message = "客户不存在"


class RequestNotFound(NotFound):
    message = "请求不存在"


class RequestTimeout(ClientError):
    """The client did not send its whole request within CLIENT_TIMEOUT; the connection is closed."""

    status = 408
    message = "请求超时"


class MethodNotAllowed(ClientError):
    status = 405
    message = "请求方法不支持"


class PhoneTaken(ClientError):
    status = 409
    message = "客户数据冲突"


class IdempotencyKeyReused(ClientError):
    status = 422
    message = "幂等键冲突"


MISSING_KEY = "缺少API密钥：请在Authorization: Bearer或X-API-Key头中提供"
INVALID_KEY = "API密钥无效"


class Unauthorized(ClientError):
    """No API key, or one that is not configured (answered with ``WWW-Authenticate: Bearer``)."""

    status = 401
    message = "未授权：缺少或无效的API密钥"

    def __init__(self, error: str, *, invalid_key: bool = False) -> None:
        super().__init__(error)
        # RFC 6750 section 3.1: a key was presented and refused (error="invalid_token"), or none was sent.
        self.invalid_key = invalid_key


class TooManyRequests(ClientError):
    """Over the rate limit of this API key (or client address); ``retry_after`` whole seconds."""

    status = 429
    message = "请求过于频繁"

    def __init__(self, error: str, *, retry_after: int) -> None:
        super().__init__(error)
        self.retry_after = retry_after


class ServiceUnavailable(ClientError):
    """The broker cannot take the request right now; the client should retry later."""

    status = 503
    message = "服务暂时不可用，请稍后重试"


class ProcessingFailed(ClientError):
    """The worker gave up on the request (it is in the dead-letter queue)."""

    status = 500
    message = "服务器处理失败"


class RetryableError(CrmError):
    """Transient failure: retry forever with capped backoff, never dead-letter."""


class PermanentError(CrmError):
    """Failure that survives a retry: bounded retries, then the dead-letter queue."""


# Postgres failures that go away by themselves: the server restarting or shutting down, lost connections,
# lock conflicts, resource limits. A unique violation is transient too: it means another worker committed
# a conflicting row (phone, idempotency key) after our pre-check; the retry sees that row and decides.
_TRANSIENT_PG = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.UniqueViolationError,
    # Connected to a standby (a DATABASE_URL host list without target_session_attrs=read-write, or a primary
    # demoted under us): the database is unavailable for writing, never the request's fault.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


def is_transient(exc: BaseException) -> bool:
    """True when a database/network failure is worth retrying without limit."""
    if isinstance(exc, (RetryableError, *_TRANSIENT_PG)):
        return True
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError | asyncpg.exceptions.DataError):
        return False  # a statement timeout or a value asyncpg cannot encode: the batch's doing
    if isinstance(exc, asyncpg.exceptions.InterfaceError | asyncpg.exceptions.InternalClientError):
        return True  # connection closed or reset under us
    if isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        # Class 08 (connection exception), 53 (insufficient resources), 57 (operator intervention),
        # 58 (system error) are environmental, whatever subclass asyncpg picked.
        return str(getattr(exc, "sqlstate", "") or "")[:2] in {"08", "53", "57", "58"}
    return False
