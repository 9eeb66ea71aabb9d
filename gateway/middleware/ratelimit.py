"""Rate limits: the ``rate_limit`` middleware, a token bucket per API key name (per client address with keys off).

Flow of one request on ``/api/external/*`` (nothing else is limited): its policy — the key's own
``rate:burst`` from the keys file, else RATE_LIMIT / RATE_BURST, else none (no headers, no limit) → take a
token from the client's bucket (``gateway.token_bucket``) → none left: 429 in the spec's shape with
``Retry-After`` (whole seconds until the next token, rounded up), built by ``gateway.errors.error_response``;
otherwise the handler. Every answer of a limited request, 2xx and errors alike, carries the two fields of
draft-ietf-httpapi-ratelimit-headers-11 (May 2026; same syntax since -08):

    RateLimit-Policy: "default";q=<rate * w>;w=<w>       q/w is exactly the rate; w is the whole number of
                                                        seconds an empty bucket takes to refill, rounded up
                                                        to one in which the rate earns whole requests (so
                                                        q >= burst, the most r ever says)
    RateLimit: "default";r=<whole tokens left>;t=<seconds>         t: until the bucket is full again, or, when
                                                                  r=0, until the next request is allowed (so
                                                                  on a 429 t = Retry-After, as the draft's
                                                                  section 6 asks)

The limit is per gateway process: behind N gateways a client can get up to N times the rate and burst
(less when a load balancer pins it to one). Per-address buckets are bounded (``MAX_CLIENTS``, idle ones
dropped as soon as they are full again); per-key buckets are bounded by the keys file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import answer_error, error_response
from gateway.metrics import METRICS
from gateway.state import API_KEY, SETTINGS
from gateway.token_bucket import BucketTable, Decision
from shared.apikeys import ApiKey
from shared.errors import TooManyRequests
from shared.settings import Settings

MAX_CLIENTS: Final = 100_000  # buckets held at most (a few hundred bytes each)
POLICY_NAME: Final = "default"


@dataclass(frozen=True, slots=True)
class Policy:
    rate: float  # requests per second, > 0
    burst: int  # bucket size, >= 1
    header: str  # its RateLimit-Policy field value, built once

    @classmethod
    def of(cls, rate: float, burst: int) -> Policy | None:
        """``rate`` requests/s with a bucket of ``burst`` (0: ceil(rate)); None when ``rate`` is 0 (no limit)."""
        if rate <= 0:
            return None
        size = burst if burst > 0 else max(1, math.ceil(rate))
        quota, window = _quota_and_window(rate, size)
        return cls(rate=rate, burst=size, header=f'"{POLICY_NAME}";q={quota};w={window}')


def _quota_and_window(rate: float, burst: int) -> tuple[int, int]:
    """Whole (q, w) with q/w == ``rate`` and q >= ``burst``, w as small as that allows.

    ``rate`` = n/d in lowest terms earns whole requests only in multiples of d seconds: w = k*d, q = k*n for
    the least k with k*n >= burst. (RATE_LIMIT=2 RATE_BURST=3: q=4;w=2.)
    """
    exact = Fraction(rate).limit_denominator(1_000_000)  # 0.1 is 1/10, not the float's 2**-55 multiple
    if exact <= 0:  # below a millionth per second: round the window, not the rate, to zero
        return 1, max(1, math.ceil(1 / rate))
    k = max(1, math.ceil(burst / exact.numerator))
    return k * exact.numerator, k * exact.denominator


class RateLimiter:
    """The default policy, per-key overrides (read from the key at hand: they rotate with the keys file)
    and the buckets."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.default = Policy.of(settings.rate_limit, settings.rate_burst)
        self.clock = clock
        self.buckets = BucketTable(MAX_CLIENTS)
        self._overrides: dict[tuple[float, int], Policy | None] = {}

    def policy_for(self, key: ApiKey | None) -> Policy | None:
        if key is None or key.rate is None:
            return self.default
        limits = (key.rate, key.burst or 0)
        if limits not in self._overrides:
            self._overrides[limits] = Policy.of(*limits)
        return self._overrides[limits]

    def take(self, client: str, policy: Policy) -> Decision:
        return self.buckets.take(client, policy.rate, policy.burst, self.clock())


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


def rate_limit_headers(response: web.StreamResponse, policy: Policy, decision: Decision) -> None:
    seconds = decision.full_after if decision.remaining > 0 else decision.retry_after
    response.headers["RateLimit-Policy"] = policy.header
    response.headers["RateLimit"] = f'"{POLICY_NAME}";r={decision.remaining};t={math.ceil(seconds)}'


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 past the client's bucket; the RateLimit fields on every answer of a limited request (installed on the
    public API only, ``gateway.app``)."""
    key: ApiKey | None = request.get(API_KEY)
    app = request.config_dict
    limiter = app[RATE_LIMITER]
    policy = limiter.policy_for(key)
    if policy is None:
        return await handler(request)
    # Keys on: one bucket per key name (every key of a name shares it); keys off: per client address.
    client = f"key:{key.name}" if key is not None else f"addr:{request.remote}"
    decision = limiter.take(client, policy)
    if decision.allowed:
        try:
            response = await handler(request)
        except Exception as exc:  # answered here, so that an error answer carries the RateLimit fields too
            response = answer_error(request, exc)
    else:
        app[METRICS].count_rate_limited(key.name if key is not None else None)
        retry_after = max(1, math.ceil(decision.retry_after))
        response = error_response(
            TooManyRequests(f"请求过于频繁：每秒最多{policy.rate:g}个请求，请{retry_after}秒后重试",
                            retry_after=retry_after),
            app[SETTINGS].retry_after_seconds,
        )
    rate_limit_headers(response, policy, decision)
    return response
