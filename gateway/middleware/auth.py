"""API-key authentication: the ``require_api_key`` middleware and the key ring it reads (``ApiKeys``).

Flow of one request: a protected route? (the public API, where ``gateway.app`` installs the middleware;
``/metrics`` with PROTECT_METRICS, ``/docs``, ``/docs/assets/*`` and ``/openapi.json`` with PROTECT_DOCS, wrapped
by ``protected``; ``/healthz`` and ``/readyz`` never) → keys
configured? (none: the gateway is open, and said so in one WARNING at start) → the key from
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` → ``KeyRing.find`` (SHA-256, then
``hmac.compare_digest`` against every configured digest) → the key's *name* in ``request[API_KEY_NAME]``, for
the rate limiter, the envelope (so the processed record), the access log and the metrics. Otherwise 401, built
by ``gateway.errors.error_response`` (the spec's shape, ``WWW-Authenticate: Bearer``). The key itself is
never stored, logged, counted or echoed.

Rotation without restart (API_KEYS_FILE only): the file is re-read when its (mtime, size, inode) changes,
checked every ``RELOAD_INTERVAL`` seconds, and at once on SIGHUP. A new file that cannot be read or parsed
leaves the keys in use untouched and logs one error naming the line; at start-up the same problem stops the
gateway with that one line (``StartupError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import error_response
from gateway.metrics import METRICS
from gateway.state import API_KEY, API_KEY_NAME, SETTINGS
from shared.apikeys import KeyRing, parse_keys_file, parse_keys_variable
from shared.cli import StartupError
from shared.errors import INVALID_KEY, MISSING_KEY, Unauthorized
from shared.settings import Settings

log = logging.getLogger("gateway.middleware.auth")


RELOAD_INTERVAL: Final = 1.0  # seconds between checks of API_KEYS_FILE

# (mtime_ns, size, inode) of the keys file, or the text of the error reading it.
FileSignature = tuple[int, int, int] | str


class ApiKeys:
    """The key ring in force (``ring``; None = no keys configured, the API is open) and where it comes from."""

    def __init__(self, settings: Settings) -> None:
        self.path: Path | None = Path(settings.api_keys_file.strip()) if settings.api_keys_file.strip() else None
        self.variable = settings.api_keys.strip()
        self.protect_docs = settings.protect_docs
        self.protect_metrics = settings.protect_metrics
        self.ring: KeyRing | None = None
        self._signature: FileSignature | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def source(self) -> str:
        return f"API_KEYS_FILE {self.path}" if self.path is not None else "API_KEYS"

    # ---- loading -------------------------------------------------------------------------------------

    def load(self) -> None:
        """The keys at start-up; a source that is set but unreadable, malformed or empty is a StartupError."""
        if self.path is None and not self.variable:
            return
        try:
            self.ring = self._read()
        except (OSError, ValueError) as exc:
            raise StartupError(self._describe(exc)) from None

    def _read(self) -> KeyRing:
        if self.path is None:
            ring = parse_keys_variable(self.variable)
        else:
            self._signature = _signature(self.path)
            ring = parse_keys_file(self.path.read_text(encoding="utf-8"))
        if not len(ring):
            # Set but empty must not mean open: the operator asked for keys.
            raise ValueError("no keys in it (unset it to run without keys)")
        return ring

    def _describe(self, exc: OSError | ValueError) -> str:
        if isinstance(exc, OSError):
            return f"cannot read {self.source}: {exc.strerror or exc}"
        return f"invalid {self.source}: {exc}"

    def reload(self, why: str) -> bool:
        """Re-read API_KEYS_FILE; on any problem keep the keys in force and log an error. True if replaced."""
        if self.path is None:
            log.info("%s: keys come from %s, nothing to re-read", why, self.source if self.variable else "nowhere")
            return False
        try:
            ring = self._read()
        except (OSError, ValueError) as exc:
            kept = len(self.ring) if self.ring is not None else 0
            log.error("API keys not reloaded (%s): %s; keeping the %d keys in force", why, self._describe(exc), kept)
            return False
        self.ring = ring
        log.info("API keys reloaded (%s): %d keys, names %s", why, len(ring), ", ".join(sorted(ring.names)))
        return True

    def check_file(self) -> None:
        """Reload if the file changed since it was last read (or last failed to be)."""
        if self.path is None:
            return
        try:
            signature: FileSignature = _signature(self.path)
        except OSError as exc:
            signature = str(exc)
        if signature != self._signature:
            self._signature = signature  # a failing file is reported once per change, not every second
            self.reload("file changed")

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.ring is None:
            log.warning(
                "API KEYS ARE OFF: anyone who can reach this gateway can read and write customers. Set "
                "API_KEYS_FILE (or API_KEYS) to require keys; make one with `python -m gateway.keys new NAME`"
            )
        else:
            log.info("API keys on: %d keys from %s, names %s", len(self.ring), self.source,
                     ", ".join(sorted(self.ring.names)))
        loop = asyncio.get_running_loop()
        # Installed whatever the source: SIGHUP's default action would otherwise end the gateway.
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        if self.path is not None:
            self._watcher = asyncio.create_task(self._watch(), name="api-keys-watcher")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                self.check_file()
            except Exception:  # the watcher must outlive any surprise; the keys in force stay
                log.exception("API keys file check failed")

    # ---- per request ---------------------------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


AUTH = web.AppKey("auth", ApiKeys)


def presented_key(request: web.Request) -> str | None:
    """The key in ``Authorization: Bearer <key>``, else in ``X-API-Key``; None when neither carries one."""
    authorization = request.headers.get("Authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    header = request.headers.get("X-API-Key")
    if header and header.strip():
        return header.strip()
    return None


@web.middleware
async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 without a configured key; otherwise note the key's name and go on. Installed on the public API
    (``gateway.app``); ``/docs`` and ``/metrics`` get the same check through ``protected`` when configured."""
    app = request.config_dict
    ring = app[AUTH].ring
    if ring is None:
        return await handler(request)
    presented = presented_key(request)
    if presented is None:
        error = Unauthorized(MISSING_KEY)
        app[METRICS].count_auth_failure("missing")
    else:
        key = ring.find(presented)
        if key is not None:
            request[API_KEY] = key
            request[API_KEY_NAME] = key.name
            app[METRICS].count_authenticated(key.name)
            return await handler(request)
        error = Unauthorized(INVALID_KEY, invalid_key=True)
        app[METRICS].count_auth_failure("invalid")
    return error_response(error, app[SETTINGS].retry_after_seconds)


async def api_keys_ctx(app: web.Application) -> AsyncIterator[None]:
    """Announce the key mode, install the SIGHUP handler and the file watcher; remove them on shutdown."""
    keys = app[AUTH]
    await keys.start()
    yield
    await keys.stop()


def protected(handler: Handler) -> Handler:
    """``handler`` behind the API-key check (``/docs`` and ``/openapi.json`` with PROTECT_DOCS, ``/metrics`` with
    PROTECT_METRICS): the route decides, not a test of the path."""

    async def check_then_handle(request: web.Request) -> web.StreamResponse:
        return await require_api_key(request, handler)

    return check_then_handle
