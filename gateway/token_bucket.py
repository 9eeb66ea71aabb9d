"""Token buckets, and a bounded table of them keyed by client. Pure: the caller passes the clock in.

A bucket holds up to ``capacity`` tokens and gains ``rate`` tokens a second; a request takes one, or is refused
when less than one is left. ``take`` returns what the HTTP answer needs: allowed or not, whole tokens left,
seconds until the next token (Retry-After when refused) and until the bucket is full again.

``BucketTable`` keeps one bucket per client in LRU order and stays bounded two ways: a bucket that has refilled
to capacity holds no information (a new one would be identical), so such buckets are dropped from the cold end
as the table is used — idle clients cost nothing after ``capacity / rate`` seconds; and past ``max_size``
buckets the least recently used one is dropped even if not full (a client then starts afresh: lenient, but
memory cannot grow with the number of addresses an attacker can use).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

EVICT_PER_TAKE: Final = 2  # idle buckets examined per take: amortised O(1), and the table drains over time


@dataclass(slots=True)  # not frozen: one is made per request, and frozen __init__ costs twice as much
class Decision:
    allowed: bool
    remaining: int  # whole tokens left after this request
    retry_after: float  # seconds until one token is available (0 when one is)
    full_after: float  # seconds until the bucket is full again


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second, > 0
    capacity: float  # >= 1
    tokens: float
    updated: float  # clock reading of the last refill

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate=rate, capacity=capacity, tokens=capacity, updated=now)

    def refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:  # a clock that steps back adds nothing (and takes nothing)
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.updated = now

    def take(self, now: float) -> Decision:
        """Take one token if there is one; say what is left either way."""
        self.refill(now)
        allowed = self.tokens >= 1.0
        if allowed:
            self.tokens -= 1.0
        missing = max(0.0, 1.0 - self.tokens)
        return Decision(
            allowed=allowed,
            remaining=math.floor(self.tokens),
            retry_after=missing / self.rate,
            full_after=(self.capacity - self.tokens) / self.rate,
        )

    def is_full(self, now: float) -> bool:
        return self.tokens + max(0.0, now - self.updated) * self.rate >= self.capacity


class BucketTable:
    """Buckets by client key, LRU-ordered, evicting full (idle) buckets and, past ``max_size``, the oldest."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, client: object) -> bool:
        return client in self._buckets

    def take(self, client: str, rate: float, capacity: float, now: float) -> Decision:
        """Take a token from ``client``'s bucket (a full new one if it has none, or its limits changed)."""
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None or bucket.rate != rate or bucket.capacity != capacity:
            bucket = buckets[client] = TokenBucket.full(rate, capacity, now)
            if len(buckets) > self.max_size:
                buckets.popitem(last=False)
        buckets.move_to_end(client)
        decision = bucket.take(now)
        self._evict_idle(now)
        return decision

    def _evict_idle(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(EVICT_PER_TAKE):
            if len(buckets) <= 1:
                return
            oldest_client, oldest = next(iter(buckets.items()))
            if not oldest.is_full(now):
                return  # LRU order: the next ones were used more recently
            del buckets[oldest_client]
