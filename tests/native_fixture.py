"""What the native test fixtures (``tests/ha_rabbit.py``, ``tests/ha_postgres.py``) share: use as a sync or async
context manager, skip when the machine lacks what they need, and always clean up — also when building fails."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

import pytest


class NativeFixture:
    """Subclasses give ``unavailable()`` (a reason to skip, or None), ``build()`` and ``close()`` (idempotent)."""

    def unavailable(self) -> str | None:
        raise NotImplementedError

    def build(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        reason = self.unavailable()
        if reason is not None:
            pytest.skip(reason)
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        reason = self.unavailable()
        if reason is not None:
            pytest.skip(reason)
        try:
            await asyncio.to_thread(self.build)
        except BaseException:
            await asyncio.to_thread(self.close)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)
