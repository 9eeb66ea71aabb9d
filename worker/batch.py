"""Micro-batching: the inbox between the AMQP consumer callbacks and the database appliers.

No timer: an applier takes whatever has arrived (up to the batch size) the moment it is free. Under light
load a batch is one request and latency is one transaction; under heavy load batches grow by themselves
while the previous transaction runs. That is "collect up to B messages or T ms" with T adapting to load.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Inbox:
    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._ready.set()

    async def next_batch(self, limit: int) -> list[Any]:
        """Wait for at least one item; return up to ``limit`` items in arrival order."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        count = min(limit, len(self._items))
        batch = [self._items.popleft() for _ in range(count)]
        if not self._items:
            self._ready.clear()
        return batch

    def __len__(self) -> int:
        return len(self._items)
